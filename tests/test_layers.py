"""Shared primitives: RoPE conventions and relative-position property, RMSNorm, SDPA masking."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.layers import RMSNorm, Rope, causal_attention


def rotate(x, style, start=0, theta=10000.0):
    rope = Rope(x.shape[-1] if style else 0, 64, theta, style or "half")
    return rope.at(start, x.shape[-2])(x)


@given(r=st.sampled_from([2, 4, 8]), nope=st.sampled_from([0, 4]), style=st.sampled_from(["half", "interleaved"]))
@settings(max_examples=20, deadline=None)
def test_rope_leaves_position_free_dims_untouched(r, nope, style):
    x = torch.randn(2, 3, 5, nope + r)
    rope = Rope(r, 16, style=style)
    y = rope.at(3, 5)(x)
    assert torch.equal(y[..., :nope], x[..., :nope])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep norms


@given(style=st.sampled_from(["half", "interleaved"]), shift=st.integers(0, 20))
@settings(max_examples=20, deadline=None)
def test_rope_scores_depend_only_on_relative_position(style, shift):
    rope = Rope(8, 64, style=style)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    s1 = (rope.at(5, 1)(q) * rope.at(2, 1)(k)).sum()
    s2 = (rope.at(5 + shift, 1)(q) * rope.at(2 + shift, 1)(k)).sum()
    assert torch.allclose(s1, s2, atol=1e-4)


def test_half_and_interleaved_differ_by_a_fixed_permutation():
    x = torch.randn(1, 1, 6, 8)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pair (2i, 2i+1) -> half pair (i, i+4)
    half = Rope(8, 16, style="half").at(0, 6)(x[..., perm])
    inter = Rope(8, 16, style="interleaved").at(0, 6)(x)
    assert torch.allclose(half, inter[..., perm], atol=1e-6)


def test_rope_at_position_zero_is_identity():
    x = torch.randn(1, 2, 1, 8)
    assert torch.allclose(Rope(8, 4).at(0, 1)(x), x)


def test_rmsnorm_output_has_unit_rms():
    y = RMSNorm(16, eps=1e-8)(torch.randn(3, 16) * 7)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)


@given(past=st.integers(0, 6), T=st.integers(1, 5), groups=st.sampled_from([1, 2, 4]))
@settings(max_examples=25, deadline=None)
def test_chunked_causal_attention_matches_full(past, T, groups):
    H = 4
    q = torch.randn(1, H, past + T, 8)
    k, v = torch.randn(1, H // groups, past + T, 8), torch.randn(1, H // groups, past + T, 8)
    full = causal_attention(q, k, v, 0)
    chunk = causal_attention(q[:, :, past:], k, v, past)
    assert torch.allclose(full[:, :, past:], chunk, atol=1e-5)


@given(N=st.integers(1, 6), V=st.integers(2, 9), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_fused_nll_and_logsumexp_match_autograd_reference(N, V, seed):
    from escarda_lab.layers import nll_and_logsumexp

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = -100
    w_nll, w_lse = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    xa = x.clone().requires_grad_()
    nll, lse = nll_and_logsumexp(xa, y)
    ((nll * w_nll).sum() + (lse * w_lse).sum()).backward()
    xb = x.clone().requires_grad_()
    ref_nll = torch.nn.functional.cross_entropy(xb, y, ignore_index=-100, reduction="none")
    ref_lse = xb.logsumexp(-1)
    ((ref_nll * w_nll).sum() + (ref_lse * w_lse).sum()).backward()
    assert torch.allclose(nll.double(), ref_nll.double(), atol=1e-5)
    assert torch.allclose(lse.double(), ref_lse.double(), atol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)


def test_rope_tables_follow_a_float64_model():
    """The rotation of a float64 input uses float64 angles (not float32 tables cast up); float32
    and bf16 inputs rotate in float32 and come back in their own dtype (a pure-bf16 model runs)."""
    import math

    from escarda_lab.layers import Rope

    rope = Rope(8, 64, 10000.0, "interleaved")
    x = torch.randn(1, 1, 64, 8, dtype=torch.float64)
    y = rope.at(0, 64)(x)
    pos = torch.arange(64, dtype=torch.float64)[:, None]
    ang = pos * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    a, b = x[..., 0::2], x[..., 1::2]
    ref = torch.stack([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1).flatten(-2)
    assert y.dtype == torch.float64 and torch.allclose(y, ref, atol=1e-12, rtol=0)
    assert rope.at(0, 4)(torch.randn(1, 1, 4, 8)).dtype == torch.float32
    assert rope.at(0, 4)(torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert not math.isclose(float(rope.cos.float().double()[63, 1]), float(rope.cos[63, 1]), rel_tol=0, abs_tol=1e-12)
