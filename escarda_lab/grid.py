"""Grids: a YAML with a `grid:` block expands into many runs, trained one process each.

    extends: escarda.yaml
    name: leave_one_out            # runs go to <output.dir>/leave_one_out/<variant>/seed<k>/
    grid:
      baseline: full               # "full" is the file itself; any variant name may be the baseline
      seeds: [0, 1, 2]
      leave_one_out: [engram, xsa] # variants no_engram, no_xsa
      add_one_in: [engram]         # variants vanilla (every plugin off) and with_engram
      variants: {wide: {model.d_model: 192}}
      axes: {model.n_layers: [2, 4]}
      match: params                # none | params
      parallel: 1
      launcher: local              # local | submitit
      evaluate: [minimal_pairs]    # after training: escarda_lab.evaluate suites, tasks, texts

Each run's fully resolved config is written to its folder as config.yaml before it starts, so
`python -m escarda_lab.run runs/<grid>/<variant>/seed<k>/config.yaml` reruns one run by hand.
`results.jsonl` in the grid folder holds one line per run; `grid.json` holds the plan that
`escarda_lab.compare` reads.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from omegaconf import OmegaConf

from escarda_lab import config, registry
from escarda_lab.errors import ConfigError, UserError
from escarda_lab.io import atomic_write, read_json, write_json
from escarda_lab.registry import bounded
from escarda_lab.runs import check_same_config, run_dir


@dataclass
class SubmititConfig:
    cluster: str | None = None  # None: SLURM when available; "local" runs the same path on this machine
    partition: str | None = None
    timeout_min: int = 240
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 16
    nodes: int = 1


@dataclass
class TuneConfig:
    """A short sweep of one key per variant before the verdict runs (the best value is kept)."""

    key: str = "train.lr"
    values: list[Any] = field(default_factory=list)
    seeds: int = bounded(1, min=1)  # tuning seeds TUNE_SEED, TUNE_SEED + 1, ...: never reused by verdict runs
    max_steps: int | None = bounded(None, min=1)  # None: as long as the verdict runs
    at: str | None = None  # with grid.settings: tune at this setting only; every setting uses its value


@dataclass
class LadderConfig:
    """The baseline (and with `variants: true` every variant) again at other budgets ("rungs"):
    token multiples of the file's steps (the schedule stretched with them) and/or named model sizes.
    compare fits the baseline's loss against training FLOPs and reports compute multipliers."""

    tokens: list[float] = field(default_factory=list)  # e.g. [0.5, 2]: x the file's max_steps (1 is the file)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {d192: {model.d_model: 192}}
    variants: bool = False  # ladder every variant, not only the baseline


TUNE_SEED = 1000
NULL_SEED_OFFSET = 10000


@dataclass
class GridConfig:
    baseline: str = "full"
    seeds: list[int] = field(default_factory=lambda: [0])
    leave_one_out: list[str] = field(default_factory=list)
    add_one_in: list[str] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    # named bundles of overrides crossed with every variant (e.g. probe tasks at several difficulties)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # params: non-embedding active parameters
    match: Literal["none", "params", "params_total", "params_active", "flops"] = "none"
    parallel: int = bounded(1, min=1)
    # > 0: runs share the visible GPUs this many to a GPU, each pinned by CUDA_VISIBLE_DEVICES
    # (parallel becomes GPUs × per_gpu); small models leave most of one GPU idle
    per_gpu: int = bounded(0, min=0)
    launcher: Literal["local", "submitit"] = "local"
    evaluate: list[str] = field(default_factory=list)  # minimal_pairs, task .jsonl files, text:FILE, corpus:NAME
    vanilla: bool = False  # add the every-plugin-off variant (add_one_in adds it too)
    controls: bool = False  # add control_null and control_half_budget (see `controls`)
    margin: float = bounded(0.01, above=0)  # bpb: differences within ±margin count as equivalent (TOST)
    tune: TuneConfig | None = None
    ladder: LadderConfig | None = None
    submitit: SubmititConfig = field(default_factory=SubmititConfig)


