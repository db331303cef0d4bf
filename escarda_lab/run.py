"""CLI: `python -m escarda_lab.run EXPERIMENT.yaml [key=value ...]`.

Runs one experiment into runs/<name>/seed<k>/. Rerunning skips a finished run and resumes an
interrupted one from last.ckpt (model, optimizer, schedule and data position).
"""

from __future__ import annotations

from escarda_lab import arguments
from escarda_lab.arguments import help_if_asked

help_if_asked(__name__, "run")

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from escarda_lab import conditions, config, results
from escarda_lab.cli import credited, prepare_torch, quiet_libraries, user_error
from escarda_lab.errors import Diverged, UserError
from escarda_lab.io import atomic_write, read_json, write_json
from escarda_lab.records import METRICS
from escarda_lab.run_folder import (
    check_inputs,
    check_same_config,
    check_writable,
    inputs_of,
    run_dir,
    storage_error,
    verify_checkpoint,
)

log = logging.getLogger("escarda_lab")


def train(cfg, source: str = "experiment") -> dict:
    """Train one run to completion (or resume it); returns its metrics.json content. A finished
    run is skipped; a folder holding a run of a different config is refused, whatever its status."""
    from escarda_lab import data

    quiet_libraries()
    prepare_torch()
    folder = run_dir(cfg)
    check_writable(folder, source)
    clock = {"start": time.perf_counter()}
    tokens = data.prepare(cfg.data, source, config.seeds(cfg)[1])
    clock["data"] = time.perf_counter()
    cfg = config.with_vocab(cfg, tokens.tokenizer.vocab_size, source)
    check_memory(cfg, source)  # before anything is written or built at that size
    resolved = config.to_yaml(cfg)
    check_same_config(folder, resolved, source)  # whatever the folder's status
    previous = read_json(folder / "metrics.json")
    if previous and previous.get("status") == "finished":
        log.info("%s is finished (val/bpb %.4f): skipping", folder, previous["val_bpb"])
        return previous
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP rank Lightning started: rank 0 holds the lock
        return fit(cfg, source, folder, tokens, resolved, clock)
    with run_lock(folder, source):
        return fit(cfg, source, folder, tokens, resolved, clock)


