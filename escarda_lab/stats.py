"""Paired statistics, multiplicity, power and verdicts: numpy and scipy only.

A comparison is the per-seed difference d_k = metric(variant, k) - metric(baseline, k) over the
seeds both finished (seed k gives both arms the same batches and the same initial value for every
weight they share). `paired(d)` computes every registered statistic of d. A statistic is one entry:

    @statistic("t_interval", columns=("ci_low", "ci_high"), label="95% CI (t)", table="main")
    def t_interval(d, alpha, margin) -> dict: ...

and appears in summary.csv (its columns) and in summary.md (its label, in the main table or the
one below it) without further edits.

**The family.** A grid's hypotheses are its variants (one per reading; controls are not in it).
Holm's step-down procedure is applied twice over the family: to the paired t-test p-values for
*helps*/*hurts* and to the TOST p-values for *equivalent*; each keeps its family-wise error at
alpha (Holm 1979). Power and the minimum detectable effect are prospective: computed from the
pooled sd of the paired differences at the thresholds Holm actually applies (alpha/m for the
first-ranked comparison, alpha for the last), for a stated target effect, never from a variant's
observed difference (Hoenig & Heisey 2001 on post-hoc power).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

POWER = 0.8
BOOTSTRAP_MIN_N = 10  # below this the bootstrap's coverage is well under nominal: no column


# ------------------------------------------------------------------------------- the statistics


@dataclass(frozen=True)
class Statistic:
    name: str
    compute: Callable[[np.ndarray, float, float], dict[str, float]]  # (d, alpha, margin) -> columns
    columns: tuple[str, ...]
    label: str  # summary.md header; a two-column statistic is shown as an interval
    table: str  # "main" (the verdict table) or "more" (the table below it)
    fmt: str = ".3g"  # format of a one-column statistic


STATISTICS: dict[str, Statistic] = {}


def statistic(name: str, columns: tuple[str, ...], label: str, table: str = "more", fmt: str = ".3g"):
    """Register `compute(d, alpha, margin) -> {column: value}`; it sees at least two pairs."""

    def register(compute):
        STATISTICS[name] = Statistic(name, compute, columns, label, table, fmt)
        return compute

    return register


@statistic("t_interval", ("ci_low", "ci_high"), "95% CI (t)", table="main")
def t_interval(d: np.ndarray, alpha: float, margin: float) -> dict[str, float]:
    """The paired t interval at level 1 - alpha: valid at any n for normal differences."""
    from scipy import stats

    n, mean, se = len(d), float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
    half = stats.t.ppf(1 - alpha / 2, n - 1) * se
    return {"ci_low": mean - half, "ci_high": mean + half}


@statistic("p_paired", ("p_paired",), "p", table="main")
def paired_t(d: np.ndarray, alpha: float, margin: float) -> dict[str, float]:
    """Two-sided paired t-test of mean 0."""
    from scipy import stats

    if degenerate(d):
        return {"p_paired": 1.0 if d.mean() == 0 else 0.0}
    return {"p_paired": float(stats.ttest_1samp(d, 0.0).pvalue)}


@statistic("tost", ("p_tost",), "TOST p (±margin)")
def tost(d: np.ndarray, alpha: float, margin: float) -> dict[str, float]:
    """Two one-sided tests (Schuirmann 1987): the larger p of H0: mean <= -margin and mean >= +margin."""
    from scipy import stats

    n, mean = len(d), float(d.mean())
    if degenerate(d):
        return {"p_tost": 0.0 if abs(mean) < margin else 1.0}
    se = float(d.std(ddof=1)) / math.sqrt(n)
    lower = stats.t.sf((mean + margin) / se, n - 1)
    upper = stats.t.cdf((mean - margin) / se, n - 1)
    return {"p_tost": float(max(lower, upper))}


@statistic("wilcoxon", ("p_wilcoxon",), "Wilcoxon p")
def wilcoxon(d: np.ndarray, alpha: float, margin: float) -> dict[str, float]:
    """Wilcoxon's signed-rank p (six or more pairs, not all zero): a check on the t-test's normality."""
    from scipy import stats

    ok = len(d) >= 6 and np.any(d != 0)
    return {"p_wilcoxon": float(stats.wilcoxon(d).pvalue) if ok else math.nan}


@statistic("bootstrap", ("boot_low", "boot_high"), f"BCa bootstrap 95% CI (n ≥ {BOOTSTRAP_MIN_N})")
def bca_interval(d: np.ndarray, alpha: float, margin: float) -> dict[str, float]:
    """Bias-corrected and accelerated bootstrap interval (Efron 1987), only at n >= BOOTSTRAP_MIN_N:
    a percentile bootstrap over 8 seeds covers ~85-90% instead of 95% (too narrow)."""
    from scipy import stats

    if len(d) < BOOTSTRAP_MIN_N or degenerate(d):
        return {"boot_low": math.nan, "boot_high": math.nan}
    res = stats.bootstrap(
        (d,), np.mean, confidence_level=1 - alpha, n_resamples=10_000, method="BCa", rng=np.random.default_rng(0)
    )
    return {"boot_low": float(res.confidence_interval.low), "boot_high": float(res.confidence_interval.high)}


def degenerate(d: np.ndarray) -> bool:
    """Every seed moved by the same amount: no spread to test against."""
    return float(d.std(ddof=1)) <= 1e-12 * max(1.0, abs(float(d.mean())))


VERDICT_STATISTICS = ("t_interval", "p_paired", "tost")  # what `verdict` reads


def paired(d: np.ndarray, alpha: float = 0.05, margin: float = 0.01, only: tuple[str, ...] | None = None) -> dict:
    """Every registered statistic (or those named in `only`) of the paired differences d
    (variant - baseline, one per seed)."""
    d = np.asarray(d, float)
    n = len(d)
    chosen = [st for name, st in STATISTICS.items() if only is None or name in only]
    out = {"n_pairs": n, "delta": float(d.mean()) if n else math.nan, "sd_diff": math.nan}
    for st in chosen:
        out.update(dict.fromkeys(st.columns, math.nan))
    if n < 2:
        return out
    out["sd_diff"] = float(d.std(ddof=1))
    for st in chosen:
        out.update(st.compute(d, alpha, margin))
    return out


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Welch t-test p-value (unpaired); NaN with fewer than two values on either side."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.var(a) == 0 and np.var(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mean_stderr(xs: list[float]) -> float:
    """lm-eval's standard error of a mean: sample std (n - 1) / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return math.nan
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


