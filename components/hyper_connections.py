"""`hyper_connections`: n residual streams mixed around every sublayer.

Hyper-Connections (Zhu et al. 2024, arXiv:2409.19606); mHC (DeepSeek, arXiv:2512.24880).
The stream state is X [B, T, n, D]. Around every sublayer F (attention or FFN), with
coefficients pre [n], post [n], R [n, n] (per token in the dynamic variants):

    x_in  = Σ_i pre_i X_i
    X'_k  = post_k · F(x_in) + Σ_j R_jk X_j

variants
    static        pre, post, R learned per sublayer (init: pre = e_(site mod n), post = 1, R = I)
    dynamic       the paper's dynamic HC (Zhu et al. eq. 10-13): each stream's normalised state
                  H̄_j = LayerNorm(X_j) (a learned gain per sublayer) adds
                      pre_j  += s_α tanh(H̄_j · w_pre)      R_j,· += s_α tanh(H̄_j W_R)
                      post_j += s_β tanh(H̄_j · w_post)
                  w zero-initialised, the scales s_α, s_β learned from 0.01
    dynamic_flat  the input-dependent form mHC builds on: [pre; post; R] += φ · RMSNorm(vec X)
                  (all n·D stream values normalised together), φ zero-initialised, no tanh/scale
    mhc           dynamic_flat with pre = σ(·), post = 2σ(·), R = Sinkhorn-Knopp(exp(·)) (doubly
                  stochastic; for n = 2 the closed-form limit of the iterations)
The embedding is copied into every stream (expand); before the head the streams are combined
(collapse): `softmax`, a learned softmax initialised to the mean (Escarda's choice), or `sum`, as
the reference implementations do. Coefficients of all sublayers live in stacked tensors, one row
per sublayer ("site").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from escarda_lab.layers import probing
from escarda_lab.registry import ComponentConfig, Residual, bounded, component


@dataclass
class HyperConnectionsConfig(ComponentConfig):
    variant: Literal["static", "dynamic", "dynamic_flat", "mhc"] = "mhc"
    streams: int = bounded(2, min=1)  # n (hc_mult=2 released)
    sinkhorn_iters: int = bounded(20, min=1)
    eps: float = bounded(1.0e-6, min=0)
    collapse: Literal["softmax", "sum"] = "softmax"  # how the streams become one state before the head
    dynamic_scale: float = bounded(0.01, min=0)  # dynamic: initial s_α and s_β


def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Sinkhorn-Knopp: exp(logits) [..., n, n] alternately row- and column-normalised.

    For n = 2 the iterations' limit has a closed form, used instead (exactly doubly stochastic,
    and one fused expression instead of 4·iters small kernels per token batch):
    R = [[a, 1-a], [1-a, a]] with a = σ((L00 + L11 - L01 - L10) / 2).
    """
    if logits.shape[-1] == 2:
        a = torch.sigmoid((logits[..., 0, 0] + logits[..., 1, 1] - logits[..., 0, 1] - logits[..., 1, 0]) / 2)
        return torch.stack([torch.stack([a, 1 - a], -1), torch.stack([1 - a, a], -1)], -2)
    M = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        M = M / (M.sum(dim=-1, keepdim=True) + eps)
        M = M / (M.sum(dim=-2, keepdim=True) + eps)
    return M


def hc_update(X: Tensor, fn, pre: Tensor, post: Tensor, R: Tensor) -> Tensor:
    """X [B, T, n, D]; pre, post [..., n]; R [..., n, n] -> X' [B, T, n, D].

    Eager: the read and the write as batched per-token products with hand-written backwards.
    Compiled: the plain broadcast-and-sum form, which the compiler fuses.
    """
    if not torch.compiler.is_compiling():
        return WriteStreams.apply(X, fn(ReadStreams.apply(X, pre)), post, R)
    x_in = (pre.unsqueeze(-1) * X).sum(-2)
    mixed = (R.unsqueeze(-1) * X.unsqueeze(-2)).sum(-3)  # Σ_j R_jk X_j
    return mixed + post.unsqueeze(-1) * fn(x_in).unsqueeze(-2)


