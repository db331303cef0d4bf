"""The verdict rules on thousands of synthetic grids with known effects: the family-wise error of
helps/hurts and of equivalent stays at alpha, and power at the stated MDE is the stated 80%.

Each grid: `M` variants, `N` paired seeds, differences d ~ Normal(effect, SD) per variant, read
by the same code a real grid uses (stats.paired, stats.holm per family, stats.verdict).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from escarda_lab import sequential, stats

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


# ------------------------------------------------ the group-sequential design (grid.seeds: {min, max, step})

LOOKS = sequential.looks_of(4, 12, 2)  # 4, 6, 8, 10, 12 seeds
SEQ_GRIDS = 1000
SEQ_MC_SE = math.sqrt(ALPHA * (1 - ALPHA) / SEQ_GRIDS)


def sequential_grids(effects: list[float], seed: int, margin: float = MARGIN) -> list[list[sequential.Decision]]:
    """SEQ_GRIDS synthetic grids read by the sequential procedure: p-values at every look from the
    first n seeds of each comparison (a decided comparison's later p-values are ignored by `decide`)."""
    from scipy import stats as st

    rng = np.random.default_rng(seed)
    d = rng.normal(np.asarray(effects)[None, :, None], SD, (SEQ_GRIDS, len(effects), LOOKS[-1]))
    p_diff, p_equiv = [], []
    for n in LOOKS:
        x = d[..., :n]
        mean, se = x.mean(-1), x.std(-1, ddof=1) / math.sqrt(n)
        p_diff.append(2 * st.t.sf(np.abs(mean / se), n - 1))
        p_equiv.append(np.maximum(st.t.sf((mean + margin) / se, n - 1), st.t.cdf((mean - margin) / se, n - 1)))
    p_diff, p_equiv = np.stack(p_diff, 1), np.stack(p_equiv, 1)  # [grids, looks, m]
    return [sequential.decide(p_diff[g], p_equiv[g], LOOKS, ALPHA) for g in range(SEQ_GRIDS)]


def test_spending_boundaries_match_the_published_obrien_fleming_values():
    """Lan-DeMets O'Brien-Fleming spending, one-sided 0.025, four equally spaced looks
    (Jennison & Turnbull 2000, Table 7.6): 4.333, 2.963, 2.359, 2.014."""
    c = sequential.boundaries(0.025, (0.25, 0.5, 0.75, 1.0), "obrien_fleming")
    assert c == pytest.approx((4.333, 2.963, 2.359, 2.014), abs=2e-3)


def test_sequential_seeds_keep_the_family_wise_error_of_helps_or_hurts_at_alpha():
    grids = sequential_grids([0.0] * M, seed=11)
    fwer = np.mean([any(x.verdict == "difference" for x in g) for g in grids])
    seeds = np.mean([x.n for g in grids for x in g])
    print(
        f"\nsequential {LOOKS}: family-wise false helps/hurts over {SEQ_GRIDS} null grids {fwer:.3f} "
        f"(alpha {ALPHA}); expected seeds per comparison at zero effect {seeds:.2f}"
    )
    assert fwer <= ALPHA + 3 * SEQ_MC_SE


def test_sequential_seeds_keep_the_family_wise_error_of_equivalent_at_alpha():
    margin = 0.1  # as above: every true difference on ±margin, the least favourable case
    grids = sequential_grids([margin if i % 2 else -margin for i in range(M)], seed=12, margin=margin)
    fwer = np.mean([any(x.verdict == "equivalent" for x in g) for g in grids])
    print(f"\nsequential {LOOKS}: family-wise false equivalent at ±margin {fwer:.3f} (alpha {ALPHA})")
    assert fwer <= ALPHA + 3 * SEQ_MC_SE


def test_large_effects_stop_early_and_spend_few_seeds():
    grids = sequential_grids([4 * SD] + [0.0] * (M - 1), seed=13)
    big = np.mean([g[0].n for g in grids])
    found = np.mean([g[0].verdict == "difference" for g in grids])
    print(f"\nsequential {LOOKS}: an effect of 4 sd is found {found:.3f} of the time, after {big:.2f} seeds on average")
    assert found > 0.99 and big <= 6
