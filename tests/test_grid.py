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

from escarda_lab import config, grid
from escarda_lab.errors import ConfigError
from escarda_lab.io import read_json
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


def test_expansion_resolves_every_run_with_its_folder(corpus, tmp_path):
    g, runs, grid_dir, *_ = grid.resolved(write(tmp_path, TWO_BY_TWO), tiny_overrides(corpus, tmp_path / "runs"))
    assert [(r.variant.name, r.seed) for r in runs] == [("full", 0), ("xsa", 0), ("full", 1), ("xsa", 1)]
    assert [r.folder for r in runs][:2] == [grid_dir / "full" / "seed0", grid_dir / "xsa" / "seed0"]
    assert [r.cfg.components.xsa.enabled for r in runs] == [False, True, False, True]
    assert all(r.cfg.model.vocab_size == 264 for r in runs)  # the byte tokenizer's, filled in


def test_leave_one_out_and_add_one_in_name_their_variants(corpus, tmp_path):
    path = write(
        tmp_path,
        "extends: {root}/experiments/escarda.yaml\nname: g\n"
        "grid: {{leave_one_out: [engram], add_one_in: [xsa], baseline: vanilla}}\n",
    )
    _, runs, _, *_ = grid.resolved(path, tiny_overrides(corpus, tmp_path / "runs"))
    by = {r.variant.name: r.cfg.components for r in runs}
    assert list(by) == ["full", "no_engram", "vanilla", "with_xsa"]
    assert not by["no_engram"].engram.enabled and by["no_engram"].xsa.enabled
    assert not any(getattr(by["vanilla"], n).enabled for n in ["mla", "xsa", "engram", "mtp"])
    assert by["with_xsa"].xsa.enabled and not by["with_xsa"].engram.enabled
    assert {r.variant.baseline for r in runs} == {"vanilla"}


def test_axes_multiply_the_variants_and_pair_each_with_its_baseline(corpus, tmp_path):
    path = write(tmp_path, TWO_BY_TWO.replace("parallel: 2", "axes: {{model.n_layers: [1, 2]}}"))
    _, runs, _, *_ = grid.resolved(path, tiny_overrides(corpus, tmp_path / "runs"))
    first = [r for r in runs if r.seed == 0]
    assert [r.variant.name for r in first] == ["full-n_layers1", "xsa-n_layers1", "full-n_layers2", "xsa-n_layers2"]
    assert [r.cfg.model.n_layers for r in first] == [1, 1, 2, 2]
    assert first[1].variant.baseline == "full-n_layers1"


def test_match_params_puts_every_variant_within_one_percent(corpus, tmp_path):
    path = write(
        tmp_path,
        "extends: {root}/experiments/escarda.yaml\nname: g\n"
        "grid: {{leave_one_out: [engram, hash_lookup, mla, hyper_connections], match: params,\n"
        "       variants: {{moe: {{components.moe.enabled: true}}}}}}\n",
    )
    _, runs, _, *_ = grid.resolved(path, tiny_overrides(corpus, tmp_path / "runs"))
    base = grid.params_of(runs[0].cfg, "params")
    for r in runs:
        assert abs(grid.params_of(r.cfg, "params") - base) <= 0.01 * base, r.variant.name
    adjust = {r.variant.name: r.adjust for r in runs}
    assert "model.ffn_hidden" in adjust["no_engram"]  # the dropped table went to the FFN
    assert adjust["moe"] == {}  # its active experts already match the dense FFN: nothing to resize


def test_match_params_counts_non_embedding_params_by_default(corpus, tmp_path):
    from escarda_lab.accounting import build_on_meta, embedding_params, param_counts

    _, runs, _, *_ = grid.resolved(write(tmp_path, TWO_BY_TWO), tiny_overrides(corpus, tmp_path / "runs"))
    model = build_on_meta(runs[0].cfg)
    assert grid.params_of(runs[0].cfg, "params") == param_counts(model)["active"] - 264 * 32
    assert embedding_params(model) == 264 * 32  # tied: the head is the same matrix


@pytest.mark.parametrize("kind", ["params", "params_total"])
def test_match_params_on_add_one_in_matches_at_sane_widths_or_refuses(corpus, tmp_path, kind):
    over = tiny_overrides(corpus, tmp_path / "runs", **{"grid.match": kind})
    try:
        _, runs, _, *_ = grid.resolved(ROOT / "experiments/add_one_in.yaml", over)
    except ConfigError as e:
        assert "below half its width" in str(e) and "grid.match" in str(e)
        return
    base = {r.variant.name: grid.params_of(r.cfg, kind) for r in runs if r.variant.name == r.variant.baseline}
    for r in runs:
        assert abs(grid.params_of(r.cfg, kind) - base[r.variant.baseline]) <= 0.01 * base[r.variant.baseline]
        for key, (old, new) in r.adjust.items():
            assert new >= old / 2, (r.variant.name, key, old, new)


