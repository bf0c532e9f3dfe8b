"""Per-example sums (``genmlx.core.batchwise.example_sum``): short sums over many examples
are written as additions of column views (one elementwise kernel instead of MLX's
reduction of many short rows, ~30x slower than a pass over the data on an H200)."""

from __future__ import annotations

import numpy as np
import mlx.core as mx
import pytest

import genmlx as gm
from genmlx.core import batchwise as BW
from genmlx.core.batchwise import example_sum
from genmlx.kernels import sums

EPS32 = float(np.finfo(np.float32).eps)


def _check_sum(got: mx.array, x: np.ndarray, axes: tuple) -> None:
    """got equals the float64 sum of x over ``axes`` within the float32 bound of a
    k-term sum in any order: (k − 1)·ε·Σ|x| (plus the rounding of the result)."""
    k = int(np.prod([x.shape[a] for a in axes]))
    exact = np.sum(x.astype(np.float64), axis=axes)
    bound = (k - 1) * EPS32 * np.sum(np.abs(x), axis=axes) + EPS32 * np.abs(exact)
    assert np.all(np.abs(np.array(got, dtype=np.float64) - exact) <= bound)


@pytest.mark.parametrize("shape,batch,axes", [
    ((40_000, 4), 1, (1,)),
    ((40_000, 2, 3), 1, (1, 2)),
    ((2, 3, 40_000), "last", (0, 1)),
    ((2, 20_000, 8), 2, (2,)),
])
def test_unrolled_sums_equal_reductions(shape, batch, axes):
    x = mx.random.normal(shape, key=mx.random.key(3)) * 10.0
    _check_sum(example_sum(x, batch), np.array(x), axes)


def _primitives(out: mx.array) -> str:
    """The lazy graph of ``out`` as text (the primitives' names)."""
    import io

    buf = io.StringIO()
    mx.export_to_dot(buf, out)
    return buf.getvalue()


@pytest.mark.parametrize("n,k,unrolled", [(1 << 15, 4, True), (1 << 15, 8, True), (1 << 15, 9, False),
                                          (4, 4, False), ((1 << 15) - 1, 4, False)])
def test_unrolling_applies_to_short_sums_over_many_examples(n, k, unrolled):
    """Σ over k ≤ UNROLL_MAX elements per example and ≥ UNROLL_MIN_EXAMPLES examples has
    no reduction node; a longer sum or fewer examples (NUTS chains, a batch) keep one."""
    x = mx.random.normal((n, k), key=mx.random.key(0))
    mx.eval(x)
    dot = _primitives(example_sum(x, 1))
    # (on CUDA a longer sum over as many examples is the row-sum kernel, not a Sum node)
    kernel = not unrolled and n >= BW.UNROLL_MIN_EXAMPLES and sums.usable(x, 1)
    assert ("Sum" in dot) != (unrolled or kernel), dot
    assert (k <= BW.UNROLL_MAX and n >= BW.UNROLL_MIN_EXAMPLES) == unrolled


@pytest.mark.parametrize("shape,batch,call", [
    ((1 << 15, 50), 1, ("rows", (1 << 15, 50))),
    ((2, 1 << 14, 3, 5), 2, ("rows", (1 << 15, 15))),
    ((1 << 15, 9), 1, ("rows", (1 << 15, 9))),
    ((50, 1 << 15), "last", ("cols", (50, 1 << 15))),  # per-example axes first (batch last)
    ((3, 4, 1 << 15), "last", ("cols", (12, 1 << 15))),
    ((1 << 15, sums.K_MAX + 1), 1, None),  # longer rows: MLX's reduction
    (((1 << 15) - 1, 50), 1, None),  # fewer examples
    ((50, (1 << 15) - 1), "last", None),
])
def test_longer_sums_over_many_examples_take_a_sum_kernel(shape, batch, call, monkeypatch):
    """Where CUDA kernels run, a per-example sum of 8 < k ≤ K_MAX entries over ≥
    UNROLL_MIN_EXAMPLES examples is ONE kernel call: rows [N, k] with the batch axes
    first, columns [k, N] with the batch axis last (here the kernels stand in by their
    generic twins, the backend reported as CUDA); other sums keep MLX's reduction. The
    values are the sums either way."""
    from genmlx.kernels import _backend as B

    calls = []
    monkeypatch.setattr(B, "use_kernel", lambda x: "cuda" if x.dtype == mx.float32 else None)
    monkeypatch.setattr(sums, "_transformable", lambda x: calls.append(("rows", x.shape)) or (mx.sum(x, axis=1),))
    monkeypatch.setattr(sums, "_transformable_cols",
                        lambda x: calls.append(("cols", x.shape)) or (mx.sum(x, axis=0),))
    x = mx.random.normal(shape, key=mx.random.key(1))
    got = example_sum(x, batch)
    axes = tuple(range(len(shape) - 1)) if batch == "last" else tuple(range(batch, len(shape)))
    _check_sum(got, np.array(x), axes)
    assert calls == ([call] if call else []), calls
    assert got.shape == tuple(d for a, d in enumerate(shape) if a not in axes)


