"""Sizing the runs of a grid: each run's vocabulary from its tokenizer, then `grid.match`
(parameters by the FFN width, or FLOPs by the number of steps). Trains tokenizers and builds models
on the meta device, so it runs when the grid launches, not when it is expanded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from escarda_lab import config, registry
from escarda_lab.errors import ConfigError
from escarda_lab.grid.expand import Expansion, Run
from escarda_lab.grid.spec import GridConfig


def resolve(x: Expansion, path: str | Path) -> Expansion:
    """`x` with every run sized: vocab from its tokenizer (trained and cached on first use), then
    the grid's `match` (verdict runs only; budgets and controls keep their shape)."""
    runs = fill_vocab(x.runs, str(path))
    if x.tuning:
        pass
    elif x.spec.match.startswith("params"):
        runs = match_params(runs, x.spec, x.source)
    elif x.spec.match == "flops":
        runs = match_flops(runs, x.source)
    return x._replace(runs=runs)


def fill_vocab(runs: list[Run], source: str) -> list[Run]:
    """Fill model.vocab_size from each run's tokenizer (built once per data config, cached)."""
    from escarda_lab import data

    sizes: dict[str, int] = {}
    out = []
    for r in runs:
        key = config.to_yaml(r.cfg.data)
        if key not in sizes:
            sizes[key] = data.vocab_size(r.cfg.data, source)
        out.append(replace(r, cfg=config.with_vocab(r.cfg, sizes[key], source)))
    return out


def total_params(cfg) -> int:
    return params_of(cfg, "params_total")


def params_of(cfg, kind: str) -> int:
    """Parameters of cfg's model: `params` (non-embedding and active: what a token uses besides
    its embedding row), `params_total` or `params_active`."""
    from escarda_lab.accounting import build_on_meta, embedding_params, param_counts

    model = build_on_meta(cfg)
    counts = param_counts(model)
    if kind == "params":
        return counts["active"] - embedding_params(model)
    return counts["active" if kind == "params_active" else "total"]


def match_params(runs: list[Run], g: GridConfig, src: str, tol: float = 0.01) -> list[Run]:
    """Resize each variant's FFN width (the FFN plugin's `width`) so its parameters (`g.match`:
    non-embedding, total or active) equal its baseline's within ±1%."""
    target: dict[str, int] = {}
    for r in runs:
        if r.variant.name == r.variant.baseline:
            target[r.variant.name] = params_of(r.cfg, g.match)
    cache: dict[str, tuple[Any, dict]] = {}
    out = []
    for r in runs:
        if r.variant.kind in ("rung", "control"):  # budgets and controls keep their own shape
            out.append(r)
            continue
        goal = target[r.variant.baseline]
        if r.variant.name not in cache:
            cache[r.variant.name] = resize(r.cfg, goal, tol, src, r.variant.name, g.match)
        cfg, adjust = cache[r.variant.name]
        out.append(
            replace(
                r, cfg=replace(cfg, seed=r.seed, init_seed=r.cfg.init_seed, data_seed=r.cfg.data_seed), adjust=adjust
            )
        )
    return out


def resize(cfg, goal: int, tol: float, src: str, name: str, kind: str = "params") -> tuple[Any, dict]:
    count = lambda c: params_of(c, kind)  # noqa: E731
    if abs(count(cfg) - goal) <= tol * goal:
        return cfg, {}
    ((ffn, ffn_cfg),) = registry.enabled("ffn", cfg.components)
    key, old = ffn.cls_for(ffn_cfg).width(cfg.model, ffn_cfg)  # the FFN plugin names its width

    def at(h):
        return config.replace_dotted(cfg, key, h)

    lo, hi = 1, max(2 * old, 8)
    while count(at(hi)) < goal and hi < 1 << 20:
        hi *= 2
    while lo < hi:  # smallest width reaching the goal; params grow with the width
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(at(mid)) < goal else (lo, mid)
    best = min({max(lo - 1, 1), lo}, key=lambda h: abs(count(at(h)) - goal))
    what = {"params": "non-embedding active", "params_total": "total", "params_active": "active"}[kind]
    if best < old / 2:
        raise ConfigError(
            src,
            "grid.match",
            f"matching {what} params would shrink variant `{name}`'s {key} "
            f"from {old} to {best}, below half its width: that is a different, broken model, "
            "not a matched one",
            "use `match: none` (and report params beside the result), or `match: flops`, or "
            "match a variant whose parameters the FFN can absorb",
        )
    if abs(count(at(best)) - goal) > tol * goal:
        raise ConfigError(
            src,
            "grid.match",
            f"variant `{name}` cannot reach the baseline's {goal:,} {what} params "
            f"within {tol:.0%} by resizing {key} (closest: {count(at(best)):,})",
            "use `match: none`, or change the variant so the FFN width can absorb the difference",
        )
    return at(best), {key: [old, best]}


def match_flops(runs: list[Run], src: str, tol: float = 0.02) -> list[Run]:
    """Each variant trains for the steps that give its baseline's training FLOPs (steps x tokens
    per step x measured training FLOPs per token); warm-up is kept, the schedule stretches."""
    fpt: dict[str, float] = {}
    for r in runs:
        if r.variant.name not in fpt:
            fpt[r.variant.name] = flops_per_token(r.cfg)
    budget = {
        r.variant.name: train_flops(r.cfg, fpt[r.variant.name]) for r in runs if r.variant.name == r.variant.baseline
    }
    out = []
    for r in runs:
        if r.variant.kind in ("rung", "control"):  # their budgets are the point
            out.append(r)
            continue
        steps = max(1, round(budget[r.variant.baseline] / train_flops(r.cfg, fpt[r.variant.name], steps=1)))
        old = r.cfg.train.max_steps
        if steps < r.cfg.train.warmup_steps:
            raise ConfigError(
                src,
                "grid.match",
                f"matching FLOPs gives variant `{r.variant.name}` {steps} steps, "
                f"fewer than its {r.cfg.train.warmup_steps} warm-up steps",
                "train the baseline longer or shorten train.warmup_steps",
            )
        cfg = replace(r.cfg, train=replace(r.cfg.train, max_steps=steps))
        out.append(replace(r, cfg=cfg, adjust={"train.max_steps": [old, steps]} if steps != old else {}))
    return out


def flops_per_token(cfg) -> float:
    """Measured training FLOPs per token (forward + backward) of cfg's model."""
    from escarda_lab.accounting import train_flops_per_token
    from escarda_lab.model import EscardaLM
    from escarda_lab.objectives import total_loss

    model = EscardaLM(cfg)
    return train_flops_per_token(model, lambda b: total_loss(model, b, model(b["ids"]))[0], cfg.data.seq_len)


def train_flops(cfg, per_token: float, steps: int | None = None) -> float:
    steps = cfg.train.max_steps if steps is None else steps
    return steps * cfg.data.batch_size * cfg.data.seq_len * per_token
