"""Sampling is exact in distribution: moments within 3.5 standard errors of scipy's,
chi-square goodness of fit of the count samplers, KS tests where tails matter.
Fixed seeds; a p-value threshold of 1e-4 (≈ 3.7σ) for the goodness-of-fit tests."""

import numpy as np
import pytest
import scipy.stats as st

import genmlx as gm
import mlx.core as mx

from tests.distributions.cases import CASES, B

N = 20_000
Z = 3.5
P_MIN = 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if c.moments], ids=lambda c: c.name)
def test_sample_mean_and_variance(case):
    params = case.draw_params(7)
    d = case.make(params)
    x = d.sample(mx.random.key(11), (N,))
    assert tuple(x.shape) == (N, B)
    x = np.array(x.astype(mx.float32), dtype=np.float64)
    ref = case.scipy({k: v.astype(np.float64) for k, v in params.items()})
    mu, var, kurt = ref.stats(moments="mvk")
    se_mean = np.sqrt(var / N)
    # Var(s²) = (μ₄ − σ⁴(n − 3)/(n − 1))/n with μ₄ = (kurt + 3)σ⁴
    se_var = np.sqrt(((kurt + 3.0) - (N - 3.0) / (N - 1.0)) * var**2 / N)
    assert np.all(np.abs(x.mean(0) - mu) <= Z * se_mean), (x.mean(0), mu, se_mean)
    assert np.all(np.abs(x.var(0) - var) <= Z * se_var), (x.var(0), var, se_var)


@pytest.mark.parametrize("name,make,ref", [
    ("cauchy", lambda: gm.cauchy(mx.array([0.5, -2.0]), mx.array([1.0, 0.3])), st.cauchy([0.5, -2.0], [1.0, 0.3])),
    ("half_cauchy", lambda: gm.half_cauchy(mx.array([1.0, 2.5])), st.halfcauchy(scale=[1.0, 2.5])),
])
def test_heavy_tailed_quantiles(name, make, ref):
    x = np.array(make().sample(mx.random.key(3), (N,)))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        frac = (x <= ref.ppf(q)).mean(0)
        assert np.all(np.abs(frac - q) <= Z * np.sqrt(q * (1 - q) / N)), (q, frac)


def _chisq_pvalue(samples, pmf_fn, support_max):
    """Chi-square test of integer samples against a pmf, merging bins with expected < 5."""
    n = samples.size
    ks = np.arange(0, support_max + 1)
    probs = pmf_fn(ks)
    obs = np.bincount(np.clip(samples, 0, support_max + 1), minlength=support_max + 2)[: support_max + 2]
    probs = np.append(probs, max(1.0 - probs.sum(), 0.0))
    # merge small bins left to right
    o_bins, e_bins, o_acc, e_acc = [], [], 0.0, 0.0
    for o, p in zip(obs, probs):
        o_acc += o
        e_acc += p * n
        if e_acc >= 5:
            o_bins.append(o_acc), e_bins.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 and e_bins:
        o_bins[-1] += o_acc
        e_bins[-1] += e_acc
    o_bins, e_bins = np.array(o_bins), np.array(e_bins)
    stat = ((o_bins - e_bins) ** 2 / e_bins).sum()
    return st.chi2.sf(stat, len(o_bins) - 1), len(o_bins)


COUNT_CASES = [
    ("poisson-0.1", lambda: gm.poisson(0.1), st.poisson(0.1)),
    ("poisson-3", lambda: gm.poisson(3.0), st.poisson(3.0)),
    ("poisson-9.99", lambda: gm.poisson(9.99), st.poisson(9.99)),
    ("poisson-10", lambda: gm.poisson(10.0), st.poisson(10.0)),
    ("poisson-37.5", lambda: gm.poisson(37.5), st.poisson(37.5)),
    ("poisson-2000", lambda: gm.poisson(2000.0), st.poisson(2000.0)),
    ("binomial-1-0.3", lambda: gm.binomial(1, 0.3), st.binom(1, 0.3)),
    ("binomial-15-0.5", lambda: gm.binomial(15, 0.5), st.binom(15, 0.5)),
    ("binomial-200-0.03", lambda: gm.binomial(200, 0.03), st.binom(200, 0.03)),
    ("binomial-40-0.25", lambda: gm.binomial(40, 0.25), st.binom(40, 0.25)),
    ("binomial-60-0.8", lambda: gm.binomial(60, 0.8), st.binom(60, 0.8)),
    ("binomial-5000-0.37", lambda: gm.binomial(5000, 0.37), st.binom(5000, 0.37)),
    ("binomial-10^6-1e-5", lambda: gm.binomial(1_000_000, 1e-5), st.binom(1_000_000, 1e-5)),
    ("geometric-0.2", lambda: gm.geometric(0.2), st.geom(0.2, loc=-1)),
    ("neg_binomial-2.5-0.3", lambda: gm.neg_binomial(2.5, 0.3), st.nbinom(2.5, 0.3)),
    ("neg_binomial-40-0.05", lambda: gm.neg_binomial(40.0, 0.05), st.nbinom(40.0, 0.05)),
    ("discrete_uniform", lambda: gm.discrete_uniform(-3, 4), st.randint(-3, 5)),
    ("categorical", lambda: gm.categorical(mx.array([0.1, 0.0, 0.35, 0.05, 0.5])),
     st.rv_discrete(values=(np.arange(5), [0.1, 0.0, 0.35, 0.05, 0.5]))),
]


