"""engram: hashes deterministic, in range, causal, spread over buckets; collapse is reported."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from escarda_lab.model import EscardaLM

VARIANTS = ["escarda", "ids", "deepseek"]


def engram_model(tiny_model_cfg, variant, **cfg):
    comps = {
        "engram": {
            "enabled": True,
            "variant": variant,
            "table_size": 256,
            "heads": 2,
            "max_ngram": 3,
            "layers": [1],
            **cfg,
        }
    }
    return EscardaLM(tiny_model_cfg(components=comps))


def buckets(model, ids):
    eng = model.embedders["engram"]
    return eng.buckets(ids, model.embed(ids), None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hashes_are_deterministic_and_in_range(tiny_model_cfg, variant):
    model = engram_model(tiny_model_cfg, variant)
    ids = torch.randint(0, 97, (3, 20))
    b1, b2 = buckets(model, ids), buckets(model, ids)
    assert torch.equal(b1, b2) and b1.shape == (3, 20, 4)
    assert b1.min() >= 0 and b1.max() < 256


@pytest.mark.parametrize("variant", VARIANTS)
@given(t=st.integers(0, 15), seed=st.integers(0, 1000))
@settings(max_examples=10, deadline=None)
def test_bucket_at_t_depends_only_on_the_n_gram_ending_at_t(tiny_model_cfg, variant, t, seed):
    model = engram_model(tiny_model_cfg, variant)
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(8, 97, (1, 16), generator=g)
    b = a.clone()
    b[:, t + 1 :] = torch.randint(8, 97, (1, 15 - t), generator=g)  # the future
    if t >= 3:
        b[:, : t - 2] = torch.randint(8, 97, (1, t - 2), generator=g)  # beyond the 3-gram
    assert torch.equal(buckets(model, a)[:, t], buckets(model, b)[:, t])


@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_model_is_causal_and_decodes_like_the_full_forward(tiny_model_cfg, variant):
    model = engram_model(tiny_model_cfg, variant).eval()
    with torch.no_grad():
        if hasattr(model.embedders["engram"], "conv"):
            model.embedders["engram"].conv.normal_(std=0.3)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(12)], 1)
    assert torch.allclose(steps, full, atol=1e-5)
    other = ids.clone()
    other[:, 7:] = (other[:, 7:] + 1) % 97
    assert torch.allclose(model(other).logits[:, :7], full[:, :7], atol=1e-6)


@pytest.mark.parametrize("variant", ["ids", "deepseek"])
def test_id_hashes_use_most_buckets_on_random_ids(tiny_model_cfg, variant):
    model = engram_model(tiny_model_cfg, variant)
    # 8 batches of 256 random positions: ~all distinct 2- and 3-grams
    many = torch.cat([buckets(model, torch.randint(0, 97, (8, 32))) for _ in range(8)]).flatten(0, 1)
    for g in range(many.shape[-1]):
        assert many[:, g].unique().numel() / 256 > 0.5


def test_escarda_stats_report_a_forced_collapse_and_health_flags_it(tiny_model_cfg):
    model = engram_model(tiny_model_cfg, "escarda").train()
    model(torch.randint(8, 97, (4, 32)))
    healthy = model.stats()
    assert min(v for k, v in healthy.items() if "spread" in k) > 0.3
    assert model.health(healthy, healthy) == {}
    with torch.no_grad():
        model.embedders["engram"].key_proj.zero_()  # every sign bit 0: every key in bucket 0
    model(torch.randint(8, 97, (4, 32)))
    collapsed = model.stats()
    assert collapsed["engram/occupancy_t0"] == pytest.approx(1 / 256)
    assert "engram" in model.health(collapsed, collapsed)


def test_gate_starts_mostly_off(tiny_model_cfg):
    model = engram_model(tiny_model_cfg, "ids").train()
    model(torch.randint(0, 97, (2, 8)))
    assert model.stats()["engram/gate_mean"] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item(), abs=1e-6)


def test_deepseek_hash_is_the_published_multiplicative_xor_written_from_the_formula(tiny_model_cfg):
    """DeepSeek Engram's NgramHashMapping: mix_n = XOR_{k<n} (id_{t-k} · a_k) (ids before the
    start are <pad>), head j of order n -> mix_n mod p_{n,j}; odd a_k shared by every order and
    head; the p_{n,j} distinct primes <= table_size."""
    import numpy as np

    comps = {"engram": {"enabled": True, "variant": "deepseek", "max_ngram": 4, "heads": 3, "table_size": 509}}
    eng = EscardaLM(tiny_model_cfg(components=comps)).embedders["engram"]
    a = eng.xor_mult.numpy()
    primes = eng.moduli.tolist()
    assert (a % 2 == 1).all() and len(set(primes)) == len(primes) == 3 * 3
    assert all(p <= 509 and all(p % d for d in range(2, int(p**0.5) + 1)) for p in primes)
    ids = torch.randint(1, 97, (2, 12))
    got = eng.buckets(ids, torch.zeros(2, 12, 32), None).numpy()
    x = ids.numpy().astype(np.int64)
    padded = np.concatenate([np.zeros((2, 3), np.int64), x], axis=1)  # <pad> = 0 before the start
    expected = []
    for n in range(2, 5):
        mix = np.zeros((2, 12), np.int64)
        for k in range(n):
            mix ^= padded[:, 3 - k : 3 - k + 12] * a[k]
        for j in range(3):
            expected.append(mix % primes[(n - 2) * 3 + j])
    assert np.array_equal(got, np.stack(expected, axis=-1))
