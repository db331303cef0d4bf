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


def test_the_first_position_is_removed_exactly_with_eps():
    """At position 0 a head attends only to itself, so y = v and z must be exactly 0 (eps only
    floors a vanishing ‖v‖²)."""
    xsa = ExclusiveSelfAttention(None, XSAConfig(enabled=True))  # default eps 1e-6
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        v = torch.randn(2, 2, 5, 8, generator=g, dtype=dtype)
        y = torch.randn(2, 4, 5, 8, generator=g, dtype=dtype)
        y[:, :, 0] = v.repeat_interleave(2, dim=1)[:, :, 0]
        z = xsa(y, v)
        assert torch.equal(z[:, :, 0], torch.zeros_like(z[:, :, 0]))


def test_the_first_position_through_attention_is_exactly_zero(tiny_model_cfg):
    """Through causal attention (MHA and DeepSeek MLA) the first position's XSA output is 0."""
    from escarda_lab.model import EscardaLM

    for comps, model in [
        ({"xsa": {"enabled": True}}, {}),
        (
            {"xsa": {"enabled": True}, "mla": {"enabled": True, "variant": "deepseek", "kv_lora_rank": 8}},
            {"qk_norm": False},
        ),
    ]:
        lm = EscardaLM(tiny_model_cfg(components=comps, **model)).double().eval()
        attn = lm.blocks[0].attn
        seen = {}
        xsa_mod = attn.modifiers[0]
        xsa_mod.register_forward_hook(lambda m, args, out, seen=seen: seen.setdefault("z", out))
        lm(torch.randint(0, 97, (2, 6)))
        assert torch.equal(seen["z"][:, :, 0], torch.zeros_like(seen["z"][:, :, 0]))


@given(kv=st.sampled_from([1, 2, 4]), tiny_v=st.booleans(), seed=st.integers(0, 10_000))
@settings(max_examples=12, deadline=None)
def test_hand_written_backward_passes_gradcheck(kv, tiny_v, seed):
    """Grouped heads share a value; a value under eps (n floored) takes the other branch."""
    from components.xsa import Exclude

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(2, kv, 4 // kv, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv, 1, 3, 5, generator=g, dtype=torch.float64)
    if tiny_v:
        v[:, :, :, 0] *= 1e-4  # ‖v‖² ≈ 1e-8, under eps = 1e-6
    assert torch.autograd.gradcheck(lambda y, v: Exclude.apply(y, v, 1e-6), (y, v.requires_grad_()))


def test_eager_and_compiled_forms_agree_with_their_gradients():
    from components.xsa import Exclude, excluded

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 2, 3, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 1, 7, 8, generator=g, requires_grad=True)
    up = torch.randn(2, 2, 3, 7, 8, generator=g)
    for a, b in zip(
        (Exclude.apply(y, v, 1e-6), *torch.autograd.grad(Exclude.apply(y, v, 1e-6), (y, v), up)),
        (excluded(y, v, 1e-6), *torch.autograd.grad(excluded(y, v, 1e-6), (y, v), up)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
