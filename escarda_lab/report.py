"""The written reports of a comparison: summary.md (the verdict table and what it rests on),
summary.csv, and by_component.md for grids over settings."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from escarda_lab.conditions import speed_note
from escarda_lab.noise import noise_budget
from escarda_lab.records import METRICS
from escarda_lab.stats import STATISTICS, Statistic
from escarda_lab.summary import SOLVED, calibration, in_family, readings
from escarda_lab.summary import plan as summary_plan


def table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


def num(x, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def pm(m: float, s: float) -> str:
    return "—" if math.isnan(m) else (f"{m:.4f}" if math.isnan(s) else f"{m:.4f} ± {s:.4f}")


def interval(lo: float, hi: float) -> str:
    return "—" if math.isnan(lo) else f"[{lo:+.4f}, {hi:+.4f}]"


def shown(r, st: Statistic) -> str:
    """A registered statistic's cell: an interval for two columns, else the number."""
    values = [getattr(r, c, math.nan) for c in st.columns]
    return interval(*values) if len(values) == 2 else num(values[0], st.fmt)


def statistic_cells(r, table_name: str) -> dict[str, str]:
    return {st.label: shown(r, st) for st in STATISTICS.values() if st.table == table_name}


def family_line(summary: pd.DataFrame, alpha: float, margin: float, unit: str) -> str:
    fam = summary[in_family(summary)]
    readings = sorted(set(fam["reading"])) if "reading" in fam and fam["reading"].any() else []
    per = f", Holm within each reading ({' / '.join(readings)})" if len(readings) > 1 else ""
    return (
        f"**Family:** the {len(fam)} variant comparisons (controls and budgets are not hypotheses){per}; "
        f"alpha {alpha:g}; Holm's step-down on the paired t p-values for **helps/hurts** (Holm p) and, "
        f"separately, on the TOST p-values for **equivalent** within ±{margin:g} {unit} (Holm TOST p): "
        f"each keeps its family-wise error at {alpha:g}."
    )


def two_readings(both: pd.DataFrame, key: str, unit: str, alpha: float) -> list[str]:
    def cells(r, tag: str) -> dict[str, str]:
        if r is None:
            return {f"{tag}: {key}": "—", f"{tag}: Δ {unit}": "not run", f"{tag}: 95% CI": "—", f"{tag}: Holm p": "—",
                    f"{tag}: verdict": "—"}  # fmt: skip
        return {
            f"{tag}: {key}": num(r["tuned"], "g"),
            f"{tag}: Δ {unit}": num(r["delta"], "+.4f"),
            f"{tag}: 95% CI": interval(r["ci_low"], r["ci_high"]),
            f"{tag}: Holm p": num(r["p_holm"], ".3g"),
            f"{tag}: verdict": f"**{r['verdict']}**",
        }

    rows = pd.DataFrame(
        {"variant": f"`{e.variant}`", **cells(e.same, "same recipe"), **cells(e.own, "own best")}
        for e in both.itertuples()
    )
    return [
        "## Two readings",
        "",
        f"**Same recipe**: the variant at the baseline's `{key}` (what the change does to this recipe); "
        f"**own best**: at its own tuned `{key}` (each arm at its best). Holm within each reading's family; "
        f"a variant whose tuned value is the baseline's has one run for both readings.",
        "",
        table(rows),
    ]


def noise_lines(summary: pd.DataFrame, unit: str) -> list[str]:
    """The noise budget: which source dominates each variant's noise, and the grid's SNR."""
    table_, snr = noise_budget(summary)
    if table_.empty:
        return []
    shown_ = pd.DataFrame(
        {
            "variant": f"`{r['variant']}`",
            "seeds": r["seeds"],
            f"seed sd ({unit})": num(r["seed sd"], ".4f"),
            "checkpoint sd (bpb)": num(r["checkpoint sd"], ".4f"),
            "eval SE (bpb)": num(r["evaluation sd"], ".4f"),
            "paired eval SE": num(r["paired eval SE"], ".4f"),
            "sd of Δ": num(r["sd_diff"], ".4f"),
            "pair r": num(r["pair_r"], ".2f"),
            "largest": r["largest"],
        }
        for r in table_.to_dict("records")
    )
    return [
        "## Noise budget",
        "",
        "Seed sd: the variant's spread over seeds. Checkpoint sd: the spread of each run's last "
        "`train.average_last` whole-split scores (— with one). Eval SE: the final score's standard error "
        "over validation batches; paired eval SE: that of the difference from the baseline, batch by batch "
        "(both arms score the same batches, so what the batches share cancels; `largest` weighs seed, "
        "checkpoint and paired evaluation noise). Pairing removes what the "
        "two arms share: sd of Δ = √(sd_v² + sd_b² − 2·r·sd_v·sd_b). "
        f"Signal-to-noise (sd of the variant means / median seed sd): **{num(snr, '.2f')}**.",
        "",
        table(shown_),
    ]


def speed_line(summary: pd.DataFrame) -> str:
    """Whether the speed and tokens/s columns were measured on a machine the runs had to themselves."""
    if "speed_timed" not in summary:
        return speed_note(0, 0, "")
    noisy = summary[summary.speed_noisy > 0]
    why = noisy.speed_why.mode().iloc[0] if len(noisy) else ""
    return speed_note(int(summary.speed_timed.sum()), int(summary.speed_noisy.sum()), why)


