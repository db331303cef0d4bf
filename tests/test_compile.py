"""torch.compile(fullgraph=True) runs the whole model with every plugin and variant (slow: ~1 min each)."""

from __future__ import annotations

import pytest
import torch

from escarda_lab import config
from escarda_lab.model import EscardaLM
from escarda_lab.objectives import total_loss
from tests.conftest import ROOT

TINY = [
    "model.vocab_size=97",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.head_dim=16",
    "model.ffn_hidden=64",
    "model.max_seq_len=64",
    "data.seq_len=32",
]
VARIANTS = {
    "escarda": [],
    "deepseek_variants": [
        "components.mla.variant=deepseek",
        "components.engram.variant=deepseek",
        "components.mtp.variant=deepseek",
    ],
    "moe": ["components.moe.enabled=true", "components.moe.routing=hash"],  # block 0 hash-routed, 1 learned
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fullgraph_compile_matches_eager(variant):
    cfg = config.load(ROOT / "experiments/escarda.yaml", TINY + VARIANTS[variant])
    torch.manual_seed(0)
    model = EscardaLM(cfg)
    ids = torch.randint(0, 97, (2, 32))
    batch = {"ids": ids, "labels": ids}
    eager = total_loss(model, batch, model(ids))[0]
    eager_stats = model.stats()
    forget_probes(model)
    model.compile(fullgraph=True)
    compiled = total_loss(model, batch, model(ids))[0]
    compiled.backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("objectives"))
    assert model.stats().keys() < eager_stats.keys()  # a compiled forward keeps nothing for stats()
    assert model.collect_stats(ids).keys() == eager_stats.keys()  # what the run logs does not vanish


def forget_probes(model) -> None:
    for mod in model.modules():
        kept = mod.__dict__.get("_probe")
        if isinstance(kept, dict):
            kept.clear()
        elif kept is not None:
            mod._probe = None
