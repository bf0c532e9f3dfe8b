"""Special functions against scipy (float32 implementations vs float64 references)."""

import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st

import genmlx  # noqa: F401
import mlx.core as mx

from genmlx.distributions import special as S


def _np(x):
    return np.array(x, dtype=np.float64)


def test_lgamma_digamma():
    x = np.concatenate([np.geomspace(1e-3, 1e4, 200), np.linspace(0.5, 3.0, 51)]).astype(np.float32)
    xa = mx.array(x)
    ref = sp.gammaln(x.astype(np.float64))
    # a few float32 ulps of log Γ(x + 8) (the shifted Stirling evaluation)
    np.testing.assert_allclose(_np(S.lgamma(xa)), ref, rtol=2e-6, atol=3e-6)
    np.testing.assert_allclose(_np(S.digamma(xa)), sp.digamma(x.astype(np.float64)), rtol=2e-6, atol=2e-6)
    # autodiff of lgamma is digamma
    g = mx.grad(lambda t: mx.sum(S.lgamma(t)))(xa)
    np.testing.assert_allclose(_np(g), sp.digamma(x.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_log_ndtr_and_inverse():
    x = np.linspace(-37, 8, 300).astype(np.float32)
    np.testing.assert_allclose(_np(S.log_ndtr(mx.array(x))), sp.log_ndtr(x.astype(np.float64)), rtol=2e-6, atol=1e-7)
    lp = -np.geomspace(1e-6, 600, 300).astype(np.float32)
    z = _np(S.ndtri_log(mx.array(lp)))
    ref = sp.ndtri(np.exp(lp.astype(np.float64)))
    np.testing.assert_allclose(z, ref, rtol=2e-6, atol=2e-6)
    lq = np.log(-np.expm1(lp.astype(np.float64))).astype(np.float32)  # log(1 − p): the lower tail
    ref_q = sp.ndtri(np.exp(lq.astype(np.float64)))
    np.testing.assert_allclose(_np(S.ndtri_log(mx.array(lq))), ref_q, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(_np(S.erfc(mx.array(x / 4))), sp.erfc(x.astype(np.float64) / 4), rtol=1e-6, atol=0)


def test_gammainc():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.05, 200, 500).astype(np.float32)
    x = st.gamma(a.astype(np.float64)).ppf(rng.uniform(0.001, 0.999, 500)).astype(np.float32)
    # the prefactor exp(a log x − x − log Γ(a+1)) carries ~|a log x|·2⁻²⁴ relative error
    np.testing.assert_allclose(_np(S.gammainc(mx.array(a), mx.array(x))), sp.gammainc(a, x), rtol=3e-4, atol=2e-6)


def _exact_dx_da(a, x):
    """float64: −∂ₐP(a, x)/p(x; a), ∂ₐP by central differences of scipy's gammainc."""
    h = 1e-5 * np.maximum(a, 1e-2)
    dp = (sp.gammainc(a + h, x) - sp.gammainc(a - h, x)) / (2 * h)
    return -dp / st.gamma(a).pdf(x)


@pytest.mark.parametrize("a,rtol", [(0.02, 2e-5), (0.3, 2e-5), (1.0, 2e-5), (4.0, 2e-5), (30.0, 3e-5),
                                    (120.0, 3e-5), (249.0, 3e-5), (251.0, 2e-4), (1000.0, 2e-5), (1e4, 2e-5)])
def test_gamma_implicit_derivative(a, rtol):
    u = np.linspace(0.001, 0.999, 101)
    x = st.gamma(a).ppf(u).astype(np.float32)
    x = np.maximum(x, 1e-30)
    ours = _np(S.gamma_dx_dalpha(mx.full(x.shape, a), mx.array(x)))
    ref = _exact_dx_da(np.float64(a), x.astype(np.float64))
    np.testing.assert_allclose(ours, ref, rtol=rtol)


def test_count_log_pmfs():
    k = np.arange(0, 400).astype(np.float32)
    for lam in (0.5, 10.0, 50.0, 200.0):
        np.testing.assert_allclose(_np(S.log_poisson_pmf(mx.array(k), mx.array(lam))),
                                   st.poisson(lam).logpmf(k), rtol=3e-6)
    for n, p in ((200, 0.3), (50, 0.9), (1000, 0.01), (7, 0.5)):
        kk = np.arange(0, n + 1).astype(np.float32)
        for integer in (True, False):
            ours = _np(S.log_binomial_pmf(mx.array(kk), mx.array(float(n)), mx.array(p), integer))
            np.testing.assert_allclose(ours, st.binom(n, p).logpmf(kk), rtol=3e-6)
