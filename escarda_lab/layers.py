"""Shared primitives: RMSNorm, decoupled RoPE, SwiGLU, causal SDPA, token hashing, the pad id,
the stats-probe guard. Plugins build from these (and from `escarda_lab.registry`), nothing else."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD = 0  # the tokenizer's <pad> id: what n-gram histories hold before the first token
PRIME = 2_147_483_629  # a prime below 2^31: (x · a + c) stays inside int64


def token_hash(ids: Tensor, head: int, n_buckets: int, seed: int = 0) -> Tensor:
    """A fixed universal hash of token ids into [0, n_buckets): depends only on (id, head, seed)."""
    a = (2_654_435_761 * (2 * head + 1) + 97_531 * seed) % PRIME or 1
    c = (40_503 * (head + 1) + 7_919 * seed) % PRIME
    return ((ids.long() * a + c) % PRIME) % n_buckets


def probing(module: nn.Module) -> bool:
    """Whether a forward should keep detached tensors for `stats()`: training, not compiling."""
    return module.training and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The weight in x's dtype: under bf16 autocast a float32 weight blocks the fused kernel.
        w = self.weight.to(x.dtype)
        if lean_autograd(x):
            return _RMSNorm.apply(x, w, self.eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def lean_autograd(x: Tensor) -> bool:
    """Whether to use the hand-written backwards that keep fewer activations: eager CPU training.
    (Under torch.compile the partitioner recomputes cheap elementwise ops itself, and GPU runs
    compile by default.)"""
    return x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()


class _RMSNorm(torch.autograd.Function):
    """F.rms_norm keeping x and r = (mean(x²) + eps)^-½ for backward (the composite CPU form also
    keeps x·r, one more activation-sized tensor). With x̂ = x r, y = x̂ g:
    dg = Σ dy x̂,  dx = r (dy g − x̂ mean(dy g x̂))."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 is normalised in fp32
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return (xf * r).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r
        dy = dy.to(r.dtype)
        dg = (dy * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        dyg = dy * weight.to(r.dtype)
        dx = (dyg - xhat * (dyg * xhat).mean(-1, keepdim=True)).mul_(r)
        return dx.to(x.dtype), None if dg is None else dg.to(weight.dtype), None


class Rope(nn.Module):
    """Rotary embedding of the last `rope_dim` dims of each head; the first dims stay position-free.

    `style="half"` pairs dim i with i + r/2 (Llama / NeoX); `"interleaved"` pairs 2i with 2i+1
    (DeepSeek / GPT-J). Frequencies theta^(-2i/r), i < r/2, as in both families.
    """

    def __init__(self, rope_dim: int, max_seq_len: int, theta: float = 10000.0, style: str = "half"):
        super().__init__()
        self.rope_dim, self.style = rope_dim, style
        inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / max(rope_dim, 1))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # [L, r/2]
        # float64 tables, cast at use to the activations' dtype (at least float32): a float64 model
        # rotates with float64 angles, a float32 or bf16 one exactly as before.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def at(self, start: int, length: int) -> "Rotary":
        """The rotation for positions start .. start+length-1."""
        return Rotary(self.cos[start : start + length], self.sin[start : start + length], self.style)


class Rotary(NamedTuple):
    """Rotation for a run of positions; `rotary(x)` rotates the last rope_dim dims of x."""

    cos: Tensor  # [T, r/2]
    sin: Tensor  # [T, r/2]
    style: str

    def __call__(self, x: Tensor) -> Tensor:
        """x: [B, H, T, hd] -> same shape and dtype (the rotation itself in at least float32)."""
        r = 2 * self.cos.shape[-1]
        if r == 0:
            return x
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.cos.to(dtype), self.sin.to(dtype)
        hd = x.shape[-1]
        nope, rot = x[..., : hd - r], x[..., hd - r :]
        if self.style == "half":
            x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
            rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        rot = rot.to(x.dtype)
        return torch.cat([nope, rot], dim=-1) if r < hd else rot