@dataclass
class Variant:
    name: str
    change: str  # what differs from the file, for tables: "-engram", "+engram", "model.d_model=192"
    kind: str  # base | removed | added | changed
    overrides: dict  # dotted key -> value
    baseline: str = ""  # the variant this one is compared with (same axes values)
    axes: dict = field(default_factory=dict)  # dotted key -> value; wins over command-line overrides
    seed_offset: int = 0  # control_null: init and data seeds are seed + offset (the folder keeps seed)
    tune_as: str = ""  # the variant whose tuned value this one uses ("" = itself; controls: the baseline)
    forced: dict = field(default_factory=dict)  # dotted key -> value that wins over the command line
    setting: str = ""  # the grid.settings entry this variant runs at ("" = none)
    rung_of: str = ""  # a ladder rung: the variant it is a budget of
    family: str = ""  # the variant's name before axes and settings tags


@dataclass
class Run:
    variant: Variant
    seed: int
    cfg: Any
    adjust: dict = field(default_factory=dict)  # match: params resizing, {key: [old, new]}

    @property
    def folder(self) -> Path:
        return run_dir(self.cfg)


# ------------------------------------------------------------------------------------ expansion


def read_spec(path: str | Path, overrides: list[str] = ()) -> tuple[GridConfig, str] | None:
    """The grid block of `path`, with `grid.key=value` command-line overrides applied."""
    found = config.read_grid(path)
    if found is None:
        return None
    raw, src = found
    if overrides:
        cli = config.parse_overrides(overrides)["grid"]
        raw = {**raw, **cli}
        src = f"{src} or the command line"
    node = OmegaConf.create({"grid": OmegaConf.structured(GridConfig)})
    if isinstance(raw.get("tune"), dict):  # typed (and its keys checked) like every other block
        node.grid.tune = OmegaConf.structured(TuneConfig)
    if isinstance(raw.get("ladder"), dict):
        node.grid.ladder = OmegaConf.structured(LadderConfig)
    spec = OmegaConf.to_object(config.merge_into(node, {"grid": raw}, src))["grid"]
    config.check_bounds(spec, lambda key: src, "grid.")
    check_spec(spec, src)
    return spec, src


def check_spec(g: GridConfig, src: str) -> None:
    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(src, f"grid.{key}", problem, fix)

    """What the schema cannot say: names that must exist, non-empty lists, seed ranges, files."""
    plugins = registry.toggleable()
    need(
        bool(g.seeds) and min(g.seeds) >= 0,
        "seeds",
        f"seeds must be a non-empty list of integers >= 0, got {g.seeds!r}",
        "write e.g. `seeds: [0, 1, 2]`",
    )
    for key in ["leave_one_out", "add_one_in"]:
        for n in getattr(g, key):
            need(n in plugins, key, f"unknown component `{n}`", f"registered components are: {', '.join(plugins)}")
    need(
        all(g.axes.values()),
        "axes",
        "every axis needs at least one value",
        "write e.g. `axes: {model.d_model: [64, 128]}`",
    )
    need(
        all(isinstance(b, dict) and b for b in g.settings.values()),
        "settings",
        "every setting needs a mapping of overrides",
        "write e.g. `settings: {mqar4: {data.corpus: probe:mqar, data.probe.num_kv_pairs: 4}}`",
    )
    if g.tune is not None:
        t = g.tune
        need(
            t.at is None or t.at in g.settings,
            "tune.at",
            f"tune.at={t.at!r} is not one of the settings",
            f"use one of: {', '.join(g.settings) or '(none: add grid.settings first)'}",
        )
        need(
            len(t.values) >= 2,
            "tune.values",
            f"tune needs at least two values to choose from, got {t.values!r}",
            "write e.g. `values: [1.0e-3, 3.0e-3, 1.0e-2]`",
        )
        need(
            all(s_ < TUNE_SEED for s_ in g.seeds),
            "seeds",
            f"verdict seeds must be below {TUNE_SEED} when tuning (tuning uses its own seeds from there)",
            "use seeds 0, 1, 2, ...",
        )
    for e in g.evaluate:
        ok = (
            e == "minimal_pairs"
            or str(e).startswith(("text:", "corpus:"))
            or (str(e).endswith(".jsonl") and Path(e).is_file())
        )
        need(
            ok,
            "evaluate",
            f"cannot evaluate {e!r}",
            "list minimal_pairs, existing multiple-choice .jsonl files, text:FILE or corpus:NAME",
        )