@contextmanager
def run_lock(folder: Path, source: str):
    """One process per run folder: a second one is refused with the holder's PID."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = (folder / ".pid").read_text().strip() if (folder / ".pid").exists() else "?"
        raise UserError(
            source,
            None,
            f"{folder} is being trained by another process (PID {holder})",
            "wait for it to finish, or stop it (it checkpoints on SIGTERM) and rerun to resume",
        ) from None
    try:
        (folder / ".pid").write_text(f"{os.getpid()}\n")
        yield
    finally:
        lock.release()


def fit(cfg, source: str, folder: Path, tokens, resolved: str, clock: dict | None = None) -> dict:
    """Train (or resume) the run in `folder`, holding its lock; returns metrics.json's content."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    class QuietTensorBoard(TensorBoardLogger):
        """No hparams.yaml in the run folder (ours are in config.yaml and TensorBoard's HPARAMS)."""

        def save(self) -> None:
            if self._experiment is not None:
                self.experiment.flush()

    from escarda_lab import accounting, data
    from escarda_lab.evaluate import score_val_split
    from escarda_lab.module import (
        AtomicCheckpoint,
        BesideCheckpointIO,
        EscardaModule,
        Interrupted,
        ProgressLog,
        StopOnSignal,
        instability,
        resolve_runtime,
    )

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.yaml").exists():  # a grid writes it before starting the run
        atomic_write(folder / "config.yaml", resolved)
    check_inputs(folder, inputs_of(cfg, tokens), (folder / "last.ckpt").exists(), source)
    tokens.tokenizer.save(folder)  # generate / evaluate / export read it from the run folder

    cfg = resolve_runtime(cfg)  # after config.yaml: "auto" stays "auto" there, resolved per machine
    L.seed_everything(cfg.seed, verbose=False)
    peak = accounting.matmul_peak_flops(seconds=0.3, **accounting.probe_kind(cfg))
    module = EscardaModule(cfg, tokens.token_bytes, peak_flops=peak)
    module.flops_per_token = accounting.train_flops_per_token(
        module.model, lambda b: module.compute_loss(b)[0], cfg.data.seq_len
    )
    dm = data.datamodule(cfg, tokens)
    ckpt = folder / "last.ckpt"
    resume = ckpt if ckpt.exists() else None
    if resume:
        try:
            verify_checkpoint(ckpt)
        except UserError as e:
            write_json(
                folder / "metrics.json", {"name": cfg.name, "seed": cfg.seed, "status": "failed", "error": str(e)}
            )
            raise
    start_step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] if resume else 0
    if resume:
        log.info("%s: resuming from step %d", folder, start_step)
    logger = QuietTensorBoard(
        save_dir=str(folder), name="", version="", default_hp_metric=False, purge_step=start_step or None
    )
    if trainer_rank_zero() and not start_step:
        logger.experiment.add_custom_scalars(LAYOUT)
    t = cfg.train
    trainer = L.Trainer(
        max_steps=t.max_steps,
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        plugins=[BesideCheckpointIO()],
        callbacks=[saver := AtomicCheckpoint(ckpt, t.checkpoint_every), StopOnSignal(saver)]
        + ([] if sys.stderr.isatty() else [ProgressLog()]),
        logger=logger,
        precision=t.precision,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        num_nodes=cfg.trainer.num_nodes,
        use_distributed_sampler=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        default_root_dir=str(folder),
    )
    params = accounting.param_counts(module.model)
    base = {
        "name": cfg.name,
        "seed": cfg.seed,
        "params": params,
        "precision": t.precision,
        "compiled": t.compile,
        "flops_per_token": module.flops_per_token,
        "peak_flops": peak,
        "conditions": conditions.measure(trainer.strategy.root_device.type, torch.get_num_threads()),
        "git_commit": git_commit(),
    }
    if trainer.is_global_zero:
        write_json(folder / "metrics.json", {**base, "status": "running", "step": start_step})
    t0 = time.perf_counter()
    clock = {**(clock or {}), "fit": t0}
    try:
        trainer.fit(module, dm, ckpt_path=resume)
    except Interrupted as e:
        if trainer.is_global_zero:
            record(folder, {**base, "status": "interrupted", "step": e.step, "error": str(e)})
        raise
    except Diverged as e:
        if trainer.is_global_zero:
            record(
                folder,
                {
                    **base,
                    "status": "diverged",
                    "step": e.step,
                    "error": str(e),
                    "instability": instability(module.grad_norms, t.warmup_steps),
                },
            )
        raise
    except Exception as e:  # recorded so that a grid can report it; the checkpoint stays for a rerun
        err = e if isinstance(e, UserError) else storage_error(e, folder, "the run's files")
        if trainer.is_global_zero:
            record(folder, {**base, "status": "failed", "step": trainer.global_step, "error": str(err or e)})
        if err is not None and err is not e:
            raise err from None
        raise
    if not trainer.is_global_zero:
        return {}

    # The number a grid compares: the whole validation split in non-overlapping windows.
    clock["fit_end"] = time.perf_counter()
    val = score_val_split(module.model, dm, tokens.token_bytes, module.device)
    window = [*module.window_scores, {"step": trainer.global_step, "bpb": val["bpb"]}]
    metrics = {
        **base,
        "status": "finished",
        "step": trainer.global_step,
        "val_loss": val["loss"],
        "val_bpb": val["bpb"],
        "val_acc": val["acc"],  # exact match at the scored positions (next-token accuracy for text)
        "val_tokens": val["tokens"],
        "val_whole_split": not t.final_val_tokens,  # 0: the whole split; else evenly spread windows
        "val_bpb_se": val["bpb_se"],  # over the validation batches
        "val_batch_bpb": val["batch_bpb"],  # per batch: paired with another run's, the paired eval SE
        "val_bpb_avg": sum(w["bpb"] for w in window) / len(window),  # mean of the last average_last scores
        "val_window": [[w["step"], w["bpb"]] for w in window],
        "val_history": module.val_history,  # [step, bpb] of the periodic (val_batches) evaluations
        "train_tokens": trainer.global_step * cfg.data.batch_size * cfg.data.seq_len,
        "tokens_per_s": trainer.global_step * module.tokens_per_step / max(module.train_seconds, 1e-9),
        "train_seconds": module.train_seconds,
        "wall_seconds_this_process": time.perf_counter() - t0,
        "conditions": {**base["conditions"], "load_end": conditions.load()},
        "stats": module.model.stats(),
    }
    if module.ema is not None:
        with module.ema.applied():
            ema = score_val_split(module.model, dm, tokens.token_bytes, module.device)
        metrics.update(val_bpb_ema=ema["bpb"], val_loss_ema=ema["loss"], val_acc_ema=ema["acc"])
    clock["final_val_end"] = time.perf_counter()
    metrics["timings"] = timings(clock, module)
    metrics["instability"] = instability(module.grad_norms, t.warmup_steps)
    metrics["dead_components"] = module.model.health(metrics["stats"], module.stat_peak)
    for name, why in metrics["dead_components"].items():
        log.warning("%s: component %s looks dead: %s", folder, name, why)
    metrics["mfu"] = metrics["tokens_per_s"] * module.flops_per_token / peak
    write_hparams(folder, cfg, metrics)
    write_json(folder / "metrics.json", metrics)
    results.index_run(folder)
    return metrics


