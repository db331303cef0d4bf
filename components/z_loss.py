"""`z_loss`: keeps the softmax normaliser near 1 (PaLM, Chowdhery et al. 2022).

L_z = mean over valid positions of (log Σ_v exp(logit_v))²        (weight 1e-4 released)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from escarda_lab.registry import ComponentConfig, Objective, bounded, component


@dataclass
class ZLossConfig(ComponentConfig):
    weight: float = bounded(1.0e-4, min=0)


@component("z_loss", slot="objective", config=ZLossConfig)
class ZLoss(Objective):
    head_terms = {"lse_sq": 1.0}

    def __init__(self, m, cfg: ZLossConfig, lm=None):
        super().__init__()
        self.weight = cfg.weight

    def forward(self, batch: dict, out) -> Tensor:
        valid = batch["labels"] != -100
        _, lse = out.nll_lse(batch["labels"])  # shared with cross-entropy: one softmax pass
        return (lse.square() * valid).sum() / valid.sum().clamp(min=1)
