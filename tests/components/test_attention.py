"""mha: cached decoding equals the full forward; causality; GQA/MQA shapes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.model import EscardaLM

SHAPES = st.fixed_dictionaries({
    "n_kv_heads": st.sampled_from([1, 2, 4]),
    "rope_dim": st.sampled_from([0, 4, 8]),  # none, partial, the whole head_dim (8)
    "qk_norm": st.booleans(),
    "rope_style": st.sampled_from(["half", "interleaved"]),
})


@given(shape=SHAPES, seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_token_by_token_decoding_equals_full_forward(tiny_model_cfg, shape, seed):
    torch.manual_seed(seed)
    model = EscardaLM(tiny_model_cfg(**shape)).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = model.new_cache()
    steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@given(shape=SHAPES, split=st.integers(1, 11))
@settings(max_examples=10, deadline=None)
def test_prefill_then_chunk_equals_full_forward(tiny_model_cfg, shape, split):
    model = EscardaLM(tiny_model_cfg(**shape)).eval()
    ids = torch.randint(0, 97, (1, 12))
    cache = model.new_cache()
    parts = [model(ids[:, :split], cache=cache).logits, model(ids[:, split:], cache=cache).logits]
    assert torch.allclose(torch.cat(parts, 1), model(ids).logits, atol=1e-5)


@given(shape=SHAPES, t=st.integers(0, 10), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_changing_later_tokens_never_changes_earlier_outputs(tiny_model_cfg, shape, t, seed):
    g = torch.Generator().manual_seed(seed)
    model = EscardaLM(tiny_model_cfg(**shape)).eval()
    a = torch.randint(0, 97, (1, 12), generator=g)
    b = a.clone()
    b[:, t + 1:] = torch.randint(0, 97, (1, 11 - t), generator=g)
    assert torch.allclose(model(a).logits[:, : t + 1], model(b).logits[:, : t + 1], atol=1e-6)


def test_kv_heads_set_the_key_value_width(tiny_model_cfg):
    mqa = EscardaLM(tiny_model_cfg(n_kv_heads=1)).blocks[0].attn
    mha = EscardaLM(tiny_model_cfg(n_kv_heads=4)).blocks[0].attn
    assert mqa.wkv.out_features == 2 * 1 * 8 and mha.wkv.out_features == 2 * 4 * 8


def test_cache_holds_2_x_kv_heads_x_head_dim_per_token(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg(n_kv_heads=2)).eval()
    cache = model.new_cache()
    model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    state = cache.state(model.blocks[0].attn)
    assert state["k"].shape[1] * state["k"].shape[3] * 2 == 2 * 2 * 8