@pytest.mark.parametrize("name,make,ref", COUNT_CASES, ids=[c[0] for c in COUNT_CASES])
def test_count_pmf_chisquare(name, make, ref):
    x = np.array(make().sample(mx.random.key(5), (N,))).astype(np.int64)
    shift = 3 if name == "discrete_uniform" else 0
    x = x + shift
    hi = int(ref.ppf(1 - 1e-7)) + shift + 1
    p, bins = _chisq_pvalue(x, lambda k: ref.pmf(k - shift), hi)
    assert bins >= 2
    assert p > P_MIN, f"{name}: chi-square p = {p:.2e} over {bins} bins"


def test_binomial_batched_mixed_regimes():
    """One batch holding inversion and rejection regimes and p > 1/2 (flipped)."""
    n = mx.array([3.0, 30.0, 500.0, 500.0, 0.0])
    p = mx.array([0.9, 0.5, 0.02, 0.97, 0.4])
    x = np.array(gm.binomial(n, p).sample(mx.random.key(9), (N,)), dtype=np.float64)
    nn, pp = np.array(n, np.float64), np.array(p, np.float64)
    mu, var = nn * pp, nn * pp * (1 - pp)
    assert np.all(x >= 0) and np.all(x <= nn)
    se = np.sqrt(np.maximum(var, 1e-12) / N)
    assert np.all(np.abs(x.mean(0) - mu) <= Z * se + 1e-12)


@pytest.mark.parametrize("name,make,ref", [
    ("gamma-0.05", lambda: gm.gamma(0.05, 2.0), st.gamma(0.05, scale=0.5)),
    ("gamma-0.7", lambda: gm.gamma(0.7, 1.0), st.gamma(0.7)),
    ("gamma-1", lambda: gm.gamma(1.0, 1.0), st.gamma(1.0)),
    ("gamma-900", lambda: gm.gamma(900.0, 3.0), st.gamma(900.0, scale=1 / 3)),
    ("beta-0.2-0.3", lambda: gm.beta(0.2, 0.3), st.beta(0.2, 0.3)),
    ("student_t-1.5", lambda: gm.student_t(1.5, 1.0, 2.0), st.t(1.5, 1.0, 2.0)),
    ("inv_gamma-1.5", lambda: gm.inv_gamma(1.5, 2.0), st.invgamma(1.5, scale=2.0)),
    ("truncnorm-right-tail", lambda: gm.truncated_normal(0.0, 1.0, 8.0, np.inf), st.truncnorm(8.0, np.inf)),
    ("truncnorm-left-tail", lambda: gm.truncated_normal(1.0, 2.0, -np.inf, -15.0), st.truncnorm(8.0, np.inf, 1.0, 2.0)),
    ("truncnorm-narrow", lambda: gm.truncated_normal(0.0, 1.0, 5.0, 5.5), st.truncnorm(5.0, 5.5)),
    ("truncnorm-center", lambda: gm.truncated_normal(0.5, 1.0, -1.0, 3.0), st.truncnorm(-1.5, 2.5, 0.5, 1.0)),
    ("laplace", lambda: gm.laplace(1.0, 0.5), st.laplace(1.0, 0.5)),
])
def test_ks(name, make, ref):
    x = np.array(make().sample(mx.random.key(21), (5000,)), dtype=np.float64)
    if name == "truncnorm-left-tail":  # x = 1 + 2z with z ≤ −8: reflect to the lower bound's scipy law
        x = 2.0 - x  # 1 − (x − 1): z → −z
    p = st.kstest(x, ref.cdf).pvalue
    assert p > P_MIN, f"{name}: KS p = {p:.2e}"


