"""hrm_refine: exact identity at init with a live gate gradient; one-step gradient."""

from __future__ import annotations

import torch

from components.hrm import HRMRefine
from escarda_lab.model import EscardaLM


def hrm(tiny_model_cfg, **cfg):
    model = EscardaLM(tiny_model_cfg(components={"hrm_refine": {"enabled": True, "dim": 16, **cfg}}))
    return model.refine


def test_identity_at_init(tiny_model_cfg):
    h = torch.randn(2, 5, 32)
    assert torch.equal(hrm(tiny_model_cfg)(h), h)


def test_gate_gets_gradient_at_init(tiny_model_cfg):
    block = hrm(tiny_model_cfg)
    block(torch.randn(2, 5, 32)).pow(2).sum().backward()
    assert block.gates.grad.abs().item() > 0
    assert block.up.weight.grad.abs().sum() == 0  # through a zero gate, only the gate moves first


def test_one_step_grad_keeps_only_the_last_step(tiny_model_cfg):
    block = hrm(tiny_model_cfg, steps=3, one_step_grad=True)
    with torch.no_grad():
        block.gates.fill_(0.5)
    block(torch.randn(2, 5, 32)).pow(2).sum().backward()
    assert block.gates.grad[:2].abs().sum() == 0 and block.gates.grad[2].abs() > 0


def test_full_gradient_reaches_every_step(tiny_model_cfg):
    block = hrm(tiny_model_cfg, steps=3)
    with torch.no_grad():
        block.gates.fill_(0.5)
    block(torch.randn(2, 5, 32)).pow(2).sum().backward()
    assert (block.gates.grad.abs() > 0).all()


def test_dead_gate_is_flagged():
    assert HRMRefine.health({"gate0": 0.0}, {"gate0": 0.0}) is not None
    assert HRMRefine.health({"gate0": 0.0}, {"gate0": 0.2}) is None
