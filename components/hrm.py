"""`hrm_refine`: a gated refinement of the final hidden state (after HRM, Wang et al. 2025).

    anchor = h
    for t in 1..steps:  h = h + tanh(g_t) · W_up silu(W_down [RMSNorm(h); anchor])

W_down: 2D -> dim (held as its two D -> dim halves) and W_up: dim -> D are random-initialised
(std 0.02), the gates g_t start at 0: an exact identity at init whose gates still receive
gradient. (A zero-initialised W_up would sit at a saddle where the block stays an identity
forever -- the bug the model card's authors hit.)
`one_step_grad`: HRM's one-step gradient, all steps but the last under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from escarda_lab.layers import RMSNorm
from escarda_lab.registry import ComponentConfig, Refine, bounded, component


@dataclass
class HRMRefineConfig(ComponentConfig):
    dim: int = bounded(128, min=1)  # hrm_refine_dim released
    steps: int = bounded(1, min=1)
    one_step_grad: bool = False


@component("hrm_refine", slot="refine", config=HRMRefineConfig)
class HRMRefine(Refine):
    def __init__(self, m, cfg: HRMRefineConfig):
        super().__init__()
        self.steps, self.one_step_grad = cfg.steps, cfg.one_step_grad
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        # W_down [RMSNorm(h); anchor] split into its two halves: the anchor half is computed once
        # for all steps and no [B, T, 2D] concatenation is materialised.
        self.down = nn.Linear(m.d_model, cfg.dim, bias=False)
        self.down_anchor = nn.Linear(m.d_model, cfg.dim, bias=False)
        self.up = nn.Linear(cfg.dim, m.d_model, bias=False)
        self.gates = nn.Parameter(torch.zeros(cfg.steps))

    def init_weights(self) -> None:
        nn.init.zeros_(self.gates)

    def step(self, h: Tensor, anchor_term: Tensor, t: int) -> Tensor:
        update = self.up(torch.nn.functional.silu(self.down(self.norm(h)) + anchor_term))
        return h + torch.tanh(self.gates[t]) * update

    def forward(self, h: Tensor) -> Tensor:
        """h: [B, T, D] -> [B, T, D]. Position-wise, so cached decoding needs no state."""
        anchor_term = self.down_anchor(h)  # W_down's anchor half, shared by every step
        for t in range(self.steps):
            if self.one_step_grad and t < self.steps - 1:
                with torch.no_grad():
                    h = self.step(h, anchor_term, t)
            else:
                h = self.step(h, anchor_term, t)
        return h

    def stats(self) -> dict[str, float]:
        return {f"gate{t}": float(torch.tanh(g)) for t, g in enumerate(self.gates)}

    @staticmethod
    def health(final: dict[str, float], peak: dict[str, float]) -> str | None:
        if all(abs(v) < 1e-3 for k, v in peak.items() if k.startswith("gate")):
            return "every refinement gate stayed ≈ 0 for the whole run: the block is an identity"
        return None
