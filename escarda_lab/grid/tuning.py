"""Tuning: the score a tuning run is judged by and the value each variant keeps."""

from __future__ import annotations

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
    """{variant: {"value": best, "scores": {value: mean tune_score or None}}} from finished
    tuning runs; a value with a diverged or failed tuning seed scores None (never chosen)."""
    out: dict[str, dict] = {}
    for r in runs:
        value = config.flatten(r.cfg)[g.tune.key]
        m = read_json(r.folder / "metrics.json") or {}
        entry = out.setdefault(r.variant.name, {"key": g.tune.key, "scores": {}, "losses": {}})
        entry["losses"].setdefault(str(value), []).append(
            tune_score(r.cfg, m) if m.get("status") == "finished" else None
        )
    for name, entry in out.items():
        for value, losses in entry["losses"].items():
            entry["scores"][value] = None if None in losses else sum(losses) / len(losses)
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
