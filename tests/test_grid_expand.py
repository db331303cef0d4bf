"""Grids before they train: expansion into runs, variants and axes, matching parameters or FLOPs,
controls and calibration, tuning, the dry run and bad grid keys."""

from __future__ import annotations

import json

import pytest

from escarda_lab import config, grid
from escarda_lab.errors import ConfigError
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides
from tests.test_grid import TWO_BY_TWO, write


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
