"""Resampling schemes for weighted particles, and weight utilities.

Each scheme maps log-weights ``[n]`` to ``m`` ancestor indices whose offspring counts
``N_i`` are unbiased: E[N_i] = m · w_i with w = softmax(log-weights). All are branch-free
fixed-shape computations (they work under ``mx.compile`` and ``mx.vmap``).

- multinomial: m i.i.d. draws from Categorical(w).
- stratified:  u_j = (j + U_j)/m with independent U_j ~ U(0, 1), index = F⁻¹(u_j).
- systematic:  as stratified with one shared U.
- residual:    N_i = ⌊m w_i⌋ + multinomial(R, residual weights ∝ m w_i − ⌊m w_i⌋),
               R = m − Σ ⌊m w_i⌋.
The stratified, systematic and residual indices come out sorted.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from genmlx import kernels as _K  # fused GPU kernels; generic path below otherwise
from genmlx.core.indexing import iota
from genmlx.inference.prefix_sums import blocked_logsumexp, slot_positions


LONG_ROW = 1 << 16  # rows longer than this are reduced by blocks


def _lse(log_weights: mx.array) -> mx.array:
    """logsumexp over the last axis; long rows by blocks (:func:`blocked_logsumexp`: a
    sequential float32 sum of 3·10⁷ equal terms, as MLX's CPU reduction does it, stops
    at 2^24 of them)."""
    if log_weights.shape[-1] > LONG_ROW:
        return blocked_logsumexp(log_weights)
    return mx.logsumexp(log_weights, axis=-1)


def log_normalize(log_weights: mx.array) -> mx.array:
    """log w_i − logsumexp(log w)."""
    return log_weights - mx.expand_dims(_lse(log_weights), -1)


def normalized_weights(log_weights: mx.array) -> mx.array:
    """w_i = exp(log w_i) / Σ_j exp(log w_j)."""
    if log_weights.shape[-1] > LONG_ROW:
        return mx.exp(log_normalize(log_weights))
    return mx.softmax(log_weights, axis=-1)


def weight_summary(log_weights: mx.array, *, fused: bool = False) -> tuple[mx.array, mx.array]:
    """(logsumexp(lw), ESS) of a row of log-weights, from one pass of the fused GPU kernel
    where one applies (``fused``; never under ``mx.vmap``), else two logsumexps: what an
    SMC step needs for its ESS test and its new log-weights log Ẑ_t − … in one go (MLX's
    compile does not merge two calls of one custom kernel)."""
    if fused and _K.use_kernel(log_weights):
        return _K.weight_summary(log_weights)
    lse = _lse(log_weights)
    return lse, mx.exp(2 * lse - _lse(2 * log_weights))


def effective_sample_size(log_weights: mx.array, *, fused: bool = False) -> mx.array:
    """ESS = (Σ w)² / Σ w² = exp(2 logsumexp(lw) − logsumexp(2 lw)). ``fused``: the fused
    GPU kernel where one applies (never under ``mx.vmap``: see :mod:`genmlx.kernels`)."""
    return weight_summary(log_weights, fused=fused)[1]


def log_mean_exp(log_weights: mx.array, *, fused: bool = False) -> mx.array:
    """log (1/n Σ exp(lw_i)) — the log of the unbiased marginal-likelihood estimate.
    ``fused`` as in :func:`effective_sample_size`."""
    n = log_weights.shape[-1]
    if fused and _K.use_kernel(log_weights):
        return _K.weight_summary(log_weights)[0] - math.log(n)
    return _lse(log_weights) - math.log(n)


def weight_stats(log_weights: mx.array, *, fused: bool = False) -> mx.array:
    """[logsumexp(lw), logsumexp(2 lw)] of a row of log-weights [n]: what a process
    contributes to the global log Ẑ_t and ESS of sharded particles. ``fused``: from the
    fused weight-summary kernel where one applies (one pass; ``mx.logsumexp`` of one long
    row runs as a single block on CUDA, ~1 ms at 10⁷), via logsumexp(2 lw) =
    2 logsumexp(lw) − log ESS (−∞ for an all −∞ row)."""
    if fused and _K.use_kernel(log_weights):
        lse, ess = _K.weight_summary(log_weights)
        lse2 = mx.where(lse > -mx.inf, 2 * lse - mx.log(ess), lse)
        return mx.stack([lse, lse2])
    return mx.stack([_lse(log_weights), _lse(2 * log_weights)])


def _safe_logits(log_weights: mx.array) -> mx.array:
    # all −inf (every particle impossible) would give NaN probabilities: fall back to uniform
    ok = mx.max(log_weights) > -mx.inf
    return mx.where(ok, log_weights, mx.zeros_like(log_weights))


def _weights(log_weights: mx.array) -> mx.array:
    """exp(lw − max lw): unnormalised weights with maximum 1 (uniform if all are −inf)."""
    M = mx.max(log_weights)
    return mx.where(M > -mx.inf, mx.exp(log_weights - M), 1.0)


def _points_below(I: mx.array, F: mx.array, U: mx.array, m: int) -> mx.array:
    """N = #{j < m : j + U_j ≤ X} for slot positions X = I + F (I int32, F ∈ [0, 1)):
    I + [U_I ≤ F], capped at m; ``U`` one shared uniform (systematic) or one per
    stratum [m]."""
    Uj = U if U.ndim == 0 else mx.take(U, mx.minimum(I, m - 1))
    extra = mx.logical_and(I < m, Uj <= F)  # not `&`: its vmap rule mis-batches (MLX 0.32)
    return mx.minimum(I + extra.astype(mx.int32), m)


def _ancestors_from_cumulative(N: mx.array, first: int, count: int) -> mx.array:
    """Sorted ancestors of the strata first … first + count − 1 from the cumulative
    counts N_i, the last one set to first + count (C_{n−1} = 1 exactly) and a running
    maximum taken (a scan's rounding can make N dip: a negative count): particle i's
    offspring start at slot N_{i−1} − first (:func:`_scatter_ancestors`)."""
    n = N.shape[0]
    N = mx.cummax(mx.where(iota(n) == n - 1, first + count, N))
    prev = mx.concatenate([mx.array([first], dtype=mx.int32), N[:-1]])
    return _scatter_ancestors(prev - first, N > prev, count)


def _from_slots(log_weights: mx.array, U: mx.array, m: int) -> mx.array:
    """Sorted ancestors [m] for u_j = (j + U_j)/m, counted on the exact-enough slot
    positions m·C_i = I_i + F_i (:func:`slot_positions`; valid for any m < 2^31, where a
    float32 CDF resolves only m < 2^24 slots), with a running maximum against the
    scan's ~10⁻³-slot rounding."""
    I, F = slot_positions(_weights(log_weights), m)
    return _ancestors_from_cumulative(_points_below(I, F, U, m), 0, m)


def strata_counts(cdf: mx.array, U: mx.array, m: int) -> mx.array:
    """N(C) = #{j < m : u_j ≤ C} for u_j = (j + U_j)/m, elementwise over CDF values C:
    ⌊mC⌋ + [U_⌊mC⌋ ≤ frac(mC)] (capped at m); ``U`` is one shared uniform (systematic)
    or one per stratum [m]."""
    x = m * cdf
    fl = mx.floor(x)
    return _points_below(fl.astype(mx.int32), x - fl, U, m)


def _from_strata(cdf: mx.array, U: mx.array, m: int) -> mx.array:
    """Ancestors for u_j = (j + U_j)/m, j < m, counted on a nondecreasing float32 CDF
    (:func:`strata_counts`): the reference of the Metal kernels, exact only for m < 2^24
    slots (every other path counts on slot positions, :func:`_from_slots`)."""
    return _ancestors_from_cumulative(strata_counts(cdf, U, m), 0, m)


def segment_ancestors(pos: tuple[mx.array, mx.array], U: mx.array, first: int, count: int, m: int, *,
                      fused: bool = False, clip: bool = False) -> mx.array:
    """Systematic ancestors (indices into ``pos``) of the slots first … first + count − 1
    of m, points j + U for one U: the slots of a process's particles in sharded
    resampling, whose global slot positions ``pos`` = (I int32, F float32) are
    nondecreasing and end at the segment's end. ``fused``: the search kernel on a CUDA GPU
    (no scan of the counts); ``clip``: the run need not be the positions' segment
    (:func:`window_ancestors`; the kernel needs no clip)."""
    if count == 0:
        return mx.zeros((0,), dtype=mx.int32)
    I, F = pos
    if fused and _K.use_kernel(F) == "cuda":
        from genmlx.kernels.resample import search_kernel

        return search_kernel(pos, mx.broadcast_to(U, (count,)), first)
    N = _points_below(I, F, U, m)
    if clip:
        N = mx.clip(N, first, first + count)
    return _ancestors_from_cumulative(N, first, count)


def window_ancestors(pos: tuple[mx.array, mx.array], U: mx.array, first: int, count: int, m: int, *,
                     fused: bool = False) -> mx.array:
    """:func:`segment_ancestors` for a fixed run of slots first … first + count − 1
    (``first`` may be negative, the run may pass m) that need not be the particles'
    segment [S, S') (N at the position before the first particle and at the last one):
    slots j in [S, S') get the same ancestors bit for bit, the others arbitrary indices
    in [0, n).
    Generic path: the counts N_i are clipped to [first, first + count] (comparisons
    j < N_i are unchanged for the slots of the run), so no host value of S is needed."""
    return segment_ancestors(pos, U, first, count, m, fused=fused, clip=True)


def multinomial(key: mx.array, log_weights: mx.array, m: int | None = None) -> mx.array:
    """m i.i.d. ancestor indices from Categorical(softmax(log_weights))."""
    m = log_weights.shape[0] if m is None else m
    return mx.random.categorical(_safe_logits(log_weights), num_samples=m, key=key).astype(mx.int32)


def stratified(key: mx.array, log_weights: mx.array, m: int | None = None, *,
               fused: bool = False) -> mx.array:
    """Stratified resampling: one uniform in each of the m strata [j/m, (j+1)/m).
    ``fused``: the GPU scan + search kernels where they apply (not under ``mx.vmap``)."""
    m = log_weights.shape[0] if m is None else m
    U = mx.random.uniform(shape=(m,), key=key)
    if fused and _K.use_kernel(log_weights):
        return _K.resample_stratified(U, log_weights, m)
    return _from_slots(log_weights, U, m)


def systematic(key: mx.array, log_weights: mx.array, m: int | None = None, *,
               fused: bool = False) -> mx.array:
    """Systematic resampling: u_j = (j + U)/m with a single U ~ U(0, 1). ``fused`` as in
    :func:`stratified`."""
    m = log_weights.shape[0] if m is None else m
    U = mx.random.uniform(shape=(), key=key)
    if fused and _K.use_kernel(log_weights):
        return _K.resample_systematic(U, log_weights, m)
    return _from_slots(log_weights, U, m)


def residual(key: mx.array, log_weights: mx.array, m: int | None = None) -> mx.array:
    """Residual resampling: the integer parts of m·w deterministically, the remaining
    R draws multinomially from the fractional parts."""
    n = log_weights.shape[0]
    m = n if m is None else m
    w = normalized_weights(_safe_logits(log_weights))
    mw = m * w
    base = mx.floor(mw)
    frac = mx.maximum(mw - base, 0.0)
    r = mx.maximum(m - mx.sum(base), 0.0)
    has_rest = mx.sum(frac) > 0
    logits = mx.where(has_rest, mx.log(frac), mx.zeros_like(frac))
    extra = mx.random.categorical(logits, num_samples=m, key=key)
    use = (mx.arange(m) < r).astype(mx.float32)
    counts = base.astype(mx.int32) + mx.zeros((n,), dtype=mx.int32).at[extra].add(use.astype(mx.int32))
    return indices_from_counts(counts, m)


def indices_from_counts(counts: mx.array, m: int) -> mx.array:
    """Sorted ancestor indices [m] in which particle i appears ``counts[i]`` times
    (Σ counts = m): slot j gets the last particle i with counts_i > 0 whose first slot
    s_i = Σ_{k<i} counts_k is ≤ j. Each such particle writes i + 1 at s_i (distinct
    slots), every other particle at its own spare slot m + i, and a running maximum
    fills the gaps: a scatter with no two writes to one address (a scatter-add of
    ones at the s_i collides wherever particles have no offspring — serialized atomics
    on a GPU)."""
    # negative counts (a CDF that is not monotone) would make two particles share a slot
    counts = mx.maximum(counts.astype(mx.int32), 0)
    return _scatter_ancestors(mx.cumsum(counts) - counts, counts > 0, m)


def _scatter_ancestors(starts: mx.array, has: mx.array, m: int) -> mx.array:
    """Sorted ancestors [m] from each particle's first slot ``starts`` (nondecreasing
    where ``has``: the particles with offspring): particle i writes i + 1 at s_i
    (distinct slots), every other particle at its own spare slot m + i, and a running
    maximum fills the gaps."""
    n = starts.shape[0]
    i = iota(n)
    pos = mx.where(mx.logical_and(has, starts < m), starts, m + i)
    marks = mx.zeros((m + n,), dtype=mx.int32).at[pos].add(i + 1)
    return mx.cummax(marks[:m]) - 1


def offspring_counts(indices: mx.array, n: int) -> mx.array:
    """How many times each of the n particles appears in ``indices``."""
    return mx.zeros((n,), dtype=mx.int32).at[indices].add(mx.ones(indices.shape, dtype=mx.int32))


SCHEMES: dict[str, Callable] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_scheme(scheme: str | Callable) -> Callable:
    """The resampling function for a scheme name (or a callable passed through)."""
    if callable(scheme):
        return scheme
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise ValueError(
            f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}"
        ) from None


def resample_indices(key: mx.array, log_weights: mx.array, m: int | None = None,
                     scheme: str | Callable = "multinomial", *, fused: bool = False) -> mx.array:
    """Ancestor indices [m] by the named scheme. ``fused``: the GPU kernels of the
    systematic and stratified schemes where they apply (drivers that are never vmapped
    set it; MLX's custom kernels have no vmap rule)."""
    if fused and scheme in ("systematic", "stratified"):
        return SCHEMES[scheme](key, log_weights, m, fused=True)
    return get_scheme(scheme)(key, log_weights, m)