def eval_args(g: GridConfig) -> list[str]:
    """`escarda_lab.evaluate` arguments for `grid.evaluate` (the split bpb is in metrics.json already)."""
    if not g.evaluate:
        return []
    args = ["--no-split"]
    for e in g.evaluate:
        e = str(e)
        if e == "minimal_pairs":
            args += ["--suite", "minimal_pairs"]
        elif e.startswith("text:"):
            args += ["--text", str(Path(e[5:]).resolve())]
        elif e.startswith("corpus:"):
            args += ["--corpus", e[7:]]
        else:
            args += ["--task", str(Path(e).resolve())]
    return args


def variants(g: GridConfig) -> list[Variant]:
    """The variants of a grid before axes: full, no_X, vanilla, with_X, then the named ones."""
    out = [Variant("full", "(the file as written)", "base", {})]
    for p in g.leave_one_out:
        out.append(Variant(f"no_{p}", f"-{p}", "removed", {f"components.{p}.enabled": False}))
    off = {f"components.{n}.enabled": False for n in registry.toggleable()}
    if g.add_one_in or g.vanilla:
        out.append(Variant("vanilla", "every plugin off", "removed", off))
        for p in g.add_one_in:
            out.append(Variant(f"with_{p}", f"vanilla +{p}", "added", {**off, f"components.{p}.enabled": True}))
    for name, over in g.variants.items():
        flat = config.flatten(over)
        out.append(Variant(str(name), ", ".join(f"{k}={v}" for k, v in flat.items()), "changed", flat))
    return out


def controls(g: GridConfig, base_train) -> list[Variant]:
    """The calibration controls of a grid, both copies of its baseline: a null control with
    independent seeds (must not read helps/hurts) and a positive control with half the training
    tokens (must read hurts). Both use the baseline's tuned value."""
    half = base_train.max_steps // 2
    return [
        Variant(
            "control_null",
            f"{g.baseline}, init and data seeds + {NULL_SEED_OFFSET}",
            "control",
            {},
            seed_offset=NULL_SEED_OFFSET,
            tune_as=g.baseline,
        ),
        Variant(
            "control_half_budget",
            f"{g.baseline}, half the training tokens",
            "control",
            {},
            tune_as=g.baseline,
            forced={"train.max_steps": max(1, half), "train.warmup_steps": min(base_train.warmup_steps, max(1, half))},
        ),
    ]


def rungs(g: GridConfig, plain: list[Variant], base_train, src: str) -> list[Variant]:
    """Ladder rungs: the baseline (or every variant) at each model size x token multiple."""
    lad = g.ladder
    if any(t <= 0 for t in lad.tokens):
        raise ConfigError(
            src, "grid.ladder.tokens", f"token multiples must be > 0, got {lad.tokens}", "write e.g. [0.5, 2]"
        )
    sizes = [("", {})] + [(str(k), config.flatten(v)) for k, v in lad.models.items()]
    mults = [1.0] + [float(t) for t in lad.tokens if float(t) != 1.0]
    out = []
    for v in plain:
        if v.kind in ("control", "rung") or (not lad.variants and v.name != g.baseline):
            continue
        for size, over in sizes:
            for t in mults:
                if not size and t == 1.0:
                    continue  # the variant itself
                steps = max(1, round(base_train.max_steps * t))
                tag = "-".join(x for x in (size, f"x{t:g}" if t != 1.0 else "") if x)
                change = ", ".join(x for x in (size and f"size {size}", t != 1.0 and f"{t:g}x tokens") if x)
                out.append(
                    Variant(
                        f"{v.name}-{tag}",
                        f"{v.name} at {change}",
                        "rung",
                        {**v.overrides, **over},
                        tune_as=v.tune_as or v.name,
                        forced={
                            "train.max_steps": steps,
                            "train.warmup_steps": min(steps, max(0, round(base_train.warmup_steps * t))),
                        },
                        rung_of=v.name,
                    )
                )
    return out


