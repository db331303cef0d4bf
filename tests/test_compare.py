"""compare: statistics checked against hand-computed numbers; outputs; the notebook runs headless."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sp

from escarda_lab import compare, noise, plots, report, stats, summary
from escarda_lab.errors import DataError
from escarda_lab.io import read_json, write_json
from tests.conftest import ROOT

BASE = [1.0, 1.1, 1.2]  # mean 1.1, sample std 0.1


def synthetic_grid(folder, variants: dict[str, tuple[str, list[float]]], seeds=(0, 1, 2), status="failed"):
    """variants: name -> (kind, val_bpb per seed; NaN = the run `status`). Baseline is `full`."""
    plan = [{"name": n, "change": n, "kind": k, "baseline": "full"} for n, (k, _) in variants.items()]
    write_json(folder / "grid.json", {"source": "g.yaml", "baseline": "full", "seeds": list(seeds), "variants": plan})
    for name, (_, bpbs) in variants.items():
        for seed, bpb in zip(seeds, bpbs):
            m = (
                {"status": status, "error": "boom"}
                if math.isnan(bpb)
                else {
                    "status": "finished",
                    "val_bpb": bpb,
                    "val_loss": bpb * 0.6,
                    "tokens_per_s": 1000.0,
                    "params": {"total": 100, "active": 100},
                    "flops_per_token": 6e5,
                    "dead_components": {},
                }
            )
            write_json(folder / name / f"seed{seed}" / "metrics.json", m)


def t4_two_sided_p(t: float) -> float:
    """Student t with 4 degrees of freedom in closed form: p = 1 - 3s/2 + s^3/2, s = |t|/sqrt(t^2+4)."""
    s = abs(t) / math.sqrt(t * t + 4)
    return 1 - 1.5 * s + 0.5 * s**3


SEEDS6 = (0, 1, 2, 3, 4, 5)
BASE6 = [1.00, 1.10, 1.05, 0.95, 1.20, 1.02]
D_ENGRAM = [0.05, 0.07, 0.04, 0.06, 0.08, 0.05]  # every seed worse without engram
D_SMALL = [0.001, -0.002, 0.000, 0.002, -0.001, 0.001]  # well inside ±0.01


@pytest.fixture
def table(tmp_path):
    synthetic_grid(
        tmp_path,
        {
            "full": ("base", BASE6),
            "no_engram": ("removed", [b + d for b, d in zip(BASE6, D_ENGRAM)]),  # engram helps
            "with_xsa": ("added", [b + d for b, d in zip(BASE6, D_ENGRAM)]),  # xsa hurts
            "no_mtp": ("removed", [b - d for b, d in zip(BASE6, D_ENGRAM)]),  # mtp hurts
            "same": ("changed", [b + d for b, d in zip(BASE6, D_SMALL)]),
            "noisy": ("changed", [b + d for b, d in zip(BASE6, [0.1, -0.08, 0.05, -0.02, 0.09, -0.11])]),
            "lonely": ("changed", [0.5] + [math.nan] * 5),  # one finished seed
        },
        seeds=SEEDS6,
    )
    return summary.summarize(summary.load_runs(tmp_path)).set_index("variant")


def test_mean_and_sample_std_over_seeds(table):
    assert table.loc["full", "val_bpb_mean"] == pytest.approx(np.mean(BASE6))
    assert table.loc["full", "val_bpb_std"] == pytest.approx(np.std(BASE6, ddof=1))
    assert table.loc["no_engram", "delta_bpb"] == pytest.approx(np.mean(D_ENGRAM))


def test_paired_interval_and_p_match_scipy(table):
    d = np.array(D_ENGRAM)
    se = d.std(ddof=1) / math.sqrt(6)
    t = sp.t.ppf(0.975, 5)
    assert table.loc["no_engram", "ci_low"] == pytest.approx(d.mean() - t * se, abs=1e-9)
    assert table.loc["no_engram", "ci_high"] == pytest.approx(d.mean() + t * se, abs=1e-9)
    assert table.loc["no_engram", "p_paired"] == pytest.approx(
        sp.ttest_rel([b + x for b, x in zip(BASE6, d)], BASE6).pvalue, rel=1e-6
    )
    assert table.loc["no_engram", "p_wilcoxon"] == pytest.approx(sp.wilcoxon(d).pvalue)
    assert table.loc["no_engram", ["boot_low", "boot_high"]].isna().all()  # no bootstrap below 10 pairs


def test_the_bootstrap_column_is_bca_and_only_from_ten_pairs():
    d = np.array([0.05, 0.07, 0.04, 0.06, 0.08, 0.05, 0.03, 0.09, 0.02, 0.06, 0.04])
    st = stats.paired(d)
    ref = sp.bootstrap((d,), np.mean, n_resamples=10_000, method="BCa", rng=np.random.default_rng(0))
    assert (st["boot_low"], st["boot_high"]) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high)
    )
    assert math.isnan(stats.paired(d[:9])["boot_low"])


def test_holm_adjusts_across_the_grids_variants(table):
    tested = table.drop("full")
    p = tested.p_paired.dropna().sort_values()
    m = len(p)
    expected = np.maximum.accumulate([min(1, (m - k) * x) for k, x in enumerate(p)])
    assert tested.loc[p.index, "p_holm"].tolist() == pytest.approx(list(expected))
    assert stats.holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)


def test_tost_matches_two_one_sided_tests(table):
    d, margin = np.array(D_SMALL), 0.01
    lower = sp.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = sp.ttest_1samp(d, margin, alternative="less").pvalue
    assert table.loc["same", "p_tost"] == pytest.approx(max(lower, upper), rel=1e-6)


def nct_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test, by hand from scipy's noncentral t."""
    crit, nc = sp.t.ppf(1 - alpha / 2, n - 1), effect * math.sqrt(n) / sd
    return sp.nct.sf(crit, n - 1, nc) + sp.nct.cdf(-crit, n - 1, nc)


