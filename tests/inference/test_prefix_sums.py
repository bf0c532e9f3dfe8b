"""Drift-free prefix sums and what rests on them: the resampling CDF, systematic and
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


@pytest.mark.parametrize("n", [1000, 100_003, 3_000_000])
def test_cdf_is_float32_rounding_of_the_exact_cdf(n):
    """No drift: every value within a few float32 ulps of the float64 CDF (the old
    ``mx.cumsum`` path was off by 2.8e-4 at 10⁵ and 2.1e-2 at 3·10⁶)."""
    rng = np.random.default_rng(n)
    lw = rng.normal(size=n).astype(np.float32) * 2
    c = np.array(R._cdf(mx.array(lw)), np.float64)
    w = np.array(mx.exp(mx.array(lw) - float(lw.max())), np.float64)
    exact = np.cumsum(w) / w.sum()
    assert np.all(np.diff(c) >= 0) and c[-1] == 1.0
    assert np.abs(c - exact).max() <= 4 * 2.0**-24


@pytest.mark.parametrize("n", [100_000, 3_000_000])
def test_equal_weights_give_one_offspring_each(n):
    for scheme in (R.systematic, R.stratified):
        idx = scheme(mx.random.key(1), mx.zeros((n,)))
        assert np.array_equal(np.array(idx), np.arange(n)), scheme.__name__


@pytest.mark.parametrize("n,m", [(100_000, 100_000), (1_000_000, 1_000_000), (1000, 30_000_000)])
def test_counts_match_float64_systematic(n, m):
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


def test_stratified_counts_match_float64():
    n = 200_000
    lw = mx.random.normal((n,), key=mx.random.key(3))
    key = mx.random.key(4)
    U = np.array(mx.random.uniform(shape=(n,), key=key))
    got = np.bincount(np.array(R.stratified(key, lw)), minlength=n)
    ex = _exact_counts(np.array(mx.exp(lw - mx.max(lw))), U, n)
    assert np.abs(got - ex).max() <= 1 and (got != ex).sum() <= 2 * 2e-3 * n + 3.5 * math.sqrt(4e-3 * n) + 3


def test_slot_positions_end_exactly_at_m():
    w = mx.random.uniform(shape=(5000,), key=mx.random.key(5))
    for m in (1, 5000, (1 << 24) + 3, 2_000_000_000):
        I, F = slot_positions(w, m)
        assert I[-1].item() == m and F[-1].item() == 0.0
        assert np.all(np.diff(np.array(I, np.float64) + np.array(F)) >= -2e-3)


def test_resampling_under_compile_and_vmap():
    lw = mx.random.normal((4, 3000), key=mx.random.key(6))
    keys = mx.random.split(mx.random.key(8), 4)
    f = mx.compile(mx.vmap(lambda k, l: R.systematic(k, l)))
    got = np.array(f(keys, lw))
    for b in range(4):
        assert np.array_equal(got[b], np.array(R.systematic(keys[b], lw[b])))
