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

import torch
from torch import Tensor

from escarda_lab.layers import probing
from escarda_lab.registry import AttentionModifier, ComponentConfig, component


@dataclass
class XSAConfig(ComponentConfig):
    eps: float = 1.0e-6


class Exclude(torch.autograd.Function):
    """z = y − c v, c = (y·v) / n, n = max(‖v‖², eps), over the last dim; v is shared by a group of
    heads (dim 2). One pass per product, and a hand-written backward (autograd's made ~3x the
    passes over [B, H, T, d]): with a = (g·v) / n,
        dy = g − a v,    dv = Σ_group (2 a c [‖v‖² > eps] v − c g − a y)."""

    @staticmethod
    def forward(ctx, y: Tensor, v: Tensor, eps: float) -> Tensor:
        vv = dot(v, v)
        n = vv.clamp_min(eps)
        c = dot(y, v) / n
        ctx.save_for_backward(y, v, c, n, vv > eps)
        return torch.addcmul(y, c, v, value=-1)

    @staticmethod
    def backward(ctx, g: Tensor):
        y, v, c, n, free = ctx.saved_tensors
        a = dot(g, v) / n
        dy = torch.addcmul(g, a, v, value=-1) if ctx.needs_input_grad[0] else None
        dv = None
        if ctx.needs_input_grad[1]:
            own = 2 * a * c * free
            if y.shape[2] == 1:  # one head per value: no group sum
                dv = torch.mul(v, own).addcmul_(g, c, value=-1).addcmul_(y, a, value=-1)
            else:
                direct = torch.mul(g, c).addcmul_(y, a).sum(2, keepdim=True)
                dv = torch.addcmul(-direct, own.sum(2, keepdim=True), v)
        return dy, dv, None


def excluded(y: Tensor, v: Tensor, eps: float) -> Tensor:
    """The plain form of `Exclude` (autograd's backward)."""
    return y - dot(y, v) / dot(v, v).clamp_min(eps) * v


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_d a b over the last dim, kept as a size-1 dim (for head_dim 32 faster than vecdot here)."""
    return (a * b).sum(-1, keepdim=True)


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
        exclude = excluded if torch.compiler.is_compiling() else Exclude.apply  # the compiler fuses the plain form
        z = exclude(yg, vg, self.eps).view(B, H, T, d)
        if probing(self):
            self._probe = (y[:1].detach(), z[:1].detach())
        return z

    def stats(self) -> dict[str, float]:
        """removed_fraction: share of the output's squared norm that XSA took away."""
        if getattr(self, "_probe", None) is None:
            return {}
        y, z = self._probe
        return {"removed_fraction": float(1 - z.square().sum() / y.square().sum().clamp_min(1e-12))}
