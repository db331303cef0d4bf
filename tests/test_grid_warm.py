"""Warm starts: a grid's runs fork from a process that imported torch and Lightning once, and each
forked run behaves as a fresh `python -m` would (output, exit code, signals, results)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from escarda_lab.grid.warm import Warm, available
from escarda_lab.run import main
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.skipif(not available(), reason="warm starts fork: Linux only")

MODULE = """
import os, sys, time
print("child", os.getpid(), os.getppid(), sys.argv[1:], flush=True)
if sys.argv[1] == "exit":
    sys.exit(int(sys.argv[2]))
if sys.argv[1] == "raise":
    raise RuntimeError("boom")
if sys.argv[1] == "wait":
    print("waiting", flush=True)
    time.sleep(120)
"""


def start_warm(folder: Path) -> Warm:
    (folder / "warm_probe.py").write_text(MODULE)
    return Warm({**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])})


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One warm process for the tests that leave it running (its imports take seconds)."""
    w = start_warm(tmp_path_factory.mktemp("warm"))
    yield w
    w.close()
    w.proc.kill()
    w.proc.wait()


def until(predicate, seconds: float = 60.0) -> bool:
    """Poll (the child runs asynchronously): True once `predicate()` holds."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_forked_child_is_its_own_process_with_its_output_in_the_log(warm, tmp_path):
    log = tmp_path / "log.txt"
    child = warm.start(["warm_probe", "hello"], str(log))
    assert child.wait(60) == 0
    words = log.read_text().split()
    assert words[:3] == ["child", str(child.pid), str(warm.proc.pid)]  # forked by the warm process
    assert child.pid not in (os.getpid(), warm.proc.pid)


def test_a_forked_child_exits_with_its_modules_code(warm, tmp_path):
    assert warm.start(["warm_probe", "exit", "3"], str(tmp_path / "a.txt")).wait(60) == 3
    child = warm.start(["warm_probe", "raise"], str(tmp_path / "b.txt"))
    assert child.wait(60) == 1
    assert "RuntimeError: boom" in (tmp_path / "b.txt").read_text()  # the traceback is in its log


def test_a_warm_process_serves_runs_one_after_another(warm, tmp_path):
    first = warm.start(["warm_probe", "first"], str(tmp_path / "first.txt"))
    assert first.wait(60) == 0
    second = warm.start(["warm_probe", "second"], str(tmp_path / "second.txt"))
    assert second.wait(60) == 0
    assert first.pid != second.pid and warm.alive()


def test_sigterm_to_a_forked_child_ends_it_as_it_would_a_fresh_one(warm, tmp_path):
    log = tmp_path / "log.txt"
    child = warm.start(["warm_probe", "wait"], str(log))
    assert until(lambda: log.exists() and "waiting" in log.read_text())
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == -signal.SIGTERM
    assert warm.alive()  # the warm process outlives its children


def test_a_killed_warm_process_takes_its_child_with_it(tmp_path):
    warm = start_warm(tmp_path)
    log = tmp_path / "log.txt"
    child = warm.start(["warm_probe", "wait"], str(log))
    assert until(lambda: log.exists() and "waiting" in log.read_text())
    warm.proc.kill()
    assert child.wait(60) == -signal.SIGTERM  # PR_SET_PDEATHSIG: no orphan keeps training

    def gone() -> bool:
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{child.pid}/status").read_text().count("zombie") > 0

    assert until(gone)
    assert not warm.alive() and warm.start(["warm_probe", "x"], str(log)) is None  # the grid starts a fresh one


GRID = """
extends: {root}/experiments/escarda.yaml
name: {name}
plugins: [tests.plugins.dummy]
grid:
  seeds: [0]
  variants: {{xsa_off: {{components.xsa.enabled: false}}}}
  parallel: 2
  start: {start}
"""


def test_a_forked_grid_run_gives_the_same_numbers_as_a_fresh_one(corpus, tmp_path):
    records = {}
    for start in ["fork", "fresh"]:
        path = tmp_path / f"{start}.yaml"
        path.write_text(GRID.format(root=ROOT, name=start, start=start))
        assert main([str(path), *tiny_overrides(corpus, tmp_path / "runs")]) == 0
        lines = (tmp_path / "runs" / start / "results.jsonl").read_text().splitlines()
        records[start] = {r["run"]: r for r in map(json.loads, lines)}
    for run, rec in records["fork"].items():
        fresh = records["fresh"][run]
        for key in ["val_bpb", "val_loss", "val_acc", "val_batch_bpb", "step"]:
            assert rec[key] == fresh[key], (run, key)
        assert rec["conditions"]["forked"] and not fresh["conditions"]["forked"]


def test_a_grid_whose_warm_process_cannot_start_runs_each_run_fresh(corpus, tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(Warm, "COMMAND", [sys.executable, "-c", "raise SystemExit(1)"])
    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(root=ROOT, name="cold", start="fork").replace("parallel: 2", "parallel: 1"))
    with caplog.at_level(logging.INFO, logger="escarda_lab"):
        assert main([str(path), *tiny_overrides(corpus, tmp_path / "runs")]) == 0
    lines = (tmp_path / "runs" / "cold" / "results.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["status"] for r in recs] == ["finished", "finished"]
    assert not any(r["conditions"]["forked"] for r in recs)
    assert "ended before its first run: each run starts a fresh Python" in caplog.text


def test_a_killed_grid_leaves_no_run_training(corpus, tmp_path):
    """SIGKILL to the grid: its warm process dies with it, and the run forked from that process
    gets SIGTERM in turn, checkpoints and stops (PR_SET_PDEATHSIG at both steps)."""
    import subprocess

    from escarda_lab.io import read_json

    path = tmp_path / "g.yaml"
    path.write_text(f"extends: {ROOT}/experiments/vanilla.yaml\nname: g\ngrid: {{seeds: [0], start: fork}}\n")
    over = tiny_overrides(corpus, tmp_path / "runs", **{"train.max_steps": 3000, "train.checkpoint_every": 50})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    grid = subprocess.Popen(
        [sys.executable, "-m", "escarda_lab.run", str(path), *over],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = tmp_path / "runs" / "g" / "full" / "seed0"
    assert until(lambda: (folder / "last.ckpt").exists(), 120)  # the run is under way
    pid = int((folder / ".pid").read_text())
    grid.kill()
    grid.wait()

    def stopped() -> bool:
        return (read_json(folder / "metrics.json") or {}).get("status") == "interrupted"

    assert until(stopped, 60)
    assert until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text())
