"""Plugin registry and protocol: every architectural component is a plugin registered by name.

    @component("engram", slot="embedding", config=EngramConfig)
    class Engram(Embedding): ...

    @component("mla", slot="attention", config=MLAConfig, variant="deepseek")
    class DeepSeekMLA(Attention): ...          # chosen when components.mla.variant = deepseek

The framework never imports or names a plugin: `model.py` asks `registry.enabled(slot, cfg)` for
the plugins of each slot. A user adds one by writing a module in `components/` (found
automatically) or any module listed under `plugins:` in their YAML.

`Plugin` below is the protocol, written once: every hook a plugin may define, with its default
(which does nothing). Each slot has a base class that adds the slot's own contract: its abstract
methods must be defined by every plugin of the slot, or registering it fails.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from escarda_lab.errors import ConfigError

# ------------------------------------------------------------------------------------ protocol


@dataclass
class ComponentConfig:
    """Base of every plugin config: `enabled` toggles the plugin from YAML; each field becomes
    `components.<name>.<field>`. A plugin with variants gives its config a `variant` field."""

    enabled: bool = False

    def check(self, model_cfg) -> list[tuple[str, str, str]]:
        """Problems the type system cannot catch, as (key, problem, fix) triples; [] = fine.
        Called for enabled plugins when a config is loaded; each becomes a one-paragraph error."""
        return []


def bounded(
    default: Any,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
):
    """A config field whose value must be >= min, <= max, > above, < below (None: no bound; a
    None value is not checked). Every config, plugin configs included, is checked by one rule."""
    limits = {k: v for k, v in dict(min=min, max=max, above=above, below=below).items() if v is not None}
    return field(default=default, metadata={"bounds": limits})


def out_of_bounds(value: Any, bounds: dict) -> str | None:
    """Why `value` breaks `bounds` (see `bounded`), or None."""
    if value is None:
        return None
    tests = {
        "min": (lambda v, b: v >= b, ">="),
        "max": (lambda v, b: v <= b, "<="),
        "above": (lambda v, b: v > b, ">"),
        "below": (lambda v, b: v < b, "<"),
    }
    broken = [f"{sign} {b}" for k, b in bounds.items() for ok, sign in [tests[k]] if not ok(value, b)]
    if not broken:
        return None
    return "must be " + " and ".join(f"{tests[k][1]} {b}" for k, b in bounds.items()) + f", got {value}"


class Plugin(nn.Module):
    """The protocol of a plugin. Every hook is optional: the defaults here do nothing.

    Set by the framework: `component_name` (the registered name) and `variant`.
    """

    component_name: str = ""
    variant: str = ""
    #: FFN plugins: `forward(x, ids=ids)` also receives the token ids [B, T] (e.g. hash routing).
    needs_ids: bool = False
    #: The step-time ratio over the FLOP ratio (both against vanilla) `bench` accepts for this
    #: plugin: its own FLOPs are its architecture, anything above them is its code's overhead.
    time_per_flop_target: float = 1.10
    #: Set in `forward` to `(term, weight)`: `weight * term` is added to the training loss and
    #: `term` is logged as `train/<component_name>`. Any plugin may set it; None = no term.
    aux_loss: tuple[Tensor, float] | None = None

    @classmethod
    def build(cls, model_cfg, cfg, **slot_args) -> nn.Module:
        """The module to put in the slot (default: an instance of this class). A plugin may
        return something else for some positions, e.g. MoE keeps the dense FFN in unlisted layers."""
        return cls(model_cfg, cfg, **slot_args)

    def init_weights(self) -> None:
        """Run after the default init (Normal(0, init_std) for every Linear and Embedding), under
        a generator seeded by (init seed, this module's name): draw from the global RNG freely."""

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Matrices AdamW must not decay (gates, mixing coefficients). Vectors never are."""
        return []

    def lr_scales(self) -> list[tuple[nn.Parameter, float]]:
        """Parameters trained at a multiple of train.lr, as (parameter, multiple); the warm-up
        and schedule apply to them as to the rest. Default: none."""
        return []

    def stats(self) -> dict[str, float]:
        """Health signals, logged as `components/<name>/<stat>` every log step (averaged over
        the plugin's instances). Read detached tensors a forward left behind (see `probing`)."""
        return {}

    def health(self, final: dict[str, float], peak: dict[str, float]) -> str | None:
        """Why this plugin looks dead at the end of a run, or None. final: the last `stats()`;
        peak: the largest |value| each stat reached. Listed as `dead_components` in metrics.json."""
        return None

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. MoE's aux-loss-free bias update)."""

    def inactive_params(self) -> int:
        """Parameters a token does not use (unselected experts): total - active."""
        return 0


class Attention(Plugin):
    """`__init__(model_cfg, cfg, layer)`. A plugin computes the per-head output and maps it back:
    `attend(x [B,T,D], rotary, cache) -> (y [B,H,T,hd], v [B,H_kv,T,hd])`, `project(y) -> [B,T,D]`.
    `forward` is written once, here: every attention modifier edits y between the two
    (`y = mod(y, v)`), so no attention can leave one out."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.modifiers = nn.ModuleList()

    @classmethod
    def build(cls, model_cfg, cfg, layer: int = 0, modifiers=()) -> nn.Module:
        attn = cls(model_cfg, cfg, layer=layer)
        del attn.modifiers  # registered again after the plugin's own weights, in the order given
        attn.modifiers = nn.ModuleList(modifiers)
        return attn

    @abstractmethod
    def attend(self, x: Tensor, rotary, cache=None) -> tuple[Tensor, Tensor | None]:
        """The per-head attention output y and the values v it attended over (v may be None when
        `self.modifiers` is empty and computing it would cost something)."""

    @abstractmethod
    def project(self, y: Tensor) -> Tensor:
        """[B, H, T, hd] -> [B, T, D]: the output projection."""

    def forward(self, x: Tensor, rotary, cache=None) -> Tensor:
        y, v = self.attend(x, rotary, cache)
        for mod in self.modifiers:
            y = mod(y, v)
        return self.project(y)


class AttentionModifier(Plugin):
    """`__init__(model_cfg, cfg)`: edits the per-head attention output."""

    @abstractmethod
    def forward(self, y: Tensor, v: Tensor) -> Tensor:
        """y [B,H,T,hd], v [B,H_kv,T,hd] -> y' [B,H,T,hd]."""


class FFN(Plugin):
    """`__init__(model_cfg, cfg, layer)`."""

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """[B,T,D] -> [B,T,D] (plus `ids=` [B,T] when `needs_ids`)."""

    @classmethod
    def width(cls, model_cfg, cfg) -> tuple[str, int]:
        """(dotted config key, current value) of the width that absorbs parameters when a grid
        matches parameters (`grid.match: params`)."""
        return "model.ffn_hidden", model_cfg.ffn_hidden


class Residual(Plugin):
    """`__init__(model_cfg, cfg, n_sites)`. Owns the residual state S: [B,T,D], or [B,T,n,D] for
    n streams. The model only ever touches S through these five methods."""

    streams = 1  # how many D-wide copies of the state S holds (memory estimates)

    @abstractmethod
    def expand(self, x: Tensor) -> Tensor:
        """The embedding [B,T,D] -> the initial state S."""

    @abstractmethod
    def sublayer(self, S: Tensor, fn, site: int) -> Tensor:
        """S after `fn` (one block's attention or FFN, [B,T,D] -> [B,T,D]) at site `site` of n_sites."""

    @abstractmethod
    def collapse(self, S: Tensor) -> Tensor:
        """The final state -> h [B,T,D] for the output head."""

    @abstractmethod
    def read(self, S: Tensor) -> Tensor:
        """The [B,T,D] view of S a per-block feature is computed from."""

    @abstractmethod
    def add(self, S: Tensor, delta: Tensor) -> Tensor:
        """S with a feature delta [B,T,D] added to every stream."""

    def read_streams(self, S: Tensor) -> Tensor:
        """Every stream of S as [B,T,n,D] (one stream: S with a stream axis)."""
        return S.unsqueeze(-2)

    def add_streams(self, S: Tensor, delta: Tensor) -> Tensor:
        """S with delta [B,T,n,D] added stream by stream."""
        return S + delta.squeeze(-2)


class Embedding(Plugin):
    """`__init__(model_cfg, cfg)`: edits the token embedding, before the first block and/or
    before every block."""

    @classmethod
    def build(cls, model_cfg, cfg, streams: int = 1) -> nn.Module:
        """`streams`: the residual's stream count, for a plugin that works per stream (override
        `build` to take it, as DeepSeek's engram does)."""
        return cls(model_cfg, cfg)

    @abstractmethod
    def forward(self, ids: Tensor, x: Tensor, cache=None) -> Tensor:
        """ids [B,T], the embedding x [B,T,D] -> x (return x unchanged to act in `before_block` only)."""

    def before_block(self, ids: Tensor, S: Tensor, residual: Residual, layer: int, cache=None) -> Tensor:
        """Called before every block with the residual state; add features with `residual.add`."""
        return S


class Refine(Plugin):
    """`__init__(model_cfg, cfg)`."""

    @abstractmethod
    def forward(self, h: Tensor) -> Tensor:
        """The final hidden state [B,T,D] -> h [B,T,D]."""


class Objective(Plugin):
    """`__init__(model_cfg, cfg, lm)`; `forward(batch, out: ModelOutput) -> scalar term`.

    The loss adds `weight * term`. `lm` (and `out.lm`) is the model's narrow handle for objectives:
    `embed(ids)`, `logits(h)` (final norm and output head), `nll_lse(h, labels)` (the same head
    fused with the cross-entropy: no logits materialised), `rotary(pos, T)` and
    `baseline_block(layer)` (a new block of the slot baselines)."""

    weight: float = 1.0
    # What the term is, per unit, of the main head's per-position sums ("nll", "lse_sq"), each a
    # mean over the valid positions: the fused head prepares its gradient for that mix.
    head_terms: dict[str, float] = {}

    @abstractmethod
    def forward(self, batch: dict, out) -> Tensor:
        """The objective's term (a scalar) for a batch and the model's output."""


SLOT_BASES: dict[str, type[Plugin]] = {
    "attention": Attention,
    "attention_modifier": AttentionModifier,
    "ffn": FFN,
    "residual": Residual,
    "embedding": Embedding,
    "refine": Refine,
    "objective": Objective,
}


@dataclass(frozen=True)
class Slot:
    name: str
    exclusive: bool  # at most one plugin (falling back to the slot's baseline, if it has one)
    has_baseline: bool  # a plugin registered with baseline=True fills the slot when nothing else does


SLOTS: dict[str, Slot] = {
    s.name: s
    for s in [
        Slot("attention", True, True),
        Slot("attention_modifier", False, False),
        Slot("ffn", True, True),
        Slot("residual", True, True),
        Slot("embedding", False, False),
        Slot("refine", True, False),
        Slot("objective", False, True),
    ]
}

# ------------------------------------------------------------------------------------ registry


@dataclass
class Entry:
    name: str
    slot: str
    config: type
    variants: dict[str, type] = field(default_factory=dict)  # "" = the only class
    baseline: bool = False

    @property
    def module(self) -> str:
        return next(iter(self.variants.values())).__module__

    def cls_for(self, cfg) -> type:
        if "" in self.variants:
            return self.variants[""]
        return self.variants[cfg.variant]

    def build(self, model_cfg, cfg, **slot_args) -> nn.Module:
        return self.cls_for(cfg).build(model_cfg, cfg, **slot_args)


_REGISTRY: dict[str, Entry] = {}
_discovered: set[str] = set()


def component(
    name: str, slot: str, config: type | None = None, variant: str = "", baseline: bool = False
) -> Callable[[type], type]:
    """Register a plugin class under `name` in `slot` with its config dataclass; with `variant`,
    the class used when `components.<name>.variant` equals it (every variant names the same config).

    `baseline=True` makes it the slot's baseline (e.g. `mha`): it takes no `components:` entry and
    is what the slot falls back to when no plugin of the slot is enabled.
    """
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots are {sorted(SLOTS)}")
    if baseline and not SLOTS[slot].has_baseline:
        raise ValueError(f"the {slot!r} slot has no baseline")

    def register(cls: type) -> type:
        base = SLOT_BASES[slot]
        if not issubclass(cls, base):
            raise TypeError(f"plugin {name!r} ({cls.__qualname__}) must subclass registry.{base.__name__}")
        missing = unimplemented(cls)
        if missing:
            raise TypeError(
                f"plugin {name!r} ({cls.__qualname__}) does not implement {', '.join(missing)}, "
                f"which the {slot} slot's contract (registry.{base.__name__}) requires"
            )
        entry = _REGISTRY.setdefault(name, Entry(name, slot, config or ComponentConfig, baseline=baseline))
        prev = entry.variants.get(variant)
        if (
            entry.slot != slot
            or (prev is not None and prev.__qualname__ != cls.__qualname__)
            or (entry.variants and ("" in entry.variants) != (variant == ""))
        ):
            raise ValueError(f"component {name!r} registered twice ({prev or entry.slot} and {cls})")
        entry.variants[variant] = cls
        if variant and not hasattr(entry.config, "variant"):
            raise TypeError(f"plugin {name!r} registers variant {variant!r}, so its config needs a `variant` field")
        cls.component_name, cls.variant = name, variant
        return cls

    return register


def unimplemented(cls: type) -> list[str]:
    """The slot contract's abstract methods `cls` leaves undefined."""
    return sorted(n for n in dir(cls) if getattr(getattr(cls, n, None), "__isabstractmethod__", False))


def discover(extra_modules: list[str] | tuple[str, ...] = (), source: str = "plugins") -> None:
    """Import every module of the `components` package, then the user's extra modules."""
    package = importlib.import_module("components")
    for info in pkgutil.iter_modules(package.__path__):
        _import(f"{package.__name__}.{info.name}", source)
    for mod in extra_modules:
        _import(mod, source)


def _import(mod: str, source: str) -> None:
    if mod in _discovered:
        return
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):
            raise ConfigError(
                source,
                "plugins",
                f"cannot import plugin module {mod!r}",
                "list an importable module path (e.g. `my_pkg.my_plugin`) that is on PYTHONPATH",
            ) from None
        raise ConfigError(
            source,
            "plugins",
            f"plugin module {mod!r} imports {e.name!r}, which is not installed",
            f"pip install the package that provides {e.name!r}, or remove {mod!r} from `plugins:`",
        ) from None
    except ConfigError:
        raise
    except Exception as e:  # the plugin's own code failed while importing
        import traceback

        if isinstance(e, SyntaxError) and e.filename:  # raised by the compiler, not from a frame of the file
            filename, lineno, what = e.filename, e.lineno, f"{type(e).__name__}: {e.msg}"
        else:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            filename, lineno, what = frame.filename, frame.lineno, f"{type(e).__name__}: {e}"
        raise ConfigError(
            source,
            "plugins",
            f"plugin module {mod!r} raised {what} (at {filename}:{lineno})",
            f"fix the error in {filename} at line {lineno}, or remove {mod!r} from `plugins:`",
        ) from None
    _discovered.add(mod)


def names() -> list[str]:
    """Every registered plugin, baselines included."""
    return sorted(_REGISTRY)


def toggleable() -> dict[str, Entry]:
    """Plugins that appear under `components:` in the config (everything but slot baselines)."""
    return {n: e for n, e in sorted(_REGISTRY.items()) if not e.baseline}


def get(name: str) -> Entry:
    return _REGISTRY[name]


def baseline(slot: str) -> Entry:
    """The plugin registered with baseline=True for `slot`."""
    found = [e for e in _REGISTRY.values() if e.slot == slot and e.baseline]
    if len(found) != 1:
        raise ValueError(f"the {slot!r} slot needs exactly one baseline plugin, found {[e.name for e in found]}")
    return found[0]


def enabled(slot: str, components_cfg: Any) -> list[tuple[Entry, Any]]:
    """The plugins active in `slot` as (entry, plugin config), baseline included where it applies.

    Exclusive slots give exactly one plugin (the enabled one, else the baseline) or none when the
    slot has no baseline. Non-exclusive slots give the baseline (if any) plus every enabled plugin.
    """
    spec = SLOTS[slot]
    on = [
        (e, getattr(components_cfg, e.name))
        for e in toggleable().values()
        if e.slot == slot and getattr(components_cfg, e.name).enabled
    ]
    base = [(baseline(slot), ComponentConfig(enabled=True))] if spec.has_baseline else []
    if spec.exclusive:
        return on[:1] or base
    return base + on
