"""jepa: the target branch gets no gradient; zero loss when the prediction equals the target."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.jepa import JEPA, CosineDistance, JEPAConfig
from escarda_lab.model import EscardaLM, ModelOutput
from escarda_lab.objectives import total_loss


def test_no_gradient_reaches_the_target_branch():
    jepa = JEPA(type("M", (), {"d_model": 8, "norm_eps": 1e-6})(), JEPAConfig(enabled=True, pred_dim=4))
    h = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.zeros(2, 6, dtype=torch.long)
    jepa({"labels": labels}, ModelOutput(h, h)).backward()
    # position 0 is only ever a source, the last position only ever a target
    assert h.grad[:, 0].abs().sum() > 0 and h.grad[:, -1].abs().sum() == 0


def test_loss_is_zero_when_prediction_equals_target():
    jepa = JEPA(type("M", (), {"d_model": 8, "norm_eps": 1e-6})(), JEPAConfig(enabled=True, pred_dim=8))
    jepa.predictor = torch.nn.Identity()
    h = torch.randn(1, 1, 8).expand(2, 5, 8)  # h_{t+1} = h_t
    assert jepa({"labels": torch.zeros(2, 5, dtype=torch.long)}, ModelOutput(h, h)).abs() < 1e-6


def test_term_is_weighted_into_the_total(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg(components={"jepa": {"enabled": True, "pred_dim": 16, "weight": 0.5}}))
    ids = torch.randint(0, 97, (2, 8))
    total, terms = total_loss(model, {"ids": ids, "labels": ids}, model(ids))
    assert torch.allclose(total, terms["cross_entropy"] + 0.5 * terms["jepa"])


@given(seed=st.integers(0, 10_000), D=st.integers(1, 9), scale=st.floats(1e-3, 1e3))
@settings(max_examples=30, deadline=None)
def test_cosine_distance_is_one_minus_torchs_cosine_similarity_with_its_gradient(seed, D, scale):
    g = torch.Generator().manual_seed(seed)
    p = (scale * torch.randn(3, 4, D, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.randn(3, 4, D, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ours = CosineDistance.apply(p, t, 1e-8)
    ref = 1 - torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=1e-8)
    assert torch.allclose(ours, ref, atol=1e-12)
    (ours_grad,) = torch.autograd.grad((ours * w).sum(), p)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), p)
    assert torch.allclose(ours_grad, ref_grad, rtol=1e-9, atol=1e-10 / scale)  # dcos/dp ~ 1 / |p|
