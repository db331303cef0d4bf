"""`engram`: n-gram memory -- hash the local n-grams into learned tables and gate them in.

For every n in 2..max_ngram and every hash head k there is a table E_{n,k} of `table_size` rows
(G = (max_ngram - 1) · heads tables). Position t looks up the n-gram of tokens t-n+1 .. t
(pad id before the start; strictly causal), concatenates the G rows e_t [G · dim] and adds

    escarda / ids   x_t <- x_t + σ(w · x_t + gate_bias) · W_e e_t          (at the embedding)
    deepseek        per residual stream s, before the listed blocks (DeepSeekEngram):
                    H_s <- H_s + V_s + SiLU(DWConv(RMSNorm_s(V_s))),  V_s = g_s (W_v e_t + b_v),
                    g_s = σ(ssqrt(⟨RMSNorm_s(W_k,s e_t + b_k,s), RMSNorm_s(H_s)⟩ / √D))

The key of an n-gram:
    escarda   (as released) a frozen random projection of its token embeddings to compress_dim
              dims, sign-quantised: bucket = Σ_i [p_i > 0] 2^i mod table_size. It can collapse
              (the released model sent every key to bucket 0), which `stats()` exposes.
    ids       multiplicative hash of the token ids: (Σ_j id_{t-j} a_{g,j}) mod P mod table_size
    deepseek  DeepSeek's Engram (arXiv 2601.07372; its reference code's NgramHashMapping): per
              engram layer l and order n, mix = XOR_{k<n} (id_{t-k} · a_{l,k}) with odd
              multipliers per layer; head j of order n takes mix mod p_{l,n,j}, a prime >=
              table_size distinct over layers, orders and heads, and its table has p_{l,n,j} rows
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from escarda_lab.layers import PAD, RMSNorm, probing
from escarda_lab.registry import ComponentConfig, Embedding, bounded, component

PRIME = 2_147_483_629


def primes_below(n: int, count: int) -> list[int]:
    """The `count` largest primes <= n (distinct moduli for the deepseek hash)."""
    out, k = [], n
    while len(out) < count and k > 1:
        if all(k % d for d in range(2, int(k**0.5) + 1)):
            out.append(k)
        k -= 1
    return out


@dataclass
class EngramConfig(ComponentConfig):
    variant: Literal["escarda", "ids", "deepseek"] = "escarda"
    max_ngram: int = bounded(3, min=2)  # n-grams of n = 2 .. max_ngram
    table_size: int = bounded(4096, min=1)
    heads: int = bounded(2, min=1)
    compress_dim: int = bounded(32, min=1)  # escarda key: projection width before sign-quantisation
    dim: int = bounded(32, min=1)  # width of one table row
    gate_bias: float = -1.0  # escarda / ids: gate σ(-1) ≈ 0.27 at init, "mostly off"
    layers: list[int] = field(default_factory=lambda: [1])  # deepseek: blocks it is inserted before
    conv_kernel: int = bounded(4, min=1)  # deepseek: causal depthwise convolution width

    def check(self, m) -> list[tuple[str, str, str]]:
        out = []
        if self.variant == "deepseek" and not all(0 <= i < m.n_layers for i in self.layers):
            out.append(
                (
                    "layers",
                    f"layers {self.layers} must be block indices < {m.n_layers}",
                    "list blocks between 0 and n_layers - 1",
                )
            )
        return out


class Engram(Embedding):
    """What the variants share: the G hashed tables, n-gram contexts, lookup and health. A variant
    (registered below) defines `keys` (the bucket of every n-gram), `init_keys` (its key state,
    drawn after the hash multipliers) and how the looked-up rows reach the model."""

    def __init__(self, m, cfg: EngramConfig):
        super().__init__()
        N, K = cfg.max_ngram, cfg.heads
        self.N, self.size = N, cfg.table_size
        self.G = (N - 1) * K
        self.make_tables(m, cfg)
        self._probe: dict[str, Tensor] = {}

    def make_tables(self, m, cfg: EngramConfig) -> None:
        """The hash state and the tables: one set of G tables of table_size rows for the model."""
        N, K = cfg.max_ngram, cfg.heads
        n_of = torch.arange(2, N + 1).repeat_interleave(K)  # n of each table g
        self.register_buffer("offsets", torch.arange(self.G) * cfg.table_size, persistent=False)
        # ctx[..., j] is the token j steps back; table g uses j < n_g only.
        used = (torch.arange(N)[None, :] < n_of[:, None]).long()  # [G, N]
        gen = torch.Generator().manual_seed(20240601)
        mult = torch.randint(1, PRIME - 1, (self.G, N), generator=gen) | 1
        self.register_buffer("mult", mult * used, persistent=False)
        self.register_buffer("moduli", torch.tensor(primes_below(cfg.table_size, self.G)), persistent=False)
        self.init_keys(m, cfg, gen, used)
        self.tables = nn.Embedding(self.G * cfg.table_size, cfg.dim)

    def init_keys(self, m, cfg: EngramConfig, gen: torch.Generator, used: Tensor) -> None:
        """Key state beyond the multipliers (none by default)."""

    # ------------------------------------------------------------------------------------ keys
    @staticmethod
    def with_history(t: Tensor, n: int, state: dict | None, name: str, pad) -> Tensor:
        """[B, T, ...] -> [B, n + T, ...]: the n positions before t (the cached tail when decoding,
        else `pad`) prepended; the new tail is stored back for the next decoding step."""
        tail = state.get(name) if state is not None else None
        if tail is None:
            tail = torch.full((t.shape[0], n, *t.shape[2:]), pad, dtype=t.dtype, device=t.device)
        full = torch.cat([tail, t], dim=1)
        if state is not None:
            state[name] = full[:, t.shape[1] :]
        return full

    def context(self, t: Tensor, state: dict | None, name: str, pad) -> Tensor:
        """[B, T, ...] -> [B, T, N, ...]: index j holds position t - j (pad / cache before t=0)."""
        full = self.with_history(t, self.N - 1, state, name, pad)
        windows = full.unfold(1, self.N, 1)  # [B, T, ..., N] oldest first
        return windows.flip(-1).movedim(-1, 2)

    def buckets(self, ids: Tensor, x: Tensor, state: dict | None) -> Tensor:
        """[B, T, G] row index of every table (offsets not added)."""
        ctx = self.context(ids.long(), state, "ids", PAD)  # [B, T, N]
        if probing(self):
            self._probe["ctx"] = ctx.detach()
        return self.keys(ctx, x, state)

    def lookup(self, ids: Tensor, x: Tensor, cache) -> Tensor:
        state = cache.state(self) if cache is not None else None
        b = self.buckets(ids, x, state)
        if probing(self):
            self._probe["buckets"] = b.detach()
        return self.tables(b + self.offsets).flatten(-2)  # [B, T, G·dim]

    # ---------------------------------------------------------------------------------- health
    def stats(self) -> dict[str, float]:
        """Per table g over the last training batch:
        occupancy_t{g}  share of the table's buckets used
        spread_t{g}     buckets used / min(table_size, distinct n-grams seen): 1 = no collisions
                        beyond the table's capacity, ≈ 0 = keys collapsed into few buckets
        entropy_t{g}    usage entropy / log(table_size)"""
        b, ctx = self._probe.get("buckets"), self._probe.get("ctx")
        if b is None or ctx is None:
            return {}
        out = {}
        n_of = [n for n in range(2, self.N + 1) for _ in range(self.G // (self.N - 1))]
        for g in range(self.G):
            counts = torch.bincount(b[..., g].flatten(), minlength=self.size).float()
            p = counts / counts.sum()
            used = float((counts > 0).sum())
            distinct = len(torch.unique(ctx[..., : n_of[g]].reshape(-1, n_of[g]), dim=0))
            out[f"occupancy_t{g}"] = used / self.size
            out[f"spread_t{g}"] = used / min(self.size, distinct)
            out[f"entropy_t{g}"] = float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(self.size))
        if "gate" in self._probe:
            out["gate_mean"] = float(self._probe["gate"])
        return out

    @staticmethod
    def health(final: dict[str, float], peak: dict[str, float]) -> str | None:
        spread = {k: v for k, v in final.items() if k.startswith("spread")}
        worst = min(spread, key=spread.get) if spread else None
        if worst is not None and spread[worst] <= 0.01:
            g = worst.split("_t")[-1]
            return (
                f"keys collapsed: table {g} put the last batch's n-grams into "
                f"{100 * final[f'occupancy_t{g}']:.2f}% of its buckets (the released model's bucket-0 bug)"
            )
        return None


@component("engram", slot="embedding", config=EngramConfig, variant="escarda")
class EscardaEngram(Engram):
    """As released: keys from a frozen sign projection of the n-gram's embeddings; the rows are
    gated into the token embedding, x_t <- x_t + σ(w · x_t + gate_bias) · W_e e_t."""

    def __init__(self, m, cfg: EngramConfig):
        super().__init__(m, cfg)
        self.w_e = nn.Linear(self.G * cfg.dim, m.d_model, bias=False)
        self.gate = nn.Linear(m.d_model, 1)
        self.gate_bias = cfg.gate_bias

    def init_keys(self, m, cfg: EngramConfig, gen: torch.Generator, used: Tensor) -> None:
        proj = torch.randn(self.N, m.d_model, self.G, cfg.compress_dim, generator=gen)
        proj = proj * used.T[:, None, :, None]  # zero the rows of tokens outside table g's n-gram
        self.register_buffer("key_proj", proj.flatten(0, 1).flatten(1), persistent=True)
        self.bits = min(cfg.compress_dim, 31)
        self.register_buffer("bit_values", 2 ** torch.arange(self.bits), persistent=False)

    def init_weights(self) -> None:
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, self.gate_bias)

    def keys(self, ctx: Tensor, x: Tensor, state: dict | None) -> Tensor:
        xc = self.context(x.detach(), state, "x", 0.0)  # [B, T, N, D]
        p = (xc.flatten(2) @ self.key_proj).unflatten(-1, (self.G, -1))[..., : self.bits]
        return ((p > 0).long() * self.bit_values).sum(-1) % self.size

    def forward(self, ids: Tensor, x: Tensor, cache=None) -> Tensor:
        gate = torch.sigmoid(self.gate(x))
        if probing(self):
            self._probe["gate"] = gate.detach().mean()
        return x + gate * self.w_e(self.lookup(ids, x, cache))


@component("engram", slot="embedding", config=EngramConfig, variant="ids")
class IdsEngram(EscardaEngram):
    """Escarda's injection with keys hashed from the token ids: (Σ_j id_{t-j} a_{g,j}) mod P mod size."""

    def init_keys(self, m, cfg: EngramConfig, gen: torch.Generator, used: Tensor) -> None:
        pass  # the multipliers are the whole key

    def keys(self, ctx: Tensor, x: Tensor, state: dict | None) -> Tensor:
        return ((ctx.unsqueeze(-2) * self.mult).sum(-1) % PRIME) % self.size


