"""Plugin registry and protocol: every architectural component is a plugin registered by name.

    @component("engram", slot="embedding", config=EngramConfig)
    class Engram(Embedding): ...

    @component("mla", slot="attention", config=MLAConfig, variant="deepseek")
    class DeepSeekMLA(Attention): ...          # chosen when components.mla.variant = deepseek

The framework never imports or names a plugin: `model.py` asks `registry.enabled(slot, cfg)` for
the plugins of each slot. A user adds one by writing a module in `components/` (found
automatically) or any module listed under `plugins:` in their YAML.

`Plugin` below is the protocol, written once: every hook a plugin may define, with its default
(which does nothing). Each slot has a base class that adds the slot's own contract.
"""

from __future__ import annotations

import importlib
import pkgutil
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
    """`__init__(model_cfg, cfg, layer, modifiers)`; `forward(x [B,T,D], rotary, cache) -> [B,T,D]`.
    Apply each attention modifier to the per-head output: `y = mod(y [B,H,T,hd], v [B,H_kv,T,hd])`."""


class AttentionModifier(Plugin):
    """`__init__(model_cfg, cfg)`; `forward(y [B,H,T,hd], v [B,H_kv,T,hd]) -> y'`: edits the
    per-head attention output."""


class FFN(Plugin):
    """`__init__(model_cfg, cfg, layer)`; `forward(x [B,T,D]) -> [B,T,D]` (plus `ids` if needs_ids)."""

    @classmethod
    def width(cls, model_cfg, cfg) -> tuple[str, int]:
        """(dotted config key, current value) of the width that absorbs parameters when a grid
        matches parameters (`grid.match: params`)."""
        return "model.ffn_hidden", model_cfg.ffn_hidden


class Residual(Plugin):
    """`__init__(model_cfg, cfg, n_sites)`. The residual state S ([B,T,D], or [B,T,m,D] streams):
    `expand(x) -> S`; `sublayer(S, fn, site) -> S` applies fn (attention or FFN of one block) at
    one of n_sites sites; `collapse(S) -> h [B,T,D]`; `read(S) -> h` is the state a block sees;
    `add(S, delta [B,T,D]) -> S` adds a feature to every stream."""

    streams = 1  # how many D-wide copies of the state S holds (memory estimates)


class Embedding(Plugin):
    """`__init__(model_cfg, cfg)`; `forward(ids [B,T], x [B,T,D], cache) -> x`: edits the token
    embedding."""

    def before_block(self, ids: Tensor, S: Tensor, residual: Residual, layer: int, cache=None) -> Tensor:
        """Called before every block with the residual state; add features with `residual.add`."""
        return S


class Refine(Plugin):
    """`__init__(model_cfg, cfg)`; `forward(h [B,T,D]) -> h`: edits the final hidden state."""


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

        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise ConfigError(
            source,
            "plugins",
            f"plugin module {mod!r} raised {type(e).__name__}: {e} (at {frame.filename}:{frame.lineno})",
            f"fix the error in {frame.filename}, or remove {mod!r} from `plugins:`",
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
