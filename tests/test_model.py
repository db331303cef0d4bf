"""EscardaLM: shapes, tied embeddings, init, parameter accounting, aux-loss plumbing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.accounting import param_counts, train_flops_per_token
from escarda_lab.model import EscardaLM
from escarda_lab.objectives import total_loss


@given(B=st.integers(1, 3), T=st.integers(1, 16), layers=st.integers(1, 3))
@settings(max_examples=15, deadline=None)
def test_logits_and_hidden_shapes(tiny_model_cfg, B, T, layers):
    out = EscardaLM(tiny_model_cfg(n_layers=layers))(torch.zeros(B, T, dtype=torch.long))
    assert out.logits.shape == (B, T, 97) and out.hidden.shape == (B, T, 32)


def test_tied_embeddings_share_one_matrix(tiny_model_cfg):
    m = EscardaLM(tiny_model_cfg())
    assert m.head.weight is m.embed.weight
    untied = EscardaLM(tiny_model_cfg(tie_embeddings=False))
    assert param_counts(untied)["total"] - param_counts(m)["total"] == 97 * 32


def test_init_std_comes_from_config(tiny_model_cfg):
    torch.manual_seed(0)
    m = EscardaLM(tiny_model_cfg(init_std=0.05, d_model=64, head_dim=16))
    assert m.blocks[0].ffn.w13.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_param_counts_split_by_plugin_and_sum_to_total(tiny_model_cfg):
    counts = param_counts(EscardaLM(tiny_model_cfg()))
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "active"))
    assert counts["active"] == counts["total"]  # no MoE: every parameter is active
    assert counts["swiglu"] == 2 * (32 * 2 * 48 + 48 * 32)


def test_sequence_longer_than_max_seq_len_is_refused(tiny_model_cfg):
    with pytest.raises(ValueError, match="max_seq_len"):
        EscardaLM(tiny_model_cfg())(torch.zeros(1, 33, dtype=torch.long))


def test_flops_per_token_is_at_least_six_times_matmul_params(tiny_model_cfg):
    m = EscardaLM(tiny_model_cfg())
    flops = train_flops_per_token(m, lambda b: total_loss(m, b, m(b["ids"]))[0], 16)
    matmul_params = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2)  # head tied to embed
    assert flops >= 6 * matmul_params


def test_attention_flops_are_counted_on_cpu(tiny_model_cfg):
    short, long = (EscardaLM(tiny_model_cfg(max_seq_len=64)) for _ in range(2))
    f = [
        train_flops_per_token(m, lambda b, m=m: total_loss(m, b, m(b["ids"]))[0], T)
        for m, T in ((short, 8), (long, 64))
    ]
    assert f[1] > f[0]  # only attention grows with T
