"""compare: statistics checked against hand-computed numbers; outputs; the notebook runs headless."""

from __future__ import annotations

import math

import pytest

from escarda_lab import compare
from escarda_lab.errors import DataError
from escarda_lab.io import write_json
from tests.conftest import ROOT

BASE = [1.0, 1.1, 1.2]  # mean 1.1, sample std 0.1


def synthetic_grid(folder, variants: dict[str, tuple[str, list[float]]], seeds=(0, 1, 2)):
    """variants: name -> (kind, val_bpb per seed; NaN = the run failed). Baseline is `full`."""
    plan = [{"name": n, "change": n, "kind": k, "baseline": "full"} for n, (k, _) in variants.items()]
    write_json(folder / "grid.json", {"source": "g.yaml", "baseline": "full", "seeds": list(seeds), "variants": plan})
    for name, (_, bpbs) in variants.items():
        for seed, bpb in zip(seeds, bpbs):
            m = {"status": "failed", "error": "boom"} if math.isnan(bpb) else {
                "status": "finished", "val_bpb": bpb, "val_loss": bpb * 0.6, "tokens_per_s": 1000.0,
                "params": {"total": 100, "active": 100}, "flops_per_token": 6e5, "dead_components": {}}
            write_json(folder / name / f"seed{seed}" / "metrics.json", m)


def t4_two_sided_p(t: float) -> float:
    """Student t with 4 degrees of freedom in closed form: p = 1 - 3s/2 + s^3/2, s = |t|/sqrt(t^2+4)."""
    s = abs(t) / math.sqrt(t * t + 4)
    return 1 - 1.5 * s + 0.5 * s**3


@pytest.fixture
def summary(tmp_path):
    synthetic_grid(tmp_path, {
        "full": ("base", BASE),
        "no_engram": ("removed", [1.3, 1.4, 1.5]),  # worse without it: engram helps
        "with_xsa": ("added", [1.3, 1.4, 1.5]),  # worse with it: xsa hurts
        "no_mtp": ("removed", [0.7, 0.8, 0.9]),  # better without it: mtp hurts
        "noisy": ("changed", [1.05, 1.2, 1.1]),
        "lonely": ("changed", [0.5, math.nan, math.nan]),  # one finished seed
    })
    return compare.summarize(compare.load_runs(tmp_path)).set_index("variant")


def test_mean_and_sample_std_over_seeds(summary):
    assert summary.loc["full", "val_bpb_mean"] == pytest.approx(1.1)
    assert summary.loc["full", "val_bpb_std"] == pytest.approx(0.1)
    assert summary.loc["no_engram", "delta_bpb"] == pytest.approx(0.3)


def test_welch_p_matches_the_hand_computed_value(summary):
    t = 0.3 / math.sqrt(0.01 / 3 + 0.01 / 3)  # equal n and variances: Welch's df is 4
    assert summary.loc["no_engram", "p_value"] == pytest.approx(t4_two_sided_p(t), rel=1e-6)
    assert summary.loc["no_engram", "p_value"] == pytest.approx(0.02131, abs=1e-4)


def test_verdicts_read_in_the_direction_of_the_change(summary):
    assert summary.loc["full", "verdict"] == "baseline"
    assert summary.loc["no_engram", "verdict"] == "helps"
    assert summary.loc["with_xsa", "verdict"] == "hurts"
    assert summary.loc["no_mtp", "verdict"] == "hurts"
    assert summary.loc["noisy", "verdict"] == "within noise"


def test_one_seed_says_so_instead_of_a_p_value(summary):
    assert summary.loc["lonely", "verdict"] == "no test (1 seed)" and math.isnan(summary.loc["lonely", "p_value"])
    assert summary.loc["lonely", "seeds"] == 1 and summary.loc["lonely", "failed"] == 2


def test_write_produces_markdown_csv_and_png(tmp_path):
    synthetic_grid(tmp_path, {"full": ("base", BASE), "no_engram": ("removed", [1.3, 1.4, 1.5])})
    paths = compare.write(tmp_path)
    md = paths["md"].read_text()
    assert "| `no_engram` |" in md and "**helps**" in md and "1.4000 ± 0.1000" in md
    assert paths["csv"].read_text().startswith("variant,") and paths["png"].stat().st_size > 10_000


def test_a_folder_without_a_grid_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a grid"):
        compare.load_runs(tmp_path)


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
    from tests.test_grid import TWO_BY_TWO, write
    from tests.conftest import tiny_overrides

    path = write(tmp_path, TWO_BY_TWO)
    assert main([str(path), *tiny_overrides(corpus, tmp_path / "runs")]) == 0
    out = tmp_path / "analysis.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks/ablation_analysis.ipynb"), str(out),
                               parameters={"grid_dir": str(tmp_path / "runs" / "g")}, cwd=str(ROOT),
                               progress_bar=False, kernel_name="python3")
    nb = nbformat.read(out, as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # curves, per-seed deltas, cost vs benefit, component stats
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
