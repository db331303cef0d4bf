"""Attention plugins: `mha` (the baseline) and `mla` (Escarda's and DeepSeek's latent attention).

mha -- Vaswani et al. 2017; GQA (Ainslie et al. 2023) / MQA (Shazeer 2019) by `n_kv_heads`;
QK-norm (Dehghani et al. 2023); decoupled RoPE as in DeepSeek-V2 and the Escarda-86M card:

    q = W_q x,  [k; v] = W_kv x                    (H query heads, H_kv key/value heads)
    q, k <- RMSNorm_hd(q), RMSNorm_hd(k)           (optional; one norm over head_dim, all heads)
    q, k <- RoPE on their last rope_dim dims       (the other head_dim - rope_dim stay NoPE)
    y = softmax(q k^T / sqrt(hd) + causal) v;  y <- modifiers(y, v);  out = W_o y

mla, variant `escarda` (the released model): low-rank queries and output, direct K/V heads

    q = W_qb RMSNorm(W_qa x)   (rank q_lora_rank)        out = W_ob W_oa y   (rank o_lora_rank)

    options (defaults = the released model): `factor_init` (how the factors start: LowRank.init_factors),
    `o_norm` (out = W_ob RMSNorm(W_oa y), the norm DeepSeek puts after its query down-projection),
    `factor_lr` (the factors' learning-rate multiple)

mla, variant `deepseek` (DeepSeek-V2, arXiv:2405.04434 §2.1): a shared KV latent
    c = RMSNorm(W_dkv x)                  [kv_lora_rank]      the only thing cached, with k^R
    k^C_i = W_uk,i c,  v_i = W_uv,i c     per head (head_dim - rope_dim and head_dim dims)
    k^R = RoPE(W_kr x)                    [rope_dim], one rotary key shared by all heads
    q_i = [q^C_i; RoPE(q^R_i)] = W_qb RMSNorm(W_qa x)
    score_i = (q^C_i·k^C_i + q^R_i·k^R) / sqrt(head_dim)
Decoding uses the absorbed form: q^C_i W_uk,i is scored against c directly and the attention output
in latent space is mapped by W_uv,i afterwards, so K/V are never materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from escarda_lab.layers import RMSNorm, causal_attention, probing
from escarda_lab.registry import Attention, ComponentConfig, bounded, component


def cached(cache, module: nn.Module, **new: Tensor) -> tuple[dict[str, Tensor], int]:
    """Append `new` tensors ([B, ..., T, d], time on dim -2) to the module's preallocated cache.

    Returns the tensors for positions 0 .. past + T and `past`. Without a cache: (new, 0).
    """
    if cache is None:
        return new, 0
    state, past = cache.state(module), cache.pos
    out = {}
    for name, t in new.items():
        if name not in state:
            shape = (*t.shape[:-2], cache.max_len, t.shape[-1])
            state[name] = t.new_empty(shape)
        state[name][..., past : past + t.shape[-2], :] = t
        out[name] = state[name][..., : past + t.shape[-2], :]
    return out, past


class AttentionProbe:
    """Keeps a detached sample of one forward's queries and keys for a cheap entropy estimate."""

    def remember(self, q: Tensor, k: Tensor) -> None:
        if probing(self):
            self._probe = (q[:1, :, -32:].detach(), k[:1].detach())

    def attention_entropy(self) -> float | None:
        """Mean entropy (nats) of the attention rows of the last 32 queries of one sequence."""
        probe = getattr(self, "_probe", None)
        if probe is None:
            return None
        q, k = probe
        T, S = q.shape[-2], k.shape[-2]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())

    def stats(self) -> dict[str, float]:
        h = self.attention_entropy()
        return {f"entropy_layer{self.layer}": h} if h is not None else {}


