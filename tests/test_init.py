"""Common random numbers: a weight's initial value depends on (init seed, its name) only."""

from __future__ import annotations

import torch

from escarda_lab import config
from escarda_lab.model import EscardaLM
from tests.conftest import ROOT

SHAPE = [
    "model.vocab_size=97",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.head_dim=16",
    "model.ffn_hidden=48",
    "model.max_seq_len=32",
    "data.seq_len=16",
]


def build(experiment: str, *extra: str) -> EscardaLM:
    return EscardaLM(config.load(ROOT / "experiments" / experiment, [*SHAPE, *extra]))


def test_variants_of_one_seed_share_every_common_weight():
    full, no_engram = build("escarda.yaml"), build("no_engram.yaml")
    a, b = full.state_dict(), no_engram.state_dict()
    shared = a.keys() & b.keys()
    assert len(shared) > 20 and any(k.startswith("embedders.hash_lookup") for k in shared)
    assert [k for k in shared if not torch.equal(a[k], b[k])] == []


def test_every_leave_one_out_variant_shares_the_baselines_weights():
    full = build("escarda.yaml").state_dict()
    for name in ["mla", "xsa", "hash_lookup", "hyper_connections", "hrm_refine", "jepa", "mtp"]:
        other = build("escarda.yaml", f"components.{name}.enabled=false").state_dict()
        shared = full.keys() & other.keys()
        assert [k for k in shared if not torch.equal(full[k], other[k])] == [], name


def test_unrelated_random_draws_before_building_change_nothing():
    torch.manual_seed(1)
    a = build("escarda.yaml").state_dict()
    torch.randn(12345)
    torch.manual_seed(999)
    b = build("escarda.yaml").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_seed_changes_the_weights_and_defaults_to_seed():
    base = build("vanilla.yaml", "seed=4").state_dict()
    same = build("vanilla.yaml", "seed=0", "init_seed=4").state_dict()
    other = build("vanilla.yaml", "seed=4", "init_seed=5").state_dict()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not torch.equal(base["embed.weight"], other["embed.weight"])