def with_axes(vs: list[Variant], g: GridConfig) -> list[Variant]:
    """Every variant at every combination of the axes, then at every setting: `<name>-<tag>`,
    compared with the baseline at the same tag."""
    vs = [replace(v, baseline=g.baseline, family=v.name) for v in vs]
    if g.axes:
        keys = list(g.axes)
        combos = [
            ("-".join(f"{k.rsplit('.', 1)[-1]}{x}" for k, x in zip(keys, combo)), dict(zip(keys, combo)))
            for combo in itertools.product(*g.axes.values())
        ]
        vs = [tagged(v, tag, over) for tag, over in combos for v in vs]
    if g.settings:
        at = g.tune.at if g.tune is not None else None
        vs = [
            replace(tagged(v, str(name), config.flatten(bundle), tune_tag=str(at) if at else None), setting=str(name))
            for name, bundle in g.settings.items()
            for v in vs
        ]
    return vs


def tagged(v: Variant, tag: str, over: dict, tune_tag: str | None = None) -> Variant:
    """`v` at one axes combination or setting. tune_tag: the tag whose tuned value it uses."""
    own = v.tune_as or (v.name if tune_tag and tune_tag != tag else "")
    return replace(
        v,
        name=f"{v.name}-{tag}",
        baseline=f"{v.baseline}-{tag}",
        axes={**v.axes, **over},
        tune_as=f"{own}-{tune_tag or tag}" if own else "",
    )


def expand(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), tuned: dict | None = None, tuning: bool = False
) -> tuple[GridConfig, list[Run], Path]:
    """The grid's spec, its fully resolved runs, and the grid folder. Validates every run's config.

    With `grid.tune`, `tuning=True` gives the tuning runs instead (every value x tuning seed of
    every variant that tunes, under <grid>/tune/), and `tuned` {variant: value} sets the tuned
    key of the verdict runs (a variant missing from it keeps the file's value until it is tuned).
    """
    grid_over = [o for o in overrides if o.startswith("grid.")]
    overrides = [o for o in overrides if not o.startswith("grid.")]
    base = config.load(path, overrides, variant=(f"{path} (grid)", {}))  # also discovers plugins
    found = read_spec(path, grid_over)
    if found is None:
        raise ConfigError(str(path), "grid", "this file has no `grid:` block", "run it as a single experiment")
    g, src = found
    plain = variants(g)
    if g.controls:
        plain += controls(g, base.train)
    if g.ladder is not None:
        plain += rungs(g, plain, base.train, src)
    vs = with_axes(plain, g)
    names = [v.name for v in vs]
    if g.baseline not in [v.name for v in plain]:
        raise ConfigError(
            src,
            "grid.baseline",
            f"baseline {g.baseline!r} is not one of the variants",
            f"use one of: {', '.join(v.name for v in plain)}",
        )
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(
            src,
            "grid.variants",
            f"variant names {sorted(dupes)} occur twice",
            "rename the named variant (no_X, with_X, vanilla and full are taken)",
        )
    grid_dir = Path(base.output.dir) / base.name
    runs = []
    if tuning:
        t = g.tune
        for v in (v for v in vs if not v.tune_as):
            for value in t.values:
                for seed in range(TUNE_SEED, TUNE_SEED + t.seeds):
                    forced = {
                        **v.axes,
                        t.key: value,
                        "seed": seed,
                        "name": tune_name(v.name, t.key, value),
                        "output.dir": str(grid_dir / "tune"),
                    }
                    if t.max_steps:
                        forced["train.max_steps"] = t.max_steps
                    cfg = config.load(
                        path, overrides, variant=(f"{src}, grid variant `{v.name}`", v.overrides), forced=forced
                    )
                    runs.append(Run(v, seed, cfg))
        return g, fill_vocab(runs, str(path)), grid_dir
    for seed in g.seeds:  # seed-major: a grid stopped early still has every variant once
        for v in vs:
            forced = {**v.forced, **v.axes, "seed": seed, "name": v.name, "output.dir": str(grid_dir)}
            if v.seed_offset:
                forced.update(init_seed=seed + v.seed_offset, data_seed=seed + v.seed_offset)
            if g.tune is not None and (tuned or {}).get(v.tune_as or v.name) is not None:
                forced[g.tune.key] = tuned[v.tune_as or v.name]
            cfg = config.load(path, overrides, variant=(f"{src}, grid variant `{v.name}`", v.overrides), forced=forced)
            runs.append(Run(v, seed, cfg))
    runs = fill_vocab(runs, str(path))
    if g.match.startswith("params"):
        runs = match_params(runs, g, src)
    elif g.match == "flops":
        runs = match_flops(runs, src)
    return g, runs, grid_dir