# ------------------------------------------------------------------------------- multiplicity


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


def verdict(kind: str, st: dict, alpha: float, margin: float, higher_is_better: bool = False) -> str:
    """The reading of one comparison's statistics `st` for the change it makes. `st` carries
    `p_holm` and `p_tost_holm`, the family-adjusted p-values (a control: adjusted as the strictest
    member of the family would be)."""
    n = int(st["n_pairs"])
    if n < 2:
        return f"no test ({n} finished pair{'s' if n != 1 else ''})"
    equivalent = st["p_tost_holm"] < alpha
    significant = st["p_holm"] < alpha and (st["ci_low"] > 0 or st["ci_high"] < 0)
    if equivalent:  # also when a real difference is smaller than the margin
        return f"equivalent (±{margin:g})"
    if significant:
        return direction(kind, st["delta"], higher_is_better)
    return "inconclusive"


def direction(kind: str, delta: float, higher_is_better: bool = False) -> str:
    """ "helps" or "hurts": what a significant difference `delta` (variant - baseline) says of the change."""
    worse = delta < 0 if higher_is_better else delta > 0  # e.g. higher bpb than the baseline
    if kind == "removed":  # removing something made it worse: that something helps
        return "helps" if worse else "hurts"
    return "hurts" if worse else "helps"


# ------------------------------------------------------------------------------------- power


