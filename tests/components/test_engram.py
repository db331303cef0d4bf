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
    rows = getattr(model.embedders["engram"], "moduli0", torch.full((4,), 256))  # deepseek: a prime per table
    assert b1.min() >= 0 and (b1 < rows).all()


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


def is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(p**0.5) + 1))


def test_deepseek_hash_is_the_published_multiplicative_xor_written_from_the_formula(tiny_model_cfg):
    """DeepSeek Engram's NgramHashMapping: per engram layer l, odd multipliers a_{l,k} drawn by
    numpy's default_rng(seed + 10007 l) below int64 max / vocab / 2; mix_n = XOR_{k<n} (id_{t-k}
    · a_{l,k}) (ids before the start are <pad>); head j of order n -> mix_n mod p_{l,n,j}, the next
    primes >= table_size, distinct over layers, orders and heads; table (l, n, j) has p rows."""
    import numpy as np

    comps = {
        "engram": {
            "enabled": True,
            "variant": "deepseek",
            "max_ngram": 4,
            "heads": 3,
            "table_size": 509,
            "layers": [0, 1],
        }
    }
    eng = EscardaLM(tiny_model_cfg(components=comps)).embedders["engram"]
    ids = torch.randint(1, 97, (2, 12))
    ctx = eng.context(ids, None, "ids", 0)
    x = ids.numpy().astype(np.int64)
    padded = np.concatenate([np.zeros((2, 3), np.int64), x], axis=1)  # <pad> = 0 before the start
    all_primes = []
    for i, layer in enumerate([0, 1]):
        a = np.random.default_rng(10007 * layer).integers(0, (2**63 - 1) // 97 // 2, size=4, dtype=np.int64) * 2 + 1
        primes = eng.get_buffer(f"moduli{i}").tolist()
        assert np.array_equal(eng.get_buffer(f"xor_mult{i}").numpy(), a)
        assert all(is_prime(p) and p >= 509 for p in primes)
        assert eng.tables[i].num_embeddings == sum(primes)
        all_primes += primes
        expected = []
        for n in range(2, 5):
            mix = padded[:, 3 : 3 + 12] * a[0]
            for k in range(1, n):
                mix = mix ^ (padded[:, 3 - k : 3 - k + 12] * a[k])
            for j in range(3):
                expected.append(mix % primes[(n - 2) * 3 + j])
        assert np.array_equal(eng.keys(ctx, None, None, i).numpy(), np.stack(expected, axis=-1))
    first = [p for p in range(509, 2000) if is_prime(p)][: len(all_primes)]
    assert sorted(all_primes) == first  # the next primes from table_size on, each used once


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("streams", [1, 2])
def test_deepseek_engram_block_equals_the_reference_forward_in_float64(tiny_model_cfg, streams):
    """The block from DeepSeek's reference forward, written here from its equations in float64 on
    the plugin's own weights: per stream s a key W_k,s e + b_k,s and its RMSNorm, the stream's
    RMSNorm, gate σ(sign(q)√max(|q|, 1e-6)), value g (W_v e + b_v), output V + SiLU(depthwise
    causal conv of the per-stream-normalised V, kernel 4, dilation max_ngram), added to every stream."""
    comps = {"engram": {"enabled": True, "variant": "deepseek", "table_size": 64, "layers": [1], "max_ngram": 3}}
    if streams > 1:
        comps["hyper_connections"] = {"enabled": True, "streams": streams}
    model = EscardaLM(tiny_model_cfg(components=comps)).double().eval()
    eng = model.embedders["engram"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in eng.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    B, T, D = 2, 11, 32
    ids = torch.randint(0, 97, (B, T), generator=g)
    S = torch.randn(B, T, streams, D, generator=g, dtype=torch.float64)
    S_in = S if streams > 1 else S[..., 0, :]
    eng(ids, model.embed(ids))
    got = eng.before_block(ids, S_in, model.residual, 1)
    got = got if streams > 1 else got.unsqueeze(-2)

    e = eng._memory[0]
    eps = model.cfg.norm_eps
    gates = []
    for s in range(streams):
        key = rms(e @ eng.w_k[0][s].weight.T + eng.w_k[0][s].bias, eng.k_norm[0][s].weight, eps)
        query = rms(S[:, :, s], eng.h_norm[0][s].weight, eps)
        q = (key * query).sum(-1) / D**0.5
        gates.append(torch.sigmoid(q.abs().clamp_min(1e-6).sqrt() * q.sign()))
    value = torch.stack(gates, 2)[..., None] * (e @ eng.w_v[0].weight.T + eng.w_v[0].bias)[:, :, None]
    normed = torch.cat([rms(value[:, :, s], eng.v_norm[0][s].weight, eps) for s in range(streams)], -1)
    w, k, dil = eng.conv[0], 4, 3
    conv = torch.zeros_like(normed)
    for t in range(T):
        for i in range(k):  # tap i reads position t - (k - 1 - i)·dil
            src = t - (k - 1 - i) * dil
            if src >= 0:
                conv[:, t] += w[:, i] * normed[:, src]
    expected = S + value + torch.nn.functional.silu(conv).view(B, T, streams, D)
    assert (got - expected).abs().max() < 1e-10
