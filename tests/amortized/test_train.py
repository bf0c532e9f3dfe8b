"""The compiled training step (explicit keys, state declared) and mixed
continuous/discrete latents."""

from __future__ import annotations

import math

import genmlx as gm
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from tests.amortized import lingauss as LG
from tests.amortized.test_gradients import assert_unbiased, estimate, exact_grads


def test_compiled_step_uses_the_explicit_key():
    guide, net = LG.make_guide()
    obj = gm.amortized.IWAE(LG.model, guide, K=4)
    data = LG.model.vsimulate(mx.random.key(0), (), 8)["x"]
    init = dict(tree_flatten(obj.trainable().parameters()))

    def run(compile, key):
        obj.trainable().update(tree_unflatten(list(init.items())))
        step = gm.amortized.make_train_step(obj, optim.SGD(learning_rate=0.0), compile=compile)
        return step(key, data)

    a1 = run(True, mx.random.key(1))
    a2 = run(True, mx.random.key(1))
    b = run(True, mx.random.key(2))
    c = run(False, mx.random.key(1))
    assert float(a1["loss"]) == float(a2["loss"])
    assert float(a1["loss"]) != float(b["loss"])
    assert np.isclose(float(a1["loss"]), float(c["loss"]), atol=1e-4)
    assert set(a1) >= {"loss", "grad_norm", "bound", "ess"}

    # two calls of ONE compiled step with different keys differ, and parameters move
    step = gm.amortized.make_train_step(obj, optim.Adam(learning_rate=1e-2))
    m1, m2 = step(mx.random.key(3), data), step(mx.random.key(4), data)
    assert float(m1["loss"]) != float(m2["loss"])
    assert not np.allclose(np.array(net.log_s), np.array(init["modules_.0.log_s"]))


def test_nvil_running_statistics_update_inside_compiled_step():
    guide, _ = LG.make_guide()
    obj = gm.amortized.NVIL(LG.model, guide, baseline=nn.Linear(3, 1))
    step = gm.amortized.make_train_step(obj, optim.Adam(learning_rate=1e-3))
    data = LG.model.vsimulate(mx.random.key(0), (), 16)["x"]
    for i in range(3):
        step(mx.random.key(i), data)
    assert float(obj.stats.mean) < -1.0          # tracks the (negative) learning signal
    assert "stats" not in str([k for k, _ in tree_flatten(obj.trainable().trainable_parameters())])


def test_no_parameters_is_a_clear_error():
    obj = gm.amortized.ELBO(LG.model, LG.prior_guide)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gm.amortized.make_train_step(obj, optim.Adam(learning_rate=1e-3))


def test_dreg_rejects_discrete_latents():
    from tests.amortized.test_gradients import make

    model, guide, _, _ = make()
    obj = gm.amortized.DReG(model, guide, K=2)
    with pytest.raises(ValueError, match="reparameterized"):
        obj.loss(mx.random.key(0), mx.ones((2,)))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = mx.array(0.2)    # model: b ~ Bern(σ(θ)), z ~ N(μ_b, 1), x ~ N(z, 1)
        self.mu = mx.array([-1.0, 1.5])
        self.a = mx.array(-0.3)       # guide: b ~ Bern(σ(a)), z ~ N(c_b, s)
        self.c = mx.array([0.4, -0.2])
        self.log_s = mx.array(-0.2)


def test_mixed_continuous_discrete_elbo_gradient_unbiased():
    P = Mixed()

    @gm.gen
    def model():
        b = gm.bernoulli(logits=P.theta) @ "b"
        z = gm.normal(mx.where(b, P.mu[1], P.mu[0]), 1.0) @ "z"
        return gm.normal(z, 1.0) @ "x"

    @gm.gen
    def guide(x):
        b = gm.bernoulli(logits=P.a) @ "b"
        return gm.normal(mx.where(b, P.c[1], P.c[0]), mx.exp(P.log_s)) @ "z"

    x = 0.7
    obj = gm.amortized.ELBO(model, guide, num_particles=2)

    def neg_elbo():  # exact: Gaussian expectations in closed form, sum over b
        s2 = mx.exp(2 * P.log_s)
        tot = mx.array(0.0)
        for bv in (0, 1):
            lqb = bv * P.a - nn.softplus(P.a)
            lpb = bv * P.theta - nn.softplus(P.theta)
            c, mu = P.c[bv], P.mu[bv]
            e_lpz = -0.5 * ((c - mu) ** 2 + s2) - 0.5 * math.log(2 * math.pi)
            e_lpx = -0.5 * ((x - c) ** 2 + s2) - 0.5 * math.log(2 * math.pi)
            ent = 0.5 * math.log(2 * math.pi * math.e) + P.log_s
            tot = tot + mx.exp(lqb) * (lpb + e_lpz + e_lpx - lqb + ent)
        return -tot

    exact = exact_grads(obj.trainable(), neg_elbo)
    mean, se = estimate(obj, mx.random.key(11), x=x)
    assert_unbiased(mean, se, exact)


@pytest.mark.parametrize("chunk", [1 << 24, 7, 1])
def test_global_norm_matches_per_leaf_sum_of_squares(monkeypatch, chunk):
    """One concatenated reduction per group of leaves (any group size, a leaf bigger than
    the group alone, float16 leaves accumulated in float32) is the global L2 norm."""
    import genmlx.amortized.train as T

    monkeypatch.setattr(T, "_NORM_CHUNK", chunk)
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=(5,)), rng.normal(size=(2, 2, 2))],
            "c": rng.normal(size=())}
    expect = math.sqrt(sum(float(np.sum(np.square(v))) for v in (tree["a"], *tree["b"], tree["c"])))
    arrays = {"a": mx.array(tree["a"], dtype=mx.float32),
              "b": [mx.array(tree["b"][0], dtype=mx.float16), mx.array(tree["b"][1], dtype=mx.float32)],
              "c": mx.array(tree["c"], dtype=mx.float32)}
    got = float(gm.amortized.global_norm(arrays))
    assert got == pytest.approx(expect, rel=2e-3)  # float16 leaf: its own rounding only
    assert float(gm.amortized.global_norm({})) == 0.0
