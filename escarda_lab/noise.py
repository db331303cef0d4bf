"""Where a grid's noise comes from: per variant, seed, checkpoint and evaluation noise against the
noise of its paired differences, and the grid's signal-to-noise ratio."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from escarda_lab.summary import OUTSIDE_FAMILY

NOISE_SOURCES = {"metric_std": "seed", "ckpt_sd": "checkpoint", "eval_se": "evaluation"}


def noise_budget(summary: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per variant, where the noise of its verdict metric comes from: seed-to-seed sd, the
    checkpoint-to-checkpoint sd over its final scores (train.average_last > 1), the evaluation's
    own standard error (over validation batches), the sd of the paired differences and the pair
    correlation; and the grid's signal-to-noise ratio (Heineman et al. 2025): the sd of the
    variant means over the median seed sd."""
    rows = []
    for r in summary.to_dict("records"):
        sources = {name: r.get(col, math.nan) for col, name in NOISE_SOURCES.items()}
        # the evaluation noise a comparison sees is the paired one (both arms score the same
        # batches); the unpaired SE is shown but not weighed
        weigh = {"seed": sources["seed"], "checkpoint": sources["checkpoint"], "evaluation": r.get("eval_se_paired")}
        known = {k: v for k, v in weigh.items() if isinstance(v, float) and math.isfinite(v)}
        rows.append(
            {
                "variant": r["variant"],
                "seeds": r["seeds"],
                **{f"{name} sd": sources[name] for name in sources},
                "paired eval SE": r.get("eval_se_paired", math.nan),
                "sd_diff": r.get("sd_diff", math.nan),
                "pair_r": r.get("pair_r", math.nan),
                "largest": max(known, key=known.get) if known else "",
            }
        )
    table = pd.DataFrame(rows)
    tested = summary[~summary.kind.astype(str).str.startswith(OUTSIDE_FAMILY)]
    spread = float(np.std(tested.metric_mean.dropna(), ddof=1)) if tested.metric_mean.notna().sum() > 1 else math.nan
    noise = float(np.nanmedian(summary.metric_std)) if summary.metric_std.notna().any() else math.nan
    return table, spread / noise if noise and math.isfinite(noise) else math.nan
