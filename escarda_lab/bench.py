"""Benchmark: `python -m escarda_lab.bench EXP.yaml [EXP2.yaml ...] [key=value ...] [--decode] [--json]`.

Everything is measured in one process, interleaved (A B C, then C B A, ...) to cancel drift:
  * loop overhead: the first experiment trained by our LightningModule under lightning.Trainer
    (what `escarda_lab.run` does) vs a hand-written PyTorch loop over the identical model,
    optimizer and batches;
  * variants: train step time of every experiment (the plain loop), and its ratio to the first;
  * --decode: greedy decoding of max_seq_len/2 new tokens after a max_seq_len/2 prompt, with the
    KV cache and without it (full recompute per token).
FLOPs/token come from FlopCounterMode; MFU is against a matmul peak probed before and after (the
probe varies by about ±7% here; we use the mean). Overrides apply to every experiment.
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


def decode_tokens_per_s(model, prompt_len: int, new: int, use_cache: bool) -> float:
    from escarda_lab.generate import generate

    prompt = torch.randint(8, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = generate(model, prompt.tolist(), new, temperature=0.0, use_cache=use_cache)
    return len(out) / (time.perf_counter() - t0)


def load_variants(experiments: list[str], overrides: list[str]) -> tuple[list, data.TokenData]:
    cfgs = [config.load(e, overrides) for e in experiments]
    tokens = data.prepare(cfgs[0].data)
    for c in cfgs[1:]:
        if c.data != cfgs[0].data:
            raise UserError(c.name, "data", "benchmarked experiments use different data settings",
                            "compare experiments that share `data:` (or override it for all)")
    return [with_vocab(c, tokens.tokenizer.vocab_size, "bench") for c in cfgs], tokens


def bench(cfgs: list, tokens: data.TokenData, steps: int, rounds: int, warmup: int, decode: bool) -> dict:
    from escarda_lab.model import EscardaLM, cache_numbers_per_token

    base = cfgs[0]
    tokens_per_step = base.data.batch_size * base.data.seq_len
    peak_before = accounting.matmul_peak_flops()
    loop: dict[str, list[float]] = {"plain": [], "lightning": []}
    train: list[list[float]] = [[] for _ in cfgs]
    for r in range(rounds):
        loop["lightning"].append(steady_seconds_per_step(lightning_loop(base, tokens, steps), warmup))
        order = list(enumerate(cfgs))
        for i, cfg in order if r % 2 == 0 else order[::-1]:  # alternate the order: no position bias
            train[i].append(steady_seconds_per_step(plain_loop(cfg, tokens, steps), warmup))
    loop["plain"] = train[0]
    peak = (peak_before + accounting.matmul_peak_flops()) / 2

    out = {"peak_flops": peak, "tokens_per_step": tokens_per_step, "loop_overhead": [], "variants": []}
    base_flops = 0.0
    for name, secs in loop.items():
        s = statistics.median(secs)
        out["loop_overhead"].append({"name": name, "ms_per_step": 1e3 * s, "tokens_per_s": tokens_per_step / s})
    plain_tps = out["loop_overhead"][0]["tokens_per_s"]
    for v in out["loop_overhead"]:
        v["ratio_to_plain"] = v["tokens_per_s"] / plain_tps
    for i, cfg in enumerate(cfgs):
        model = EscardaLM(cfg)
        flops = accounting.train_flops_per_token(model, lambda b: total_loss(model, b, model(b["ids"]))[0],
                                                 cfg.data.seq_len)
        base_flops = base_flops or flops
        s = statistics.median(train[i])
        v = {"name": cfg.name, "params": accounting.param_counts(model)["total"], "flops_per_token": flops,
             "ms_per_step": 1e3 * s, "tokens_per_s": tokens_per_step / s, "mfu": tokens_per_step / s * flops / peak,
             "ratio_to_baseline": s / statistics.median(train[0])}
        if decode:
            half = cfg.model.max_seq_len // 2
            v["decode_tokens_per_s"] = decode_tokens_per_s(model, half, half, True)
            v["decode_uncached_tokens_per_s"] = decode_tokens_per_s(model, half, half, False)
            v["cache_speedup"] = v["decode_tokens_per_s"] / v["decode_uncached_tokens_per_s"]
            v["cache_numbers_per_token"] = cache_numbers_per_token(model)
        out["variants"].append(v)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m escarda_lab.bench", description=__doc__.splitlines()[0])
    p.add_argument("args", nargs="+", help="experiment files (the first is the baseline), then key=value overrides")
    p.add_argument("--steps", type=int, default=30, help="steps per timed run (default 30)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed at the start of each run")
    p.add_argument("--decode", action="store_true", help="also time decoding with and without the KV cache")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = p.parse_args(argv)
    experiments = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    quiet_libraries()
    prepare_torch()
    try:
        if not experiments:
            raise UserError("command line", None, "no experiment file given", "pass e.g. experiments/vanilla.yaml")
        if args.steps <= args.warmup + 1:
            raise UserError("command line", "--steps", f"--steps {args.steps} leaves nothing to time after "
                            f"--warmup {args.warmup}", "use more steps than warmup + 1")
        cfgs, tokens = load_variants(experiments, overrides)
        res = bench(cfgs, tokens, args.steps, args.rounds, args.warmup, args.decode)
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    print(f"matmul peak {res['peak_flops'] / 1e9:.0f} GFLOP/s, {res['tokens_per_step']} tokens/step, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\nloop overhead ({res['variants'][0]['name']}):")
    for v in res["loop_overhead"]:
        print(f"  {v['name']:<10} {v['ms_per_step']:8.1f} ms/step {v['tokens_per_s']:9.0f} tokens/s "
              f"{v['ratio_to_plain']:7.3f}x of plain")
    print(f"\n{'variant':<16} {'params':>10} {'MFLOP/tok':>10} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6} "
          f"{'step ratio':>10}" + (f" {'decode/s':>9} {'no-cache/s':>10} {'speedup':>8} {'cache/tok':>9}"
                                   if args.decode else ""))
    for v in res["variants"]:
        line = (f"{v['name']:<16} {v['params']:>10,} {v['flops_per_token'] / 1e6:>10.2f} {v['ms_per_step']:>8.1f} "
                f"{v['tokens_per_s']:>9.0f} {100 * v['mfu']:>5.1f}% {v['ratio_to_baseline']:>9.3f}x")
        if args.decode:
            line += (f" {v['decode_tokens_per_s']:>9.0f} {v['decode_uncached_tokens_per_s']:>10.0f} "
                     f"{v['cache_speedup']:>7.1f}x {v['cache_numbers_per_token']:>9.0f}")
        print(line)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
