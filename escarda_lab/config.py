"""Config: one dataclass schema, YAML files with `extends:`, dotted command-line overrides.

Merge order: schema defaults < parent YAML < child YAML < `key=value` overrides. The schema is in
struct mode, so unknown keys are errors; every user mistake becomes a `ConfigError` that names the
file (or "command line"), the dotted key and the fix.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from escarda_lab import registry
from escarda_lab.errors import ConfigError

CLI = "command line"


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    n_kv_heads: int = 1  # 1 = multi-query, n_heads = MHA, else GQA
    rope_dim: int = 8  # rotary part of each head (its last dims); the rest is position-free
    rope_theta: float = 10000.0
    rope_style: str = "half"  # half: pairs (i, i+r/2) Llama/NeoX; interleaved: (2i, 2i+1) DeepSeek
    qk_norm: bool = True
    ffn_hidden: int = 352
    max_seq_len: int = 256
    norm_eps: float = 1.0e-6
    init_std: float = 0.02
    tie_embeddings: bool = True


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # bpe | byte
    vocab_size: int = 4096  # bpe only; byte is always 256 + specials


@dataclass
class DataConfig:
    corpus: str = "classics"  # shakespeare | bigtxt | classics | a file, folder or glob | hf:<name>
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 128
    batch_size: int = 32  # global batch (split across devices)
    val_fraction: float = 0.05  # of documents, chosen by content hash
    cache_dir: str = ""  # tokenizers and token memmaps; "" = $ESCARDA_CACHE or ~/.cache/escarda_lab


@dataclass
class TrainConfig:
    max_steps: int = 600
    lr: float = 3.0e-3
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "auto"  # auto: bf16-mixed on a GPU, 32-true on CPU (see module.resolve_runtime)
    val_every: int = 100
    val_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 100
    compile: Any = "auto"  # auto: on for a GPU, off on CPU; or true / false


@dataclass
class OutputConfig:
    dir: str = "runs"


@dataclass
class TrainerConfig:
    """Handed to lightning.Trainer."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1


PRECISIONS = {"auto", "32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true"}
SCHEDULES = {"cosine", "linear", "constant"}
ROPE_STYLES = {"half", "interleaved"}
TOKENIZERS = {"bpe", "byte"}


def schema_class() -> type:
    """The root dataclass, with a `components` field per registered (toggleable) plugin."""
    plugins = tuple((n, e.config) for n, e in registry.toggleable().items())
    if plugins not in _schemas:
        _schemas[plugins] = _make_schema(plugins)
    return _schemas[plugins]


_schemas: dict[tuple, type] = {}


def _make_schema(plugins: tuple) -> type:
    comps = make_dataclass("ComponentsConfig", [(n, c, field(default_factory=c)) for n, c in plugins])
    return make_dataclass(
        "Config",
        [
            ("name", str, field(default="escarda")),
            ("seed", int, field(default=0)),
            # Common random numbers: initial weights from init_seed, batch order from data_seed
            # (both default to seed); a study may vary one and hold the other.
            ("init_seed", Optional[int], field(default=None)),
            ("data_seed", Optional[int], field(default=None)),
            ("model", ModelConfig, field(default_factory=ModelConfig)),
            ("components", comps, field(default_factory=comps)),
            ("data", DataConfig, field(default_factory=DataConfig)),
            ("train", TrainConfig, field(default_factory=TrainConfig)),
            ("output", OutputConfig, field(default_factory=OutputConfig)),
            ("trainer", TrainerConfig, field(default_factory=TrainerConfig)),
            ("plugins", list[str], field(default_factory=list)),
        ],
    )


# ---------------------------------------------------------------------------------------- loading


def seeds(cfg) -> tuple[int, int]:
    """(init seed, data seed) of a config: each defaults to `seed`."""
    pick = lambda s: cfg.seed if s is None else s
    return pick(getattr(cfg, "init_seed", None)), pick(getattr(cfg, "data_seed", None))


