"""The hand-written backwards of RMSNorm and SwiGLU (eager CPU training) equal autograd's through
the plain ops, and keep fewer activations for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.layers import RMSNorm, SwiGLU


def plain_norm(n: RMSNorm, x):
    return F.rms_norm(x, (x.shape[-1],), n.weight.to(x.dtype), n.eps)


def plain_swiglu(f: SwiGLU, x):
    a, b = f.w13(x).chunk(2, dim=-1)
    return f.w2(F.silu(a) * b)


def outputs_and_grads(module, forward, x, g):
    x = x.clone().requires_grad_()
    y = forward(x)
    return (y, *torch.autograd.grad(y, (x, *module.parameters()), g))


def lean_and_reference(module, plain, x, g):
    """(output, *grads) through the module (the lean path) and through the plain ops."""
    return outputs_and_grads(module, module, x, g), outputs_and_grads(module, lambda v: plain(module, v), x, g)


def randomised(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)
    return module


def saved_bytes(forward, x) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x.clone().requires_grad_())
    return sum(seen.values())


CASES = {
    "rmsnorm": (lambda d: RMSNorm(d), plain_norm),
    "swiglu": (lambda d: SwiGLU(d, 3 * d), plain_swiglu),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@given(B=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 12), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_lean_backward_equals_autograd(name, dtype, tol, B, T, D, seed):
    make, plain = CASES[name]
    module = randomised(make(D).to(dtype), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, D, generator=gen, dtype=dtype)
    g = torch.randn(B, T, D, generator=gen, dtype=dtype)
    lean, ref = lean_and_reference(module, plain, x, g)
    assert type(module(x.requires_grad_()).grad_fn).__name__ in {"_RMSNormBackward", "_SwiGLUDownBackward"}
    for a, b in zip(lean, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", CASES)
def test_lean_backward_under_bf16_autocast_is_as_accurate_as_autograd(name):
    """Against a float64 model, the lean path's bf16 error is at most (about) autograd's."""
    import copy

    make, plain = CASES[name]
    module = randomised(make(32), 1)
    x, g = torch.randn(4, 16, 32), torch.randn(4, 16, 32)
    exact = copy.deepcopy(module).double()
    truth = outputs_and_grads(exact, lambda v: plain(exact, v), x.double(), g.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean, ref = lean_and_reference(module, plain, x, g.bfloat16())
    assert lean[0].dtype == ref[0].dtype
    assert [t.dtype for t in lean[1:]] == [t.dtype for t in ref[1:]]
    for a, b, t in zip(lean, ref, truth, strict=True):
        scale = t.abs().max()
        assert (a.double() - t).abs().max() / scale <= 1.5 * (b.double() - t).abs().max() / scale + 1e-3


@pytest.mark.parametrize(("name", "kept"), [("rmsnorm", 1), ("swiglu", 2)])
def test_lean_backward_keeps_fewer_activation_sized_tensors(name, kept):
    """RMSNorm keeps x, not also x·r; SwiGLU keeps [a, b] (2 hidden-sized), not also silu(a) and the
    product (2 more)."""
    make, plain = CASES[name]
    D = 64
    module = make(D)
    x = torch.randn(2, 128, D)
    hidden = 3 * D if name == "swiglu" else D
    unit = 2 * 128 * hidden * 4  # one activation-sized fp32 tensor
    weights = sum(p.numel() * 4 for p in module.parameters())
    lean = saved_bytes(module, x) - weights
    ref = saved_bytes(lambda v: plain(module, v), x) - weights
    assert ref - lean >= kept * unit
    assert lean < ref


def test_lean_backward_is_not_used_without_grad():
    f = SwiGLU(8, 16)
    with torch.no_grad():
        assert f(torch.randn(2, 3, 8)).grad_fn is None