def trainer_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def check_memory(cfg, source: str) -> None:
    """Refuse a step that cannot fit the device, before building anything at that size."""
    from escarda_lab import accounting
    from escarda_lab.errors import ConfigError

    need, have = accounting.step_memory_bytes(cfg), accounting.machine_memory_bytes(cfg)
    if need > have:
        raise ConfigError(
            source,
            "data.seq_len",
            f"one training step needs at least {need / 2**30:,.1f} GiB (weights, optimizer state, "
            f"activations at batch_size={cfg.data.batch_size} x seq_len={cfg.data.seq_len}), "
            f"more than this device's {have / 2**30:,.1f} GiB",
            "lower data.seq_len or data.batch_size (or the model's size), or train on more devices",
        )


def record(folder: Path, metrics: dict) -> None:
    """metrics.json of a run that stopped; on a full disk the previous one is left as it was."""
    try:
        write_json(folder / "metrics.json", metrics)
    except OSError as e:
        log.warning("%s: could not record status %s in metrics.json: %s", folder, metrics.get("status"), e)
        return
    results.index_run(folder)


def timings(clock: dict, module) -> dict:
    """Where this process's time went, in seconds: start-up (interpreter, imports, config), the
    data (token cache and tokenizer), set-up (model, FLOP and peak probes, Lightning), the training
    steps, the periodic validation, the rest of the fit (checkpoints, logging, statistics) and the
    final whole-split score. A grid sums them into its fixed-cost table."""
    import escarda_lab

    fit = clock["fit_end"] - clock["fit"]
    steps = module.process_train_seconds
    return {
        "startup": clock["start"] - escarda_lab.STARTED,
        "data": clock["data"] - clock["start"],
        "setup": clock["fit"] - clock["data"],
        "training": steps,
        "periodic_val": module.val_seconds,
        "fit_other": max(fit - steps - module.val_seconds, 0.0),
        "final_val": clock["final_val_end"] - clock["fit_end"],
    }


@contextmanager
def storage_errors_in_threads(folder: Path):
    """A full disk seen first by a background writer (TensorBoard's event thread) is one log line,
    not a thread traceback after the run's own paragraph; other thread errors print as before."""
    import threading

    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and storage_error(args.exc_value, folder, "") is not None:
            name = args.thread.name if args.thread is not None else "a background thread"
            log.warning("%s stopped writing into %s: %s", name, folder, args.exc_value)
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def git_commit() -> str | None:
    """The commit of the escarda_lab checkout that ran (+ "-dirty" with uncommitted changes);
    None outside a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hparams_of(folder: Path, cfg) -> dict:
    """What TensorBoard's HPARAMS table shows: in a grid, the variant, the seed and the keys the
    grid varies (grid_run.json, written by the grid); alone, the name, the seed and the keys that
    differ from the schema's defaults."""
    info = read_json(folder / "grid_run.json")
    if info:
        hp = {"variant": info["variant"], "seed": info["seed"], **info.get("varied", {})}
    else:
        default = config.flatten(config.schema_class()())
        hp = {"name": cfg.name, "seed": cfg.seed}
        hp |= {k: v for k, v in config.flatten(cfg).items() if k not in ("name", "seed") and default.get(k) != v}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hp.items()}