def test_match_params_refuses_a_width_below_half(corpus, tmp_path):
    path = write(
        tmp_path,
        "extends: {root}/experiments/vanilla.yaml\nname: g\n"
        "grid: {{baseline: vanilla, add_one_in: [hash_lookup], match: params_total}}\n",
    )
    with pytest.raises(ConfigError, match="below half its width"):
        grid.resolved(path, tiny_overrides(corpus, tmp_path / "runs"))


def test_match_flops_equalises_training_flops(corpus, tmp_path):
    path = write(
        tmp_path,
        "extends: {root}/experiments/escarda.yaml\nname: g\n"
        "grid: {{leave_one_out: [mtp, hyper_connections], vanilla: true, match: flops}}\n",
    )
    _, runs, _, *_ = grid.resolved(path, tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 200}))
    spent = {r.variant.name: grid.train_flops(r.cfg, grid.flops_per_token(r.cfg)) for r in runs}
    for name, flops in spent.items():
        assert abs(flops - spent["full"]) <= 0.02 * spent["full"], name
    steps = {r.variant.name: r.cfg.train.max_steps for r in runs}
    assert steps["vanilla"] > steps["no_mtp"] > steps["full"] == 200


CONTROLLED = """
extends: {root}/experiments/vanilla.yaml
name: g
grid:
  seeds: [0, 1]
  parallel: 2
  controls: true
  tune: {{key: train.lr, values: [1.0e-3, 3.0e-3], seeds: 1, max_steps: 3, extend: false}}
  variants: {{xsa: {{components.xsa.enabled: true}}}}
"""


def test_controls_are_the_baseline_with_other_seeds_or_half_the_steps(corpus, tmp_path):
    _, runs, _, *_ = grid.resolved(write(tmp_path, CONTROLLED), tiny_overrides(corpus, tmp_path / "runs"))
    by = {(r.variant.name, r.seed): r.cfg for r in runs}
    null, half, full = by[("control_null", 1)], by[("control_half_budget", 1)], by[("full", 1)]
    assert (null.init_seed, null.data_seed, null.seed) == (10001, 10001, 1)
    assert half.train.max_steps == full.train.max_steps // 2  # wins over the command line's max_steps
    assert config.flatten(null) | {"init_seed": None, "data_seed": None, "name": "full"} == config.flatten(full)


def test_expansion_is_pure_no_tokenizer_is_trained_and_no_model_built(corpus, tmp_path, monkeypatch):
    from escarda_lab import accounting, data

    monkeypatch.setattr(data, "vocab_size", lambda *a: pytest.fail("expand trained a tokenizer"))
    monkeypatch.setattr(accounting, "build_on_meta", lambda *a: pytest.fail("expand built a model"))
    path = write(tmp_path, TWO_BY_TWO.replace("parallel: 2", "match: params"))
    g, runs, _, source, _ = grid.expand(path, tiny_overrides(corpus, tmp_path / "runs"))
    assert len(runs) == 4 and runs[0].cfg.model.vocab_size is None and source.endswith("grid.yaml")


CALIBRATED = """
extends: {root}/experiments/vanilla.yaml
name: g
grid:
  seeds: [0]
  calibration: {{nulls: 2, budgets: [0.5, 0.75]}}
"""


def test_a_calibration_block_adds_independent_nulls_and_a_dose_response_of_budgets(corpus, tmp_path):
    over = tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 40, "train.warmup_steps": 4})
    _, runs, *_ = grid.expand(write(tmp_path, CALIBRATED), over)
    by = {r.variant.name: r.cfg for r in runs}
    assert list(by) == ["full", "control_null", "control_null2", "control_budget0.5", "control_budget0.75"]
    assert (by["control_null"].init_seed, by["control_null2"].init_seed) == (10000, 20000)
    assert (by["control_budget0.5"].train.max_steps, by["control_budget0.75"].train.max_steps) == (20, 30)


