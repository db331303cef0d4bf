"""What every entry point shares: library noise filtered, torch set up, and a user's mistake
printed as one paragraph with exit code 2 (never a traceback)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import warnings
from collections.abc import Callable

from escarda_lab.errors import UserError


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    for name in ["lightning", "lightning.pytorch", "lightning.fabric"]:
        logging.getLogger(name).setLevel(logging.WARNING)


def prepare_torch() -> None:
    import torch

    torch.set_flush_denormal(True)  # denormals made tiny-model CPU steps 4-7x slower
    malloc_mmap_threshold(MMAP_THRESHOLD)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left under autocast


MMAP_THRESHOLD = 16 * 2**20
TRIM_THRESHOLD = 2**30


def malloc_mmap_threshold(nbytes: int) -> None:
    """Serve CPU tensors of `nbytes` or more from their own mmap (glibc; elsewhere a no-op).

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
    which activation-sized tensors come from the heap, whose freed pages stay in the process:
    at the 86M shape a step's resident peak grew by 1.1 GB from the first step to the second. A
    fixed threshold returns them on free.

    Fixing it also fixes the heap's trim threshold (how much free memory at the heap's top is
    kept rather than returned), set to TRIM_THRESHOLD: the heap now only holds blocks under
    `nbytes`, so what it keeps is bounded by the peak of those, and returning it made every step
    fault it back in. At d256 a step of the full Escarda set took 65,612 minor page faults (256 MiB
    zeroed by the kernel) with a 32 MiB trim threshold and 24 with 1 GiB; vanilla 42,492 and 590.
    """
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), so RSS reads live memory."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def credited(e: UserError, experiment: str, overrides: list[str] | tuple[str, ...] = ()) -> UserError:
    """`e` with its source corrected: a key given on the command line is the command line's, and an
    error raised deep in the data code (source "data") belongs to the experiment file."""
    given = {o.split("=", 1)[0] for o in overrides if "=" in o}
    if e.key and e.key in given:
        source = "command line"
    elif e.source in ("data", "experiment"):
        source = experiment
    else:
        return e
    return type(e)(source, e.key, e.problem, e.fix)


def user_error(e: UserError) -> str:
    return f"escarda_lab: error in {e}"


def guarded(body: Callable[[], int | None]) -> int:
    """Run an entry point's body: a UserError becomes its one paragraph on stderr and exit code 2."""
    try:
        return body() or 0
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
