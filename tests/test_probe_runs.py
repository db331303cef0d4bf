"""Probe tasks through the toolkit: a run trains and ends with its accuracy, evaluate scores it
(with the KV cache), a grid crosses variants with settings, and compare tests accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from escarda_lab import compare, config, data, grid, summary
from escarda_lab.errors import DataError
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides


def probe_overrides(corpus, out, task="mqar", **extra) -> list[str]:
    o = {
        "data.corpus": f"probe:{task}",
        "data.probe.num_train_examples": 64,
        "data.probe.num_test_examples": 24,
        "data.batch_size": 8,
        **({"data.probe.vocab_size": 32, "data.probe.num_kv_pairs": 4} if task == "mqar" else {}),
        **extra,
    }
    return tiny_overrides(corpus, out) + [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def probe_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    over = probe_overrides(corpus, out, "mqar", name="p")
    assert main([str(ROOT / "experiments/escarda.yaml"), *over]) == 0
    return out / "p" / "seed0", over


def test_a_probe_run_ends_with_its_test_accuracy(probe_run):
    folder, _ = probe_run
    m = json.loads((folder / "metrics.json").read_text())
    assert m["status"] == "finished" and 0.0 <= m["val_acc"] <= 1.0
    assert m["val_tokens"] == 24 * 4  # 24 test examples x 4 queries: only scored positions count


def test_evaluate_probe_agrees_with_the_run_and_the_kv_cache(probe_run):
    from escarda_lab.evaluate import probe
    from escarda_lab.run_folder import load_run

    folder, _ = probe_run
    model, _, cfg = load_run(folder)
    res = probe(model, cfg, "mqar", str(folder), cache_examples=8)
    m = json.loads((folder / "metrics.json").read_text())
    assert res["acc"] == pytest.approx(m["val_acc"]) and res["loss"] == pytest.approx(m["val_loss"], rel=1e-5)
    assert res["cache"]["agreement"] == 1.0 and res["cache"]["acc"] == res["cache"]["acc_full_pass"]


def test_evaluate_cli_writes_the_probe_scores(probe_run, capsys):
    from escarda_lab.evaluate import main as evaluate_main

    folder, _ = probe_run
    assert evaluate_main([str(folder), "--no-split", "--probe", "mqar", "--out", str(folder / "probe.json")]) == 0
    assert "probe mqar: acc" in capsys.readouterr().out
    assert json.loads((folder / "probe.json").read_text())["probes"]["mqar"]["examples"] == 24


def test_evaluating_another_task_than_the_model_knows_is_a_clear_error(probe_run):
    from escarda_lab.errors import UserError
    from escarda_lab.evaluate import probe
    from escarda_lab.run_folder import load_run

    folder, _ = probe_run
    model, _, cfg = load_run(folder)
    with pytest.raises(UserError) as e:
        probe(model, cfg, "memorization", str(folder))
    assert "vocabulary" in e.value.problem and "experiments/probes/memorization.yaml" in e.value.fix


def test_unknown_task_names_the_key_and_the_tasks(corpus, tmp_path):
    cfg = config.load(
        ROOT / "experiments/vanilla.yaml", probe_overrides(corpus, tmp_path, "mqar") + ["data.corpus=probe:mqr"]
    )
    with pytest.raises(DataError) as e:
        data.prepare(cfg.data, "x.yaml")
    assert e.value.key == "data.corpus" and "in_context_recall" in e.value.fix


def test_impossible_task_shape_names_the_probe_key(corpus, tmp_path):
    cfg = config.load(
        ROOT / "experiments/vanilla.yaml", probe_overrides(corpus, tmp_path, "mqar") + ["data.probe.num_kv_pairs=30"]
    )
    with pytest.raises(DataError) as e:
        data.prepare(cfg.data, "x.yaml")
    assert e.value.key == "data.probe.num_kv_pairs" and "x.yaml" in str(e.value)


def test_training_batches_resume_at_the_step(corpus, tmp_path):
    cfg = config.load(ROOT / "experiments/vanilla.yaml", probe_overrides(corpus, tmp_path, "induction"))
    tokens = data.prepare(cfg.data, "t", 0)
    a = data.ProbeBatches(tokens.probe, 8, 0, 0, 1)
    b = data.ProbeBatches(tokens.probe, 8, 0, 0, 1)
    assert all(torch_equal(a[k], b[k]) for k in (0, 5, 11))
    assert not torch_equal(a[0], a[1])


def torch_equal(x: dict, y: dict) -> bool:
    return all(bool((x[k] == y[k]).all()) for k in x)


# ------------------------------------------------------------------------------------ grids


SUITE = """
extends: {root}/experiments/escarda.yaml
name: s
grid:
  seeds: [0]
  leave_one_out: [engram]
  tune: {{key: train.lr, values: [1.0e-3, 3.0e-3], at: easy, max_steps: 3, seeds: 1, readings: tuned, extend: false}}
  parallel: 2
  settings:
    easy: {{data: {{probe: {{num_kv_pairs: 2}}}}}}
    hard: {{data: {{probe: {{num_kv_pairs: 4}}}}}}
