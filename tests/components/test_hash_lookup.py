"""hash_lookup: the token hash depends only on the id; identity at init; feeds the first blocks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.hash_lookup import token_hash
from escarda_lab.model import EscardaLM


@given(ids=st.lists(st.integers(0, 70_000), min_size=1, max_size=50), head=st.integers(0, 5))
@settings(max_examples=30, deadline=None)
def test_token_hash_is_a_function_of_the_id_alone(ids, head):
    t = torch.tensor(ids)
    h = token_hash(t, head, 64)
    assert ((h >= 0) & (h < 64)).all()
    assert torch.equal(h, torch.stack([token_hash(torch.tensor(i), head, 64) for i in ids]))


def test_heads_hash_differently():
    ids = torch.arange(1000)
    assert not torch.equal(token_hash(ids, 0, 64), token_hash(ids, 1, 64))


def test_identity_at_init_and_gate_gets_gradient(tiny_model_cfg):
    on = EscardaLM(tiny_model_cfg(components={"hash_lookup": {"enabled": True, "layers": 1, "table_size": 64}}))
    off = EscardaLM(tiny_model_cfg())
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("embedders")})
    ids = torch.randint(0, 97, (2, 8))
    out = on(ids).logits
    assert torch.equal(out, off(ids).logits)
    out.sum().backward()
    assert on.embedders["hash_lookup"].gate.grad.abs().sum() > 0


def test_only_the_first_layers_receive_features(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg(components={"hash_lookup": {"enabled": True, "layers": 1, "table_size": 64}}))
    lookup = model.embedders["hash_lookup"]
    with torch.no_grad():
        lookup.gate.fill_(1.0)
    S = torch.zeros(1, 4, 32)
    ids = torch.randint(0, 97, (1, 4))
    assert lookup.before_block(ids, S, model.residual, 0).abs().sum() > 0
    assert torch.equal(lookup.before_block(ids, S, model.residual, 1), S)
