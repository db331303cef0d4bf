"""hyper_connections: Sinkhorn is doubly stochastic; identity coefficients give the plain residual;
collapse is the stream mean at init; every variant decodes like its full forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.hyper_connections import HyperConnections, HyperConnectionsConfig, hc_update, sinkhorn
from escarda_lab.model import EscardaLM


@given(m=st.integers(1, 4), scale=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_sinkhorn_is_doubly_stochastic(m, scale, seed):
    """20 iterations reach 1e-3 for logits of std <= 1 (mHC's range: R starts near I and the
    dynamic terms are small); wider logits converge more slowly, which the stats expose."""
    logits = torch.randn(5, m, m, generator=torch.Generator().manual_seed(seed)) * scale
    R = sinkhorn(logits, iters=20, eps=1e-6)
    assert (R >= 0).all()
    assert (R.sum(-1) - 1).abs().max() < 1e-3 and (R.sum(-2) - 1).abs().max() < 1e-3


@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 6.0))
@settings(max_examples=30, deadline=None)
def test_two_stream_closed_form_is_the_sinkhorn_limit(seed, scale):
    """The limit is the unique doubly stochastic D1 exp(L) D2: rows and columns sum to 1 and the
    cross-ratio R00 R11 / (R01 R10) equals exp(L00 + L11 - L01 - L10)."""
    L = torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    R = sinkhorn(L, iters=20, eps=0.0)
    assert torch.allclose(R.sum(-1), torch.ones(4, 2, dtype=torch.float64))
    assert torch.allclose(R.sum(-2), torch.ones(4, 2, dtype=torch.float64))
    log_ratio = R[:, 0, 0].log() + R[:, 1, 1].log() - R[:, 0, 1].log() - R[:, 1, 0].log()
    assert torch.allclose(log_ratio, L[:, 0, 0] + L[:, 1, 1] - L[:, 0, 1] - L[:, 1, 0], atol=1e-6)


def test_two_stream_closed_form_matches_the_iterations():
    L = torch.randn(64, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    M = torch.exp(L)
    for _ in range(500):
        M = M / M.sum(-1, keepdim=True)
        M = M / M.sum(-2, keepdim=True)
    assert torch.allclose(sinkhorn(L, iters=20, eps=0.0), M, atol=1e-8)


def test_identity_coefficients_reproduce_the_plain_residual_exactly():
    X = torch.randn(2, 5, 3, 8)
    fn = lambda x: torch.tanh(x) * 3
    e0 = torch.tensor([1.0, 0.0, 0.0])
    out = hc_update(X, fn, e0, e0, torch.eye(3))
    assert torch.equal(out[:, :, 0], X[:, :, 0] + fn(X[:, :, 0]))
    assert torch.equal(out[:, :, 1:], X[:, :, 1:])


def model_cfg(tiny_model_cfg, variant):
    return tiny_model_cfg(components={"hyper_connections": {"enabled": True, "variant": variant, "streams": 3}})


@pytest.mark.parametrize("variant", ["static", "dynamic", "dynamic_flat", "mhc"])
def test_collapse_is_the_stream_mean_at_init(tiny_model_cfg, variant):
    hc = EscardaLM(model_cfg(tiny_model_cfg, variant)).residual
    X = torch.randn(2, 4, 3, 32)
    assert torch.allclose(hc.collapse(X), X.mean(-2), atol=1e-6)


@pytest.mark.parametrize("variant", ["static", "dynamic", "dynamic_flat", "mhc"])
def test_every_variant_decodes_like_the_full_forward(tiny_model_cfg, variant):
    torch.manual_seed(0)
    model = EscardaLM(model_cfg(tiny_model_cfg, variant)).eval()
    with torch.no_grad():  # make the dynamic terms matter
        for p in model.residual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 10))
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(10)], 1)
    assert torch.allclose(steps, model(ids).logits, atol=1e-5)


def test_mhc_coefficients_are_constrained(tiny_model_cfg):
    hc = EscardaLM(model_cfg(tiny_model_cfg, "mhc")).residual
    with torch.no_grad():
        hc.phi.normal_(std=0.05)  # logits of std ~0.5
    pre, post, R = hc.coefficients(torch.randn(2, 4, 3, 32), site=1)
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
    assert (R.sum(-1) - 1).abs().max() < 1e-3 and (R.sum(-2) - 1).abs().max() < 1e-3


def test_stats_report_sinkhorn_error_and_distance_from_identity(tiny_model_cfg):
    model = EscardaLM(model_cfg(tiny_model_cfg, "mhc")).train()
    model(torch.randint(0, 97, (2, 8)))
    s = model.stats()
    assert s["hyper_connections/sinkhorn_row_err"] < 1e-3 and s["hyper_connections/sinkhorn_col_err"] < 1e-3
    assert 0 < s["hyper_connections/res_minus_identity"] < 0.3  # R leans to I at init
    assert s["hyper_connections/post_mean"] == pytest.approx(1.0)


def test_static_init_reads_one_stream_per_sublayer():
    from types import SimpleNamespace

    hc = HyperConnections(SimpleNamespace(d_model=4), HyperConnectionsConfig(variant="static", streams=2), n_sites=4)
    hc.init_weights()  # the model runs it after building (under the parameter-name seed)
    assert hc.pre_b.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("m", [2, 3])
def test_stream_update_equals_the_general_formula(per_token, m):
    from components.hyper_connections import hc_update

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 5, m, 8, generator=g)
    lead = (2, 5) if per_token else ()
    pre, post, R = (
        torch.rand(*lead, m, generator=g),
        torch.rand(*lead, m, generator=g),
        torch.rand(*lead, m, m, generator=g),
    )
    W = torch.randn(8, 8, generator=g)
    fn = lambda x: torch.tanh(x @ W)  # noqa: E731
    x_in = (pre.unsqueeze(-1) * X).sum(-2)
    expected = torch.einsum("...jk,...jd->...kd", R, X) + post.unsqueeze(-1) * fn(x_in).unsqueeze(-2)
    assert torch.allclose(hc_update(X, fn, pre, post, R), expected, atol=1e-6)


def test_stream_update_keeps_the_streams_precision_under_autocast():
    """The streams are the residual: bf16 autocast must not round the mixing."""
    from components.hyper_connections import hc_update

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 5, 2, 8, generator=g) * 100 + 1
    pre, post = torch.rand(2, 5, 2, generator=g), torch.rand(2, 5, 2, generator=g)
    R = torch.rand(2, 5, 2, 2, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hc_update(X, lambda x: torch.zeros_like(x), pre, post, R)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.einsum("...jk,...jd->...kd", R, X), rtol=1e-6, atol=1e-4)


def test_dynamic_is_the_papers_form_written_from_its_formulas(tiny_model_cfg):
    """Zhu et al. 2024 eq. 10-13, per stream j: H̄_j = LayerNorm(X_j) (gain g);
    pre_j = A_m[j] + s_α tanh(H̄_j w_m), R[j, :] = A_r[j, :] + s_α tanh(H̄_j W_r),
    post_j = B[j] + s_β tanh(H̄_j w_β); X'_k = Σ_j R[j, k] X_j + post_k F(Σ_j pre_j X_j)."""
    hc = EscardaLM(model_cfg(tiny_model_cfg, "dynamic")).residual.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    X = torch.randn(2, 5, 3, 32, generator=gen, dtype=torch.float64)
    W = torch.randn(32, 32, generator=gen, dtype=torch.float64)
    fn = lambda x: torch.tanh(x @ W)
    site = 2
    out = hc.sublayer(X, fn, site)

    ref = torch.empty_like(X)
    g, wa, wb = hc.norm_w[site], hc.w_alpha[site], hc.w_beta[site]
    sa, sb = hc.s_alpha[site], hc.s_beta[site]
    for b in range(2):
        for t in range(5):
            H = X[b, t]  # [m, D]
            mu, var = H.mean(-1, keepdim=True), H.var(-1, unbiased=False, keepdim=True)
            Hn = (H - mu) / torch.sqrt(var + 1e-5) * g
            pre = hc.pre_b[site] + sa * torch.tanh(Hn @ wa[:, 0])
            R = hc.res_b[site] + sa * torch.tanh(Hn @ wa[:, 1:])
            post = hc.post_b[site] + sb * torch.tanh(Hn @ wb)
            y = fn(pre @ H)
            ref[b, t] = R.T @ H + post[:, None] * y[None, :]
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)


