"""Config: one dataclass schema, YAML files with `extends:`, dotted command-line overrides.

Merge order: schema defaults < parent YAML < child YAML < `key=value` overrides. The schema is in
struct mode, so unknown keys are errors; every user mistake becomes a `ConfigError` that names the
file (or "command line"), the dotted key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from escarda_lab import probes, registry
from escarda_lab.errors import ConfigError
from escarda_lab.io import flatten  # noqa: F401 (config.flatten: the grid, run and run_folder call it so)
from escarda_lab.probes import ProbeConfig
from escarda_lab.registry import bounded
from escarda_lab.validation import unknown_key, validate, wrong_type

CLI = "command line"
MAX_SEED = 2**32 - 1 - 30_000  # numpy's and Lightning's seed range, less the grid's null-control offsets


@dataclass
class ModelConfig:
    vocab_size: int | None = bounded(None, min=1)  # None: taken from the tokenizer
    d_model: int = bounded(128, min=1)
    n_layers: int = bounded(4, min=1)
    n_heads: int = bounded(4, min=1)
    head_dim: int = bounded(32, min=1)
    n_kv_heads: int = bounded(1, min=1)  # 1 = multi-query, n_heads = MHA, else GQA
    rope_dim: int = bounded(8, min=0)  # rotary part of each head (its last dims); the rest is position-free
    rope_theta: float = bounded(10000.0, above=0)
    # half: pairs (i, i+r/2) as Llama/NeoX; interleaved: (2i, 2i+1) as DeepSeek
    rope_style: Literal["half", "interleaved"] = "half"
    qk_norm: bool = True
    ffn_hidden: int = bounded(352, min=1)
    max_seq_len: int = bounded(256, min=1)
    norm_eps: float = bounded(1.0e-6, above=0)
    init_std: float = bounded(0.02, above=0)
    tie_embeddings: bool = True


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "byte"] = "bpe"
    vocab_size: int = 4096  # bpe only; byte is always 256 + specials (16512: the release's size)
    # bpe only: trained on the first this-many bytes of the train documents, not a whole big corpus
    sample_bytes: int = bounded(200_000_000, min=1)


@dataclass
class DataConfig:
    # shakespeare | bigtxt | classics | text or JSONL/Parquet files (a file, folder or glob) |
    # a datasets.save_to_disk folder | hf:<name>[:<config>] | probe:<task>
    corpus: str = "classics"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = bounded(128, min=1)
    batch_size: int = bounded(32, min=1)  # global batch (split across devices)
    val_fraction: float = bounded(0.05, above=0, below=1)  # of documents, chosen by content hash
    cache_dir: str = ""  # tokenizers and token memmaps; "" = $ESCARDA_CACHE or ~/.cache/escarda_lab
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # corpus probe:<task> (escarda_lab.probes)
    text_field: str = "text"  # the text column of JSONL / Parquet / datasets corpora


@dataclass
class TrainConfig:
    max_steps: int = bounded(600, min=1)
    lr: float = bounded(3.0e-3, above=0)
    warmup_steps: int = bounded(50, min=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup
    min_lr_ratio: float = bounded(0.1, min=0, max=1)
    weight_decay: float = bounded(0.1, min=0)
    beta1: float = bounded(0.9, min=0, below=1)
    beta2: float = bounded(0.95, min=0, below=1)
    grad_clip: float = bounded(1.0, min=0)  # 0 = off
    # auto: bf16-mixed on a GPU, 32-true on CPU (see module.resolve_runtime)
    precision: Literal["auto", "32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true"] = "auto"
    val_every: int = bounded(100, min=1)
    val_batches: int = bounded(20, min=1)
    # steadier end-of-run readings (Heineman et al. 2025, "Signal and Noise"): the whole validation
    # split is also scored at the `average_last` - 1 steps before the end (`average_every` apart;
    # 0 = val_every) and their mean is val_bpb_avg; `ema` > 0 keeps an exponential moving average
    # of the weights (that decay) and scores it at the end as val_bpb_ema
    # cap on the tokens the run's final score reads (0 = the whole validation split): evenly spread
    # windows (probe tasks: the first test examples), the same for every run of the split
    final_val_tokens: int = bounded(0, min=0)
    average_last: int = bounded(1, min=1)
    average_every: int = bounded(0, min=0)
    ema: float = bounded(0.0, min=0, below=1)
    log_every: int = bounded(10, min=1)
    checkpoint_every: int = bounded(100, min=1)
    # auto: on for a GPU, off on CPU; true / false; or a torch.compile mode (reduce-overhead: CUDA
    # graphs, which tiny launch-bound models need on a GPU)
    compile: Any = "auto"
    # Losses through the chunked linear + cross-entropy head (no [tokens, vocab] logits); false
    # materialises the logits (the same numbers, more memory: for comparison).
    fused_head: bool = True


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


def schema_class() -> type:
    """The root dataclass, with a `components` field per registered (toggleable) plugin."""
    plugins = tuple((n, e.config) for n, e in registry.toggleable().items())
    tasks = tuple(probes.TASKS.items())
    if (plugins, tasks) not in _schemas:
        _schemas[plugins, tasks] = _make_schema(plugins)
    return _schemas[plugins, tasks]


_schemas: dict[tuple, type] = {}


def _make_schema(plugins: tuple) -> type:
    comps = make_dataclass("ComponentsConfig", [(n, c, field(default_factory=c)) for n, c in plugins])
    union = probes.union_config()  # data.probe: the parameters of every registered probe task
    data = make_dataclass("DataConfig", [("probe", union, field(default_factory=union))], bases=(DataConfig,))
    return make_dataclass(
        "Config",
        [
            ("name", str, field(default="escarda")),
            ("seed", int, bounded(0, min=0, max=MAX_SEED)),
            # Common random numbers: initial weights from init_seed, batch order from data_seed
            # (both default to seed); a study may vary one and hold the other.
            ("init_seed", Optional[int], bounded(None, min=0, max=MAX_SEED)),  # noqa: UP045 (make_dataclass needs it)
            ("data_seed", Optional[int], bounded(None, min=0, max=MAX_SEED)),  # noqa: UP045
            ("model", ModelConfig, field(default_factory=ModelConfig)),
            ("components", comps, field(default_factory=comps)),
            ("data", data, field(default_factory=data)),
            ("train", TrainConfig, field(default_factory=TrainConfig)),
            ("output", OutputConfig, field(default_factory=OutputConfig)),
            ("trainer", TrainerConfig, field(default_factory=TrainerConfig)),
            ("plugins", list[str], field(default_factory=list)),
        ],
    )


# ---------------------------------------------------------------------------------------- loading


def with_vocab(cfg, vocab_size: int, source: str):
    """The config with model.vocab_size taken from the tokenizer (or checked against it)."""
    from dataclasses import replace

    if cfg.model.vocab_size is None:
        return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            source,
            "model.vocab_size",
            f"vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}",
            "leave model.vocab_size null to take the tokenizer's size",
        )
    return cfg


def seeds(cfg) -> tuple[int, int]:
    """(init seed, data seed) of a config: each defaults to `seed`."""
    pick = lambda s: cfg.seed if s is None else s
    return pick(getattr(cfg, "init_seed", None)), pick(getattr(cfg, "data_seed", None))


def non_string_key(d, prefix: str = "") -> tuple[str, object] | None:
    """The first mapping key that YAML did not read as a string (`null`, `~`, `yes`, `1`): its
    parent's dotted path and the key; None when every key is a string."""
    if isinstance(d, dict):
        for k, v in d.items():
            if not isinstance(k, str):
                return prefix, k
            found = non_string_key(v, f"{prefix}.{k}" if prefix else k)
            if found is not None:
                return found
    elif isinstance(d, list):
        for item in d:
            found = non_string_key(item, prefix)
            if found is not None:
                return found
    return None


