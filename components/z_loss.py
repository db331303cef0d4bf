"""`z_loss`: keeps the softmax normaliser near 1 (PaLM, Chowdhery et al. 2022).

    L_z = mean over valid positions of (log Σ_v exp(logit_v))²        (weight 1e-4 released)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from escarda_lab.registry import ComponentConfig, component


@dataclass
class ZLossConfig(ComponentConfig):
    weight: float = 1.0e-4

    def check(self, model) -> list[tuple[str, str, str]]:
        if self.weight < 0:
            return [("weight", f"weight must be >= 0, got {self.weight}", "use e.g. 1.0e-4")]
        return []


@component("z_loss", slot="objective", config=ZLossConfig)
class ZLoss(nn.Module):
    def __init__(self, m, cfg: ZLossConfig):
        super().__init__()
        self.weight = cfg.weight

    def forward(self, batch: dict, out) -> Tensor:
        valid = batch["labels"] != -100
        _, lse = out.nll_lse(batch["labels"])  # shared with cross-entropy: one softmax pass
        return (lse.square() * valid).sum() / valid.sum().clamp(min=1)
