"""The run record, in one place: the numbers a run writes to metrics.json, the ones a grid copies
into results.jsonl, and how compare names them in its tables.

A verdict metric is one `register_metric` call (lm-evaluation-harness's shape): its column in
metrics.json, its short label and unit for tables, and which direction is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    column: str  # the key in metrics.json, results.jsonl and the summary tables
    label: str  # short name in table headers ("Δ bpb")
    unit: str
    higher_is_better: bool


METRICS: dict[str, Metric] = {}


def register_metric(column: str, label: str, unit: str, higher_is_better: bool) -> Metric:
    """Make `column` of metrics.json a metric a grid may compare (`grid.metric`, `compare --metric`)."""
    METRICS[column] = Metric(column, label, unit, higher_is_better)
    return METRICS[column]


register_metric("val_bpb", "bpb", "bits per UTF-8 byte of the validation split", higher_is_better=False)
register_metric("val_loss", "loss", "nats per token of the validation split", higher_is_better=False)
register_metric("val_acc", "acc", "accuracy at the scored positions", higher_is_better=True)
register_metric("val_bpb_avg", "bpb avg", "val_bpb averaged over the last train.average_last scores", False)
register_metric("val_bpb_ema", "bpb EMA", "val_bpb of the weights' moving average (train.ema)", False)

# metrics.json keys a grid copies into its results.jsonl line (with the run's status and error)
RECORDED = [
    *METRICS,
    "params",
    "flops_per_token",
    "tokens_per_s",
    "mfu",
    "dead_components",
    "step",
    "instability",
    "train_tokens",
    "val_bpb_se",
    "val_batch_bpb",
    "val_window",
    "train_seconds",
    "val_tokens",
    "val_whole_split",
    "conditions",
    "git_commit",
    "timings",
]


def fixed_seconds(rec: dict) -> float:
    """A run's cost outside its training steps: process start, imports, data and tokenizer,
    model and Lightning set-up, validation, the final score and writing its files."""
    wall, train = rec.get("wall_s"), rec.get("train_seconds")
    return wall - train if isinstance(wall, (int, float)) and isinstance(train, (int, float)) else math.nan


def run_row(m: dict, variant: str, seed: int, baseline: str, change: str, kind: str) -> dict:
    """The table row of one run from its metrics.json (or results.jsonl) record."""
    params = m.get("params") or {}
    return {
        "variant": variant,
        "seed": seed,
        "baseline": baseline,
        "change": change,
        "kind": kind,
        "status": m.get("status", "missing"),
        **{col: m.get(col, math.nan) for col in METRICS},
        "train_tokens": m.get("train_tokens", math.nan),
        "params_total": params.get("total", math.nan),
        "params_active": params.get("active", math.nan),
        "flops_per_token": m.get("flops_per_token", math.nan),
        "tokens_per_s": m.get("tokens_per_s", math.nan),
        "mfu": m.get("mfu", math.nan),
        "dead": ", ".join(sorted(m.get("dead_components") or {})),
        "error": m.get("error", ""),
        "grad_spikes": (m.get("instability") or {}).get("grad_spikes", 0),
        "eval_se": m.get("val_bpb_se", math.nan),  # the final score's standard error over batches
        "ckpt_sd": window_sd(m.get("val_window") or []),
        "batch_bpb": m.get("val_batch_bpb") or [],
        "conditions": m.get("conditions"),  # the machine's load and the runs sharing it (escarda_lab.conditions)
    }


def window_sd(window: list) -> float:
    """Checkpoint-to-checkpoint sd of bpb over a run's averaging window ([step, bpb] pairs)."""
    values = [b for _, b in window]
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
