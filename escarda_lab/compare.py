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

The work is done by `stats` (the numbers, numpy/scipy only), `summary` (tables of runs and
variants), `report` (markdown, CSV) and `plots`; the notebooks read grids through `summary` and
`plots`. Nothing here imports torch.
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "compare")

import sys
from pathlib import Path

from escarda_lab import cli, looks, plots, report, summary
from escarda_lab.errors import UserError
from escarda_lab.io import atomic_write
from escarda_lab.records import METRICS
from escarda_lab.stats import Plan


def write(
    grid_dir: str | Path, alpha: float = 0.05, margin: float | None = None, metric: str | None = None
) -> dict[str, Path]:
    grid_dir = Path(grid_dir)
    plan = summary.load_plan(grid_dir)
    refresh_index(grid_dir)
    margin = plan.get("margin", 0.01) if margin is None else margin
    runs = summary.load_runs(grid_dir)
    metric = metric or plan.get("metric", "val_bpb")
    table = summary.summarize(runs, alpha, margin, metric)
    looks.sequential_readout(table, runs, plan, alpha, margin, metric)
    paths = write_comparison(table, plan, runs, summary.curves(grid_dir, "val/"), grid_dir, alpha, margin)
    if plan.get("settings"):
        paths["difficulty"] = grid_dir / "difficulty.png"
        plots.plot_settings(summary.by_setting(runs, plan), plan, paths["difficulty"], metric)
        pooled = summary.summarize_settings(runs, plan, alpha, margin, metric)
        text = report.markdown_settings(pooled, metric, alpha, margin)
        if not pooled.empty:  # the verdict figure per task: one seed per setting says nothing alone
            per_task = pooled.assign(
                variant=[f"{r.family} · {r.task}" for r in pooled.itertuples()], baseline="", metric=metric
            ).sort_values("task", key=lambda t: t.map({k: i for i, k in enumerate(dict.fromkeys(pooled.task))}))
            plots.plot_forest(per_task, paths["forest"], margin)
        if metric == "val_acc":
            solved = summary.steps_to_solve(summary.curves(grid_dir, "val/acc"), summary.by_setting(runs, plan))
            text += "\n" + report.markdown_solve(solved)
        atomic_write(grid_dir / "by_component.md", text)
        paths["by_component"] = grid_dir / "by_component.md"
    if any(v.get("rung_of") for v in plan["variants"]):
        from escarda_lab import ladder

        mult, f, points = ladder.table(runs, plan, metric if not METRICS[metric].higher_is_better else "val_bpb")
        text = ladder.markdown(mult, f, metric if not METRICS[metric].higher_is_better else "val_bpb")
        atomic_write(paths["md"], paths["md"].read_text(encoding="utf-8") + "\n" + text)
        paths["ladder"] = grid_dir / "ladder.png"
        ladder.plot(mult, f, points, paths["ladder"], metric if not METRICS[metric].higher_is_better else "val_bpb")
        atomic_write(grid_dir / "multipliers.csv", mult.to_csv(index=False))
    if plan.get("tuned"):
        import matplotlib.pyplot as plt

        paths["tune"] = grid_dir / "tune.png"
        fig, ax = plt.subplots(figsize=(7, 5))
        plots.plot_tune(plan, ax, plots.variant_colours(table.variant))
        fig.tight_layout()
        plots.save_figure(fig, paths["tune"])
    return paths


def refresh_index(grid_dir: Path) -> None:
    """The grid's rows of the results index beside it (escarda_lab.results); a warning if it cannot."""
    import logging
    import sqlite3

    from escarda_lab import results

    if next(grid_dir.glob("*/seed*/metrics.json"), None) is None:  # a committed record: no runs to index
        return
    try:
        results.refresh(grid_dir.parent, under=grid_dir)
    except (sqlite3.Error, OSError, UserError) as e:
        logging.getLogger("escarda_lab").warning("the results index beside %s was not refreshed: %s", grid_dir, e)


