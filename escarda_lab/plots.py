"""Figures of a comparison: learning curves, paired differences, the tuning sweep, cost against
benefit, component statistics and accuracy against difficulty. Every figure colours a variant the
same way (`variant_colours`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from escarda_lab.io import atomic_path
from escarda_lab.records import METRICS


def plot(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    curve: pd.DataFrame,
    path: Path,
    metric: str = "val_bpb",
    margin: float | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curve.empty:  # no TensorBoard events here (e.g. a grid's record without its run folders)
        fig, ax2 = plt.subplots(figsize=(8, 0.45 * len(summary) + 1.5))
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
        plot_curves(curve, ax1, metric.replace("_", "/"), variant_colours(summary.variant))
    plot_deltas(runs, summary, ax2, metric, margin)
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
    if len(c):  # every point inside the axes; a log axis when the first evaluations would squash the rest
        lo, hi = c.value.min(), c.value.max()
        if lo > 0 and hi / lo > 2:
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.02, hi * 1.02)
        elif hi > lo:
            ax.set_ylim(lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
    if len(c):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_deltas(
    runs: pd.DataFrame, summary: pd.DataFrame, ax, metric: str = "val_bpb", margin: float | None = None
) -> None:
    """Paired differences to the baseline: one dot per seed (variant − baseline on that seed), the
    mean as a bar and its 95% t interval as a line, over the ±margin band of equivalence."""
    if margin:
        ax.axvspan(-margin, margin, color="tab:blue", alpha=0.12, lw=0, label=f"±margin {margin:g}")
        ax.legend(fontsize=8, loc="lower right")
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
    label, higher = METRICS[metric].label, METRICS[metric].higher_is_better
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
    noisy = "speed_noisy" in s and s.speed_noisy.sum() > 0
    ax_speed.set_title("cost vs benefit: speed" + (" (noisy: timed on a shared machine)" if noisy else ""))
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


VERDICT_COLOURS = {"helps": "tab:green", "hurts": "tab:red", "equivalent": "tab:blue"}


def plot_forest(summary: pd.DataFrame, path: Path, margin: float, mde: float | None = None) -> None:
    """The verdict table as one figure: each comparison's paired Δ with its 95% t interval, the
    ±margin band, the MDE (dotted) and zero; controls and budgets below the variants; the marker's
    colour is the verdict (grey: inconclusive or no test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = summary[summary.variant != summary.baseline]
    rows = pd.concat([rows[~rows.kind.isin(("control", "rung"))], rows[rows.kind.isin(("control", "rung"))]])
    metric = rows.metric.iloc[0] if len(rows) and "metric" in rows else "val_bpb"
    fig, ax = plt.subplots(figsize=(8, (0.42 if len(rows) <= 30 else 0.22) * len(rows) + 1.8))
    ax.axvspan(-margin, margin, color="tab:blue", alpha=0.12, lw=0)
    ax.axvline(0, color="k", lw=0.8)
    if mde is not None and math.isfinite(mde):
        for x in (-mde, mde):
            ax.axvline(x, color="0.4", lw=0.9, ls=":")
    for i, r in enumerate(rows.itertuples()):
        colour = VERDICT_COLOURS.get(str(r.verdict).split(" ")[0], "0.45")
        if not math.isnan(r.ci_low):
            ax.plot([r.ci_low, r.ci_high], [i, i], color=colour, lw=1.6)
        if not math.isnan(r.delta):
            ax.scatter([r.delta], [i], color=colour, s=36, zorder=3)
    n_var = int((~rows.kind.isin(("control", "rung"))).sum())
    if 0 < n_var < len(rows):
        ax.axhline(n_var - 0.5, color="0.6", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [f"{r.variant} ({r.verdict})" for r in rows.itertuples()], fontsize=8)
    ax.invert_yaxis()
    label, higher = METRICS[metric].label, METRICS[metric].higher_is_better
    if metric == "val_acc":  # an accuracy difference lies in [-1, 1]; wider intervals are clipped
        ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel(f"Δ {label}, variant − baseline, paired (right = {'better' if higher else 'worse'})")
    ax.set_title("paired differences with 95% t intervals", fontsize=10)
    handles = [Line2D([], [], color=c, marker="o", lw=1.6, label=v) for v, c in VERDICT_COLOURS.items()]
    handles += [
        Line2D([], [], color="0.45", marker="o", lw=1.6, label="inconclusive"),
        plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.12, label=f"±margin {margin:g}"),
    ]
    if mde is not None and math.isfinite(mde):
        handles.append(Line2D([], [], color="0.4", ls=":", label=f"MDE {mde:.3g} (Holm's first step)"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, path)
