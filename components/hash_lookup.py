"""`hash_lookup`: multi-head token-id hash tables feeding the first `layers` blocks.

Escarda-86M's MultiHeadHashLookup (num_hash_layers=2); DeepSeek-V4's hash layers route MoE by the
same kind of fixed token-id hash (`layers.token_hash`, also behind the moe plugin's `routing: hash`).

For block l < layers and head k:  b_k(x) = ((x · a_k + c_k) mod P) mod table_size
    e_l = Σ_k E_{l,k}[b_k(ids)]            (combine: sum)   or   W_l [E_{l,1}[..]; ...; E_{l,K}[..]] (concat)
    h_l <- h_l + tanh(g_l) ⊙ W_out,l e_l   (per-channel gate g_l, zero-init: identity at init)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from escarda_lab.layers import token_hash
from escarda_lab.registry import ComponentConfig, Embedding, bounded, component


@dataclass
class HashLookupConfig(ComponentConfig):
    layers: int = 2  # num_hash_layers released
    heads: int = bounded(2, min=1)
    table_size: int = bounded(4096, min=1)
    dim: int = bounded(32, min=1)  # width of one table row; projected to d_model
    combine: Literal["sum", "concat"] = "sum"

    def check(self, m) -> list[tuple[str, str, str]]:
        out = []
        if not 1 <= self.layers <= m.n_layers:
            out.append(
                ("layers", f"layers={self.layers} must lie in [1, n_layers={m.n_layers}]", "feed at most every block")
            )
        return out


@component("hash_lookup", slot="embedding", config=HashLookupConfig)
class HashLookup(Embedding):
    def __init__(self, m, cfg: HashLookupConfig):
        super().__init__()
        self.layers, self.heads, self.size, self.combine = cfg.layers, cfg.heads, cfg.table_size, cfg.combine
        # One embedding holds every (layer, head) table; offsets select the table.
        self.tables = nn.Embedding(cfg.layers * cfg.heads * cfg.table_size, cfg.dim)
        width = cfg.dim * (cfg.heads if cfg.combine == "concat" else 1)
        self.out = nn.Parameter(torch.empty(cfg.layers, width, m.d_model))
        self.gate = nn.Parameter(torch.zeros(cfg.layers, m.d_model))
        self.init_std = m.init_std
        self.register_buffer(
            "offsets",
            torch.arange(cfg.layers * cfg.heads).view(cfg.layers, cfg.heads) * cfg.table_size,
            persistent=False,
        )

    def init_weights(self) -> None:
        nn.init.normal_(self.out, std=self.init_std)
        nn.init.zeros_(self.gate)

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.gate]

    def forward(self, ids: Tensor, x: Tensor, cache=None) -> Tensor:
        return x  # features go in before each block

    def before_block(self, ids: Tensor, S: Tensor, residual, layer: int, cache=None) -> Tensor:
        if layer >= self.layers:
            return S
        buckets = torch.stack([token_hash(ids, k, self.size) for k in range(self.heads)], -1)  # [B, T, K]
        e = self.tables(buckets + self.offsets[layer])  # [B, T, K, dim]
        e = e.sum(-2) if self.combine == "sum" else e.flatten(-2)
        return residual.add(S, torch.tanh(self.gate[layer]) * (e @ self.out[layer]))

    def stats(self) -> dict[str, float]:
        return {"gate_abs": float(torch.tanh(self.gate).abs().mean())}

    @staticmethod
    def health(final: dict[str, float], peak: dict[str, float]) -> str | None:
        if peak.get("gate_abs", 1.0) < 1e-4:
            return "the hash-lookup gates stayed ≈ 0 for the whole run: no feature reached the blocks"
        return None
