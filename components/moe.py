"""`moe`: DeepSeek-style mixture-of-experts FFN (DeepSeek-V3 §2.1; dense in Escarda-86M).

    s_i  = score(x · e_i)                 score ∈ {softmax, sigmoid, sqrtsoftplus = √softplus}
    S    = top-k of (s_i + b_i)           the bias b only selects (aux-loss-free balancing)
           with n_group > 1 (DeepSeek-V3's node-limited routing): the experts form n_group equal
           groups, each scored by the sum of its two highest (s_i + b_i) (its highest s_i when
           the bias is off, bias_update_speed 0); top-k is taken only inside the topk_group
           best groups. Router logits and routing run in at least float32, autocast off
    g_i  = s_i / Σ_{j∈S} s_j (norm_topk) · routed_scaling            for i ∈ S
    y    = Σ_shared FFN_s(x) + Σ_{i∈S} g_i FFN_i(x)                   (SwiGLU experts)

After every optimizer step b_i -= bias_update_speed · sign(load_i - mean load). An optional
sequence-level balance loss L = Σ_i f_i P_i (f_i: E/(kT) × tokens of the sequence sent to i,
P_i: mean normalised score of i) is added with weight aux_loss_coef. `routing: hash` routes the
first `hash_layers` MoE layers by a fixed token-id hash (DeepSeek-V4's hash layers).
Dispatch is dropless and vectorised: tokens sorted by expert into a padded [E, C, D] buffer, one
batched matmul for all experts, scattered back with their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from escarda_lab import registry
from escarda_lab.layers import SwiGLU, token_hash
from escarda_lab.registry import FFN, ComponentConfig, bounded, component

SCORES = {
    "softmax": lambda z: z.softmax(-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda z: F.softplus(z).sqrt(),
}


@dataclass
class MoEConfig(ComponentConfig):
    n_routed: int = bounded(6, min=1)
    n_shared: int = bounded(1, min=0)
    top_k: int = bounded(2, min=1)
    expert_hidden: int = bounded(0, min=0)  # 0: ffn_hidden // (top_k + n_shared), so active params ≈ the dense FFN
    scoring: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "sqrtsoftplus"
    norm_topk: bool = True
    routed_scaling: float = 1.0
    bias_update_speed: float = 1.0e-3
    aux_loss_coef: float = 0.01
    layers: Any = "all"  # "all" or a list of block indices; the other blocks keep the dense FFN
    routing: Literal["learned", "hash"] = "learned"
    hash_layers: int = 1  # with routing: hash, the first hash_layers MoE layers route by token id
    n_group: int = bounded(1, min=1)  # expert groups (DeepSeek-V3: 8); 1 = flat top-k
    topk_group: int = bounded(1, min=1)  # groups a token may use (DeepSeek-V3: 4)

    def check(self, m) -> list[tuple[str, str, str]]:
        out = []
        if self.n_routed % self.n_group:
            out.append(
                ("n_group", f"n_group={self.n_group} does not divide n_routed={self.n_routed}", "pick a divisor")
            )
        elif self.n_group > 1 and not (
            1 <= self.topk_group <= self.n_group and self.top_k <= self.topk_group * self.n_routed // self.n_group
        ):
            out.append(
                (
                    "topk_group",
                    f"topk_group={self.topk_group} must lie in [1, n_group={self.n_group}] and hold top_k={self.top_k} "
                    f"experts ({self.n_routed // self.n_group} per group)",
                    "raise topk_group or lower top_k",
                )
            )
        if not 1 <= self.top_k <= self.n_routed:
            out.append(
                (
                    "top_k",
                    f"top_k={self.top_k} must lie in [1, n_routed={self.n_routed}]",
                    "pick at most n_routed experts per token",
                )
            )
        if self.layers != "all" and not (
            isinstance(self.layers, list) and all(isinstance(i, int) and 0 <= i < m.n_layers for i in self.layers)
        ):
            out.append(
                (
                    "layers",
                    f"layers must be `all` or block indices below {m.n_layers}",
                    "write e.g. `layers: all` or `layers: [1, 3]`",
                )
            )
        return out

    def moe_layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.layers == "all" else list(self.layers)


@component("moe", slot="ffn", config=MoEConfig)
class MoE(FFN):
    needs_ids = True

    @classmethod
    def build(cls, m, cfg: MoEConfig, layer: int = 0) -> nn.Module:
        """MoE in the listed layers; the slot's dense baseline elsewhere."""
        layers = cfg.moe_layers(m.n_layers)
        if layer not in layers:
            return registry.baseline("ffn").build(m, registry.ComponentConfig(enabled=True), layer=layer)
        return cls(m, cfg, hash_routed=cfg.routing == "hash" and layers.index(layer) < cfg.hash_layers)

    @classmethod
    def width(cls, m, cfg: MoEConfig) -> tuple[str, int]:
        return "components.moe.expert_hidden", cfg.expert_hidden or m.ffn_hidden // (cfg.top_k + cfg.n_shared)

    def __init__(self, m, cfg: MoEConfig, hash_routed: bool = False):
        super().__init__()
        E, H = cfg.n_routed, cfg.expert_hidden or max(1, m.ffn_hidden // (cfg.top_k + cfg.n_shared))
        self.E, self.k, self.H, self.cfg, self.hash_routed = E, cfg.top_k, H, cfg, hash_routed
        self.score = SCORES[cfg.scoring]
        self.router = nn.Linear(m.d_model, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, m.d_model, 2 * H))
        self.w2 = nn.Parameter(torch.empty(E, H, m.d_model))
        self.shared = SwiGLU(m.d_model, cfg.n_shared * H) if cfg.n_shared else None
        self.register_buffer("bias", torch.zeros(E))
        self.register_buffer("load", torch.zeros(E))  # token-expert pairs per expert, last forward
        self.init_std = m.init_std
        self.aux_loss = None

    def init_weights(self) -> None:
        nn.init.normal_(self.w13, std=self.init_std)
        nn.init.normal_(self.w2, std=self.init_std)

    def route(self, x: Tensor, ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, D] -> scores s [N, E], selected experts [N, k], weights [N, k]."""
        # Router logits and routing in at least float32, outside autocast (as DeepSeek's and Hugging
        # Face's code): bf16 logits flip near-tied expert choices.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.to(dtype), self.router.weight.to(dtype))
        s = self.score(z)
        if self.hash_routed:
            first = token_hash(ids.reshape(-1), 0, self.E)
            sel = (first[:, None] + torch.arange(self.k, device=x.device)) % self.E  # k distinct experts
        else:
            sel = self.select(s + self.bias)
        w = s.gather(1, sel)
        if self.cfg.norm_topk:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
        return s, sel, w * self.cfg.routed_scaling

    def select(self, biased: Tensor) -> Tensor:
        """Top-k experts of biased scores [N, E]; with groups, only inside the topk_group best
        groups (DeepSeek-V3's node-limited routing). As DeepSeek's reference, a group scores the
        sum of its two best experts when the bias corrects the load, its best expert when not
        (`bias_update_speed: 0`)."""
        G = self.cfg.n_group
        if G > 1:
            grouped = biased.view(-1, G, self.E // G)
            if self.cfg.bias_update_speed > 0:
                group_score = grouped.topk(min(2, self.E // G), dim=-1).values.sum(-1)  # [N, G]
            else:
                group_score = grouped.amax(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.cfg.topk_group, dim=-1).indices, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.E)
        return biased.topk(self.k, dim=-1).indices

    def experts(self, x: Tensor, sel: Tensor, w: Tensor) -> Tensor:
        """Dropless dispatch: sort (token, expert) pairs by expert, pad to [E, C, D], one bmm.
        C is the busiest expert's load; under torch.compile it is N (no data-dependent shape, so
        fullgraph works, at E/k times the expert FLOPs: padded rows are zeros)."""
        N, D = x.shape
        flat = sel.reshape(-1)
        order = flat.argsort(stable=True)
        expert = flat[order]
        token = order // self.k
        counts = torch.bincount(flat, minlength=self.E)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(flat.numel(), device=x.device) - starts[expert]
        capacity = N if torch.compiler.is_compiling() else int(counts.max())
        buf = x.new_zeros(self.E, capacity, D)
        buf[expert, slot] = x[token]
        a, b = torch.bmm(buf, self.w13).chunk(2, dim=-1)
        out = torch.bmm(F.silu(a) * b, self.w2)  # [E, C, D]
        contrib = out[expert, slot] * w.reshape(-1)[order, None].to(out.dtype)
        if self.training:
            self.load = counts.float().detach()
        return x.new_zeros(N, D).index_add_(0, token, contrib)

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        B, T, D = x.shape
        xf = x.reshape(-1, D)
        s, sel, w = self.route(xf, ids)
        y = self.experts(xf, sel, w)
        if self.shared is not None:
            y = y + self.shared(xf)
        self.aux_loss = None
        if self.cfg.aux_loss_coef > 0 and not self.hash_routed and self.training:
            self.aux_loss = (self.balance_loss(s.view(B, T, -1), sel.view(B, T, -1)), self.cfg.aux_loss_coef)
        return y.view(B, T, D)

    def balance_loss(self, s: Tensor, sel: Tensor) -> Tensor:
        """Sequence-level: mean over sequences of Σ_i f_i P_i (DeepSeek-V3 eq. 17-20)."""
        T = s.shape[1]
        chosen = torch.zeros_like(s).scatter_(-1, sel, 1.0)  # [B, T, E]
        f = chosen.sum(1) * self.E / (self.k * T)
        P = (s / s.sum(-1, keepdim=True)).mean(1)
        return (f * P).sum(-1).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        """Aux-loss-free balancing: lower the bias of overloaded experts, raise the others'."""
        if not self.hash_routed and self.load.sum() > 0:
            self.bias -= self.cfg.bias_update_speed * torch.sign(self.load - self.load.mean())

    def inactive_params(self) -> int:
        """Routed-expert parameters a token does not use (total - active)."""
        return (self.E - self.k) * (self.w13[0].numel() + self.w2[0].numel())

    def stats(self) -> dict[str, float]:
        if self.load.sum() == 0:
            return {}
        frac = self.load / self.load.sum()
        out = {f"load_e{i}": float(v) for i, v in enumerate(frac)}
        out["load_cv"] = float(frac.std(unbiased=False) / frac.mean())
        out["bias_norm"] = float(self.bias.norm())
        return out
