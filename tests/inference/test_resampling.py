"""Resampling schemes: unbiased offspring counts, fixed totals, zero-weight particles."""

import genmlx as gm  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from genmlx.inference import resampling as R
from genmlx.inference.prefix_sums import slot_positions

SCHEMES = ["multinomial", "stratified", "systematic", "residual"]
W = np.array([0.13, 0.22, 0.05, 0.35, 0.25])


def _counts(scheme, lw, m, reps, seed):
    keys = mx.random.split(mx.random.key(seed), reps)
    fn = R.get_scheme(scheme)
    idx = mx.vmap(lambda k: fn(k, lw, m))(keys)
    return np.stack([np.bincount(np.asarray(row), minlength=lw.shape[0]) for row in np.asarray(idx)])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [5, 7])
def test_offspring_counts_unbiased(scheme, m):
    lw = mx.array(np.log(W) + 3.0)  # unnormalized on purpose
    counts = _counts(scheme, lw, m, reps=4000, seed=11)
    assert (counts.sum(axis=1) == m).all()
    mean = counts.mean(axis=0)
    se = counts.std(axis=0, ddof=1) / np.sqrt(counts.shape[0])
    assert (se > 0).all()  # every m·w_i is fractional, so every count varies
    assert np.all(np.abs(mean - m * W) < 3.5 * se), (scheme, mean, m * W, se)


@pytest.mark.parametrize("scheme", ["stratified", "systematic", "residual"])
def test_low_variance_schemes_stay_near_expectation(scheme):
    # stratified / systematic / residual keep every count within 1 (resp. the residual
    # part) of m·w_i: floor(m w_i) − 1 < N_i < ceil(m w_i) + 1
    lw = mx.array(np.log(W))
    counts = _counts(scheme, lw, 7, reps=500, seed=3)
    lo, hi = np.floor(7 * W) - (1 if scheme != "residual" else 0), np.ceil(7 * W) + 1
    if scheme == "residual":
        hi = np.floor(7 * W) + 7 - np.floor(7 * W).sum()
    assert (counts >= lo).all() and (counts <= hi).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_weight_never_chosen_and_indices_valid(scheme):
    lw = mx.array([0.0, -mx.inf, 1.0, -mx.inf, 0.5])
    idx = np.asarray(R.resample_indices(mx.random.key(1), lw, 1000, scheme))
    assert idx.min() >= 0 and idx.max() <= 4
    assert not np.isin(idx, [1, 3]).any()


def test_sorted_schemes_are_sorted_and_offspring_helper():
    lw = mx.array(np.log(W))
    for s in ["stratified", "systematic", "residual"]:
        idx = np.asarray(R.resample_indices(mx.random.key(5), lw, 9, s))
        assert (np.diff(idx) >= 0).all()
        np.testing.assert_array_equal(np.asarray(R.offspring_counts(mx.array(idx), 5)), np.bincount(idx, minlength=5))


def test_weight_utilities():
    lw = mx.array([0.0, 0.0, 0.0, 0.0])
    assert float(R.effective_sample_size(lw)) == pytest.approx(4.0, rel=1e-6)
    lw = mx.array([0.0, -mx.inf, -mx.inf])
    assert float(R.effective_sample_size(lw)) == pytest.approx(1.0, rel=1e-6)
    lw = mx.array(np.log([1.0, 2.0, 3.0]))
    assert float(R.log_mean_exp(lw)) == pytest.approx(np.log(2.0), rel=1e-6)


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="bogus"):
        R.resample_indices(mx.random.key(0), mx.zeros((3,)), 3, "bogus")


def test_schemes_compile_and_differ_by_key():
    lw = mx.array(np.random.default_rng(0).normal(size=40))
    for s in SCHEMES:
        f = mx.compile(lambda k, lw, s=s: R.get_scheme(s)(k, lw, 50))
        a, b = f(mx.random.key(0), lw), f(mx.random.key(1), lw)
        assert not np.array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(R.get_scheme(s)(mx.random.key(0), lw, 50)))


@pytest.mark.parametrize("concentration", [0.02, 5.0])
@pytest.mark.parametrize("n, m", [(1, 1), (6, 6), (1000, 1000), (9, 4), (50, 200)])
def test_indices_from_counts_is_repeat(n, m, concentration):
    """Sorted ancestors from offspring counts = each index repeated its count, for sparse
    counts (most particles without offspring, leading and trailing zeros) and dense ones,
    eager and compiled."""
    rng = np.random.default_rng(n + m)
    f = mx.compile(lambda c: R.indices_from_counts(c, m))
    for _ in range(5):
        counts = rng.multinomial(m, rng.dirichlet(np.full(n, concentration)))
        ref = np.repeat(np.arange(n), counts)
        c = mx.array(counts, dtype=mx.int32)
        np.testing.assert_array_equal(np.array(R.indices_from_counts(c, m)), ref)
        np.testing.assert_array_equal(np.array(f(c)), ref)


def test_non_monotone_cdf_gives_valid_sorted_ancestors():
    """A parallel float scan (the GPU's) can make the CDF dip by an ulp; the counts then go
    negative there. Seen on an H200 at n = 100 003: ancestors past n (two particles summed
    into one slot), then an illegal memory access. The counts are clamped and the CDF is
    made monotone, so the ancestors stay sorted, in range, and m in number."""
    n = m = 1000
    rng = np.random.default_rng(4)
    cdf = np.cumsum(rng.dirichlet(np.ones(n))).astype(np.float32)
    cdf[-1] = 1.0
    dips = rng.choice(np.arange(1, n - 1), 40, replace=False)
    cdf[dips] = cdf[dips - 1] - 2e-3  # steps back below the previous value
    for U in (mx.array(0.37), mx.array(rng.uniform(size=m).astype(np.float32))):
        idx = np.array(R._from_strata(mx.array(cdf), U, m))
        assert idx.shape == (m,) and idx.min() >= 0 and idx.max() < n
        assert np.all(np.diff(idx) >= 0)
    counts = mx.array(np.array([3, -1, 2, 0, -2, 4], np.int32))
    got = np.array(R.indices_from_counts(counts, 6))
    assert got.tolist() == [0, 0, 0, 2, 2, 5]
    w = rng.dirichlet(np.ones(n)).astype(np.float32)
    I, F = slot_positions(mx.array(w), n, wide=False)  # the GPU's generic path
    X = np.array(I, np.float64) + np.array(F, np.float64)
    assert X[-1] == n and np.all(np.diff(X) >= -2e-3)
    idx = np.array(R._from_slots(mx.array(np.log(w)), mx.array(0.37), n))
    assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() < n
