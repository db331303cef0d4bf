"""XSA: output orthogonal to the head's own value; a no-op when already orthogonal."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.xsa import ExclusiveSelfAttention, XSAConfig

XSA = ExclusiveSelfAttention(None, XSAConfig(enabled=True, eps=0.0))


@given(kv=st.sampled_from([1, 2, 4]), T=st.integers(1, 6), seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_output_is_orthogonal_to_own_value(kv, T, seed):
    g = torch.Generator().manual_seed(seed)
    y, v = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, kv, T, 8, generator=g)
    z = XSA(y, v)
    v_per_head = v.repeat_interleave(4 // kv, dim=1)
    cos = torch.nn.functional.cosine_similarity(z, v_per_head, dim=-1)
    assert cos.abs().max() < 1e-5


def test_noop_when_output_already_orthogonal():
    v = torch.zeros(1, 1, 3, 4)
    v[..., 0] = 1.0
    y = torch.randn(1, 2, 3, 4)
    y[..., 0] = 0.0
    assert torch.allclose(XSA(y, v), y)


def test_removed_fraction_stat(tiny_model_cfg):
    from escarda_lab.model import EscardaLM

    model = EscardaLM(tiny_model_cfg(components={"xsa": {"enabled": True}}, n_kv_heads=4)).train()
    model(torch.randint(0, 97, (2, 8)))
    assert 0 < model.stats()["xsa/removed_fraction"] < 1
