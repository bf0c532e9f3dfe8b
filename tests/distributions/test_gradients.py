"""Reparameterized gradients.

Pathwise samplers: the per-sample derivative dx/dθ from autodiff against central
finite differences of the sampler with the same key. Implicit (gamma family): the
per-sample derivative against a float64 reference, and d/dθ E[f(x)] (mean of the
per-sample gradients, within 3.5 standard errors) against the derivative of the closed
form expectation (scipy's digamma/polygamma).
"""

import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st

import genmlx as gm
import mlx.core as mx

Z = 3.5
N_FD = 64


def _per_sample_grad(make, params, argnum, key):
    """dx_i/dθ_i for each of N_FD draws: parameters are [N_FD] arrays (one draw each)."""
    ps = [mx.full((N_FD,), float(p)) for p in params]

    def total(theta):
        qs = list(ps)
        qs[argnum] = theta
        return mx.sum(make(*qs).sample(key))

    return np.array(mx.grad(total)(ps[argnum]), dtype=np.float64)


def _fd(make, params, argnum, key, h):
    def draw(delta):
        qs = [mx.full((N_FD,), float(p)) for p in params]
        qs[argnum] = qs[argnum] + delta
        return np.array(make(*qs).sample(key), dtype=np.float64)

    return (draw(h) - draw(-h)) / (2 * h)


PATHWISE = [
    ("normal", gm.normal, (0.7, 1.3)),
    ("uniform", gm.uniform, (-1.0, 2.5)),
    ("exponential", gm.exponential, (1.7,)),
    ("laplace", gm.laplace, (0.3, 0.8)),
    ("cauchy", gm.cauchy, (0.3, 0.8)),
    ("half_normal", gm.half_normal, (1.4,)),
    ("half_cauchy", gm.half_cauchy, (0.6,)),
    ("log_normal", gm.log_normal, (0.2, 0.5)),
    ("student_t[loc,scale]", lambda df, l, s: gm.student_t(mx.stop_gradient(df), l, s), (5.0, 0.5, 1.5)),
    ("truncated_normal", gm.truncated_normal, (0.5, 1.2, -0.3, 1.9)),
    ("truncated_normal-tail", gm.truncated_normal, (0.0, 1.0, 4.0, 6.0)),
    ("truncated_normal-halfline", lambda m, s, lo: gm.truncated_normal(m, s, lo, float("inf")), (0.3, 0.9, 1.1)),
    ("gamma[rate]", lambda a, r: gm.gamma(mx.stop_gradient(a), r), (2.5, 1.5)),
    ("inv_gamma[scale]", lambda a, b: gm.inv_gamma(mx.stop_gradient(a), b), (3.0, 2.0)),
    ("delta", gm.delta, (1.5,)),
]


@pytest.mark.parametrize("name,make,params", PATHWISE, ids=[p[0] for p in PATHWISE])
def test_pathwise_gradient_matches_finite_differences(name, make, params):
    key = mx.random.key(17)
    skip = {"student_t[loc,scale]": {0}, "gamma[rate]": {0}, "inv_gamma[scale]": {0}}.get(name, set())
    for i in range(len(params)):
        if i in skip:
            continue
        g = _per_sample_grad(make, params, i, key)
        fd = _fd(make, params, i, key, h=1e-2)
        scale = np.maximum(np.abs(fd), 1.0)
        # float32 central differences: O(h²) truncation + O(ε|x|/h) rounding ≈ 1e-3 relative
        if name.startswith("cauchy") or name.startswith("half_cauchy"):
            scale = np.maximum(np.abs(fd), 1.0) * 5  # tan near its poles: larger rounding
        assert np.all(np.abs(g - fd) <= 2e-3 * scale), (name, i, np.max(np.abs(g - fd) / scale))


