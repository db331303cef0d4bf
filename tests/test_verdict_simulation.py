"""The verdict rules on thousands of synthetic grids with known effects: the family-wise error of
helps/hurts and of equivalent stays at alpha, and power at the stated MDE is the stated 80%.

Each grid: `M` variants, `N` paired seeds, differences d ~ Normal(effect, SD) per variant, read
by the same code a real grid uses (stats.paired, stats.holm per family, stats.verdict).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from escarda_lab import stats

M, N, SD, ALPHA, MARGIN = 9, 8, 0.05, 0.05, 0.02
GRIDS = 800
MC_SE = math.sqrt(ALPHA * (1 - ALPHA) / GRIDS)


def verdicts(effects: list[float], rng: np.random.Generator, margin: float = MARGIN) -> list[str]:
    rows = [stats.paired(rng.normal(e, SD, N), ALPHA, margin, only=stats.VERDICT_STATISTICS) for e in effects]
    for col, adj in [("p_paired", "p_holm"), ("p_tost", "p_tost_holm")]:
        for r, p in zip(rows, stats.holm([r[col] for r in rows])):
            r[adj] = p
    return [stats.verdict("changed", r, ALPHA, margin) for r in rows]


def rate(effects: list[float], hit, seed: int, margin: float = MARGIN) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([any(hit(v) for v in verdicts(effects, rng, margin)) for _ in range(GRIDS)]))


def test_no_effect_anywhere_reads_helps_or_hurts_at_most_alpha_of_the_time():
    fwer = rate([0.0] * M, lambda v: v in ("helps", "hurts"), seed=1)
    print(f"\nfamily-wise false helps/hurts over {GRIDS} null grids: {fwer:.3f} (alpha {ALPHA})")
    assert fwer <= ALPHA + 3 * MC_SE


def test_effects_at_the_margin_read_equivalent_at_most_alpha_of_the_time():
    """The least favourable case for a false "equivalent": every true difference sits on ±margin,
    with a margin wide enough (5.7 standard errors) that the test on the other side always passes."""
    margin = 0.1
    effects = [margin if i % 2 else -margin for i in range(M)]
    fwer = rate(effects, lambda v: v.startswith("equivalent"), seed=2, margin=margin)
    print(f"\nfamily-wise false equivalent over {GRIDS} grids at ±margin: {fwer:.3f} (alpha {ALPHA})")
    assert fwer <= ALPHA + 3 * MC_SE


def test_power_at_the_holm_aware_mde_is_eighty_percent():
    """One real effect of the MDE at Holm's first step among M - 1 nulls is found 80% of the time."""
    effect = stats.mde(SD, N, ALPHA / M)
    rng = np.random.default_rng(3)
    found = np.mean([verdicts([effect] + [0.0] * (M - 1), rng)[0] == "hurts" for _ in range(GRIDS)])
    print(f"\npower at the MDE {effect:.4f} (first Holm step): {found:.3f} over {GRIDS} grids")
    assert found == pytest.approx(stats.POWER, abs=0.05)
