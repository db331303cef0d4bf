"""Compute multipliers: how much baseline compute a variant is worth.

A grid with `ladder:` trains the baseline at several budgets (rungs: token multiples and/or model
sizes). The baseline's loss is fitted against training FLOPs C (summed over the run: measured
FLOPs/token × tokens):

    2-3 rungs   L(C) = a − b · log C                 (log-linear)
    ≥ 4 rungs   L(C) = E + A · C^(−α)                (saturating power law, Kaplan/Hoffmann form;
                                                      E ≥ 0, and the line when α collapses < 0.01)

A variant that reaches loss L_v with C_v FLOPs has compute multiplier  m = C*(L_v) / C_v, where
C* = L⁻¹ is the baseline compute needed for that loss (m > 1: the change is worth more compute
than it costs; the arXiv 2409.19606 "1.8× faster" claim reads m = 1.8).

Seeds are paired (seed k: same data and initial weights at every rung and in every variant), so
the interval is a paired t interval carried through the fit: each seed's own rungs are fitted, its
variant run is read on that curve (m_k), and the t interval of mean log m_k over seeds is mapped
back. The estimate is the geometric mean of the m_k. With 3 seeds (t at 2 degrees of freedom) the
intervals are wide, as they must be; a bootstrap over so few seeds (10 distinct resamples of 3)
would be far narrower than its nominal 95%. A loss outside the ladder's range gives a bound
(">" / "<"), never an extrapolated number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Fit:
    kind: str  # "loglinear" | "power"
    params: tuple[float, ...]
    c_min: float
    c_max: float

    def loss(self, c):
        c = np.asarray(c, float)
        if self.kind == "loglinear":
            a, b = self.params
            return a - b * np.log(c)
        E, A, alpha = self.params
        return E + A * c ** (-alpha)

    def compute_for(self, loss: float) -> float:
        """C with L(C) = loss (inf when the fit never reaches it)."""
        if self.kind == "loglinear":
            a, b = self.params
            return math.exp((a - loss) / b) if b > 0 else math.inf
        E, A, alpha = self.params
        if loss <= E or A <= 0 or alpha <= 0:
            return math.inf
        return ((loss - E) / A) ** (-1 / alpha)


def fit(compute, loss) -> Fit:
    """The baseline's loss-vs-compute curve from its points (one per rung and seed)."""
    c, y = np.asarray(compute, float), np.asarray(loss, float)
    ok = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[ok], y[ok]
    rungs = len(np.unique(np.round(np.log(c), 6)))
    if rungs < 2:
        raise ValueError("a ladder needs at least two budgets of the baseline")
    slope, intercept = np.polyfit(np.log(c), y, 1)
    line = Fit("loglinear", (float(intercept), float(-slope)), float(c.min()), float(c.max()))
    if rungs < 4:
        return line
    from scipy.optimize import curve_fit

    c0 = float(np.exp(np.log(c).mean()))  # fit in units of the geometric-mean compute
    f = lambda x, E, A, alpha: E + A * (x / c0) ** (-alpha)
    try:
        (E, A, alpha), _ = curve_fit(
            f,
            c,
            y,
            p0=(max(float(y.min()) - 0.1, 0.0), 0.2, 0.3),
            bounds=([0.0, 0, 1e-4], [float(y.min()), np.inf, 5]),  # a loss is never below 0
            maxfev=20000,
        )
    except (RuntimeError, ValueError):
        return line
    if alpha < 0.01:  # the power law degenerates into the log-linear limit: say so, use the line
        return line
    return Fit("power", (float(E), float(A) * c0 ** float(alpha), float(alpha)), float(c.min()), float(c.max()))


def multiplier(f: Fit, loss: float, compute: float) -> tuple[float, str]:
    """(m, relation): relation "=" inside the ladder, ">" or "<" a bound at the ladder's edge."""
    needed = f.compute_for(loss)
    if needed > f.c_max:
        return f.c_max / compute, ">"
    if needed < f.c_min:
        return f.c_min / compute, "<"
    return needed / compute, "="


def per_seed(base_points: dict, variant: dict) -> list[float]:
    """log m_k for each seed with both a fit of its own rungs and a variant run."""
    out = []
    for k in sorted(set(base_points) & set(variant)):
        try:
            f = fit([c for c, _ in base_points[k]], [y for _, y in base_points[k]])
        except ValueError:
            continue
        m, _ = multiplier(f, variant[k][1], variant[k][0])
        out.append(math.log(m))
    return out


def t_interval(logs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, low, high) of exp(log m) by the t interval over seeds; NaNs below 2 seeds."""
    from scipy import stats

    if len(logs) < 2:
        return (math.exp(logs[0]) if logs else math.nan), math.nan, math.nan
    x = np.asarray(logs)
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return math.exp(x.mean()), math.exp(x.mean() - half), math.exp(x.mean() + half)


def seeds_for_precision(logs: list[float], within: float = 0.10, level: float = 0.95) -> int:
    """Seeds for the multiplier's interval to reach ±`within` (relative), at the spread of log m_k
    seen here: the smallest n with t_{n-1} sd / sqrt(n) <= log(1 + within)."""
    from scipy import stats

    if len(logs) < 2:
        return -1
    sd = float(np.std(logs, ddof=1))
    n = 2
    while n < 100_000 and stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) > math.log1p(within):
        n += 1
    return n


def seed_points(points, metric: str) -> dict:
    """The baseline's rungs as {seed: [(compute, loss), ...]}."""
    out: dict = {}
    for r in points.itertuples():
        out.setdefault(r.seed, []).append((r.compute, getattr(r, metric)))
    return out


