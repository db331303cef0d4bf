"""Launching: each run in its own process, on this machine (a pool of worker slots, optionally
pinned to GPUs) or as a submitit job array."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from escarda_lab.conditions import RUNS_AT_ONCE
from escarda_lab.errors import ConfigError
from escarda_lab.grid.expand import Run
from escarda_lab.grid.record import prepare_folder, record, remember_training, training_measured, varied_keys
from escarda_lab.grid.spec import GridConfig
from escarda_lab.io import atomic_write, read_json, read_jsonl
from escarda_lab.records import fixed_seconds
from escarda_lab.suites import evaluate_args

PHASES = {  # metrics.json `timings` -> what the grid log calls them
    "startup": "start-up and imports",
    "data": "data",
    "setup": "set-up",
    "training": "training steps",
    "periodic_val": "periodic validation",
    "fit_other": "checkpoints and logging",
    "final_val": "final score",
}


def phase_line(recs: list[dict]) -> str:
    """Where the runs' time went, summed over runs: each phase's share of the in-process time."""
    sums = dict.fromkeys(PHASES, 0.0)
    for rec in recs:
        t = rec.get("timings")
        if isinstance(t, dict):
            for k in PHASES:
                sums[k] += float(t.get(k, 0.0))
    total = sum(sums.values())
    if total <= 0:
        return ""
    parts = ", ".join(f"{PHASES[k]} {100 * v / total:.0f}%" for k, v in sums.items())
    return f"time per run by phase (mean {total / len(recs):.0f} s in the run's process): {parts}"


def child_env(parallel: int, gpu: str | None = None) -> dict:
    """Each run gets its share of the cores (two tiny runs on two cores beat one run on both),
    and its GPU when runs are pinned."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    env["PYTHONUNBUFFERED"] = "1"
    env[RUNS_AT_ONCE] = str(parallel)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def visible_gpus() -> list[str]:
    """The GPUs a run could be pinned to (ids as CUDA_VISIBLE_DEVICES names them)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [x for x in listed.split(",") if x.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_slots(g: GridConfig, echo=print) -> list[str | None]:
    """One entry per concurrent run: the GPU it is pinned to, or None (not pinned)."""
    if g.per_gpu == 0:
        return [None] * g.parallel
    gpus = visible_gpus()
    if not gpus:
        echo(f"grid.per_gpu: {g.per_gpu} but no GPU is visible: {g.parallel} run(s) at a time, unpinned")
        return [None] * g.parallel
    return [gpu for gpu in gpus for _ in range(g.per_gpu)]


def run_one(
    config_path: str,
    parallel: int = 1,
    evaluate: list[str] = (),
    gpu: str | None = None,
    started: Callable[[subprocess.Popen | None], None] = lambda child: None,
    warm=None,
) -> dict:
    """Train one run in its own process (a finished run is skipped by the run itself), then
    evaluate it if asked; all output is appended to log.txt in the run folder. `started` is told
    each child process as it starts (and None when it ended), so its caller can stop it. With a
    `warm` process (escarda_lab.grid.warm) each child is forked from it instead of a new Python."""
    from escarda_lab.grid.warm import die_with_parent

    folder = Path(config_path).parent
    t0 = time.perf_counter()
    commands = [["escarda_lab.run", config_path]]
    if evaluate and not (folder / "eval.json").exists():
        commands.append(["escarda_lab.evaluate", str(folder), *evaluate])
    rc = 0
    with open(folder / "log.txt", "ab") as log:
        for cmd in commands:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m {' '.join(cmd)}\n".encode())
            log.flush()
            child = warm.start(cmd, str(folder / "log.txt")) if warm is not None else None
            if child is None:
                child = subprocess.Popen(
                    [sys.executable, "-m", *cmd],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env(parallel, gpu),
                    preexec_fn=die_with_parent,
                )
            started(child)
            rc = child.wait()
            started(None)
            if rc != 0:
                break
    return {"returncode": rc, "wall_s": time.perf_counter() - t0}


def stop_child(child: subprocess.Popen | None, timeout: float = 120.0) -> int | None:
    """SIGTERM a training child (it checkpoints at the current step and exits) and wait for it."""
    import signal

    if child is None or child.poll() is not None:
        return None
    child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


class RequeueableRun:
    """`run_one` as a submitit job that survives pre-emption and time limits: submitit calls
    `checkpoint` before the job is stopped; the training child then checkpoints at its current
    step (SIGTERM) and the same call is requeued, which resumes from that checkpoint. The job's
    process holds one instance: `child` is the process its `run_one` is waiting on."""

    def __init__(self):
        self.child: subprocess.Popen | None = None

    def __call__(self, *args):
        return run_one(*args, started=self.remember)

    def remember(self, child: subprocess.Popen | None) -> None:
        self.child = child

    def checkpoint(self, *args):
        import submitit

        stop_child(self.child)
        return submitit.helpers.DelayedSubmission(RequeueableRun(), *args)


def launch_submitit(g: GridConfig, todo: list[Run], grid_dir: Path, save, outcome_of=lambda r, o: o) -> None:
    """One SLURM job array (or submitit's local executor): each task runs `run_one`."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "grid",
            "grid.launcher",
            "launcher: submitit needs the submitit package",
            "pip install submitit, or use `launcher: local`",
        ) from None
    if not todo:
        return
    s = g.submitit
    ex = submitit.AutoExecutor(folder=str(grid_dir / "submitit" / "%j"), cluster=s.cluster)
    params: dict[str, Any] = {
        "timeout_min": s.timeout_min,
        "gpus_per_node": s.gpus_per_node,
        "cpus_per_task": s.cpus_per_task,
        "mem_gb": s.mem_gb,
        "nodes": s.nodes,
        "name": grid_dir.name,
        "slurm_array_parallelism": g.parallel,
    }
    if s.partition:
        params["slurm_partition"] = s.partition
    ex.update_parameters(**params)
    jobs = ex.map_array(
        RequeueableRun(),
        [str(r.folder / "config.yaml") for r in todo],
        [g.parallel] * len(todo),
        [evaluate_args(g.evaluate)] * len(todo),
    )
    for r, job in zip(todo, jobs):
        try:
            outcome = {**job.result(), "job_id": job.job_id}
        except Exception as e:  # the job itself died (timeout, preemption, node failure)
            outcome = {"returncode": None, "job_id": job.job_id, "job_error": str(e).splitlines()[0][:300]}
        save(r, record(r, grid_dir, outcome_of(r, outcome)))