@pytest.mark.parametrize("alpha", [0.05, 0.05 / 9])
def test_mde_is_the_effect_found_with_80_percent_power_at_the_alpha_it_faces(alpha):
    sd, n = 0.053, 8
    effect = stats.mde(sd, n, alpha)
    assert nct_power(effect, sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert stats.mde(sd, n, 0.05 / 9) > stats.mde(sd, n, 0.05)  # Holm's first step needs a larger effect


def test_seeds_needed_is_the_fewest_pairs_with_80_percent_power():
    sd, effect, alpha = 0.053, 0.04, 0.05 / 9
    n = stats.seeds_needed(sd, effect, alpha)
    assert nct_power(effect, sd, n, alpha) >= 0.8 > nct_power(effect, sd, n - 1, alpha)


def test_seeds_needed_for_equivalence_use_the_tost_power():
    sd, margin, alpha = 0.05, 0.03, 0.05
    n = stats.seeds_needed_tost(sd, margin, alpha)

    def tost_power(n):  # both one-sided tests reject, true difference 0: by hand
        crit, se = sp.t.ppf(1 - alpha, n - 1), sd / math.sqrt(n)
        return 1 - sp.nct.cdf(crit, n - 1, margin / se) - sp.nct.sf(-crit, n - 1, -margin / se)

    assert tost_power(n) >= 0.8 > tost_power(n - 1)
    rng = np.random.default_rng(0)  # and a simulation agrees with the formula
    hits = [stats.paired(rng.normal(0, sd, n), alpha, margin, only=("tost",))["p_tost"] < alpha for _ in range(1500)]
    assert np.mean(hits) == pytest.approx(tost_power(n), abs=0.04)


def test_equivalence_is_holm_adjusted_across_the_family(tmp_path):
    """Five variants each within ±margin on six seeds: TOST p-values are Holm-adjusted (by hand)."""
    offsets = [0.0, 0.001, 0.002, 0.003, 0.004]
    noise = [0.004, -0.003, 0.001, -0.002, 0.003, -0.003]
    synthetic_grid(
        tmp_path,
        {"full": ("base", BASE6)}
        | {f"v{i}": ("changed", [b + o + e for b, e in zip(BASE6, noise)]) for i, o in enumerate(offsets)},
        seeds=SEEDS6,
    )
    s = summary.summarize(summary.load_runs(tmp_path), margin=0.006).set_index("variant").drop("full")
    raw = []
    for o in offsets:
        d = np.array(noise) + o
        lower = sp.ttest_1samp(d, -0.006, alternative="greater").pvalue
        upper = sp.ttest_1samp(d, 0.006, alternative="less").pvalue
        raw.append(max(lower, upper))
    order = np.argsort(raw)
    holm = np.maximum.accumulate([min(1, (5 - k) * raw[i]) for k, i in enumerate(order)])
    expected = np.empty(5)
    expected[order] = holm
    assert s.p_tost.tolist() == pytest.approx(raw, rel=1e-6)
    assert s.p_tost_holm.tolist() == pytest.approx(list(expected), rel=1e-6)
    for v, p_adj in zip(s.index, expected):
        assert s.loc[v, "verdict"] == ("equivalent (±0.006)" if p_adj < 0.05 else "inconclusive")
    assert any(p < 0.05 <= a for p, a in zip(raw, expected))  # at least one verdict that Holm withholds


def test_verdicts_read_in_the_direction_of_the_change(table):
    assert table.loc["full", "verdict"] == "baseline"
    assert table.loc["no_engram", "verdict"] == "helps"
    assert table.loc["with_xsa", "verdict"] == "hurts"
    assert table.loc["no_mtp", "verdict"] == "hurts"
    assert table.loc["same", "verdict"] == "equivalent (±0.01)"
    assert table.loc["noisy", "verdict"] == "inconclusive"


def test_one_seed_says_no_test_instead_of_a_verdict(table):
    assert table.loc["lonely", "verdict"] == "no test (1 finished pair)"
    assert math.isnan(table.loc["lonely", "p_paired"])
    assert table.loc["lonely", "seeds"] == 1 and table.loc["lonely", "failed"] == 5


def test_all_diverged_variant_is_counted_and_gets_no_verdict(tmp_path):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [math.nan] * 3)}, status="diverged")
    s = summary.summarize(summary.load_runs(tmp_path)).set_index("variant")
    assert s.loc["no_engram", "verdict"] == "no test (0 finished pairs)"
    assert s.loc["no_engram", "diverged"] == 3


