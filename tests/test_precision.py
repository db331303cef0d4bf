"""Every experiment file runs in pure half precision (`bf16-true`, `16-true`): the model cast to
the dtype, forward and backward finite. Float32 results are unchanged by what makes this work
(the rotary step computes in at least float32 and returns the input's dtype)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from escarda_lab import config
from escarda_lab.layers import Rope
from escarda_lab.model import EscardaLM
from escarda_lab.objectives import total_loss
from tests.conftest import ROOT, tiny_overrides

FILES = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments").rglob("*.yaml"))
EXPERIMENTS = [p for p in FILES if config.read_grid(ROOT / p) is None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-true", "16-true"])
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[str(p.with_suffix("")) for p in EXPERIMENTS])
def test_every_experiment_runs_in_pure_half_precision(experiment: Path, dtype, corpus, tmp_path):
    over = [o for o in tiny_overrides(corpus, tmp_path) if not o.startswith("data.")]
    over += ["model.vocab_size=300", "data.seq_len=16", "data.probe.vocab_size=null"]
    cfg = config.load(ROOT / experiment, over)
    torch.manual_seed(0)
    model = EscardaLM(cfg).to(dtype)
    ids = torch.randint(8, 300, (2, 16))
    loss = total_loss(model, {"ids": ids, "labels": ids}, model(ids))[0]
    loss.backward()
    assert loss.dtype == dtype or loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rotary_returns_the_inputs_dtype_and_float32_is_unchanged(style):
    rope = Rope(8, 32, style=style)
    rot = rope.at(3, 16)
    x = torch.randn(2, 2, 16, 16)
    cos, sin = rot.cos.float(), rot.sin.float()  # the float32 computation, written out
    nope, r = x[..., :8], x[..., 8:]
    x1, x2 = (r[..., :4], r[..., 4:]) if style == "half" else (r[..., 0::2], r[..., 1::2])
    a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    pair = torch.cat([a, b], -1) if style == "half" else torch.stack([a, b], -1).flatten(-2)
    assert torch.equal(rot(x), torch.cat([nope, pair], -1))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert rot(x.to(dtype)).dtype == dtype
    ref = rot(x.double())
    assert torch.allclose(rot(x.bfloat16()).double(), ref, atol=0.05)
