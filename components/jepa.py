"""`jepa`: next-latent prediction (JEPA-style auxiliary loss; weight 0.1 in Escarda-86M).

A predictor P = W_2 W_1 RMSNorm(·) (D -> pred_dim -> D) maps the final hidden state h_t to a
prediction of the stop-gradient hidden state h_{t+k} (k = horizon):

    L_jepa = mean over valid t of 1 - cos(P(h_t), sg(h_{t+k}))

Training only: generation never calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from escarda_lab.layers import RMSNorm
from escarda_lab.registry import ComponentConfig, Objective, bounded, component


@dataclass
class JEPAConfig(ComponentConfig):
    pred_dim: int = bounded(256, min=1)
    horizon: int = bounded(1, min=1)
    weight: float = bounded(0.1, min=0)


class CosineDistance(torch.autograd.Function):
    """1 - cos(p, t) over the last dim, t a constant (the stop-gradient target), as
    F.cosine_similarity computes it (norms clamped at eps). Three dot products forward; backward
    writes dp once: dp = -g (t / (|p| |t|) - cos p / |p|²). (Autograd's cosine similarity makes a
    dozen passes over [.., D] tensors, a third of JEPA's cost.)"""

    @staticmethod
    def forward(ctx, p: Tensor, t: Tensor, eps: float) -> Tensor:
        norm_p = torch.linalg.vecdot(p, p).sqrt_().clamp_min_(eps)
        norm_t = torch.linalg.vecdot(t, t).sqrt_().clamp_min_(eps)
        cos = torch.linalg.vecdot(p, t) / (norm_p * norm_t)
        ctx.save_for_backward(p, t, norm_p, norm_t, cos)
        return 1 - cos

    @staticmethod
    def backward(ctx, g: Tensor):
        p, t, norm_p, norm_t, cos = ctx.saved_tensors
        dp = t * (-g / (norm_p * norm_t)).unsqueeze(-1)
        return dp.addcmul_(p, (g * cos / norm_p.square()).unsqueeze(-1)), None, None


@component("jepa", slot="objective", config=JEPAConfig)
class JEPA(Objective):
    def __init__(self, m, cfg: JEPAConfig, lm=None):
        super().__init__()
        self.weight, self.k = cfg.weight, cfg.horizon
        self.predictor = nn.Sequential(
            RMSNorm(m.d_model, m.norm_eps),
            nn.Linear(m.d_model, cfg.pred_dim, bias=False),
            nn.Linear(cfg.pred_dim, m.d_model, bias=False),
        )

    def forward(self, batch: dict, out) -> Tensor:
        h, k = out.hidden, self.k
        pred, target = self.predictor(h[:, :-k]), h[:, k:].detach()  # stop-gradient target
        valid = (batch["labels"][:, :-k] != -100) & (batch["labels"][:, k:] != -100)
        loss = CosineDistance.apply(pred.float(), target.float(), 1e-8)
        return (loss * valid).sum() / valid.sum().clamp(min=1)
