"""The written reports of a comparison: summary.md (the verdict table and what it rests on),
summary.csv, and by_component.md for grids over settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from escarda_lab.records import METRICS
from escarda_lab.stats import mde
from escarda_lab.summary import SOLVED, calibration


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
    unit = METRICS[metric].label
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
            "Welch p": num(r.p_welch, ".3g"),
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


def markdown_settings(pooled: pd.DataFrame, metric: str, alpha: float, margin: float) -> str:
    unit = METRICS[metric].label
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
