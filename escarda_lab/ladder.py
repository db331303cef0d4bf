"""Compute multipliers: how much baseline compute a variant is worth.

A grid with `ladder:` trains the baseline at several budgets (rungs: token multiples and/or model
sizes). The baseline's loss is fitted against training FLOPs C (summed over the run: measured
FLOPs/token × tokens):

    2-3 rungs   L(C) = a − b · log C                 (log-linear)
    ≥ 4 rungs   L(C) = E + A · C^(−α)                (saturating power law, Kaplan/Hoffmann form;
                                                      E ≥ 0, and the line when α collapses < 0.01)

A variant that reaches loss L_v with C_v FLOPs has compute multiplier  m = C*(L_v) / C_v, where
C* = L⁻¹ is the baseline compute needed for that loss (m > 1: the change is worth more compute
than it costs; the arXiv 2409.19606 "1.8× faster" claim reads m = 1.8). The 95% interval comes
from a bootstrap over seeds (seeds resampled jointly for the baseline's rungs and the variant, as
they are paired). A loss outside the ladder's range gives a bound (">" / "<"), never an
extrapolated number.
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


def bootstrap(base_points: dict, variant: dict, n: int = 2000, seed: int = 0) -> tuple[float, float, str]:
    """95% interval of the multiplier, resampling seeds jointly.

    base_points: {seed: [(compute, loss), ...]} (the baseline's rungs); variant: {seed: (compute, loss)}.
    Returns (low, high, relation of the point estimate's side)."""
    seeds = sorted(set(base_points) & set(variant))
    if len(seeds) < 2:
        return math.nan, math.nan, ""
    out = []
    for pick, f in resampled_fits(base_points, seeds, n, seed):
        c_v = float(np.mean([variant[s][0] for s in pick]))
        y_v = float(np.mean([variant[s][1] for s in pick]))
        m, _ = multiplier(f, y_v, c_v)
        out.append(m)
    if not out:
        return math.nan, math.nan, ""
    return float(np.quantile(out, 0.025)), float(np.quantile(out, 0.975)), ""


def resampled_fits(base_points: dict, seeds: list, n: int, seed: int):
    """(seeds drawn, baseline fit on their rungs) for n resamplings of `seeds` with replacement
    (draws whose points cannot be fitted are skipped): the seed bootstrap of the multipliers' CIs
    and of the fit's band."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        pick = rng.choice(seeds, len(seeds), replace=True)
        pts = [p for s in pick for p in base_points[s]]
        try:
            yield pick, fit([c for c, _ in pts], [y for _, y in pts])
        except ValueError:
            continue


def seed_points(points, metric: str) -> dict:
    """The baseline's rungs as {seed: [(compute, loss), ...]}."""
    out: dict = {}
    for r in points.itertuples():
        out.setdefault(r.seed, []).append((r.compute, getattr(r, metric)))
    return out


def fit_band(base_points: dict, xs, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% band of the baseline's fitted loss at compute xs, by the same seed bootstrap as the
    multipliers' intervals (NaNs when fewer than two seeds)."""
    xs = np.asarray(xs, float)
    seeds = sorted(base_points)
    curves = [f.loss(xs) for _, f in resampled_fits(base_points, seeds, n, seed)] if len(seeds) >= 2 else []
    if not curves:
        return np.full_like(xs, np.nan), np.full_like(xs, np.nan)
    return np.quantile(curves, 0.025, axis=0), np.quantile(curves, 0.975, axis=0)


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
        m, rel = multiplier(f, y_v, c_v)
        lo, hi, _ = bootstrap(base_points, {r.seed: (r.compute, getattr(r, metric)) for r in g.itertuples()})
        rows.append(
            {
                "variant": name,
                "compute": c_v,
                metric: y_v,
                "multiplier": m,
                "relation": rel,
                "ci_low": lo,
                "ci_high": hi,
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
        "more compute than it costs); 95% CI by bootstrap over seeds; `>`/`<` mark bounds at the ladder's edge "
        "(the loss lies outside the baseline's range), never extrapolations.",
        "",
        "| variant | FLOPs | " + unit + " | multiplier | 95% CI |",
        "|:--|--:|--:|--:|:--|",
    ]
    for r in mult.itertuples():
        rel = "" if r.relation == "=" else r.relation + " "
        ci = "—" if math.isnan(r.ci_low) else f"[{r.ci_low:.2f}, {r.ci_high:.2f}]"
        lines.append(
            f"| `{r.variant}` | {r.compute:.3g} | {getattr(r, metric):.4f} | {rel}{r.multiplier:.2f}× | {ci} |"
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
        ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, lw=0, label="fit, 95% band (seed bootstrap)")
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