# Autograd's version of the update makes ~40 passes over [B, T, D] tensors per sublayer for n = 2 (a
# temporary per product, a reduction per broadcast coefficient). These two functions write each
# output once: a sum of n scaled streams to read, a batched (n × n)(n × D) product per token to
# mix (the read is written out elementwise: CPU bmm loops over tokens for a 1-row left factor);
# their backwards are batched matmuls too (a (n+1) × n one gives dX and dy together; the
# coefficients' gradients are per-token dot products). Coefficients are per token ([B, T, ...]) or
# per sublayer (no leading dims); their gradients are summed back. Autocast is off inside: the
# streams are the residual, and stay in their own precision.


def per_token(c: Tensor, lead: torch.Size, tail: int) -> Tensor:
    """A coefficient per sublayer ([*tail]) or per token ([*lead, *tail]) as [N, *tail]."""
    shape = c.shape[c.dim() - tail :]
    return c.expand(*lead, *shape).reshape(-1, *shape)


def broadcast_streams(X: Tensor) -> bool:
    """Whether every stream is the same tensor (the expanded embedding, before the first sublayer)."""
    return X.shape[-2] > 1 and X.stride(-2) == 0


def pair_dots(a: Tensor, b: Tensor) -> Tensor:
    """a [..., i, D], b [..., k, D] -> [..., i, k], the dot products <a_i, b_k>, as one batched
    matmul of row vectors: the layout CPU bmm runs fast. A stream dim that is a broadcast view
    (the expanded embedding) is reduced once, not copied."""
    if broadcast_streams(a):
        return pair_dots(a[..., :1, :], b).expand(*a.shape[:-1], b.shape[-2])
    if broadcast_streams(b):
        return pair_dots(a, b[..., :1, :]).expand(*a.shape[:-1], b.shape[-2])
    return a.contiguous() @ b.contiguous().transpose(-1, -2)


class ReadStreams(torch.autograd.Function):
    """x_in = Σ_j pre_j X_j."""

    @staticmethod
    def forward(ctx, X: Tensor, pre: Tensor) -> Tensor:
        ctx.save_for_backward(X, pre)
        n = X.shape[-2]
        with torch.autocast(X.device.type, enabled=False):
            p = pre.unsqueeze(-1).to(X.dtype)
            if broadcast_streams(X):
                return X[..., 0, :] * p.sum(-2)
            # Elementwise: as a bmm, (1 × n)(n × D) per token falls into a loop over tokens.
            x = X[..., 0, :] * p[..., 0, :]
            for j in range(1, n):
                x.addcmul_(X[..., j, :], p[..., j, :])
            return x

    @staticmethod
    def backward(ctx, g: Tensor):
        X, pre = ctx.saved_tensors
        lead, (n, D) = X.shape[:-2], X.shape[-2:]
        gX = gpre = None
        if ctx.needs_input_grad[0]:  # dX_j = pre_j g: an outer product per token
            P = per_token(pre, lead, 1).to(g.dtype).unsqueeze(-1)  # [N, n, 1]
            gX = (P * g.reshape(-1, 1, D)).view(*lead, n, D)  # a broadcast product: bmm runs it on one thread
        if ctx.needs_input_grad[1]:  # dpre_j = <g, X_j>
            gpre = pair_dots(g.unsqueeze(-2), X).squeeze(-2).sum_to_size(pre.shape).to(pre.dtype)
        return gX, gpre


