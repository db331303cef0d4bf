"""Test-only plugins, loaded through `plugins: [tests.plugins.dummy]`."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from components.attention import MultiHeadAttention
from components.swiglu import SwiGLUFFN
from escarda_lab.registry import ComponentConfig, Objective, component


@dataclass
class ScaledAttentionConfig(ComponentConfig):
    scale: float = 1.0


@component("scaled_attention", slot="attention", config=ScaledAttentionConfig)
class ScaledAttention(MultiHeadAttention):
    """mha whose output is multiplied by a constant: a minimal user plugin."""

    def __init__(self, m, cfg, layer=0):
        super().__init__(m, cfg, layer)
        self.scale = cfg.scale

    def forward(self, x, rotary, cache=None):
        return self.scale * super().forward(x, rotary, cache)

    def stats(self):
        return {"scale": self.scale}


@component("other_attention", slot="attention")
class OtherAttention(MultiHeadAttention):
    pass


@dataclass
class ExplodeConfig(ComponentConfig):
    at_call: int = 3


@dataclass
class PenalisedConfig(ComponentConfig):
    weight: float = 0.5


@component("penalised_ffn", slot="ffn", config=PenalisedConfig)
class PenalisedFFN(SwiGLUFFN):
    """The baseline FFN plus an activation penalty it reports as `self.aux_loss`, exactly as the
    README tells a plugin author to (no other flag)."""

    def __init__(self, m, cfg, layer=0):
        super().__init__(m, cfg, layer)
        self.weight = cfg.weight

    def forward(self, x):
        y = super().forward(x)
        self.aux_loss = (y.square().mean(), self.weight)
        return y


@component("explode", slot="objective", config=ExplodeConfig)
class Explode(Objective):
    """An objective that turns NaN after `at_call` training calls (divergence tests)."""

    def __init__(self, m, cfg, lm=None):
        super().__init__()
        self.at_call, self.calls = cfg.at_call, 0

    def forward(self, batch, out):
        self.calls += 1
        bad = torch.tensor(float("nan") if self.calls > self.at_call else 0.0)
        return out.logits.sum() * 0 + bad


@dataclass
class CrashConfig(ComponentConfig):
    at_call: int = 2
    kill_once_marker: str = ""  # set: SIGKILL the process at `at_call` unless this file exists (then create it)


@component("crash", slot="objective", config=CrashConfig)
class Crash(Objective):
    """An objective that raises (or, with kill_once_marker, SIGKILLs its process once) at a call:
    injected failures for the grid tests."""

    def __init__(self, m, cfg, lm=None):
        super().__init__()
        self.cfg, self.calls = cfg, 0

    def forward(self, batch, out):
        self.calls += 1
        if self.training and self.calls == self.cfg.at_call:
            if not self.cfg.kill_once_marker:
                raise RuntimeError("injected crash")
            marker = Path(self.cfg.kill_once_marker)
            if not marker.exists():
                marker.write_text("killed once\n")
                os.kill(os.getpid(), signal.SIGKILL)
        return out.logits.sum() * 0
