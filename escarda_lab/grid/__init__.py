"""Grids: a YAML with a `grid:` block expands into many runs, trained one process each.

    extends: escarda.yaml
    name: leave_one_out            # runs go to <output.dir>/leave_one_out/<variant>/seed<k>/
    grid:
      baseline: full               # "full" is the file itself; any variant name may be the baseline
      seeds: [0, 1, 2]
      leave_one_out: [engram, xsa] # variants no_engram, no_xsa
      add_one_in: [engram]         # variants vanilla (every plugin off) and with_engram
      variants: {wide: {model.d_model: 192}}
      axes: {model.n_layers: [2, 4]}
      match: params                # none | params
      parallel: 1
      launcher: local              # local | submitit
      start: fork                  # fork: local runs fork from a warm process (grid/warm.py) | fresh
      evaluate: [minimal_pairs]    # after training: escarda_lab.evaluate suites, tasks, texts

Each run's fully resolved config is written to its folder as config.yaml before it starts, so
`python -m escarda_lab.run runs/<grid>/<variant>/seed<k>/config.yaml` reruns one run by hand.
`results.jsonl` in the grid folder holds one line per run; `grid.json` holds the plan that
`escarda_lab.compare` reads.
"""

from __future__ import annotations

from pathlib import Path

from escarda_lab.errors import UserError
from escarda_lab.grid.expand import Expansion, Run, Variant, expand
from escarda_lab.grid.launch import child_env, train_runs, worker_slots
from escarda_lab.grid.matching import flops_per_token, params_of, resolve, train_flops
from escarda_lab.grid.record import plan_table, write_plan
from escarda_lab.grid.spec import GridConfig
from escarda_lab.grid.tuning import beyond_edge, pick_tuned
from escarda_lab.io import read_json

__all__ = [
    "Expansion",
    "GridConfig",
    "Run",
    "Variant",
    "child_env",
    "expand",
    "flops_per_token",
    "params_of",
    "resolved",
    "run_grid",
    "train_flops",
    "worker_slots",
]


def resolved(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    tuned: dict | None = None,
    tuning: bool = False,
    extra: dict[str, list] | None = None,
) -> Expansion:
    """`expand`, then every run sized for launch (`matching.resolve`: trains or loads tokenizers,
    builds models on the meta device): the runs exactly as they will train."""
    return resolve(expand(path, overrides, tuned, tuning, extra), path)


def run_grid(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), dry_run: bool = False, echo=print
) -> list[dict]:
    tuned = None
    g, runs, grid_dir, _, _ = resolved(path, overrides)
    if g.tune is not None:
        tune_runs = resolved(path, overrides, tuning=True).runs
        echo(plan_table(tune_runs, grid_dir, f"tuning {g.tune.key} over {g.tune.values}"))
        if dry_run:
            echo(plan_table(runs, grid_dir, f"verdict runs ({g.tune.key} set per variant after tuning)"))
            return []
        train_runs(g, tune_runs, grid_dir / "tune", echo)
        tuned = pick_tuned(g, tune_runs)
        extra = beyond_edge(g.tune, tuned) if g.tune.extend else {}
        if extra:  # a value chosen at the edge of the sweep: one step further out before trusting it
            echo("at the edge of the sweep, one step further: " + ", ".join(f"{n} {v}" for n, v in extra.items()))
            tune_runs = resolved(path, overrides, tuning=True, extra=extra).runs
            train_runs(g, tune_runs, grid_dir / "tune", echo)
            tuned = pick_tuned(g, tune_runs)
        for name, t in tuned.items():
            echo(
                f"tuned {name}: {t['key']} = {t['value']} (val loss by value: "
                + ", ".join(f"{v}: {'failed' if x is None else f'{x:.4f}'}" for v, x in t["scores"].items())
                + ")"
            )
        missing = [n for n, t in tuned.items() if t["value"] is None]
        if missing:
            raise UserError(
                str(path),
                "grid.tune",
                f"every tuning run of {', '.join(missing)} failed or diverged",
                f"see {grid_dir / 'tune'}/*/seed*/log.txt; widen tune.values towards smaller values",
            )
        g, runs, grid_dir, _, _ = resolved(path, overrides, tuned={n: t["value"] for n, t in tuned.items()})
    echo(plan_table(runs, grid_dir))
    if dry_run:
        return []
    grid_dir.mkdir(parents=True, exist_ok=True)
    write_plan(g, runs, grid_dir, str(path), tuned)
    results = train_runs(g, runs, grid_dir, echo) if g.sequential is None else train_looks(g, runs, grid_dir, echo)
    # from the run folders: a resumed sequential grid does not walk the seeds earlier looks settled
    done = sum((read_json(r.folder / "metrics.json") or {}).get("status") == "finished" for r in runs)
    echo(f"{done}/{len(runs)} runs finished; compare them with `python -m escarda_lab.compare {grid_dir}`")
    return results


def train_looks(g: GridConfig, runs: list[Run], grid_dir: Path, echo=print) -> list[dict]:
    """`seeds: {min, max, step}`: train the first look's seeds of every variant, then, look by look,
    the next seeds of the comparisons still undecided (with their baselines, the controls and the
    other runs that test nothing). Rerunning resumes: finished runs are skipped and the decisions
    recomputed from them."""
    from escarda_lab import looks as readout
    from escarda_lab import summary

    looks = g.sequential.looks()
    chosen: dict[tuple[str, int], Run] = {}
    active: set[str] | None = None  # None: every variant
    results: list[dict] = []
    for k, n in enumerate(looks):
        for r in runs:
            if r.seed in g.seeds[:n] and (active is None or r.variant.name in active):
                chosen.setdefault((r.variant.name, r.seed), r)
        results = train_runs(g, list(chosen.values()), grid_dir, echo)
        plan, table_runs = summary.load_plan(grid_dir), summary.load_runs(grid_dir)
        table = summary.summarize(table_runs, 0.05, g.margin, plan["metric"])
        decisions = readout.sequential_readout(table, table_runs, plan, 0.05, g.margin, plan["metric"])
        family = table[summary.in_family(table)]
        verdicts = dict(zip(family.variant, table.loc[family.index, "verdict"]))
        open_ = [name for name, d in zip(family.variant, decisions) if not d.verdict]
        # a rerun finds later looks' seeds already trained: each decision says the look it was made at
        decided = [
            f"{name} ({verdicts[name]} at look {d.look + 1})" for name, d in zip(family.variant, decisions) if d.verdict
        ]
        echo(
            f"look {k + 1}/{len(looks)} at {n} seeds: decided {', '.join(decided) or 'none'}; "
            f"undecided {', '.join(open_) or 'none'}"
        )
        if not open_ or k == len(looks) - 1:
            break
        active = set(open_) | {r.variant.name for r in runs if r.variant.name not in verdicts}
    return results
