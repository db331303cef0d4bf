"""Attention plugins. `mha`: the baseline multi-head attention of the Escarda block.

Source: Vaswani et al. 2017; GQA (Ainslie et al. 2023) / MQA (Shazeer 2019) by `n_kv_heads`;
QK-norm (Dehghani et al. 2023); decoupled RoPE as in DeepSeek-V2 / the Escarda-86M card.

    q = W_q x,  [k; v] = W_kv x                    (H query heads, H_kv key/value heads)
    q, k <- RMSNorm_hd(q), RMSNorm_hd(k)           (optional; one norm over head_dim, all heads)
    q, k <- RoPE on their last rope_dim dims       (the other head_dim - rope_dim stay NoPE)
    y = softmax(q k^T / sqrt(hd) + causal) v;  y <- modifiers(y, v);  out = W_o y
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from escarda_lab.layers import RMSNorm, causal_attention
from escarda_lab.registry import component


class KVCache:
    """Preallocated per-layer K/V buffers: [B, H_kv, max_len, hd]; writes at the cache position."""

    @staticmethod
    def update(state: dict, k: Tensor, v: Tensor, pos: int, max_len: int) -> tuple[Tensor, Tensor]:
        if "k" not in state:
            shape = (k.shape[0], k.shape[1], max_len, k.shape[3])
            state["k"], state["v"] = k.new_empty(shape), v.new_empty(shape)
        T = k.shape[2]
        state["k"][:, :, pos:pos + T] = k
        state["v"][:, :, pos:pos + T] = v
        return state["k"][:, :, : pos + T], state["v"][:, :, : pos + T]


@component("mha", slot="attention")
class MultiHeadAttention(nn.Module):
    def __init__(self, m, cfg=None, layer: int = 0, modifiers: list[nn.Module] = ()):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = m.n_heads, m.n_kv_heads, m.head_dim
        self.wq = nn.Linear(m.d_model, m.n_heads * m.head_dim, bias=False)
        self.wkv = nn.Linear(m.d_model, 2 * m.n_kv_heads * m.head_dim, bias=False)
        self.wo = nn.Linear(m.n_heads * m.head_dim, m.d_model, bias=False)
        self.q_norm = RMSNorm(m.head_dim, m.norm_eps) if m.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(m.head_dim, m.norm_eps) if m.qk_norm else nn.Identity()
        self.modifiers = nn.ModuleList(modifiers)

    def forward(self, x: Tensor, rotary, cache=None) -> Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", d=self.hd)
        k, v = rearrange(self.wkv(x), "b t (two h d) -> two b h t d", two=2, d=self.hd)
        q, k = rotary(self.q_norm(q)), rotary(self.k_norm(k))
        past = 0
        if cache is not None:
            past = cache.pos
            k_all, v_all = KVCache.update(cache.state(self), k, v, past, cache.max_len)
        else:
            k_all, v_all = k, v
        y = causal_attention(q, k_all, v_all, past)
        for mod in self.modifiers:
            y = mod(y, v)
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))
