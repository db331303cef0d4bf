"""Compare the runs of a grid: `python -m escarda_lab.compare runs/<grid> [--alpha 0.05]`.

Writes summary.md, summary.csv and curves.png (tune.png when the grid tuned a key) into the grid
folder. One row per variant, against the grid's baseline on the same seeds (a paired design: seed k
gives both the same batches and the same initial value for every weight they share):

- the per-seed difference d_k = bpb(variant, k) - bpb(baseline, k) over the seeds both finished:
  its mean, a 95% t interval and a bootstrap interval, the paired t-test p, Wilcoxon's signed-rank
  p (n >= 6), Holm-adjusted p across the grid's variants, the pair correlation, and the minimum
  detectable effect (80% power at alpha) for this noise;
- TOST against the grid's margin (default 0.01 bpb);
- Welch's unpaired p as an extra column, for designs without pairing;
- runs that diverged or had gradient-norm spikes (> 5x the post-warm-up median), never dropped.

Verdicts follow the change the variant makes: **helps** / **hurts** when the Holm p < alpha and the
interval excludes 0 (a `no_X` variant significantly worse than the baseline means X helps),
unless TOST also bounds it within ±margin; **equivalent (±margin)** when TOST says so (a
difference that is real but smaller than the margin reads equivalent); else **inconclusive**
with the seeds that would be needed; **no test** with fewer than two finished pairs.

The notebook (notebooks/ablation_analysis.ipynb) reads grids through this module only.
"""

from __future__ import annotations

from escarda_lab import commands
from escarda_lab.commands import help_if_asked

help_if_asked(__name__, "compare")

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from escarda_lab.errors import DataError, UserError
from escarda_lab.grid import eval_columns
from escarda_lab.io import atomic_path, atomic_write, read_json

# ---------------------------------------------------------------------------------------- loading


def load_plan(grid_dir: str | Path) -> dict:
    grid_dir = Path(grid_dir)
    plan = read_json(grid_dir / "grid.json")
    if plan is None:
        raise DataError(
            str(grid_dir),
            None,
            "no grid.json here: this folder is not a grid",
            "pass the folder a grid wrote, e.g. runs/leave_one_out (run the grid YAML first)",
        )
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
    tuned = plan.get("tuned") or {}
    for v in plan["variants"]:
        choice = (tuned.get(v.get("tune_as") or v["name"]) or {}).get("value")
        for seed in plan["seeds"]:
            rec = dict(recorded.get((v["name"], seed), {}))
            m = read_json(grid_dir / v["name"] / f"seed{seed}" / "metrics.json") or {}
            rec.update({k: m[k] for k in m if k not in ("stats",)})
            rec.update(eval_columns(read_json(grid_dir / v["name"] / f"seed{seed}" / "eval.json") or {}))
            rows.append(
                {
                    **run_row(rec, v["name"], seed, v["baseline"], v["change"], v["kind"]),
                    "tuned": math.nan if choice is None else choice,
                    "adjust": json.dumps(v.get("adjust") or {}) if v.get("adjust") else "",
                    **{k: x for k, x in rec.items() if k.startswith("eval/")},
                }
            )
    return pd.DataFrame(rows)


def run_row(m: dict, variant: str, seed: int, baseline: str, change: str, kind: str) -> dict:
    """The table row of one run from its metrics.json (or results.jsonl) record."""
    params = m.get("params") or {}
    return {
        "variant": variant,
        "seed": seed,
        "baseline": baseline,
        "change": change,
        "kind": kind,
        "status": m.get("status", "missing"),
        "val_loss": m.get("val_loss", math.nan),
        "val_bpb": m.get("val_bpb", math.nan),
        "val_acc": m.get("val_acc", math.nan),
        "train_tokens": m.get("train_tokens", math.nan),
        "params_total": params.get("total", math.nan),
        "params_active": params.get("active", math.nan),
        "flops_per_token": m.get("flops_per_token", math.nan),
        "tokens_per_s": m.get("tokens_per_s", math.nan),
        "mfu": m.get("mfu", math.nan),
        "dead": ", ".join(sorted(m.get("dead_components") or {})),
        "error": m.get("error", ""),
        "grad_spikes": (m.get("instability") or {}).get("grad_spikes", 0),
        "tuned": math.nan,
    }


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


POWER = 0.8


