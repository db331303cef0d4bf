"""Every attention plugin × XSA on/off: cached decoding equals the full forward; causality."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.model import EscardaLM

ATTENTION = {
    "mha": {},
    "mla_escarda": {"mla": {"enabled": True, "variant": "escarda", "q_lora_rank": 16, "o_lora_rank": 16}},
    "mla_deepseek": {"mla": {"enabled": True, "variant": "deepseek", "q_lora_rank": 16, "kv_lora_rank": 12}},
}
SHAPES = st.fixed_dictionaries(
    {
        "n_kv_heads": st.sampled_from([1, 2, 4]),
        "rope_dim": st.sampled_from([0, 4, 8]),  # none, partial, the whole head_dim (8)
        "qk_norm": st.booleans(),
        "rope_style": st.sampled_from(["half", "interleaved"]),
    }
)


def build(tiny_model_cfg, attention: str, xsa: bool, shape: dict) -> EscardaLM:
    if attention == "mla_deepseek" and shape["rope_dim"] == 8:
        shape = {**shape, "rope_dim": 4}  # deepseek needs a position-free part
    comps = {**ATTENTION[attention], "xsa": {"enabled": xsa}}
    return EscardaLM(tiny_model_cfg(components=comps, **shape)).eval()


@pytest.mark.parametrize("xsa", [False, True], ids=["plain", "xsa"])
@pytest.mark.parametrize("attention", list(ATTENTION))
@given(shape=SHAPES, seed=st.integers(0, 1000))
@settings(max_examples=8, deadline=None)
def test_token_by_token_decoding_equals_full_forward(tiny_model_cfg, attention, xsa, shape, seed):
    torch.manual_seed(seed)
    model = build(tiny_model_cfg, attention, xsa, shape)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("attention", list(ATTENTION))
@given(shape=SHAPES, split=st.integers(1, 11))
@settings(max_examples=6, deadline=None)
def test_prefill_then_chunk_equals_full_forward(tiny_model_cfg, attention, shape, split):
    model = build(tiny_model_cfg, attention, True, shape)
    ids = torch.randint(0, 97, (1, 12))
    cache = model.new_cache()
    parts = [model(ids[:, :split], cache=cache).logits, model(ids[:, split:], cache=cache).logits]
    assert torch.allclose(torch.cat(parts, 1), model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("attention", list(ATTENTION))
@given(shape=SHAPES, xsa=st.booleans(), t=st.integers(0, 10), seed=st.integers(0, 1000))
@settings(max_examples=8, deadline=None)
def test_changing_later_tokens_never_changes_earlier_outputs(tiny_model_cfg, attention, shape, xsa, t, seed):
    g = torch.Generator().manual_seed(seed)
    model = build(tiny_model_cfg, attention, xsa, shape)
    a = torch.randint(0, 97, (1, 12), generator=g)
    b = a.clone()
    b[:, t + 1 :] = torch.randint(0, 97, (1, 11 - t), generator=g)
    assert torch.allclose(model(a).logits[:, : t + 1], model(b).logits[:, : t + 1], atol=1e-6)


def test_kv_heads_set_the_key_value_width(tiny_model_cfg):
    mqa = EscardaLM(tiny_model_cfg(n_kv_heads=1)).blocks[0].attn
    mha = EscardaLM(tiny_model_cfg(n_kv_heads=4)).blocks[0].attn
    assert mqa.wkv.out_features == 2 * 1 * 8 and mha.wkv.out_features == 2 * 4 * 8


@pytest.mark.parametrize(
    "attention,kv,expected", [("mha", 2, 2 * 2 * 8), ("mla_escarda", 1, 2 * 1 * 8), ("mla_deepseek", 4, 12 + 4)]
)
def test_cache_numbers_per_token_per_layer(tiny_model_cfg, attention, kv, expected):
    model = build(tiny_model_cfg, attention, False, {"n_kv_heads": kv, "rope_dim": 4})
    cache = model.new_cache()
    model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    assert cache.numbers_per_token() == expected * model.cfg.n_layers


def test_attention_entropy_stat_is_logged_per_layer(tiny_model_cfg):
    model = build(tiny_model_cfg, "mha", False, {}).train()
    model(torch.randint(0, 97, (2, 16)))
    stats = model.stats()
    assert 0 < stats["mha/entropy_layer0"] <= torch.log(torch.tensor(16.0))


def test_cache_bytes_per_token_helper(tiny_model_cfg):
    from escarda_lab.model import cache_bytes_per_token

    model = build(tiny_model_cfg, "mla_deepseek", False, {"rope_dim": 4})
    assert cache_bytes_per_token(model) == 4 * (12 + 4) * model.cfg.n_layers
    assert cache_bytes_per_token(model, torch.bfloat16) == 2 * (12 + 4) * model.cfg.n_layers