def test_a_verdict_on_fewer_seeds_than_planned_says_so(tmp_path):
    synthetic_grid(
        tmp_path,
        {"full": ("base", BASE6), "no_engram": ("removed", [b + d for b, d in zip(BASE6[:5], D_ENGRAM)] + [math.nan])},
        seeds=SEEDS6,
    )
    s = summary.summarize(summary.load_runs(tmp_path)).set_index("variant")
    assert s.loc["no_engram", "verdict"] == "helps [5/6 seeds]"


def test_calibration_counts_false_positives_and_the_smallest_harm_detected(tmp_path):
    noisy = [0.1, -0.08, 0.05, -0.02, 0.09, -0.11]
    synthetic_grid(
        tmp_path,
        {
            "full": ("base", BASE6),
            "no_engram": ("removed", [b + d for b, d in zip(BASE6, noisy)]),
            "control_null": ("control", [b + d for b, d in zip(BASE6, noisy)]),
            "control_null2": ("control", [b + 0.05 + d for b, d in zip(BASE6, D_SMALL)]),  # a false positive
            "control_budget0.5": ("control", [b + 0.3 + d for b, d in zip(BASE6, D_SMALL)]),
            "control_budget0.9": ("control", [b + d for b, d in zip(BASE6, noisy)]),
        },
        seeds=SEEDS6,
    )
    s = summary.summarize(summary.load_runs(tmp_path))
    text = summary.calibration(s)
    assert "**1 of 2** read helps/hurts" in text
    assert "0.5× tokens Δ +0.3002 bpb" in text and "(0.5× tokens)" in text and "0.9× tokens" in text
    assert s.set_index("variant").loc["control_null", "p_holm"] == pytest.approx(
        min(1, s.set_index("variant").loc["control_null", "p_paired"])  # family of one: no_engram
    )
    synthetic_grid(
        tmp_path,
        {"full": ("base", BASE6), "control_budget0.9": ("control", [b + d for b, d in zip(BASE6, noisy)])},
        seeds=SEEDS6,
    )
    assert "UNDERPOWERED" in summary.calibration(summary.summarize(summary.load_runs(tmp_path)))


def test_spiky_runs_are_counted(tmp_path):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    m = read_json(tmp_path / "no_engram" / "seed1" / "metrics.json")
    write_json(tmp_path / "no_engram" / "seed1" / "metrics.json", {**m, "instability": {"grad_spikes": 3}})
    s = summary.summarize(summary.load_runs(tmp_path)).set_index("variant")
    assert s.loc["no_engram", "spiky"] == 1 and s.loc["full", "spiky"] == 0


def test_write_produces_markdown_csv_and_png(tmp_path):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    paths = compare.write(tmp_path)
    md = paths["md"].read_text()
    assert "| `no_engram` |" in md and "1.4000 ± 0.1000" in md and "Minimum detectable effect" in md
    assert "**Family:** the 1 variant comparisons" in md and "Holm TOST p" in md
    assert "**Calibration:** none measured here" in md and "**Readings:** one, *same recipe*" in md  # said, not omitted
    assert paths["csv"].read_text().startswith("variant,") and paths["png"].stat().st_size > 10_000
    assert paths["forest"].stat().st_size > 10_000 and "(forest.png)" in md  # the verdict figure, in summary.md


