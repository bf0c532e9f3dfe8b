"""NeuralNetGF: the GFI of a deterministic GF, gradients through traced calls, and
parameter discovery with gm.nn.trainable."""

from __future__ import annotations

import genmlx as gm
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.gfi_laws import check_gfi_laws

enc = gm.nn.NeuralNetGF(gm.nn.mlp([3, 8, 2]))


def test_gfi_laws_and_zero_weights():
    x = mx.array([0.1, -0.2, 0.3])
    check_gfi_laws(enc, (x,), mx.random.key(0))
    tr = enc.simulate(mx.random.key(1), (x,))
    assert np.allclose(np.array(tr.retval), np.array(enc.module(x)))
    assert float(tr.score) == 0.0 and tr.choices.is_empty()
    tr2, w, _, discard = enc.update(mx.random.key(2), tr, gm.ChoiceMap.empty(), (2 * x,))
    assert float(w) == 0.0 and discard.is_empty()
    assert np.allclose(np.array(tr2.retval), np.array(enc.module(2 * x)))
    with pytest.raises(ValueError, match="no random choices"):
        enc.generate(mx.random.key(0), (x,), gm.choicemap({"a": 1.0}))


def test_gradients_flow_through_traced_calls():
    dec = gm.nn.NeuralNetGF(gm.nn.mlp([2, 4, 3], "relu"))

    @gm.gen
    def model():
        z = gm.normal(mx.zeros(2), 1.0) @ "z"
        mu = dec(z) @ "dec"
        return gm.normal(mu, 0.5) @ "x"

    z, x = mx.array([0.3, -0.7]), mx.array([1.0, 0.0, -1.0])
    ch = gm.choicemap({"z": z, "x": x})
    params = gm.nn.trainable(model)

    def via_gf():
        lp, _ = model.assess((), ch)
        return lp

    def direct():
        return mx.sum(gm.normal(mx.zeros(2), 1.0).log_prob(z)) + \
            mx.sum(gm.normal(dec.module(z), 0.5).log_prob(x))

    v1, g1 = nn.value_and_grad(params, via_gf)()
    v2, g2 = nn.value_and_grad(params, direct)()
    assert np.allclose(float(v1), float(v2), atol=1e-5)
    for (k1, a), (k2, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert k1 == k2 and np.allclose(np.array(a), np.array(b), atol=1e-5)
    assert max(float(mx.max(mx.abs(a))) for _, a in tree_flatten(g1)) > 0

    # batched: the network runs once for all particles
    tr = model.vsimulate(mx.random.key(0), (), 7)
    assert tr.score.shape == (7,) and tr["x"].shape == (7, 3)


def test_trainable_discovers_and_dedupes():
    shared = gm.nn.mlp([2, 2])
    a, b = gm.nn.NeuralNetGF(shared), gm.nn.NeuralNetGF(shared)
    outer = nn.Sequential(shared, nn.Linear(2, 2))   # contains `shared`
    extra = nn.Linear(2, 1)

    @gm.gen
    def sub(z):
        return a(z) @ "a"

    def make(o):
        @gm.gen
        def inner(z):
            h = sub(z) @ "s"
            h = b(h) @ "b"
            return gm.normal(o(h), 1.0) @ "y"
        return inner

    inner = make(outer)
    mods = gm.nn.find_modules(inner)
    assert outer in mods and shared not in mods        # nested module dropped
    assert len(mods) == 1
    c = gm.nn.trainable(inner, extra, gm.Map(sub))
    names = [k for k, _ in tree_flatten(c.trainable_parameters())]
    assert len(names) == len(set(names))
    n_arrays = len(tree_flatten(outer.parameters())) + len(tree_flatten(extra.parameters()))
    assert len(names) == n_arrays

    # traces are walked too
    tr = sub.simulate(mx.random.key(0), (mx.zeros(2),))
    assert gm.nn.find_modules(tr) == [shared]


def test_frozen_blocks_gradients_and_restores():
    lin = nn.Linear(2, 1)
    params = gm.nn.trainable(lin)

    def f():
        with gm.nn.frozen([lin]):
            y = mx.sum(lin(mx.ones(2)))
        return y + mx.sum(lin(mx.ones(2)))

    _, g = nn.value_and_grad(params, f)()
    assert np.allclose(np.array(g["modules_"][0]["bias"]), 1.0)  # only the unfrozen call


def test_helpers():
    net = gm.nn.mlp([4, 5, 3], activation="relu", out_activation="sigmoid")
    y = net(mx.ones((2, 4)))
    assert y.shape == (2, 3) and float(mx.min(y)) >= 0.0
    with pytest.raises(ValueError, match="unknown activation"):
        gm.nn.mlp([2, 2, 2], activation="swishy")
    with pytest.raises(ValueError, match="sizes"):
        gm.nn.mlp([3])
    mean, scale = gm.nn.GaussianHead(4, 2)(mx.random.normal((5, 4), key=mx.random.key(0)) * 50)
    assert mean.shape == scale.shape == (5, 2) and float(mx.min(scale)) > 0
    assert gm.nn.BernoulliHead(4, 6)(mx.ones(4)).shape == (6,)
    for pooling in ("mean", "sum"):
        se = gm.nn.SetEncoder(3, [8, 8], 2, pooling=pooling)
        xs = mx.random.normal((4, 5, 3), key=mx.random.key(1))
        perm = mx.array([3, 0, 4, 1, 2])
        assert se(xs).shape == (4, 2)
        assert np.allclose(np.array(se(xs)), np.array(se(xs[:, perm])), atol=1e-5)


def test_fast_linear_conversion_and_lift():
    lin = nn.Linear(3, 2)
    x = mx.array([0.5, -1.0, 2.0])
    before = np.array(lin(x))
    gf = gm.nn.NeuralNetGF(nn.Sequential(lin))
    assert type(lin) is gm.nn.Linear                       # converted in place
    assert np.allclose(np.array(gf.simulate(mx.random.key(0), (x,)).retval), before, atol=1e-6)
    keep = nn.Linear(3, 2)
    gm.nn.NeuralNetGF(keep, fast_linear=False)
    assert type(keep) is nn.Linear

    class NeedsBatch(nn.Module):
        def __call__(self, x):
            assert x.ndim == 2
            return x * 2, {"s": mx.sum(x, axis=-1)}

    y, d = gm.nn.NeuralNetGF(NeedsBatch(), lift=True).simulate(mx.random.key(0), (x,)).retval
    assert y.shape == (3,) and d["s"].shape == ()