def mde(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest mean difference a two-sided paired t-test at `alpha` detects with `power`, for
    differences of standard deviation `sd` over n pairs: (t_{1-a/2} + t_{power}) sd / sqrt(n)."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def seeds_needed(sd: float, effect: float, alpha: float = 0.05, power: float = POWER, most: int = 10_000) -> int:
    """Pairs needed for `mde` to reach `effect` (at least 2)."""
    if not (math.isfinite(sd) and effect > 0):
        return -1
    n = 2
    while n < most and mde(sd, n, alpha, power) > effect:
        n = n * 2 if mde(sd, n * 2, alpha, power) > effect else n + 1
    return n


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(pvalues, float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired(d: np.ndarray, alpha: float = 0.05, margin: float = 0.01, boot: int = 10_000) -> dict:
    """Statistics of paired differences d (variant - baseline, one per seed)."""
    from scipy import stats

    d = np.asarray(d, float)
    n = len(d)
    out = {
        "n_pairs": n,
        "delta": float(d.mean()) if n else math.nan,
        "sd_diff": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "boot_low": math.nan,
        "boot_high": math.nan,
        "p_paired": math.nan,
        "p_wilcoxon": math.nan,
        "p_tost": math.nan,
        "mde": math.nan,
    }
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    mean = float(d.mean())
    tcrit = stats.t.ppf(1 - alpha / 2, n - 1)
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, n, (boot, n))].mean(axis=1)
    out.update(
        sd_diff=sd,
        ci_low=mean - tcrit * se,
        ci_high=mean + tcrit * se,
        boot_low=float(np.quantile(means, alpha / 2)),
        boot_high=float(np.quantile(means, 1 - alpha / 2)),
        mde=mde(sd, n, alpha),
    )
    if sd <= 1e-12 * max(1.0, abs(mean)):  # every seed moved by the same amount
        out.update(p_paired=1.0 if mean == 0 else 0.0, p_tost=0.0 if abs(mean) < margin else 1.0)
    else:
        out["p_paired"] = float(stats.ttest_1samp(d, 0.0).pvalue)
        lower = stats.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
        upper = stats.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
        out["p_tost"] = float(max(lower, upper))
    if n >= 6 and np.any(d != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


METRICS = {  # column -> (label, higher is better)
    "val_bpb": ("bpb", False),
    "val_loss": ("loss", False),
    "val_acc": ("acc", True),
}


def verdict(kind: str, st: dict, alpha: float, margin: float, higher_is_better: bool = False) -> str:
    """The reading of one variant's paired statistics `st` (with `p_holm`) for the change it makes."""
    n = int(st["n_pairs"])
    if n < 2:
        return f"no test ({n} finished pair{'s' if n != 1 else ''})"
    significant = st["p_holm"] < alpha and (st["ci_low"] > 0 or st["ci_high"] < 0)
    if significant and st["p_tost"] < alpha:  # a real but smaller-than-margin difference
        return f"equivalent (±{margin:g})"
    if significant:
        worse = st["delta"] < 0 if higher_is_better else st["delta"] > 0  # e.g. higher bpb than the baseline
        if kind == "removed":  # removing something made it worse: that something helps
            return "helps" if worse else "hurts"
        return "hurts" if worse else "helps"
    if st["p_tost"] < alpha:
        return f"equivalent (±{margin:g})"
    need = seeds_needed(st["sd_diff"], max(abs(st["delta"]), margin), alpha)
    return f"inconclusive (~{need} seeds)" if need > 0 else "inconclusive"


def summarize(runs: pd.DataFrame, alpha: float = 0.05, margin: float = 0.01, metric: str = "val_bpb") -> pd.DataFrame:
    """One row per variant (in plan order): mean ± std, paired statistics of `metric` (val_bpb,
    val_loss or val_acc) vs the baseline, Holm across the grid's variants, instability counts and
    the verdict. `delta` is the paired mean difference of `metric`; `delta_bpb` always that of bpb."""
    out = []
    ok = runs[runs.status == "finished"]
    for name, group in runs.groupby("variant", sort=False):
        g = ok[ok.variant == name]
        base_name = group.baseline.iloc[0]
        base = ok[ok.variant == base_name]
        row = {
            "variant": name,
            "change": group.change.iloc[0],
            "kind": group.kind.iloc[0],
            "baseline": base_name,
            "tuned": _first(group.tuned) if "tuned" in group else math.nan,
            "planned": len(group),
            "seeds": len(g),
            "failed": int((group.status != "finished").sum()),
            "diverged": int((group.status == "diverged").sum()),
            "spiky": int((group.grad_spikes > 0).sum()),
            "params_total": _first(group.params_total),
            "params_active": _first(group.params_active),
            "flops_per_token": _first(group.flops_per_token),
            "tokens_per_s": _mean(g.tokens_per_s),
            "val_loss_mean": _mean(g.val_loss),
            "val_loss_std": _std(g.val_loss),
            "val_bpb_mean": _mean(g.val_bpb),
            "val_bpb_std": _std(g.val_bpb),
            "val_acc_mean": _mean(g.val_acc),
            "val_acc_std": _std(g.val_acc),
            "metric": metric,
            "metric_mean": _mean(g[metric]),
            "metric_std": _std(g[metric]),
            "dead": ", ".join(sorted({d for ds in group.dead for d in ds.split(", ") if d})),
        }
        for col in [c for c in runs.columns if c.startswith("eval/")]:
            row[f"{col} mean"], row[f"{col} std"] = _mean(g[col]), _std(g[col])
        if name == base_name:
            row.update(
                {**paired([]), "n_pairs": math.nan, "pair_r": math.nan, "rho_hat": math.nan},
                delta_bpb=0.0,
                delta=0.0,
                p_value=math.nan,
                speed_vs_baseline=1.0,
            )
        else:
            both = (
                g.set_index("seed")[metric]
                .to_frame("v")
                .join(base.set_index("seed")[metric].to_frame("b"), how="inner")
            )
            st = paired((both.v - both.b).to_numpy(), alpha, margin)
            pooled = (np.var(both.v, ddof=1) + np.var(both.b, ddof=1)) / 2 if len(both) > 1 else math.nan
            bpb = (g.set_index("seed").val_bpb - base.set_index("seed").val_bpb).dropna()
            row.update(
                st,
                delta_bpb=float(bpb.mean()) if len(bpb) else math.nan,
                p_value=welch_p(g[metric], base[metric]),
                pair_r=float(np.corrcoef(both.v, both.b)[0, 1]) if len(both) > 2 else math.nan,
                rho_hat=1 - st["sd_diff"] ** 2 / (2 * pooled) if pooled and pooled > 0 else math.nan,
                speed_vs_baseline=row["tokens_per_s"] / _mean(base.tokens_per_s),
            )
        out.append(row)
    summary = pd.DataFrame(out)
    tested = summary.variant != summary.baseline
    summary["p_holm"] = math.nan
    summary.loc[tested, "p_holm"] = holm(summary.loc[tested, "p_paired"].tolist())
    verdicts = []
    for r in summary.to_dict("records"):
        if r["variant"] == r["baseline"]:
            verdicts.append("baseline")
            continue
        v = verdict(r["kind"], r, alpha, margin, METRICS[metric][1])
        if r["n_pairs"] >= 2 and r["n_pairs"] < r["planned"]:
            v += f" [{int(r['n_pairs'])}/{r['planned']} seeds]"
        verdicts.append(v)
    summary["verdict"] = verdicts
    return summary


def calibration(summary: pd.DataFrame) -> str | None:
    """Whether the grid's controls came out as they must; None without controls."""
    by = {r.variant.split("-")[0] if r.variant.startswith("control_") else r.variant: r for r in summary.itertuples()}
    null, pos = by.get("control_null"), by.get("control_half_budget")
    if null is None and pos is None:
        return None
    parts, ok = [], True
    if null is not None:
        bad = null.verdict.startswith(("helps", "hurts"))
        ok &= not bad
        parts.append(
            f"the null control (independent seeds) reads **{null.verdict}**"
            + (" — a false positive: treat every verdict here with suspicion" if bad else ", as it must")
        )
    if pos is not None:
        found = pos.verdict.startswith("hurts")
        ok &= found
        parts.append(
            f"the positive control (half the training tokens, Δ {pos.delta:+.4f} {METRICS[pos.metric][0]}) reads "
            f"**{pos.verdict}**"
            + (", as it must" if found else " — the grid cannot see an effect of that size: it is UNDERPOWERED")
        )
    head = "**Calibrated.**" if ok else "**NOT CALIBRATED.**"
    return f"{head} " + "; ".join(parts) + "."


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


def table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


def markdown(summary: pd.DataFrame, plan: dict, alpha: float = 0.05, margin: float = 0.01) -> str:
    def pm(m, s):
        return "—" if math.isnan(m) else (f"{m:.4f}" if math.isnan(s) else f"{m:.4f} ± {s:.4f}")

    def num(x, fmt):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    def ci(lo, hi):
        return "—" if math.isnan(lo) else f"[{lo:+.4f}, {hi:+.4f}]"

    tune = plan.get("tune") or {}
    key = tune.get("key", "")
    metric = summary.metric.iloc[0] if "metric" in summary else "val_bpb"
    unit = METRICS[metric][0]
    main = pd.DataFrame(
        {
            "variant": f"`{r.variant}`",
            "change": r.change,
            **({key: num(r.tuned, "g")} if key else {}),
            "seeds": f"{r.seeds}/{r.planned}",
            "diverged / spiky": f"{r.diverged} / {r.spiky}",
            "params (total / active)": f"{num(r.params_total, ',.0f')} / {num(r.params_active, ',.0f')}",
            "FLOPs/token": num(r.flops_per_token / 1e6, ".2f") + "M",
            "speed": num(r.speed_vs_baseline, ".2f") + "×",
            f"val {unit}": pm(r.metric_mean, r.metric_std),
            f"Δ {unit} (paired)": num(r.delta, "+.4f"),
            "95% CI": ci(r.ci_low, r.ci_high),
            "p": num(r.p_paired, ".3g"),
            "Holm p": num(r.p_holm, ".3g"),
            "MDE": num(r.mde, ".4f"),
            "verdict": f"**{r.verdict}**",
        }
        for r in summary.itertuples()
    )
    more = pd.DataFrame(
        {
            "variant": f"`{r.variant}`",
            "val loss": pm(r.val_loss_mean, r.val_loss_std),
            **({"val bpb": pm(r.val_bpb_mean, r.val_bpb_std)} if unit != "bpb" else {}),
            "bootstrap 95% CI": ci(r.boot_low, r.boot_high),
            "Wilcoxon p": num(r.p_wilcoxon, ".3g"),
            "TOST p (±margin)": num(r.p_tost, ".3g"),
            "pair r": num(getattr(r, "pair_r", math.nan), ".2f"),
            "Welch p": num(r.p_value, ".3g"),
            "tokens/s": num(r.tokens_per_s, ",.0f"),
            "dead components": r.dead or "",
        }
        for r in summary.itertuples()
    )
    lines = [
        table(main),
        "",
        "More columns: the bootstrap interval of the mean paired difference, Wilcoxon's signed-rank p "
        "(6+ pairs), TOST p for equivalence within ±margin, the correlation of the two arms over seeds "
        "(what pairing buys), Welch's unpaired p, training throughput, components flagged dead.",
        "",
        table(more),
    ]
    evals = [c[:-5] for c in summary.columns if c.startswith("eval/") and c.endswith(" mean")]
    if evals:
        scores = pd.DataFrame(
            {
                "variant": f"`{r['variant']}`",
                **{e.removeprefix("eval/"): pm(r[f"{e} mean"], r[f"{e} std"]) for e in evals},
            }
            for r in summary.to_dict("records")
        )
        lines += ["", "Evaluations (mean ± std over seeds):", "", table(scores)]
    tested = summary[summary.variant != summary.baseline]
    sd = np.sqrt(np.nanmean(tested.sd_diff**2)) if len(tested) and tested.sd_diff.notna().any() else math.nan
    n = int(np.nanmedian(tested.n_pairs)) if len(tested) and tested.n_pairs.notna().any() else 0
    power = (
        f"Pooled sd of the paired differences {sd:.4f} {unit} over {n} seeds: the minimum detectable "
        f"effect (80% power, alpha {alpha}) is **{mde(sd, n, alpha):.4f} {unit}**; effects smaller than that "
        f'read inconclusive, not "no effect".'
        if n >= 2 and math.isfinite(sd)
        else ""
    )
    matched = {
        "none": "steps and tokens (every variant trains the same batches)",
        "params": "non-embedding active parameters",
        "params_total": "total parameters",
        "params_active": "active parameters",
        "flops": "training FLOPs",
    }.get(plan.get("match", "none"), plan.get("match"))
    cal = calibration(summary)
    tuned = ""
    if key:
        tuned = (
            f"`{key}` tuned per variant over {tune.get('values')} on {tune.get('seeds', 1)} separate "
            f"tuning seed(s){' of ' + str(tune['max_steps']) + ' steps' if tune.get('max_steps') else ''}; "
            "the best final val loss is kept (tune.png) and the verdict seeds never saw the sweep."
        )
    return "\n".join(
        filter(
            lambda x: x is not None,
            [
                plan.get("title") or f"# Grid `{Path(plan.get('source', '')).name}`",
                "",
                *([cal, ""] if cal else []),
                f"Baseline `{plan['baseline']}`; seeds {plan['seeds']}, paired (seed k: same batches, same initial "
                f"value for every shared weight); matched: {matched}. Δ {unit} is the mean over seeds of "
                f"variant − baseline on the same seed; p is the paired t-test, Holm p adjusts it across the "
                f"{len(tested)} comparisons; verdicts at alpha = {alpha} with an equivalence margin of "
                f"±{margin} {unit} (TOST). A `no_X` variant significantly worse than the baseline means X **helps**"
                + (" (worse = lower accuracy at the scored positions). " if unit == "acc" else ". ")
                + "`spiky` counts runs whose gradient norm jumped above 5× the median of its previous 20 steps.",
                "",
                power,
                "",
                tuned,
                "",
                *lines,
                "",
            ],
        )
    )


def plot(runs: pd.DataFrame, summary: pd.DataFrame, curve: pd.DataFrame, path: Path, metric: str = "val_bpb") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    plot_curves(curve, ax1, metric.replace("_", "/"), variant_colours(summary.variant))
    plot_deltas(runs, summary, ax2, metric)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def variant_colours(names) -> dict[str, tuple]:
    """One colour per variant, fixed by its place in `names` (the plan's order), for every figure."""
    import matplotlib

    names = list(dict.fromkeys(names))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def plot_curves(curve: pd.DataFrame, ax, tag: str = "val/bpb", colours: dict | None = None) -> None:
    """Mean over seeds with a ± std band, one line per variant."""
    c = curve[curve.tag == tag]
    colours = colours or variant_colours(curve.variant)
    for name, g in c.groupby("variant", sort=False):
        stats = g.groupby("step").value.agg(["mean", "std"]).reset_index()
        (line,) = ax.plot(stats.step, stats["mean"], label=name, lw=1.4, color=colours.get(name))
        ax.fill_between(
            stats.step,
            stats["mean"] - stats["std"].fillna(0),
            stats["mean"] + stats["std"].fillna(0),
            color=line.get_color(),
            alpha=0.15,
        )
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


def plot_deltas(runs: pd.DataFrame, summary: pd.DataFrame, ax, metric: str = "val_bpb") -> None:
    """Paired differences to the baseline: one dot per seed (variant − baseline on that seed), the
    mean as a bar and its 95% t interval as a line."""
    ok = runs[runs.status == "finished"]
    delta = summary.delta if "delta" in summary else summary.delta_bpb
    for i, (r, dm) in enumerate(zip(summary.itertuples(), delta)):
        base = ok[ok.variant == r.baseline].set_index("seed")[metric]
        mine = ok[ok.variant == r.variant].set_index("seed")[metric]
        d = (mine - base).dropna()
        ax.scatter(d, [i] * len(d), s=18, color="0.4", zorder=3)
        if r.variant != r.baseline and not math.isnan(dm):
            ax.plot([dm] * 2, [i - 0.3, i + 0.3], color="C3", lw=2.5)
            if not math.isnan(r.ci_low):
                ax.plot([r.ci_low, r.ci_high], [i, i], color="C3", lw=1.2)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(summary)))
    ax.set_yticklabels([f"{r.variant} ({r.verdict})" for r in summary.itertuples()], fontsize=8)
    ax.invert_yaxis()
    label, higher = METRICS[metric]
    ax.set_xlabel(f"final val {label} − baseline's on the same seed (right = {'better' if higher else 'worse'})")
    ax.set_title("paired differences: seeds, mean and 95% CI")
    ax.grid(alpha=0.3, axis="x")