class SwiGLU(nn.Module):
    """y = W_2 (silu(W_1 x) * W_3 x), with W_1 and W_3 fused into one matmul."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w13(x)
        if lean_autograd(h):
            return _SwiGLUDown.apply(h, self.w2.weight)
        a, b = h.chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class _SwiGLUDown(torch.autograd.Function):
    """y = (silu(a) ⊙ b) W₂ᵀ from h = [a, b], keeping only h and W₂ for backward: silu(a) and the
    product p (two [.., hidden] tensors autograd would keep) are recomputed there, elementwise.
    With s = σ(a): dp = dy W₂, dW₂ = dyᵀ p, db = dp silu(a), da = dp b (s + silu(a)(1 − s))."""

    @staticmethod
    def forward(ctx, h: Tensor, w2: Tensor):
        dtype = compute_dtype(h, w2)
        with torch.autocast(h.device.type, enabled=False):
            a, b = h.to(dtype).chunk(2, dim=-1)
            y = (F.silu(a) * b) @ w2.to(dtype).T
        ctx.dtype = dtype
        ctx.save_for_backward(h, w2)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        h, w2 = ctx.saved_tensors
        dtype = ctx.dtype  # the matmuls' dtype; the elementwise math runs in at least fp32
        a, b = h.to(torch.promote_types(dtype, torch.float32)).chunk(2, dim=-1)
        dy = dy.to(dtype)
        s = torch.sigmoid(a)
        silu = a * s
        dw2 = None
        if ctx.needs_input_grad[1]:
            p = (silu * b).to(dtype)
            dw2 = (dy.reshape(-1, dy.shape[-1]).T @ p.reshape(-1, p.shape[-1])).to(w2.dtype)
            del p
        dp = (dy @ w2.to(dtype)).to(a.dtype)
        dh = torch.empty(h.shape, dtype=a.dtype, device=h.device)
        da, db = dh.chunk(2, dim=-1)
        torch.mul(dp, silu, out=db)
        dsilu = (1 - s).mul_(silu).add_(s)
        torch.mul(dp, b, out=da).mul_(dsilu)
        return dh.to(h.dtype), dw2


def causal_attention(q: Tensor, k: Tensor, v: Tensor, past: int, scale: float | None = None) -> Tensor:
    """Causal SDPA. q: [B, H, T, dq]; k: [B, Hkv, past + T, dq]; v: [B, Hkv, past + T, dv]
    -> [B, H, T, dv]. Query i sits at position past + i and sees keys 0 .. past + i.

    Grouped heads share K/V; a single K/V head is broadcast as a view (no copy per head).
    """
    T, S, H = q.shape[-2], k.shape[-2], q.shape[1]
    if k.shape[1] == 1:
        k, v = k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)
    elif k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class _NllLogSumExp(torch.autograd.Function):
    """(nll, lse) per row of x [N, V]; one softmax in backward serves both outputs.

    nll = lse - x[y], lse = log Σ exp x.  d nll/dx = softmax - onehot(y), d lse/dx = softmax, so
    grad_x = (g_nll + g_lse) softmax(x) - g_nll onehot(y): no [N, V] log-softmax is stored.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor):
        valid = y != -100
        yc = y.clamp(min=0)[:, None]
        # One fused log-softmax pass (torch.logsumexp takes several); lse = x_y - log p_y.
        logp_y = torch.log_softmax(x, dim=-1).gather(1, yc).squeeze(1)
        lse = x.gather(1, yc).squeeze(1) - logp_y
        ctx.save_for_backward(x, yc, valid)
        return -logp_y * valid, lse

    @staticmethod
    def backward(ctx, g_nll: Tensor, g_lse: Tensor):
        x, yc, valid = ctx.saved_tensors
        g_nll = g_nll * valid
        grad = torch.softmax(x, dim=-1).mul_((g_nll + g_lse)[:, None])
        grad.scatter_add_(1, yc, -g_nll[:, None])
        return grad, None


