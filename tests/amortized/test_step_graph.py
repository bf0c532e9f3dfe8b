"""The compiled amortized training step's graph: kernel launches no more than the same
step written by hand in MLX (a GPU step of a small network is launch bound), and the
pieces that keep it small give the same values as the plain computations."""

from __future__ import annotations

import math

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from genmlx.amortized.objective import ess_of, guide_particles, mean_ess
from tests.amortized import lingauss as LG


@pytest.mark.parametrize("objective,K,hidden", [("elbo", 1, (16,)), ("iwae", 5, (16, 16))])
def test_compiled_step_launches_at_most_handwritten(objective, K, hidden):
    """Primitives surviving mx.compile (each ≥ 1 GPU kernel) of the loss and updated
    parameters of one step (benchmarks/graph_ops.py): genmlx ≤ hand-written MLX."""
    from benchmarks.graph_ops import _data, build_steps, step_graph

    counts = {}
    for impl, (step, state) in build_steps(objective, K, hidden, 4).items():
        x = _data(8)
        keys = mx.random.split(mx.random.key(1), 3)
        mx.eval(step(keys[0], x), state())       # compile, record the noise plan
        counts[impl] = step_graph(step, state, keys[1], x).launches
    assert counts["genmlx"] <= counts["mlx"], counts


def test_k1_item_shaped_particles_equal_the_particle_axis_layout():
    guide, _ = LG.make_guide(shift=0.3, log_s=-0.4)
    obj = gm.amortized.ELBO(LG.model, guide)
    x = LG.model.vsimulate(mx.random.key(0), (), 6)["x"]
    key = mx.random.key(3)
    flat = guide_particles(obj, key, x, 1, particle_axis=False)
    axis = guide_particles(obj, key, x, 1)
    for a, b in zip(flat[:3], axis[:3]):
        assert a.shape == (6,) and b.shape == (6, 1)
        np.testing.assert_allclose(np.array(a), np.array(b)[:, 0], rtol=1e-6, atol=1e-6)
    # the ELBO loss is the negative mean of log p − log q over the B items
    loss, m = obj.loss(key, x)
    want = -float(mx.mean(axis[0] - axis[1]))
    assert math.isclose(float(loss), want, rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(float(m["bound"]), -want, rel_tol=1e-6, abs_tol=1e-6)


def test_mean_ess_equals_softmax_ess():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=(7, 9)).astype(np.float32) * 3.0
    lw[2, :4] = -np.inf                          # some zero weights
    lw[5] += 80.0                                # large log weights: stable
    lw = mx.array(lw)
    lse = mx.logsumexp(lw, axis=-1)
    got = float(mean_ess(lw, lse))
    want = float(mx.mean(ess_of(lw)))
    assert math.isclose(got, want, rel_tol=1e-5)
    assert 1.0 <= got <= 9.0
    # one dominant particle: ESS → 1; equal weights: ESS = K
    assert math.isclose(float(mean_ess(mx.array([[0.0, -200.0, -200.0]]),
                                       mx.array([0.0]))), 1.0, rel_tol=1e-6)
    assert math.isclose(float(mean_ess(mx.zeros((2, 4)), mx.full((2,), math.log(4)))), 4.0, rel_tol=1e-6)
