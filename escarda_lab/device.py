"""Which device a config trains on, and waiting for it (timings must include queued GPU work)."""

from __future__ import annotations

import torch


def on_gpu(cfg) -> bool:
    acc = str(cfg.trainer.accelerator)
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
