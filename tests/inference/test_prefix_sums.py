"""Drift-free prefix sums and what rests on them: resampling slot positions, systematic and
stratified offspring counts, and log-sum-exp over long rows.

Oracles are exact: float64 NumPy prefix sums of the same float32 values, and equal
weights (the systematic counts are then all exactly m/n). Before these fixes a float32
``mx.cumsum``/``mx.sum`` gave, for 10⁶ equal weights, 7821 particles with no offspring
and as many with two, and Σ of 3·10⁷ ones = 2^24 (``log_mean_exp`` off by 0.58)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from genmlx.inference import resampling as R
from genmlx.inference.prefix_sums import BLOCK, blocked_logsumexp, blocked_sum, prefix_split, slot_positions


@pytest.fixture(params=["float32", "float64"])
def positions_path(request, monkeypatch):
    """Run a test on both slot-position paths: the float32 int + fraction scan (GPUs'
    generic path) and the float64 cumulative sum (the CPU's)."""
    import genmlx.inference.prefix_sums as P

    monkeypatch.setattr(P, "_wide_default", lambda: request.param == "float64")
    return request.param


def _exact_counts(w32: np.ndarray, U, m: int) -> np.ndarray:
    """Systematic/stratified offspring counts from the float64 CDF of the given weights."""
    w = w32.astype(np.float64)
    X = np.cumsum(w) / w.sum() * m
    fl = np.floor(X)
    j = np.minimum(fl, m - 1).astype(np.int64)
    Uj = U if np.ndim(U) == 0 else np.asarray(U)[j]
    N = np.minimum(fl + (Uj <= X - fl), m).astype(np.int64)
    N[-1] = m
    return np.diff(np.concatenate([[0], N]))


@pytest.mark.parametrize("n", [1, BLOCK, BLOCK + 1, 70_001, 1_000_000])
def test_prefix_split_matches_float64(n):
    rng = np.random.default_rng(n)
    y = (rng.uniform(size=n) ** 3 * 5).astype(np.float32)
    I, F = prefix_split(mx.array(y))
    got = np.array(I, np.float64) + np.array(F, np.float64)
    F = np.array(F)
    assert np.all((F >= 0) & (F < 1))
    # error bound of the module docstring: BLOCK · 2^-24 · BLOCK per level, a few levels
    assert np.abs(got - np.cumsum(y.astype(np.float64))).max() <= 4 * BLOCK * BLOCK * 2.0**-24


def test_prefix_split_batched_rows():
    y = mx.random.uniform(shape=(3, 1000), key=mx.random.key(0)) * 3
    I, F = prefix_split(y)
    ref = np.cumsum(np.array(y, np.float64), axis=-1)
    assert np.abs(np.array(I) + np.array(F, np.float64) - ref).max() < 1e-3


def test_blocked_reductions_of_long_rows():
    """Σ and logsumexp of 2^24 + 2^22 ones: the sequential float32 sum stops at 2^24."""
    n = (1 << 24) + (1 << 22)
    ones = mx.ones((n,))
    assert blocked_sum(ones).item() == n
    assert abs(blocked_logsumexp(mx.zeros((n,))).item() - math.log(n)) < 1e-6
    assert abs(R.log_mean_exp(mx.zeros((n,))).item()) < 1e-6
    assert abs(R.effective_sample_size(mx.zeros((n,))).item() / n - 1) < 1e-5
    w = R.normalized_weights(mx.zeros((n,)))
    assert abs(blocked_sum(w).item() - 1) < 1e-5


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("n", [1000, 100_003, 3_000_000])
def test_slot_positions_against_float64(n, wide):
    """No drift: the positions within the blocked scan's bound and the rounding of m·w_i
    (float32 int + fraction, the GPU's generic path) or ~10⁻⁹ slots (float64, the CPU's) of the float64 positions
    of the same float32 weights, for m = n and for m past 2^24 (the old ``mx.cumsum`` CDF
    was off by 2.8e-4 of the total at 10⁵ and 2.1e-2 at 3·10⁶)."""
    rng = np.random.default_rng(n)
    w = np.array(mx.exp(mx.array(rng.normal(size=n).astype(np.float32) * 2)))
    for m in (n, (1 << 24) + 1001):
        I, F = slot_positions(mx.array(w), m, wide=wide)
        X = np.array(I, np.float64) + np.array(F, np.float64)
        exact = np.cumsum(w.astype(np.float64)) / w.astype(np.float64).sum() * m
        # float32: the scan's bound plus the rounding of each y_i = m·w_i/Z (2^-24 relative,
        # at most 2^-24·m in all: the weights' own float32 precision)
        tol = 1e-6 if wide else 4 * BLOCK * BLOCK * 2.0**-24 + 2.0**-23 * m
        assert np.abs(X - exact).max() <= tol, (m, np.abs(X - exact).max())
        assert I[-1].item() == m and F[-1].item() == 0.0
        if wide:
            assert np.all(np.diff(X) >= 0)


@pytest.mark.parametrize("n", [100_000, 3_000_000])
def test_equal_weights_give_one_offspring_each(n, positions_path):
    for scheme in (R.systematic, R.stratified):
        idx = scheme(mx.random.key(1), mx.zeros((n,)))
        assert np.array_equal(np.array(idx), np.arange(n)), scheme.__name__


@pytest.mark.parametrize("n,m", [(100_000, 100_000), (1_000_000, 1_000_000), (1000, 30_000_000)])
def test_counts_match_float64_systematic(n, m, positions_path):
    """Offspring counts against the float64 CDF of the same float32 weights: a count may
    differ (by one) only where a slot boundary falls within the scan's ~10⁻³-slot error
    of X_i = m·C_i, or within the float32 rounding of m·w_i itself (~2^-24 · m·w_i
    slots: for m = 3·10⁷ > 2^24 and 1000 particles, m·w_i ~ 3·10⁴); the old float32 CDF
    got 18% (10⁵) and 35% (10⁶) of the counts wrong."""
    lw = mx.random.normal((n,), key=mx.random.key(n)) * 2
    key = mx.random.key(7)
    U = float(mx.random.uniform(shape=(), key=key))
    w32 = np.array(mx.exp(lw - mx.max(lw)))
    got = np.bincount(np.array(R.systematic(key, lw, m)), minlength=n)
    ex = _exact_counts(w32, U, m)
    assert got.sum() == m
    assert np.abs(got - ex).max() <= 1
    # P(a boundary within δ of X_i) ≤ 2δ per particle, δ = scan error + rounding of m·w_i
    delta = 2e-3 + 2.0**-23 * (m / n) * float(w32.max() / w32.mean())
    expected = 2 * delta * n
    assert (got != ex).sum() <= expected + 3.5 * math.sqrt(expected) + 3


def test_stratified_counts_match_float64(positions_path):
    n = 200_000
    lw = mx.random.normal((n,), key=mx.random.key(3))
    key = mx.random.key(4)
    U = np.array(mx.random.uniform(shape=(n,), key=key))
    got = np.bincount(np.array(R.stratified(key, lw)), minlength=n)
    ex = _exact_counts(np.array(mx.exp(lw - mx.max(lw))), U, n)
    assert np.abs(got - ex).max() <= 1 and (got != ex).sum() <= 2 * 2e-3 * n + 3.5 * math.sqrt(4e-3 * n) + 3


@pytest.mark.parametrize("wide", [False, True])
def test_slot_positions_end_exactly_at_m(wide):
    w = mx.random.uniform(shape=(5000,), key=mx.random.key(5))
    for m in (1, 5000, (1 << 24) + 3, 2_000_000_000):
        I, F = slot_positions(w, m, wide=wide)
        assert I[-1].item() == m and F[-1].item() == 0.0
        assert np.all(np.diff(np.array(I, np.float64) + np.array(F)) >= (0 if wide else -2e-3))


@pytest.mark.parametrize("wide", [False, True])
def test_slot_positions_between_given_ends(wide):
    """A sharded process's range (x₀, x₁) as int + fraction: positions from x₀ to x₁
    exactly; zero weights or an empty range put them all at x₀ (the last at x₁)."""
    w = mx.random.uniform(shape=(3000,), key=mx.random.key(9))
    x0 = (mx.array(12_345_678, mx.int32), mx.array(0.25))
    x1 = (mx.array(27_345_679, mx.int32), mx.array(0.5))
    I, F = slot_positions(w, x1, x0, wide=wide)
    X = np.array(I, np.float64) + np.array(F, np.float64)
    c = np.cumsum(np.array(w, np.float64))
    exact = 12_345_678.25 + c / c[-1] * 15_000_001.25
    assert np.abs(X - exact).max() <= (1e-6 if wide else 4 * BLOCK * BLOCK * 2.0**-24)
    assert X[-1] == 27_345_679.5
    for ww, end in ((mx.zeros((5,)), x1), (w[:5], x0)):
        I, F = slot_positions(ww, end, x0, wide=wide)
        X = np.array(I, np.float64) + np.array(F, np.float64)
        assert np.all(X[:-1] == 12_345_678.25), X


def test_resampling_under_compile_and_vmap(positions_path):
    lw = mx.random.normal((4, 3000), key=mx.random.key(6))
    keys = mx.random.split(mx.random.key(8), 4)
    f = mx.compile(mx.vmap(lambda k, l: R.systematic(k, l)))
    got = np.array(f(keys, lw))
    for b in range(4):
        assert np.array_equal(got[b], np.array(R.systematic(keys[b], lw[b])))