def read_yaml(path: Path, source: str | None = None) -> dict:
    source = source or str(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ConfigError(
            source,
            None,
            f"{path} is a folder, not an experiment file",
            f"pass one YAML file inside it (e.g. {path / found[0]})" if found else "pass an experiment YAML file",
        )
    if not path.is_file():
        raise ConfigError(
            source,
            None,
            f"file {path} does not exist",
            "check the path (relative paths in `extends:` are relative to the file)",
        )
    try:
        shape = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
        if shape is not None and not isinstance(shape, dict):  # OmegaConf would read a string as a key
            raise ConfigError(
                str(path),
                None,
                f"the file holds a YAML {type(shape).__name__}, not a mapping of keys to values",
                "write `key: value` lines at the top level (e.g. `extends: escarda.yaml`)",
            )
        bad = non_string_key(shape or {})
        if bad is not None:
            where, key = bad
            shown = "null" if key is None else str(key).lower() if isinstance(key, bool) else str(key)
            kind = "null (no value)" if key is None else "a boolean" if isinstance(key, bool) else "a number"
            raise ConfigError(
                str(path),
                where or None,
                f"the key `{shown}` under `{where or 'the top level'}` is read by YAML as {kind}, not a name",
                f'quote it ("{shown}": ...) or choose another name',
            )
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "python/" in str(problem):
            raise ConfigError(
                str(path),
                None,
                f"a YAML tag that builds a Python object{line} is not allowed ({problem})",
                "write plain values (numbers, strings, lists, mappings); plugins are listed by module path "
                "under `plugins:`",
            ) from None
        raise ConfigError(
            str(path),
            None,
            f"invalid YAML{line}: {problem}",
            "fix the syntax (indentation, a missing ':' or an unclosed bracket)",
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            str(path), None, "the file is not a mapping of keys to values", "write `key: value` lines at the top level"
        )
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
            raise ConfigError(
                str(current),
                "extends",
                f"`extends:` forms a cycle ({cycle})",
                "make the chain of parents end in a file without `extends:`",
            )
        seen.append(resolved)
        raw = read_yaml(current, str(current) if not chain else None)
        parent = raw.pop("extends", None)
        chain.append((str(current), raw))
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(
                str(current), "extends", "`extends:` must be a file path", "write e.g. `extends: escarda.yaml`"
            )
        current = (current.parent / parent) if parent else None
    return chain[::-1]


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(
                CLI,
                o,
                f"override {o!r} is not of the form key=value",
                "write dotted overrides like `train.max_steps=50`",
            )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # omegaconf grammar errors
        raise ConfigError(
            CLI, None, f"cannot parse overrides: {e}".splitlines()[0], "write dotted overrides like `model.d_model=96`"
        ) from None


def load(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    variant: tuple[str, dict] | None = None,
    forced: dict | None = None,
) -> Any:
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
            raise ConfigError(
                src, "plugins", "`plugins:` must be a list of module paths", "write e.g. `plugins: [my_pkg.my_plugin]`"
            )
        plugins += [m for m in p if m not in plugins]
    registry.discover(plugins, source=str(path))
    cfg = merge(sources)
    origin = origins(sources)
    if "name" not in origin:  # no file names the run: name it after the file, not the schema default
        cfg.name = Path(path).stem
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
                raise ConfigError(
                    source,
                    "grid",
                    "`grid:` must be a mapping",
                    "write e.g. `grid: {seeds: [0, 1], leave_one_out: [engram]}`",
                )
            child = raw["grid"]
            # a key whose kind changes (seeds: a list in the parent, {min, max, step} here) is replaced
            parent = {k: v for k, v in (grid or {}).items() if not (k in child and type(v) is not type(child[k]))}
            grid = OmegaConf.to_container(OmegaConf.merge(parent, child))
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
            raise ConfigError(
                src,
                "grid",
                "this is a grid file (it has a `grid:` block), which only "
                "`python -m escarda_lab.run` and `escarda_lab.bench` accept",
                "run it with `python -m escarda_lab.run FILE`, or pass one of its run folders' config.yaml",
            )
        cfg = merge_into(cfg, raw, src)
    return cfg


def merge_into(node: DictConfig, raw: dict, src: str) -> DictConfig:
    """`raw` merged into a structured node; an unknown key or a wrong type is a ConfigError."""
    try:
        return OmegaConf.merge(node, raw)
    except oc_errors.ConfigKeyError as e:
        raise unknown_key(src, node, e.full_key or str(e.key)) from None
    except (oc_errors.ValidationError, oc_errors.ConfigTypeError) as e:
        raise wrong_type(src, node, e) from None


def origins(sources: list[tuple[str, dict]]) -> dict[str, str]:
    """Dotted key -> the last source that set it (for error messages)."""
    out: dict[str, str] = {}
    for src, raw in sources:
        for k in flatten(raw):
            out[k] = src
    return out


def replace_dotted(cfg: Any, key: str, value: Any) -> Any:
    """A copy of a typed config with one dotted key set, e.g. ("model.ffn_hidden", 512)."""
    from dataclasses import replace

    head, _, rest = key.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: replace_dotted(getattr(cfg, head), rest, value)})


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML that loads in a fresh process. The schema holds a section for
    every plugin registered in this process; a disabled plugin from a module this config does not
    list under `plugins:` is left out, so the text does not depend on what else was imported."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    if "components" in d:
        listed = set(d.get("plugins", []))
        for name, entry in registry.toggleable().items():
            module = entry.module
            if not module.startswith("components.") and module not in listed and not d["components"][name]["enabled"]:
                del d["components"][name]
    return OmegaConf.to_yaml(OmegaConf.create(d))