def write_comparison(table, plan: dict, runs, curve, out: Path, alpha: float, margin: float) -> dict[str, Path]:
    """summary.md, summary.csv, forest.png and the curves with the paired differences (paired.png
    alone when there are no learning curves: a committed record without its run folders)."""
    paths = {k: out / v for k, v in {"md": "summary.md", "csv": "summary.csv", "forest": "forest.png"}.items()}
    paths["png"] = out / ("paired.png" if curve.empty else "curves.png")
    atomic_write(paths["md"], report.markdown(table, plan, alpha, margin))
    atomic_write(paths["csv"], report.csv_text(table))
    power = summary.plan(table, alpha, plan.get("target_effect") or margin, margin)
    plots.plot_forest(table, paths["forest"], margin, power.mde(power.first_alpha) if power else None)
    plots.plot(runs, table, curve, paths["png"], table.metric.iloc[0], margin)
    return paths


def write_folders(table, plan: dict, runs, out: Path, alpha: float, margin: float) -> dict[str, Path]:
    """`compare RUN RUN --out DIR`: the comparison of run folders, written as a grid's would be."""
    from escarda_lab.errors import DataError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"cannot create the output folder ({e.strerror})"
        raise DataError(str(out), None, why, "give --out a writable folder") from None
    return write_comparison(table, plan, runs, summary.curves_of(plan["folders"], "val/"), out, alpha, margin)


def plan_text(args) -> str:
    """`--plan`: the power of a grid before it runs, from a prior sd or an earlier grid's."""
    sd, family, margin = args.sd, args.family, 0.01 if args.margin is None else args.margin
    source = f"sd {sd} given"
    if args.paths:
        grid_dir = Path(args.paths[0])
        plan = summary.load_plan(grid_dir)
        table = summary.summarize(summary.load_runs(grid_dir), args.alpha, plan.get("margin", margin))
        sd = summary.pooled_sd(table) if sd is None else sd
        family = int(summary.in_family(table).sum()) if family is None else family
        margin = plan.get("margin", margin) if args.margin is None else margin
        source = f"pooled sd of {grid_dir}"
    if sd is None or family is None:
        raise UserError(
            "command line",
            "--plan",
            "the plan needs the noise (sd of paired differences) and the number of comparisons",
            "give --sd and --family, or an earlier grid's folder",
        )
    p = Plan(sd=sd, n=args.seeds, family=family, alpha=args.alpha, target=args.target or margin, margin=margin)
    return "\n".join([f"Plan for {args.seeds} paired seeds ({source}):", *p.lines(METRICS["val_bpb"].label)])


def main(argv: list[str] | None = None) -> int:
    args = arguments.parser("compare").parse_args(argv)

    def body() -> None:
        if args.plan:
            print(plan_text(args))
            return
        if not args.paths:
            raise UserError("command line", "paths", "no grid or run folder given", "pass e.g. runs/leave_one_out")
        if len(args.paths) > 1 or not (Path(args.paths[0]) / "grid.json").exists():
            margin = 0.01 if args.margin is None else args.margin
            table, plan, runs = summary.compare_folders(args.paths, args.alpha, margin, args.metric)
            print(report.markdown(table, plan, args.alpha, margin))
            if args.out:
                paths = write_folders(table, plan, runs, Path(args.out), args.alpha, margin)
                print("wrote " + ", ".join(str(x) for x in paths.values()))
            else:
                print("(printed only: add --out DIR to write summary.md, summary.csv, curves.png and forest.png)")
            return
        if args.out:
            raise UserError(
                "command line",
                "--out",
                f"a grid's comparison is written into the grid folder {args.paths[0]}",
                "leave --out out for a grid (it is for run folders compared directly)",
            )
        paths = write(args.paths[0], args.alpha, args.margin, args.metric)
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(x) for x in paths.values()))

    return cli.guarded(body)


if __name__ == "__main__":
    sys.exit(main())
