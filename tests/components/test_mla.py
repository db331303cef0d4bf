"""MLA: low-rank shapes, DeepSeek absorbed decoding equals the naive path."""

from __future__ import annotations

import pytest
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


def test_deepseek_mla_with_its_own_value_width_and_full_rank_queries_matches_the_formula(tiny_model_cfg):
    """DeepSeek-V2/V3 MLA from its equations, float64: q = W_q x (q_lora_rank 0: full rank),
    [c; k^R] = W_dkv x, c <- RMSNorm(c), k^C_h = W_uk,h c, v_h = W_uv,h c (v_head_dim wide),
    softmax((q^C_h · k^C_h + q^R_h · k^R) / sqrt(head_dim)) v_h, then W_o."""
    import math

    comps = {"mla": {"enabled": True, "variant": "deepseek", "q_lora_rank": 0, "kv_lora_rank": 6, "v_head_dim": 5}}
    cfg = tiny_model_cfg(components=comps, qk_norm=False, rope_style="interleaved")
    lm = EscardaLM(cfg).double().eval()
    attn = lm.blocks[0].attn
    assert isinstance(attn.wq, torch.nn.Linear) and attn.w_uv.shape == (4, 5, 6) and attn.wo.in_features == 4 * 5
    B, T, D, H, hd, r = 2, 7, 32, 4, 8, 4
    x = torch.randn(B, T, D, dtype=torch.float64)
    rot = lm.rope.at(0, T)
    out = attn(x, rot)

    q = (x @ attn.wq.weight.T).view(B, T, H, hd)
    ckr = x @ attn.w_dkv.weight.T
    c, kr = ckr[..., :6], ckr[..., 6:]
    c = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + cfg.model.norm_eps) * attn.kv_norm.weight
    ref = torch.zeros(B, T, H, 5, dtype=torch.float64)
    ang = torch.outer(
        torch.arange(T, dtype=torch.float64), 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    )

    def rope(u):  # interleaved pairs (2i, 2i+1), u [..., T, r]
        cos, sin = ang.cos(), ang.sin()
        a, b = u[..., 0::2], u[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)

    kr = rope(kr)  # [B, T, r]
    for h in range(H):
        qc, qr = q[:, :, h, : hd - r], rope(q[:, :, h, hd - r :])
        kc = c @ attn.w_uk[h].T
        vh = c @ attn.w_uv[h].T
        s = (qc @ kc.transpose(1, 2) + qr @ kr.transpose(1, 2)) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        ref[:, :, h] = s.softmax(-1) @ vh
    expected = ref.reshape(B, T, H * 5) @ attn.wo.weight.T
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)
    cache, steps = lm.new_cache(), []  # the absorbed decoding path agrees
    for t in range(T):
        steps.append(attn(x[:, t : t + 1], lm.rope.at(t, 1), cache))
        cache.pos += 1  # what EscardaLM.forward does after every block has run
    assert torch.allclose(torch.cat(steps, 1), expected, atol=1e-10, rtol=0)


def test_deepseek_mla_warns_that_qk_norm_does_not_apply(tiny_model_cfg):
    comps = {"mla": {"enabled": True, "variant": "deepseek", "kv_lora_rank": 6}}
    with pytest.warns(UserWarning, match="QK-norm"):
        EscardaLM(tiny_model_cfg(components=comps, qk_norm=True))
