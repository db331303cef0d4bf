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

import torch
from torch import Tensor, nn

from escarda_lab.layers import RMSNorm, nll_and_logsumexp
from escarda_lab.registry import ComponentConfig, component


@dataclass
class MTPConfig(ComponentConfig):
    variant: str = "escarda"  # escarda | deepseek
    depth: int = 1  # num_nextn_predict_layers
    weight: float = 0.3

    def check(self, m) -> list[tuple[str, str, str]]:
        out = []
        if self.variant not in ("escarda", "deepseek"):
            out.append(("variant", f"unknown variant {self.variant!r}", "use escarda or deepseek"))
        if self.depth < 1:
            out.append(("depth", "depth must be >= 1", "use 1 (the released value)"))
        if self.weight < 0:
            out.append(("weight", "weight must be >= 0", "use 0.3 (the released value)"))
        return out


@component("mtp", slot="objective", config=MTPConfig)
class MultiTokenPrediction(nn.Module):
    def __init__(self, m, cfg: MTPConfig):
        super().__init__()
        self.weight, self.depth, self.variant = cfg.weight, cfg.depth, cfg.variant
        D = m.d_model
        if cfg.variant == "escarda":
            self.maps = nn.ParameterList(nn.Parameter(torch.zeros(D, D)) for _ in range(cfg.depth))
        else:
            from components.residual import PlainResidual
            from escarda_lab.config import schema_class
            from escarda_lab.model import Block

            comps = schema_class()().components  # a block of baseline plugins (mha + swiglu)
            self.h_norm = nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(cfg.depth))
            self.e_norm = nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(cfg.depth))
            self.merge = nn.ModuleList(nn.Linear(2 * D, D, bias=False) for _ in range(cfg.depth))
            self.blocks = nn.ModuleList(Block(m, comps, layer=0) for _ in range(cfg.depth))
            self.residual = PlainResidual(m)

    def init_weights(self) -> None:
        if self.variant == "escarda":
            for w in self.maps:
                nn.init.zeros_(w)

    def head_logits(self, batch: dict, out) -> list[Tensor]:
        """Logits of head k = 1..depth at positions 0 .. T-1-k ([B, T-k, V] each)."""
        lm, h, labels = out.model, out.hidden, batch["labels"]
        T = h.shape[1]
        logits = []
        if self.variant == "escarda":
            for k, W in enumerate(self.maps, start=1):
                hk = h[:, : T - k]
                logits.append(lm.logits(hk + hk @ W.T))
            return logits
        prev = h
        for k in range(1, self.depth + 1):
            nxt = labels[:, k - 1: T - 1].clamp(min=0)  # token x_{t+k} is the label of position t+k-1
            x = self.merge[k - 1](torch.cat([self.h_norm[k - 1](prev[:, : T - k]),
                                             self.e_norm[k - 1](lm.embed(nxt))], dim=-1))
            prev = self.blocks[k - 1](x, self.residual, lm.rope.at(0, T - k), None)
            logits.append(lm.logits(prev))
        return logits

    def forward(self, batch: dict, out) -> Tensor:
        labels = batch["labels"]
        losses = []
        for k, lg in enumerate(self.head_logits(batch, out), start=1):
            target = labels[:, k:]
            nll, _ = nll_and_logsumexp(lg, target)
            losses.append(nll.sum() / (target != -100).sum().clamp(min=1))
        return torch.stack(losses).mean()