@pytest.mark.parametrize("unroll", [True, False])
def test_vector_normal_weights_over_many_particles(unroll, monkeypatch):
    """vgenerate of a normal over a 4-vector for 2^15 particles: the importance weights
    log N(y; μ_i, 0.5²) equal their float64 values within float32 rounding with the
    unrolled sums, and the graph has no reduction (with UNROLL_MAX = 0 it has one)."""
    if not unroll:
        monkeypatch.setattr(BW, "UNROLL_MAX", 0)
    n, d = 1 << 15, 4
    y = mx.random.normal((d,), key=mx.random.key(2))

    @gm.gen
    def model():
        mu = gm.normal(mx.zeros(d), 1.0) @ "mu"
        gm.normal(mu, 0.5) @ "y"

    tr, w = model.vgenerate(mx.random.key(unroll), (), gm.choicemap({"y": y}), n)
    assert ("Sum" in _primitives(w)) != unroll
    mu = np.array(tr.choices["mu"], dtype=np.float64)
    z = (np.array(y, dtype=np.float64)[None] - mu) / 0.5
    terms = -0.5 * z * z - np.log(0.5) - 0.5 * np.log(2 * np.pi)
    want = np.sum(terms, axis=1)
    bound = d * 4 * EPS32 * (np.sum(np.abs(terms), axis=1) + 1.0)
    assert np.all(np.abs(np.array(w, dtype=np.float64) - want) <= bound)


def test_mv_normal_contractions_unrolled_for_short_vectors():
    """MvNormal (K = 4) scored for 2^15 particles by vgenerate: its triangular solve,
    quadratic form and log-determinant are additions of slices (no reduction node), and
    the weights equal the float64 log-densities within float32 rounding."""
    n, K = 1 << 15, 4
    L = mx.array([[1.0, 0, 0, 0], [0.5, 1.2, 0, 0], [0.2, -0.3, 0.9, 0], [0.1, 0.4, 0.2, 1.1]])
    y = mx.array([0.3, -0.2, 1.0, 0.5])

    @gm.gen
    def model():
        mu = gm.mv_normal(mx.zeros(K), scale_tril=L) @ "mu"
        gm.mv_normal(mu, scale_tril=L) @ "y"

    tr, w = model.vgenerate(mx.random.key(5), (), gm.choicemap({"y": y}), n)
    assert "Sum" not in _primitives(w)
    Ln = np.array(L, dtype=np.float64)
    r = np.array(y, dtype=np.float64)[None] - np.array(tr.choices["mu"], dtype=np.float64)
    z = np.linalg.solve(Ln, r.T).T
    want = -0.5 * np.sum(z * z, axis=1) - np.sum(np.log(np.diag(Ln))) - 0.5 * K * np.log(2 * np.pi)
    # float32: the solve's K rows each round a few terms of size ≲ max|z|·max|L|
    bound = 64 * EPS32 * (np.sum(z * z, axis=1) + np.max(np.abs(z), axis=1) * 4 + 4)
    assert np.all(np.abs(np.array(w, dtype=np.float64) - want) <= bound)