def test_mv_normal_pathwise_gradient():
    key = mx.random.key(3)
    mean = mx.array([0.5, -1.0, 2.0])
    a = mx.array([[1.0, 0.0, 0.0], [0.3, 0.8, 0.0], [-0.2, 0.4, 1.1]])
    cov = a @ a.T
    eps = mx.random.normal(shape=(3,), key=key)
    w = mx.array([0.3, -1.2, 0.7])

    def f(mean, cov):
        return mx.sum(w * gm.mv_normal(mean, cov).sample(key))

    gm_, gc = mx.grad(f, argnums=(0, 1))(mean, cov)
    np.testing.assert_allclose(np.array(gm_), np.array(w), rtol=1e-6)
    # finite differences over symmetric perturbations of cov
    h = 1e-2
    for i, j in [(0, 0), (1, 0), (2, 1), (2, 2)]:
        e = np.zeros((3, 3), np.float32)
        e[i, j] = e[j, i] = 1.0
        fd = (f(mean, cov + h * mx.array(e)).item() - f(mean, cov - h * mx.array(e)).item()) / (2 * h)
        an = float(np.sum(np.array(gc) * e))
        assert abs(an - fd) <= 2e-3 * max(1.0, abs(fd)), (i, j, an, fd)
    del eps


def test_expectation_gradient_normal_and_truncated_normal():
    """d/dμ E[x²] = 2μ for N(μ, σ²); d/dμ E[x] for a truncated normal vs scipy + FD."""
    n = 20_000
    key = mx.random.key(2)
    mu = mx.full((n,), 0.7)
    g = np.array(mx.grad(lambda m: mx.sum(gm.normal(m, 1.3).sample(key) ** 2))(mu), np.float64)
    assert abs(g.mean() - 1.4) <= Z * g.std() / np.sqrt(n)
    lo, hi, s = -0.3, 1.9, 1.2

    def exact_mean(m):
        return st.truncnorm((lo - m) / s, (hi - m) / s, m, s).mean()

    ref = (exact_mean(0.5 + 1e-5) - exact_mean(0.5 - 1e-5)) / 2e-5
    mu = mx.full((n,), 0.5)
    g = np.array(mx.grad(lambda m: mx.sum(gm.truncated_normal(m, s, lo, hi).sample(key)))(mu), np.float64)
    assert abs(g.mean() - ref) <= Z * g.std() / np.sqrt(n), (g.mean(), ref)


# -- implicit reparameterization ---------------------------------------------------------------

IMPLICIT = [
    # name, sampler(θ array) , f, d/dθ E[f] exact
    ("gamma E[x]", lambda a: gm.gamma(a, 2.0), lambda x: x, lambda a: 1 / 2.0, 2.3),
    ("gamma E[log x]", lambda a: gm.gamma(a, 2.0), mx.log, lambda a: sp.polygamma(1, a), 2.3),
    ("gamma<1 E[log x]", lambda a: gm.gamma(a, 1.0), mx.log, lambda a: sp.polygamma(1, a), 0.4),
    ("gamma-large E[x]", lambda a: gm.gamma(a, 1.0), lambda x: x, lambda a: 1.0, 400.0),
    ("gamma-large E[log x]", lambda a: gm.gamma(a, 1.0), mx.log, lambda a: sp.polygamma(1, a), 400.0),
    ("beta[alpha] E[x]", lambda a: gm.beta(a, 3.0), lambda x: x, lambda a: 3.0 / (a + 3.0) ** 2, 1.5),
    ("beta[alpha] E[log x]", lambda a: gm.beta(a, 3.0), mx.log,
     lambda a: sp.polygamma(1, a) - sp.polygamma(1, a + 3.0), 1.5),
    ("beta[beta] E[x]", lambda b: gm.beta(0.6, b), lambda x: x, lambda b: -0.6 / (0.6 + b) ** 2, 2.0),
    ("inv_gamma E[x]", lambda a: gm.inv_gamma(a, 2.0), lambda x: x, lambda a: -2.0 / (a - 1) ** 2, 6.0),
    ("student_t[df] E[x²]", lambda v: gm.student_t(v, 0.0, 1.5), lambda x: x * x,
     lambda v: -2 * 1.5**2 / (v - 2) ** 2, 9.0),
]