def read_yaml(path: Path, source: str | None = None) -> dict:
    source = source or str(path)
    if not path.is_file():
        raise ConfigError(source, None, f"file {path} does not exist",
                          "check the path (relative paths in `extends:` are relative to the file)")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), None, f"invalid YAML{line}: {problem}",
                          "fix the syntax (indentation, a missing ':' or an unclosed bracket)") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), None, "the file is not a mapping of keys to values",
                          "write `key: value` lines at the top level")
    return raw


def read_chain(path: Path) -> list[tuple[str, dict]]:
    """[(file, raw dict)] from the root ancestor down to `path`, following `extends:`."""
    chain: list[tuple[str, dict]] = []
    seen: list[Path] = []
    current: Path | None = Path(path)
    while current is not None:
        resolved = current.resolve()
        if resolved in seen:
            cycle = " -> ".join(str(p) for p in seen + [resolved])
            raise ConfigError(str(current), "extends", f"`extends:` forms a cycle ({cycle})",
                              "make the chain of parents end in a file without `extends:`")
        seen.append(resolved)
        raw = read_yaml(current, str(current) if not chain else None)
        parent = raw.pop("extends", None)
        chain.append((str(current), raw))
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(str(current), "extends", "`extends:` must be a file path",
                              "write e.g. `extends: escarda.yaml`")
        current = (current.parent / parent) if parent else None
    return chain[::-1]


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(CLI, o, f"override {o!r} is not of the form key=value",
                              "write dotted overrides like `train.max_steps=50`")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # omegaconf grammar errors
        raise ConfigError(CLI, None, f"cannot parse overrides: {e}".splitlines()[0],
                          "write dotted overrides like `model.d_model=96`") from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
         variant: tuple[str, dict] | None = None, forced: dict | None = None) -> Any:
    """Load, merge and validate an experiment file; returns the typed config object.

    `variant` = (source, dotted overrides) is a grid variant, merged between the files and the
    command line; the file's own `grid:` block is then ignored (see `read_grid`). `forced` dotted
    keys (a grid run's name, seed and folder) are merged last."""
    chain = read_chain(Path(path))
    if variant is not None:
        chain = [(src, {k: v for k, v in raw.items() if k != "grid"}) for src, raw in chain]
        chain.append((variant[0], _from_dotted(variant[1])))
    over = parse_overrides(overrides)
    sources = chain + ([(CLI, over)] if over else []) + ([("grid", _from_dotted(forced))] if forced else [])
    plugins: list[str] = []
    for src, raw in sources:
        p = raw.get("plugins", [])
        if not isinstance(p, list):
            raise ConfigError(src, "plugins", "`plugins:` must be a list of module paths",
                              "write e.g. `plugins: [my_pkg.my_plugin]`")
        plugins += [m for m in p if m not in plugins]
    registry.discover(plugins, source=str(path))
    cfg = merge(sources)
    origin = origins(sources)
    obj = OmegaConf.to_object(cfg)
    validate(obj, lambda key: origin.get(key, str(path)))
    return obj


