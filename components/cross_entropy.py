"""`cross_entropy`: the next-token objective, mean over positions whose label is not -100."""

from __future__ import annotations

from torch import Tensor

from escarda_lab.registry import Objective, component


@component("cross_entropy", slot="objective", baseline=True)
class CrossEntropy(Objective):
    head_terms = {"nll": 1.0}

    def __init__(self, m, cfg=None, lm=None):
        super().__init__()

    def forward(self, batch: dict, out) -> Tensor:
        nll, _ = out.nll_lse(batch["labels"])
        return nll.sum() / (batch["labels"] != -100).sum().clamp(min=1)
