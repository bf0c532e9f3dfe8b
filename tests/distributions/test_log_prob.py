"""log_prob against scipy.stats at random valid parameters (float32 vs float64)."""

import numpy as np
import pytest
import scipy.stats as st

import genmlx as gm
import mlx.core as mx

from tests.distributions.cases import CASES, B, scipy_draws, scipy_logp

# |ours − scipy| ≤ RTOL·|scipy| + ATOL. RTOL = 1e-5 holds everywhere; the ATOL terms are
# float32 rounding of O(1)–O(10) intermediate terms (e.g. lgamma(α), α log β, x/σ)
# that cancel in the log-density, so a log-density near 0 cannot be met relatively.
RTOL = 1e-5
ATOL = {"default": 1e-6, "gamma": 2e-6, "inv_gamma": 5e-6, "beta": 1e-5, "student_t": 5e-6,
        "truncated_normal": 3e-6}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_log_prob_matches_scipy(case, seed):
    params = case.draw_params(seed)
    x = scipy_draws(case, params, 16, seed)  # [16, B], in the support
    ours = np.array(case.make(params).log_prob(mx.array(x)))
    ref = scipy_logp(case, params, x)
    atol = ATOL.get(case.name, ATOL["default"])
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in
                                  ("uniform", "exponential", "half_normal", "half_cauchy", "log_normal",
                                   "truncated_normal", "gamma", "inv_gamma", "beta", "binomial",
                                   "poisson", "geometric", "neg_binomial", "discrete_uniform")],
                         ids=lambda c: c.name)
def test_log_prob_outside_support_is_minus_inf(case):
    params = case.draw_params(3)
    d = case.make(params)
    lo = {"uniform": params.get("lo", 0) - 1.0, "truncated_normal": params.get("lo", 0) - 0.5,
          "discrete_uniform": params.get("lo", 0) - 1.0}.get(case.name, -1.0)
    x = mx.broadcast_to(mx.array(np.asarray(lo, np.float32)), (B,))
    assert np.all(np.array(d.log_prob(x)) == -np.inf)
    if case.discrete:  # non-integers
        assert np.all(np.array(d.log_prob(mx.full((B,), 0.5))) == -np.inf)


def test_mv_normal_log_prob():
    rng = np.random.default_rng(0)
    for k in (1, 3, 5):
        a = rng.normal(size=(k, k))
        cov = (a @ a.T + 0.5 * np.eye(k)).astype(np.float32)
        mean = rng.normal(size=k).astype(np.float32)
        x = rng.multivariate_normal(mean, cov, size=7).astype(np.float32)
        ref = st.multivariate_normal(mean, cov).logpdf(x)
        d = gm.mv_normal(mx.array(mean), mx.array(cov))
        np.testing.assert_allclose(np.array(d.log_prob(mx.array(x))), ref, rtol=1e-5, atol=2e-5)
        l = np.linalg.cholesky(cov.astype(np.float64)).astype(np.float32)
        d2 = gm.mv_normal(mx.array(mean), scale_tril=mx.array(l))
        np.testing.assert_allclose(np.array(d2.log_prob(mx.array(x))), ref, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(np.array(d.scale_tril), l, atol=1e-5)


def test_mv_normal_batched_cov():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 3, 3))
    cov = (a @ np.swapaxes(a, -1, -2) + np.eye(3)).astype(np.float32)
    mean = rng.normal(size=(4, 3)).astype(np.float32)
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    d = gm.mv_normal(mx.array(mean), mx.array(cov))
    assert d.batch_shape == (4,) and d.event_shape == (3,)
    ours = np.array(d.log_prob(mx.array(x)))
    ref = np.stack([[st.multivariate_normal(mean[b], cov[b]).logpdf(x[s, b]) for b in range(4)] for s in range(2)])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-5)


def test_dirichlet_log_prob():
    rng = np.random.default_rng(0)
    for k in (2, 3, 6):
        alpha = rng.uniform(0.3, 5, k).astype(np.float32)
        x = rng.dirichlet(alpha, size=5).astype(np.float64)
        x = (x / x.sum(-1, keepdims=True))
        ours = np.array(gm.dirichlet(mx.array(alpha)).log_prob(mx.array(x.astype(np.float32))))
        ref = np.array([st.dirichlet(alpha.astype(np.float64)).logpdf(xi) for xi in x])
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=3e-5)


