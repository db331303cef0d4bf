"""Benchmark: `python -m escarda_lab.bench EXPERIMENT.yaml [key=value ...] [--steps N] [--json]`.

Trains the experiment's model two ways in one process, interleaved (A B A B ...) to cancel drift:
  lightning  -- our LightningModule under lightning.Trainer (what `escarda_lab.run` does)
  plain      -- a hand-written PyTorch loop over the identical model, optimizer and batches
and prints steady-state tokens/s, ms/step, FLOPs/token (FlopCounterMode) and MFU against a matmul
peak probed before and after (the probe varies by about ±7% here; we use the mean).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch

from escarda_lab import accounting, config, data
from escarda_lab.errors import UserError
from escarda_lab.objectives import total_loss
from escarda_lab.run import prepare_torch, quiet_libraries, user_error, with_vocab


def plain_loop(cfg, tokens: data.TokenData, steps: int) -> list[float]:
    """Timestamps after each step of a plain PyTorch training loop."""
    from escarda_lab.model import EscardaLM
    from escarda_lab.module import lr_factor, param_groups

    torch.manual_seed(cfg.seed)
    model = EscardaLM(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t))
    windows = data.TrainWindows(tokens.train, cfg.data.seq_len, cfg.data.batch_size, cfg.seed, 0, 1)
    stamps = []
    for k in range(steps):
        batch = windows[k]
        loss, _ = total_loss(model, batch, model(batch["ids"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def lightning_loop(cfg, tokens: data.TokenData, steps: int) -> list[float]:
    """Timestamps after each step of `lightning.Trainer` fitting our module (no logging/val/ckpt)."""
    import lightning as L

    from escarda_lab.module import EscardaModule

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, *args):
            stamps.append(time.perf_counter())

    torch.manual_seed(cfg.seed)
    module = EscardaModule(cfg, tokens.token_bytes)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Stamp()], precision=cfg.train.precision, accelerator=cfg.trainer.accelerator,
                        devices=1, use_distributed_sampler=False)
    trainer.fit(module, data.EscardaData(cfg, tokens))
    return stamps


def steady_seconds_per_step(stamps: list[float], warmup: int) -> float:
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def bench(cfg, steps: int, rounds: int, warmup: int) -> dict:
    tokens = data.prepare(cfg.data)
    cfg = with_vocab(cfg, tokens.tokenizer.vocab_size, "bench")
    from escarda_lab.model import EscardaLM

    model = EscardaLM(cfg)
    flops = accounting.train_flops_per_token(model, lambda b: total_loss(model, b, model(b["ids"]))[0],
                                             cfg.data.seq_len)
    params = accounting.param_counts(model)["total"]
    peak_before = accounting.matmul_peak_flops()
    times: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(rounds):
        for name, loop in (("plain", plain_loop), ("lightning", lightning_loop)):
            times[name].append(steady_seconds_per_step(loop(cfg, tokens, steps), warmup))
    peak = (peak_before + accounting.matmul_peak_flops()) / 2
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    out = {"experiment": cfg.name, "params": params, "flops_per_token": flops, "peak_flops": peak,
           "tokens_per_step": tokens_per_step, "variants": []}
    for name, secs in times.items():
        s = statistics.median(secs)
        out["variants"].append({"name": name, "ms_per_step": 1e3 * s, "tokens_per_s": tokens_per_step / s,
                                "mfu": tokens_per_step / s * flops / peak})
    plain_tps = out["variants"][0]["tokens_per_s"]
    for v in out["variants"]:
        v["ratio_to_plain"] = v["tokens_per_s"] / plain_tps
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m escarda_lab.bench", description=__doc__.splitlines()[0])
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=30, help="steps per timed run (default 30)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = p.parse_args(argv)
    quiet_libraries()
    prepare_torch()
    try:
        cfg = config.load(args.experiment, args.overrides)
        if args.steps <= args.warmup + 1:
            raise UserError("command line", "--steps", f"--steps {args.steps} leaves nothing to time after "
                            f"--warmup {args.warmup}", "use more steps than warmup + 1")
        res = bench(cfg, args.steps, args.rounds, args.warmup)
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    print(f"{res['experiment']}: {res['params']:,} params, {res['flops_per_token'] / 1e6:.2f} MFLOP/token, "
          f"matmul peak {res['peak_flops'] / 1e9:.0f} GFLOP/s, {res['tokens_per_step']} tokens/step")
    print(f"{'loop':<10} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'vs plain':>9}")
    for v in res["variants"]:
        print(f"{v['name']:<10} {v['ms_per_step']:9.1f} {v['tokens_per_s']:10.0f} {100 * v['mfu']:6.1f}% "
              f"{v['ratio_to_plain']:8.3f}x")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
