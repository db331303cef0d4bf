"""`cross_entropy`: the next-token objective, mean over positions whose label is not -100."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from escarda_lab.registry import component


@component("cross_entropy", slot="objective")
class CrossEntropy(nn.Module):
    weight = 1.0

    def __init__(self, m, cfg=None):
        super().__init__()

    def forward(self, batch: dict, out) -> Tensor:
        return F.cross_entropy(out.logits.flatten(0, 1).float(), batch["labels"].flatten(),
                               ignore_index=-100)