def tune_name(variant: str, key: str, value) -> str:
    return f"{variant}-{key.rsplit('.', 1)[-1]}{value}"


def tune_score(cfg, metrics: dict) -> float:
    """What tuning minimises: the final val loss; on a probe task, minus the accuracy (MAD keeps
    the best accuracy of its sweep), ties broken by the loss."""
    from escarda_lab import probes

    if probes.task_of(cfg.data.corpus) is not None:
        return -metrics["val_acc"] + 1e-6 * metrics["val_loss"]
    return metrics["val_loss"]


def pick_tuned(g: GridConfig, runs: list[Run]) -> dict:
    """{variant: {"value": best, "scores": {value: mean tune_score or None}}} from finished
    tuning runs; a value with a diverged or failed tuning seed scores None (never chosen)."""
    out: dict[str, dict] = {}
    for r in runs:
        value = config.flatten(r.cfg)[g.tune.key]
        m = read_json(r.folder / "metrics.json") or {}
        entry = out.setdefault(r.variant.name, {"key": g.tune.key, "scores": {}, "losses": {}})
        entry["losses"].setdefault(str(value), []).append(
            tune_score(r.cfg, m) if m.get("status") == "finished" else None
        )
    for name, entry in out.items():
        for value, losses in entry["losses"].items():
            entry["scores"][value] = None if None in losses else sum(losses) / len(losses)
        ok = {v: x for v, x in entry["scores"].items() if x is not None}
        best = min(ok, key=ok.get) if ok else None
        entry["value"] = (
            None
            if best is None
            else next(
                config.flatten(r.cfg)[g.tune.key]
                for r in runs
                if r.variant.name == name and str(config.flatten(r.cfg)[g.tune.key]) == best
            )
        )
    return out


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


# ------------------------------------------------------------------------------------- running


def plan_table(runs: list[Run], grid_dir: Path, title: str = "") -> str:
    base = {r.variant.name: total_params(r.cfg) for r in runs if r.variant.name == r.variant.baseline}
    rows = []
    for r in runs:
        n = total_params(r.cfg)
        b = base.get(r.variant.baseline, n)
        adj = "; ".join(f"{k} {old}->{new}" for k, (old, new) in r.adjust.items())
        rows.append(
            {
                "run": r.cfg.name,
                "seed": r.seed,
                "params": f"{n:,}",
                "vs base": f"{100 * (n - b) / b:+.2f}%",
                "status": (read_json(r.folder / "metrics.json") or {}).get("status", "new"),
                "what differs": r.variant.change + (f" [{adj}]" if adj else ""),
            }
        )
    lines = pd.DataFrame(rows).to_string(index=False, justify="left").splitlines()
    return f"grid {grid_dir}: {len(runs)} runs{': ' + title if title else ''}\n" + "\n".join(lines)