def test_categorical_log_prob():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=3).astype(np.float32)
    x = np.array([[0, 4, 2], [1, 1, 3]], np.int32)
    ref = np.log(probs[np.arange(3)[None, :], x])
    d = gm.categorical(mx.array(probs))
    np.testing.assert_allclose(np.array(d.log_prob(mx.array(x))), ref, rtol=1e-6)
    dl = gm.categorical(logits=mx.array(np.log(probs) + 3.0))
    np.testing.assert_allclose(np.array(dl.log_prob(mx.array(x))), ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.array(d.log_prob(mx.array([5, -1, 2]))[:2]) == -np.inf)


def test_bernoulli_at_zero_and_one():
    d = gm.bernoulli(mx.array([0.0, 1.0, 0.0, 1.0]))
    lp = np.array(d.log_prob(mx.array([False, True, True, False])))
    assert lp[0] == 0.0 and lp[1] == 0.0 and lp[2] == -np.inf and lp[3] == -np.inf
    dl = gm.bernoulli(logits=mx.array([-2.0, 3.0]))
    np.testing.assert_allclose(np.array(dl.log_prob(mx.array([True, False]))),
                               st.bernoulli(1 / (1 + np.exp([2.0, -3.0]))).logpmf([1, 0]), rtol=1e-5)


def test_degenerate_probabilities_exact():
    assert gm.binomial(5, 0.0).log_prob(0).item() == 0.0
    assert gm.binomial(5, 1.0).log_prob(5).item() == 0.0
    assert gm.geometric(1.0).log_prob(0).item() == 0.0
    assert gm.poisson(0.0).log_prob(0).item() == 0.0


def test_truncated_normal_far_tail_log_prob():
    mu, s = 0.0, 1.0
    for lo, hi in [(8.0, np.inf), (-np.inf, -9.0), (6.0, 7.0), (-1.0, np.inf), (-12.0, -11.0)]:
        d = gm.truncated_normal(mu, s, lo, hi)
        x = np.float32(lo + 0.1) if np.isfinite(lo) else np.float32(hi - 0.1)
        ref = st.truncnorm(lo, hi).logpdf(np.float64(x))
        np.testing.assert_allclose(d.log_prob(mx.array(x)).item(), ref, rtol=1e-5)


def test_mixture_log_prob():
    w = np.array([0.2, 0.5, 0.3], np.float32)
    mus = np.array([-2.0, 0.5, 3.0], np.float32)
    ss = np.array([0.5, 1.0, 2.0], np.float32)
    x = np.linspace(-4, 6, 11).astype(np.float32)
    ref = np.log(sum(w[k] * st.norm(mus[k], ss[k]).pdf(x.astype(np.float64)) for k in range(3)))
    d1 = gm.mixture(mx.array(w), [gm.normal(float(m), float(s)) for m, s in zip(mus, ss)])
    d2 = gm.mixture(mx.array(w), gm.normal(mx.array(mus), mx.array(ss)))
    d3 = gm.mixture(logits=mx.array(np.log(w) + 1.0), components=gm.normal(mx.array(mus), mx.array(ss)))
    for d in (d1, d2, d3):
        np.testing.assert_allclose(np.array(d.log_prob(mx.array(x))), ref, rtol=1e-5, atol=1e-6)
    # mixed families
    d4 = gm.mixture(mx.array([0.4, 0.6]), [gm.normal(0.0, 1.0), gm.student_t(3.0, 1.0, 2.0)])
    ref4 = np.log(0.4 * st.norm(0, 1).pdf(x) + 0.6 * st.t(3, 1, 2).pdf(x))
    np.testing.assert_allclose(np.array(d4.log_prob(mx.array(x))), ref4, rtol=1e-5, atol=1e-6)


def test_delta_and_flat_log_prob():
    d = gm.delta(mx.array([1.0, 2.0]))
    assert np.array(d.log_prob(mx.array([1.0, 2.5]))).tolist() == [0.0, -np.inf]
    f = gm.flat()
    assert f.log_prob(mx.array(1e6)).item() == 0.0
    f2 = gm.flat(0.0, mx.array([1.0, 2.0]))
    assert np.array(f2.log_prob(mx.array([0.5, 3.0]))).tolist() == [0.0, -np.inf]
    assert gm.flat(shape=(3,)).shape == (3,)
