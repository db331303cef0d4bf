"""Registry: slots, exclusive fallback to the baseline, user plugins from `plugins:`."""

from __future__ import annotations

import pytest
import torch

from escarda_lab import registry
from escarda_lab.errors import ConfigError
from escarda_lab.model import EscardaLM

USER = {"plugins": "[tests.plugins.dummy]"}


def test_baselines_fill_every_slot_that_has_one(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg())
    names = {n for n, _ in model.plugin_modules()}
    assert {"mha", "swiglu", "plain", "cross_entropy"} <= names


def test_baselines_are_not_toggles():
    assert not {"mha", "swiglu", "plain", "cross_entropy"} & set(registry.toggleable())


def test_user_plugin_replaces_exclusive_baseline(tiny_model_cfg):
    cfg = tiny_model_cfg(components={"scaled_attention": {"enabled": True, "scale": 0.5}}, **{})
    model = EscardaLM(cfg)
    kinds = {type(b.attn).__name__ for b in model.blocks}
    assert kinds == {"ScaledAttention"}
    assert model.stats()["scaled_attention/scale"] == 0.5


def test_disabled_plugin_falls_back_to_baseline_of_equal_shape(tiny_model_cfg):
    on = EscardaLM(tiny_model_cfg(components={"scaled_attention": {"enabled": True}}))
    off = EscardaLM(tiny_model_cfg(components={"scaled_attention": {"enabled": False}}))
    assert type(off.blocks[0].attn).__name__ == "MultiHeadAttention"
    assert sum(p.numel() for p in on.parameters()) == sum(p.numel() for p in off.parameters())


def test_two_plugins_in_an_exclusive_slot_is_an_error(tiny_model_cfg):
    with pytest.raises(ConfigError, match="attention"):
        tiny_model_cfg(components={"scaled_attention": {"enabled": True}, "other_attention": {"enabled": True}})


def test_non_exclusive_slot_keeps_baseline_and_adds_plugins(tiny_model_cfg):
    cfg = tiny_model_cfg(components={"z_loss": {"enabled": True}})
    assert [e.name for e, _ in registry.enabled("objective", cfg.components)] == ["cross_entropy", "z_loss"]


def test_plugin_module_listed_in_yaml_is_imported(tmp_path):
    from escarda_lab import config

    path = tmp_path / "e.yaml"
    path.write_text("plugins: [tests.plugins.dummy]\ncomponents: {scaled_attention: {enabled: true, scale: 2.0}}\n")
    cfg = config.load(path, ["model.vocab_size=50"])
    out = EscardaLM(cfg)(torch.zeros(1, 4, dtype=torch.long))
    assert out.logits.shape == (1, 4, 50)


def test_unknown_slot_is_rejected():
    with pytest.raises(ValueError, match="slot"):
        registry.component("x", slot="nonsense")


def test_a_plugin_that_sets_aux_loss_as_documented_adds_it_to_the_loss(tiny_model_cfg):
    from escarda_lab.objectives import total_loss

    ids = torch.randint(0, 97, (2, 8))
    batch = {"ids": ids, "labels": ids}
    plain = EscardaLM(tiny_model_cfg())
    penalised = EscardaLM(tiny_model_cfg(components={"penalised_ffn": {"enabled": True, "weight": 0.5}}))
    base, _ = total_loss(plain, batch, plain(ids))
    total, terms = total_loss(penalised, batch, penalised(ids))
    assert terms["penalised_ffn"] > 0  # one term per plugin name, summed over the layers
    assert total.item() == pytest.approx(base.item() + 0.5 * terms["penalised_ffn"].item(), rel=1e-6)


def test_every_hook_is_declared_once_on_the_protocol():
    hooks = {
        "init_weights",
        "no_weight_decay",
        "stats",
        "health",
        "after_step",
        "inactive_params",
        "build",
        "needs_ids",
        "aux_loss",
    }
    assert hooks <= set(vars(registry.Plugin))
    assert "before_block" in vars(registry.Embedding) and "width" in vars(registry.FFN)
    assert "check" in vars(registry.ComponentConfig)
    for name in hooks:
        assert getattr(registry.Plugin, name).__doc__ or name in ("needs_ids", "aux_loss")


def test_variants_register_side_by_side():
    registry.discover()
    assert set(registry.get("mla").variants) == {"escarda", "deepseek"}
    assert set(registry.get("engram").variants) == {"escarda", "ids", "deepseek"}
    assert set(registry.get("hyper_connections").variants) == {"static", "dynamic", "dynamic_flat", "mhc"}
    assert set(registry.get("mtp").variants) == {"escarda", "deepseek"}


def test_a_class_outside_the_protocol_is_refused():
    with pytest.raises(TypeError, match="must subclass registry.Objective"):
        registry.component("stray", slot="objective")(type("Stray", (torch.nn.Module,), {}))