def mde(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest mean difference a two-sided paired t-test at level `alpha` detects with `power`,
    for differences of standard deviation `sd` over n pairs: the d solving
    P(|T| > t_{1-alpha/2, n-1}) = power, T noncentral t with n-1 df and noncentrality d sqrt(n)/sd."""
    from scipy import optimize

    if n < 2 or not (math.isfinite(sd) and sd > 0):
        return math.nan
    hi = sd
    while t_power(hi, sd, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda x: t_power(x, sd, n, alpha) - power, 0.0, hi))


def t_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level alpha against a true mean difference `effect`."""
    from scipy import stats

    df, nc = n - 1, effect * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    p = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    return float(p) if math.isfinite(p) else 1.0  # scipy's nct overflows only far into the tail


def tost_power(margin: float, sd: float, n: int, alpha: float, effect: float = 0.0) -> float:
    """Power of TOST at level alpha to show equivalence within ±margin when the true difference is
    `effect` (|effect| < margin): P(T_lower > t_{1-alpha} and T_upper < -t_{1-alpha}), computed
    with the noncentral t for each side (Chow & Liu's approximation, exact as n grows)."""
    from scipy import stats

    df, se = n - 1, sd / math.sqrt(n)
    crit = stats.t.ppf(1 - alpha, df)
    fail_lower = stats.nct.cdf(crit, df, (effect + margin) / se)  # cannot reject mean <= -margin
    fail_upper = stats.nct.sf(-crit, df, (effect - margin) / se)  # cannot reject mean >= +margin
    fails = [f if math.isfinite(f) else 0.0 for f in (fail_lower, fail_upper)]  # overflow: far in the tail
    return float(max(0.0, 1 - sum(fails)))


def seeds_needed(sd: float, effect: float, alpha: float = 0.05, power: float = POWER, most: int = 100_000) -> int:
    """Fewest pairs for which the paired t-test at `alpha` detects `effect` with `power`; -1 if
    sd or effect is unusable."""
    if not (math.isfinite(sd) and sd > 0 and effect > 0):
        return -1
    return smallest_n(lambda n: t_power(effect, sd, n, alpha) >= power, most)


def seeds_needed_tost(sd: float, margin: float, alpha: float = 0.05, power: float = POWER, most: int = 100_000) -> int:
    """Fewest pairs for which TOST at `alpha` shows equivalence within ±margin with `power` when
    the true difference is 0."""
    if not (math.isfinite(sd) and sd > 0 and margin > 0):
        return -1
    return smallest_n(lambda n: tost_power(margin, sd, n, alpha) >= power, most)


def smallest_n(ok: Callable[[int], bool], most: int) -> int:
    """The smallest n >= 2 with ok(n), for ok monotone in n (doubling, then bisection); `most` if none."""
    hi = 2
    while not ok(hi):
        if hi >= most:
            return most
        hi = min(2 * hi, most)
    lo = max(2, hi // 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


@dataclass(frozen=True)
class Plan:
    """What a grid of `family` comparisons can decide with `n` pairs at noise `sd` (prospective)."""

    sd: float
    n: int
    family: int
    alpha: float
    target: float  # the difference the grid is meant to detect
    margin: float  # the equivalence margin

    @property
    def first_alpha(self) -> float:  # Holm's first (strictest) step
        return self.alpha / max(self.family, 1)

    def mde(self, alpha: float) -> float:
        return mde(self.sd, self.n, alpha)

    def seeds(self, alpha: float) -> int:
        return seeds_needed(self.sd, self.target, alpha)

    def seeds_equivalence(self, alpha: float) -> int:
        return seeds_needed_tost(self.sd, self.margin, alpha)

    def lines(self, unit: str) -> list[str]:
        """The plan in words: MDE now, and the seeds the target needs, at both ends of Holm."""
        a1, a = self.first_alpha, self.alpha
        out = [
            f"Pooled sd of the paired differences **{self.sd:.4f} {unit}** over {self.n} pairs; family of "
            f"{self.family} comparisons, alpha {a:g}, {POWER:.0%} power.",
            f"- Minimum detectable effect with {self.n} pairs: **{self.mde(a1):.4f} {unit}** for the first Holm step "
            f"(alpha/{self.family} = {a1:.4g}), {self.mde(a):.4f} for the last (alpha {a:g}).",
            f"- To detect a difference of {self.target:g} {unit}: {self.seeds(a1)} pairs at the first step, "
            f"{self.seeds(a)} at the last.",
            f"- To show equivalence within ±{self.margin:g} {unit} when there is no difference: "
            f"{self.seeds_equivalence(a1)} pairs at the first step, {self.seeds_equivalence(a)} at the last.",
        ]
        return out
