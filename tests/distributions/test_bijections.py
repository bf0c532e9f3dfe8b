"""Support bijections: round trips and log|det J| against autodiff."""

import numpy as np
import pytest

import genmlx as gm
import mlx.core as mx

from genmlx.distributions import constraints as C

SCALAR_SUPPORTS = [
    ("real", C.real),
    ("positive", C.positive),
    ("greater_than", C.greater_than(-2.5)),
    ("less_than", C.less_than(1.5)),
    ("interval", C.interval(-1.0, 3.0)),
    ("unit_interval", C.unit_interval),
    ("interval-array-bounds", C.interval(mx.array([0.0, -1.0, 2.0, 0.5, 0.1, -3.0, 0.0]),
                                         mx.array([1.0, 5.0, 2.5, 0.6, 10.0, -2.0, 1e3]))),
]


@pytest.mark.parametrize("name,sup", SCALAR_SUPPORTS, ids=[s[0] for s in SCALAR_SUPPORTS])
def test_elementwise_bijection(name, sup):
    u = mx.array(np.linspace(-4, 4, 7).astype(np.float32))
    x = sup.from_unconstrained(u)
    assert bool(mx.all(sup.check(x)).item())
    np.testing.assert_allclose(np.array(sup.to_unconstrained(x)), np.array(u), atol=2e-4, rtol=1e-4)
    # diagonal Jacobian: d x_i / d u_i by autodiff
    dxdu = mx.grad(lambda v: mx.sum(sup.from_unconstrained(v)))(u)
    np.testing.assert_allclose(np.array(sup.log_abs_det_jacobian(u)), np.log(np.abs(np.array(dxdu))),
                               rtol=1e-5, atol=1e-5)


def _jacobian(f, u):
    """Dense Jacobian of f: R^m → R^m by reverse-mode rows."""
    m = u.shape[-1]
    rows = []
    for i in range(m):
        e = mx.zeros((m,)).at[i].add(1.0)
        _, (g,) = mx.vjp(f, [u], [e])
        rows.append(np.array(g))
    return np.stack(rows)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_simplex_bijection(k):
    rng = np.random.default_rng(k)
    for _ in range(3):
        u = mx.array(rng.normal(scale=2.0, size=k - 1).astype(np.float32))
        x = C.simplex.from_unconstrained(u)
        assert x.shape == (k,)
        assert bool(C.simplex.check(x).item())
        np.testing.assert_allclose(np.array(C.simplex.to_unconstrained(x)), np.array(u), atol=2e-4)
        jac = _jacobian(lambda v: C.simplex.from_unconstrained(v)[: k - 1], u)
        _, logdet = np.linalg.slogdet(jac.astype(np.float64))
        np.testing.assert_allclose(C.simplex.log_abs_det_jacobian(u).item(), logdet, rtol=1e-4, atol=1e-4)
    assert C.simplex.unconstrained_shape((4, k)) == (4, k - 1)


def test_simplex_extreme_inputs_stay_finite():
    u = mx.array([30.0, -30.0, 60.0])
    x = C.simplex.from_unconstrained(u)
    assert np.all(np.isfinite(np.array(x))) and abs(mx.sum(x).item() - 1) < 1e-5
    assert np.isfinite(C.simplex.log_abs_det_jacobian(u).item())


DISTS = [
    ("normal", gm.normal(0.0, 1.0)), ("gamma", gm.gamma(2.0, 1.0)), ("beta", gm.beta(2.0, 2.0)),
    ("uniform", gm.uniform(-1.0, 4.0)), ("truncated_normal-interval", gm.truncated_normal(0.0, 1.0, -1.0, 2.0)),
    ("truncated_normal-lower", gm.truncated_normal(0.0, 1.0, 1.0, float("inf"))),
    ("truncated_normal-upper", gm.truncated_normal(0.0, 1.0, float("-inf"), 0.5)),
    ("flat", gm.flat()), ("flat-lower", gm.flat(2.0)), ("flat-upper", gm.flat(high=-1.0)),
    ("flat-interval", gm.flat(0.0, 1.0)), ("half_cauchy", gm.half_cauchy(1.0)),
    ("inv_gamma", gm.inv_gamma(3.0, 1.0)), ("log_normal", gm.log_normal(0.0, 1.0)),
    ("dirichlet", gm.dirichlet(mx.array([1.0, 2.0, 3.0]))), ("mv_normal", gm.mv_normal(mx.zeros(2), mx.eye(2))),
    ("mixture", gm.mixture(mx.array([0.5, 0.5]), [gm.normal(0.0, 1.0), gm.normal(2.0, 1.0)])),
]


@pytest.mark.parametrize("name,d", DISTS, ids=[x[0] for x in DISTS])
def test_distribution_support_maps_into_support(name, d):
    sup = d.support
    ushape = sup.unconstrained_shape(d.shape)
    u = mx.random.normal(shape=(5,) + tuple(ushape), key=mx.random.key(0))
    x = sup.from_unconstrained(u)
    assert tuple(x.shape) == (5,) + d.shape
    assert bool(mx.all(sup.check(x)).item())
    assert np.all(np.isfinite(np.array(d.log_prob(x))))


def test_flat_support_kinds():
    assert repr(gm.flat().support) == "real"
    assert repr(gm.flat(0.0).support) == "greater_than(0)"
    assert repr(gm.flat(high=2.0).support) == "less_than(2)"
    assert repr(gm.flat(0.0, 2.0).support) == "interval(0, 2)"


def test_discrete_supports_have_no_bijection():
    with pytest.raises(TypeError, match="discrete"):
        gm.poisson(2.0).support.from_unconstrained(mx.array(0.0))