class LowRank(nn.Sequential):
    """x -> W_b N(W_a x): a rank-r factorisation of a d_in x d_out map (N = RMSNorm or identity)."""

    @classmethod
    def or_full(cls, d_in: int, rank: int, d_out: int, norm_eps: float | None = None) -> nn.Module:
        """The factorisation, or (rank 0) the full-rank map, as DeepSeek-V2-Lite's uncompressed queries."""
        return cls(d_in, rank, d_out, norm_eps) if rank else nn.Linear(d_in, d_out, bias=False)

    def __init__(self, d_in: int, rank: int, d_out: int, norm_eps: float | None = None):
        super().__init__(
            nn.Linear(d_in, rank, bias=False),
            RMSNorm(rank, norm_eps) if norm_eps is not None else nn.Identity(),
            nn.Linear(rank, d_out, bias=False),
        )

    @torch.no_grad()
    def init_factors(self, kind: str, std: float) -> None:
        """Initialise W_a [r, d_in] and W_b [d_out, r] so the map has the output scale `kind` names.

        released   -- leave the model default: each factor N(0, std²), so W_b W_a starts with entries
                      of sd std²·√r (12× below a full-rank N(0, std²) map at std 0.02, r 16).
        product    -- Gaussian factors whose product has a full-rank map's output variance on
                      unit-RMS inputs (d_in·std²): σ_a = σ_b = (std²/r)^¼ with no norm between them;
                      with a norm, W_a's scale cancels and σ_b = std·√(d_in/r).
        orthogonal -- semi-orthogonal factors with gains whose product has that same Frobenius
                      norm (std·√(d_in·d_out)): g_a·g_b = std·√(d_in·d_out/r), split evenly (no norm)
                      or all on W_b (norm).
        lora       -- W_b = 0 and W_a ~ N(0, 1/d_in) (Hu et al. 2021): the map starts at zero.
        """
        a, b = self[0].weight, self[2].weight
        r, d_in = a.shape
        d_out = b.shape[0]
        normed = not isinstance(self[1], nn.Identity)
        if kind == "released":
            return
        if kind == "product":
            if normed:
                nn.init.normal_(b, std=std * math.sqrt(d_in / r))
            else:
                each = (std * std / r) ** 0.25
                nn.init.normal_(a, std=each)
                nn.init.normal_(b, std=each)
        elif kind == "orthogonal":
            gain = std * math.sqrt(d_in * d_out / r)
            g_a, g_b = (1.0, gain) if normed else (math.sqrt(gain), math.sqrt(gain))
            nn.init.orthogonal_(a, gain=g_a)
            nn.init.orthogonal_(b, gain=g_b)
        elif kind == "lora":
            nn.init.normal_(a, std=1 / math.sqrt(d_in))
            nn.init.zeros_(b)
        else:
            raise ValueError(f"unknown factor init {kind!r}")

    def factors(self) -> list[nn.Parameter]:
        return [self[0].weight, self[2].weight]


