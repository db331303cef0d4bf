"""`xsa`: Exclusive Self Attention -- remove from each head's output its own value direction.

    z_i = y_i - (y_i · v_i) v_i / max(‖v_i‖², eps)

y_i is head i's attention output at a position and v_i that head's value vector at the same
position (with grouped K/V, the value of the head's group). No parameters; z_i ⟂ v_i, so a head
cannot simply copy its own token forward. eps only floors a vanishing ‖v‖²: where y_i = v_i (the
first position attends only to itself) z_i is exactly 0. Works with any attention plugin that
passes its values.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from escarda_lab.layers import probing
from escarda_lab.registry import AttentionModifier, ComponentConfig, component


@dataclass
class XSAConfig(ComponentConfig):
    eps: float = 1.0e-6


@component("xsa", slot="attention_modifier", config=XSAConfig)
class ExclusiveSelfAttention(AttentionModifier):
    def __init__(self, m, cfg: XSAConfig):
        super().__init__()
        self.eps = cfg.eps

    def forward(self, y: Tensor, v: Tensor) -> Tensor:
        """y: [B, H, T, d]; v: [B, H_kv, T, d] with H_kv dividing H -> z: [B, H, T, d]."""
        B, H, T, d = y.shape
        yg = y.view(B, v.shape[1], H // v.shape[1], T, d)  # heads grouped by their shared value
        vg = v.unsqueeze(2)
        coef = (yg * vg).sum(-1, keepdim=True) / vg.square().sum(-1, keepdim=True).clamp_min(self.eps)
        z = (yg - coef * vg).view(B, H, T, d)
        if probing(self):
            self._probe = (y[:1].detach(), z[:1].detach())
        return z

    def stats(self) -> dict[str, float]:
        """removed_fraction: share of the output's squared norm that XSA took away."""
        if getattr(self, "_probe", None) is None:
            return {}
        y, z = self._probe
        return {"removed_fraction": float(1 - z.square().sum() / y.square().sum().clamp_min(1e-12))}
