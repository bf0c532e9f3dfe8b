"""gm.nn.Linear / gm.nn.layers.affine: x Wᵀ + b as one addmm, equal to the plain formula
in value and gradient for every rank, under (nested) vmap, batched weights and compile."""

from __future__ import annotations

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from genmlx.nn.layers import affine

W = mx.random.normal((5, 3), key=mx.random.key(0))
B = mx.random.normal((5,), key=mx.random.key(1))


def plain(x, w, b):
    return x @ w.T + b


def close(a, b, tol=1e-5):
    return np.allclose(np.array(a), np.array(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 4, 3)])
def test_value_every_rank(shape):
    x = mx.random.normal(shape, key=mx.random.key(2))
    assert affine(x, W, B).shape == shape[:-1] + (5,)
    assert close(affine(x, W, B), plain(x, W, B))


@pytest.mark.parametrize("in_axes", [0, 1])
def test_nested_vmap_value_and_gradients(in_axes):
    X = mx.random.normal((6, 4, 3), key=mx.random.key(3))

    def loss(f):
        def L(w, b, X):
            inner = mx.vmap(lambda x: f(x, w, b))
            return mx.sum(mx.tanh(mx.vmap(inner, in_axes=in_axes)(X)))
        return L

    v1, g1 = mx.value_and_grad(loss(affine), argnums=(0, 1, 2))(W, B, X)
    v2, g2 = mx.value_and_grad(loss(plain), argnums=(0, 1, 2))(W, B, X)
    assert close(v1, v2)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape and close(a, b)
    # the same under mx.compile
    v3, g3 = mx.compile(mx.value_and_grad(loss(affine), argnums=(0, 1, 2)))(W, B, X)
    assert close(v3, v2) and all(close(a, b) for a, b in zip(g3, g2))


def test_batched_weights_fall_back_to_the_formula():
    Ws = mx.random.normal((4, 5, 3), key=mx.random.key(4))
    x = mx.random.normal((3,), key=mx.random.key(5))
    out = mx.vmap(affine, in_axes=(None, 0, None))(x, Ws, B)
    ref = mx.stack([plain(x, Ws[i], B) for i in range(4)])
    assert close(out, ref)


def test_linear_layer_uses_affine_and_matches_nn_linear():
    import mlx.nn as nn

    lin = gm.nn.Linear(3, 5)
    ref = nn.Linear(3, 5)
    ref.update(lin.parameters())
    x = mx.random.normal((7, 3), key=mx.random.key(6))
    assert close(lin(x), ref(x))
    nobias = gm.nn.Linear(3, 5, bias=False)
    assert close(nobias(x), x @ nobias.weight.T)
