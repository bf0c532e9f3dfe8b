"""Parameter validation: ValueError naming the distribution and the parameter; off
with gm.set_validation(False) / gm.validation(False); skipped under compilation."""

import math

import numpy as np
import pytest

import genmlx as gm
import mlx.core as mx

BAD = [
    ("normal", lambda: gm.normal(0.0, -1.0), "sigma"),
    ("normal", lambda: gm.normal(0.0, 0.0), "sigma"),
    ("normal", lambda: gm.normal(mx.zeros(3), mx.ones(4)), "broadcast"),
    ("uniform", lambda: gm.uniform(2.0, 1.0), "high"),
    ("exponential", lambda: gm.exponential(-2.0), "rate"),
    ("laplace", lambda: gm.laplace(0.0, -1.0), "scale"),
    ("cauchy", lambda: gm.cauchy(0.0, 0.0), "scale"),
    ("half_normal", lambda: gm.half_normal(-1.0), "sigma"),
    ("half_cauchy", lambda: gm.half_cauchy(-1.0), "scale"),
    ("log_normal", lambda: gm.log_normal(0.0, -0.5), "sigma"),
    ("student_t", lambda: gm.student_t(-1.0, 0.0, 1.0), "df"),
    ("truncated_normal", lambda: gm.truncated_normal(0.0, 1.0, 2.0, 1.0), "high"),
    ("truncated_normal", lambda: gm.truncated_normal(0.0, -1.0, 0.0, 1.0), "sigma"),
    ("gamma", lambda: gm.gamma(-1.0, 1.0), "shape"),
    ("gamma", lambda: gm.gamma(1.0, rate=0.0), "rate"),
    ("gamma", lambda: gm.gamma(1.0, scale=-2.0), "scale"),
    ("inv_gamma", lambda: gm.inv_gamma(2.0, -1.0), "scale"),
    ("beta", lambda: gm.beta(0.0, 1.0), "alpha"),
    ("beta", lambda: gm.beta(1.0, -1.0), "beta"),
    ("dirichlet", lambda: gm.dirichlet(mx.array([1.0, -1.0])), "alpha"),
    ("dirichlet", lambda: gm.dirichlet(mx.array(1.0)), "alpha"),
    ("mv_normal", lambda: gm.mv_normal(mx.zeros(2), mx.array([[1.0, 2.0], [2.0, 1.0]])), "cov"),
    ("mv_normal", lambda: gm.mv_normal(mx.zeros(2), mx.array([[1.0, 0.5], [0.0, 1.0]])), "cov"),
    ("mv_normal", lambda: gm.mv_normal(mx.zeros(3), mx.eye(2)), "cov"),
    ("mv_normal", lambda: gm.mv_normal(mx.zeros(2), scale_tril=mx.array([[1.0, 1.0], [0.0, 1.0]])), "scale_tril"),
    ("bernoulli", lambda: gm.bernoulli(1.5), "'p'"),
    ("bernoulli", lambda: gm.flip(-0.1), "'p'"),
    ("binomial", lambda: gm.binomial(10, 1.2), "'p'"),
    ("binomial", lambda: gm.binomial(2.5, 0.5), "'n'"),
    ("poisson", lambda: gm.poisson(-1.0), "rate"),
    ("geometric", lambda: gm.geometric(0.0), "'p'"),
    ("geometric", lambda: gm.geometric(1.5), "'p'"),
    ("neg_binomial", lambda: gm.neg_binomial(-2.0, 0.5), "'r'"),
    ("neg_binomial", lambda: gm.neg_binomial(2.0, 1.5), "'p'"),
    ("categorical", lambda: gm.categorical(mx.array([0.5, 0.6])), "probs"),
    ("categorical", lambda: gm.categorical(mx.array([-0.5, 1.5])), "probs"),
    ("categorical", lambda: gm.categorical(mx.array(0.5)), "probs"),
    ("discrete_uniform", lambda: gm.discrete_uniform(3, 1), "high"),
    ("discrete_uniform", lambda: gm.discrete_uniform(0.5, 3), "low"),
    ("flat", lambda: gm.flat(1.0, 0.0), "high"),
    ("mixture", lambda: gm.mixture(mx.array([0.5, 0.6]), [gm.normal(0.0, 1.0), gm.normal(1.0, 1.0)]), "weights"),
    ("mixture", lambda: gm.mixture(mx.array([0.2, 0.3, 0.5]), [gm.normal(0.0, 1.0), gm.normal(1.0, 1.0)]), "weights"),
    ("mixture", lambda: gm.mixture(mx.array([0.5, 0.5]), [gm.normal(0.0, 1.0), gm.normal(mx.zeros(2), 1.0)]), "shape"),
]


@pytest.mark.parametrize("name,make,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_parameters_raise_named_error(name, make, param):
    with pytest.raises(ValueError) as ei:
        make()
    msg = str(ei.value)
    assert msg.startswith(name + ":"), msg
    assert param in msg, msg


def test_validation_switch():
    with gm.validation(False):
        gm.normal(0.0, -1.0)
        gm.bernoulli(1.5)
        gm.categorical(mx.array([0.5, 0.6]))
    gm.set_validation(False)
    try:
        gm.gamma(-1.0, 1.0)
    finally:
        gm.set_validation(True)
    with pytest.raises(ValueError):
        gm.gamma(-1.0, 1.0)


def test_validation_skipped_under_compile_and_vmap():
    @mx.compile
    def f(s):
        return gm.normal(0.0, s).log_prob(mx.array(0.5))

    assert math.isnan(f(mx.array(-1.0)).item())  # no error raised while tracing
    g = mx.vmap(lambda s: gm.normal(0.0, s).log_prob(mx.array(0.5)))
    out = np.array(g(mx.array([1.0, -1.0])))
    assert np.isfinite(out[0])


def test_messages_are_readable():
    with pytest.raises(ValueError, match=r"normal: parameter 'sigma' must be in greater_than\(0\), got -1.0"):
        gm.normal(0.0, -1.0)
    with pytest.raises(ValueError, match=r"normal: parameter shapes do not broadcast \('mu' \(3,\), 'sigma' \(4,\)\)"):
        gm.normal(mx.zeros(3), mx.ones(4))
