"""Every sampler works under mx.compile and mx.vmap with explicit keys: the same key
gives the same draws (compiled = eager), different keys give different draws, and a
vmapped sampler equals the per-key samplers."""

import numpy as np
import pytest

import genmlx as gm
import mlx.core as mx

# name, family taking ONE scalar parameter θ (vmapped), default θ
FAMILIES = [
    ("normal", lambda t: gm.normal(t, 2.0), 0.5),
    ("uniform", lambda t: gm.uniform(t, t + 1.0), 0.5),
    ("exponential", lambda t: gm.exponential(t), 1.5),
    ("laplace", lambda t: gm.laplace(t, 1.0), 0.5),
    ("cauchy", lambda t: gm.cauchy(t, 1.0), 0.5),
    ("half_normal", lambda t: gm.half_normal(t), 1.5),
    ("half_cauchy", lambda t: gm.half_cauchy(t), 1.5),
    ("student_t", lambda t: gm.student_t(t, 0.0, 1.0), 3.0),
    ("log_normal", lambda t: gm.log_normal(t, 0.5), 0.5),
    ("truncated_normal", lambda t: gm.truncated_normal(t, 1.0, -1.0, 2.0), 0.5),
    ("gamma", lambda t: gm.gamma(t, 1.0), 0.7),
    ("inv_gamma", lambda t: gm.inv_gamma(t, 1.0), 3.0),
    ("beta", lambda t: gm.beta(t, 2.0), 0.7),
    ("dirichlet", lambda t: gm.dirichlet(mx.stack([t, t + 1.0, mx.array(2.0)])), 0.7),
    ("mv_normal", lambda t: gm.mv_normal(mx.stack([t, -t]), mx.array([[1.0, 0.3], [0.3, 2.0]])), 0.5),
    ("bernoulli", lambda t: gm.bernoulli(t), 0.4),
    ("binomial-small", lambda t: gm.binomial(12.0, t), 0.4),
    ("binomial-large", lambda t: gm.binomial(300.0, t), 0.4),
    ("poisson-small", lambda t: gm.poisson(t), 3.0),
    ("poisson-large", lambda t: gm.poisson(t), 40.0),
    ("geometric", lambda t: gm.geometric(t), 0.3),
    ("neg_binomial", lambda t: gm.neg_binomial(t, 0.3), 2.5),
    ("categorical", lambda t: gm.categorical(logits=mx.stack([t, mx.array(0.0), -t])), 0.5),
    ("discrete_uniform", lambda t: gm.discrete_uniform(mx.floor(t), mx.floor(t) + 9.0), 1.0),
    ("mixture", lambda t: gm.mixture(mx.array([0.3, 0.7]), gm.normal(mx.stack([t, -t]), 1.0)), 0.5),
    ("mixture-list", lambda t: gm.mixture(mx.array([0.3, 0.7]), [gm.normal(t, 1.0), gm.gamma(2.0, 1.0)]), 0.5),
    ("flat-bounded", lambda t: gm.flat(t, t + 2.0), 0.5),
]
SHAPE = (16,)


def _eq(a, b):
    return np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("name,fam,theta", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_compile_same_key_same_draws(name, fam, theta):
    def draw(key, t):
        return fam(t).sample(key, SHAPE)

    cdraw = mx.compile(draw)
    k1, k2 = mx.random.key(1), mx.random.key(2)
    t = mx.array(theta)
    a, a2, b = cdraw(k1, t), cdraw(k1, t), cdraw(k2, t)
    assert _eq(a, a2)
    assert not _eq(a, b)
    np.testing.assert_allclose(np.array(a, np.float64), np.array(draw(k1, t), np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,fam,theta", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_vmap_over_keys_and_parameters(name, fam, theta):
    keys = mx.random.split(mx.random.key(3), 4)
    thetas = mx.array([theta, theta * 1.1, theta * 0.9, theta])
    vdraw = mx.vmap(lambda k, t: fam(t).sample(k, SHAPE))
    out = vdraw(keys, thetas)
    for i in range(4):
        np.testing.assert_allclose(np.array(out[i], np.float64), np.array(fam(thetas[i]).sample(keys[i], SHAPE), np.float64),
                                   rtol=1e-5, atol=1e-6)
    assert not _eq(out[0], out[3])  # same θ, different keys


# compile(vmap(·)) for a representative subset: every compiled graph JIT-compiles its
# fused CPU kernels once per machine, which dominates a cold CI run.
COMPILED_VMAP = ("normal", "gamma", "dirichlet", "categorical", "mixture-list")


@pytest.mark.parametrize("name,fam,theta", [f for f in FAMILIES if f[0] in COMPILED_VMAP],
                         ids=list(COMPILED_VMAP))
def test_compiled_vmap(name, fam, theta):
    keys = mx.random.split(mx.random.key(3), 4)
    thetas = mx.array([theta, theta * 1.1, theta * 0.9, theta])
    vdraw = mx.vmap(lambda k, t: fam(t).sample(k, SHAPE))
    np.testing.assert_allclose(np.array(mx.compile(vdraw)(keys, thetas), np.float64),
                               np.array(vdraw(keys, thetas), np.float64), rtol=1e-5, atol=1e-6)


def test_delta_under_transforms():
    f = mx.compile(lambda k, v: gm.delta(v).sample(k, (3,)))
    assert _eq(f(mx.random.key(0), mx.array(2.0)), mx.full((3,), 2.0))
    g = mx.vmap(lambda v: gm.delta(v).log_prob(mx.array(1.0)))
    assert np.array(g(mx.array([1.0, 2.0]))).tolist() == [0.0, -np.inf]


def test_implicit_gradients_under_vmap_and_compile():
    """The custom VJP of the gamma sampler survives vmap (it has a vmap rule) and compile."""
    keys = mx.random.split(mx.random.key(0), 3)
    a = mx.array([0.5, 2.0, 7.0])

    def one(k, a):
        return mx.sum(gm.gamma(a, 1.0).sample(k, (5,)))

    ref = np.array([mx.grad(one, argnums=1)(keys[i], a[i]).item() for i in range(3)])
    g_vmap = mx.grad(lambda a: mx.sum(mx.vmap(one)(keys, a)))(a)
    g_comp = mx.compile(mx.grad(lambda a: mx.sum(mx.vmap(one)(keys, a))))(a)
    g_vg = mx.vmap(mx.grad(one, argnums=1))(keys, a)
    assert np.all(np.abs(ref) > 0)
    for g in (g_vmap, g_comp, g_vg):
        np.testing.assert_allclose(np.array(g), ref, rtol=1e-5)
