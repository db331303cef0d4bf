"""End to end through the CLI: run folder, skip, determinism, TensorBoard, kill-and-resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from escarda_lab.io import read_json
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides

TAGS = ["train/loss", "train/cross_entropy", "val/loss", "val/bpb", "perf/tokens_per_s", "perf/mfu", "lr", "grad_norm"]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, out)]) == 0
    return out / "escarda" / "seed0"


def test_run_folder_holds_config_metrics_checkpoint_and_events(finished):
    names = {p.name for p in finished.iterdir()}
    assert {"config.yaml", "metrics.json", "last.ckpt"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert not any(n.endswith(".tmp") for n in names)


def test_resolved_config_records_the_tokenizer_vocab(finished):
    assert "vocab_size: 264" in (finished / "config.yaml").read_text()


def test_metrics_json_has_final_numbers(finished):
    m = read_json(finished / "metrics.json")
    assert m["status"] == "finished" and m["step"] == 6
    assert 0 < m["val_bpb"] < 9 and m["val_loss"] > 0 and m["params"]["total"] > 0
    assert m["flops_per_token"] > 0 and m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1
    assert isinstance(m["dead_components"], dict) and "engram/gate_mean" in m["stats"]


def test_tensorboard_reader_finds_the_fixed_tags(finished):
    tags = scalars(finished)
    for t in TAGS + ["train/z_loss", "train/jepa", "train/mtp"]:
        assert t in tags, t
    assert [s for s, _ in tags["train/loss"]] == list(range(6))  # log_every=1
    assert sorted({s for s, _ in tags["val/bpb"]}) == [3, 6]


def test_the_last_val_point_is_the_final_whole_split_number(finished):
    m = read_json(finished / "metrics.json")
    for tag, key in [("val/bpb", "val_bpb"), ("val/loss", "val_loss"), ("val/acc", "val_acc")]:
        step, value = scalars(finished)[tag][-1]
        assert step == m["step"] and value == pytest.approx(m[key], rel=1e-6)


def test_a_run_shorter_than_val_every_still_has_a_val_curve(corpus, tmp_path):
    over = tiny_overrides(corpus, tmp_path, **{"train.max_steps": 4, "train.val_every": 100})
    assert main(["experiments/vanilla.yaml", *over]) == 0
    folder = tmp_path / "vanilla" / "seed0"
    assert scalars(folder)["val/bpb"][-1] == (4, pytest.approx(read_json(folder / "metrics.json")["val_bpb"]))


def test_progress_lines_when_stderr_is_not_a_terminal(corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="escarda_lab")
    over = tiny_overrides(corpus, tmp_path, **{"train.max_steps": 200, "train.val_every": 50, "train.warmup_steps": 5})
    assert main(["experiments/vanilla.yaml", *over]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) >= 4
    assert all("tokens/s" in line and "ETA" in line for line in lines)
    assert all("train cross-entropy" in line and "objective" in line for line in lines)  # each under its name
    assert "val/bpb" in lines[-1] and "periodic subset" in lines[-1] and lines[-1].startswith("step 200/200")
    final = [
        r.getMessage() for r in caplog.records if "validation split" in r.getMessage() and "val/loss" in r.getMessage()
    ]
    assert len(final) == 1 and "(cross-entropy)" in final[0] and " tokens)" in final[0]  # names its split and tokens
    assert "whole validation split" in final[0]  # train.final_val_tokens 0: the whole split


def test_no_stray_hparams_yaml(finished):
    assert not (finished / "hparams.yaml").exists()


def test_tensorboard_hparams_hold_the_keys_that_differ_from_the_defaults(finished):
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(finished))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert {"name", "seed", "model.d_model", "components.z_loss.enabled", "data.corpus"} <= set(hp)
    assert "train.beta1" not in hp  # at its default: not a column
    assert hp["components.z_loss.enabled"].number_value == 1  # torch writes bools as 0/1


def test_tensorboard_has_a_custom_scalars_layout_with_the_comparison_charts_first(finished):
    ea = EventAccumulator(str(finished))
    ea.Reload()
    assert "custom_scalars__config__" in ea.Tags().get("tensors", [])


def test_rerunning_a_finished_run_skips_it(finished, corpus):
    before = read_json(finished / "metrics.json")
    events = sorted(finished.glob("events.*"))
    assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, finished.parent.parent)]) == 0
    assert read_json(finished / "metrics.json") == before and sorted(finished.glob("events.*")) == events


def test_changed_config_in_an_existing_run_folder_is_refused(finished, corpus, capsys):
    (finished / "metrics.json").rename(finished / "metrics.bak")  # pretend it was interrupted
    try:
        args = tiny_overrides(corpus, finished.parent.parent, **{"train.lr": 0.01})
        assert main(["experiments/escarda.yaml", *args]) == 2
        assert "train.lr" in capsys.readouterr().err
    finally:
        (finished / "metrics.bak").rename(finished / "metrics.json")


def test_same_seed_gives_identical_losses_for_20_steps(corpus, tmp_path):
    extra = {"train.max_steps": 20, "train.val_every": 20, "train.checkpoint_every": 20}
    for name in ("a", "b"):
        assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path, name=name, **extra)]) == 0
    a, b = (scalars(tmp_path / n / "seed0")["train/loss"] for n in ("a", "b"))
    assert len(a) == 20 and a == b


def test_other_seed_gives_other_losses(corpus, tmp_path):
    for seed in (0, 1):
        assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path, seed=seed)]) == 0
    a, b = (scalars(tmp_path / "vanilla" / f"seed{s}")["train/loss"] for s in (0, 1))
    assert a != b


def launch(corpus, tmp_path, name: str, extra: dict, ready):
    """Start a run in a subprocess; returns (process, its command, env, run folder) once ready(folder)."""
    cmd = [sys.executable, "-m", "escarda_lab.run", "experiments/vanilla.yaml"]
    cmd += tiny_overrides(corpus, tmp_path, name=name, **extra)
    folder = tmp_path / name / "seed0"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready(folder):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    return proc, cmd, env, folder


def assert_as_if_uninterrupted(corpus, tmp_path, folder: Path, extra: dict) -> None:
    assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path, name="whole", **extra)]) == 0
    a, b = read_json(folder / "metrics.json"), read_json(tmp_path / "whole" / "seed0" / "metrics.json")
    assert a["step"] == b["step"] == extra["train.max_steps"]
    for key in ("val_loss", "val_bpb_avg", "val_bpb_ema"):
        assert (key in a) == (key in b) and abs(a.get(key, 0) - b.get(key, 0)) < 1e-5, key
    assert [s for s, _ in a["val_window"]] == [s for s, _ in b["val_window"]]
    assert [v for _, v in a["val_window"]] == pytest.approx([v for _, v in b["val_window"]], abs=1e-5)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_uninterrupted_result(corpus, tmp_path):
    extra = {
        "train.max_steps": 400,
        "train.val_every": 100,
        "train.checkpoint_every": 40,
        "train.log_every": 20,
        "train.ema": 0.9,  # the moving average and the averaging window resume too
        "train.average_last": 3,
        "model.d_model": 64,
        "model.ffn_hidden": 128,
    }
    proc, cmd, env, folder = launch(corpus, tmp_path, "killed", extra, lambda f: (f / "last.ckpt").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(folder / "metrics.json")["status"] == "running"  # really interrupted
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_as_if_uninterrupted(corpus, tmp_path, folder, extra)


@pytest.mark.slow
def test_cpu_ddp_with_two_processes_matches_one_process(corpus, tmp_path):
    """Same global batch: DDP (gloo, 2 ranks) logs the same losses as a single process."""
    extra = {"train.max_steps": 8, "train.val_every": 4, "train.checkpoint_every": 4, "train.log_every": 2}
    cmd = [sys.executable, "-m", "escarda_lab.run", "experiments/vanilla.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ddp = tiny_overrides(corpus, tmp_path, name="ddp", **extra) + [
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
    ]
    res = subprocess.run(cmd + ddp, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path, name="one", **extra)]) == 0
    a, b = scalars(tmp_path / "ddp" / "seed0"), scalars(tmp_path / "one" / "seed0")
    for tag in ("train/loss", "val/loss"):
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]]
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a[tag], b[tag]))
    fa, fb = (
        read_json(tmp_path / "ddp" / "seed0" / "metrics.json"),
        read_json(tmp_path / "one" / "seed0" / "metrics.json"),
    )
    assert abs(fa["val_loss"] - fb["val_loss"]) < 1e-4


def test_a_finished_run_rerun_with_a_result_changing_override_is_refused_with_the_diff(finished, corpus, capsys):
    out = finished.parent.parent
    before = read_json(finished / "metrics.json")
    for change in ({"train.lr": 0.01}, {"model.n_layers": 3}, {"train.max_steps": 8}):
        assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, out, **change)]) == 2
        err = capsys.readouterr().err
        key = next(iter(change))
        assert key in err and "->" in err, err
    # keys that do not change the result may differ: the finished run is still skipped
    assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, out, **{"train.log_every": 5})]) == 0
    assert read_json(finished / "metrics.json") == before


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "a/b", ".."])
def test_a_name_that_leaves_the_output_folder_is_refused(corpus, tmp_path, capsys, name):
    assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path / "runs", name=name)]) == 2
    assert "`name`" in capsys.readouterr().err
    assert not any(p.name == "escape" for p in tmp_path.rglob("*")) and not Path("/tmp/escape").exists()


def interrupted_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of a finished run folder that looks interrupted (so a rerun would resume it)."""
    import shutil

    folder = tmp_path / "escarda" / "seed0"
    shutil.copytree(finished, folder)
    m = read_json(folder / "metrics.json")
    (folder / "metrics.json").write_text(f'{{"status": "running", "step": {m["step"]}}}')
    return folder


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "empty"])
def test_a_damaged_checkpoint_is_refused_by_name(finished, corpus, tmp_path, capsys, damage):
    folder = interrupted_copy(finished, tmp_path)
    ckpt = folder / "last.ckpt"
    data = bytearray(ckpt.read_bytes())
    if damage == "zeroed":
        start = len(data) // 3
        data[start : start + 65536] = bytes(min(65536, len(data) - start))
    ckpt.write_bytes(bytes(data[: len(data) // 2] if damage == "truncated" else b"" if damage == "empty" else data))
    assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "delete" in err and "Traceback" not in err
    assert read_json(folder / "metrics.json")["status"] == "failed"


def test_a_second_process_on_a_running_folder_is_refused(finished, corpus, tmp_path, capsys):
    from filelock import FileLock

    folder = interrupted_copy(finished, tmp_path)
    with FileLock(folder / ".lock"):
        (folder / ".pid").write_text("4242\n")
        assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, tmp_path)]) == 2
    assert "PID 4242" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_checkpoints_marks_interrupted_and_the_rerun_finishes_as_if_uninterrupted(corpus, tmp_path):
    import torch

    extra = {
        "train.max_steps": 1200,
        "train.val_every": 600,
        "train.checkpoint_every": 100,
        "train.log_every": 10,
        "model.d_model": 64,
        "model.ffn_hidden": 128,
    }
    proc, cmd, env, folder = launch(corpus, tmp_path, "term", extra, lambda f: (f / "last.ckpt").exists())
    proc.send_signal(signal.SIGTERM)  # training is under way: its first scheduled checkpoint exists
    rc, err = proc.wait(timeout=60), proc.stderr.read().decode()
    assert rc == 143 and "SIGTERM" in err, err[-3000:]
    m = read_json(folder / "metrics.json")
    ckpt_step = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert m["status"] == "interrupted" and 100 <= m["step"] == ckpt_step < 1200
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == 0
    assert_as_if_uninterrupted(corpus, tmp_path, folder, extra)