@component("mha", slot="attention", baseline=True)
class MultiHeadAttention(AttentionProbe, Attention):
    def __init__(self, m, cfg=None, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = m.n_heads, m.n_kv_heads, m.head_dim
        self.build_queries(m, cfg)
        self.wkv = nn.Linear(m.d_model, 2 * m.n_kv_heads * m.head_dim, bias=False)
        self.build_output(m, cfg)
        self.q_norm = RMSNorm(m.head_dim, m.norm_eps) if m.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(m.head_dim, m.norm_eps) if m.qk_norm else nn.Identity()

    def build_queries(self, m, cfg) -> None:
        self.wq = nn.Linear(m.d_model, m.n_heads * m.head_dim, bias=False)

    def build_output(self, m, cfg) -> None:
        self.wo = nn.Linear(m.n_heads * m.head_dim, m.d_model, bias=False)

    def attend(self, x: Tensor, rotary, cache=None) -> tuple[Tensor, Tensor]:
        """x: [B, T, D] -> y [B, H, T, hd] and this step's values [B, H_kv, T, hd]."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k, v = self.wkv(x).view(B, T, 2, self.n_kv, self.hd).permute(2, 0, 3, 1, 4)  # [B, H_kv, T, hd]
        q, k = rotary(self.q_norm(q)), rotary(self.k_norm(k))
        kv, past = cached(cache, self, k=k, v=v)
        self.remember(q, kv["k"])
        return causal_attention(q, kv["k"], kv["v"], past), v

    def project(self, y: Tensor) -> Tensor:
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))


@dataclass
class MLAConfig(ComponentConfig):
    variant: Literal["escarda", "deepseek"] = "escarda"
    q_lora_rank: int = bounded(128, min=0)  # query bottleneck (both variants); 0 = full-rank queries
    o_lora_rank: int = bounded(128, min=0)  # output bottleneck (escarda); 0 = full-rank output
    kv_lora_rank: int = bounded(128, min=1)  # shared KV latent (deepseek)
    # deepseek: width of each head's value (null: model.head_dim, the query/key width
    # qk_nope_head_dim + qk_rope_head_dim); DeepSeek-V3 uses 128 against 192
    v_head_dim: int | None = bounded(None, min=1)
    # the low-rank factors' init (see LowRank.init_factors); "released" = the released model's
    factor_init: Literal["released", "product", "orthogonal", "lora"] = "released"
    # escarda: an RMSNorm between the output factors, W_ob RMSNorm(W_oa y) (released: none)
    o_norm: bool = False
    # the factors' learning rate as a multiple of train.lr (released: 1)
    factor_lr: float = bounded(1.0, min=0.0)

    def check(self, m) -> list[tuple[str, str, str]]:
        problems = []
        if self.variant == "deepseek" and m.rope_dim >= m.head_dim:
            problems.append(
                ("variant", "deepseek MLA needs a position-free part (rope_dim < head_dim)", "lower model.rope_dim")
            )
        if self.variant != "deepseek" and self.v_head_dim is not None:
            problems.append(("v_head_dim", "v_head_dim applies to variant: deepseek only", "remove it"))
        if self.variant == "deepseek" and self.o_norm:
            problems.append(("o_norm", "o_norm applies to variant: escarda only (a full-rank output)", "remove it"))
        return problems


@component("mla", slot="attention", config=MLAConfig, variant="escarda")
class EscardaMLA(MultiHeadAttention):
    """Low-rank queries and output around the baseline's K/V heads, QK-norm and RoPE."""

    def __init__(self, m, cfg: MLAConfig, layer: int = 0):
        super().__init__(m, cfg, layer)
        self.factor_init, self.factor_lr, self.init_std = cfg.factor_init, cfg.factor_lr, m.init_std

    def build_queries(self, m, cfg: MLAConfig) -> None:
        self.wq = LowRank.or_full(m.d_model, cfg.q_lora_rank, m.n_heads * m.head_dim, m.norm_eps)

    def build_output(self, m, cfg: MLAConfig) -> None:
        eps = m.norm_eps if cfg.o_norm else None
        self.wo = LowRank.or_full(m.n_heads * m.head_dim, cfg.o_lora_rank, m.d_model, eps)

    def low_rank(self) -> list[LowRank]:
        return [w for w in (self.wq, self.wo) if isinstance(w, LowRank)]

    def init_weights(self) -> None:
        for w in self.low_rank():
            w.init_factors(self.factor_init, self.init_std)

    def lr_scales(self) -> list[tuple[nn.Parameter, float]]:
        return [(p, self.factor_lr) for w in self.low_rank() for p in w.factors()]


@component("mla", slot="attention", config=MLAConfig, variant="deepseek")
class DeepSeekMLA(AttentionProbe, Attention):
    """A shared KV latent with decoupled rotary keys (see the module docstring)."""

    def __init__(self, m, cfg: MLAConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.H, self.hd, self.r = m.n_heads, m.head_dim, m.rope_dim
        self.nope = m.head_dim - m.rope_dim
        self.vd = cfg.v_head_dim or m.head_dim
        if m.qk_norm:
            import warnings

            warnings.warn(
                "mla variant deepseek has no per-head QK-norm (DeepSeek normalises the latents instead): "
                "model.qk_norm: true is not applied; set it to false to say so",
                stacklevel=2,
            )
        self.rank = cfg.kv_lora_rank
        self.wq = LowRank.or_full(m.d_model, cfg.q_lora_rank, m.n_heads * m.head_dim, m.norm_eps)
        self.w_dkv = nn.Linear(m.d_model, cfg.kv_lora_rank + m.rope_dim, bias=False)  # [c; k^R]
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, m.norm_eps)
        self.w_uk = nn.Parameter(torch.empty(m.n_heads, self.nope, cfg.kv_lora_rank))
        self.w_uv = nn.Parameter(torch.empty(m.n_heads, self.vd, cfg.kv_lora_rank))
        self.wo = nn.Linear(m.n_heads * self.vd, m.d_model, bias=False)
        self.init_std, self.factor_init, self.factor_lr = m.init_std, cfg.factor_init, cfg.factor_lr

    def init_weights(self) -> None:
        nn.init.normal_(self.w_uk, std=self.init_std)
        nn.init.normal_(self.w_uv, std=self.init_std)
        if isinstance(self.wq, LowRank):
            self.wq.init_factors(self.factor_init, self.init_std)

    def lr_scales(self) -> list[tuple[nn.Parameter, float]]:
        return [(p, self.factor_lr) for p in self.wq.factors()] if isinstance(self.wq, LowRank) else []

    def attend(self, x: Tensor, rotary, cache=None) -> tuple[Tensor, Tensor | None]:
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", d=self.hd)
        q_c, q_r = q[..., : self.nope], rotary(q[..., self.nope :])
        c, k_r = self.w_dkv(x).split([self.rank, self.r], dim=-1)
        c, k_r = self.kv_norm(c), rotary(k_r.unsqueeze(1))  # [B, T, rank], [B, 1, T, r]
        if cache is None:
            y, v = self.naive(q_c, q_r, c, k_r)
        else:
            lat, past = cached(cache, self, c=c.unsqueeze(1), k_r=k_r)
            y = self.absorbed(q_c, q_r, lat["c"], lat["k_r"], past)
            v = torch.einsum("hdr,btr->bhtd", self.w_uv, c) if len(self.modifiers) else None
        return y, v

    def project(self, y: Tensor) -> Tensor:
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))

    def naive(self, q_c, q_r, c, k_r) -> tuple[Tensor, Tensor]:
        """Training path: materialise per-head K and V from the latent."""
        k_c = torch.einsum("hdr,btr->bhtd", self.w_uk, c)
        v = torch.einsum("hdr,btr->bhtd", self.w_uv, c)
        k = torch.cat([k_c, k_r.expand(-1, self.H, -1, -1)], dim=-1)
        q = torch.cat([q_c, q_r], dim=-1)
        self.remember(q, k)
        return causal_attention(q, k, v, 0), v

    def absorbed(self, q_c, q_r, c, k_r, past: int) -> Tensor:
        """Decode path: score queries against the cached latent c [B,1,S,rank] and k^R [B,1,S,r]."""
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_c, self.w_uk)  # W_uk absorbed into the query
        q = torch.cat([q_lat, q_r], dim=-1)
        k = torch.cat([c, k_r], dim=-1)  # one shared "head": multi-query attention in latent space
        o_lat = causal_attention(q, k, c, past, scale=1 / math.sqrt(self.hd))
        return torch.einsum("bhtr,hdr->bhtd", o_lat, self.w_uv)  # W_uv applied after attention
