"""MLA: low-rank shapes, DeepSeek absorbed decoding equals the naive path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.attention import DeepSeekMLA, EscardaMLA, LowRank
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


# ------------------------------------------------------------ the factorised maps' init and knobs


def effective_gain(w: LowRank) -> float:
    """‖map‖_F² per d_in·d_out: the mean squared entry of W_b W_a, or with a norm between the
    factors (whose output has RMS 1, norm √r) of W_b alone — both equal std² for a full-rank N(0, std²) map."""
    a, b = w[0].weight.detach().double(), w[2].weight.detach().double()
    d_in, d_out = a.shape[1], b.shape[0]
    if isinstance(w[1], torch.nn.Identity):
        return float((b @ a).square().sum()) / (d_in * d_out)
    return float(b.square().sum()) / (d_in * d_out)


dims = st.integers(64, 128)


# orthogonal factors have the scale exactly; Gaussian ones within 30% (>= 5 sd of the sampling error)
@pytest.mark.parametrize("kind, rel", [("orthogonal", 1e-6), ("product", 0.3)])
@settings(max_examples=20, deadline=None)
@given(d_in=dims, d_out=dims, r=st.sampled_from([16, 32, 64]), normed=st.booleans(), seed=st.integers(0, 999))
def test_matched_factors_have_a_full_rank_maps_scale(kind, rel, d_in, d_out, r, normed, seed):
    torch.manual_seed(seed)
    w = LowRank(d_in, r, d_out, 1e-6 if normed else None)
    w.init_factors(kind, 0.02)
    assert effective_gain(w) == pytest.approx(0.02**2, rel=rel)


@settings(max_examples=10, deadline=None)
@given(d_in=dims, d_out=dims, r=st.sampled_from([16, 64]), seed=st.integers(0, 999))
def test_released_factors_start_a_sqrt_r_times_std_below_full_rank(d_in, d_out, r, seed):
    torch.manual_seed(seed)
    w = LowRank(d_in, r, d_out)
    for lin in (w[0], w[2]):
        torch.nn.init.normal_(lin.weight, std=0.02)  # the model default
    w.init_factors("released", 0.02)
    assert effective_gain(w) == pytest.approx(0.02**4 * r, rel=0.3)


def test_lora_factors_start_the_map_at_zero_with_a_live_down_projection():
    w = LowRank(64, 16, 64)
    w.init_factors("lora", 0.02)
    a, b = w[0].weight.detach(), w[2].weight.detach()
    assert float(b.abs().max()) == 0 and float(a.std()) == pytest.approx(1 / 8, rel=0.1)


def test_released_mla_keeps_the_model_default_init(tiny_model_cfg):
    base = EscardaLM(tiny_model_cfg(components=MLA))
    again = EscardaLM(tiny_model_cfg(components={"mla": {**MLA["mla"], "factor_init": "released"}}))
    for (n, p), q in zip(base.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    assert float(base.blocks[0].attn.wo[0].weight.detach().std()) == pytest.approx(0.02, rel=0.2)


def test_factor_init_changes_only_the_factors(tiny_model_cfg):
    base = dict(EscardaLM(tiny_model_cfg(components=MLA)).named_parameters())
    ortho = tiny_model_cfg(components={"mla": {**MLA["mla"], "factor_init": "orthogonal"}})
    other = dict(EscardaLM(ortho).named_parameters())
    changed = {n for n in base if not torch.equal(base[n], other[n])}
    assert changed and all(n.endswith(("wq.0.weight", "wq.2.weight", "wo.0.weight", "wo.2.weight")) for n in changed)


def test_o_norm_puts_an_rmsnorm_between_the_output_factors(tiny_model_cfg):
    from escarda_lab.layers import RMSNorm

    attn = EscardaLM(tiny_model_cfg(components={"mla": {**MLA["mla"], "o_norm": True}})).blocks[0].attn
    assert isinstance(attn.wo[1], RMSNorm) and isinstance(attn.wq[1], RMSNorm)


def test_factor_lr_gives_the_factors_their_own_learning_rate(tiny_model_cfg):
    from escarda_lab.module import param_groups

    model = EscardaLM(tiny_model_cfg(components={"mla": {**MLA["mla"], "factor_lr": 3.0}}))
    groups = param_groups(model, 0.1, lr=1e-3)
    scaled = [g for g in groups if "lr" in g]
    assert len(scaled) == 1 and scaled[0]["lr"] == pytest.approx(3e-3) and scaled[0]["weight_decay"] == 0.1
    factors = {id(p) for b in model.blocks for w in (b.attn.wq, b.attn.wo) for p in w.factors()}
    assert {id(p) for p in scaled[0]["params"]} == factors


def test_released_factor_lr_leaves_the_two_plain_groups(tiny_model_cfg):
    from escarda_lab.module import param_groups

    groups = param_groups(EscardaLM(tiny_model_cfg(components=MLA)), 0.1, lr=1e-3)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all("lr" not in g for g in groups)


def test_o_norm_is_refused_for_the_deepseek_variant(tiny_model_cfg):
    from escarda_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="o_norm"):
        tiny_model_cfg(components={"mla": {**MLA["mla"], "variant": "deepseek", "o_norm": True}})
