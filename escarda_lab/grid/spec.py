"""The `grid:` block's schema and the checks the schema cannot express."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from escarda_lab import config, registry, suites
from escarda_lab.errors import ConfigError
from escarda_lab.registry import bounded
from escarda_lab.validation import check_bounds


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
    seeds: int = bounded(2, min=1)  # tuning seeds TUNE_SEED, TUNE_SEED + 1, ...: never reused by verdict runs
    max_steps: int | None = bounded(None, min=1)  # None: as long as the verdict runs
    at: str | None = None  # with grid.settings: tune at this setting only; every setting uses its value
    # verdicts at each variant's own tuned value and, for a variant whose value differs from the
    # baseline's, also at the baseline's (`<variant>@base_<key>`): the learning-rate confound apart
    readings: Literal["both", "tuned"] = "both"
    extend: bool = True  # a value chosen at the edge of `values` is tried one step further out


@dataclass
class LadderConfig:
    """The baseline (and with `variants: true` every variant) again at other budgets ("rungs"):
    token multiples of the file's steps (the schedule stretched with them) and/or named model sizes.
    compare fits the baseline's loss against training FLOPs and reports compute multipliers."""

    tokens: list[float] = field(default_factory=list)  # e.g. [0.5, 2]: x the file's max_steps (1 is the file)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {d192: {model.d_model: 192}}
    variants: bool = False  # ladder every variant, not only the baseline


@dataclass
class CalibrationConfig:
    """Controls that measure the grid: `nulls` copies of the baseline with independent seeds (a
    null control must not read helps/hurts) and the baseline at fractions of its training tokens
    (`budgets`: a dose-response of known harms; the smallest one detected is the grid's measured
    sensitivity)."""

    nulls: int = bounded(3, min=0)
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])


@dataclass
class SequentialConfig:
    """`seeds: {min, max, step}`: train `min` paired seeds, then `step` more only for the comparisons
    still undecided, up to `max`, at group-sequential thresholds (escarda_lab.sequential)."""

    min: int = bounded(4, min=2)
    max: int = bounded(12, min=2)
    step: int = bounded(2, min=1)
    spending: Literal["pocock", "obrien_fleming"] = "pocock"

    def looks(self) -> list[int]:
        from escarda_lab.sequential import looks_of

        return looks_of(self.min, self.max, self.step)


TUNE_SEED = 1000


NULL_SEED_OFFSET = 10000


@dataclass
class GridConfig:
    baseline: str = "full"
    # a list of seeds, or {min, max, step}: seeds 0 .. max-1 in group-sequential looks (`sequential`)
    seeds: list[int] = field(default_factory=lambda: [0])
    sequential: SequentialConfig | None = None
    # the column compare tests (records.METRICS: val_bpb, val_bpb_avg, val_bpb_ema, val_loss, val_acc);
    # None: val_acc for probe grids, else val_bpb
    metric: str | None = None
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
    # fork: each local run forks from a process per slot that imported torch and Lightning once
    # (escarda_lab.grid.warm); fresh: a new Python per run
    start: Literal["fork", "fresh"] = "fork"
    evaluate: list[str] = field(default_factory=list)  # minimal_pairs, task .jsonl files, text:FILE, corpus:NAME
    vanilla: bool = False  # add the every-plugin-off variant (add_one_in adds it too)
    controls: bool = False  # one null control and half the tokens (calibration {nulls: 1, budgets: [0.5]})
    calibration: CalibrationConfig | None = None  # several nulls and a dose-response of budgets
    margin: float = bounded(0.01, above=0)  # bpb: differences within ±margin count as equivalent (TOST)
    target_effect: float | None = bounded(None, above=0)  # what the grid should detect (power); None: margin
    tune: TuneConfig | None = None
    ladder: LadderConfig | None = None
    submitit: SubmititConfig = field(default_factory=SubmititConfig)


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
    if isinstance(raw.get("seeds"), dict):  # {min, max, step}: the sequential design
        raw = {**raw, "sequential": raw["seeds"], "seeds": [0]}
    node = OmegaConf.create({"grid": OmegaConf.structured(GridConfig)})
    if isinstance(raw.get("tune"), dict):  # typed (and its keys checked) like every other block
        node.grid.tune = OmegaConf.structured(TuneConfig)
    if isinstance(raw.get("ladder"), dict):
        node.grid.ladder = OmegaConf.structured(LadderConfig)
    if isinstance(raw.get("calibration"), dict):
        node.grid.calibration = OmegaConf.structured(CalibrationConfig)
    if isinstance(raw.get("sequential"), dict):
        node.grid.sequential = OmegaConf.structured(SequentialConfig)
    spec = OmegaConf.to_object(config.merge_into(node, {"grid": raw}, src))["grid"]
    check_bounds(spec, lambda key: src, "grid.")
    check_spec(spec, src)
    return spec, src


def check_spec(g: GridConfig, src: str) -> None:
    """What the schema cannot say: names that must exist, non-empty lists, seed ranges, files."""

    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(src, f"grid.{key}", problem, fix)

    plugins = registry.toggleable()
    if g.sequential is not None:
        q = g.sequential
        need(
            2 <= q.min <= q.max and q.step >= 1,
            "seeds",
            f"seeds {{min: {q.min}, max: {q.max}, step: {q.step}}} needs 2 <= min <= max and step >= 1",
            "write e.g. `seeds: {min: 4, max: 12, step: 2}`",
        )
        g.seeds = list(range(q.max))
    if g.metric is not None:
        from escarda_lab.records import METRICS

        need(
            g.metric in METRICS,
            "metric",
            f"unknown verdict metric {g.metric!r}",
            "use one of " + ", ".join(METRICS),
        )
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
    if g.calibration is not None:
        need(
            all(0 < b < 1 for b in g.calibration.budgets),
            "calibration.budgets",
            f"budgets are fractions of the training tokens in (0, 1), got {g.calibration.budgets}",
            "write e.g. `budgets: [0.5, 0.75, 0.9]`",
        )
        need(not g.controls, "controls", "both `controls` and `calibration` are set", "keep `calibration` only")
    for e in g.evaluate:
        need(suites.accepts(e), "evaluate", f"cannot evaluate {e!r}", f"list {suites.accepted()}")
