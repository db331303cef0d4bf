"""LightningModule: training step, AdamW + warmup/cosine, grad clipping, logging, checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import Tensor

from escarda_lab.device import on_gpu, sync
from escarda_lab.errors import Diverged
from escarda_lab.evaluate import SUMS, nll_summary, window_nll
from escarda_lab.model import EscardaLM
from escarda_lab.objectives import total_loss
from escarda_lab.registry import Plugin
from escarda_lab.run_folder import storage_error, write_checksum
from escarda_lab.validation import COMPILE_MODES


def lr_factor(step: int, t) -> float:
    """Linear warmup to 1, then `schedule` down to min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay matrices only: norms, biases, gates and scales (ndim < 2, or listed by a plugin's
    `no_weight_decay()`) are not decayed. Parameters a plugin lists in `lr_scales()` get their
    own groups at lr × multiple (after the two plain groups, which stay first and unchanged)."""
    plugins = [m for m in model.modules() if isinstance(m, Plugin)]
    keep = {id(p) for m in plugins for p in m.no_weight_decay()}
    scale = {id(p): float(s) for m in plugins for p, s in m.lr_scales() if float(s) != 1.0}
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    seen = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        decayed = p.ndim >= 2 and id(p) not in keep
        groups.setdefault((decayed, scale.get(id(p), 1.0)), []).append(p)
    out = []
    for (decayed, s), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if s != 1.0:
            if lr is None:
                raise ValueError("param_groups: a plugin scales learning rates; pass lr")
            group["lr"] = lr * s
        if params or s == 1.0:
            out.append(group)
    return out


def optimizer(model: torch.nn.Module, t, device: torch.device):
    """AdamW over `param_groups` with the warmup + `schedule` learning-rate factor (per step)."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay, t.lr), lr=t.lr, betas=(t.beta1, t.beta2), **fused)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t))


def after_step_hooks(model) -> list:
    """The plugins that define `after_step` (called after every optimizer step)."""
    return [m for _, m in model.plugin_modules() if type(m).after_step is not Plugin.after_step]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 autocast is faster, not slower, than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_runtime(cfg):
    """`cfg` with concrete train.precision and train.compile for this machine: "auto" means
    bf16-mixed + torch.compile on a GPU and fp32 eager on CPU; bf16 asked for on a CPU without
    native bf16 falls back to fp32 with a warning (emulated bf16 is several times slower)."""
    import warnings
    from dataclasses import replace

    gpu = on_gpu(cfg)
    precision, compile_ = str(cfg.train.precision), cfg.train.compile
    if precision == "auto":
        precision = "bf16-mixed" if gpu else "32-true"
    if not gpu and precision.startswith("bf16") and not cpu_has_native_bf16():
        warnings.warn(
            f"train.precision={precision} asked for, but this CPU has no native bf16 "
            "(avx512_bf16 / amx_bf16): training in fp32 instead",
            stacklevel=2,
        )
        precision = "32-true"
    if compile_ == "auto":
        compile_ = gpu
    compile_ = compile_ if compile_ in COMPILE_MODES else bool(compile_)
    return replace(cfg, train=replace(cfg.train, precision=precision, compile=compile_))


def compile_model(model, setting) -> None:
    """`train.compile` as resolved: true (torch.compile's default mode) or a mode name compile;
    anything else (false) leaves the model eager."""
    if setting is True or setting in COMPILE_MODES:
        model.compile(mode=None if setting is True else setting)


