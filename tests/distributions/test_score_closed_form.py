"""The GF score of families that sum their parameter-only terms in closed form
(``sum_broadcast``) equals Σ log_prob, with broadcasting parameters, out-of-support
values and under ``mx.vmap``; no-op affine terms are skipped only when static."""

import numpy as np
import scipy.stats as st
import pytest

import genmlx as gm
import mlx.core as mx
from genmlx.distributions.base import sum_broadcast

S3 = mx.array([0.5, 1.0, 2.0])
M21 = mx.array([[0.3], [-1.0]])
CASES = [
    ("normal", lambda: gm.normal(M21, S3)),
    ("normal_shape", lambda: gm.normal(0.2, 1.5, shape=(2, 3))),
    ("laplace", lambda: gm.laplace(M21, S3)),
    ("cauchy", lambda: gm.cauchy(M21, S3)),
    ("half_normal", lambda: gm.half_normal(S3, shape=(2, 3))),
    ("log_normal", lambda: gm.log_normal(M21, S3)),
    ("student_t", lambda: gm.student_t(mx.array([[3.0], [7.5]]), 0.1, S3)),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_score_equals_sum_log_prob(name, make):
    d = make()
    assert d.shape == (2, 3)
    x = mx.abs(mx.random.normal((2, 3), key=mx.random.key(4))) + 0.1
    ref = mx.sum(d.log_prob(x)).item()
    _, w = d.generate(mx.random.key(0), (), gm.ChoiceMap.leaf(x))
    np.testing.assert_allclose(w.item(), ref, rtol=2e-6, atol=1e-5)
    tr = d.simulate(mx.random.key(1), ())
    np.testing.assert_allclose(tr.score.item(), mx.sum(d.log_prob(tr.value)).item(), rtol=2e-6, atol=1e-5)


@pytest.mark.parametrize("name,make", [c for c in CASES if c[0] in ("half_normal", "log_normal")])
def test_out_of_support_score_is_minus_inf(name, make):
    x = mx.full((2, 3), 1.0).at[1, 2].add(-3.0)
    _, w = make().generate(mx.random.key(0), (), gm.ChoiceMap.leaf(x))
    assert w.item() == -np.inf


def test_score_under_vmap_with_batched_scale():
    sig = mx.array([0.5, 1.0, 3.0, 0.2])
    x = mx.array([0.1, -0.4, 2.0])

    def score(s):
        return gm.normal(0.3, s, shape=(3,))._score(x)

    got = np.array(mx.vmap(score)(sig))
    want = [mx.sum(gm.normal(0.3, s, shape=(3,)).log_prob(x)).item() for s in sig.tolist()]
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_sum_broadcast():
    c = mx.array([1.0, 2.0, 4.0])
    assert sum_broadcast(c, (5, 3)).item() == 35.0
    assert sum_broadcast(mx.array(2.5), (4, 2)).item() == 20.0
    assert sum_broadcast(mx.array(2.5), ()).item() == 2.5


def test_static_standard_normal_skips_noop_affine():
    eps = mx.random.normal((4,), key=mx.random.key(2))
    assert gm.normal(0.0, 1.0, shape=(4,))._from_noise(eps) is eps
    # array parameters are not static: same values through the general formula
    d = gm.normal(mx.array(0.0), mx.array(1.0), shape=(4,))
    assert d._from_noise(eps) is not eps
    np.testing.assert_array_equal(np.array(d._from_noise(eps)), np.array(eps))
    np.testing.assert_allclose(np.array(gm.normal(1.0, 2.0)._from_noise(eps)), 1.0 + 2.0 * np.array(eps))


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (0.0, 2.5), (1.5, 1.0), (mx.array(0.0), mx.array(1.0))])
def test_static_parameter_scores(mu, sigma):
    """Python-number 0 / 1 parameters skip no-op terms in the score: same value."""
    d = gm.normal(mu, sigma, shape=(2, 3))
    x = mx.random.normal((2, 3), key=mx.random.key(7))
    _, w = d.generate(mx.random.key(0), (), gm.ChoiceMap.leaf(x))
    ref = st.norm(float(np.array(mu)), float(np.array(sigma))).logpdf(np.array(x)).sum()
    np.testing.assert_allclose(w.item(), ref, rtol=2e-6, atol=1e-5)


def test_normal_score_from_noise_equals_value_score_and_its_path_gradient():
    """A draw made from noise is scored from the noise (−½Σε² + normaliser): the same value
    as scoring the draw, and the same total derivative along x = μ + σε."""
    import numpy as np

    import genmlx as gm
    import mlx.core as mx

    eps = mx.random.normal(shape=(3, 4), key=mx.random.key(7))
    mu0 = mx.random.normal(shape=(4,), key=mx.random.key(8))
    sig0 = mx.exp(0.3 * mx.random.normal(shape=(3, 1), key=mx.random.key(9)))

    def by_noise(mu, sig):
        return gm.normal(mu, sig).simulate_from_noise(eps).score

    def by_value(mu, sig):
        d = gm.normal(mu, sig)
        return d._score(d._from_noise(eps))

    np.testing.assert_allclose(float(by_noise(mu0, sig0)), float(by_value(mu0, sig0)), rtol=1e-5)
    gn = mx.grad(by_noise, argnums=(0, 1))(mu0, sig0)
    gv = mx.grad(by_value, argnums=(0, 1))(mu0, sig0)
    for a, b in zip(gn, gv):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # and not trivially: the σ-gradient is −(number of elements each σ covers)/σ
    np.testing.assert_allclose(np.asarray(gn[1]), -4.0 / np.asarray(sig0), rtol=1e-5)
