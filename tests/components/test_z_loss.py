"""z_loss = mean over valid positions of logsumexp(logits)^2; total = CE + weight × z."""

from __future__ import annotations

import torch

from components.z_loss import ZLoss, ZLossConfig
from escarda_lab.model import EscardaLM, ModelOutput
from escarda_lab.objectives import total_loss


def test_z_loss_matches_formula_and_ignores_masked_labels():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, -100, 2], [0, 3, -100]])
    z = ZLoss(None, ZLossConfig(enabled=True))({"labels": labels}, ModelOutput(logits, logits))
    lse = torch.logsumexp(logits, -1)
    expected = torch.stack([lse[0, 0], lse[0, 2], lse[1, 0], lse[1, 1]]).pow(2).mean()
    assert torch.allclose(z, expected)


def test_total_is_ce_plus_weighted_z(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg(components={"z_loss": {"enabled": True, "weight": 0.25}}))
    ids = torch.randint(0, 97, (2, 8))
    batch = {"ids": ids, "labels": ids}
    total, terms = total_loss(model, batch, model(ids))
    assert set(terms) == {"cross_entropy", "z_loss"}
    assert torch.allclose(total, terms["cross_entropy"] + 0.25 * terms["z_loss"])