def test_two_readings_add_a_same_recipe_twin_where_the_tuned_value_differs(corpus, tmp_path):
    path = write(tmp_path, CONTROLLED.replace("xsa: {{", "other: {{components.z_loss.enabled: true}}, xsa: {{"))
    tuned = {"full": 3e-3, "xsa": 1e-3, "other": 3e-3}
    _, runs, *_ = grid.expand(path, tiny_overrides(corpus, tmp_path / "runs"), tuned=tuned)
    lr = {r.variant.name: r.cfg.train.lr for r in runs if r.seed == 0}
    assert lr["xsa"] == 1e-3 and lr["xsa@base_lr"] == 3e-3  # the twin: xsa at the baseline's value
    assert "other@base_lr" not in lr  # its own value is the baseline's: one run serves both readings
    twin = next(r for r in runs if r.variant.name == "xsa@base_lr")
    assert twin.variant.twin_of == "xsa" and twin.cfg.components.xsa.enabled


def test_a_value_chosen_at_the_edge_of_the_sweep_is_tried_one_step_further():
    from escarda_lab.grid.spec import TuneConfig
    from escarda_lab.grid.tuning import beyond_edge

    t = TuneConfig(values=[1.5e-3, 3e-3, 6e-3])
    tuned = {
        "a": {"value": 1.5e-3, "scores": {"0.0015": 1.0, "0.003": 2.0, "0.006": 3.0}},
        "b": {"value": 3e-3, "scores": {"0.0015": 2.0, "0.003": 1.0, "0.006": 3.0}},
        "c": {"value": 6e-3, "scores": {"0.0015": 3.0, "0.003": 2.0, "0.006": 1.0}},
        "d": {"value": 1.2e-2, "scores": {"0.0015": 3, "0.003": 2, "0.006": 1.5, "0.012": 1}},  # extended once
    }
    out = beyond_edge(t, tuned)
    assert out.keys() == {"a", "c"}
    assert out["a"][0] == pytest.approx(7.5e-4) and out["c"][0] == pytest.approx(1.2e-2)


def test_tuning_runs_use_their_own_seeds_and_every_value(corpus, tmp_path):
    _, runs, grid_dir, *_ = grid.resolved(
        write(tmp_path, CONTROLLED), tiny_overrides(corpus, tmp_path / "runs"), tuning=True
    )
    assert {(r.variant.name, r.cfg.train.lr, r.seed) for r in runs} == {
        (v, lr, 1000) for v in ["full", "xsa"] for lr in [1e-3, 3e-3]
    }  # controls use the baseline's value
    assert all(r.folder.parent.parent == grid_dir / "tune" and r.cfg.train.max_steps == 3 for r in runs)


def test_a_tuned_grid_trains_the_verdict_seeds_at_each_variants_best_value(corpus, tmp_path):
    path = write(tmp_path, CONTROLLED)
    assert main([str(path), *tiny_overrides(corpus, tmp_path / "runs")]) == 0
    grid_dir = tmp_path / "runs" / "g"
    plan = json.loads((grid_dir / "grid.json").read_text())
    for name in ["full", "xsa"]:
        t = plan["tuned"][name]
        best = min(t["scores"], key=t["scores"].get)
        assert str(t["value"]) == best
        for seed in [0, 1]:
            cfg = config.load(grid_dir / name / f"seed{seed}" / "config.yaml")
            assert cfg.train.lr == t["value"]
    null = config.load(grid_dir / "control_null" / "seed0" / "config.yaml")
    assert null.train.lr == plan["tuned"]["full"]["value"]
    from escarda_lab import compare

    paths = compare.write(grid_dir)
    assert paths["tune"].stat().st_size > 5_000
    assert "control" in paths["md"].read_text() and "tuned per variant" in paths["md"].read_text()


def test_dry_run_prints_the_table_and_trains_nothing(corpus, tmp_path, caplog):
    caplog.set_level("INFO")
    path = write(tmp_path, TWO_BY_TWO)
    assert main([str(path), *tiny_overrides(corpus, tmp_path / "runs"), "--dry-run"]) == 0
    assert "xsa" in caplog.text and "params" in caplog.text and "4 runs" in caplog.text
    assert not (tmp_path / "runs").exists()


def test_bad_grid_key_names_the_file_and_the_key(corpus, tmp_path):
    path = write(tmp_path, TWO_BY_TWO.replace("parallel: 2", "leave_one_out: [engrm]"))
    with pytest.raises(ConfigError, match="grid.leave_one_out.*unknown component `engrm`"):
        grid.resolved(path, tiny_overrides(corpus, tmp_path / "runs"))


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
    assert main([str(path), *over]) == 0
    assert all(r.get("skipped") for r in results(grid_dir))
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
    assert any(line.startswith("look 1/3 at 4 seeds: decided big (hurts)") for line in lines), lines
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
