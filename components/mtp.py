"""`mtp`: multi-token prediction through the shared (tied) output head.

Head k = 1..depth predicts, at position t, the token k positions after the next one (the label of
position t + k). Loss = mean over heads of their cross-entropy (weight 0.3 in Escarda-86M).

    escarda   (released) h^k_t = h_t + W_k h_t, W_k a zero-initialised D×D map:
              at init every head's logits equal the main head's
    deepseek  (DeepSeek-V3 §2.2) h^k_t = Block_k(M_k [RMSNorm(h^{k-1}_t); RMSNorm(Emb(x_{t+k}))]),
              M_k: 2D -> D, chained over k from h^0 = h; Block_k a transformer block of the
              model's own kind with a plain residual
Training only: generation never calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from escarda_lab.layers import RMSNorm
from escarda_lab.registry import ComponentConfig, Objective, bounded, component


@dataclass
class MTPConfig(ComponentConfig):
    variant: Literal["escarda", "deepseek"] = "escarda"
    depth: int = bounded(1, min=1)  # num_nextn_predict_layers
    weight: float = bounded(0.3, min=0)


class MultiTokenPrediction(Objective):
    """Shared by both variants: the loss is the mean CE of the heads, whose hidden states each
    variant gives by `head_hidden(batch, out)`: head k = 1..depth at positions 0 .. T-1-k
    ([B, T-k, D]); the shared head scores them fused (no [B, T-k, V] logits)."""

    def __init__(self, m, cfg: MTPConfig):
        super().__init__()
        self.weight, self.depth = cfg.weight, cfg.depth

    def forward(self, batch: dict, out) -> Tensor:
        labels = batch["labels"]
        losses = []
        for k, h in enumerate(self.head_hidden(batch, out), start=1):
            target = labels[:, k:]
            nll, _ = out.lm.nll_lse(h, target)
            losses.append(nll.sum() / (target != -100).sum().clamp(min=1))
        return torch.stack(losses).mean()

    def head_logits(self, batch: dict, out) -> list[Tensor]:
        """Head k's logits [B, T-k, V] (tests and analysis; the loss never builds them)."""
        return [out.lm.logits(h) for h in self.head_hidden(batch, out)]


@component("mtp", slot="objective", config=MTPConfig, variant="escarda")
class EscardaMTP(MultiTokenPrediction):
    """h^k_t = h_t + W_k h_t through the shared head; W_k zero-initialised."""

    def __init__(self, m, cfg: MTPConfig, lm=None):
        super().__init__(m, cfg)
        self.maps = nn.ParameterList(nn.Parameter(torch.zeros(m.d_model, m.d_model)) for _ in range(cfg.depth))

    def init_weights(self) -> None:
        for w in self.maps:
            nn.init.zeros_(w)

    def head_hidden(self, batch: dict, out) -> list[Tensor]:
        h, T = out.hidden, out.hidden.shape[1]
        return [h[:, : T - k] + h[:, : T - k] @ W.T for k, W in enumerate(self.maps, start=1)]


@component("mtp", slot="objective", config=MTPConfig, variant="deepseek")
class DeepSeekMTP(MultiTokenPrediction):
    """Chained heads: a merge of the previous hidden state and the next token's embedding, then a
    block of the slot baselines (mha + swiglu) with a plain residual."""

    def __init__(self, m, cfg: MTPConfig, lm=None):
        super().__init__(m, cfg)
        D = m.d_model
        self.h_norm = nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(cfg.depth))
        self.e_norm = nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(cfg.depth))
        self.merge = nn.ModuleList(nn.Linear(2 * D, D, bias=False) for _ in range(cfg.depth))
        self.blocks = nn.ModuleList(lm.baseline_block(layer=0) for _ in range(cfg.depth))
        self.residual = lm.plain_residual()

    def head_hidden(self, batch: dict, out) -> list[Tensor]:
        lm, h, labels = out.lm, out.hidden, batch["labels"]
        T = h.shape[1]
        hidden, prev = [], h
        for k in range(1, self.depth + 1):
            nxt = labels[:, k - 1 : T - 1].clamp(min=0)  # token x_{t+k} is the label of position t+k-1
            x = self.merge[k - 1](
                torch.cat([self.h_norm[k - 1](prev[:, : T - k]), self.e_norm[k - 1](lm.embed(nxt))], dim=-1)
            )
            prev = self.blocks[k - 1](x, self.residual, lm.rotary(0, T - k), None)
            hidden.append(prev)
        return hidden