@pytest.mark.parametrize("name,make,f,dexact,theta", IMPLICIT, ids=[c[0] for c in IMPLICIT])
def test_implicit_gradient_of_expectation(name, make, f, dexact, theta):
    n = 20_000
    key = mx.random.key(4)
    th = mx.full((n,), theta)
    g = np.array(mx.grad(lambda t: mx.sum(f(make(t).sample(key))))(th), np.float64)
    assert np.all(np.isfinite(g))
    se = g.std() / np.sqrt(n)
    assert abs(g.mean() - dexact(theta)) <= Z * se, (g.mean(), dexact(theta), se)


def test_dirichlet_implicit_gradient():
    n = 20_000
    alpha = np.array([0.7, 2.0, 3.5])
    key = mx.random.key(6)
    a = mx.broadcast_to(mx.array(alpha.astype(np.float32)), (n, 3))
    # d/dα₀ E[log x₀] = ψ'(α₀) − ψ'(Σα);  d/dα₁ E[x₀] = −α₀/(Σα)²
    g = np.array(mx.grad(lambda a: mx.sum(mx.log(gm.dirichlet(a).sample(key)[:, 0])))(a), np.float64)
    ref0 = sp.polygamma(1, alpha[0]) - sp.polygamma(1, alpha.sum())
    assert abs(g[:, 0].mean() - ref0) <= Z * g[:, 0].std() / np.sqrt(n)
    g = np.array(mx.grad(lambda a: mx.sum(gm.dirichlet(a).sample(key)[:, 0]))(a), np.float64)
    ref1 = -alpha[0] / alpha.sum() ** 2
    assert abs(g[:, 1].mean() - ref1) <= Z * g[:, 1].std() / np.sqrt(n)


@pytest.mark.parametrize("a", [0.05, 0.8, 3.0, 60.0, 700.0])
def test_gamma_per_sample_implicit_derivative(a):
    """dx/dα of each draw equals −∂ₐF(x; α)/p(x; α) computed in float64 by scipy."""
    key = mx.random.key(8)
    alpha = mx.full((200,), a)
    x = np.array(gm.gamma(alpha, 1.0).sample(key), np.float64)
    g = np.array(mx.grad(lambda t: mx.sum(gm.gamma(t, 1.0).sample(key)))(alpha), np.float64)
    ok = x > 1e-30
    h = 1e-5 * a
    dp = (sp.gammainc(a + h, x[ok]) - sp.gammainc(a - h, x[ok])) / (2 * h)
    ref = -dp / st.gamma(a).pdf(x[ok])
    np.testing.assert_allclose(g[ok], ref, rtol=3e-4, atol=1e-30)


def test_log_prob_parameter_gradients():
    """Autodiff of log-densities (through lgamma etc.) against closed forms."""
    x, a, b = 1.7, 2.3, 0.8
    ga, gb = mx.grad(lambda a, b: gm.gamma(a, b).log_prob(x), argnums=(0, 1))(mx.array(a), mx.array(b))
    assert abs(ga.item() - (np.log(b) + np.log(x) - sp.digamma(a))) < 1e-5
    assert abs(gb.item() - (a / b - x)) < 1e-5
    gnu = mx.grad(lambda v: gm.student_t(v, 0.0, 1.0).log_prob(0.9))(mx.array(4.0)).item()
    h = 1e-6
    ref = (st.t(4 + h).logpdf(0.9) - st.t(4 - h).logpdf(0.9)) / (2 * h)
    assert abs(gnu - ref) < 1e-5
    gl = mx.grad(lambda lo: gm.truncated_normal(0.0, 1.0, lo, 2.0).log_prob(0.5))(mx.array(-1.0)).item()
    ref = (st.truncnorm(-1 + h, 2).logpdf(0.5) - st.truncnorm(-1 - h, 2).logpdf(0.5)) / (2 * h)
    assert abs(gl - ref) < 1e-4
