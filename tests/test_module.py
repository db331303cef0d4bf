"""Optimisation details: schedule, no-decay groups, divergence handling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from escarda_lab.io import read_json
from escarda_lab.model import EscardaLM
from escarda_lab.module import lr_factor, param_groups
from escarda_lab.run import main
from tests.conftest import tiny_overrides

T = SimpleNamespace(warmup_steps=10, max_steps=110, schedule="cosine", min_lr_ratio=0.1)


def test_warmup_is_linear_from_one_step():
    assert lr_factor(0, T) == pytest.approx(0.1) and lr_factor(9, T) == pytest.approx(1.0)


def test_cosine_decays_to_min_ratio():
    assert lr_factor(10, T) == pytest.approx(1.0)
    assert lr_factor(60, T) == pytest.approx(0.55)
    assert lr_factor(110, T) == pytest.approx(0.1) and lr_factor(500, T) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    lin = SimpleNamespace(**{**vars(T), "schedule": "linear"})
    const = SimpleNamespace(**{**vars(T), "schedule": "constant"})
    assert lr_factor(60, lin) == pytest.approx(0.55) and lr_factor(100, const) == 1.0


def test_norms_and_gates_a_plugin_lists_are_not_decayed(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg(components={"hash_lookup": {"enabled": True, "layers": 1}}))
    gate = model.embedders["hash_lookup"].gate  # a [layers, D] matrix its plugin lists in no_weight_decay()
    decay, no_decay = param_groups(model, 0.1)
    no_ids = {id(p) for p in no_decay["params"]}
    assert gate.ndim == 2 and id(gate) in no_ids
    assert all(p.ndim == 1 for p in no_decay["params"] if p is not gate)
    assert id(model.embed.weight) in {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_diverging_run_stops_and_records_the_step(corpus, tmp_path, capsys):
    args = tiny_overrides(corpus, tmp_path, **{"train.max_steps": 20}) + [
        "plugins=[tests.plugins.dummy]",
        "components.explode.enabled=true",
        "components.explode.at_call=4",
    ]
    code = main(["experiments/vanilla.yaml", *args])
    assert code == 1
    assert "diverged" in capsys.readouterr().err
    metrics = read_json(tmp_path / "vanilla" / "seed0" / "metrics.json")
    # one call counts FLOPs before training, so the 5th call is training step 3
    assert metrics["status"] == "diverged" and metrics["step"] == 3


# ------------------------------------------------------------------------- precision and compile


def test_auto_runtime_is_fp32_eager_on_cpu(tiny):
    from escarda_lab.module import resolve_runtime

    cfg = resolve_runtime(tiny(**{"trainer.accelerator": "cpu"}))
    assert cfg.train.precision == "32-true" and cfg.train.compile is False


def test_auto_runtime_is_bf16_compiled_on_a_gpu(tiny, monkeypatch):
    from escarda_lab import module

    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    cfg = module.resolve_runtime(tiny())
    assert cfg.train.precision == "bf16-mixed" and cfg.train.compile is True


def test_bf16_on_a_cpu_without_native_bf16_falls_back_with_a_warning(tiny, monkeypatch):
    from escarda_lab import module

    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        cfg = module.resolve_runtime(tiny(**{"train.precision": "bf16-mixed", "trainer.accelerator": "cpu"}))
    assert cfg.train.precision == "32-true"


def test_bf16_is_kept_on_a_cpu_with_native_bf16(tiny, monkeypatch):
    from escarda_lab import module

    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: True)
    cfg = module.resolve_runtime(tiny(**{"train.precision": "bf16-mixed", "trainer.accelerator": "cpu"}))
    assert cfg.train.precision == "bf16-mixed"


def test_a_declining_gradient_norm_is_not_a_spike_but_a_jump_is():
    import torch

    from escarda_lab.module import instability

    declining = torch.linspace(10.0, 0.5, 200)  # the usual trend: 20x over the run
    assert instability(declining, warmup_steps=10)["grad_spikes"] == 0
    jumped = declining.clone()
    jumped[120] = 8 * jumped[119]
    out = instability(jumped, warmup_steps=10)
    assert out["grad_spikes"] == 1 and out["spike_steps"] == [120] and out["max_grad_ratio"] > 7
    assert instability(torch.full((5,), float("nan")), 0)["grad_spikes"] == 0
