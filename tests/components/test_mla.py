"""MLA: low-rank shapes, DeepSeek absorbed decoding equals the naive path."""

from __future__ import annotations

import torch

from components.attention import DeepSeekMLA, EscardaMLA
from escarda_lab.model import EscardaLM

MLA = {"mla": {"enabled": True, "q_lora_rank": 8, "o_lora_rank": 6, "kv_lora_rank": 12}}


def test_escarda_mla_has_low_rank_query_and_output(tiny_model_cfg):
    attn = EscardaLM(tiny_model_cfg(components=MLA)).blocks[0].attn
    assert isinstance(attn, EscardaMLA)
    assert (attn.wq[0].out_features, attn.wq[2].in_features) == (8, 8)
    assert (attn.wo[0].out_features, attn.wo[2].in_features) == (6, 6)


def test_mla_parameters_are_accounted_to_mla(tiny_model_cfg):
    from escarda_lab.accounting import param_counts

    counts = param_counts(EscardaLM(tiny_model_cfg(components=MLA)))
    assert "mla" in counts and "mha" not in counts


def test_deepseek_absorbed_prefill_equals_naive_per_layer(tiny_model_cfg):
    comps = {"mla": {**MLA["mla"], "variant": "deepseek"}}
    model = EscardaLM(tiny_model_cfg(components=comps, rope_dim=4))
    attn = model.blocks[0].attn
    assert isinstance(attn, DeepSeekMLA)
    x = torch.randn(2, 10, 32)
    rot = model.rope.at(0, 10)
    naive = attn(x, rot, None)
    absorbed = attn(x, rot, model.new_cache())  # a cache switches to the absorbed path
    assert torch.allclose(naive, absorbed, atol=1e-5)