def test_dynamic_starts_as_static_with_small_learnable_scales(tiny_model_cfg):
    hc = EscardaLM(model_cfg(tiny_model_cfg, "dynamic")).residual
    assert torch.equal(hc.w_alpha, torch.zeros_like(hc.w_alpha)) and torch.equal(hc.w_beta, torch.zeros_like(hc.w_beta))
    assert torch.allclose(hc.s_alpha, torch.full_like(hc.s_alpha, 0.01)) and hc.s_alpha.requires_grad
    X = torch.randn(2, 4, 3, 32)
    static = EscardaLM(model_cfg(tiny_model_cfg, "static")).residual
    for a, b in zip(hc.coefficients(X, 1), static.coefficients(X, 1)):
        assert torch.allclose(a, b.expand_as(a))


def test_collapse_sum_adds_the_streams(tiny_model_cfg):
    cfg = tiny_model_cfg(components={"hyper_connections": {"enabled": True, "streams": 3, "collapse": "sum"}})
    hc = EscardaLM(cfg).residual
    X = torch.randn(2, 4, 3, 32)
    assert torch.allclose(hc.collapse(X), X.sum(-2))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("m", [2, 3])
def test_stream_update_gradients_pass_gradcheck(per_token, expanded, m):
    """The hand-written backward of the update (coefficients per token or per sublayer; the streams a
    broadcast view, as after expand, or not)."""
    from components.hyper_connections import ReadStreams, WriteStreams

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 1 if expanded else m, 5, generator=g, dtype=torch.float64)
    lead = (2, 3) if per_token else ()
    coef = [torch.rand(*lead, *s, generator=g, dtype=torch.float64, requires_grad=True) for s in [(m,), (m,), (m, m)]]
    W = torch.randn(5, 5, generator=g, dtype=torch.float64)

    def update(x, pre, post, R):
        X = x.expand(2, 3, m, 5)
        return WriteStreams.apply(X, torch.tanh(ReadStreams.apply(X, pre) @ W), post, R)

    assert torch.autograd.gradcheck(update, (x.requires_grad_(), *coef))


