"""Cost accounting: parameters (total / per plugin), FLOPs per token (measured), matmul peak, MFU.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on one training step (forward +
backward). On CPU, SDPA runs a fused kernel the counter does not know, so we register torch's own
attention formulas for it (like torch's formulas, they count the full T×T score matrix).
"""

from __future__ import annotations

from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "accounting")

import time

import torch
import torch.utils.flop_counter as fc
from torch import nn

from escarda_lab import layers
from escarda_lab.device import on_gpu, sync

_aten = torch.ops.aten


def _register_cpu_attention() -> None:
    fwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        fc.register_flop_formula(fwd)(
            lambda query, key, value, *a, out_shape=None, **k: fc.sdpa_flop_count(query, key, value)
        )
    if bwd is not None and bwd not in fc.flop_registry:
        fc.register_flop_formula(bwd)(
            lambda grad_out, query, key, value, *a, out_shape=None, **k: fc.sdpa_backward_flop_count(
                grad_out, query, key, value
            )
        )


_register_cpu_attention()


def param_counts(model: nn.Module) -> dict[str, int]:
    """{"total": n, "active": n, "<component>": n, ...}: shared (tied) weights counted once,
    plugins by name; "active" leaves out what a token does not use (unselected MoE experts)."""
    seen: set[int] = set()
    out: dict[str, int] = {"total": 0}
    owner: dict[int, str] = {}
    for mod in model.modules():
        name = getattr(mod, "component_name", None)
        if name is not None:
            for p in mod.parameters():
                owner.setdefault(id(p), name)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out["total"] += p.numel()
        key = owner.get(id(p), "backbone")
        out[key] = out.get(key, 0) + p.numel()
    out["active"] = out["total"] - sum(m.inactive_params() for m in model.modules() if hasattr(m, "inactive_params"))
    order = {"total": 0, "active": 1}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


PROBE_TOKENS = 1024  # longest sequence the FLOP probe runs; longer ones are extrapolated


def train_flops_per_token(model: nn.Module, loss_fn, seq_len: int, device="cpu") -> float:
    """FLOPs of one forward + backward on one sequence of seq_len tokens, per token.

    Per token, a causal decoder's FLOPs are affine in the sequence length (a constant per token
    plus attention's T×T scores over T), so beyond PROBE_TOKENS the probe counts two shorter
    sequences and extrapolates the line: a 100k-token config is costed in a second instead of
    running a 100k-token step just to count it."""
    if seq_len <= PROBE_TOKENS:
        return _counted_flops_per_token(model, loss_fn, seq_len, device)
    t1, t2 = PROBE_TOKENS // 2, PROBE_TOKENS
    f1, f2 = (_counted_flops_per_token(model, loss_fn, t, device) for t in (t1, t2))
    return f2 + (f2 - f1) * (seq_len - t2) / (t2 - t1)


def _counted_flops_per_token(model: nn.Module, loss_fn, seq_len: int, device="cpu") -> float:
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    batch = {"ids": ids, "labels": ids.clone()}
    with fc.FlopCounterMode(display=False) as counter:
        loss_fn(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / seq_len


def matmul_peak_flops(n: int = 1024, seconds: float = 0.5, dtype=torch.float32, device="cpu") -> float:
    """Measured matmul throughput (FLOP/s) on this machine: the denominator of MFU."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def probe_kind(cfg) -> dict:
    """matmul_peak_flops arguments matching how `cfg` trains: device, and bf16 under bf16 precision."""

    device = "cuda" if on_gpu(cfg) else "cpu"
    dtype = torch.bfloat16 if str(cfg.train.precision).startswith("bf16") else torch.float32
    return {"device": device, "dtype": dtype, "n": 4096 if device == "cuda" else 1024}


def embedding_params(model: nn.Module) -> int:
    """Parameters of the token embedding (and of the output head when it is not tied to it)."""
    mats = {id(model.embed.weight): model.embed.weight.numel(), id(model.head.weight): model.head.weight.numel()}
    return sum(mats.values())


def build_on_meta(cfg) -> nn.Module:
    """The model of `cfg` with meta tensors: shapes and counts, no memory."""
    from escarda_lab.model import EscardaLM

    if cfg.model.vocab_size is None:
        from dataclasses import replace

        cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size))
    with torch.device("meta"):
        return EscardaLM(cfg)


def step_memory_bytes(cfg) -> float:
    """A lower-bound estimate of one training step's memory on one device: fp32 weights, gradients
    and AdamW's two moments (16 bytes per parameter), the activations kept for backward (Korthikanti
    et al. 2022: 34·s·b·h values per layer; no s² term, as fused SDPA keeps no score matrix; the
    residual widened by hyper-connection streams), and the logits with their gradient. Real use is
    higher (workspace, allocator slack), so only steps that cannot fit are refused."""
    m, d = cfg.model, cfg.data
    model = build_on_meta(cfg)
    params = sum(p.numel() for p in model.parameters())
    world = max(1, cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
    tokens = max(1, d.batch_size // world) * d.seq_len
    per_layer = 34 * m.d_model * getattr(model.residual, "streams", 1)
    activations = tokens * m.n_layers * per_layer * 4
    vocab = m.vocab_size or d.tokenizer.vocab_size
    # the fused head holds one chunk of fp32 logits; the unfused one all of them and their gradient
    chunk = max(layers.chunk_rows(kind, vocab) for kind in layers.CHUNK_BYTES)
    logits = 2 * min(tokens, chunk) * vocab * 4 if cfg.train.fused_head else 2 * tokens * vocab * 4
    return 16.0 * params + activations + logits


def machine_memory_bytes(cfg) -> float:
    """Memory of one device of this run: the GPU's, or the machine's physical RAM on CPU."""
    import os

    if on_gpu(cfg) and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def main(argv: list[str] | None = None) -> int:
    """`python -m escarda_lab.accounting EXPERIMENT.yaml [key=value ...]`: parameter breakdown."""
    import sys

    from escarda_lab import arguments, config
    from escarda_lab.cli import user_error
    from escarda_lab.errors import UserError

    args = arguments.parser("accounting").parse_args(argv)
    try:
        cfg = config.load(args.experiment, args.overrides)
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    counts = param_counts(build_on_meta(cfg))
    for name, n in counts.items():
        print(f"{name:<20} {n:>14,}  {100 * n / counts['total']:6.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
