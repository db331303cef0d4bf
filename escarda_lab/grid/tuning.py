"""Tuning: the score a tuning run is judged by and the value each variant keeps."""

from __future__ import annotations

import math

from escarda_lab import config
from escarda_lab.grid.expand import Run
from escarda_lab.grid.spec import GridConfig
from escarda_lab.io import read_json


def tune_score(cfg, metrics: dict) -> float:
    """What tuning minimises: the final val loss; on a probe task, minus the accuracy (MAD keeps
    the best accuracy of its sweep), ties broken by the loss."""
    from escarda_lab import probes

    if probes.task_of(cfg.data.corpus) is not None:
        return -metrics["val_acc"] + 1e-6 * metrics["val_loss"]
    return metrics["val_loss"]


def pick_tuned(g: GridConfig, runs: list[Run]) -> dict:
    """{variant: {"value": best, "scores": {value: mean tune_score over the tuning seeds or None}}}
    from finished tuning runs; a value with a diverged or failed tuning seed scores None (never
    chosen). The score is what `tune_score` minimises (a loss, or minus an accuracy)."""
    out: dict[str, dict] = {}
    per_seed: dict[str, dict[str, list]] = {}
    for r in runs:
        value = config.flatten(r.cfg)[g.tune.key]
        m = read_json(r.folder / "metrics.json") or {}
        out.setdefault(r.variant.name, {"key": g.tune.key, "scores": {}})
        per_seed.setdefault(r.variant.name, {}).setdefault(str(value), []).append(
            tune_score(r.cfg, m) if m.get("status") == "finished" else None
        )
    for name, entry in out.items():
        for value, scores in per_seed[name].items():
            entry["scores"][value] = None if None in scores else sum(scores) / len(scores)
        ok = {v: x for v, x in entry["scores"].items() if x is not None}
        best = min(ok, key=ok.get) if ok else None
        entry["value"] = (
            None
            if best is None
            else next(
                config.flatten(r.cfg)[g.tune.key]
                for r in runs
                if r.variant.name == name and str(config.flatten(r.cfg)[g.tune.key]) == best
            )
        )
    return out


def beyond_edge(t, tuned: dict) -> dict[str, list]:
    """{variant: [one value past the edge]} for variants whose chosen value is the smallest or
    largest tried: the sweep's own ratio (geometric) or step (arithmetic) once more. A variant
    already extended that way is left alone, so a sweep grows by one step at most."""
    values = sorted(float(v) for v in t.values)
    if len(values) < 2:
        return {}
    geometric = values[0] > 0 and math.isclose(values[1] / values[0], values[-1] / values[-2])
    low = values[0] / (values[1] / values[0]) if geometric else values[0] - (values[1] - values[0])
    high = values[-1] * (values[-1] / values[-2]) if geometric else values[-1] + (values[-1] - values[-2])
    out = {}
    for name, entry in tuned.items():
        chosen = entry.get("value")
        tried = {float(v) for v in entry["scores"]}
        if chosen is None or len(tried) > len(values):
            continue
        if float(chosen) == values[0] and (low > 0 or not geometric):
            out[name] = [type(chosen)(low) if isinstance(chosen, int) and low == int(low) else low]
        elif float(chosen) == values[-1]:
            out[name] = [type(chosen)(high) if isinstance(chosen, int) and high == int(high) else high]
    return out