"""


def suite(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(root=ROOT))
    return path


def test_settings_cross_every_variant_and_tune_once_per_variant(corpus, tmp_path):
    over = probe_overrides(corpus, tmp_path / "runs", "mqar")
    g, runs, _, *_ = grid.resolved(suite(tmp_path), over)
    names = [r.variant.name for r in runs]
    assert names == ["full-easy", "no_engram-easy", "full-hard", "no_engram-hard"]
    by = {r.variant.name: r for r in runs}
    assert by["no_engram-hard"].variant.baseline == "full-hard"
    assert (
        by["no_engram-hard"].cfg.data.probe.num_kv_pairs == 4 and not by["no_engram-hard"].cfg.components.engram.enabled
    )
    assert by["no_engram-hard"].variant.tune_as == "no_engram-easy"
    _, tune_runs, _, *_ = grid.resolved(suite(tmp_path), over, tuning=True)
    assert {(r.variant.name, r.cfg.train.lr) for r in tune_runs} == {
        (v, lr) for v in ["full-easy", "no_engram-easy"] for lr in [1e-3, 3e-3]
    }


def test_tune_at_must_name_a_setting(corpus, tmp_path):
    from escarda_lab.errors import ConfigError

    path = suite(tmp_path)
    with pytest.raises(ConfigError) as e:
        grid.resolved(path, probe_overrides(corpus, tmp_path / "runs", "mqar") + ["grid.tune.at=medium"])
    assert e.value.key == "grid.tune.at" and "easy" in e.value.fix


def test_a_probe_suite_trains_and_compare_tests_accuracy(corpus, tmp_path):
    over = probe_overrides(corpus, tmp_path / "runs", "mqar")
    assert main([str(suite(tmp_path)), *over]) == 0
    grid_dir = tmp_path / "runs" / "s"
    plan = json.loads((grid_dir / "grid.json").read_text())
    assert plan["metric"] == "val_acc" and list(plan["settings"]) == ["easy", "hard"]
    assert plan["tuned"]["no_engram-easy"]["value"] in (1e-3, 3e-3)
    paths = compare.write(grid_dir)
    md = paths["md"].read_text()
    assert "val acc" in md and "Δ acc (paired)" in md
    assert paths["difficulty"].stat().st_size > 5_000
    assert "no_engram" in paths["by_component"].read_text() and "Steps to solve" in paths["by_component"].read_text()

    import nbformat
    import papermill

    out = tmp_path / "probes.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks/probe_analysis.ipynb"),
        str(out),
        parameters={"suite_dir": str(grid_dir)},
        cwd=str(ROOT),
        progress_bar=False,
        kernel_name="python3",
    )
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 2


# ------------------------------------------------------------------------------ statistics


def fake_runs(acc_full: list[float], acc_no: list[float]) -> pd.DataFrame:
    rows = []
    for seed, (a, b) in enumerate(zip(acc_full, acc_no)):
        for variant, acc in (("full", a), ("no_x", b)):
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "baseline": "full",
                    "change": "",
                    "kind": "base" if variant == "full" else "removed",
                    "status": "finished",
                    "val_loss": 1.0,
                    "val_bpb": 1.0,
                    "val_acc": acc,
                    "params_total": 1,
                    "params_active": 1,
                    "flops_per_token": 1.0,
                    "tokens_per_s": 1.0,
                    "mfu": 0.1,
                    "dead": "",
                    "error": "",
                    "grad_spikes": 0,
                    "tuned": math.nan,
                }
            )
    return pd.DataFrame(rows)


def test_lower_accuracy_without_a_component_means_it_helps():
    rng = np.random.default_rng(0)
    full = list(0.8 + 0.01 * rng.standard_normal(8))
    no = [a - 0.2 + 0.01 * rng.standard_normal() for a in full]
    s = summary.summarize(fake_runs(full, no), metric="val_acc").set_index("variant")
    assert s.loc["no_x", "delta"] == pytest.approx(np.mean(np.subtract(no, full)))
    assert s.loc["no_x", "verdict"] == "helps"
    s = summary.summarize(fake_runs(no, full), metric="val_acc").set_index("variant")
    assert s.loc["no_x", "verdict"] == "hurts"


@pytest.mark.slow
def test_mla_with_a_full_rank_output_forms_the_induction_circuit_its_released_output_does_not(tmp_path):
    """docs/results/probes/mla: Escarda's factorised output projection (W_ob W_oa, nothing between)
    is what keeps a 2-layer, d_model-64 model from learning induction. Same seed and batches, 800
    steps: low-rank queries with a full-rank output (o_lora_rank: 0, orthogonal factors) solve it;
    the released output (rank 16) stays near chance (1/64)."""
    common = [
        "model.n_layers=2",
        "train.max_steps=800",
        "train.val_every=800",
        "train.checkpoint_every=800",
        "train.log_every=100",
        "components.mla.enabled=true",
        "components.mla.q_lora_rank=16",
        f"output.dir={tmp_path}",
    ]
    grid_off = ["grid.axes={model.n_layers: [2]}", "grid.seeds=[0]", "grid.parallel=1"]
    fixed = ["name=fixed", "components.mla.o_lora_rank=0", "components.mla.factor_init=orthogonal"]
    released = ["name=released", "components.mla.o_lora_rank=16"]
    acc = {}
    for name, extra in (("fixed", fixed), ("released", released)):
        assert main([str(ROOT / "experiments/probes/induction_depth.yaml"), *common, *grid_off, *extra]) == 0
        (folder,) = (tmp_path / name).glob("*/seed0")
        acc[name] = json.loads((folder / "metrics.json").read_text())["val_acc"]
    assert acc["fixed"] > 0.9 and acc["released"] < 0.3, acc