def child_env(parallel: int, gpu: str | None = None) -> dict:
    """Each run gets its share of the cores (two tiny runs on two cores beat one run on both),
    and its GPU when runs are pinned."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def visible_gpus() -> list[str]:
    """The GPUs a run could be pinned to (ids as CUDA_VISIBLE_DEVICES names them)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [x for x in listed.split(",") if x.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_slots(g: GridConfig, echo=print) -> list[str | None]:
    """One entry per concurrent run: the GPU it is pinned to, or None (not pinned)."""
    if g.per_gpu == 0:
        return [None] * g.parallel
    gpus = visible_gpus()
    if not gpus:
        echo(f"grid.per_gpu: {g.per_gpu} but no GPU is visible: {g.parallel} run(s) at a time, unpinned")
        return [None] * g.parallel
    return [gpu for gpu in gpus for _ in range(g.per_gpu)]


def die_with_parent() -> None:
    """In a child process (Linux): receive SIGTERM when the thread that started it dies, however
    it dies, so no orphan keeps training (SIGTERM makes a run checkpoint and stop; a rerun resumes).
    The grid's worker threads live as long as the grid."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not Linux: a killed grid leaves its children running, as before
        pass


def run_one(config_path: str, parallel: int = 1, evaluate: list[str] = (), gpu: str | None = None) -> dict:
    """Train one run in its own process (a finished run is skipped by the run itself), then
    evaluate it if asked; all output is appended to log.txt in the run folder."""
    folder = Path(config_path).parent
    t0 = time.perf_counter()
    commands = [["escarda_lab.run", config_path]]
    if evaluate and not (folder / "eval.json").exists():
        commands.append(["escarda_lab.evaluate", str(folder), *evaluate])
    rc = 0
    global _child
    with open(folder / "log.txt", "ab") as log:
        for cmd in commands:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m {' '.join(cmd)}\n".encode())
            log.flush()
            _child = subprocess.Popen(
                [sys.executable, "-m", *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(parallel, gpu),
                preexec_fn=die_with_parent,
            )
            rc = _child.wait()
            _child = None
            if rc != 0:
                break
    return {"returncode": rc, "wall_s": time.perf_counter() - t0}


_child: subprocess.Popen | None = None  # the training process run_one is waiting on (one per job)


def stop_child(timeout: float = 120.0) -> int | None:
    """SIGTERM the training child (it checkpoints at the current step and exits) and wait for it."""
    import signal

    child = _child
    if child is None or child.poll() is not None:
        return None
    child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


class RequeueableRun:
    """`run_one` as a submitit job that survives pre-emption and time limits: submitit calls
    `checkpoint` before the job is stopped; the training child then checkpoints at its current
    step (SIGTERM) and the same call is requeued, which resumes from that checkpoint."""

    def __call__(self, *args):
        return run_one(*args)

    def checkpoint(self, *args):
        import submitit

        stop_child()
        return submitit.helpers.DelayedSubmission(RequeueableRun(), *args)


def last_error(folder: Path) -> str:
    try:
        lines = [ln for ln in (folder / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errs = [ln for ln in lines if ln.startswith("escarda_lab:") or "Error" in ln]
    return (errs or lines or [""])[-1][:500]


def record(r: Run, grid_dir: Path, outcome: dict) -> dict:
    m = read_json(r.folder / "metrics.json") or {}
    status = m.get("status", "failed")
    rc = outcome.get("returncode", 0)
    if status == "running" and "skipped" not in outcome:  # the process ended without finishing
        status = "failed"
    rec = {
        "variant": r.variant.name,
        "run": r.cfg.name,
        "seed": r.seed,
        "baseline": r.variant.baseline,
        "change": r.variant.change,
        "kind": r.variant.kind,
        "folder": str(r.folder.relative_to(grid_dir)),
        "status": status,
        "adjust": r.adjust,
        **outcome,
    }
    if status != "finished":
        rec["error"] = m.get("error") or last_error(r.folder) or f"exit code {rc}"
        if rc is not None and rc < 0:
            rec["error"] = f"killed by signal {-rc}; rerun the grid to resume. Last output: {rec['error']}"
    elif rc not in (0, None):  # trained, but the evaluation after it failed (see log.txt)
        rec["eval_error"] = last_error(r.folder)
    for k in [
        "val_loss",
        "val_bpb",
        "val_acc",
        "params",
        "flops_per_token",
        "tokens_per_s",
        "mfu",
        "dead_components",
        "step",
        "instability",
        "train_tokens",
    ]:
        if k in m:
            rec[k] = m[k]
    rec.update(eval_columns(read_json(r.folder / "eval.json") or {}))
    return rec


def eval_columns(ev: dict) -> dict[str, float]:
    """Flat numbers from a run's eval.json for tables: eval/minimal_pairs, eval/<task>/acc, ..."""
    out = {}
    if "minimal_pairs" in ev:
        out["eval/minimal_pairs"] = ev["minimal_pairs"]["overall"]["acc"]
    for name, t in ev.get("tasks", {}).items():
        out[f"eval/{name}/acc"], out[f"eval/{name}/acc_norm"] = t["acc"], t["acc_norm"]
    for kind in ["text", "corpus"]:
        for name, t in ev.get(kind, {}).items():
            out[f"eval/{kind}:{Path(name).name}/bpb"] = t["bpb"]
    return out


def write_plan(g: GridConfig, runs: list[Run], grid_dir: Path, source: str, tuned: dict | None = None) -> None:
    seen: dict[str, dict] = {}
    for r in runs:
        v = r.variant
        seen.setdefault(
            v.name,
            {
                "name": v.name,
                "change": v.change,
                "kind": v.kind,
                "baseline": v.baseline,
                "overrides": v.overrides,
                "axes": v.axes,
                "adjust": r.adjust,
                "seed_offset": v.seed_offset,
                "tune_as": v.tune_as or v.name,
                "family": v.family or v.name,
                "setting": v.setting,
                "rung_of": v.rung_of,
                "max_steps": r.cfg.train.max_steps,
            },
        )
    write_json(
        grid_dir / "grid.json",
        {
            "source": source,
            "baseline": g.baseline,
            "seeds": g.seeds,
            "match": g.match,
            "margin": g.margin,
            "metric": metric_of(runs),
            "settings": g.settings,
            "controls": g.controls,
            "tune": None if g.tune is None else vars(g.tune),
            "tuned": tuned or {},
            "variants": list(seen.values()),
        },
    )


def metric_of(runs: list[Run]) -> str:
    """What `compare` tests: accuracy when every run is a probe task, else bits per byte."""
    from escarda_lab import probes

    probe = [probes.task_of(r.cfg.data.corpus) is not None for r in runs]
    return "val_acc" if probe and all(probe) else "val_bpb"


def varied_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between the grid's runs (name and folder aside)."""
    flats = [config.flatten(r.cfg) for r in runs]
    keys = dict.fromkeys(k for f in flats for k in f)
    return [
        k
        for k in keys
        if k not in ("name", "output.dir") and len({json.dumps(f.get(k), default=str) for f in flats}) > 1
    ]


def prepare_folder(r: Run, varied: list[str] = ()) -> str | None:
    """Write the run's config.yaml (or check the one there) and grid_run.json (its variant, seed and
    the values of the keys the grid varies: TensorBoard's hparams); returns an error or None."""
    text = config.to_yaml(r.cfg)
    try:
        check_same_config(r.folder, text, "grid")
    except UserError as e:
        return str(e)
    if not (r.folder / "config.yaml").exists():
        atomic_write(r.folder / "config.yaml", text)
    flat = config.flatten(r.cfg)
    write_json(
        r.folder / "grid_run.json",
        {"variant": r.variant.name, "seed": r.seed, "varied": {k: flat.get(k) for k in varied}},
    )
    return None


def run_grid(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), dry_run: bool = False, echo=print
) -> list[dict]:
    tuned = None
    g, runs, grid_dir = expand(path, overrides)
    if g.tune is not None:
        _, tune_runs, _ = expand(path, overrides, tuning=True)
        echo(plan_table(tune_runs, grid_dir, f"tuning {g.tune.key} over {g.tune.values}"))
        if dry_run:
            echo(plan_table(runs, grid_dir, f"verdict runs ({g.tune.key} set per variant after tuning)"))
            return []
        train_runs(g, tune_runs, grid_dir / "tune", echo)
        tuned = pick_tuned(g, tune_runs)
        for name, t in tuned.items():
            echo(
                f"tuned {name}: {t['key']} = {t['value']} (val loss by value: "
                + ", ".join(f"{v}: {'failed' if x is None else f'{x:.4f}'}" for v, x in t["scores"].items())
                + ")"
            )
        missing = [n for n, t in tuned.items() if t["value"] is None]
        if missing:
            raise UserError(
                str(path),
                "grid.tune",
                f"every tuning run of {', '.join(missing)} failed or diverged",
                f"see {grid_dir / 'tune'}/*/seed*/log.txt; widen tune.values towards smaller values",
            )
        g, runs, grid_dir = expand(path, overrides, tuned={n: t["value"] for n, t in tuned.items()})
    echo(plan_table(runs, grid_dir))
    if dry_run:
        return []
    grid_dir.mkdir(parents=True, exist_ok=True)
    write_plan(g, runs, grid_dir, str(path), tuned)
    results = train_runs(g, runs, grid_dir, echo)
    done = sum(rec["status"] == "finished" for rec in results)
    echo(f"{done}/{len(runs)} runs finished; compare them with `python -m escarda_lab.compare {grid_dir}`")
    return results


