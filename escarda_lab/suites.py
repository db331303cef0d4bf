"""Evaluations a finished run can be scored on, and how a grid names them (`grid.evaluate`).

A grid's `evaluate:` list holds suite names, `text:FILE`, `corpus:NAME` and multiple-choice
`*.jsonl` task files. A suite is one registered function (lm-evaluation-harness's shape):

    @eval_suite("minimal_pairs", columns=lambda r: {"eval/minimal_pairs": r["overall"]["acc"]})
    def minimal_pairs(scorer, pairs_per_paradigm=200, seed=0) -> dict: ...

`evaluate --suite NAME` runs it and stores its result under eval.json[NAME]; `columns` turns that
result into the numbers compare reports per variant. This module imports no torch: a suite's
function imports what it needs when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Suite:
    name: str
    run: Callable[..., dict]  # (scorer, pairs_per_paradigm, seed) -> eval.json[name]
    columns: Callable[[dict], dict[str, float]]  # eval.json[name] -> {"eval/<...>": number}


SUITES: dict[str, Suite] = {}


def eval_suite(name: str, columns: Callable[[dict], dict[str, float]]):
    """Register `run` as the evaluation suite `name`."""

    def register(run):
        SUITES[name] = Suite(name, run, columns)
        return run

    return register


@eval_suite("minimal_pairs", columns=lambda r: {"eval/minimal_pairs": r["overall"]["acc"]})
def minimal_pairs(scorer, pairs_per_paradigm: int = 200, seed: int = 0) -> dict:
    """BLiMP-style minimal pairs (escarda_lab/minimal_pairs.py): accuracy per paradigm."""
    from escarda_lab import minimal_pairs as mp

    return mp.score(scorer, mp.generate(pairs_per_paradigm, seed))


# ------------------------------------------------------------------------------ grid.evaluate


def accepts(entry: str) -> bool:
    """Whether a `grid.evaluate` entry names something `escarda_lab.evaluate` can score."""
    e = str(entry)
    return e in SUITES or e.startswith(("text:", "corpus:")) or (e.endswith(".jsonl") and Path(e).is_file())


def accepted() -> str:
    """What `grid.evaluate` entries may be, for error messages."""
    return f"{', '.join(SUITES)}, existing multiple-choice .jsonl files, text:FILE or corpus:NAME"


def evaluate_args(entries: list[str]) -> list[str]:
    """`escarda_lab.evaluate` arguments for `grid.evaluate` (the split bpb is in metrics.json already)."""
    if not entries:
        return []
    args = ["--no-split"]
    for e in map(str, entries):
        if e in SUITES:
            args += ["--suite", e]
        elif e.startswith("text:"):
            args += ["--text", str(Path(e[5:]).resolve())]
        elif e.startswith("corpus:"):
            args += ["--corpus", e[7:]]
        else:
            args += ["--task", str(Path(e).resolve())]
    return args


def columns(ev: dict) -> dict[str, float]:
    """Flat numbers from a run's eval.json for tables: eval/minimal_pairs, eval/<task>/acc, ..."""
    out = {}
    for name, suite in SUITES.items():
        if name in ev:
            out.update(suite.columns(ev[name]))
    for name, t in ev.get("tasks", {}).items():
        out[f"eval/{name}/acc"], out[f"eval/{name}/acc_norm"] = t["acc"], t["acc_norm"]
    for kind in ["text", "corpus"]:
        for name, t in ev.get(kind, {}).items():
            out[f"eval/{kind}:{Path(name).name}/bpb"] = t["bpb"]
    return out
