"""Plugin registry: every architectural component is registered by name into a slot.

    @component("engram", slot="embedding", config=EngramConfig)
    class Engram(nn.Module): ...

The framework never imports a plugin by name. `model.py` asks `registry.enabled(slot, cfg)` for
the plugins of each slot; a user adds a plugin by writing one module in `components/` (found
automatically) or any module listed under `plugins:` in their YAML.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from escarda_lab.errors import ConfigError


@dataclass
class ComponentConfig:
    """Base of every plugin config: `enabled` toggles the plugin from YAML."""

    enabled: bool = False


@dataclass(frozen=True)
class Slot:
    name: str
    exclusive: bool
    baseline: str | None
    contract: str


# Shapes: B batch, T time, D d_model, m residual streams.
SLOTS: dict[str, Slot] = {
    s.name: s
    for s in [
        Slot("attention", True, "mha",
             "__init__(model_cfg, cfg, layer, modifiers); forward(x[B,T,D], rope, cache) -> y[B,T,D]"),
        Slot("attention_modifier", False, None,
             "forward(y[B,H,T,hd], v[B,H,T,hd]) -> y': edits per-head attention output"),
        Slot("ffn", True, "swiglu",
             "__init__(model_cfg, cfg, layer); forward(x[B,T,D]) -> y[B,T,D]; may set self.aux_loss, "
             "take ids (class attribute needs_ids), define after_step() and inactive_params()"),
        Slot("residual", True, "plain",
             "__init__(model_cfg, cfg, n_sites); expand(x)->S, sublayer(S, fn, site)->S, collapse(S)->x, "
             "read(S)->h[B,T,D] (the state a block sees), add(S, delta[B,T,D])->S"),
        Slot("embedding", False, None,
             "__init__(model_cfg, cfg); forward(ids[B,T], x[B,T,D], cache) -> x[B,T,D]; optional "
             "before_block(ids, S, residual, layer, cache) -> S, called before every block"),
        Slot("refine", True, None, "__init__(model_cfg, cfg); forward(h[B,T,D]) -> h[B,T,D]"),
        Slot("objective", False, "cross_entropy",
             "__init__(model_cfg, cfg); forward(batch, out: ModelOutput) -> scalar; `weight` attribute"),
    ]
}


@dataclass
class Entry:
    name: str
    slot: str
    cls: type
    config: type
    baseline: bool = False


_REGISTRY: dict[str, Entry] = {}
_discovered: set[str] = set()


def component(name: str, slot: str, config: type | None = None) -> Callable[[type], type]:
    """Register a plugin class under `name` in `slot` with its config dataclass.

    A slot's baseline (e.g. `mha`) takes no `components:` entry: it is what the slot falls back to.
    """
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots are {sorted(SLOTS)}")

    def register(cls: type) -> type:
        prev = _REGISTRY.get(name)
        if prev is not None and prev.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"component {name!r} registered twice ({prev.cls} and {cls})")
        _REGISTRY[name] = Entry(name, slot, cls, config or ComponentConfig,
                                baseline=SLOTS[slot].baseline == name)
        cls.component_name = name
        return cls

    return register


def discover(extra_modules: list[str] | tuple[str, ...] = (), source: str = "plugins") -> None:
    """Import every module of the `components` package, then the user's extra modules."""
    import components

    for info in pkgutil.iter_modules(components.__path__):
        _import(f"components.{info.name}", source)
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
                source, "plugins", f"cannot import plugin module {mod!r}",
                "list an importable module path (e.g. `my_pkg.my_plugin`) that is on PYTHONPATH",
            ) from None
        raise
    _discovered.add(mod)


def entries() -> dict[str, Entry]:
    return dict(_REGISTRY)


def toggleable() -> dict[str, Entry]:
    """Plugins that appear under `components:` in the config (everything but slot baselines)."""
    return {n: e for n, e in sorted(_REGISTRY.items()) if not e.baseline}


def get(name: str) -> Entry:
    return _REGISTRY[name]


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
    base = [(get(spec.baseline), ComponentConfig(enabled=True))] if spec.baseline else []
    if spec.exclusive:
        return on[:1] or base
    return base + on
