"""`plain`: the baseline residual stream, h = x + F(x), with a single stream (m = 1)."""

from __future__ import annotations

from torch import Tensor

from escarda_lab.registry import Residual, component


@component("plain", slot="residual", baseline=True)
class PlainResidual(Residual):
    def __init__(self, m, cfg=None, n_sites: int = 0):
        super().__init__()

    def expand(self, x: Tensor) -> Tensor:
        return x

    def sublayer(self, S: Tensor, fn, site: int) -> Tensor:
        return S + fn(S)

    def collapse(self, S: Tensor) -> Tensor:
        return S

    def read(self, S: Tensor) -> Tensor:
        return S

    def add(self, S: Tensor, delta: Tensor) -> Tensor:
        return S + delta
