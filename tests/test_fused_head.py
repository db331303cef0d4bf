"""The fused output head: chunked linear + cross-entropy (+ z-loss) equals the unfused head and
never keeps a [tokens, vocab] tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.layers import CHUNK_BYTES, MIN_CHUNK_ROWS, chunk_rows, linear_nll_and_logsumexp, nll_and_logsumexp
from escarda_lab.model import EscardaLM
from escarda_lab.objectives import total_loss

ESCARDA = {
    "mla": {"enabled": True, "q_lora_rank": 8, "o_lora_rank": 8},
    "xsa": {"enabled": True},
    "hyper_connections": {"enabled": True},
    "jepa": {"enabled": True, "pred_dim": 8},
    "mtp": {"enabled": True, "depth": 2},
    "z_loss": {"enabled": True, "weight": 0.05},
}


def head_inputs(N, D, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = -100
    return x, w, y


def ce_plus_z(nll, lse, y, zeta, scale):
    valid = y != -100
    return scale * (nll.sum() + zeta * (lse.square() * valid).sum()) / valid.sum().clamp(min=1)


def grads(head, x, w, y, loss):
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    nll, lse = head(xa, wa, y)
    value = loss(nll, lse)
    return (value, *torch.autograd.grad(value, (xa, wa)))


def fused(zeta, rows=None):
    return lambda x, w, y: linear_nll_and_logsumexp(x, w, y, zeta, rows)


def unfused(x, w, y):
    return nll_and_logsumexp(x @ w.T, y)


@given(
    N=st.integers(1, 40),
    V=st.integers(2, 30),
    rows=st.integers(1, 16),
    zeta=st.sampled_from([0.0, 1e-4, 0.5]),
    scale=st.floats(0.01, 10),
    seed=st.integers(0, 1000),
)
@settings(max_examples=40, deadline=None)
def test_loss_and_gradients_equal_the_unfused_head_fp32(N, V, rows, zeta, scale, seed):
    """The gradient prepared in forward (CE + ζ z-loss, any overall scale), at any chunking."""
    x, w, y = head_inputs(N, 8, V, seed)
    loss = lambda nll, lse: ce_plus_z(nll, lse, y, zeta, scale)  # noqa: E731
    for a, b in zip(grads(fused(zeta, rows), x, w, y, loss), grads(unfused, x, w, y, loss)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@given(zeta=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_any_other_use_of_nll_and_lse_is_exact_by_recompute(zeta, seed):
    """Per-row weights on NLL and a plain Σ lse (a gradient the forward did not prepare)."""
    x, w, y = head_inputs(23, 8, 20, seed, torch.float64)
    weights = torch.rand(23, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = lambda nll, lse: (nll * weights).sum() + lse.sum()  # noqa: E731
    for a, b in zip(grads(fused(zeta, 5), x, w, y, loss), grads(unfused, x, w, y, loss)):
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_a_zeta_that_does_not_match_the_loss_still_gives_the_exact_gradient():
    x, w, y = head_inputs(30, 8, 17, 0)
    loss = lambda nll, lse: ce_plus_z(nll, lse, y, 0.2, 1.0)  # noqa: E731
    for a, b in zip(grads(fused(0.0), x, w, y, loss), grads(unfused, x, w, y, loss)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_matches_the_unfused_head_under_autocast():
    x, w, y = head_inputs(64, 32, 50, 1)
    loss = lambda nll, lse: ce_plus_z(nll, lse, y, 1e-2, 1.0)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = grads(fused(1e-2), x, w, y, loss)
        b = grads(unfused, x, w, y, loss)
    assert a[0].dtype == torch.float32 and a[1].dtype == x.dtype and a[2].dtype == w.dtype
    for u, v in zip(a, b):
        assert torch.allclose(u, v.to(u.dtype), atol=2e-2, rtol=2e-2)


def test_without_grad_only_the_sums_are_computed():
    x, w, y = head_inputs(10, 8, 12, 2)
    with torch.no_grad():
        nll, lse = linear_nll_and_logsumexp(x, w, y)
    ref_nll, ref_lse = nll_and_logsumexp(x @ w.T, y)
    assert torch.allclose(nll, ref_nll, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)


def model_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss, terms = total_loss(model, {"ids": ids, "labels": ids}, model(ids))
    loss.backward()
    return loss, terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("components", [{}, ESCARDA], ids=["vanilla", "escarda"])
def test_training_losses_and_every_gradient_equal_the_unfused_model(tiny_model_cfg, monkeypatch, components):
    """Main head (CE + z-loss) and every MTP head fused vs the logits materialised."""
    torch.manual_seed(0)
    model = EscardaLM(tiny_model_cfg(components))
    ids = torch.randint(1, 97, (3, 16))
    loss, terms, g = model_grads(model, ids)
    monkeypatch.setattr("escarda_lab.model.linear_nll_and_logsumexp", lambda x, w, y, z: unfused(x, w, y))
    ref_loss, ref_terms, ref_g = model_grads(model, ids)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert terms.keys() == ref_terms.keys()
    for k in terms:
        assert torch.allclose(terms[k], ref_terms[k], atol=1e-5), k
    assert g.keys() == ref_g.keys()
    for n in g:
        assert torch.allclose(g[n], ref_g[n], atol=1e-5), n


def test_no_logits_sized_tensor_is_kept_for_backward(tiny_model_cfg):
    """The training step saves nothing with tokens × vocab entries (main head and MTP heads)."""
    torch.manual_seed(0)
    model = EscardaLM(tiny_model_cfg(ESCARDA, vocab_size=4099))
    ids = torch.randint(1, 4099, (4, 32))  # 128 tokens > d_model 32
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = total_loss(model, {"ids": ids, "labels": ids}, model(ids))
    assert max(largest) < ids.numel() * 4099 / 2  # the [V, D] weight (and its gradient) is the largest
    loss.backward()


def test_train_fused_head_false_gives_the_same_loss(tiny_model_cfg):
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for fused_head in (True, False):
        cfg = tiny_model_cfg(ESCARDA)
        cfg.train.fused_head = fused_head
        model = EscardaLM(cfg)
        out = model(ids)
        losses.append(total_loss(model, {"ids": ids, "labels": ids}, out)[0])
        assert out._logits is None  # the losses never ask for the output's logits
    assert torch.allclose(*losses, atol=1e-6)


@pytest.mark.parametrize("components", [{}, ESCARDA], ids=["vanilla", "escarda"])
def test_the_training_loss_takes_the_gradient_prepared_in_forward(tiny_model_cfg, monkeypatch, components):
    """CE + z-loss on the main head and NLL on the MTP heads: backward never recomputes the logits."""
    monkeypatch.setattr("escarda_lab.layers._recompute_grads", lambda *a: pytest.fail("recomputed the head"))
    model = EscardaLM(tiny_model_cfg(components))
    ids = torch.randint(1, 97, (2, 16))
    total_loss(model, {"ids": ids, "labels": ids}, model(ids))[0].backward()


def test_no_gradient_is_prepared_without_grad(monkeypatch):
    x, w, y = head_inputs(10, 8, 12, 3)
    x.requires_grad_()
    seen = []
    monkeypatch.setattr("escarda_lab.layers.accumulate", lambda *a: seen.append(1))
    with torch.no_grad():
        linear_nll_and_logsumexp(x, w, y)
    assert not seen
    linear_nll_and_logsumexp(x, w, y)
    assert seen


def test_cpu_chunks_stay_in_cache_but_keep_enough_rows_to_amortise_reading_the_head():
    assert chunk_rows("cpu", 4096) * 4096 * 4 == CHUNK_BYTES["cpu"] < CHUNK_BYTES["cuda"]
    assert chunk_rows("cpu", 16_512) == chunk_rows("cuda", 16_512) == MIN_CHUNK_ROWS