def test_a_folder_without_a_grid_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a grid"):
        summary.load_runs(tmp_path)


def test_cli_prints_the_table(tmp_path, capsys):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    assert compare.main([str(tmp_path)]) == 0
    assert "no_engram" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_notebook_runs_headless_on_a_real_grid_and_draws_its_figures(corpus, tmp_path):
    import nbformat
    import papermill

    from escarda_lab.run import main
    from tests.conftest import tiny_overrides
    from tests.test_grid import TWO_BY_TWO, write

    path = write(tmp_path, TWO_BY_TWO)
    assert main([str(path), *tiny_overrides(corpus, tmp_path / "runs")]) == 0
    out = tmp_path / "analysis.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks/ablation_analysis.ipynb"),
        str(out),
        parameters={"grid_dir": str(tmp_path / "runs" / "g")},
        cwd=str(ROOT),
        progress_bar=False,
        kernel_name="python3",
    )
    nb = nbformat.read(out, as_version=4)
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 4  # curves, per-seed deltas, cost vs benefit, component stats
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


def test_every_figure_gives_a_variant_the_same_colour_and_one_legend_lists_them_all():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("full", 0, "components/a", s, 1.0 + s) for s in range(3)]
    rows += [("no_x", 0, "components/b", s, 2.0 + s) for s in range(3)]  # no_x lacks stat a
    rows += [("full", 0, "components/b", s, 3.0 + s) for s in range(3)]
    rows += [("no_x", 0, f"components/s{i}", s, 1.0) for i in range(30) for s in range(2)]  # > 24 stats
    import pandas as pd

    stats = pd.DataFrame(rows, columns=["variant", "seed", "tag", "step", "value"])
    colours = plots.variant_colours(["full", "no_x"])
    fig = plots.plot_stats(stats, colours)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 32  # every statistic, not the first 24
    seen = {}
    for ax in panels:
        for line in ax.lines:
            seen.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert {k: len(v) for k, v in seen.items()} == {"full": 1, "no_x": 1}
    assert seen["full"] != seen["no_x"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["full", "no_x"]
    plt.close(fig)


def test_a_significant_difference_inside_the_margin_reads_equivalent():
    st = {
        "n_pairs": 8,
        "p_holm": 1e-6,
        "ci_low": -0.003,
        "ci_high": -0.001,
        "delta": -0.002,
        "p_tost_holm": 1e-5,
        "sd_diff": 0.001,
    }
    assert stats.verdict("removed", st, 0.05, 0.02) == "equivalent (±0.02)"
    st.update(ci_low=-0.05, ci_high=-0.03, delta=-0.04, p_tost_holm=0.9)
    assert stats.verdict("removed", st, 0.05, 0.02, higher_is_better=True) == "helps"


def test_plan_prints_the_seeds_a_grid_needs_before_it_runs(capsys):
    assert compare.main(["--plan", "--sd", "0.053", "--family", "9", "--target", "0.04"]) == 0
    out = capsys.readouterr().out
    first, last = stats.seeds_needed(0.053, 0.04, 0.05 / 9), stats.seeds_needed(0.053, 0.04, 0.05)
    assert f"{first} pairs at the first step, {last} at the last" in out
    assert f"**{stats.mde(0.053, 8, 0.05 / 9):.4f} bpb** for the first Holm step" in out
    assert compare.main(["--plan"]) == 2  # no noise given: one paragraph, exit 2


def test_compare_never_imports_torch(tmp_path):
    """`compare --help` and compare on a finished grid run without torch (numpy, scipy, pandas)."""
    import subprocess
    import sys

    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    code = (
        "import sys; from escarda_lab import compare; assert compare.main([sys.argv[1]]) == 0; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "escarda_lab.compare", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "torch" not in out.stderr


def test_a_ladders_smaller_budgets_of_the_baseline_are_positive_controls(tmp_path):
    synthetic_grid(
        tmp_path,
        {
            "full": ("base", BASE6),
            "full-x0.5": ("rung", [b + 0.3 + d for b, d in zip(BASE6, D_SMALL)]),
            "full-x2": ("rung", [b - 0.3 + d for b, d in zip(BASE6, D_SMALL)]),  # more tokens: not a control
        },
        seeds=SEEDS6,
    )
    text = summary.calibration(summary.summarize(summary.load_runs(tmp_path)))
    assert "0.5× tokens Δ +0.3002" in text and "x2" not in text and "2× tokens" not in text


def test_a_damaged_results_line_or_metrics_file_is_skipped_by_name_and_the_rest_compared(tmp_path, caplog):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    good = json.dumps({"variant": "full", "seed": 0, "status": "finished", "val_bpb": 1.0})
    (tmp_path / "results.jsonl").write_bytes(f'{good}\n{{"variant": "full", "se\n'.encode() + b"\xff\xfe\x00\n[1, 2]\n")
    (tmp_path / "no_engram" / "seed2" / "metrics.json").write_text("[1, 2, 3]")
    caplog.set_level("WARNING")
    paths = compare.write(tmp_path)
    assert "results.jsonl line 2 is damaged" in caplog.text and "line 3 is damaged" in caplog.text
    assert "line 4 is not an object" in caplog.text and "holds a list" in caplog.text
    s = summary.summarize(summary.load_runs(tmp_path)).set_index("variant")
    assert s.loc["no_engram", "seeds"] == 2 and "| `no_engram` |" in paths["md"].read_text()


def test_two_readings_pair_each_variant_at_the_baselines_value_and_at_its_own(tmp_path):
    """`a` tuned to another value has a twin `a@base_lr`; `b` tuned to the baseline's value serves
    both readings with one run; Holm runs within each reading's family."""
    d_own, d_same = [0.05, 0.07, 0.04, 0.06, 0.08, 0.05], [0.001, -0.002, 0.0, 0.002, -0.001, 0.001]
    synthetic_grid(
        tmp_path,
        {
            "full": ("base", BASE6),
            "a": ("changed", [b + d for b, d in zip(BASE6, d_own)]),
            "b": ("changed", [b + d for b, d in zip(BASE6, D_ENGRAM)]),
            "a@base_lr": ("changed", [b + d for b, d in zip(BASE6, d_same)]),
        },
        seeds=SEEDS6,
    )
    plan = json.loads((tmp_path / "grid.json").read_text())
    plan["variants"][3]["twin_of"] = "a"
    plan["tuned"] = {"full": {"value": 3e-3}, "a": {"value": 6e-3}, "b": {"value": 3e-3}}
    plan["variants"][3]["tune_as"] = "full"
    write_json(tmp_path / "grid.json", plan)
    table = summary.summarize(summary.load_runs(tmp_path))
    both = summary.readings(table, 0.05, 0.01).set_index("variant")
    assert list(both.index) == ["a", "b"]  # the twin is not a hypothesis of its own
    assert both.loc["a", "same"]["delta"] == pytest.approx(np.mean(d_same))
    assert both.loc["a", "own"]["delta"] == pytest.approx(np.mean(d_own))
    assert both.loc["b", "same"]["delta"] == both.loc["b", "own"]["delta"]  # one run, both readings
    p_same = [both.loc["a", "same"]["p_paired"], both.loc["b", "same"]["p_paired"]]
    assert [both.loc[v, "same"]["p_holm"] for v in "ab"] == pytest.approx(stats.holm(p_same))
    assert "## Two readings" in report.markdown(table, {**plan, "tune": {"key": "train.lr"}})


def test_the_noise_budget_separates_seed_checkpoint_and_evaluation_noise(tmp_path):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    for seed in (0, 1, 2):
        path = tmp_path / "no_engram" / f"seed{seed}" / "metrics.json"
        m = read_json(path)
        window = [[80, m["val_bpb"] + 0.02], [90, m["val_bpb"] + 0.01], [100, m["val_bpb"]]]
        write_json(path, {**m, "val_window": window, "val_bpb_se": 0.003, "val_batch_bpb": [1.0, 2.0, 3.1, 4.0]})
        base = tmp_path / "full" / f"seed{seed}" / "metrics.json"
        write_json(base, {**read_json(base), "val_batch_bpb": [1.0, 2.0, 3.0, 4.0]})
    s = summary.summarize(summary.load_runs(tmp_path))
    budget, snr = noise.noise_budget(s)
    row = budget.set_index("variant").loc["no_engram"]
    assert row["checkpoint sd"] == pytest.approx(0.01) and row["evaluation sd"] == pytest.approx(0.003)
    assert row["seed sd"] == pytest.approx(0.1) and row["largest"] == "seed"
    assert row["paired eval SE"] == pytest.approx(np.std([0, 0, 0.1, 0], ddof=1) / 2)  # batch by batch
    assert math.isnan(budget.set_index("variant").loc["full", "checkpoint sd"])
    means = s.set_index("variant").metric_mean
    assert snr == pytest.approx(np.std(means, ddof=1) / np.median(s.metric_std))
    assert "## Noise budget" in compare.write(tmp_path)["md"].read_text()
