"""Every registered plugin and variant keeps its slot's contract. The cases are read from the
registry, so a new plugin in components/ is covered without editing this file.

Per case: it builds inside a tiny model, forward and backward are finite, the matrices it
exempts from weight decay are its own parameters, and a plugin that reports statistics still
reports them when the model is compiled (where no forward keeps tensors for them).
"""

from __future__ import annotations

import math

import pytest
import torch

from escarda_lab import config, registry
from escarda_lab.model import EscardaLM
from escarda_lab.objectives import total_loss
from escarda_lab.registry import Plugin
from tests.conftest import ROOT
from tests.test_compile import TINY as COMPILE_TINY
from tests.test_compile import forget_probes

TINY = [*COMPILE_TINY, "model.rope_dim=8"]

registry.discover()
CASES = [
    (name, variant)
    for name in registry.names()
    if registry.get(name).module.startswith("components.")
    for variant in registry.get(name).variants
]


def build(name: str, variant: str) -> tuple[EscardaLM, type]:
    entry = registry.get(name)
    over = [] if entry.baseline else [f"components.{name}.enabled=true"]
    if variant:
        over.append(f"components.{name}.variant={variant}")
    if entry.slot == "attention" and variant == "deepseek":
        over.append("model.qk_norm=false")  # DeepSeek's MLA has no per-head QK-norm
    cfg = config.load(ROOT / "experiments/vanilla.yaml", TINY + over)
    torch.manual_seed(0)
    return EscardaLM(cfg).train(), entry.variants[variant]


def instances(model: EscardaLM, name: str) -> list[Plugin]:
    return [mod for n, mod in model._plugins if n == name]


def step(model: EscardaLM) -> torch.Tensor:
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = total_loss(model, {"ids": ids, "labels": ids}, model(ids))[0]
    loss.backward()
    return ids, loss


def test_every_shipped_plugin_and_variant_is_a_case():
    names = {n for n, _ in CASES}
    assert {"mha", "mla", "xsa", "swiglu", "moe", "plain", "hyper_connections", "engram", "mtp"} <= names
    assert ("mla", "deepseek") in CASES and ("hyper_connections", "mhc") in CASES


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{n}-{v}" if v else n for n, v in CASES])
def test_plugin_keeps_its_slot_contract(name, variant):
    model, cls = build(name, variant)
    mods = instances(model, name)
    assert mods, f"{name} is enabled but no instance of it is in the model"
    assert registry.unimplemented(cls) == []

    ids, loss = step(model)
    assert math.isfinite(loss.item())
    for mod in mods:
        grads = [p.grad for p in mod.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
        own = {id(p) for p in mod.parameters()}
        assert {id(p) for p in mod.no_weight_decay()} <= own, f"{name}: no_weight_decay lists another module's weights"

    if type(mods[0]).stats is Plugin.stats:
        return  # reports no statistics
    eager = {k for k in model.stats() if k.startswith(f"{name}/")}
    assert eager, f"{name} defines stats() but reported none after a training forward"
    model.compile()  # lazy: nothing is compiled until the model is called through it
    forget_probes(model)  # a compiled forward keeps nothing for stats()
    compiled = {k for k in model.collect_stats(ids) if k.startswith(f"{name}/")}
    assert compiled == eager, f"{name}: statistics vanish when the model is compiled"


def test_a_plugin_missing_a_contract_method_is_refused_when_registered():
    class HalfResidual(registry.Residual):
        def expand(self, x):
            return x

    with pytest.raises(TypeError, match="does not implement add, collapse, read, sublayer"):
        registry.component("half_residual", slot="residual")(HalfResidual)
    assert "half_residual" not in registry.names()


def test_a_new_attention_cannot_skip_the_modifiers():
    """The Attention base applies every modifier between `attend` and `project`."""
    calls = []

    class Mark(registry.AttentionModifier):
        def forward(self, y, v):
            calls.append(tuple(v.shape))
            return y * 0

    model, _ = build("mha", "")
    attn = model.blocks[0].attn
    attn.modifiers.append(Mark())
    out = attn(torch.randn(1, 5, 32), model.rope.at(0, 5))
    assert calls == [(1, 1, 5, 16)] and torch.count_nonzero(out) == 0
