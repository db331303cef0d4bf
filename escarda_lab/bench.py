"""Benchmark: `python -m escarda_lab.bench EXP_OR_GRID.yaml [EXP2.yaml ...] [key=value ...] [--json]`.

Variants: one experiment is benchmarked against the same shape with every plugin off (vanilla),
each of its plugins alone (`vanilla+X`: its cost, printed as ratios to vanilla) and vanilla again
(`vanilla+null`: the ratio a plugin that costs nothing reads, i.e. the noise floor); several
experiments against the first; a grid file's variants (first seed) against the grid's baseline.
Everything is measured in one process, interleaved (A B C, then C B A, ...) to cancel drift:
  * loop overhead: the baseline trained by our LightningModule under lightning.Trainer (what
    `escarda_lab.run` does) vs a hand-written PyTorch loop over the identical model and batches,
    and the share of the Lightning loop's time spent waiting for the next batch (data loading);
  * per variant: train step time of the plain loop, tokens/s, FLOPs/token (FlopCounterMode; per
    plugin as the FLOPs the plugin adds over the variant without it), MFU against a matmul peak
    probed before and after (mean of the two), peak memory (CUDA: max allocated; CPU: peak RSS of
    the process while the variant trains), cached decoding tokens/s, and the step-time ratio to
    the baseline (the median over rounds of the ratio within each round);
  * --decode: decoding also without the KV cache (full recompute per token) and the speed-up;
  * --compile both: every variant eager and compiled (compile time = first step minus a steady step);
  * --head both: every variant with the fused output head and with the logits materialised.
Precision and compile follow the config ("auto": bf16-mixed + compile on a GPU, fp32 eager on CPU).
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "bench")

import contextlib
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from escarda_lab import accounting, conditions, config, data, registry
from escarda_lab.cli import prepare_torch, quiet_libraries, release_free_memory, user_error
from escarda_lab.device import on_gpu, sync
from escarda_lab.errors import UserError
from escarda_lab.module import resolve_runtime
from escarda_lab.objectives import total_loss


def device_of(cfg) -> torch.device:
    return torch.device("cuda" if on_gpu(cfg) else "cpu")


def autocast(cfg, device: torch.device):
    if str(cfg.train.precision).startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_loop(cfg, tokens: data.TokenData, steps: int) -> list[float]:
    """Timestamps (start, then after each step) of a plain PyTorch training loop."""
    from escarda_lab.model import EscardaLM
    from escarda_lab.module import after_step_hooks, compile_model, optimizer

    device = device_of(cfg)
    torch.manual_seed(cfg.seed)
    model = EscardaLM(cfg).to(device)
    compile_model(model, cfg.train.compile)
    opt, sched = optimizer(model, cfg.train, device)
    windows = data.TrainWindows(tokens.train, cfg.data.seq_len, cfg.data.batch_size, config.seeds(cfg)[1], 0, 1)
    after = after_step_hooks(model)
    sync(device)
    stamps = [time.perf_counter()]
    for k in range(steps):
        batch = {n: x.to(device, non_blocking=True) for n, x in windows[k].items()}
        with autocast(cfg, device):
            loss, _ = total_loss(model, batch, model(batch["ids"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        for m in after:
            m.after_step()
        sync(device)
        stamps.append(time.perf_counter())
    return stamps


def lightning_loop(cfg, tokens: data.TokenData, steps: int) -> tuple[list[float], list[float]]:
    """Timestamps of `lightning.Trainer` fitting our module (no logging/val/ckpt), and the time
    before each step spent between steps (waiting for the batch)."""
    import lightning as L

    from escarda_lab.module import EscardaModule

    stamps: list[float] = []
    waits: list[float] = []

    class Stamp(L.Callback):
        def on_train_start(self, *args):
            stamps.append(time.perf_counter())

        def on_train_batch_start(self, *args):
            waits.append(time.perf_counter() - stamps[-1])  # the loader's fetch (and hooks) since the last step

        def on_train_batch_end(self, *args):
            stamps.append(time.perf_counter())

    torch.manual_seed(cfg.seed)
    module = EscardaModule(cfg, tokens.token_bytes)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Stamp()],
        precision=cfg.train.precision,
        accelerator=device_of(cfg).type,
        devices=1,
        use_distributed_sampler=False,
    )
    trainer.fit(module, data.EscardaData(cfg, tokens))
    return stamps, waits


def steady_seconds_per_step(stamps: list[float], warmup: int) -> float:
    """Mean step time after `warmup` steps; stamps[0] is the start, stamps[k] the end of step k."""
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


class PeakMemory:
    """Peak memory while the block runs: CUDA max allocated, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_memory()  # the previous variant's freed heap pages would count as this one's
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            with contextlib.suppress(OSError, StopIteration):
                line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
                self.bytes = int(line.split()[1]) * 1024


