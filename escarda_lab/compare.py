"""Compare the runs of a grid: `python -m escarda_lab.compare runs/<grid> [--alpha 0.05]`.

Writes summary.md, summary.csv and curves.png into the grid folder. One row per variant: params
(total / active), FLOPs per token, tokens/s, final val loss and val bpb as mean ± std over seeds
(sample std), the change in bpb against the baseline, a Welch t-test p-value and a verdict.

The verdict is about the change the variant makes. For a variant that removes a plugin (`no_X`,
`vanilla`), a significantly *higher* bpb than the baseline means the plugin helps; for one that adds
or changes something, a significantly *lower* bpb means the change helps. p >= alpha reads
"within noise"; with fewer than two finished seeds on either side there is no test.

The notebook (notebooks/ablation_analysis.ipynb) reads grids through this module only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from escarda_lab.errors import DataError, UserError
from escarda_lab.grid import eval_columns
from escarda_lab.io import atomic_write, read_json

# ---------------------------------------------------------------------------------------- loading


def load_plan(grid_dir: str | Path) -> dict:
    grid_dir = Path(grid_dir)
    plan = read_json(grid_dir / "grid.json")
    if plan is None:
        raise DataError(str(grid_dir), None, "no grid.json here: this folder is not a grid",
                        "pass the folder a grid wrote, e.g. runs/leave_one_out (run the grid YAML first)")
    return plan


def load_runs(grid_dir: str | Path) -> pd.DataFrame:
    """One row per run of the plan; metrics.json (the run's own record) wins over results.jsonl."""
    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    recorded = {}
    if (grid_dir / "results.jsonl").exists():
        for line in (grid_dir / "results.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                recorded[(r["variant"], r["seed"])] = r
    rows = []
    for v in plan["variants"]:
        for seed in plan["seeds"]:
            rec = dict(recorded.get((v["name"], seed), {}))
            m = read_json(grid_dir / v["name"] / f"seed{seed}" / "metrics.json") or {}
            rec.update({k: m[k] for k in m if k not in ("stats",)})
            rec.update(eval_columns(read_json(grid_dir / v["name"] / f"seed{seed}" / "eval.json") or {}))
            params = rec.pop("params", {}) or {}
            rows.append({
                "variant": v["name"], "seed": seed, "baseline": v["baseline"], "change": v["change"],
                "kind": v["kind"], "status": rec.get("status", "missing"),
                "val_loss": rec.get("val_loss", math.nan), "val_bpb": rec.get("val_bpb", math.nan),
                "params_total": params.get("total", math.nan), "params_active": params.get("active", math.nan),
                "flops_per_token": rec.get("flops_per_token", math.nan),
                "tokens_per_s": rec.get("tokens_per_s", math.nan), "mfu": rec.get("mfu", math.nan),
                "dead": ", ".join(sorted(rec.get("dead_components") or {})), "error": rec.get("error", ""),
                "adjust": json.dumps(v.get("adjust") or {}) if v.get("adjust") else "",
                **{k: x for k, x in rec.items() if k.startswith("eval/")},
            })
    return pd.DataFrame(rows)


def curves(grid_dir: str | Path, prefix: str = "val/bpb") -> pd.DataFrame:
    """TensorBoard scalars whose tag starts with `prefix`, as rows (variant, seed, tag, step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    rows = []
    for v in plan["variants"]:
        for seed in plan["seeds"]:
            folder = grid_dir / v["name"] / f"seed{seed}"
            for events in sorted(folder.glob("events.out.tfevents.*")):
                acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
                acc.Reload()
                for tag in acc.Tags()["scalars"]:
                    if tag.startswith(prefix):
                        rows += [(v["name"], seed, tag, e.step, e.value) for e in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["variant", "seed", "tag", "step", "value"])
    return df.drop_duplicates(["variant", "seed", "tag", "step"], keep="last")


# ------------------------------------------------------------------------------------- statistics


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value; NaN with fewer than two values on either side."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.var(a) == 0 and np.var(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def verdict(kind: str, delta: float, p: float, alpha: float) -> str:
    """`helps` / `hurts` / `within noise` for the change a variant makes (see the module doc)."""
    if math.isnan(p):
        return "no test (1 seed)"
    if p >= alpha:
        return "within noise"
    worse = delta > 0  # higher bpb than the baseline
    if kind == "removed":  # removing something made it worse: that something helps
        return "helps" if worse else "hurts"
    return "hurts" if worse else "helps"


def summarize(runs: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per variant (in plan order) with mean ± std, delta vs baseline, p and verdict."""
    out = []
    ok = runs[runs.status == "finished"]
    for name, group in runs.groupby("variant", sort=False):
        g = ok[ok.variant == name]
        base_name = group.baseline.iloc[0]
        base = ok[ok.variant == base_name]
        bpb, base_bpb = g.val_bpb.to_numpy(), base.val_bpb.to_numpy()
        row = {
            "variant": name, "change": group.change.iloc[0], "kind": group.kind.iloc[0], "baseline": base_name,
            "seeds": len(g), "failed": int((group.status != "finished").sum()),
            "params_total": _first(group.params_total), "params_active": _first(group.params_active),
            "flops_per_token": _first(group.flops_per_token), "tokens_per_s": _mean(g.tokens_per_s),
            "val_loss_mean": _mean(g.val_loss), "val_loss_std": _std(g.val_loss),
            "val_bpb_mean": _mean(g.val_bpb), "val_bpb_std": _std(g.val_bpb),
            "dead": ", ".join(sorted({d for ds in group.dead for d in ds.split(", ") if d})),
        }
        for col in [c for c in runs.columns if c.startswith("eval/")]:
            row[f"{col} mean"], row[f"{col} std"] = _mean(g[col]), _std(g[col])
        if name == base_name:
            row.update(delta_bpb=0.0, p_value=math.nan, verdict="baseline", speed_vs_baseline=1.0)
        else:
            row["delta_bpb"] = row["val_bpb_mean"] - _mean(base.val_bpb)
            row["p_value"] = welch_p(bpb, base_bpb)
            row["verdict"] = verdict(row["kind"], row["delta_bpb"], row["p_value"], alpha)
            row["speed_vs_baseline"] = row["tokens_per_s"] / _mean(base.tokens_per_s)
            if not len(g) or not len(base):
                row["verdict"] = "no finished runs"
        out.append(row)
    return pd.DataFrame(out)


def _mean(x) -> float:
    x = pd.Series(x).dropna()
    return float(x.mean()) if len(x) else math.nan


def _std(x) -> float:
    x = pd.Series(x).dropna()
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _first(x) -> float:
    x = pd.Series(x).dropna()
    return float(x.iloc[0]) if len(x) else math.nan


# ---------------------------------------------------------------------------------------- outputs


def markdown(summary: pd.DataFrame, plan: dict, alpha: float) -> str:
    def pm(m, s):
        return "—" if math.isnan(m) else (f"{m:.4f}" if math.isnan(s) else f"{m:.4f} ± {s:.4f}")

    def num(x, fmt):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    head = ["variant", "change", "seeds", "params (total / active)", "FLOPs/token", "tokens/s", "speed",
            "val loss", "val bpb", "Δ bpb", "p (Welch)", "verdict", "dead components"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.itertuples():
        seeds = f"{r.seeds}" + (f" (+{r.failed} failed)" if r.failed else "")
        lines.append("| " + " | ".join([
            f"`{r.variant}`", r.change, seeds,
            f"{num(r.params_total, ',.0f')} / {num(r.params_active, ',.0f')}",
            num(r.flops_per_token / 1e6 if not math.isnan(r.flops_per_token) else math.nan, ".2f") + "M",
            num(r.tokens_per_s, ",.0f"), num(r.speed_vs_baseline, ".2f") + "×",
            pm(r.val_loss_mean, r.val_loss_std), pm(r.val_bpb_mean, r.val_bpb_std),
            num(r.delta_bpb, "+.4f"), num(r.p_value, ".3g"), f"**{r.verdict}**", r.dead or "",
        ]) + " |")
    evals = [c[:-5] for c in summary.columns if c.startswith("eval/") and c.endswith(" mean")]
    if evals:
        lines += ["", "Evaluations (mean ± std over seeds):", "",
                  "| variant | " + " | ".join(e.removeprefix("eval/") for e in evals) + " |",
                  "|---|" + "---|" * len(evals)]
        for r in summary.to_dict("records"):
            lines.append(f"| `{r['variant']}` | " + " | ".join(pm(r[f"{e} mean"], r[f"{e} std"]) for e in evals) + " |")
    return "\n".join([
        f"# Grid `{Path(plan.get('source', '')).name}`",
        "",
        f"Baseline `{plan['baseline']}`; seeds {plan['seeds']}; params matched: {plan.get('match', 'none')}. "
        f"Mean ± sample std over finished seeds; p from a two-sided Welch t-test on val bpb; verdicts at "
        f"alpha = {alpha}. A `no_X` variant that is significantly worse than the baseline means X **helps**.",
        "",
        *lines,
        "",
    ])


def plot(runs: pd.DataFrame, summary: pd.DataFrame, curve: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    plot_curves(curve, ax1)
    plot_deltas(runs, summary, ax2)
    fig.tight_layout()
    buf = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(buf, dpi=110)
    plt.close(fig)
    buf.replace(path)


def plot_curves(curve: pd.DataFrame, ax, tag: str = "val/bpb") -> None:
    """Mean over seeds with a ± std band, one line per variant."""
    c = curve[curve.tag == tag]
    for name, g in c.groupby("variant", sort=False):
        stats = g.groupby("step").value.agg(["mean", "std"]).reset_index()
        line, = ax.plot(stats.step, stats["mean"], label=name, lw=1.4)
        ax.fill_between(stats.step, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.set_title(f"{tag}: mean ± std over seeds")
    steps = sorted(c.step.unique())
    if len(steps) >= 3:  # the first evaluation (near-uniform loss) would squash the rest
        lo, hi = c.value.min(), c[c.step == steps[1]].value.max()
        ax.set_ylim(lo - 0.02 * (hi - lo), hi)
    if len(c):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_deltas(runs: pd.DataFrame, summary: pd.DataFrame, ax) -> None:
    """Final val bpb minus the baseline's mean: one dot per seed, a bar for the mean."""
    ok = runs[runs.status == "finished"]
    base_mean = {r.variant: r.val_bpb_mean for r in summary.itertuples()}
    for i, r in enumerate(summary.itertuples()):
        vals = ok[ok.variant == r.variant].val_bpb - base_mean.get(r.baseline, math.nan)
        ax.scatter(vals, [i] * len(vals), s=18, color="0.4", zorder=3)
        ax.plot([r.delta_bpb] * 2, [i - 0.3, i + 0.3], color="C3", lw=2.5)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(summary)))
    ax.set_yticklabels([f"{r.variant} ({r.verdict})" for r in summary.itertuples()], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final val bpb − baseline mean (right = worse)")
    ax.set_title("per-seed final val bpb vs the baseline")
    ax.grid(alpha=0.3, axis="x")


def plot_cost_benefit(summary: pd.DataFrame, ax_speed, ax_params) -> None:
    """Δ bpb (with the seed std as an error bar) against relative speed and against Δ params."""
    s = summary[summary.verdict != "baseline"]
    base_params = {r.variant: r.params_total for r in summary.itertuples()}
    d_params = [r.params_total - base_params.get(r.baseline, math.nan) for r in s.itertuples()]
    for ax, x, label in [(ax_speed, s.speed_vs_baseline, "tokens/s relative to the baseline"),
                         (ax_params, d_params, "Δ params vs the baseline")]:
        ax.errorbar(x, s.delta_bpb, yerr=s.val_bpb_std.fillna(0), fmt="o", capsize=3)
        for xi, yi, name in zip(x, s.delta_bpb, s.variant):
            ax.annotate(name, (xi, yi), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("Δ val bpb (up = worse)")
        ax.grid(alpha=0.3)
    ax_speed.axvline(1, color="k", lw=0.8)
    ax_speed.set_title("cost vs benefit: speed")
    ax_params.set_title("cost vs benefit: parameters")


def plot_stat(stats: pd.DataFrame, tag: str, ax) -> None:
    """One component statistic over training: mean over seeds per variant."""
    c = stats[stats.tag == tag]
    for name, g in c.groupby("variant", sort=False):
        m = g.groupby("step").value.mean()
        ax.plot(m.index, m.values, label=name, lw=1.2)
    ax.set_title(tag.removeprefix("components/"), fontsize=9)
    ax.grid(alpha=0.3)


def write(grid_dir: str | Path, alpha: float = 0.05) -> dict[str, Path]:
    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    runs = load_runs(grid_dir)
    summary = summarize(runs, alpha)
    paths = {"md": grid_dir / "summary.md", "csv": grid_dir / "summary.csv", "png": grid_dir / "curves.png"}
    atomic_write(paths["md"], markdown(summary, plan, alpha))
    atomic_write(paths["csv"], summary.to_csv(index=False))
    plot(runs, summary, curves(grid_dir), paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m escarda_lab.compare", description=__doc__.splitlines()[0])
    p.add_argument("grid_dir", help="a grid's folder, e.g. runs/leave_one_out")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdicts")
    args = p.parse_args(argv)
    try:
        paths = write(args.grid_dir, args.alpha)
    except UserError as e:
        print(f"escarda_lab: error in {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(x) for x in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