def nll_and_logsumexp(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits [..., V], labels [...] (-100 = ignore) -> (nll, logsumexp), each [...], in fp32."""
    shape = labels.shape
    nll, lse = _NllLogSumExp.apply(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    return nll.view(shape), lse.view(shape)


# fp32 logits of one chunk of rows in the fused head. On CPU a chunk stays under the allocator's
# mmap threshold (cli.MMAP_THRESHOLD, 16 MiB) and within L3 where it can: larger chunks page-fault
# a fresh mapping each and stream every pass through DRAM (8 MiB: a head at vocab 4,096 is 7%
# faster than at 32 MiB). But every chunk re-reads W [V, D], so a chunk keeps at least
# MIN_CHUNK_ROWS rows (at vocab 16,512, 127-row chunks made the head 14% slower than 512-row ones).
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 32 * 2**20}
MIN_CHUNK_ROWS = 512


def chunk_rows(device_type: str, vocab: int) -> int:
    """Rows per chunk of the fused head on this kind of device."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"]) // (4 * vocab))


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a matmul of x and weight runs in here: autocast's, else their promotion."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class _LinearNllLogSumExp(torch.autograd.Function):
    """(nll, lse) per row of the logits x Wᵀ, chunk by chunk: no [N, V] tensor outlives a chunk.

    With p = softmax(x Wᵀ), y one-hot, the logits' gradient is (g_nll + g_lse) p - g_nll y. The
    loss this model trains on is c (Σ nll + ζ Σ lse²) over the valid rows (cross-entropy plus z-loss,
    both means over the valid rows), whose logits' gradient, per unit c, is known in forward:
    (1 + 2ζ lse) p - y on valid rows. So the forward pass computes it chunk by chunk while the
    logits are in hand, and backward, seeing g_nll = c·valid and g_lse = 2ζc·lse·valid, scales it by
    c: the head costs the unfused three matmuls and no recompute. Any other upstream gradient
    (another use of nll or lse) is answered exactly by recomputing the chunks in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, y: Tensor, zeta: float, rows: int, want_grad: bool):
        dtype = compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            valid = y != -100
            yc = y.clamp(min=0)
            nll = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
            lse = torch.empty_like(nll)
            gx = torch.empty_like(x) if want_grad else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_grad else None
            for s in range(0, x.shape[0], rows):
                e = min(s + rows, x.shape[0])
                xc = x[s:e].to(dtype)
                logits = (xc @ w.T).float()
                picked = logits.gather(1, yc[s:e, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                g = logits.sub_(top).exp_()  # exp(logits - max), in place: one pass for lse and p
                total = g.sum(dim=-1)
                lse[s:e] = top.squeeze(1) + total.log()
                nll[s:e] = (lse[s:e] - picked) * valid[s:e]
                if want_grad:  # p = g / total: the 1 / total folds into the prepared coefficient
                    scale = valid[s:e] * (1 + 2 * zeta * lse[s:e]) / total
                    chunk_grads(g, scale, valid[s:e].float(), yc[s:e], w, xc, gx[s:e], gw)
        ctx.zeta, ctx.rows, ctx.dtype = zeta, rows, dtype
        ctx.save_for_backward(x, weight, y, lse, gx, gw)
        return nll, lse

    @staticmethod
    def backward(ctx, g_nll: Tensor, g_lse: Tensor):
        x, weight, y, lse, gx, gw = ctx.saved_tensors
        valid = y != -100
        g_nll = g_nll * valid  # nll is 0 on ignored rows; lse is not
        if gx is not None and valid.any():
            c = g_nll[valid][0]
            expected_lse = (2 * ctx.zeta) * c * lse * valid
            if torch.equal(g_nll, c * valid.float()) and torch.allclose(g_lse, expected_lse, rtol=1e-5, atol=1e-30):
                return (gx * c).to(x.dtype), (gw * c).to(weight.dtype), None, None, None, None
        return _recompute_grads(x, weight, y, g_nll, g_lse, ctx.dtype, ctx.rows) + (None, None, None, None)


def _recompute_grads(x, weight, y, g_nll, g_lse, dtype, rows) -> tuple[Tensor, Tensor]:
    """The exact gradients for any (g_nll, g_lse), recomputing the logits chunk by chunk."""
    yc = y.clamp(min=0)
    w = weight.to(dtype)
    gx = torch.empty_like(x)
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], rows):
        e = min(s + rows, x.shape[0])
        xc = x[s:e].to(dtype)
        p = torch.softmax((xc @ w.T).float(), dim=-1)
        chunk_grads(p, g_nll[s:e] + g_lse[s:e], g_nll[s:e].float(), yc[s:e], w, xc, gx[s:e], gw)
    return gx, gw.to(weight.dtype)


def chunk_grads(p: Tensor, scale: Tensor, minus: Tensor, y: Tensor, w: Tensor, xc: Tensor, gx: Tensor, gw: Tensor):
    """One chunk's logits gradient G = scale·p − minus·onehot(y) (p [n, V] fp32, overwritten) through
    the head: gx ← G w (written into the chunk's rows), gw (fp32) += Gᵀ xc. The matmuls run in
    w's dtype (bf16 under autocast, as the unfused head's would)."""
    p.mul_(scale[:, None]).scatter_add_(1, y[:, None], -minus[:, None])
    g = p.to(w.dtype)
    gx.copy_(g @ w)
    accumulate(gw, g, xc)


def accumulate(gw: Tensor, g: Tensor, xc: Tensor) -> None:
    """gw (fp32) += gᵀ xc, the matmul in g's dtype."""
    if g.dtype == torch.float32:
        gw.addmm_(g.T, xc)
    else:
        gw += (g.T @ xc).float()


def linear_nll_and_logsumexp(
    x: Tensor, weight: Tensor, labels: Tensor, zeta: float = 0.0, rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """(nll, logsumexp) of the logits x Wᵀ without materialising them: x [..., D] (the final
    norm's output), weight [V, D], labels [...] (-100 = ignore) -> two [...] fp32 tensors, equal to
    `nll_and_logsumexp(x @ weight.T, labels)`. ζ: the z-loss weight over the cross-entropy weight
    the gradient is prepared for (any other use stays exact, at the cost of a recompute). rows:
    per chunk (default: `chunk_rows`)."""
    shape = labels.shape
    rows = rows or chunk_rows(x.device.type, weight.shape[0])
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # (forward runs without)
    x = x.reshape(-1, x.shape[-1])
    nll, lse = _LinearNllLogSumExp.apply(x, weight, labels.reshape(-1), zeta, rows, want_grad)
    return nll.view(shape), lse.view(shape)
