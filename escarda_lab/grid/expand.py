"""Expansion: a grid spec becomes its variants and their fully resolved runs. Pure: it reads the
YAML and builds configs, nothing more (no tokenizer is trained and no model is built; `matching`
sizes the runs when the grid launches)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from escarda_lab import config, registry
from escarda_lab.errors import ConfigError
from escarda_lab.grid.spec import NULL_SEED_OFFSET, TUNE_SEED, CalibrationConfig, GridConfig, read_spec
from escarda_lab.run_folder import run_dir


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
    twin_of: str = ""  # a same-recipe twin: the variant it repeats at the baseline's tuned value


@dataclass
class Run:
    variant: Variant
    seed: int
    cfg: Any
    adjust: dict = field(default_factory=dict)  # match: params resizing, {key: [old, new]}

    @property
    def folder(self) -> Path:
        return run_dir(self.cfg)


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
    """The calibration controls, copies of the baseline at its tuned value: null controls with
    independent seeds (offsets 10000, 20000, ...) and the baseline at fractions of its tokens.
    `controls: true` is one of each (control_null, control_half_budget)."""
    cal = g.calibration or (CalibrationConfig(nulls=1, budgets=[0.5]) if g.controls else CalibrationConfig(0, []))
    out = []
    for i in range(cal.nulls):
        offset = NULL_SEED_OFFSET * (i + 1)
        out.append(
            Variant(
                "control_null" + (str(i + 1) if i else ""),
                f"{g.baseline}, init and data seeds + {offset}",
                "control",
                {},
                seed_offset=offset,
                tune_as=g.baseline,
            )
        )
    for b in cal.budgets:
        steps = max(1, round(base_train.max_steps * b))
        out.append(
            Variant(
                "control_half_budget" if g.controls else f"control_budget{b:g}",
                f"{g.baseline}, {b:g}× the training tokens",
                "control",
                {},
                tune_as=g.baseline,
                forced={"train.max_steps": steps, "train.warmup_steps": min(base_train.warmup_steps, steps)},
            )
        )
    return out


def values_of(tuned: dict, name: str) -> set:
    """The tuned values of a variant, over every axes/settings tag it was tuned at."""
    return {str(x) for k, x in tuned.items() if k == name or k.startswith(f"{name}-")}


def same_recipe(vs: list[Variant], g: GridConfig, tuned: dict | None) -> list[Variant]:
    """With two readings, once the tuned values are known: each tuned variant again at the
    baseline's tuned value (`<name>@base_<key>`), where its own value differs (elsewhere the two
    readings are one run)."""
    if g.tune is None or g.tune.readings != "both" or tuned is None:
        return []  # before tuning nobody knows which values will differ
    leaf = g.tune.key.rsplit(".", 1)[-1]
    out = []
    for v in vs:
        if v.kind in ("base", "control", "rung") or v.tune_as or v.name == g.baseline:
            continue
        if tuned is not None and values_of(tuned, v.name) == values_of(tuned, g.baseline):
            continue
        out.append(
            replace(
                v,
                name=f"{v.name}@base_{leaf}",
                change=f"{v.change}, at the baseline's {leaf}",
                tune_as=g.baseline,
                twin_of=v.name,
            )
        )
    return out


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
            ("-".join(f"{k.rsplit('.', 1)[-1]}{axis_tag(x)}" for k, x in zip(keys, combo)), dict(zip(keys, combo)))
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


def axis_tag(value) -> str:
    """An axis value as part of a folder name: a path by its file name (no slashes), anything
    else with characters outside [A-Za-z0-9._+] replaced by "_"."""
    text = str(value)
    if "/" in text or "\\" in text:
        text = Path(text.rstrip("/\\")).name or text
    return re.sub(r"[^A-Za-z0-9._+]", "_", text)


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


class Expansion(NamedTuple):
    spec: GridConfig
    runs: list[Run]
    grid_dir: Path
    source: str  # where the grid block came from (the file, or "<file> or the command line")
    tuning: bool = False  # the tuning runs (never matched: each trains the variant as written)


def expand(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    tuned: dict | None = None,
    tuning: bool = False,
    extra: dict[str, list] | None = None,
) -> Expansion:
    """The grid's spec, its runs (every config validated; `model.vocab_size` and `grid.match`
    are left to `matching.resolve`), the grid folder and the spec's source.

    With `grid.tune`, `tuning=True` gives the tuning runs instead (every value x tuning seed of
    every variant that tunes, under <grid>/tune/; `extra` {variant: values} adds values for some),
    and `tuned` {variant: value} sets the tuned
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
    plain += same_recipe(plain, g, tuned)
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
            for value in [*t.values, *(extra or {}).get(v.name, [])]:
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
        return Expansion(g, runs, grid_dir, src, tuning=True)
    for seed in g.seeds:  # seed-major: a grid stopped early still has every variant once
        for v in vs:
            forced = {**v.forced, **v.axes, "seed": seed, "name": v.name, "output.dir": str(grid_dir)}
            if v.seed_offset:
                forced.update(init_seed=seed + v.seed_offset, data_seed=seed + v.seed_offset)
            if g.tune is not None and (tuned or {}).get(v.tune_as or v.name) is not None:
                forced[g.tune.key] = tuned[v.tune_as or v.name]
            cfg = config.load(path, overrides, variant=(f"{src}, grid variant `{v.name}`", v.overrides), forced=forced)
            runs.append(Run(v, seed, cfg))
    return Expansion(g, runs, grid_dir, src)


def tune_name(variant: str, key: str, value) -> str:
    return f"{variant}-{key.rsplit('.', 1)[-1]}{value}"