def train_runs(g: GridConfig, runs: list[Run], grid_dir: Path, echo=print) -> list[dict]:
    """Train `runs` (skipping finished ones) and record each in <grid_dir>/results.jsonl."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], dict] = {}
    # What earlier calls recorded (the previous looks of a sequential grid, an interrupted rerun)
    # stays in results.jsonl until this call records that run again: an interruption while this
    # call is still walking its list never drops a finished run's line.
    path = grid_dir / "results.jsonl"
    earlier = {(rec.get("run"), rec.get("seed")): rec for rec in (read_jsonl(path) if path.exists() else [])}
    lock = threading.Lock()
    pace = {"t0": time.perf_counter(), "trained": 0, "todo": 0}  # for the ETA

    def eta() -> str:
        pace["trained"] += 1
        left = pace["todo"] - pace["trained"]
        per_run = (time.perf_counter() - pace["t0"]) / pace["trained"]
        return f"; ETA {left * per_run / 60:.0f} min for {left} more" if left > 0 else ""

    def save(r: Run, rec: dict) -> None:
        with lock:
            results[(r.cfg.name, r.seed)] = rec
            mine = [(x.cfg.name, x.seed) for x in runs]
            keys = [k for k in mine if k in results] + [k for k in earlier if k not in results]
            merged = {**earlier, **results}
            lines = [json.dumps(merged[k], sort_keys=True, default=str) for k in keys]
            atomic_write(path, "\n".join(lines) + "\n")
            echo(
                f"[{len(results)}/{len(runs)}] {r.cfg.name} seed{rec['seed']}: {rec['status']}"
                + (f" val/bpb {rec['val_bpb']:.4f}" if "val_bpb" in rec else f" ({rec.get('error', '')})")
                + (f" val/acc {rec['val_acc']:.4f}" if "val_acc" in rec else "")
                + (
                    f" ({'whole val split' if rec.get('val_whole_split', True) else 'val split, capped'}, "
                    f"{rec['val_tokens']:,} tokens)"
                    if rec.get("val_tokens")
                    else ""
                )
                + (
                    f" ({rec['wall_s']:.0f} s: {rec['train_seconds']:.0f} training, {fixed_seconds(rec):.0f} fixed"
                    + eta()
                    + ")"
                    if math.isfinite(fixed_seconds(rec))
                    else ""
                )
            )

    todo, evaluating = [], {}  # evaluating: finished runs this call only evaluates
    varied = varied_keys(runs)
    for r in runs:
        problem = prepare_folder(r, varied)
        m = read_json(r.folder / "metrics.json") or {}
        line = earlier.get((r.cfg.name, r.seed))  # its results.jsonl line, if any
        if problem:
            save(r, {**record(r, grid_dir, {}), "status": "failed", "error": problem})
        elif m.get("status") == "finished" and (not g.evaluate or (r.folder / "eval.json").exists()):
            save(r, record(r, grid_dir, {"skipped": True, **training_measured(r, line)}))
        else:
            if m.get("status") == "finished":
                evaluating[(r.cfg.name, r.seed)] = training_measured(r, line)
            todo.append(r)

    def outcome_of(r: Run, outcome: dict) -> dict:
        """A run that was only evaluated keeps its training's wall time; the evaluation's is its own."""
        if (r.cfg.name, r.seed) not in evaluating:
            remember_training(r, outcome)
            return outcome
        out = {k: v for k, v in outcome.items() if k != "wall_s"}
        return {**out, "eval_wall_s": outcome.get("wall_s"), **evaluating[(r.cfg.name, r.seed)]}

    if g.launcher == "submitit":
        launch_submitit(g, todo, grid_dir, save, outcome_of)
    else:
        slots = worker_slots(g, echo)
        free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(len(slots)):
            free.put(i)
        live: dict[int, tuple[Run, subprocess.Popen]] = {}  # by worker thread: the child it waits on
        stopping = threading.Event()
        # imported here, not at the top, so that `python -m escarda_lab.grid.warm` runs a module
        # the package has not imported
        from escarda_lab.grid.warm import WarmPool

        warm = WarmPool(g.start == "fork" and bool(todo), [child_env(len(slots), gpu) for gpu in slots], echo)

        def job(r: Run) -> dict:
            i = free.get()  # a worker holds one slot (GPU share) for the run's whole life
            gpu = slots[i]
            try:
                if stopping.is_set():
                    return {"returncode": None, "skipped": True}
                me = threading.get_ident()
                echo(f"start {r.cfg.name} seed{r.seed}: log {r.folder / 'log.txt'}")

                def track(child: subprocess.Popen | None) -> None:  # the child this worker waits on, if any
                    if child is None:
                        live.pop(me, None)
                    else:
                        live[me] = (r, child)

                config_path = str(r.folder / "config.yaml")
                return run_one(config_path, len(slots), evaluate_args(g.evaluate), gpu, track, warm.for_slot(i))
            finally:
                free.put(i)

        t0 = pace["t0"] = time.perf_counter()
        pace["todo"] = len(todo)
        pool = ThreadPoolExecutor(max_workers=len(slots))
        try:
            futures = [pool.submit(job, r) for r in todo]
            for r, f in zip(todo, futures):
                save(r, record(r, grid_dir, outcome_of(r, f.result())))
        except BaseException:  # Ctrl-C or SIGTERM to the grid: every running run checkpoints and stops
            stopping.set()
            for r, child in list(live.values()):
                rc = stop_child(child)
                rc = child.returncode if rc is None else rc
                echo(f"{r.cfg.name} seed{r.seed}: stopped (exit {rc}); its checkpoint stays, rerun the grid to resume")
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            warm.close()
        pool.shutdown()
        if todo:
            hours = (time.perf_counter() - t0) / 3600
            rate = len(todo) / hours
            recs = [results[(r.cfg.name, r.seed)] for r in todo if (r.cfg.name, r.seed) in results]
            fixed = [x for x in map(fixed_seconds, recs) if math.isfinite(x)]
            walls = [rec["wall_s"] for rec in recs if isinstance(rec.get("wall_s"), (int, float))]
            cost = (
                f"; per run {sum(walls) / len(walls):.0f} s, of it {sum(fixed) / len(fixed):.0f} s fixed cost "
                f"({100 * sum(fixed) / sum(walls):.0f}%: start, imports, data, set-up, validation, final score)"
                if fixed and walls and sum(walls) > 0
                else ""
            )
            how = ", each forked from a warm process" if warm.used else ", each a fresh Python"
            echo(f"{len(todo)} run(s) in {60 * hours:.1f} min, {len(slots)} at a time{how}: {rate:.1f} runs/hour{cost}")
            split = phase_line(recs)
            if split:
                echo(split)
    return [results[(r.cfg.name, r.seed)] for r in runs]
