"""Cached compiled inference functions read the CURRENT weights of neural proposals."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import genmlx as gm


def test_importance_sampling_sees_updated_guide_weights():
    lin = nn.Linear(1, 1)
    net = gm.nn.NeuralNetGF(lin)

    @gm.gen
    def model():
        z = gm.normal(0.0, 1.0) @ "z"
        return gm.normal(z, 0.5) @ "x"

    @gm.gen
    def guide(x):
        m = net(x.reshape(1)) @ "net"
        return gm.normal(m[0], 1.0) @ "z"

    obs = gm.choicemap({"x": 1.0})
    args = (mx.array(1.0),)

    def run(compile):
        r = gm.inference.importance_sampling(mx.random.key(3), model, (), obs, 64,
                                             proposal=guide, proposal_args=args, compile=compile)
        return np.asarray(r.traces["z"])

    lin.update({"weight": mx.zeros((1, 1)), "bias": mx.zeros((1,))})
    a = run(True)
    assert np.allclose(a, run(False), atol=1e-5)
    lin.update({"weight": mx.zeros((1, 1)), "bias": mx.array([3.0])})
    b = run(True)
    assert np.allclose(b, run(False), atol=1e-5)
    assert np.allclose(b - a, 3.0, atol=1e-5)
