"""Distributions as generative functions: score = Σ log_prob, generate/assess weights,
unconstrained-space constraints (dependent supports included), inside models."""

import math

import numpy as np
import pytest
import scipy.stats as st

import genmlx as gm
import mlx.core as mx

ALL = [
    ("normal", gm.normal(0.5, 2.0, shape=(3,))), ("mv_normal", gm.mv_normal(mx.zeros(2), mx.eye(2))),
    ("uniform", gm.uniform(0.0, 2.0)), ("beta", gm.beta(2.0, 3.0)), ("gamma", gm.gamma(mx.array([1.5, 3.0]), 2.0)),
    ("inv_gamma", gm.inv_gamma(3.0, 1.0)), ("exponential", gm.exponential(2.0)), ("laplace", gm.laplace(0.0, 1.0)),
    ("cauchy", gm.cauchy(0.0, 1.0)), ("half_normal", gm.half_normal(1.0)), ("half_cauchy", gm.half_cauchy(1.0)),
    ("student_t", gm.student_t(3.0, 0.0, 1.0)), ("log_normal", gm.log_normal(0.0, 1.0)),
    ("truncated_normal", gm.truncated_normal(0.0, 1.0, -1.0, 1.0)), ("bernoulli", gm.bernoulli(0.3)),
    ("flip", gm.flip(0.6)), ("binomial", gm.binomial(10, 0.3)), ("poisson", gm.poisson(3.0, shape=(2,))),
    ("geometric", gm.geometric(0.3)), ("neg_binomial", gm.neg_binomial(3.0, 0.4)),
    ("categorical", gm.categorical(mx.array([0.2, 0.8]))), ("discrete_uniform", gm.discrete_uniform(1, 6)),
    ("dirichlet", gm.dirichlet(mx.array([1.0, 2.0, 3.0]))), ("delta", gm.delta(1.5)),
    ("mixture", gm.mixture(mx.array([0.4, 0.6]), [gm.normal(0.0, 1.0), gm.normal(3.0, 0.5)])),
    ("flat", gm.flat(0.0, 2.0)),
]


@pytest.mark.parametrize("name,d", ALL, ids=[a[0] for a in ALL])
def test_gfi_scores(name, d):
    key = mx.random.key(0)
    tr = d.simulate(key, ())
    assert tuple(tr.value.shape) == d.shape
    lp = mx.sum(d.log_prob(tr.value)).item()
    assert abs(tr.score.item() - lp) <= 1e-5 * max(1.0, abs(lp))
    tr2, w = d.generate(key, (), gm.ChoiceMap.leaf(tr.value))
    assert abs(w.item() - lp) <= 1e-5 * max(1.0, abs(lp))
    s, v = d.assess((), gm.ChoiceMap.leaf(tr.value))
    assert abs(s.item() - lp) <= 1e-5 * max(1.0, abs(lp))
    _, w0 = d.generate(key, (), gm.ChoiceMap.empty())
    assert w0.item() == 0.0


@pytest.mark.parametrize("name,d", [a for a in ALL if not a[1].discrete and a[0] not in ("delta",)],
                         ids=[a[0] for a in ALL if not a[1].discrete and a[0] not in ("delta",)])
def test_unconstrained_value_weight(name, d):
    sup = d.support
    u = mx.random.normal(shape=sup.unconstrained_shape(d.shape), key=mx.random.key(1))
    tr, w = d.generate(mx.random.key(0), (), gm.ChoiceMap.leaf(gm.UnconstrainedValue(u)))
    x = sup.from_unconstrained(u)
    ref = mx.sum(d.log_prob(x)) + mx.sum(sup.log_abs_det_jacobian(u))
    np.testing.assert_allclose(w.item(), ref.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(tr.value), np.array(x), rtol=1e-6)


