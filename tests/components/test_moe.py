"""moe: k distinct experts per token, nothing dropped, weights, bias balancing, hash routing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.moe import SCORES, MoE, MoEConfig
from escarda_lab.accounting import param_counts
from escarda_lab.model import EscardaLM

M = type("M", (), {"d_model": 16, "ffn_hidden": 48, "init_std": 0.02, "n_layers": 2})()


def moe(**cfg) -> MoE:
    layer = MoE(M, MoEConfig(enabled=True, **cfg), hash_routed=cfg.get("routing") == "hash")
    layer.init_weights()
    return layer


def test_sqrtsoftplus_at_zero_is_sqrt_ln2():
    assert SCORES["sqrtsoftplus"](torch.tensor(0.0)).item() == pytest.approx(math.sqrt(math.log(2)))


@given(k=st.integers(1, 6), scoring=st.sampled_from(list(SCORES)), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_each_token_gets_k_distinct_experts_and_weights_sum_to_scaling(k, scoring, seed):
    torch.manual_seed(seed)
    layer = moe(top_k=k, scoring=scoring, routed_scaling=2.5)
    _, sel, w = layer.route(torch.randn(40, 16), None)
    assert sel.shape == (40, k) and all(len(set(r)) == k for r in sel.tolist())
    assert torch.allclose(w.sum(-1), torch.full((40,), 2.5), atol=1e-5)


def test_no_token_is_dropped_and_dispatch_matches_a_dense_reference():
    torch.manual_seed(0)
    layer = moe(top_k=2, n_shared=0).train()
    x = torch.randn(3, 7, 16)
    y = layer(x)
    assert layer.load.sum() == 3 * 7 * 2
    xf = x.reshape(-1, 16)
    _, sel, w = layer.route(xf, None)
    ref = torch.zeros_like(xf)
    for e in range(layer.E):  # the slow per-expert reference the vectorised dispatch must equal
        a, b = (xf @ layer.w13[e]).chunk(2, -1)
        out = (torch.nn.functional.silu(a) * b) @ layer.w2[e]
        ref += out * (w * (sel == e)).sum(-1, keepdim=True)
    assert torch.allclose(y.reshape(-1, 16), ref, atol=1e-5)


def test_bias_changes_selection_but_not_the_weights_of_a_selection():
    torch.manual_seed(0)
    layer = moe(top_k=2)
    x = torch.randn(30, 16)
    s, sel, w = layer.route(x, None)
    layer.bias[:] = torch.tensor([5.0, 5.0, 0, 0, 0, 0])
    s2, sel2, w2 = layer.route(x, None)
    assert (sel2.sort(-1).values == torch.tensor([0, 1])).all()  # the bias forced experts 0 and 1
    expected = s.gather(1, sel2)
    assert torch.allclose(w2, expected / expected.sum(-1, keepdim=True), atol=1e-6)


def test_overloaded_expert_bias_goes_down_after_an_update():
    layer = moe(top_k=1)
    layer.load = torch.tensor([10.0, 1, 1, 1, 1, 1])
    layer.after_step()
    assert layer.bias[0] < 0 and (layer.bias[1:] > 0).all()


def test_hash_routing_depends_only_on_token_id():
    layer = moe(routing="hash", top_k=2)
    ids = torch.tensor([[5, 9, 5, 7]])
    _, sel, _ = layer.route(torch.randn(4, 16), ids)
    _, sel2, _ = layer.route(torch.randn(4, 16), ids)
    assert torch.equal(sel, sel2) and torch.equal(sel[0], sel[2])


def test_shared_expert_always_applies():
    layer = moe(n_shared=1).eval()
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        layer.w2.zero_()  # routed experts output nothing
    assert torch.allclose(layer(x), layer.shared(x), atol=1e-6)


def test_balance_loss_is_one_for_perfectly_balanced_uniform_routing():
    layer = moe(top_k=2, n_routed=4)
    s = torch.full((1, 4, 4), 0.25)
    sel = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert layer.balance_loss(s, sel).item() == pytest.approx(1.0)


def test_active_params_leave_out_unselected_experts(tiny_model_cfg):
    model = EscardaLM(tiny_model_cfg(components={"moe": {"enabled": True, "n_routed": 4, "top_k": 1, "layers": [1]}}))
    counts = param_counts(model)
    expert = model.blocks[1].ffn.w13[0].numel() + model.blocks[1].ffn.w2[0].numel()
    assert counts["total"] - counts["active"] == 3 * expert
    assert type(model.blocks[0].ffn).__name__ == "SwiGLUFFN"  # layers: [1] keeps block 0 dense


def test_moe_model_trains_and_reports_balance_term(tiny_model_cfg):
    from escarda_lab.objectives import total_loss

    model = EscardaLM(tiny_model_cfg(components={"moe": {"enabled": True}})).train()
    ids = torch.randint(0, 97, (2, 8))
    total, terms = total_loss(model, {"ids": ids, "labels": ids}, model(ids))
    assert "moe" in terms and torch.allclose(total, terms["cross_entropy"] + 0.01 * terms["moe"])
    total.backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def grouped_reference(biased: torch.Tensor, n_group: int, topk_group: int, k: int) -> list[set[int]]:
    """DeepSeek-V3's node-limited routing, written per token: score each group by the sum of its
    two highest biased scores, keep the topk_group best groups, take the top-k experts inside."""
    E = biased.shape[1]
    per = E // n_group
    out = []
    for row in biased.tolist():
        groups = [sorted(row[g * per : (g + 1) * per], reverse=True) for g in range(n_group)]
        score = [sum(g[:2]) for g in groups]
        kept = sorted(range(n_group), key=lambda g: -score[g])[:topk_group]
        allowed = [e for e in range(E) if e // per in kept]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return out


def test_grouped_routing_picks_the_experts_the_formula_picks():
    layer = moe(n_routed=8, top_k=2, n_group=4, topk_group=2, scoring="sigmoid").double()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(8, dtype=torch.float64) * 0.1)
    x = torch.randn(64, 16, dtype=torch.float64)
    s, sel, _ = layer.route(x, None)
    assert s.dtype == torch.float64  # the router follows a float64 model
    expected = grouped_reference(s + layer.bias, 4, 2, 2)
    assert [set(r) for r in sel.tolist()] == expected
    flat = moe(n_routed=8, top_k=2, scoring="sigmoid").double()
    flat.load_state_dict(layer.state_dict())
    _, sel_flat, _ = flat.route(x, None)
    assert sum(set(a) != set(b) for a, b in zip(sel.tolist(), sel_flat.tolist())) > 0  # groups change choices


def test_grouped_routing_settings_are_checked():
    problems = MoEConfig(enabled=True, n_routed=6, n_group=4).check(M)
    assert problems and problems[0][0] == "n_group"
    problems = MoEConfig(enabled=True, n_routed=8, top_k=4, n_group=4, topk_group=1).check(M)
    assert problems and problems[0][0] == "topk_group"


def test_without_bias_correction_a_group_scores_its_best_expert():
    """DeepSeek's reference: amax per group when there is no bias, the top-2 sum with it."""
    layer = moe(n_routed=8, top_k=2, n_group=4, topk_group=2, scoring="sigmoid", bias_update_speed=0.0).double()
    x = torch.randn(256, 16, dtype=torch.float64)
    s, sel, _ = layer.route(x, None)
    grouped = s.view(-1, 4, 2)
    kept = grouped.amax(-1).topk(2, dim=-1).indices  # the two groups with the best single expert
    allowed = torch.zeros(len(x), 4, dtype=torch.bool).scatter_(1, kept, True)
    expected = grouped.masked_fill(~allowed[..., None], float("-inf")).view(-1, 8).topk(2, dim=-1).indices
    assert [set(r) for r in sel.tolist()] == [set(r) for r in expected.tolist()]
    assert [set(r) for r in sel.tolist()] != grouped_reference(s, 4, 2, 2)  # the top-2 rule picks otherwise


def test_routing_under_bf16_autocast_picks_the_float64_experts():
    layer = moe(n_routed=8, top_k=2, n_group=4, topk_group=2)
    reference = moe(n_routed=8, top_k=2, n_group=4, topk_group=2).double()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    _, want, _ = reference.route(x.double(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, got, _ = layer.route(x, None)
    assert s.dtype == torch.float32
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]