def test_normed_projection_is_rmsnorm_then_matmul_with_its_gradients():
    from components.hyper_connections import NormedProjection

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.rms_norm(x, (12,), eps=1e-6) @ phi
    assert torch.allclose(NormedProjection.apply(x, phi, 1e-6), ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, phi: NormedProjection.apply(x, phi, 1e-6), (x, phi))


@pytest.mark.parametrize("variant", ["dynamic_flat", "mhc"])
def test_coefficients_of_expanded_streams_equal_those_of_a_copy(tiny_model_cfg, variant):
    hc = EscardaLM(model_cfg(tiny_model_cfg, variant)).residual.double()
    with torch.no_grad():
        hc.phi.normal_(std=0.05)
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)

    def coefficients_and_grads(X):
        out = torch.cat([c.flatten(2) for c in hc.coefficients(X, site=1)], -1)
        return out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (x, hc.phi))

    for a, b in zip(coefficients_and_grads(hc.expand(x)), coefficients_and_grads(hc.expand(x).contiguous())):
        assert torch.allclose(a, b, atol=1e-12)


def test_adding_to_expanded_streams_keeps_them_one_tensor(tiny_model_cfg):
    hc = EscardaLM(model_cfg(tiny_model_cfg, "mhc")).residual
    x, delta = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    out = hc.add(hc.expand(x), delta)
    assert out.stride(-2) == 0
    assert torch.equal(out, hc.expand(x).contiguous() + delta.unsqueeze(-2))
