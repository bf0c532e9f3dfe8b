"""A categorical's reductions over its K categories (``genmlx.distributions._categories``)
under genmlx's vmaps: over ≥ UNROLL_MIN_EXAMPLES examples and K ≤ UNROLL_MAX they are
elementwise chains of the K column views (no reduction, argmax or gather node: MLX's
CUDA reductions of short rows are 10–50× slower), with the batch axis first or last;
the draws and scores equal the MLX reductions' (UNROLL_MAX = 0) on the same keys."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from benchmarks.graph_ops import count_graph
from genmlx.core import batchwise as BW
from genmlx.core.validation import vmap_level
from genmlx.distributions._categories import argmax_categories, logsumexp_categories, pick_category

N = 1 << 15
W = mx.array([0.3, -1.2, 0.8, 0.0, 2.0])


def _graph(*outs) -> set:
    """The primitives (names) of the lazy graph of ``outs`` that are kernels."""
    return set(count_graph(list(outs)).by_name)


@gm.gen
def per_particle_logits():
    """Logits [K] computed per particle (batch axis first)."""
    z = gm.normal(mx.zeros(5), 1.0) @ "z"
    return gm.categorical(logits=z) @ "k"


@gm.gen
def scaled_logits():
    """Logits a·w from a per-particle scalar and shared data (vmap leaves the batch axis
    last)."""
    a = gm.normal(0.0, 1.0) @ "a"
    return gm.categorical(logits=a * W) @ "k"


@gm.gen
def shared_probs():
    """Probabilities shared by every particle; the index scored per particle."""
    k = gm.categorical(mx.array([0.1, 0.2, 0.3, 0.4])) @ "k"
    return gm.normal(k.astype(mx.float32), 1.0) @ "y"


def _run(model, key, chain: bool, monkeypatch):
    if not chain:
        monkeypatch.setattr(BW, "UNROLL_MAX", 0)
    try:
        tr = model.vsimulate(key, (), N)
        obs = gm.choicemap({"k": tr.choices["k"]}) if model is not shared_probs else gm.choicemap({"y": 0.5})
        tr2, w = model.vgenerate(mx.random.key(9), (), obs, N)
        mx.eval(tr.choices["k"], tr.score, w, tr2.score)
        return tr, w, tr2
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("model", [per_particle_logits, scaled_logits, shared_probs])
def test_chains_equal_reductions(model, monkeypatch):
    a = _run(model, mx.random.key(3), True, monkeypatch)
    b = _run(model, mx.random.key(3), False, monkeypatch)
    assert mx.array_equal(a[0].choices["k"], b[0].choices["k"])  # the same draws
    assert a[0].choices["k"].dtype == mx.int32 and a[0].choices["k"].shape == (N,)
    for x, y in ((a[0].score, b[0].score), (a[1], b[1]), (a[2].score, b[2].score)):
        assert x.shape == (N,) and np.allclose(np.array(x), np.array(y), rtol=2e-6, atol=2e-6)
    counts = np.bincount(np.array(a[0].choices["k"]), minlength=4)
    assert (counts > 0).sum() >= 3  # the draws spread over the categories


def test_chains_leave_no_reduction_nodes():
    """vsimulate's draw and score over 2^15 particles: no ArgReduce (argmax), Reduce
    (logsumexp) or Gather (pick) node; with fewer particles they stay."""
    for n, chain in ((N, True), (64, False)):
        tr = per_particle_logits.vsimulate(mx.random.key(1), (), n)
        ops = _graph(tr.choices["k"], tr.score)
        assert bool(ops & {"ArgReduce", "ArgMax"}) != chain, ops
        assert bool(ops & {"Gather", "GatherAxis"}) != chain, ops
        assert bool(ops & {"LogSumExp", "Max"}) != chain, ops


@pytest.mark.parametrize("batch_last", [False, True])
def test_helpers_under_vmap_match_numpy(batch_last):
    """The three helpers vmapped over 2^15 examples (logits [K] each, or a·w: the batch
    axis last) against NumPy: logsumexp within float32 rounding, argmax (ties to the
    first) and the pick exactly; −inf logits are handled."""
    rng = np.random.default_rng(int(batch_last))
    if batch_last:
        a = mx.array(rng.standard_normal(N).astype(np.float32))
        logits = lambda x: x * W  # noqa: E731
        inputs = a
    else:
        L = rng.standard_normal((N, 5)).astype(np.float32)
        L[::7, 2] = -np.inf
        L[::11, :] = L[::11, :1]  # ties: the first index wins
        logits = lambda x: x  # noqa: E731
        inputs = mx.array(L)
    idx = mx.array(rng.integers(0, 5, N).astype(np.int32))
    with vmap_level():  # as genmlx's vectorized operations vmap
        lse = mx.vmap(lambda x: logsumexp_categories(logits(x)))(inputs)
        am = mx.vmap(lambda x: argmax_categories(logits(x)))(inputs)
        pk = mx.vmap(lambda x, i: pick_category(logits(x), i))(inputs, idx)
        assert not _graph(lse, am, pk) & {"ArgReduce", "ArgMax", "Gather", "GatherAxis", "LogSumExp", "Max", "Sum"}
    Ln = np.array(mx.vmap(logits)(inputs), dtype=np.float64)
    m = Ln.max(axis=1, keepdims=True)
    want = (m + np.log(np.exp(Ln - m).sum(axis=1, keepdims=True)))[:, 0]
    assert np.allclose(np.array(lse), want, rtol=1e-6, atol=1e-5)
    assert np.array_equal(np.array(am), np.argmax(Ln, axis=1))
    assert np.array_equal(np.array(pk), Ln[np.arange(N), np.array(idx)].astype(np.float32))


def test_all_minus_inf_row_logsumexp_is_minus_inf():
    L = mx.full((N, 3), -mx.inf)
    with vmap_level():
        assert bool(mx.all(mx.vmap(logsumexp_categories)(L) == -mx.inf))