def _dot_value(v: Any) -> str:
    """A Python value as OmegaConf dotlist text (lists and None included)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def _from_dotted(d: dict) -> dict:
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={_dot_value(v)}" for k, v in d.items()]))


def read_grid(path: str | Path) -> tuple[dict, str] | None:
    """The merged `grid:` block of a file and its parents, with the file that set it; None if none."""
    grid, src = None, None
    for source, raw in read_chain(Path(path)):
        if "grid" in raw:
            if not isinstance(raw["grid"], dict):
                raise ConfigError(source, "grid", "`grid:` must be a mapping",
                                  "write e.g. `grid: {seeds: [0, 1], leave_one_out: [engram]}`")
            grid = OmegaConf.to_container(OmegaConf.merge(grid or {}, raw["grid"]))
            src = source
    return (grid, src) if grid is not None else None


def from_dict(d: dict, source: str = "config") -> Any:
    """A typed config from a plain nested dict (e.g. an exported model's config.json)."""
    registry.discover(list(d.get("plugins", [])), source=source)
    obj = OmegaConf.to_object(merge([(source, d)]))
    validate(obj, lambda key: source)
    return obj


def merge(sources: list[tuple[str, dict]]) -> DictConfig:
    cfg = OmegaConf.structured(schema_class())
    OmegaConf.set_struct(cfg, True)
    for src, raw in sources:
        if "grid" in raw:
            raise ConfigError(src, "grid", "this is a grid file (it has a `grid:` block), which only "
                              "`python -m escarda_lab.run` and `escarda_lab.bench` accept",
                              "run it with `python -m escarda_lab.run FILE`, or pass one of its run "
                              "folders' config.yaml")
        try:
            cfg = OmegaConf.merge(cfg, raw)
        except oc_errors.ConfigKeyError as e:
            raise unknown_key(src, cfg, e.full_key or str(e.key)) from None
        except (oc_errors.ValidationError, oc_errors.ConfigTypeError) as e:
            raise wrong_type(src, cfg, e) from None
    return cfg


def unknown_key(src: str, cfg: DictConfig, full_key: str) -> ConfigError:
    parent_key, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    known = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    hint = f"did you mean `{'.'.join(filter(None, [parent_key, close[0]]))}`?" if close else ""
    where = f"`{parent_key}`" if parent_key else "the top level"
    if parent_key == "components":
        fix = f"{hint + ' ' if hint else ''}registered components are: {', '.join(known)}"
        return ConfigError(src, full_key, f"unknown component `{leaf}`", fix)
    fix = f"{hint + ' ' if hint else ''}valid keys under {where}: {', '.join(known)}"
    return ConfigError(src, full_key, "unknown key", fix)


def wrong_type(src: str, cfg: DictConfig, e: Exception) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    node = OmegaConf.select(cfg, key) if key != "?" else None
    default = repr(node) if node is not None and not isinstance(node, (DictConfig, ListConfig)) else None
    msg = str(e).splitlines()[0]
    fix = f"give a value of the right type (the default is {default})" if default else \
        "give a value of the type the schema expects"
    return ConfigError(src, key, f"wrong type: {msg}", fix)


def origins(sources: list[tuple[str, dict]]) -> dict[str, str]:
    """Dotted key -> the last source that set it (for error messages)."""
    out: dict[str, str] = {}
    for src, raw in sources:
        for k in flatten(raw):
            out[k] = src
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping / dataclass -> {"a.b.c": scalar}; lists become their repr."""
    if hasattr(d, "__dataclass_fields__"):
        d = {f.name: getattr(d, f.name) for f in fields(d)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "__dataclass_fields__"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML that loads in a fresh process. The schema holds a section for
    every plugin registered in this process; a disabled plugin from a module this config does not
    list under `plugins:` is left out, so the text does not depend on what else was imported."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    if "components" in d:
        listed = set(d.get("plugins", []))
        for name, entry in registry.toggleable().items():
            module = entry.cls.__module__
            if not module.startswith("components.") and module not in listed and not d["components"][name]["enabled"]:
                del d["components"][name]
    return OmegaConf.to_yaml(OmegaConf.create(d))


# ------------------------------------------------------------------------------------- validation


def validate(cfg: Any, where) -> None:
    """Semantic checks the type system cannot express; `where(key)` names the file that set key."""

    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(where(key), key, problem, fix)

    m, d, t = cfg.model, cfg.data, cfg.train
    for key in ["seed", "init_seed", "data_seed"]:
        v = getattr(cfg, key)
        need(v is None or 0 <= v < 2**62, key, f"must be a non-negative integer, got {v}",
             "use e.g. 0, 1, 2 (init_seed and data_seed may be left null to follow seed)")
    for key in ["d_model", "n_layers", "n_heads", "head_dim", "n_kv_heads", "ffn_hidden", "max_seq_len"]:
        need(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}",
             "give a positive integer")
    need(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", "must be positive",
         "leave it null to take the tokenizer's vocabulary size")
    need(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
         f"n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}",
         "pick n_kv_heads dividing n_heads (1 = multi-query, n_heads = full multi-head)")
    need(0 <= m.rope_dim <= m.head_dim, "model.rope_dim",
         f"rope_dim={m.rope_dim} must lie in [0, head_dim={m.head_dim}]",
         "the rotary part is a slice of each head; set rope_dim <= head_dim")
    need(m.rope_dim % 2 == 0, "model.rope_dim", f"rope_dim={m.rope_dim} is odd",
         "rotary dims come in pairs; use an even number")
    need(m.rope_style in ROPE_STYLES, "model.rope_style", f"unknown rope_style {m.rope_style!r}",
         f"use one of {sorted(ROPE_STYLES)}")
    need(m.init_std > 0 and m.norm_eps > 0 and m.rope_theta > 0, "model.init_std",
         "init_std, norm_eps and rope_theta must be positive", "give positive values")
    need(d.seq_len > 0, "data.seq_len", "must be positive", "give a positive integer")
    need(d.seq_len <= m.max_seq_len, "data.seq_len",
         f"seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
         "lower data.seq_len or raise model.max_seq_len")
    need(d.batch_size > 0, "data.batch_size", "must be positive", "give a positive integer")
    need(0 < d.val_fraction < 1, "data.val_fraction", f"must lie in (0, 1), got {d.val_fraction}",
         "use e.g. 0.05")
    need(d.tokenizer.kind in TOKENIZERS, "data.tokenizer.kind", f"unknown tokenizer {d.tokenizer.kind!r}",
         f"use one of {sorted(TOKENIZERS)}")
    need(d.tokenizer.kind != "bpe" or d.tokenizer.vocab_size >= 512, "data.tokenizer.vocab_size",
         f"a BPE vocabulary of {d.tokenizer.vocab_size} cannot hold 256 bytes, specials and merges",
         "use at least 512 (the released model uses 16512)")
    need(t.max_steps > 0, "train.max_steps", "must be positive", "give a positive number of steps")
    need(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"learning rate must be positive, got {t.lr}",
         "use e.g. 3.0e-3")
    need(0 <= t.warmup_steps <= t.max_steps, "train.warmup_steps",
         f"warmup_steps={t.warmup_steps} must lie in [0, max_steps={t.max_steps}]",
         "shorten the warmup or train longer")
    need(t.schedule in SCHEDULES, "train.schedule", f"unknown schedule {t.schedule!r}",
         f"use one of {sorted(SCHEDULES)}")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must lie in [0, 1]", "use e.g. 0.1")
    need(t.weight_decay >= 0 and t.grad_clip >= 0, "train.weight_decay",
         "weight_decay and grad_clip must be >= 0", "use 0 to switch them off")
    need(str(t.precision) in PRECISIONS, "train.precision", f"unknown precision {t.precision!r}",
         f"use one of {sorted(PRECISIONS)}")
    need(t.compile in ("auto", True, False), "train.compile", f"compile must be auto, true or false, got {t.compile!r}",
         "use auto (compiled on a GPU, eager on CPU), true or false")
    for key in ["val_every", "val_batches", "log_every", "checkpoint_every"]:
        need(getattr(t, key) > 0, f"train.{key}", f"must be positive, got {getattr(t, key)}",
             "give a positive integer")
    for slot, spec in registry.SLOTS.items():
        on = [n for n, e in registry.toggleable().items()
              if e.slot == slot and getattr(cfg.components, n).enabled]
        need(not spec.exclusive or len(on) <= 1, f"components.{on[-1] if on else slot}.enabled",
             f"{' and '.join(on)} are both enabled but the `{slot}` slot takes one plugin",
             f"disable all but one of them")
    for name in registry.toggleable():
        pc = getattr(cfg.components, name)
        if pc.enabled and hasattr(pc, "check"):
            for key, problem, fix in pc.check(cfg.model):
                need(False, f"components.{name}.{key}", problem, fix)