def test_a_run_in_process_leaves_the_callers_signal_handlers_as_they_were(corpus, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    assert main(["experiments/vanilla.yaml", *tiny_overrides(corpus, tmp_path)]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------ steadier end-of-run readings


@pytest.fixture(scope="module")
def averaged(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("averaged")
    over = tiny_overrides(corpus, out, **{"train.average_last": 3, "train.val_every": 2, "train.ema": 0.5})
    assert main(["experiments/vanilla.yaml", *over]) == 0
    return read_json(out / "vanilla" / "seed0" / "metrics.json")


def test_average_last_scores_the_whole_split_at_the_last_evaluation_steps(averaged):
    steps = [s for s, _ in averaged["val_window"]]
    assert steps == [2, 4, 6] and averaged["val_window"][-1][1] == pytest.approx(averaged["val_bpb"])
    assert averaged["val_bpb_avg"] == pytest.approx(sum(b for _, b in averaged["val_window"]) / 3)


def test_ema_weights_are_scored_at_the_end(averaged):
    assert math.isfinite(averaged["val_bpb_ema"]) and averaged["val_bpb_ema"] != averaged["val_bpb"]


def test_a_run_records_its_evaluation_standard_error_and_history(averaged):
    assert 0 < averaged["val_bpb_se"] < 1 and [s for s, _ in averaged["val_history"]] == [2, 4, 6]


def test_an_averaging_window_longer_than_the_run_is_refused(corpus, tmp_path, capsys):
    over = tiny_overrides(corpus, tmp_path, **{"train.average_last": 4, "train.val_every": 2})
    assert main(["experiments/vanilla.yaml", *over]) == 2
    assert "train.average_last" in capsys.readouterr().err


def test_final_val_tokens_caps_the_final_score_to_evenly_spread_windows(corpus, tmp_path):
    over = tiny_overrides(corpus, tmp_path, **{"train.final_val_tokens": 96})  # 3 windows of 32
    assert main(["experiments/vanilla.yaml", *over]) == 0
    m = read_json(tmp_path / "vanilla" / "seed0" / "metrics.json")
    assert m["val_tokens"] == 96 and len(m["val_batch_bpb"]) == 1  # batch_size 4: one batch of 3
    assert m["val_whole_split"] is False  # and the record says it is not the whole split


def test_final_val_tokens_below_one_window_is_refused(corpus, tmp_path, capsys):
    over = tiny_overrides(corpus, tmp_path, **{"train.final_val_tokens": 10})
    assert main(["experiments/vanilla.yaml", *over]) == 2
    assert "train.final_val_tokens" in capsys.readouterr().err


def test_a_finished_runs_damaged_checkpoint_says_to_delete_the_folder_not_just_the_file(finished, tmp_path):
    import shutil

    from escarda_lab.errors import UserError
    from escarda_lab.run_folder import load_run

    folder = tmp_path / "copy"
    shutil.copytree(finished, folder)
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_run(folder)
    assert f"delete the run folder {folder}" in str(e.value) and "metrics.json" in str(e.value)


def test_a_run_written_before_a_key_existed_is_the_same_run_at_that_keys_default(finished, corpus, tmp_path):
    import shutil

    folder = tmp_path / "escarda" / "seed0"
    shutil.copytree(finished, folder)
    old = [line for line in (folder / "config.yaml").read_text().splitlines() if not line.strip().startswith("ema:")]
    (folder / "config.yaml").write_text("\n".join(old) + "\n")  # as written before train.ema existed
    assert main(["experiments/escarda.yaml", *tiny_overrides(corpus, tmp_path)]) == 0
    over = tiny_overrides(corpus, tmp_path) + ["train.ema=0.5"]  # a real change is still refused
    assert main(["experiments/escarda.yaml", *over]) == 2
