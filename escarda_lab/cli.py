"""What every entry point shares: library noise filtered, torch set up, and a user's mistake
printed as one paragraph with exit code 2 (never a traceback)."""

from __future__ import annotations

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
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left under autocast


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