class EscardaModule(L.LightningModule):
    def __init__(self, cfg, token_bytes: Tensor, flops_per_token: float = 0.0, peak_flops: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.model = EscardaLM(cfg)
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        # the objective whose term is the head's NLL: the LM loss alone, comparable with val/loss
        self.lm_term = next((n for n, o in self.model.objectives.items() if o.head_terms == {"nll": 1.0}), None)
        self.train_seconds = 0.0  # summed over resumes (saved in checkpoints)
        self.process_train_seconds = 0.0  # this process's share (for the run's timings)
        self.val_seconds = 0.0  # this process's periodic validation
        self._window_seconds, self._window_steps = 0.0, 0
        self._val_sums: Tensor | None = None
        self._pending: dict[str, Tensor | float] = {}
        self.val_history: list[list[float]] = []  # [step, bpb] of each periodic validation
        self.window_scores: list[dict] = []  # whole-split scores at the steps averaged into val_bpb_avg
        self.ema = WeightEMA(self.model, cfg.train.ema) if cfg.train.ema else None
        self.stat_peak: dict[str, float] = {}  # largest |stat| seen at a log step (dead-component checks)
        # Every step's gradient norm (before clipping), kept on the device: spikes are an outcome.
        self.grad_norms = torch.full((cfg.train.max_steps,), float("nan"))
        self._after_step = after_step_hooks(self.model)
        self.last_val: dict | None = None  # the last periodic validation (for progress lines)

    def configure_model(self) -> None:
        """Compiled here, inside fit, so FLOP counting and checkpoint loading see the eager model."""
        if not getattr(self, "_compiled", False):
            compile_model(self.model, self.cfg.train.compile)
            self._compiled = True

    # --------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        opt, sched = optimizer(self.model, self.cfg.train, self.device)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def compute_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return total_loss(self.model, batch, self.model(batch["ids"]))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        loss, terms = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise Diverged(self.global_step, "the training loss")
        if self._log_now():
            self._pending["train/loss"] = loss.detach()
            self._pending.update({f"train/{name}": term.detach() for name, term in terms.items()})
            self._pending["lr"] = self.lr_schedulers().get_last_lr()[0]
        return {"loss": loss, **({"lm_nll": terms[self.lm_term].detach()} if self.lm_term in terms else {})}

    def on_before_optimizer_step(self, optimizer) -> None:
        max_norm = self.cfg.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not torch.isfinite(norm):
            raise Diverged(self.global_step, "the gradient norm")
        if self.global_step < len(self.grad_norms):
            if self.grad_norms.device != norm.device:
                self.grad_norms = self.grad_norms.to(norm.device)
            self.grad_norms[self.global_step] = norm.detach().float()
        if self._log_now():
            self._pending["grad_norm"] = norm

    def _log_now(self) -> bool:
        """Log at steps 0, log_every, 2 log_every, ... (counted before the optimizer step)."""
        return self.global_step % self.cfg.train.log_every == 0

    def write_metrics(self, metrics: dict, step: int) -> None:
        """Straight to the logger at `step` (Lightning's self.log would repeat stale values)."""
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    # ------------------------------------------------------------------------------ throughput
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for mod in self._after_step:  # e.g. MoE's aux-loss-free bias update
            mod.after_step()
        if self.ema is not None:
            self.ema.update(self.model, self.global_step)
        sync(self.device)
        dt = time.perf_counter() - self._t0
        self.score_window()  # after the timing: scoring is not training time
        self.train_seconds += dt
        self.process_train_seconds += dt
        self._window_seconds += dt
        self._window_steps += 1
        if not self._pending:
            return
        step = self.global_step - 1  # the step whose loss was computed
        if self.trainer.world_size > 1:  # every rank logs at the same steps: average the losses
            self._pending = {
                k: self.trainer.strategy.reduce(v, reduce_op="mean") if k.startswith("train/") else v
                for k, v in self._pending.items()
            }
        tps = self._window_steps * self.tokens_per_step / self._window_seconds
        self._pending["perf/tokens_per_s"] = tps
        if self.flops_per_token and self.peak_flops:
            self._pending["perf/mfu"] = tps * self.flops_per_token / (self.peak_flops * self.trainer.world_size)
        with self.trainer.strategy.precision_plugin.forward_context():
            stats = self.model.collect_stats(batch["ids"])
        for k, v in stats.items():
            self.stat_peak[k] = max(self.stat_peak.get(k, 0.0), abs(v))
        self._pending.update({f"components/{k}": v for k, v in stats.items()})
        self.write_metrics(self._pending, step)
        self._pending = {}
        self._window_seconds, self._window_steps = 0.0, 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_seconds"] = self.train_seconds
        checkpoint["stat_peak"] = self.stat_peak
        checkpoint["grad_norms"] = self.grad_norms.cpu()
        checkpoint["val_history"] = self.val_history
        checkpoint["window_scores"] = self.window_scores
        if self.ema is not None:
            checkpoint["ema"] = [t.cpu() for t in self.ema.shadow]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        self.stat_peak = checkpoint.get("stat_peak", {})
        if "grad_norms" in checkpoint:
            self.grad_norms = checkpoint["grad_norms"].clone()
        step = checkpoint.get("global_step", 0)
        self.val_history = [h for h in checkpoint.get("val_history", []) if h[0] <= step]
        self.window_scores = [w for w in checkpoint.get("window_scores", []) if w["step"] <= step]
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load(checkpoint["ema"])

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(SUMS, dtype=torch.float64, device=self.device)
        self._val_t0 = time.perf_counter()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_sums += window_nll(self.model, batch, self.token_bytes)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        val = nll_summary(sums.cpu())
        self.last_val = val
        self.val_seconds += time.perf_counter() - self._val_t0
        self.val_history.append([self.global_step, val["bpb"]])
        self.write_metrics({"val/loss": val["loss"], "val/bpb": val["bpb"], "val/acc": val["acc"]}, self.global_step)

    def window_steps(self) -> list[int]:
        """The steps before the end whose whole-split score is averaged into val_bpb_avg."""
        t = self.cfg.train
        return [t.max_steps - i * (t.average_every or t.val_every) for i in range(1, t.average_last)]

    def score_window(self) -> None:
        """At a step of the averaging window: score the whole validation split (the end of the
        run's own score is added by the caller, so the window is `average_last` scores long)."""
        step = self.global_step
        if step not in self.window_steps() or any(w["step"] == step for w in self.window_scores):
            return
        from escarda_lab.evaluate import score_val_split

        val = score_val_split(self.model, self.trainer.datamodule, self.token_bytes, self.device)
        self.window_scores.append({"step": step, "bpb": val["bpb"], "loss": val["loss"], "acc": val["acc"]})


SPIKE_FACTOR, SPIKE_WINDOW = 5.0, 20


def instability(
    grad_norms: Tensor, warmup_steps: int, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW
) -> dict:
    """Gradient-norm spikes: steps after warm-up whose norm exceeds `factor` x the median of the
    `window` steps before it (a local median, so the normal decline of the norm over training is
    not a spike). Returns the count, the first 20 spike steps and the largest ratio."""
    g = grad_norms.detach().double().cpu()
    ratios, spikes = [], []
    for t in range(max(warmup_steps, 5), len(g)):
        past = g[max(0, t - window) : t]
        past = past[torch.isfinite(past)]
        if not torch.isfinite(g[t]) or len(past) < 5:
            continue
        ratio = float(g[t] / past.median().clamp_min(1e-12))
        ratios.append(ratio)
        if ratio > factor:
            spikes.append(t)
    return {"grad_spikes": len(spikes), "spike_steps": spikes[:20], "max_grad_ratio": max(ratios, default=math.nan)}


class Interrupted(Exception):
    """Training stopped at a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        import signal

        self.step, self.signum = step, signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} (checkpoint saved)")


class WeightEMA:
    """An exponential moving average of the model's floating-point parameters (Polyak averaging),
    the in-run analogue of averaging the final checkpoints. The decay ramps up as
    min(decay, (1 + t) / (10 + t)) so that the average is not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if self.shadow[0].device != self.params[0].device:
            self.shadow = [t.to(self.params[0].device) for t in self.shadow]
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    def load(self, tensors: list[Tensor]) -> None:
        self.shadow = [t.to(p.device).float().clone() for t, p in zip(tensors, self.params)]

    @contextlib.contextmanager
    def applied(self):
        """The model's parameters replaced by the average inside the block, restored after."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, t in zip(self.params, self.shadow):
                p.copy_(t.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, saved):
                    p.copy_(t)


class StopOnSignal(L.Callback):
    """SIGTERM (what SLURM sends before pre-emption or the time limit), SIGINT and SIGUSR1 are
    noted when they arrive and acted on at the end of the current step: checkpoint, then
    `Interrupted`. A rerun resumes from that step exactly."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self, checkpoint: "AtomicCheckpoint"):
        self.checkpoint, self.signum, self._previous = checkpoint, None, {}

    def note(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def on_fit_start(self, trainer, pl_module) -> None:  # the caller's handlers, restored after fitting
        import signal

        self._previous = {name: signal.getsignal(getattr(signal, name)) for name in self.SIGNALS}

    def on_train_start(self, trainer, pl_module) -> None:
        """Installed here, after Lightning's own handlers (registered after on_fit_start): theirs
        would raise SIGTERMException, a SystemExit, between two steps — exit 0, no checkpoint."""
        import signal

        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self.note)

    def restore(self) -> None:
        import signal

        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        self.restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is not None:
            self.checkpoint.save(trainer)
            raise Interrupted(trainer.global_step, self.signum)


class ProgressLog(L.Callback):
    """Progress as log lines, for logs that are not a terminal (`| tee`, a grid's log.txt, SLURM):
    step, the batch's cross-entropy and the total objective (cross-entropy plus every weighted
    auxiliary loss: the two differ whenever JEPA, MTP, z-loss or a router loss is on), the last
    periodic val bpb with its token count, tokens/s and ETA, every tenth of the run or `seconds`."""

    def __init__(self, seconds: float = 60.0, parts: int = 10, log=None):
        import logging

        self.seconds, self.parts = seconds, parts
        self.out = log or logging.getLogger("escarda_lab")
        self._t0 = self._last = 0.0
        self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        now = time.perf_counter()
        every = max(1, total // self.parts)
        if step % every and step != total and now - self._last < self.seconds:
            return
        self._last = now
        done = step - self._start_step
        rate = done / max(now - self._t0, 1e-9)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        ce = outputs.get("lm_nll") if isinstance(outputs, dict) else None
        val = getattr(pl_module, "last_val", None)
        self.out.info(
            "step %d/%d  %sobjective %.4f%s  %.0f tokens/s  ETA %s",
            step,
            total,
            f"train cross-entropy {float(ce):.4f}  " if ce is not None else "",
            float(loss),
            f"  val/bpb {val['bpb']:.4f} (periodic subset, {val['tokens']:,} tokens)" if val else "",
            rate * pl_module.tokens_per_step,
            clock((total - step) / rate if rate > 0 else float("nan")),
        )


def clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class BesideCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint straight to the path it is given. AtomicCheckpoint gives it a temp name
    beside last.ckpt and renames it into place, so nothing is staged elsewhere: Lightning's own
    save goes through an fsspec transaction that stages the whole file in $TMPDIR (often another,
    smaller disk) and then copies it across."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                torch.save(checkpoint, f)
        except RuntimeError as e:  # torch's zip writer, failing after the disk filled: report the disk
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


class AtomicCheckpoint(L.Callback):
    """Saves `last.ckpt` every `every` steps and at the end, via temp file + rename."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = Path(path), every

    def save(self, trainer: L.Trainer) -> None:
        # Not io.atomic_path: every rank calls save_checkpoint with the same temp name (rank 0 writes).
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)  # a partial file a killed process left
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                os.replace(tmp, self.path)
                write_checksum(self.path)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)  # never leave a partial checkpoint behind
            err = storage_error(e, self.path.parent, f"the checkpoint at step {trainer.global_step}")
            if err is not None:
                raise err from None
            raise
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0 and trainer.global_step < trainer.max_steps:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)
