"""`swiglu`: the baseline FFN (Shazeer 2020): y = W_2 (silu(W_1 x) ⊙ W_3 x)."""

from __future__ import annotations

from escarda_lab.layers import SwiGLU
from escarda_lab.registry import FFN, component


@component("swiglu", slot="ffn", baseline=True)
class SwiGLUFFN(SwiGLU, FFN):
    def __init__(self, m, cfg=None, layer: int = 0):
        super().__init__(m.d_model, m.ffn_hidden)
