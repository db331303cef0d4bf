"""Warm starts for a grid's runs: one process per worker slot imports torch, Lightning and the
model once, then forks a child for each run. A child is a new process, as with a fresh
`python -m escarda_lab.run` (its own memory, seeds, signals and exit code), minus the seconds of
imports: 3.7 of a flagship run's 59 s on a 2-core machine (`grid.start: fresh` restores one
Python per run).

The grid talks to a warm process over its stdin/stdout, one JSON line each way:
    grid -> warm:  {"argv": ["escarda_lab.run", CONFIG], "log": LOG}
    warm -> grid:  {"pid": PID}                          the child started
                   {"pid": PID, "returncode": RC}        the child ended (as Popen.returncode)
Only the grid's own thread writes to a warm process; each child's output goes to its log.txt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

# What a run and its evaluation import (torch and Lightning with them): done once per warm
# process, inherited by every child.
PRELOAD = (
    "lightning.pytorch.loggers",
    "escarda_lab.run",
    "escarda_lab.module",
    "escarda_lab.data",
    "escarda_lab.model",
    "escarda_lab.evaluate",
)


def available() -> bool:
    """Forking after torch is imported is what torch's own DataLoader workers do on Linux; macOS
    frameworks are not fork-safe, so elsewhere every run starts a fresh Python."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def die_with_parent() -> None:
    """In a child process (Linux): receive SIGTERM when the thread that started it dies, however
    it dies, so no orphan keeps training (SIGTERM makes a run checkpoint and stop; a rerun resumes).
    The grid's worker threads live as long as the grid."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not Linux: a killed grid leaves its children running, as before
        pass


class Forked:
    """A run forked by a warm process, with the part of `subprocess.Popen` the grid uses."""

    def __init__(self, pid: int, report):
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()
        threading.Thread(target=self._await, args=(report,), daemon=True).start()

    def _await(self, report) -> None:
        self.returncode = report()
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"run {self.pid}", timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it ended between the check and the signal
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Warm:
    """One warm process for one worker slot, started with the slot's environment (its share of the
    cores, its GPU) so that torch reads them before it is imported."""

    COMMAND = [sys.executable, "-m", "escarda_lab.grid.warm"]

    def __init__(self, env: dict):
        self.proc = subprocess.Popen(
            self.COMMAND,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            preexec_fn=die_with_parent,
        )
        self.served = 0  # runs forked so far: a warm process that dies before its first cannot start runs

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, argv: list[str], log: str) -> Forked | None:
        """Fork a child running `python -m *argv` with its output appended to `log`; None when this
        warm process is gone (the caller starts a fresh Python instead)."""
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
            self.proc.stdin.flush()
            started = self._read()
        except (OSError, ValueError):
            started = None
        if started is None:
            self.close()
            return None
        self.served += 1
        return Forked(started["pid"], self._ended)

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def _ended(self) -> int | None:
        got = self._read()
        if got is None:  # the warm process died with its child: PR_SET_PDEATHSIG SIGTERMed the child
            self.close()
            return -signal.SIGTERM
        return got["returncode"]

    def close(self) -> None:
        """EOF ends the warm process once its child (if any) has ended."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass


class WarmPool:
    """A grid's warm processes, one per worker slot, each started on its slot's first run (and
    again if it died after serving runs). Once one dies before its first run, warm starts are not
    working here: every later run starts a fresh Python, said once."""

    def __init__(self, wanted: bool, envs: list[dict], echo=print):
        self.envs, self.echo = envs, echo
        self.warms: dict[int, Warm] = {}
        self.cold = threading.Event()
        self.on = wanted and available()
        if wanted and not available():
            echo("grid.start: fork needs Linux: each run starts a fresh Python")

    @property
    def used(self) -> bool:
        return bool(self.warms)

    def for_slot(self, i: int) -> Warm | None:
        """Slot i's warm process, or None: start the run as a fresh Python. One thread per slot."""
        if not self.on or self.cold.is_set():
            return None
        w = self.warms.get(i)
        if w is not None and not w.alive() and not w.served:
            self.cold.set()
            self.echo("grid.start: fork: a warm process ended before its first run: each run starts a fresh Python")
            return None
        if w is None or not w.alive():
            w = self.warms[i] = Warm(self.envs[i])
        return w

    def close(self) -> None:
        for w in self.warms.values():
            w.close()


def serve() -> None:
    """The warm process: preload, then fork one child per request and report how it ended."""
    import importlib

    sigint = signal.getsignal(signal.SIGINT)  # as the grid left it (ignored in a background job)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the children; the grid stops them
    # CUDA cannot be used in a child forked after it was initialised: ask NVML, not the driver,
    # whether a GPU is there, and refuse (the grid then starts fresh Pythons) if anything did
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    if torch.cuda.is_initialized():
        sys.exit("escarda_lab.grid.warm: CUDA was initialised while importing; runs start fresh")
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        warm = os.getpid()
        pid = os.fork()
        if pid == 0:
            child(request, sigint, warm)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


def child(request: dict, sigint, warm: int) -> None:
    """In the forked child: become `python -m argv...` with stdout and stderr in the log; never
    returns."""
    import runpy
    import traceback

    import escarda_lab
    from escarda_lab.conditions import FORKED

    code = 1
    try:
        die_with_parent()
        if os.getppid() != warm:  # the warm process died before the line above took effect
            os._exit(128 + signal.SIGTERM)
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the request pipe stays the warm process's
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdin = open(os.devnull)
        escarda_lab.STARTED = time.perf_counter()  # this run's start-up counts from the fork
        os.environ[FORKED] = "1"
        sys.argv = list(request["argv"])
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    serve()