def write_hparams(folder: Path, cfg, metrics: dict) -> None:
    """TensorBoard: the hparams row (`hparams_of`) with the final numbers as its metrics, and the
    final whole-split numbers as the last point of val/loss, val/bpb and val/acc, so the curves end
    where metrics.json and the tables do."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    final = {f"final/{col}": metrics[col] for col in METRICS if col in metrics}  # the verdict metrics it has
    writer = SummaryWriter(log_dir=str(folder))
    for summary in hparams(hparams_of(folder, cfg), final):
        writer.file_writer.add_summary(summary)
    for k, v in final.items():
        writer.add_scalar(k, v, metrics["step"])
        writer.add_scalar(k.replace("final/val_", "val/"), v, metrics["step"])
    writer.close()


# TensorBoard's CUSTOM SCALARS tab: the charts that compare runs, first. train/loss is the weighted
# total of every objective (MTP, JEPA, ...); train/cross_entropy compares across variants.
LAYOUT = {
    "compare": {
        "val/bpb (last point: the whole split)": ["Multiline", ["val/bpb"]],
        "val/loss": ["Multiline", ["val/loss"]],
        "val/acc": ["Multiline", ["val/acc"]],
        "train/cross_entropy (the LM term alone)": ["Multiline", ["train/cross_entropy"]],
        "train/loss (weighted total of every objective)": ["Multiline", ["train/loss"]],
    },
    "speed and stability": {
        "tokens/s": ["Multiline", ["perf/tokens_per_s"]],
        "MFU": ["Multiline", ["perf/mfu"]],
        "grad norm": ["Multiline", ["grad_norm"]],
        "learning rate": ["Multiline", ["lr"]],
    },
    "components": {"component stats": ["Multiline", ["components/.*"]]},
}


class GridStopped(Exception):
    """SIGTERM (or SIGUSR1) reached the grid's own process."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")


def run_grid(args) -> int:
    """A grid in this process; Ctrl-C or SIGTERM stops every running run at its current step (each
    checkpoints) and exits 128 + the signal, one line per run: rerunning resumes them."""
    import signal

    from escarda_lab import grid

    def stop(signum, frame):
        raise GridStopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        results = grid.run_grid(args.experiment, args.overrides, dry_run=args.dry_run, echo=log.info)
    except KeyboardInterrupt:
        log.warning("grid interrupted (Ctrl-C): rerun the same command to resume")
        return 128 + signal.SIGINT
    except GridStopped as e:
        log.warning("grid stopped by signal %d: rerun the same command to resume", e.signum)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    bad = [r for r in results if r["status"] not in ("finished", "held")]
    for r in bad:
        log.warning("%s seed%d: %s: %s", r["variant"], r["seed"], r["status"], r.get("error", ""))
    held = [r for r in results if r["status"] == "held"]
    if held:
        log.warning(
            "%d run(s) held by another process (%s): they train there; rerun this grid afterwards to record them",
            len(held),
            ", ".join(f"{r['variant']} seed{r['seed']}" for r in held[:6]),
        )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    from escarda_lab.module import Interrupted

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = arguments.parser("run").parse_intermixed_args(argv)  # FILE --dry-run key=val works too
    cfg = None
    try:
        if config.read_grid(args.experiment) is not None:
            return run_grid(args)
        cfg = config.load(args.experiment, args.overrides)
        if args.dry_run:  # a single run: show what would train, train nothing
            print(config.to_yaml(cfg), end="")
            log.info("would train into %s", run_dir(cfg))
            return 0
        with storage_errors_in_threads(run_dir(cfg)):
            metrics = train(cfg, args.experiment)
    except UserError as e:
        print(user_error(credited(e, args.experiment, args.overrides)), file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"escarda_lab: {run_dir(cfg)}: {e}; rerun the same command to resume.", file=sys.stderr)
        return 128 + e.signum
    except OSError as e:
        err = storage_error(e, run_dir(cfg), "the run's files") if cfg is not None else None
        if err is None:
            raise
        print(user_error(err), file=sys.stderr)
        return 2
    except Diverged as e:
        print(
            f"escarda_lab: {e}; recorded as status=diverged in {run_dir(cfg) / 'metrics.json'}. "
            "Lower train.lr, raise train.warmup_steps or enable z_loss.",
            file=sys.stderr,
        )
        return 1
    if metrics:
        log.info(
            "%s: %s (%s tokens): val/loss %.4f (cross-entropy)  val/bpb %.4f  val/acc %.4f"
            "  (%s params, %.0f tokens/s, MFU %.1f%%)",
            run_dir(cfg),
            "whole validation split" if metrics.get("val_whole_split", True) else "validation split, capped",
            f"{metrics.get('val_tokens', 0):,}",
            metrics["val_loss"],
            metrics["val_bpb"],
            metrics["val_acc"],
            f"{metrics['params']['total']:,}",
            metrics["tokens_per_s"],
            100 * metrics.get("mfu", 0),
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
