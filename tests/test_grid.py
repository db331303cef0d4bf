"""Grids: expansion, one process per run, results.jsonl, skip/resume, failure isolation, submitit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from escarda_lab import grid
from escarda_lab.errors import ConfigError
from escarda_lab.io import read_json, write_json
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides

TWO_BY_TWO = """
extends: {root}/experiments/vanilla.yaml
name: g
plugins: [tests.plugins.dummy]
grid:
  seeds: [0, 1]
  variants: {{xsa: {{components.xsa.enabled: true}}}}
  parallel: 2
"""


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(root=ROOT))
    return path


def results(grid_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (grid_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_grid(corpus, tmp_path_factory):
    """A 2 variants x 2 seeds grid trained through the local launcher."""
    tmp = tmp_path_factory.mktemp("grid")
    path = write(tmp, TWO_BY_TWO)
    over = tiny_overrides(corpus, tmp / "runs")
    assert main([str(path), *over]) == 0
    return path, over, tmp / "runs" / "g"


def test_grid_trains_every_run_into_its_folder(finished_grid):
    _, _, grid_dir = finished_grid
    recs = results(grid_dir)
    assert [(r["variant"], r["seed"], r["status"]) for r in recs] == [
        ("full", 0, "finished"),
        ("xsa", 0, "finished"),
        ("full", 1, "finished"),
        ("xsa", 1, "finished"),
    ]
    for r in recs:
        folder = grid_dir / r["folder"]
        assert (folder / "config.yaml").exists() and (folder / "metrics.json").exists()
        assert list(folder.glob("events.out.tfevents.*"))  # each run is its own TensorBoard run
        assert r["val_bpb"] > 0


def test_grid_runs_show_their_variant_seed_and_the_varied_keys_as_hparams(finished_grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, _, grid_dir = finished_grid
    ea = EventAccumulator(str(grid_dir / "xsa" / "seed1"))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert set(hp) == {"variant", "seed", "components.xsa.enabled"}
    assert hp["variant"].string_value == "xsa" and hp["seed"].number_value == 1


def test_compare_takes_run_folders_outside_a_grid(finished_grid, capsys):
    from escarda_lab.compare import main as compare_main

    _, _, grid_dir = finished_grid
    assert compare_main([str(grid_dir / "full"), str(grid_dir / "xsa")]) == 0
    out = capsys.readouterr().out
    assert "Runs compared: `full`, `xsa`" in out and "`xsa`" in out and "2/2" in out and "Δ bpb (paired)" in out
    assert "add --out DIR" in out  # says that nothing was written, and how to write it


def test_compare_tells_apart_two_variants_of_one_name_from_two_grids(finished_grid, tmp_path, capsys):
    import shutil

    from escarda_lab.compare import main as compare_main

    _, _, grid_dir = finished_grid
    other = tmp_path / "other_grid" / "full"
    shutil.copytree(grid_dir / "xsa", other)  # the same variant name under another grid
    assert compare_main([str(grid_dir / "full"), str(other)]) == 0
    out = capsys.readouterr().out
    assert f"Runs compared: `{grid_dir.name}/full`, `other_grid/full`" in out and "2/2" in out


def test_compare_out_writes_the_run_folders_comparison_with_its_curves(finished_grid, tmp_path, capsys):
    from escarda_lab.compare import main as compare_main

    _, _, grid_dir = finished_grid
    out = tmp_path / "cmp"
    assert compare_main([str(grid_dir / "full"), str(grid_dir / "xsa"), "--out", str(out)]) == 0
    assert "Runs compared: `full`, `xsa`" in (out / "summary.md").read_text()
    assert (out / "summary.csv").read_text().startswith("variant,")
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "forest.png").stat().st_size > 10_000
    width = int.from_bytes((out / "curves.png").read_bytes()[16:20], "big")
    assert width > 1200  # two panels: the runs' learning curves were found beside the paired differences
    assert compare_main([str(grid_dir), "--out", str(out)]) == 2  # a grid writes into its own folder


def test_rerunning_a_finished_grid_skips_every_run(finished_grid):
    path, over, grid_dir = finished_grid
    before = {p: p.stat().st_mtime_ns for p in grid_dir.rglob("metrics.json")}
    walls = {(r["run"], r["seed"]): r["wall_s"] for r in results(grid_dir)}
    legacy = read_json(grid_dir / "full" / "seed0" / "grid_run.json")  # as a run trained before it kept "trained"
    write_json(grid_dir / "full" / "seed0" / "grid_run.json", {k: v for k, v in legacy.items() if k != "trained"})
    assert main([str(path), *over]) == 0
    assert all(r.get("skipped") for r in results(grid_dir))
    assert {(r["run"], r["seed"]): r["wall_s"] for r in results(grid_dir)} == walls  # what training took stays
    assert {p: p.stat().st_mtime_ns for p in grid_dir.rglob("metrics.json")} == before


def test_a_crash_is_recorded_and_a_killed_run_resumes_alone(corpus, tmp_path):
    marker = tmp_path / "killed_once"
    path = write(
        tmp_path,
        TWO_BY_TWO.replace("seeds: [0, 1]", "seeds: [0]").replace(
            "variants: {{xsa: {{components.xsa.enabled: true}}}}",
            "variants: {{crash: {{components.crash.enabled: true}},\n"
            f"             killed: {{{{components.crash.enabled: true, components.crash.at_call: 5,\n"
            f"                      components.crash.kill_once_marker: {marker}}}}}}}}}",
        ),
    )
    over = tiny_overrides(corpus, tmp_path / "runs")
    grid_dir = tmp_path / "runs" / "g"

    assert main([str(path), *over]) == 1  # some runs failed
    first = {r["variant"]: r for r in results(grid_dir)}
    assert first["full"]["status"] == "finished"
    assert first["crash"]["status"] == "failed" and "injected crash" in first["crash"]["error"]
    assert first["killed"]["status"] == "failed" and "signal 9" in first["killed"]["error"]
    assert (grid_dir / "killed" / "seed0" / "last.ckpt").exists()

    main([str(path), *over])
    second = {r["variant"]: r for r in results(grid_dir)}
    assert second["full"].get("skipped") and second["killed"]["status"] == "finished"
    assert not second["killed"].get("skipped")
    assert "resuming from step 3" in (grid_dir / "killed" / "seed0" / "log.txt").read_text()


def test_changed_grid_file_does_not_overwrite_finished_runs(finished_grid):
    path, over, grid_dir = finished_grid
    before = (grid_dir / "full" / "seed0" / "config.yaml").read_text()
    assert main([str(path), *over, "train.lr=0.01"]) == 1
    assert all(r["status"] == "failed" and "different config" in r["error"] for r in results(grid_dir))
    assert (grid_dir / "full" / "seed0" / "config.yaml").read_text() == before
    assert main([str(path), *over]) == 0  # the original grid is intact


def test_grid_evaluate_scores_finished_runs_and_compare_reports_it(finished_grid, tmp_path):
    from escarda_lab import report, summary

    path, over, grid_dir = finished_grid
    task = tmp_path / "mc.jsonl"
    task.write_text('{"context": "The king", "choices": ["speaks.", "zzq"], "label": 0}\n')
    assert main([str(path), *over, f"grid.evaluate=[minimal_pairs,{task}]"]) == 0
    recs = results(grid_dir)
    assert all(0 <= r["eval/minimal_pairs"] <= 1 and "eval/mc/acc" in r for r in recs)
    assert all(not r.get("skipped") for r in recs)  # training skipped, evaluation ran
    assert all(sum(r["timings"].values()) <= r["wall_s"] and r["eval_wall_s"] > 0 for r in recs)  # each its own
    md = report.markdown(summary.summarize(summary.load_runs(grid_dir)), summary.load_plan(grid_dir), 0.05)
    assert "Evaluations" in md and "minimal_pairs" in md


@pytest.mark.slow
def test_submitit_local_executor_runs_the_same_grid(corpus, tmp_path):
    path = write(
        tmp_path,
        TWO_BY_TWO.replace(
            "parallel: 2", "parallel: 2\n  launcher: submitit\n  submitit: {{cluster: local, timeout_min: 10}}"
        ),
    )
    over = tiny_overrides(corpus, tmp_path / "runs")
    assert main([str(path), *over]) == 0
    recs = results(tmp_path / "runs" / "g")
    assert len(recs) == 4 and all(r["status"] == "finished" and r["job_id"] for r in recs)
    assert main([str(path), *over]) == 0
    assert all(r.get("skipped") for r in results(tmp_path / "runs" / "g"))


@pytest.mark.slow
def test_a_tiny_grid_with_controls_is_calibrated(corpus, tmp_path):
    """Four paired seeds: half the training budget reads `hurts`; independent seeds read neither."""
    from escarda_lab import summary

    path = write(
        tmp_path,
        "extends: {root}/experiments/vanilla.yaml\nname: g\n"
        "grid: {{seeds: [0, 1, 2, 3], controls: true, parallel: 2}}\n",
    )
    over = tiny_overrides(
        corpus,
        tmp_path / "runs",
        **{"train.max_steps": 24, "train.warmup_steps": 2, "train.val_every": 12, "train.lr": 1e-2},
    )
    assert main([str(path), *over]) == 0
    s = summary.summarize(summary.load_runs(tmp_path / "runs" / "g")).set_index("variant")
    assert s.loc["control_half_budget", "verdict"] == "hurts"
    assert not s.loc["control_null", "verdict"].startswith(("helps", "hurts"))
    text = summary.calibration(s.reset_index())
    assert "**0 of 1** read helps/hurts" in text and "(0.5× tokens)" in text


def test_per_gpu_pins_that_many_runs_to_each_visible_gpu(monkeypatch):
    from escarda_lab.grid import GridConfig, child_env, worker_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert worker_slots(GridConfig(per_gpu=2)) == ["3", "3", "5", "5"]
    assert worker_slots(GridConfig(parallel=3)) == [None, None, None]
    assert child_env(4, "5")["CUDA_VISIBLE_DEVICES"] == "5"


def test_per_gpu_without_a_gpu_runs_unpinned_and_says_so(monkeypatch):
    from escarda_lab.grid import GridConfig, worker_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    said = []
    assert worker_slots(GridConfig(per_gpu=4, parallel=2), said.append) == [None, None]
    assert "no GPU is visible" in said[0]


def test_a_run_held_by_another_process_is_recorded_as_held_not_failed(corpus, tmp_path, caplog):
    from filelock import FileLock

    path = write(tmp_path, "extends: {root}/experiments/vanilla.yaml\nname: g\ngrid: {{seeds: [0]}}\n")
    over = tiny_overrides(corpus, tmp_path / "runs")
    folder = tmp_path / "runs" / "g" / "full" / "seed0"
    folder.mkdir(parents=True)
    caplog.set_level("WARNING")
    with FileLock(folder / ".lock"):  # another grid is training this run
        assert main([str(path), *over]) == 0
    (rec,) = results(tmp_path / "runs" / "g")
    assert rec["status"] == "held" and "another process" in rec["error"]
    assert "held by another process" in caplog.text
    assert main([str(path), *over]) == 0  # released: the rerun trains and records it
    assert {r["status"] for r in results(tmp_path / "runs" / "g")} == {"finished"}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_to_the_grid_stops_every_run_at_a_checkpoint_and_the_rerun_resumes(signum, corpus, tmp_path):
    path = write(tmp_path, "extends: {root}/experiments/vanilla.yaml\nname: g\ngrid: {{seeds: [0]}}\n")
    over = tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 3000, "train.checkpoint_every": 50})
    cmd = [sys.executable, "-m", "escarda_lab.run", str(path), *over]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # as from a terminal: a shell starts background jobs with SIGINT ignored, and an ignored SIGINT
    # is inherited (and rightly left alone), so the grid is started with the default handler
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    folder = tmp_path / "runs" / "g" / "full" / "seed0"
    deadline = time.time() + 120
    while not (folder / "last.ckpt").exists():  # the run is under way in its own process
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signum)  # to the grid's process only, not its group
    rc, err = proc.wait(timeout=120), proc.stderr.read().decode()
    assert rc == 128 + signum and "Traceback" not in err, err[-2000:]
    assert "full seed0: stopped (exit 143)" in err and "rerun" in err, err[-2000:]
    assert read_json(folder / "metrics.json")["status"] == "interrupted"


def test_an_axis_over_corpus_paths_gets_readable_run_names(corpus, tmp_path):
    other = tmp_path / "data" / "other.txt"
    other.parent.mkdir()
    other.write_text(corpus.read_text()[:50_000])
    path = write(tmp_path, TWO_BY_TWO.replace("parallel: 2", f"axes: {{{{data.corpus: [{corpus}, {other}]}}}}"))
    _, runs, grid_dir, *_ = grid.expand(path, tiny_overrides(corpus, tmp_path / "runs"))
    names = {r.variant.name for r in runs}
    assert names == {"full-corpustiny.txt", "xsa-corpustiny.txt", "full-corpusother.txt", "xsa-corpusother.txt"}
    assert all(r.folder.parent.parent == grid_dir for r in runs)


SEQUENTIAL = """
extends: {root}/experiments/vanilla.yaml
name: g
plugins: [tests.plugins.dummy]
grid:
  seeds: {{min: 4, max: 8, step: 2}}
  variants: {{big: {{components.xsa.enabled: true}}, same: {{model.norm_eps: 1.0e-5}}}}