def primes_above(start: int, count: int, seen: set[int]) -> list[int]:
    """The next `count` primes > start not in `seen` (which they join): DeepSeek's table sizes."""
    out, k = [], start
    while len(out) < count:
        k += 1
        if k > 1 and all(k % d for d in range(2, int(k**0.5) + 1)) and k not in seen:
            out.append(k)
            seen.add(k)
    return out


HASH_SEED, LAYER_SEED_STEP = 0, 10007  # the reference's seed; layer l hashes with seed + 10007 l


@component("engram", slot="embedding", config=EngramConfig, variant="deepseek")
class DeepSeekEngram(Engram):
    """DeepSeek's Engram (arXiv 2601.07372; its reference forward, engram_demo_v1.py), before each
    listed block l, on the residual streams H_s (s = 1..n, one with no hyper-connections):

        e_t = [E_{l,n,j}[mix_{l,n,t} mod p_{l,n,j}]]_{n,j}       per-layer tables and hashes
        g_{t,s} = σ(sign(q)·√max(|q|, 1e-6)),  q = ⟨RMSNorm_s(W_k,s e_t + b_k,s), RMSNorm_s(H_{t,s})⟩ / √D
        V_{t,s} = g_{t,s} (W_v e_t + b_v)
        H_s <- H_s + V_s + SiLU(DWConv_dil=max_ngram(RMSNorm_s(V_s)))   (depthwise over n·D channels)

    mix_{l,n,t} = XOR_{k<n} id_{t-k} · a_{l,k}, odd a_{l,k} drawn per layer (numpy's default_rng at
    seed + 10007 l, below int64 max / vocab / 2); the p_{l,n,j} are the next primes >= table_size,
    distinct over every layer, order and head, and table (l, n, j) has p_{l,n,j} rows. Not
    reproduced: the tokenizer-compression step (ids are hashed as they are) and the pad id
    (this tokenizer's <pad>, 0). The conv kernel starts at zero (the block starts as V alone)."""

    @classmethod
    def build(cls, model_cfg, cfg, streams: int = 1) -> nn.Module:
        return cls(model_cfg, cfg, streams)

    def __init__(self, m, cfg: EngramConfig, streams: int = 1):
        self.n_streams = streams
        super().__init__(m, cfg)
        width, D, n = self.G * cfg.dim, m.d_model, streams
        self.w_k = nn.ModuleList(nn.ModuleList(nn.Linear(width, D) for _ in range(n)) for _ in self.layers)
        self.w_v = nn.ModuleList(nn.Linear(width, D) for _ in self.layers)
        self.k_norm = nn.ModuleList(nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(n)) for _ in self.layers)
        self.h_norm = nn.ModuleList(nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(n)) for _ in self.layers)
        self.v_norm = nn.ModuleList(nn.ModuleList(RMSNorm(D, m.norm_eps) for _ in range(n)) for _ in self.layers)
        self.conv = nn.Parameter(torch.zeros(len(self.layers), n * D, cfg.conv_kernel))
        self.kernel, self.dilation = cfg.conv_kernel, cfg.max_ngram

    def make_tables(self, m, cfg: EngramConfig) -> None:
        import numpy as np

        self.layers = list(cfg.layers)
        half = max(1, (2**63 - 1) // m.vocab_size // 2)
        seen: set[int] = set()
        self.tables = nn.ModuleList()
        for i, layer in enumerate(self.layers):
            rng = np.random.default_rng(HASH_SEED + LAYER_SEED_STEP * layer)
            mult = torch.from_numpy(rng.integers(0, half, size=self.N, dtype=np.int64) * 2 + 1)
            primes = [p for _ in range(2, self.N + 1) for p in primes_above(cfg.table_size - 1, cfg.heads, seen)]
            self.register_buffer(f"xor_mult{i}", mult, persistent=False)
            self.register_buffer(f"moduli{i}", torch.tensor(primes), persistent=False)
            self.register_buffer(f"offsets{i}", torch.tensor([0, *primes[:-1]]).cumsum(0), persistent=False)
            self.tables.append(nn.Embedding(sum(primes), cfg.dim))
        self.register_buffer("order_of", torch.arange(2, self.N + 1).repeat_interleave(cfg.heads) - 2, persistent=False)

    def init_weights(self) -> None:
        nn.init.zeros_(self.conv)

    def keys(self, ctx: Tensor, x: Tensor, state: dict | None, i: int = 0) -> Tensor:
        """[B, T, G] bucket of every table of the i-th engram layer."""
        a = getattr(self, f"xor_mult{i}")
        mix = [ctx[..., 0] * a[0]]  # mix[n - 2] after the loop: the order-n hash
        for k in range(1, self.N):
            mix.append(mix[-1] ^ (ctx[..., k] * a[k]))
        mixes = torch.stack(mix[1:], dim=-1)  # [B, T, N - 1], orders 2..N
        return mixes[..., self.order_of] % getattr(self, f"moduli{i}")

    def forward(self, ids: Tensor, x: Tensor, cache=None) -> Tensor:
        state = cache.state(self) if cache is not None else None
        ctx = self.context(ids.long(), state, "ids", PAD)  # [B, T, N]
        self._memory = []
        for i in range(len(self.layers)):
            b = self.keys(ctx, x, state, i)
            if probing(self) and i == 0:
                self._probe.update(ctx=ctx.detach(), buckets=b.detach())
            self._memory.append(self.tables[i](b + getattr(self, f"offsets{i}")).flatten(-2))  # [B, T, G·dim]
        return x

    def before_block(self, ids: Tensor, S: Tensor, residual, layer: int, cache=None) -> Tensor:
        if layer not in self.layers:
            return S
        i = self.layers.index(layer)
        e, H = self._memory[i], residual.read_streams(S)  # [B, T, G·dim], [B, T, n, D]
        D = H.shape[-1]
        gates = []
        for s in range(self.n_streams):
            q = (self.k_norm[i][s](self.w_k[i][s](e)) * self.h_norm[i][s](H[..., s, :])).sum(-1, keepdim=True)
            q = q / math.sqrt(D)
            gates.append(torch.sigmoid(q.sign() * q.abs().clamp_min(1e-6).sqrt()))
        V = torch.stack(gates, dim=-2) * self.w_v[i](e).unsqueeze(-2)  # [B, T, n, D]
        if probing(self):
            self._probe["gate"] = torch.stack(gates).detach().mean()
        normed = torch.stack([self.v_norm[i][s](V[..., s, :]) for s in range(self.n_streams)], dim=-2)
        conv = self.causal_conv(normed.flatten(-2), i, cache).unflatten(-1, (self.n_streams, D))
        return residual.add_streams(S, V + F.silu(conv))

    def causal_conv(self, u: Tensor, i: int, cache) -> Tensor:
        """Depthwise causal convolution over time of u [B, T, C], kernel conv[i] [C, k], dilation max_ngram."""
        state = cache.state(self) if cache is not None else None
        full = self.with_history(u, (self.kernel - 1) * self.dilation, state, f"conv{i}", 0.0)
        w = self.conv[i].unsqueeze(1)
        return F.conv1d(full.transpose(1, 2), w, groups=u.shape[-1], dilation=self.dilation).transpose(1, 2)