def fit_band(base_points: dict, xs, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The baseline fit's band at compute xs: the t interval, over seeds, of each seed's own fitted
    curve (NaNs below two seeds)."""
    from scipy import stats

    xs = np.asarray(xs, float)
    curves = []
    for pts in base_points.values():
        try:
            curves.append(fit([c for c, _ in pts], [y for _, y in pts]).loss(xs))
        except ValueError:
            continue
    if len(curves) < 2:
        return np.full_like(xs, np.nan), np.full_like(xs, np.nan)
    y = np.asarray(curves)
    half = stats.t.ppf(0.5 + level / 2, len(y) - 1) * y.std(axis=0, ddof=1) / math.sqrt(len(y))
    return y.mean(axis=0) - half, y.mean(axis=0) + half


def table(runs, plan: dict, metric: str = "val_bpb"):
    """One row per non-rung variant: its FLOPs, loss, multiplier (with relation) and 95% CI; and
    the baseline's fit. `runs` is summary.load_runs's frame, with `train_tokens`."""
    import pandas as pd

    info = {v["name"]: v for v in plan["variants"]}
    ok = runs[(runs.status == "finished") & runs[metric].notna()].copy()
    ok["compute"] = ok.flops_per_token * ok.train_tokens
    base = plan["baseline"]
    rung_names = {n for n, v in info.items() if v.get("rung_of") == base} | {base}
    points = ok[ok.variant.isin(rung_names)]
    base_points = seed_points(points, metric)
    f = fit(points.compute, points[metric])
    rows = []
    for name, g in ok.groupby("variant", sort=False):
        if name in rung_names or info.get(name, {}).get("rung_of"):
            continue
        c_v, y_v = float(g.compute.mean()), float(g[metric].mean())
        pooled, rel = multiplier(f, y_v, c_v)
        logs = per_seed(base_points, {r.seed: (r.compute, getattr(r, metric)) for r in g.itertuples()})
        m, lo, hi = t_interval(logs)
        rows.append(
            {
                "variant": name,
                "compute": c_v,
                metric: y_v,
                "multiplier": pooled if rel != "=" or math.isnan(m) else m,
                "relation": rel,
                "ci_low": lo,
                "ci_high": hi,
                "seeds": len(logs),
                "seeds_for_10pct": seeds_for_precision(logs),
            }
        )
    return pd.DataFrame(rows), f, points


def markdown(mult, f: Fit, metric: str) -> str:
    unit = metric.removeprefix("val_")
    law = (
        f"{unit} = {f.params[0]:.4f} − {f.params[1]:.4f} · ln C"
        if f.kind == "loglinear"
        else f"{unit} = {f.params[0]:.4f} + {f.params[1]:.4g} · C^−{f.params[2]:.3f}"
    )
    lines = [
        "## Compute multipliers",
        "",
        f"The baseline's rungs span {f.c_min:.3g} to {f.c_max:.3g} training FLOPs; fit: {law}. A variant's "
        "multiplier is the baseline compute that reaches its loss divided by its own compute (> 1: worth "
        "more compute than it costs): the geometric mean over seeds of each seed's multiplier on its own fit; "
        "95% CI: the paired t interval of log m over seeds, mapped back (never a bootstrap over so few seeds); "
        "`>`/`<` mark bounds at the ladder's edge (the loss lies outside the baseline's range), never "
        "extrapolations. Last column: the seeds an interval of ±10% would need at the spread seen here.",
        "",
        "| variant | FLOPs | " + unit + " | multiplier | 95% CI (t) | seeds | seeds for ±10% |",
        "|:--|--:|--:|--:|:--|--:|--:|",
    ]
    for r in mult.itertuples():
        rel = "" if r.relation == "=" else r.relation + " "
        ci = "—" if math.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        need = "—" if r.seeds_for_10pct < 0 else f"{r.seeds_for_10pct}"
        lines.append(
            f"| `{r.variant}` | {r.compute:.3g} | {getattr(r, metric):.4f} | {rel}{r.multiplier:.2f}× | {ci} "
            f"| {r.seeds} | {need} |"
        )
    return "\n".join(lines) + "\n"


def plot(mult, f: Fit, points, path, metric: str = "val_bpb") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from escarda_lab.io import atomic_path

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(points.compute, points[metric], color="0.3", s=16, label="baseline rungs (per seed)", zorder=3)
    xs = np.geomspace(f.c_min / 1.5, f.c_max * 1.5, 100)
    ax.plot(xs, f.loss(xs), color="k", lw=1.2, label=f"baseline fit ({f.kind})")
    lo, hi = fit_band(seed_points(points, metric), xs)
    if np.isfinite(lo).any():
        ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, lw=0, label="fit, 95% band (t over per-seed fits)")
    ax.axvspan(f.c_min, f.c_max, color="0.95", zorder=0)
    cmap = matplotlib.colormaps["tab10"]
    for i, r in enumerate(mult.itertuples()):
        ci = "" if math.isnan(r.ci_low) else f" [{r.ci_low:.2f}, {r.ci_high:.2f}]"
        label = f"{r.variant}: {'' if r.relation == '=' else r.relation}{r.multiplier:.2f}×{ci}"
        ax.scatter([r.compute], [getattr(r, metric)], color=cmap(i % 10), s=40, zorder=4, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("loss against compute: the baseline's ladder and each variant (light: the ladder's range)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