"""


def test_sequential_seeds_stop_a_decided_comparison_and_grow_the_undecided_one(corpus, tmp_path, monkeypatch):
    """Training replaced by known results: `big` differs by 1 bpb (sd 0.001) and is decided at the
    first look; `same` differs by nothing (sd 0.1) and gets seeds until the last look."""
    import numpy as np

    from escarda_lab import compare
    from escarda_lab.io import write_json

    trained = []

    def fake_train_runs(g, runs, grid_dir, echo=print):
        for r in runs:
            if (r.folder / "metrics.json").exists():
                continue
            rng = np.random.default_rng(r.seed)
            base = 2.0 + rng.normal(0, 0.05)
            bpb = {"full": base, "big": base + 1.0 + rng.normal(0, 0.001), "same": base + rng.normal(0, 0.1)}
            write_json(r.folder / "metrics.json", {"status": "finished", "val_bpb": bpb[r.variant.name]})
            trained.append((r.variant.name, r.seed))
        return [{"status": "finished"} for _ in runs]

    monkeypatch.setattr(grid, "train_runs", fake_train_runs)
    lines = []
    grid.run_grid(write(tmp_path, SEQUENTIAL), tiny_overrides(corpus, tmp_path / "runs"), echo=lines.append)
    seeds = {name: sorted(s for n, s in trained if n == name) for name in ("full", "big", "same")}
    assert seeds == {"full": list(range(8)), "big": [0, 1, 2, 3], "same": list(range(8))}
    assert any(line.startswith("look 1/3 at 4 seeds: decided big (hurts at look 1)") for line in lines), lines
    assert any(line.startswith("20/24 runs finished") for line in lines), lines  # 8 + 4 + 8 of 3 x 8
    md = compare.write(tmp_path / "runs" / "g")["md"].read_text()
    assert "**Sequential seeds.** Looks at [4, 6, 8]" in md and "| `big` " in md


def test_sequential_seeds_need_a_sane_range(corpus, tmp_path):
    bad = SEQUENTIAL.replace("min: 4, max: 8", "min: 6, max: 4")
    with pytest.raises(ConfigError, match="grid.seeds"):
        grid.expand(write(tmp_path, bad), tiny_overrides(corpus, tmp_path / "runs"))


def test_an_unknown_verdict_metric_is_refused(corpus, tmp_path):
    bad = TWO_BY_TWO.replace("parallel: 2", "parallel: 2\n  metric: val_bpb_best")
    with pytest.raises(ConfigError, match="grid.metric"):
        grid.expand(write(tmp_path, bad), tiny_overrides(corpus, tmp_path / "runs"))


def test_a_child_grid_may_turn_its_parents_seed_list_into_a_sequential_design(corpus, tmp_path):
    write(tmp_path, TWO_BY_TWO, "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\ngrid:\n  seeds: {{min: 2, max: 4, step: 2}}\n", "child.yaml")
    g = grid.expand(child, tiny_overrides(corpus, tmp_path / "runs")).spec
    assert g.seeds == [0, 1, 2, 3] and g.sequential.looks() == [2, 4]


def test_each_run_records_where_its_time_went_and_the_grid_sums_it(finished_grid):
    from escarda_lab.grid.launch import PHASES, phase_line

    _, _, grid_dir = finished_grid
    recs = results(grid_dir)
    for rec in recs:
        t = rec["timings"]
        assert set(t) == set(PHASES) and all(v >= 0 for v in t.values())
        assert t["training"] == pytest.approx(rec["train_seconds"], rel=1e-6)  # one process trained it all
        assert sum(t.values()) <= rec["wall_s"] + 1e-6
    line = phase_line(recs)
    assert line.startswith("time per run by phase") and "final score" in line and "training steps" in line


def test_a_later_call_on_some_runs_keeps_every_earlier_record(finished_grid):
    """A sequential grid's next look (or a rerun stopped early) rewrites results.jsonl: the runs it
    has not reached yet keep their lines."""
    from escarda_lab.grid.launch import train_runs

    path, over, grid_dir = finished_grid
    before = {(r["run"], r["seed"]) for r in results(grid_dir)}
    g, runs, *_ = grid.resolved(path, over)
    train_runs(g, runs[:1], grid_dir, echo=lambda *_: None)  # walks one run, as if stopped there
    assert {(r["run"], r["seed"]) for r in results(grid_dir)} == before == {(r.cfg.name, r.seed) for r in runs}