def markdown(
    summary: pd.DataFrame, plan: dict, alpha: float = 0.05, margin: float = 0.01, prior_sd: float | None = None
) -> str:
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
            **({"decided at look": num(r.look, ".0f")} if "look" in summary else {}),
            "diverged / spiky": f"{r.diverged} / {r.spiky}",
            "params (total / active)": f"{num(r.params_total, ',.0f')} / {num(r.params_active, ',.0f')}",
            "FLOPs/token": num(r.flops_per_token / 1e6, ".2f") + "M",
            "speed": num(r.speed_vs_baseline, ".2f") + "×",
            f"val {unit}": pm(r.metric_mean, r.metric_std),
            f"Δ {unit} (paired)": num(r.delta, "+.4f"),
            **statistic_cells(r, "main"),
            "Holm p": num(r.p_holm, ".3g"),
            "Holm TOST p": num(r.p_tost_holm, ".3g"),
            "verdict": f"**{r.verdict}**",
        }
        for r in summary.itertuples()
    )
    more = pd.DataFrame(
        {
            "variant": f"`{r.variant}`",
            "val loss": pm(r.val_loss_mean, r.val_loss_std),
            **({"val bpb": pm(r.val_bpb_mean, r.val_bpb_std)} if unit != "bpb" else {}),
            **statistic_cells(r, "more"),
            "sd of Δ": num(r.sd_diff, ".4f"),
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
        "More columns: "
        + ", ".join(st.label for st in STATISTICS.values() if st.table == "more")
        + " (— where it does not apply), the sd of the paired differences, the correlation of the two arms "
        "over seeds (what pairing buys), Welch's unpaired p, training throughput, components flagged dead.",
        "",
        table(more),
        "",
        speed_line(summary),
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
    both = readings(summary, alpha, margin)
    if both is not None:
        lines = [*two_readings(both, key or "value", unit, alpha), "", *lines]
    else:
        base_value = summary.loc[summary.variant == plan["baseline"], "tuned"]
        differ = [r.variant for r in summary.itertuples() if key and len(base_value) and r.tuned != base_value.iloc[0]]
        one = (
            (
                f"**Readings:** `{key}` was tuned per variant and {', '.join(f'`{v}`' for v in differ)} chose "
                "another value than the baseline; this grid has no same-recipe twins, so the table is the *each at "
                "its best* reading only (a grid with `tune.readings: both` adds the *same recipe* one)."
                if differ
                else f"**Readings:** `{key}` was tuned per variant and every variant's choice equals the baseline's, "
                "so the *same recipe* and *each at its best* readings are one table."
            )
            if key
            else "**Readings:** one, *same recipe*: every arm trains with the baseline's settings (learning "
            "rate included); the grid tuned nothing per variant, so there is no *each at its best* reading."
        )
        lines = [one, "", *lines]
    target = plan.get("target_effect") or margin
    power = summary_plan(summary, alpha, target, margin, prior_sd)
    power_lines = ["**Power (prospective).**", *power.lines(unit)] if power else []
    matched = {
        "none": "steps and tokens (every variant trains the same batches)",
        "params": "non-embedding active parameters",
        "params_total": "total parameters",
        "params_active": "active parameters",
        "flops": "training FLOPs",
    }.get(plan.get("match", "none"), plan.get("match"))
    cal = calibration(summary, alpha)
    seq = plan.get("sequential")
    if seq:
        from escarda_lab.sequential import looks_of

        looks = looks_of(seq["min"], seq["max"], seq["step"])
        seq_line = (
            f"**Sequential seeds.** Looks at {looks} paired seeds; a comparison stops adding seeds once "
            f"decided. Each look tests at a {seq.get('spending', 'pocock')} alpha-spending threshold (Lan & "
            "DeMets 1983), with Holm carried across looks (Maurer & Bretz 2013), so each family's error stays "
            f"at {alpha:g}; the verdict column is this procedure's, and its Holm p columns are those of a fixed "
            "design at the seeds used, for reference. `decided at look`: — where undecided after the last."
        )
        cal = f"{seq_line}\n\n{cal}" if cal else seq_line
    tuned = ""
    if key:
        tuned = (
            f"`{key}` tuned per variant over {tune.get('values')} on {tune.get('seeds', 1)} separate "
            f"tuning seed(s){' of ' + str(tune['max_steps']) + ' steps' if tune.get('max_steps') else ''}; "
            "the best final val loss is kept (tune.png) and the verdict seeds never saw the sweep."
        )
    return "\n".join(
        [
            plan.get("title") or f"# Grid `{Path(plan.get('source', '')).name}`",
            "",
            family_line(summary, alpha, margin, unit),
            "",
            f"Baseline `{plan['baseline']}`; seeds {plan['seeds']}, paired (seed k: same batches, same initial "
            f"value for every shared weight); matched: {matched}. Δ {unit} is the mean over seeds of "
            f"variant − baseline on the same seed; the interval is the paired t interval; p is the paired t-test. "
            f"**helps/hurts**: Holm p < {alpha:g}; **equivalent**: Holm TOST p < {alpha:g}; else **inconclusive** "
            f'(not "no effect"). A `no_X` variant significantly worse than the baseline means X **helps**'
            + (" (worse = lower accuracy at the scored positions). " if unit == "acc" else ". ")
            + "`spiky` counts runs whose gradient norm jumped above 5× the median of its previous 20 steps.",
            "",
            *([cal, ""] if cal else []),
            *power_lines,
            "",
            "![paired differences: each comparison's Δ with its 95% interval, ±margin and the MDE](forest.png)",
            "",
            *([tuned, ""] if tuned else []),
            *lines,
            "",
            *noise_lines(summary, unit),
            "",
        ]
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
