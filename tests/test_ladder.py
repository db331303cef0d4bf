"""Compute multipliers: the fit and the multiplier recover known answers; a tiny ladder runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from escarda_lab import ladder


def power(c):
    return 1.0 + 40.0 * np.asarray(c, float) ** -0.25


def loglin(c):
    return 9.0 - 0.2 * np.log(np.asarray(c, float))


@pytest.mark.parametrize(
    ("curve", "rungs", "kind"),
    [(power, [1e9, 3e9, 1e10, 3e10, 1e11], "power"), (loglin, [1e9, 1e10, 1e11], "loglinear")],
)
@pytest.mark.parametrize("true_m", [0.6, 1.8, 3.0])
def test_a_known_multiplier_is_recovered_within_5_percent(curve, rungs, kind, true_m):
    rng = np.random.default_rng(0)
    c = np.repeat(rungs, 3)
    f = ladder.fit(c, curve(c) + rng.normal(0, 1e-4, len(c)))
    assert f.kind == kind
    c_v = 5e9  # inside the ladder: the variant at 5e9 FLOPs reaches the loss of true_m x 5e9
    m, rel = ladder.multiplier(f, float(curve(true_m * c_v)), c_v)
    assert rel == "=" and m == pytest.approx(true_m, rel=0.05)


def test_a_loss_beyond_the_ladder_is_a_bound_not_an_extrapolation():
    c = np.array([1e9, 3e9, 1e10] * 3)
    f = ladder.fit(c, loglin(c))
    m, rel = ladder.multiplier(f, float(loglin(1e12)), 1e9)  # needs 1000x: far past the top rung
    assert rel == ">" and m == pytest.approx(1e10 / 1e9)
    m, rel = ladder.multiplier(f, float(loglin(1e7)), 1e9)  # worse than the lowest rung
    assert rel == "<" and m == pytest.approx(1.0)


def test_the_interval_is_the_paired_t_interval_of_the_per_seed_log_multipliers():
    from scipy import stats

    rng = np.random.default_rng(1)
    rungs = [1e9, 1e10, 1e11]
    base = {s: [(c, float(loglin(c)) + rng.normal(0, 0.01)) for c in rungs] for s in range(3)}
    var = {s: (1e10, float(loglin(2e10)) + rng.normal(0, 0.01)) for s in range(3)}
    logs = ladder.per_seed(base, var)
    by_hand = []
    for s in range(3):  # each seed: a line through its own rungs, the variant read on it
        slope, icpt = np.polyfit(np.log(rungs), [y for _, y in base[s]], 1)
        by_hand.append((icpt - var[s][1]) / -slope - math.log(1e10))
    assert logs == pytest.approx(by_hand)
    m, lo, hi = ladder.t_interval(logs)
    half = stats.t.ppf(0.975, 2) * np.std(by_hand, ddof=1) / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx(tuple(math.exp(x) for x in (np.mean(by_hand), np.mean(by_hand) - half,
                                                                      np.mean(by_hand) + half)))  # fmt: skip


def test_the_interval_covers_the_truth_about_95_percent_of_the_time_at_three_seeds():
    rng = np.random.default_rng(4)
    rungs, hits = [1e9, 1e10, 1e11], 0
    for _ in range(300):
        base = {s: [(c, float(loglin(c)) + rng.normal(0, 0.02)) for c in rungs] for s in range(3)}
        var = {s: (1e10, float(loglin(2e10)) + rng.normal(0, 0.02)) for s in range(3)}
        _, lo, hi = ladder.t_interval(ladder.per_seed(base, var))
        hits += lo <= 2.0 <= hi
    assert 0.90 <= hits / 300 <= 0.99


def test_seeds_for_a_ten_percent_multiplier_grow_with_the_spread():
    assert ladder.seeds_for_precision([0.0, 0.05, -0.05]) < ladder.seeds_for_precision([0.0, 0.3, -0.3])
    assert ladder.seeds_for_precision([0.1]) == -1


def test_the_fit_band_covers_the_true_curve_and_narrows_with_less_noise():
    rng = np.random.default_rng(2)
    rungs, xs = [1e9, 1e10, 1e11], np.geomspace(1e9, 1e11, 7)
    widths = []
    for noise in (0.02, 0.002):
        base = {s: [(c, float(loglin(c)) + rng.normal(0, noise)) for c in rungs] for s in range(6)}
        lo, hi = ladder.fit_band(base, xs)
        assert np.all(lo <= loglin(xs) + 1e-9) and np.all(loglin(xs) <= hi + 1e-9)
        widths.append(float(np.mean(hi - lo)))
    assert widths[1] < widths[0]
    assert np.isnan(ladder.fit_band({0: [(1e9, 1.0), (1e10, 0.9)]}, xs)[0]).all()  # one seed: no band


def test_table_reads_runs_and_marks_bounds():
    rows = []
    for seed in range(3):
        for name, steps in [("full", 1.0), ("full-x0.5", 0.5), ("full-x2", 2.0)]:
            c = 1e10 * steps
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "status": "finished",
                    "val_bpb": float(loglin(c)),
                    "flops_per_token": 1e4,
                    "train_tokens": c / 1e4,
                }
            )
        rows.append(
            {
                "variant": "no_x",
                "seed": seed,
                "status": "finished",
                "val_bpb": float(loglin(1.5e10)),
                "flops_per_token": 1e4,
                "train_tokens": 1e6,
            }
        )
    plan = {
        "baseline": "full",
        "variants": [
            {"name": "full"},
            {"name": "full-x0.5", "rung_of": "full"},
            {"name": "full-x2", "rung_of": "full"},
            {"name": "no_x"},
        ],
    }
    mult, f, points = ladder.table(pd.DataFrame(rows), plan)
    (r,) = mult.itertuples()
    assert r.variant == "no_x" and r.relation == "=" and r.multiplier == pytest.approx(1.5, rel=1e-6)
    assert "Compute multipliers" in ladder.markdown(mult, f, "val_bpb")


LADDER = """
extends: {root}/experiments/vanilla.yaml
name: lad
grid:
  seeds: [0, 1]
  variants: {{xsa: {{components.xsa.enabled: true}}}}
  ladder: {{tokens: [0.5, 2]}}
  parallel: 2
"""


def test_a_tiny_ladder_grid_writes_multipliers_and_the_plot(corpus, tmp_path):
    from escarda_lab import compare, grid
    from escarda_lab.run import main
    from tests.conftest import ROOT, tiny_overrides

    path = tmp_path / "ladder.yaml"
    path.write_text(LADDER.format(root=ROOT))
    over = tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 8})
    _, runs, _, *_ = grid.resolved(path, over)
    steps = {r.variant.name: r.cfg.train.max_steps for r in runs}
    assert steps == {"full": 8, "xsa": 8, "full-x0.5": 4, "full-x2": 16}
    assert main([str(path), *over]) == 0
    paths = compare.write(tmp_path / "runs" / "lad")
    assert "Compute multipliers" in paths["md"].read_text() and paths["ladder"].stat().st_size > 5_000
    mult = pd.read_csv(tmp_path / "runs" / "lad" / "multipliers.csv")
    assert list(mult.variant) == ["xsa"] and math.isfinite(mult.multiplier[0])
    plan = json.loads((tmp_path / "runs" / "lad" / "grid.json").read_text())
    assert {v["name"]: v["rung_of"] for v in plan["variants"]}["full-x2"] == "full"