def train_runs(g: GridConfig, runs: list[Run], grid_dir: Path, echo=print) -> list[dict]:
    """Train `runs` (skipping finished ones) and record each in <grid_dir>/results.jsonl."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], dict] = {}
    lock = threading.Lock()

    def save(r: Run, rec: dict) -> None:
        with lock:
            results[(r.cfg.name, r.seed)] = rec
            lines = [
                json.dumps(results[(x.cfg.name, x.seed)], sort_keys=True, default=str)
                for x in runs
                if (x.cfg.name, x.seed) in results
            ]
            atomic_write(grid_dir / "results.jsonl", "\n".join(lines) + "\n")
            echo(
                f"[{len(results)}/{len(runs)}] {r.cfg.name} seed{rec['seed']}: {rec['status']}"
                + (f" val/bpb {rec['val_bpb']:.4f}" if "val_bpb" in rec else f" ({rec.get('error', '')})")
                + (f" val/acc {rec['val_acc']:.4f}" if "val_acc" in rec else "")
            )

    todo = []
    varied = varied_keys(runs)
    for r in runs:
        problem = prepare_folder(r, varied)
        m = read_json(r.folder / "metrics.json") or {}
        if problem:
            save(r, {**record(r, grid_dir, {}), "status": "failed", "error": problem})
        elif m.get("status") == "finished" and (not g.evaluate or (r.folder / "eval.json").exists()):
            save(r, record(r, grid_dir, {"skipped": True}))
        else:
            todo.append(r)
    if g.launcher == "submitit":
        launch_submitit(g, todo, grid_dir, save)
    else:
        slots = worker_slots(g, echo)
        free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in slots:
            free.put(slot)

        def job(r: Run) -> dict:
            gpu = free.get()  # a worker holds one slot (GPU share) for the run's whole life
            try:
                return run_one(str(r.folder / "config.yaml"), len(slots), eval_args(g), gpu)
            finally:
                free.put(gpu)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            for r, outcome in zip(todo, pool.map(job, todo)):
                save(r, record(r, grid_dir, outcome))
        if todo:
            hours = (time.perf_counter() - t0) / 3600
            rate = len(todo) / hours
            echo(f"{len(todo)} run(s) in {60 * hours:.1f} min, {len(slots)} at a time: {rate:.1f} runs/hour")
    return [results[(r.cfg.name, r.seed)] for r in runs]


def launch_submitit(g: GridConfig, todo: list[Run], grid_dir: Path, save) -> None:
    """One SLURM job array (or submitit's local executor): each task runs `run_one`."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "grid",
            "grid.launcher",
            "launcher: submitit needs the submitit package",
            "pip install submitit, or use `launcher: local`",
        ) from None
    if not todo:
        return
    s = g.submitit
    ex = submitit.AutoExecutor(folder=str(grid_dir / "submitit" / "%j"), cluster=s.cluster)
    params: dict[str, Any] = {
        "timeout_min": s.timeout_min,
        "gpus_per_node": s.gpus_per_node,
        "cpus_per_task": s.cpus_per_task,
        "mem_gb": s.mem_gb,
        "nodes": s.nodes,
        "name": grid_dir.name,
        "slurm_array_parallelism": g.parallel,
    }
    if s.partition:
        params["slurm_partition"] = s.partition
    ex.update_parameters(**params)
    jobs = ex.map_array(
        RequeueableRun(),
        [str(r.folder / "config.yaml") for r in todo],
        [g.parallel] * len(todo),
        [eval_args(g)] * len(todo),
    )
    for r, job in zip(todo, jobs):
        try:
            outcome = {**job.result(), "job_id": job.job_id}
        except Exception as e:  # the job itself died (timeout, preemption, node failure)
            outcome = {"returncode": None, "job_id": job.job_id, "job_error": str(e).splitlines()[0][:300]}
        save(r, record(r, grid_dir, outcome))