def decode_tokens_per_s(model, prompt_len: int, new: int, use_cache: bool) -> float:
    from escarda_lab.generate import generate

    prompt = torch.randint(8, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = generate(model, prompt.tolist(), new, temperature=0.0, use_cache=use_cache)
    return len(out) / (time.perf_counter() - t0)


def flops_per_token(cfg) -> float:
    from escarda_lab.model import EscardaLM

    model = EscardaLM(cfg)
    return accounting.train_flops_per_token(model, lambda b: total_loss(model, b, model(b["ids"]))[0], cfg.data.seq_len)


def plugin_flops(cfg, total: float) -> dict[str, float]:
    """FLOPs/token each enabled plugin adds: this variant minus the same variant without it."""
    out = {}
    for name in registry.toggleable():
        pc = getattr(cfg.components, name)
        if pc.enabled:
            off = replace(cfg, components=replace(cfg.components, **{name: replace(pc, enabled=False)}))
            out[name] = total - flops_per_token(off)
    return out


# ------------------------------------------------------------------------------------- variants


def vanilla_of(cfg, keep: str | None = None):
    """The same shape, data and training with every plugin off (but `keep`, as cfg has it)."""
    comps = {n: replace(getattr(cfg.components, n), enabled=False) for n in registry.toggleable() if n != keep}
    return replace(cfg, name=f"vanilla+{keep}" if keep else "vanilla", components=replace(cfg.components, **comps))


NULL = "vanilla+null"  # vanilla benchmarked again in another slot: what a plugin costing nothing reads


def alone_ratios(res: dict) -> dict[str, float]:
    """{plugin: step time of vanilla with only that plugin on / vanilla's}, "all" for the experiment
    itself and "null" for vanilla's copy, when the variants are an experiment's vanilla, itself and
    its `vanilla+X`."""
    vs, plugins = res["variants"], registry.toggleable()
    if not vs or vs[0]["name"] != "vanilla":
        return {}
    out = {}
    for v in vs:
        prefix, _, plugin = v["name"].partition("+")
        if prefix == "vanilla" and plugin in plugins:
            out[plugin] = v["ratio_to_baseline"]
    full = next((v for v in vs if not v["name"].startswith("vanilla")), None)
    null = [v["ratio_to_baseline"] for v in vs if v["name"] == NULL]
    return {**out, "all": full["ratio_to_baseline"], **({"null": null[0]} if null else {})} if out and full else {}


def time_per_flop_target(plugin: str) -> float:
    """The plugin's own `time_per_flop_target` (registry.Plugin: 1.10 unless it says otherwise)."""
    entry, default = registry.toggleable().get(plugin), registry.Plugin.time_per_flop_target
    if entry is None:
        return default
    return max(getattr(c, "time_per_flop_target", default) for c in entry.variants.values())


def time_per_flop(res: dict) -> dict[str, tuple[float, float, float]]:
    """{plugin: (step-time ratio, FLOP ratio, their quotient)} against vanilla, each plugin alone:
    a plugin's own FLOPs are its architecture, not overhead; the quotient is what its code adds."""
    vs = {v["name"]: v for v in res["variants"]}
    base = vs.get("vanilla")
    if base is None:
        return {}
    out = {}
    full = next((x for x in res["variants"] if not x["name"].startswith("vanilla")), None)
    for plugin, time_ratio in alone_ratios(res).items():
        v = full if plugin == "all" else vs.get(f"vanilla+{plugin}")
        if v is None or plugin == "null":
            continue
        flop_ratio = v["flops_per_token"] / base["flops_per_token"]
        out[plugin] = (time_ratio, flop_ratio, time_ratio / flop_ratio)
    return out


def load_variants(experiments: list[str], overrides: list[str], alone: bool = True) -> list:
    """The configs to compare, baseline first (see the module docstring)."""
    from escarda_lab import grid

    if len(experiments) == 1 and config.read_grid(experiments[0]) is not None:
        g, runs, _, *_ = grid.resolved(experiments[0], overrides)
        first = [r for r in runs if r.seed == g.seeds[0]]
        first.sort(key=lambda r: r.variant.name != r.variant.baseline)
        return [r.cfg for r in first]
    cfgs = [config.load(e, overrides) for e in experiments]
    if len(cfgs) == 1:
        on = [n for n in registry.toggleable() if getattr(cfgs[0].components, n).enabled]
        if on:
            cfgs.insert(0, vanilla_of(cfgs[0]))
        if alone and len(on) > 1:  # each plugin's cost alone, and vanilla again: the noise floor
            cfgs += [vanilla_of(cfgs[1], keep=n) for n in on] + [replace(cfgs[0], name=NULL)]
    return cfgs


def with_tokens(cfgs: list) -> tuple[list, data.TokenData]:
    tokens = data.prepare(cfgs[0].data)
    for c in cfgs[1:]:
        if c.data != cfgs[0].data:
            raise UserError(
                c.name,
                "data",
                "benchmarked experiments use different data settings",
                "compare experiments that share `data:` (or override it for all)",
            )
    return [config.with_vocab(resolve_runtime(c), tokens.tokenizer.vocab_size, "bench") for c in cfgs], tokens


def with_train_switch(cfgs: list, mode: str, field: str, on: str, off: str, suffix: str, plain: bool) -> list:
    """`train.<field>` set on every variant: mode "auto" as configured, `on` / `off` for all, or
    "both": every variant with the `plain` value, then with the other (named `<name>+<suffix>`)."""
    if mode == "auto":
        return cfgs
    if mode in (on, off):
        return [replace(c, train=replace(c.train, **{field: mode == on})) for c in cfgs]
    out = []
    for c in cfgs:
        out.append(replace(c, train=replace(c.train, **{field: plain})))
        out.append(replace(c, name=f"{c.name}+{suffix}", train=replace(c.train, **{field: not plain})))
    return out


def with_compile(cfgs: list, mode: str) -> list:
    """auto, on, off, or both (every variant eager and `+compile`)."""
    return with_train_switch(cfgs, mode, "compile", "on", "off", "compile", plain=False)


def with_head(cfgs: list, mode: str) -> list:
    """auto (as configured), fused, unfused, or both (every variant also `+unfused_head`)."""
    return with_train_switch(cfgs, mode, "fused_head", "fused", "unfused", "unfused_head", plain=True)


# ------------------------------------------------------------------------------------ benchmark


def bench(cfgs: list, tokens: data.TokenData, steps: int, rounds: int, warmup: int, decode: bool) -> dict:
    from escarda_lab.model import EscardaLM, cache_numbers_per_token

    base = cfgs[0]
    device = device_of(base)
    tokens_per_step = base.data.batch_size * base.data.seq_len
    probe = accounting.probe_kind(base)
    before = conditions.measure(device.type, torch.get_num_threads())
    peak_before = accounting.matmul_peak_flops(**probe)
    loop: dict[str, list[float]] = {"pytorch": [], "lightning": []}
    train: list[list[float]] = [[] for _ in cfgs]
    first_step: list[list[float]] = [[] for _ in cfgs]
    memory = [0] * len(cfgs)
    data_wait: list[float] = []
    for r in range(rounds):
        stamps, waits = lightning_loop(base, tokens, steps)
        loop["lightning"].append(steady_seconds_per_step(stamps, warmup))
        data_wait.append(sum(waits[warmup:]) / (stamps[-1] - stamps[warmup]))
        order = list(enumerate(cfgs))
        for i, cfg in order if r % 2 == 0 else order[::-1]:  # alternate the order: no position bias
            torch._dynamo.reset()  # every compiled run pays (and reports) its own compile
            with PeakMemory(device) as mem:
                stamps = plain_loop(cfg, tokens, steps)
            memory[i] = max(memory[i], mem.bytes)
            train[i].append(steady_seconds_per_step(stamps, warmup))
            first_step[i].append(stamps[1] - stamps[0])
    loop["pytorch"] = train[0]
    peak = (peak_before + accounting.matmul_peak_flops(**probe)) / 2

    out = {
        "peak_flops": peak,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens_per_step": tokens_per_step,
        "precision": base.train.precision,
        "loop_overhead": [],
        "variants": [],
        "data_wait_fraction": statistics.median(data_wait),  # of the Lightning loop's step time
        "rounds": rounds,
        "conditions": {**before, "load_end": conditions.load()},
    }
    for name, secs in loop.items():
        s = statistics.median(secs)
        out["loop_overhead"].append({"name": name, "ms_per_step": 1e3 * s, "tokens_per_s": tokens_per_step / s})
    plain_tps = out["loop_overhead"][0]["tokens_per_s"]
    for v in out["loop_overhead"]:
        v["ratio_to_plain"] = v["tokens_per_s"] / plain_tps
    for i, cfg in enumerate(cfgs):
        flops = flops_per_token(cfg)
        s = statistics.median(train[i])
        v = {
            "name": cfg.name,
            "params": accounting.param_counts(EscardaLM(cfg))["total"],
            "flops_per_token": flops,
            "flops_per_token_by_plugin": {} if "+" in cfg.name else plugin_flops(cfg, flops),
            "ms_per_step": 1e3 * s,
            "tokens_per_s": tokens_per_step / s,
            "mfu": tokens_per_step / s * flops / peak,
            # paired by round (the baseline trained in the same round, next to it): drift and other
            # processes move both, so the per-round ratio is steadier than a ratio of medians
            "ratio_to_baseline": statistics.median(a / b for a, b in zip(train[i], train[0])),
            "peak_mem_bytes": memory[i],
            "compiled": bool(cfg.train.compile),
            "precision": cfg.train.precision,
        }
        if cfg.train.compile:
            v["compile_s"] = statistics.median(first_step[i]) - s
        torch.manual_seed(cfg.seed)
        model = EscardaLM(cfg).to(device).eval()  # decoding: eager, one sequence at a time
        half = cfg.model.max_seq_len // 2
        n = half if decode else min(64, half)  # prompt length = new tokens
        v["decode_tokens_per_s"] = decode_tokens_per_s(model, n, n, True)
        if decode:
            v["decode_uncached_tokens_per_s"] = decode_tokens_per_s(model, n, n, False)
            v["cache_speedup"] = v["decode_tokens_per_s"] / v["decode_uncached_tokens_per_s"]
            v["cache_numbers_per_token"] = cache_numbers_per_token(model)
        out["variants"].append(v)
    out["plugin_ratios"] = alone_ratios(out)
    out["time_per_flop"] = time_per_flop(out)
    return out


def report(res: dict, decode: bool) -> str:
    why = conditions.why_noisy(res.get("conditions"), res.get("rounds"))
    lines = [
        (
            f"NOISY: {why}. Ratios drift from run to run under these conditions: use --rounds 3 or more on a "
            "machine with nothing else running."
            if why
            else f"conditions: {res.get('rounds')} rounds, load {(res.get('conditions') or {}).get('load', 0):.1f} "
            f"on {(res.get('conditions') or {}).get('cpus', '?')} cores (quiet)"
        ),
        f"{res['device']}: matmul peak {res['peak_flops'] / 1e9:.0f} GFLOP/s ({res['precision']}), "
        f"{res['tokens_per_step']} tokens/step, torch {res['torch']}, {res['threads']} threads",
        f"\nloop overhead ({res['variants'][0]['name']}):",
    ]
    for v in res["loop_overhead"]:
        lines.append(
            f"  {v['name']:<10} {v['ms_per_step']:8.1f} ms/step {v['tokens_per_s']:9.0f} tokens/s "
            f"{v['ratio_to_plain']:7.3f}x of plain"
        )
    lines.append(f"  waiting for a batch: {100 * res['data_wait_fraction']:.2f}% of the Lightning loop's step time")
    w = max(16, *(len(v["name"]) for v in res["variants"]))
    lines.append(
        f"\n{'variant':<{w}} {'params':>10} {'MFLOP/tok':>10} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6} "
        f"{'step ratio':>10} {'peak MiB':>9} {'decode/s':>9}"
        + (f" {'no-cache/s':>10} {'speedup':>8} {'cache/tok':>9}" if decode else "")
        + "  compile s"
    )
    for v in res["variants"]:
        line = (
            f"{v['name']:<{w}} {v['params']:>10,} {v['flops_per_token'] / 1e6:>10.2f} {v['ms_per_step']:>8.1f} "
            f"{v['tokens_per_s']:>9.0f} {100 * v['mfu']:>5.1f}% {v['ratio_to_baseline']:>9.3f}x "
            f"{v['peak_mem_bytes'] / 2**20:>9.0f} {v['decode_tokens_per_s']:>9.0f}"
        )
        if decode:
            line += (
                f" {v['decode_uncached_tokens_per_s']:>10.0f} {v['cache_speedup']:>7.1f}x "
                f"{v['cache_numbers_per_token']:>9.0f}"
            )
        line += f"  {v['compile_s']:9.1f}" if "compile_s" in v else ""
        lines.append(line)
    alone = res["plugin_ratios"]
    if alone:
        lines.append("\nstep time over vanilla's, each plugin alone (vanilla+X) and all of them:")
        lines.append("  " + ", ".join(f"{k} {r:.2f}x" for k, r in alone.items() if k != "null"))
        if "null" in alone:
            lines.append(
                f"  noise floor: vanilla against itself in another slot reads {alone['null']:.2f}x "
                "(a plugin within this distance of 1.00x costs nothing measurable here)"
            )
    ratios = res.get("time_per_flop") or {}
    if ratios:
        lines.append(
            "\ntime vs FLOPs, each plugin alone against vanilla (target: time/FLOP at most the plugin's "
            "time_per_flop_target, 1.10 unless it declares more):"
        )
        for plugin, (t_ratio, f_ratio, q) in ratios.items():
            target = time_per_flop_target(plugin)
            mark = "ok" if q <= target else f"OVER {target:.2f}"
            lines.append(f"  {plugin:<18} time {t_ratio:5.2f}x  FLOPs {f_ratio:5.2f}x  time/FLOP {q:5.2f}  {mark}")
    lines.append("\nMFLOP/token added by each plugin (variant minus the variant without it):")
    for v in res["variants"]:
        if v["flops_per_token_by_plugin"]:
            parts = ", ".join(f"{k} {f / 1e6:+.2f}" for k, f in v["flops_per_token_by_plugin"].items())
            lines.append(f"  {v['name']}: {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = arguments.parser("bench").parse_args(argv)
    experiments = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    quiet_libraries()
    prepare_torch()
    try:
        if not experiments:
            raise UserError("command line", None, "no experiment file given", "pass e.g. experiments/vanilla.yaml")
        if args.steps <= args.warmup + 1:
            raise UserError(
                "command line",
                "--steps",
                f"--steps {args.steps} leaves nothing to time after --warmup {args.warmup}",
                "use more steps than warmup + 1",
            )
        cfgs, tokens = with_tokens(load_variants(experiments, overrides, alone=not args.no_alone))
        cfgs = with_head(with_compile(cfgs, args.compile), args.head)
        res = bench(cfgs, tokens, args.steps, args.rounds, args.warmup, args.decode)
    except UserError as e:
        print(user_error(e), file=sys.stderr)
        return 2
    print(report(res, args.decode))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
