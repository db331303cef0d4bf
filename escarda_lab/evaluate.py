"""Scoring: per-window negative log-likelihood, and the one definition of bits per byte.

bpb = Σ NLL (nats) over predicted tokens / (ln 2 × Σ UTF-8 bytes of those tokens).
Special tokens count 0 bytes but their NLL counts, so bpb is tokenizer-independent.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    return nll_sum / (math.log(2) * max(n_bytes, 1))


def window_nll(model, batch: dict, token_bytes: Tensor) -> Tensor:
    """[nll_sum, n_tokens, n_bytes] (float64) over the valid labels of one batch."""
    labels = batch["labels"]
    valid = labels != -100
    nll = model(batch["ids"]).nll_lse(labels)[0].sum()
    n_bytes = token_bytes.to(labels.device)[labels.clamp(min=0)][valid].sum()
    return torch.stack([nll.double(), valid.sum().double(), n_bytes.double()])


def summarize(sums: Tensor) -> dict[str, float]:
    """[nll_sum, n_tokens, n_bytes] -> {"loss", "bpb", "tokens", "bytes"}."""
    nll, n, b = (float(x) for x in sums)
    return {"loss": nll / max(n, 1), "bpb": bits_per_byte(nll, b), "tokens": int(n), "bytes": int(b)}


@torch.no_grad()
def score(model, loader, token_bytes: Tensor, device=None) -> Tensor:
    """Summed [nll, tokens, bytes] of `model` over every batch of `loader`."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for batch in loader:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        total += window_nll(model, batch, token_bytes).cpu()
    model.train(was_training)
    return total