def plot_tune(plan: dict, ax, colours: dict | None = None) -> None:
    """Tuning score of each value, one line per variant (log x): the chosen value is ringed."""
    colours = colours or variant_colours([v["name"] for v in plan["variants"]])
    for name, t in (plan.get("tuned") or {}).items():
        pts = sorted((float(v), x) for v, x in t["scores"].items() if x is not None)
        if not pts:
            continue
        (line,) = ax.plot(
            [v for v, _ in pts], [x for _, x in pts], "o-", label=name, lw=1.2, ms=4, color=colours.get(name)
        )
        if t.get("value") is not None:
            ax.scatter(
                [float(t["value"])],
                [t["scores"][str(t["value"])]],
                s=90,
                facecolors="none",
                edgecolors=line.get_color(),
                zorder=3,
            )
        failed = [float(v) for v, x in t["scores"].items() if x is None]
        ax.scatter(failed, [max(x for _, x in pts)] * len(failed), marker="x", color=line.get_color())
    key = next(iter((plan.get("tuned") or {}).values()), {}).get("key", "value")
    ax.set_xscale("log")
    ax.set_xlabel(f"{key} (x: a tuning run failed or diverged)")
    ax.set_ylabel("final val loss (probe tasks: minus the accuracy)")
    ax.set_title(f"{key} sweep per variant (ringed: chosen)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)


def plot_cost_benefit(summary: pd.DataFrame, ax_speed, ax_params, colours: dict | None = None) -> None:
    """Δ bpb (with the seed std as an error bar) against relative speed and against Δ params."""
    colours = colours or variant_colours(summary.variant)
    s = summary[summary.verdict != "baseline"]
    base_params = {r.variant: r.params_total for r in summary.itertuples()}
    d_params = [r.params_total - base_params.get(r.baseline, math.nan) for r in s.itertuples()]
    for ax, x, label in [
        (ax_speed, s.speed_vs_baseline, "tokens/s relative to the baseline"),
        (ax_params, d_params, "Δ params vs the baseline"),
    ]:
        for xi, yi, err, name in zip(x, s.delta_bpb, s.val_bpb_std.fillna(0), s.variant):
            ax.errorbar([xi], [yi], yerr=[err], fmt="o", capsize=3, color=colours.get(name))
            ax.annotate(name, (xi, yi), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("Δ val bpb (up = worse)")
        ax.grid(alpha=0.3)
    ax_speed.axvline(1, color="k", lw=0.8)
    ax_speed.set_title("cost vs benefit: speed")
    ax_params.set_title("cost vs benefit: parameters")


def plot_stat(stats: pd.DataFrame, tag: str, ax, colours: dict | None = None) -> None:
    """One component statistic over training: mean over seeds per variant."""
    colours = colours or variant_colours(stats.variant)
    c = stats[stats.tag == tag]
    for name, g in c.groupby("variant", sort=False):
        m = g.groupby("step").value.mean()
        ax.plot(m.index, m.values, label=name, lw=1.2, color=colours.get(name))
    ax.set_title(tag.removeprefix("components/"), fontsize=9)
    ax.grid(alpha=0.3)


def plot_stats(stats: pd.DataFrame, colours: dict | None = None, cols: int = 4):
    """Every component statistic, one panel each, the same colour per variant in every panel and
    one legend for the figure (with every variant, whichever panels it appears in)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tags = sorted(stats.tag.unique())
    colours = colours or variant_colours(stats.variant)
    rows = max(1, math.ceil(len(tags) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows + 0.8), squeeze=False)
    for tag, ax in zip(tags, axes.flat):
        plot_stat(stats, tag, ax, colours)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    shown = [n for n in colours if n in set(stats.variant)]
    handles = [Line2D([], [], color=colours[n], lw=2) for n in shown]
    fig.legend(handles, shown, loc="lower center", ncol=min(6, len(shown)) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.8 / (3 * rows + 0.8), 1, 1))
    return fig


def write(
    grid_dir: str | Path, alpha: float = 0.05, margin: float | None = None, metric: str | None = None
) -> dict[str, Path]:
    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    margin = plan.get("margin", 0.01) if margin is None else margin
    runs = load_runs(grid_dir)
    metric = metric or plan.get("metric", "val_bpb")
    summary = summarize(runs, alpha, margin, metric)
    paths = {"md": grid_dir / "summary.md", "csv": grid_dir / "summary.csv", "png": grid_dir / "curves.png"}
    atomic_write(paths["md"], markdown(summary, plan, alpha, margin))
    atomic_write(paths["csv"], csv_text(summary))
    plot(runs, summary, curves(grid_dir, "val/"), paths["png"], metric)
    if plan.get("settings"):
        paths["difficulty"] = grid_dir / "difficulty.png"
        plot_settings(by_setting(runs, plan), plan, paths["difficulty"], metric)
        pooled = summarize_settings(runs, plan, alpha, margin, metric)
        text = markdown_settings(pooled, metric, alpha, margin)
        if metric == "val_acc":
            solved = steps_to_solve(curves(grid_dir, "val/acc"), by_setting(runs, plan))
            text += "\n" + markdown_solve(solved)
        atomic_write(grid_dir / "by_component.md", text)
        paths["by_component"] = grid_dir / "by_component.md"
    if any(v.get("rung_of") for v in plan["variants"]):
        from escarda_lab import ladder

        mult, f, points = ladder.table(runs, plan, metric if not METRICS[metric][1] else "val_bpb")
        text = ladder.markdown(mult, f, metric if not METRICS[metric][1] else "val_bpb")
        atomic_write(paths["md"], paths["md"].read_text(encoding="utf-8") + "\n" + text)
        paths["ladder"] = grid_dir / "ladder.png"
        ladder.plot(mult, f, points, paths["ladder"], metric if not METRICS[metric][1] else "val_bpb")
        atomic_write(grid_dir / "multipliers.csv", mult.to_csv(index=False))
    if plan.get("tuned"):
        import matplotlib.pyplot as plt

        paths["tune"] = grid_dir / "tune.png"
        fig, ax = plt.subplots(figsize=(7, 5))
        plot_tune(plan, ax, variant_colours(summary.variant))
        fig.tight_layout()
        save_figure(fig, paths["tune"])
    return paths


def compare_folders(
    paths: list[str], alpha: float = 0.05, margin: float = 0.01, metric: str | None = None
) -> tuple[pd.DataFrame, dict]:
    """Any run folders, outside a grid: `runs/a` (every seed<k>/ in it) or `runs/a/seed0`; the
    first name is the baseline; runs of two names pair on their common seeds."""
    rows, names = [], []
    for raw in paths:
        path = Path(raw)
        runs = [path] if (path / "metrics.json").exists() else sorted(path.glob("seed*/"))
        runs = [r for r in runs if (r / "metrics.json").exists()]
        if not runs:
            raise DataError(raw, None, "no finished run here (no metrics.json)", "pass run folders or grid folders")
        name = path.parent.name if path.name.startswith("seed") else path.name
        if name not in names:
            names.append(name)
        for r in runs:
            m = read_json(r / "metrics.json") or {}
            rows.append(run_row(m, name, m.get("seed", 0), "", str(r), "changed"))
    df = pd.DataFrame(rows)
    df["baseline"] = names[0]
    df.loc[df.variant == names[0], "kind"] = "base"
    if metric is None:
        metric = "val_acc" if df.val_bpb.isna().all() or _is_probe(paths[0]) else "val_bpb"
    plan = {
        "baseline": names[0],
        "seeds": sorted(df.seed.unique().tolist()),
        "title": f"# Runs compared: {', '.join(f'`{n}`' for n in names)}",
    }
    return summarize(df, alpha, margin, metric), plan


def _is_probe(path: str) -> bool:
    """Whether a run folder (or a folder of seeds) trained on a probe task."""
    path = Path(path)
    cfg = (
        path / "config.yaml"
        if (path / "config.yaml").exists()
        else next(iter(sorted(path.glob("seed*/config.yaml"))), None)
    )
    import re

    return cfg is not None and re.search(r"corpus:\s*['\"]?probe:", cfg.read_text()) is not None


# ------------------------------------------------------------------ grids over settings (probe suites)


def by_setting(runs: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """`runs` with each run's variant family (the name before the setting tag), setting, the
    task (a setting's data.corpus) and the family's baseline."""
    info = {v["name"]: v for v in plan["variants"]}
    settings = plan.get("settings") or {}
    out = runs.copy()
    out["family"] = [info[n].get("family", n) for n in out.variant]
    out["setting"] = [info[n].get("setting", "") for n in out.variant]
    corpus = {k: str(flat_get(b, "data.corpus") or k) for k, b in settings.items()}
    out["task"] = [corpus.get(s_, s_).removeprefix("probe:") for s_ in out.setting]
    return out


def flat_get(bundle: dict, dotted: str):
    """A dotted key from a settings bundle written either flat or nested."""
    if dotted in bundle:
        return bundle[dotted]
    node = bundle
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def summarize_settings(
    runs: pd.DataFrame, plan: dict, alpha: float = 0.05, margin: float = 0.01, metric: str = "val_acc"
) -> pd.DataFrame:
    """One row per (variant family, task) and per family over every setting ("all"): the paired
    statistics of `metric` with the baseline family, the pairs being (setting, seed) — each setting
    is a block both arms ran on the same data — with Holm across the families' pooled rows."""
    df = by_setting(runs, plan)
    ok = df[df.status == "finished"]
    base_family = plan["baseline"]
    base = ok[ok.family == base_family].set_index(["setting", "seed"])[metric]
    higher = METRICS[metric][1]
    kinds = {v.get("family", v["name"]): v["kind"] for v in plan["variants"]}
    rows = []
    for family in [f for f in dict.fromkeys(df.family) if f != base_family]:
        mine = ok[ok.family == family]
        for task in [*dict.fromkeys(mine.task), "all"]:
            g = mine if task == "all" else mine[mine.task == task]
            d = (g.set_index(["setting", "seed"])[metric] - base).dropna()
            st = paired(d.to_numpy(), alpha, margin)
            rows.append({"family": family, "kind": kinds.get(family, ""), "task": task, **st})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["p_holm"] = math.nan
    pooled = out.task == "all"
    out.loc[pooled, "p_holm"] = holm(out.loc[pooled, "p_paired"].tolist())
    for task in out.task.unique():  # per task: Holm across the families on that task
        sel = out.task == task
        if task != "all":
            out.loc[sel, "p_holm"] = holm(out.loc[sel, "p_paired"].tolist())
    out["verdict"] = [verdict(r["kind"], r, alpha, margin, higher) for r in out.to_dict("records")]
    return out


def markdown_settings(pooled: pd.DataFrame, metric: str, alpha: float, margin: float) -> str:
    unit = METRICS[metric][0]
    if pooled.empty:
        return "# By component\n\nNo finished pairs yet.\n"
    cell = lambda r: f"{r.delta:+.3f} **{r.verdict.split(' (')[0]}**" if r.n_pairs >= 2 else "—"
    tasks = [t for t in dict.fromkeys(pooled.task) if t != "all"]
    wide = pd.DataFrame(
        {
            "variant": f"`{family}`",
            **{t: next((cell(r) for r in g.itertuples() if r.task == t), "—") for t in tasks},
            "all settings": next((cell(r) for r in g.itertuples() if r.task == "all"), "—"),
            "95% CI (all)": next(
                (f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in g.itertuples() if r.task == "all" and r.n_pairs >= 2),
                "—",
            ),
            "pairs": next((int(r.n_pairs) for r in g.itertuples() if r.task == "all"), 0),
        }
        for family, g in pooled.groupby("family", sort=False)
    )
    return "\n".join(
        [
            "# By component",
            "",
            f"Δ {unit} of each variant against the baseline, paired over (setting, seed): every setting of a "
            "task (its difficulty levels) is a block both arms ran on identical data. Per task, Holm across "
            f"the variants on that task; `all settings`, Holm across the variants. alpha = {alpha}, "
            f"equivalence margin ±{margin} {unit}. A `no_X` row that reads **helps** means X helps.",
            "",
            table(wide),
            "",
        ]
    )


def csv_text(summary: pd.DataFrame) -> str:
    """summary.csv: counts as integers (pandas keeps them as floats next to NaN)."""
    out = summary.copy()
    for col in ["params_total", "params_active", "planned", "seeds", "failed", "diverged", "spiky", "n_pairs"]:
        if col in out:
            out[col] = out[col].round().astype("Int64")
    return out.to_csv(index=False)


SOLVED = 0.9  # a probe counts as solved at this accuracy


def steps_to_solve(curve: pd.DataFrame, df: pd.DataFrame, threshold: float = SOLVED) -> pd.DataFrame:
    """Per run: the first validation step whose accuracy reaches `threshold` (the run's last step
    when only its final whole-test-set score did; NaN if never), and the final accuracy; with its
    family and setting."""
    info = df.set_index(["variant", "seed"])[["family", "setting", "val_acc", "status"]]
    rows = []
    for (variant, seed), g in curve[curve.tag == "val/acc"].groupby(["variant", "seed"], sort=False):
        if (variant, seed) not in info.index:
            continue
        g = g.sort_values("step")
        hit = g[g.value >= threshold]
        r = info.loc[(variant, seed)]
        rows.append(
            {
                "family": r.family,
                "setting": r.setting,
                "seed": seed,
                "step": float(hit.step.iloc[0])
                if len(hit)
                else (float(g.step.max()) if r.val_acc >= threshold else math.nan),
                "final_acc": r.val_acc,
            }
        )
    return pd.DataFrame(rows, columns=["family", "setting", "seed", "step", "final_acc"])


def markdown_solve(solved: pd.DataFrame, threshold: float = SOLVED) -> str:
    if solved.empty:
        return ""
    cell = lambda g: "; ".join(
        (f"{int(s)}" if not math.isnan(s) else f"— ({a:.2f})") for s, a in zip(g.step, g.final_acc)
    )
    wide = solved.groupby(["family", "setting"], sort=False).apply(cell, include_groups=False).unstack("setting")
    wide = wide.reindex(columns=list(dict.fromkeys(solved.setting))).fillna("")
    wide.index = [f"`{f}`" for f in wide.index]
    return "\n".join(
        [
            "## Steps to solve",
            "",
            f"First validation step at which accuracy reached {threshold} (per seed); — (final accuracy) "
            "when it never did within the run.",
            "",
            wide.reset_index(names="variant").to_markdown(index=False, disable_numparse=True),
            "",
        ]
    )


def plot_settings(df: pd.DataFrame, plan: dict, path: Path, metric: str = "val_acc") -> None:
    """One panel per task: `metric` (mean over seeds) at each of its settings, in the order the
    grid lists them (easy to hard), one line per variant family, the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df.status == "finished"]
    tasks = list(dict.fromkeys(df.task))
    families = list(dict.fromkeys(df.family))
    colours = {f: plt.get_cmap("tab20")(i % 20) for i, f in enumerate(families)}
    cols = min(3, len(tasks)) or 1
    rows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    order = list(plan.get("settings") or {})
    for ax, task in zip(axes.flat, tasks):
        t = ok[ok.task == task]
        settings = [s_ for s_ in order if s_ in set(t.setting)]
        for family in families:
            m = t[t.family == family].groupby("setting")[metric].mean()
            ax.plot(
                range(len(settings)),
                [m.get(s_, math.nan) for s_ in settings],
                marker="o",
                lw=1.3,
                color=colours[family],
                label=family,
            )
        ax.set_xticks(range(len(settings)), settings, rotation=20, fontsize=7)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = commands.parser("compare").parse_args(argv)
    try:
        if len(args.paths) > 1 or not (Path(args.paths[0]) / "grid.json").exists():
            margin = 0.01 if args.margin is None else args.margin
            summary, plan = compare_folders(args.paths, args.alpha, margin, args.metric)
            print(markdown(summary, plan, args.alpha, margin))
            return 0
        paths = write(args.paths[0], args.alpha, args.margin, args.metric)
    except UserError as e:
        print(f"escarda_lab: error in {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(x) for x in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
