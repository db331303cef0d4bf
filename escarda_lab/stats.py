"""Paired statistics and verdicts, numpy and scipy only: the numbers behind every comparison.

A comparison is the per-seed difference d_k = metric(variant, k) - metric(baseline, k) over the
seeds both finished (seed k gives both arms the same batches and the same initial value for every
weight they share). `paired(d)` gives its mean, t interval, percentile bootstrap, paired t and
Wilcoxon p, TOST against ±margin and the minimum detectable effect; `holm` adjusts p-values across
a grid's comparisons; `verdict` reads them for the change a variant makes.
"""

from __future__ import annotations

import math

import numpy as np


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value; NaN with fewer than two values on either side."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.var(a) == 0 and np.var(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


POWER = 0.8


def mde(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest mean difference a two-sided paired t-test at `alpha` detects with `power`, for
    differences of standard deviation `sd` over n pairs: (t_{1-a/2} + t_{power}) sd / sqrt(n)."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def seeds_needed(sd: float, effect: float, alpha: float = 0.05, power: float = POWER, most: int = 10_000) -> int:
    """Pairs needed for `mde` to reach `effect` (at least 2)."""
    if not (math.isfinite(sd) and effect > 0):
        return -1
    n = 2
    while n < most and mde(sd, n, alpha, power) > effect:
        n = n * 2 if mde(sd, n * 2, alpha, power) > effect else n + 1
    return n


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(pvalues, float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired(d: np.ndarray, alpha: float = 0.05, margin: float = 0.01, boot: int = 10_000) -> dict:
    """Statistics of paired differences d (variant - baseline, one per seed)."""
    from scipy import stats

    d = np.asarray(d, float)
    n = len(d)
    out = {
        "n_pairs": n,
        "delta": float(d.mean()) if n else math.nan,
        "sd_diff": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "boot_low": math.nan,
        "boot_high": math.nan,
        "p_paired": math.nan,
        "p_wilcoxon": math.nan,
        "p_tost": math.nan,
        "mde": math.nan,
    }
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    mean = float(d.mean())
    tcrit = stats.t.ppf(1 - alpha / 2, n - 1)
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, n, (boot, n))].mean(axis=1)
    out.update(
        sd_diff=sd,
        ci_low=mean - tcrit * se,
        ci_high=mean + tcrit * se,
        boot_low=float(np.quantile(means, alpha / 2)),
        boot_high=float(np.quantile(means, 1 - alpha / 2)),
        mde=mde(sd, n, alpha),
    )
    if sd <= 1e-12 * max(1.0, abs(mean)):  # every seed moved by the same amount
        out.update(p_paired=1.0 if mean == 0 else 0.0, p_tost=0.0 if abs(mean) < margin else 1.0)
    else:
        out["p_paired"] = float(stats.ttest_1samp(d, 0.0).pvalue)
        lower = stats.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
        upper = stats.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
        out["p_tost"] = float(max(lower, upper))
    if n >= 6 and np.any(d != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def verdict(kind: str, st: dict, alpha: float, margin: float, higher_is_better: bool = False) -> str:
    """The reading of one variant's paired statistics `st` (with `p_holm`) for the change it makes."""
    n = int(st["n_pairs"])
    if n < 2:
        return f"no test ({n} finished pair{'s' if n != 1 else ''})"
    significant = st["p_holm"] < alpha and (st["ci_low"] > 0 or st["ci_high"] < 0)
    if significant and st["p_tost"] < alpha:  # a real but smaller-than-margin difference
        return f"equivalent (±{margin:g})"
    if significant:
        worse = st["delta"] < 0 if higher_is_better else st["delta"] > 0  # e.g. higher bpb than the baseline
        if kind == "removed":  # removing something made it worse: that something helps
            return "helps" if worse else "hurts"
        return "hurts" if worse else "helps"
    if st["p_tost"] < alpha:
        return f"equivalent (±{margin:g})"
    need = seeds_needed(st["sd_diff"], max(abs(st["delta"]), margin), alpha)
    return f"inconclusive (~{need} seeds)" if need > 0 else "inconclusive"