def test_dirichlet_moments():
    alpha = np.array([0.3, 1.0, 4.0], np.float64)
    x = np.array(gm.dirichlet(mx.array(alpha.astype(np.float32))).sample(mx.random.key(2), (N,)), np.float64)
    assert np.allclose(x.sum(-1), 1.0, atol=1e-5) and np.all(x >= 0)
    a0 = alpha.sum()
    mu = alpha / a0
    var = alpha * (a0 - alpha) / (a0**2 * (a0 + 1))
    assert np.all(np.abs(x.mean(0) - mu) <= Z * np.sqrt(var / N))
    np.testing.assert_allclose(x.var(0), var, rtol=0.05)


def test_mv_normal_moments():
    cov = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    mean = np.array([1.0, -1.0, 0.5])
    d = gm.mv_normal(mx.array(mean.astype(np.float32)), mx.array(cov.astype(np.float32)))
    x = np.array(d.sample(mx.random.key(4), (N,)), np.float64)
    assert x.shape == (N, 3)
    se = np.sqrt(np.diag(cov) / N)
    assert np.all(np.abs(x.mean(0) - mean) <= Z * se)
    emp = np.cov(x.T)
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / N)  # Var of sample covariance
    assert np.all(np.abs(emp - cov) <= Z * se_cov)


def test_mixture_sampling():
    w = np.array([0.25, 0.75])
    d = gm.mixture(mx.array(w.astype(np.float32)), gm.normal(mx.array([-3.0, 2.0]), mx.array([0.5, 1.0])))
    x = np.array(d.sample(mx.random.key(8), (N,)), np.float64)
    mu = (w * np.array([-3.0, 2.0])).sum()
    ex2 = (w * (np.array([0.25, 1.0]) + np.array([9.0, 4.0]))).sum()
    var = ex2 - mu**2
    assert abs(x.mean() - mu) <= Z * np.sqrt(var / N)
    assert abs((x < -0.5).mean() - 0.25) <= Z * np.sqrt(0.25 * 0.75 / N) + 1e-3
    d2 = gm.mixture(mx.array([0.5, 0.5]), [gm.normal(0.0, 1.0, shape=(2,)), gm.laplace(10.0, 1.0, shape=(2,))])
    y = np.array(d2.sample(mx.random.key(1), (N,)))
    assert y.shape == (N, 2)
    assert abs((y > 5).mean() - 0.5) <= Z * np.sqrt(0.25 / (2 * N)) * 1.5


def test_flat_sampling():
    with pytest.raises(ValueError, match="flat"):
        gm.flat().sample(mx.random.key(0))
    with pytest.raises(ValueError, match="flat"):
        gm.flat(0.0).sample(mx.random.key(0))
    x = np.array(gm.flat(-1.0, 3.0).sample(mx.random.key(0), (N,)))
    assert np.all((x > -1) & (x < 3)) and abs(x.mean() - 1.0) <= Z * np.sqrt(16 / 12 / N)


def test_sample_shapes():
    d = gm.normal(mx.zeros((2, 3)), 1.0)
    assert d.sample(mx.random.key(0)).shape == (2, 3)
    assert d.sample(mx.random.key(0), (4, 5)).shape == (4, 5, 2, 3)
    assert gm.gamma(mx.ones(3), 2.0).sample(mx.random.key(0), (7,)).shape == (7, 3)
    assert gm.dirichlet(mx.ones((2, 4))).sample(mx.random.key(0), (5,)).shape == (5, 2, 4)
    assert gm.categorical(mx.ones((2, 4)) / 4).sample(mx.random.key(0), (5,)).shape == (5, 2)
    assert gm.mv_normal(mx.zeros(3), mx.eye(3)).sample(mx.random.key(0), (6, 2)).shape == (6, 2, 3)
    assert gm.poisson(3.0, shape=(4,)).sample(mx.random.key(0), (2,)).shape == (2, 4)
    assert gm.normal(0.0, 1.0, shape=(3,)).shape == (3,)


def test_mixture_of_multivariate_components():
    means = np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]])
    w = np.array([0.2, 0.5, 0.3])
    d = gm.mixture(mx.array(w.astype(np.float32)), gm.mv_normal(mx.array(means.astype(np.float32)), mx.eye(2)))
    assert d.shape == (2,) and d.event_shape == (2,)
    x = np.array(d.sample(mx.random.key(0), (N,)), np.float64)
    mu = w @ means
    var = w @ (1.0 + means**2) - mu**2
    assert np.all(np.abs(x.mean(0) - mu) <= Z * np.sqrt(var / N))
    xv = np.array([[0.5, 1.0], [3.0, 0.0]])
    ref = np.log(sum(w[k] * st.multivariate_normal(means[k], np.eye(2)).pdf(xv) for k in range(3)))
    np.testing.assert_allclose(np.array(d.log_prob(mx.array(xv.astype(np.float32)))), ref, rtol=1e-5)
