"""The verdicts of a sequential grid (`grid.seeds: {min, max, step}`): each comparison's p-values
at every look, read by the group-sequential procedure of escarda_lab.sequential."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from escarda_lab.records import METRICS
from escarda_lab.sequential import DEFAULT_SPENDING, decide, looks_of
from escarda_lab.stats import direction, paired
from escarda_lab.summary import in_family


def sequential_readout(
    summary: pd.DataFrame, runs: pd.DataFrame, plan: dict, alpha: float, margin: float, metric: str
) -> list:
    """`grid.seeds: {min, max, step}`: the family's verdicts from the group-sequential procedure
    (escarda_lab.sequential), in place, with each comparison's `look` (1-based) and the seeds it
    used. A look counts for a comparison only once all its seeds finished. Returns the decisions
    (empty for a fixed-seed grid); an undecided one ("" verdict) is what the next look trains."""
    seq = plan.get("sequential")
    if not seq:
        return []
    looks = looks_of(seq["min"], seq["max"], seq["step"])
    family = summary[in_family(summary)]
    ok = runs[runs.status == "finished"]
    p_diff = np.full((len(looks), len(family)), math.nan)
    p_equiv = p_diff.copy()
    for j, r in enumerate(family.itertuples()):
        mine = ok[ok.variant == r.variant].set_index("seed")[metric]
        base = ok[ok.variant == r.baseline].set_index("seed")[metric]
        for k, n in enumerate(looks):
            d = (mine.reindex(plan["seeds"][:n]) - base.reindex(plan["seeds"][:n])).dropna()
            if len(d) == n:
                st = paired(d.to_numpy(), alpha, margin, only=("p_paired", "tost"))
                p_diff[k, j], p_equiv[k, j] = st["p_paired"], st["p_tost"]
    decisions = decide(p_diff, p_equiv, looks, alpha, seq.get("spending", DEFAULT_SPENDING))
    higher = METRICS[metric].higher_is_better
    summary["look"] = math.nan
    for (idx, r), dec in zip(family.iterrows(), decisions):
        word = {"difference": direction(r["kind"], r["delta"], higher), "equivalent": f"equivalent (±{margin:g})"}
        summary.loc[idx, "verdict"] = word.get(dec.verdict, "inconclusive")
        summary.loc[idx, "look"] = dec.look + 1 if dec.verdict else math.nan
    return decisions
