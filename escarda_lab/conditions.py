"""The conditions a speed was measured under. A tokens/s number means little without them: two
runs sharing two cores each run at about half speed, and a busy machine slows everything, so every
run records the machine's load and how many runs shared it, and every table or figure that shows a
speed says in one line when those speeds are noisy."""

from __future__ import annotations

import os

RUNS_AT_ONCE = "ESCARDA_RUNS_AT_ONCE"  # set by a grid for its children: how many runs share the machine
FORKED = "ESCARDA_FORKED"  # set in a run forked from a grid's warm process (its imports were done there)
BUSY = 0.5  # a 1-minute load above this share of the cores, before a run starts, means other work ran


def load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not every platform has a load average
        return float("nan")


def measure(device: str, threads: int | None = None) -> dict:
    """Now: the 1-minute load average, the cores, the runs sharing the machine, the device, whether
    the run was forked from a warm process (its start-up then holds no imports) and the threads it
    computes with (torch's intra-op threads: the load it puts on the machine itself)."""
    cond = {
        "load": load(),
        "cpus": os.cpu_count() or 1,
        "runs_at_once": int(os.environ.get(RUNS_AT_ONCE, "1")),
        "device": device,
        "forked": os.environ.get(FORKED) == "1",
    }
    if threads is not None:
        cond["threads"] = int(threads)
    return cond


def why_noisy(cond: dict | None, rounds: int | None = None) -> str:
    """Why a speed measured under `cond` is noisy ("" when it is not): the cores were shared by
    parallel runs, the machine was busy before it started, or a benchmark had fewer than 3 rounds."""
    reasons = []
    if rounds is not None and rounds < 3:
        reasons.append(f"{rounds} round{'s' * (rounds != 1)} (< 3)")
    if not cond:
        return "; ".join(reasons)
    shared = cond.get("runs_at_once", 1)
    if shared > 1 and cond.get("device", "cpu") == "cpu":
        reasons.append(f"{shared} runs shared {cond.get('cpus')} cores")
    busy = max(cond.get("load", 0) or 0, cond.get("load_end", 0) or 0)
    # the load the measurement's own processes put there: its runs' threads (the load at the end
    # includes them); records older than `threads` count only a grid's parallel runs
    threads = cond.get("threads")
    ours = min(cond.get("cpus", 1), shared * threads) if threads else (shared if shared > 1 else 0)
    if cond.get("device", "cpu") == "cpu" and busy > BUSY * cond.get("cpus", 1) + ours:
        reasons.append(f"load {busy:.1f} on {cond.get('cpus')} cores")
    return "; ".join(reasons)


def noisy_counts(conditions) -> tuple[int, int, str]:
    """Over runs' recorded conditions: (runs that recorded them, runs timed noisily, the commonest why)."""
    known = [c for c in conditions if isinstance(c, dict)]
    why = [w for w in (why_noisy(c) for c in known) if w]
    return len(known), len(why), max(sorted(set(why)), key=why.count) if why else ""  # ties: the first in order


def speed_note(timed: int, noisy: int, why: str) -> str:
    """One line under a speed column: how many of the runs' speeds are noisy, and why."""
    if not timed:
        return "Speeds: no run recorded the machine's load (runs older than that record): compare them with care."
    if not noisy:
        return f"Speeds: all {timed} runs had the machine to themselves (load below {BUSY:g}× the cores)."
    return (
        f"Speeds are **noisy**: {noisy} of {timed} runs were timed on a shared machine (e.g. {why}); read "
        "the speed columns as rough, and time plugins with `python -m escarda_lab.bench`."
    )