def test_dependent_support_in_a_model():
    @gm.gen
    def model():
        a = gm.trace("a", gm.beta(2.0, 2.0))
        b = gm.trace("b", gm.uniform(0.0, 1.0 - a))
        return a + b

    ua, ub = 0.3, -1.2
    cm = gm.choicemap({"a": gm.UnconstrainedValue(mx.array(ua)), "b": gm.UnconstrainedValue(mx.array(ub))})
    tr, w = model.generate(mx.random.key(0), (), cm)
    sig = lambda t: 1 / (1 + math.exp(-t))
    a = sig(ua)
    b = (1 - a) * sig(ub)
    ref = (st.beta(2, 2).logpdf(a) + math.log(a * (1 - a))
           + st.uniform(0, 1 - a).logpdf(b) + math.log((1 - a) * sig(ub) * (1 - sig(ub))))
    assert abs(tr["a"].item() - a) < 1e-6 and abs(tr["b"].item() - b) < 1e-6
    np.testing.assert_allclose(w.item(), ref, rtol=1e-5)
    # the gradient of the weight w.r.t. u exists (what HMC/NUTS need)
    def wfun(u):
        c = gm.choicemap({"a": gm.UnconstrainedValue(u[0]), "b": gm.UnconstrainedValue(u[1])})
        return model.generate(mx.random.key(0), (), c)[1]
    g = mx.grad(wfun)(mx.array([ua, ub]))
    assert np.all(np.isfinite(np.array(g)))


def test_flat_prior_model():
    @gm.gen
    def model():
        x = gm.trace("x", gm.flat())
        s = gm.trace("s", gm.flat(0.0))
        return gm.trace("y", gm.normal(x, s))

    with pytest.raises(ValueError, match="flat"):
        model.simulate(mx.random.key(0), ())
    cm = gm.choicemap({"x": gm.UnconstrainedValue(mx.array(0.4)), "s": gm.UnconstrainedValue(mx.array(0.1)),
                       "y": 1.0})
    _, w = model.generate(mx.random.key(0), (), cm)
    ref = st.norm(0.4, math.exp(0.1)).logpdf(1.0) + 0.1  # flat: log 1; log-Jacobian of exp
    np.testing.assert_allclose(w.item(), ref, rtol=1e-5)


def test_vectorized_model_with_many_families():
    @gm.gen
    def model():
        g = gm.trace("g", gm.gamma(2.0, 1.0))
        k = gm.trace("k", gm.poisson(g))
        z = gm.trace("z", gm.categorical(logits=mx.stack([g, -g])))
        p = gm.trace("p", gm.dirichlet(mx.stack([g, mx.array(1.0), mx.array(2.0)])))
        m = gm.trace("m", gm.mixture(p, [gm.normal(-1.0, 1.0), gm.normal(0.0, 1.0), gm.normal(1.0, g)]))
        return gm.trace("y", gm.truncated_normal(m, 1.0, 0.0, float("inf")))

    n = 64
    tr = model.vsimulate(mx.random.key(3), (), n)
    assert tr.score.shape == (n,)
    assert tr["p"].shape == (n, 3) and tr["k"].shape == (n,) and tr["k"].dtype == mx.int32
    i = 5
    one = gm.choicemap({a: tr[a][i] for a in ("g", "k", "z", "p", "m", "y")})
    s, _ = model.assess((), one)
    np.testing.assert_allclose(s.item(), tr.score[i].item(), rtol=1e-5, atol=1e-5)
    # compiled vgenerate with different keys differs, same key agrees
    obs = gm.choicemap({"y": mx.array(0.7)})

    @mx.compile
    def run(key):
        t, w = model.vgenerate(key, (), obs, n)
        return w, t["g"]

    w1, g1 = run(mx.random.key(1))
    w1b, g1b = run(mx.random.key(1))
    w2, g2 = run(mx.random.key(2))
    assert np.array_equal(np.array(g1), np.array(g1b)) and not np.array_equal(np.array(g1), np.array(g2))
    assert np.all(np.isfinite(np.array(w1)))
