"""The grid's records: the plan table printed before training, each run's folder (config.yaml,
grid_run.json), its line in results.jsonl and the plan `compare` reads (grid.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from escarda_lab import config, suites
from escarda_lab.errors import UserError
from escarda_lab.grid.expand import Run
from escarda_lab.grid.matching import total_params
from escarda_lab.grid.spec import GridConfig
from escarda_lab.io import atomic_write, read_json, write_json
from escarda_lab.records import RECORDED
from escarda_lab.run_folder import check_same_config


def plan_table(runs: list[Run], grid_dir: Path, title: str = "") -> str:
    base = {r.variant.name: total_params(r.cfg) for r in runs if r.variant.name == r.variant.baseline}
    rows = []
    for r in runs:
        n = total_params(r.cfg)
        b = base.get(r.variant.baseline, n)
        adj = "; ".join(f"{k} {old}->{new}" for k, (old, new) in r.adjust.items())
        rows.append(
            {
                "run": r.cfg.name,
                "seed": r.seed,
                "params": f"{n:,}",
                "vs base": f"{100 * (n - b) / b:+.2f}%",
                "status": (read_json(r.folder / "metrics.json") or {}).get("status", "new"),
                "what differs": r.variant.change + (f" [{adj}]" if adj else ""),
            }
        )
    lines = pd.DataFrame(rows).to_string(index=False, justify="left").splitlines()
    return f"grid {grid_dir}: {len(runs)} runs{': ' + title if title else ''}\n" + "\n".join(lines)


def last_error(folder: Path) -> str:
    try:
        lines = [ln for ln in (folder / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errs = [ln for ln in lines if ln.startswith("escarda_lab:") or "Error" in ln]
    return (errs or lines or [""])[-1][:500]


def record(r: Run, grid_dir: Path, outcome: dict) -> dict:
    m = read_json(r.folder / "metrics.json") or {}
    status = m.get("status", "failed")
    rc = outcome.get("returncode", 0)
    if status == "running" and "skipped" not in outcome:  # the process ended without finishing
        status = "failed"
    rec = {
        "variant": r.variant.name,
        "run": r.cfg.name,
        "seed": r.seed,
        "baseline": r.variant.baseline,
        "change": r.variant.change,
        "kind": r.variant.kind,
        "folder": str(r.folder.relative_to(grid_dir)),
        "status": status,
        "adjust": r.adjust,
        **outcome,
    }
    if status != "finished" and "is being trained by another process" in last_error(r.folder):
        rec["status"] = status = "held"  # another grid (or run) holds the folder: not a failure
        rec["error"] = last_error(r.folder)
    elif status != "finished":
        rec["error"] = m.get("error") or last_error(r.folder) or f"exit code {rc}"
        if rc is not None and rc < 0:
            rec["error"] = f"killed by signal {-rc}; rerun the grid to resume. Last output: {rec['error']}"
    elif rc not in (0, None):  # trained, but the evaluation after it failed (see log.txt)
        rec["eval_error"] = last_error(r.folder)
    rec.update({k: m[k] for k in RECORDED if k in m})
    rec.update(suites.columns(read_json(r.folder / "eval.json") or {}))
    return rec


def write_plan(g: GridConfig, runs: list[Run], grid_dir: Path, source: str, tuned: dict | None = None) -> None:
    seen: dict[str, dict] = {}
    for r in runs:
        v = r.variant
        seen.setdefault(
            v.name,
            {
                "name": v.name,
                "change": v.change,
                "kind": v.kind,
                "baseline": v.baseline,
                "overrides": v.overrides,
                "axes": v.axes,
                "adjust": r.adjust,
                "seed_offset": v.seed_offset,
                "tune_as": v.tune_as or v.name,
                "family": v.family or v.name,
                "setting": v.setting,
                "rung_of": v.rung_of,
                "twin_of": v.twin_of,
                "reading": "same recipe" if v.twin_of else "own best",
                "max_steps": r.cfg.train.max_steps,
            },
        )
    write_json(
        grid_dir / "grid.json",
        {
            "source": source,
            "baseline": g.baseline,
            "seeds": g.seeds,
            "match": g.match,
            "margin": g.margin,
            "metric": g.metric or metric_of(runs),
            "sequential": None if g.sequential is None else vars(g.sequential),
            "settings": g.settings,
            "controls": g.controls,
            "calibration": None if g.calibration is None else vars(g.calibration),
            "target_effect": g.target_effect,
            "tune": None if g.tune is None else vars(g.tune),
            "tuned": tuned or {},
            "variants": list(seen.values()),
        },
    )


def metric_of(runs: list[Run]) -> str:
    """What `compare` tests: accuracy when every run is a probe task, else bits per byte."""
    from escarda_lab import probes

    probe = [probes.task_of(r.cfg.data.corpus) is not None for r in runs]
    return "val_acc" if probe and all(probe) else "val_bpb"


def varied_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between the grid's runs (name and folder aside)."""
    flats = [config.flatten(r.cfg) for r in runs]
    keys = dict.fromkeys(k for f in flats for k in f)
    return [
        k
        for k in keys
        if k not in ("name", "output.dir") and len({json.dumps(f.get(k), default=str) for f in flats}) > 1
    ]


def prepare_folder(r: Run, varied: list[str] = ()) -> str | None:
    """Write the run's config.yaml (or check the one there) and grid_run.json (its variant, seed and
    the values of the keys the grid varies: TensorBoard's hparams); returns an error or None."""
    text = config.to_yaml(r.cfg)
    try:
        check_same_config(r.folder, text, "grid")
    except UserError as e:
        return str(e)
    if not (r.folder / "config.yaml").exists():
        atomic_write(r.folder / "config.yaml", text)
    flat = config.flatten(r.cfg)
    info = {"variant": r.variant.name, "seed": r.seed, "varied": {k: flat.get(k) for k in varied}}
    trained = (read_json(r.folder / "grid_run.json") or {}).get("trained")
    write_json(r.folder / "grid_run.json", {**info, **({"trained": trained} if trained else {})})
    return None


def remember_training(r: Run, outcome: dict) -> None:
    """Keep in grid_run.json what the call that trained the run measured (its wall time and the
    training seconds it belongs to): later calls that skip or only evaluate it record the same."""
    m = read_json(r.folder / "metrics.json") or {}
    if m.get("status") == "finished" and isinstance(outcome.get("wall_s"), (int, float)):
        info = read_json(r.folder / "grid_run.json") or {}
        info["trained"] = {"wall_s": outcome["wall_s"], "train_seconds": m.get("train_seconds")}
        write_json(r.folder / "grid_run.json", info)


def training_measured(r: Run, earlier: dict | None = None) -> dict:
    """The wall time of the call that trained a finished run, unless it was trained again since
    (by hand: its training seconds differ); {} when no grid call measured it. `earlier`, the run's
    results.jsonl line, serves runs trained before grid_run.json kept it (and is kept there now)."""
    info = read_json(r.folder / "grid_run.json") or {}
    m = read_json(r.folder / "metrics.json") or {}
    trained = info.get("trained")
    if not trained and earlier and isinstance(earlier.get("wall_s"), (int, float)):
        trained = {"wall_s": earlier["wall_s"], "train_seconds": earlier.get("train_seconds")}
    if not trained or trained.get("train_seconds") != m.get("train_seconds"):
        return {}
    if info and "trained" not in info:
        write_json(r.folder / "grid_run.json", {**info, "trained": trained})
    return {"wall_s": trained["wall_s"]}