class WriteStreams(torch.autograd.Function):
    """X'_k = Σ_j R_jk X_j + post_k y."""

    @staticmethod
    def forward(ctx, X: Tensor, y: Tensor, post: Tensor, R: Tensor) -> Tensor:
        ctx.save_for_backward(X, y, post, R)
        lead, (n, D) = y.shape[:-1], X.shape[-2:]
        dtype = torch.promote_types(X.dtype, y.dtype)
        with torch.autocast(y.device.type, enabled=False):
            if broadcast_streams(X):  # Σ_j R_jk X_0 = (Σ_j R_jk) X_0
                out = X[..., :1, :].to(dtype) * R.sum(-2).unsqueeze(-1).to(dtype)
            else:
                Rt = per_token(R, lead, 2).to(dtype).transpose(1, 2)  # [N, k, j]
                out = torch.bmm(Rt, X.reshape(-1, n, D).to(dtype)).view(*lead, n, D)
            return out.addcmul_(y.unsqueeze(-2).to(dtype), post.unsqueeze(-1).to(dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        X, y, post, R = ctx.saved_tensors
        need = ctx.needs_input_grad
        lead, (n, D) = y.shape[:-1], X.shape[-2:]
        gX = gy = gpost = gR = None
        if need[0] or need[1]:  # dX_j = Σ_k R_jk g_k (rows 0..n-1), dy = Σ_k post_k g_k (row n)
            A = torch.cat([per_token(R, lead, 2), per_token(post, lead, 1).unsqueeze(1)], 1).to(g.dtype)
            H = torch.bmm(A, g.reshape(-1, n, D))  # [N, n + 1, D]
            gX = H[:, :n].unflatten(0, lead).to(X.dtype)
            gy = H[:, n].unflatten(0, lead).to(y.dtype)
        if need[2]:  # dpost_k = <y, g_k>
            gpost = pair_dots(y.unsqueeze(-2), g).squeeze(-2).sum_to_size(post.shape).to(post.dtype)
        if need[3]:  # dR_jk = <X_j, g_k>
            gR = pair_dots(X, g).sum_to_size(R.shape).to(R.dtype)
        return gX, gy, gpost, gR


class NormedProjection(torch.autograd.Function):
    """c = RMSNorm(x) φ = (x φ) r with r = (mean(x²) + ε)^-½: x [..., d], φ [d, M] for a handful
    of columns M. The normalised copy of x is never written, and the matmuls run in the layouts
    CPU BLAS is fast at for a skinny φ: c = (φᵀ xᵀ)ᵀ, dφ = ((dc·r)ᵀ x)ᵀ (x φ and its autograd
    dφ = xᵀ dc run 4-10x slower). dx = r (dc φᵀ) - (r² / d) (Σ_m dc_m c_m) x."""

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        r = torch.rsqrt(torch.linalg.vecdot(x2, x2) / x2.shape[-1] + eps)
        c = (phi.T @ x2.T).T * r[:, None]
        ctx.save_for_backward(x2, phi, r, c)
        ctx.shape = x.shape
        return c.reshape(*x.shape[:-1], phi.shape[-1])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, phi, r, c = ctx.saved_tensors
        g2 = g.reshape(-1, phi.shape[-1])
        gx = gphi = None
        gr = g2 * r[:, None]  # [N, M]: r folded in before the matmuls, not after
        if ctx.needs_input_grad[0]:
            s = torch.linalg.vecdot(gr, c) * r / x2.shape[-1]
            gx = (gr @ phi.T).addcmul_(x2, s[:, None], value=-1).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            gphi = (gr.T @ x2).T
        return gx, gphi, None


@component("hyper_connections", slot="residual", config=HyperConnectionsConfig, variant="static")
class HyperConnections(Residual):
    """Static: pre, post, R learned per sublayer (init pre = e_(site mod n), post = 1, R = I)."""

    time_per_flop_target = 1.15  # n streams read and written at every sublayer: memory-bound

    def __init__(self, m, cfg: HyperConnectionsConfig, n_sites: int):
        super().__init__()
        self.n_streams, self.iters, self.eps = cfg.streams, cfg.sinkhorn_iters, cfg.eps
        self.collapse_mode = cfg.collapse
        n, S = cfg.streams, n_sites
        self.pre_b = nn.Parameter(torch.zeros(S, n))
        self.post_b = nn.Parameter(torch.zeros(S, n))
        self.res_b = nn.Parameter(torch.zeros(S, n, n))
        self.collapse_w = nn.Parameter(torch.zeros(n))
        self.build_dynamic(m, cfg, S)
        self._probe: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def build_dynamic(self, m, cfg: HyperConnectionsConfig, n_sites: int) -> None:
        """Parameters of the input-dependent terms (none for static)."""

    def dynamic_terms(self, X: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Input-dependent additions to (pre, post, R) at this site, or None (static)."""
        return None

    @property
    def streams(self) -> int:
        return self.n_streams

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.pre_b, self.post_b, self.res_b, self.collapse_w]

    @torch.no_grad()
    def init_weights(self) -> None:
        n = self.n_streams
        read = F.one_hot(torch.arange(self.pre_b.shape[0]) % n, n).float()  # site s reads stream s mod n
        self.pre_b.copy_(read)
        self.post_b.fill_(1.0)
        self.res_b.copy_(torch.eye(n).expand_as(self.res_b))
        self.collapse_w.zero_()

    def coefficients(self, X: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
        pre, post, R = self.pre_b[site], self.post_b[site], self.res_b[site]
        extra = self.dynamic_terms(X, site)
        if extra is not None:
            pre, post, R = pre + extra[0], post + extra[1], R + extra[2]
        return self.activate(pre, post, R)

    def activate(self, pre: Tensor, post: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The coefficients from their logits (identity here; mHC constrains them)."""
        return pre, post, R

    def expand(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.n_streams, x.shape[-1])

    def sublayer(self, X: Tensor, fn, site: int) -> Tensor:
        pre, post, R = self.coefficients(X, site)
        if probing(self):
            self._probe[site] = (pre.detach(), post.detach(), R.detach())
        return hc_update(X, fn, pre, post, R)

    def collapse(self, X: Tensor) -> Tensor:
        if self.collapse_mode == "sum":
            return X.sum(dim=-2)
        # Σ_i w_i X_i as a broadcast product: einsum would permute X (a copy), and hand backward
        # a stream-major gradient that the next dots must copy again.
        return (self.collapse_w.softmax(0).unsqueeze(-1) * X).sum(-2)

    def read(self, X: Tensor) -> Tensor:
        return X.mean(dim=-2)

    def read_streams(self, X: Tensor) -> Tensor:
        return X

    def add_streams(self, X: Tensor, delta: Tensor) -> Tensor:
        return X + delta

    def add(self, X: Tensor, delta: Tensor) -> Tensor:
        if broadcast_streams(X):  # still the expanded embedding: stays one (the first sublayer's fast paths)
            return self.expand(X[..., 0, :] + delta)
        return X + delta.unsqueeze(-2)

    def stats(self) -> dict[str, float]:
        """Sinkhorn residuals, distance of R from I, and mean pre/post over the last forward."""
        if not self._probe:
            return {}
        n = self.n_streams
        pre, post, R = (
            torch.cat([p[i].reshape(-1, *(n,) * (1 + (i == 2))) for p in self._probe.values()]) for i in range(3)
        )
        return {
            "sinkhorn_row_err": float((R.sum(-1) - 1).abs().max()),
            "sinkhorn_col_err": float((R.sum(-2) - 1).abs().max()),
            "res_minus_identity": float((R - torch.eye(n, device=R.device)).abs().mean()),
            "pre_mean": float(pre.mean()),
            "post_mean": float(post.mean()),
        }


@component("hyper_connections", slot="residual", config=HyperConnectionsConfig, variant="dynamic")
class DynamicHyperConnections(HyperConnections):
    """The paper's dynamic HC: per-stream LayerNorm (learned gain), tanh, learned scales s_α, s_β."""

    def build_dynamic(self, m, cfg: HyperConnectionsConfig, n_sites: int) -> None:
        n, D, S = cfg.streams, m.d_model, n_sites
        self.scale0 = cfg.dynamic_scale
        self.norm_w = nn.Parameter(torch.ones(S, D))
        self.w_alpha = nn.Parameter(torch.zeros(S, D, 1 + n))  # column 0: pre; columns 1..n: R's row
        self.w_beta = nn.Parameter(torch.zeros(S, D))
        self.s_alpha = nn.Parameter(torch.full((S,), cfg.dynamic_scale))
        self.s_beta = nn.Parameter(torch.full((S,), cfg.dynamic_scale))

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        self.norm_w.fill_(1.0)
        self.w_alpha.zero_()
        self.w_beta.zero_()
        self.s_alpha.fill_(self.scale0)
        self.s_beta.fill_(self.scale0)

    def no_weight_decay(self) -> list[nn.Parameter]:
        return super().no_weight_decay() + [self.norm_w, self.s_alpha, self.s_beta]

    def dynamic_terms(self, X: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
        H = F.layer_norm(X, X.shape[-1:], weight=self.norm_w[site])  # [B, T, n, D], per stream
        a = self.s_alpha[site] * torch.tanh(H @ self.w_alpha[site])  # [B, T, n, 1 + n]
        b = self.s_beta[site] * torch.tanh(H @ self.w_beta[site])  # [B, T, n]
        return a[..., 0], b, a[..., 1:]  # pre_j, post_j, R_j,k: row j from stream j


@component("hyper_connections", slot="residual", config=HyperConnectionsConfig, variant="dynamic_flat")
class FlatDynamicHyperConnections(HyperConnections):
    """Static + [pre; post; R] += φ · RMSNorm(vec X): all streams normalised together, φ zero-init."""

    def build_dynamic(self, m, cfg: HyperConnectionsConfig, n_sites: int) -> None:
        n = cfg.streams
        self.phi = nn.Parameter(torch.zeros(n_sites, n * m.d_model, 2 * n + n * n))

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        self.phi.zero_()

    def dynamic_terms(self, X: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
        n, phi = self.n_streams, self.phi[site]
        if torch.compiler.is_compiling():  # the compiler fuses the plain form itself
            c = F.rms_norm(X.flatten(-2), (n * X.shape[-1],), eps=1e-6) @ phi
        elif broadcast_streams(X):  # vec X = [x, .., x]: RMSNorm(vec X) φ = RMSNorm(x) Σ_i φ_i, no copy of X
            c = NormedProjection.apply(X[..., 0, :], phi.unflatten(0, (n, -1)).sum(0), 1e-6)
        else:
            c = NormedProjection.apply(X.flatten(-2), phi, 1e-6)  # [B, T, 2n + n²]
        return c[..., :n], c[..., n : 2 * n], c[..., 2 * n :].unflatten(-1, (n, n))


@component("hyper_connections", slot="residual", config=HyperConnectionsConfig, variant="mhc")
class ManifoldHyperConnections(FlatDynamicHyperConnections):
    """mHC: dynamic, with pre = σ(·), post = 2σ(·), R = Sinkhorn-Knopp(exp(·)) doubly stochastic."""

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        read = F.one_hot(torch.arange(self.pre_b.shape[0]) % self.n_streams, self.n_streams).float()
        # pre = σ(b) ≈ 0.9 / 0.1, post = 2σ(0) = 1, R leaning to I. Off-diagonal logits -1
        # (R = [[.73, .27], [.27, .73]] for n = 2): near-permutation matrices make Sinkhorn
        # converge slowly, and 20 iterations must reach 1e-3.
        self.pre_b.copy_(math.log(9) * (2 * read - 1))
        self.post_b.zero_()
        self.res_b.copy_(torch.eye(self.n_streams) - 1)

    def activate(self, pre: Tensor, post: Tensor, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(R, self.iters, self.eps)
