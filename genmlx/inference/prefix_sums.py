"""Prefix sums of nonnegative float32 values without float32 drift, as (integer, fraction).

A float32 running sum of n terms of similar size drifts: once the accumulator is 2^24
times a term, each addition rounds by a sizeable fraction of the term, always the same
way for equal terms. For a normalised CDF of 10⁶ equal weights, ``mx.cumsum`` (MLX's CPU
scan is sequential) is off by 2.6·10⁻³ — 2600 of the 10⁶ resampling slots — and for
3·10⁷ weights it stalls near 0.9 (see ``tests/inference/test_prefix_sums.py``).

Here a value y ≥ 0 is split as y = ⌊y⌋ + (y − ⌊y⌋) (both exact in float32): the integer
parts are summed as int32 (exact), the fractions (each < 1) by a blocked scan whose every
float32 partial sum stays below a few block lengths L: each block's fractions are scanned
locally (values < L), and the block totals — themselves split into integer and fraction —
give the blocks' offsets by the same scheme, recursively. So the prefix sum
Σ_{k≤i} y_k = I_i + F_i, with I_i int32 and F_i ∈ [0, 1), is accurate to about
L · 2^−24 · L ≈ 4·10⁻³ in absolute terms for L = 256, whatever n (n · max y < 2^31).

:func:`slot_positions` uses it for resampling: X_i = m · C_i, the position of particle i's
CDF value in units of the m resampling slots, as (I_i, F_i) — exact enough to decide
"u_j ≤ C_i" for any m < 2^31, where a float32 C_i resolves only m < 2^24 slots. On the
CPU (MLX has float64 there, not on GPUs) it takes a float64 cumulative sum instead, exact
to ~10⁻⁹ slots and several times cheaper than the blocked scan.
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.core.indexing import iota

BLOCK = 256


def _blocks(x: mx.array, fill: float) -> mx.array:
    """x [..., n] padded with ``fill`` to a multiple of BLOCK and viewed as [..., g, BLOCK]."""
    n = x.shape[-1]
    g = -(-n // BLOCK)
    if g * BLOCK != n:
        x = mx.concatenate([x, mx.full(x.shape[:-1] + (g * BLOCK - n,), fill, dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (g, BLOCK))


def blocked_sum(x: mx.array) -> mx.array:
    """Σ over the last axis as sums of blocks of BLOCK, recursively: every float32
    partial sum adds at most BLOCK terms (MLX's CPU reduction is one sequential float32
    sum, which stops growing at 2^24 times a term: Σ of 3·10⁷ ones gives 2^24)."""
    while x.shape[-1] > BLOCK:
        x = mx.sum(_blocks(x, 0.0), axis=-1)
    return mx.sum(x, axis=-1)


def blocked_logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis by blocks of BLOCK (as :func:`blocked_sum`)."""
    while x.shape[-1] > BLOCK:
        x = mx.logsumexp(_blocks(x, -mx.inf), axis=-1)
    return mx.logsumexp(x, axis=-1)


def _split(y: mx.array) -> tuple[mx.array, mx.array]:
    """(⌊y⌋ as int32, y − ⌊y⌋) elementwise (both exact)."""
    fl = mx.floor(y)
    return fl.astype(mx.int32), y - fl


def _normalize(i: mx.array, f: mx.array) -> tuple[mx.array, mx.array]:
    """(i + ⌊f⌋, f − ⌊f⌋): the fraction moved into [0, 1)."""
    fi, ff = _split(f)
    return i + fi, ff


def prefix_split(y: mx.array) -> tuple[mx.array, mx.array]:
    """Inclusive prefix sums of y ≥ 0 [n] (float32) along the last axis as (I int32, F
    float32 in [0, 1)): Σ_{k≤i} y_k = I_i + F_i to ~4·10⁻³ absolute (module docstring)."""
    k, f = _split(y)
    ints = mx.cumsum(k, axis=-1)
    n = y.shape[-1]
    if n <= BLOCK:
        return _normalize(ints, mx.cumsum(f, axis=-1))
    lead = y.shape[:-1]
    local = mx.cumsum(_blocks(f, 0.0), axis=-1)  # < BLOCK each
    g = local.shape[-2]
    oi, of = prefix_split(local[..., -1])  # inclusive offsets of the blocks
    # exclusive offsets: the previous block's inclusive one (0 for the first)
    zi, zf = mx.zeros(lead + (1,), dtype=mx.int32), mx.zeros(lead + (1,), dtype=f.dtype)
    oi = mx.concatenate([zi, oi[..., :-1]], axis=-1)[..., None]
    of = mx.concatenate([zf, of[..., :-1]], axis=-1)[..., None]
    fi, ff = _normalize(mx.broadcast_to(oi, local.shape), local + of)
    fi = fi.reshape(lead + (g * BLOCK,))[..., :n]
    ff = ff.reshape(lead + (g * BLOCK,))[..., :n]
    return _normalize(ints + fi, ff)


def _position(x) -> tuple[mx.array, mx.array]:
    """A slot position given as an int or as (int32 part, float32 fraction)."""
    if isinstance(x, tuple):
        return x[0].astype(mx.int32), x[1].astype(mx.float32)
    return mx.array(int(x), dtype=mx.int32), mx.array(0.0, dtype=mx.float32)


def _wide_default() -> bool:
    """float64 available for the computation: the default device is the CPU."""
    return mx.default_device().type == mx.DeviceType.cpu


def slot_positions(weights: mx.array, end, start=0, wide: bool | None = None) -> tuple[mx.array, mx.array]:
    """X_i = x₀ + (x₁ − x₀) · Σ_{k≤i} w_k / Σ_k w_k for nonnegative weights [n] as (I int32,
    F float32 in [0, 1)), the last position exactly x₁. ``end`` x₁ and ``start`` x₀ are
    ints (one process: 0 and the number of slots m) or (int32, float32) pairs (a process's
    range of global slots in sharded resampling). All-zero weights, or x₁ = x₀, put every
    position at x₀ but the last.

    ``wide`` (default: on the CPU, where MLX has float64): a float64 cumulative sum,
    nondecreasing and exact to ~10⁻⁹ slots. Otherwise (GPUs): y = w · (x₁ − x₀)/Z with
    Z = Σ w (:func:`blocked_sum`), prefix-summed by :func:`prefix_split` to
    T = X_{n−1} − x₀; the small mismatch D = (x₁ − x₀) − T (float32 rounding of y and Z)
    is spread proportionally, X_i ← X_i + X_i · D/T, a float32 correction of size ≤ |D|
    (no drift). Nondecreasing in i up to the scan's ~10⁻³ absolute error; callers take a
    running maximum of counts."""
    ei, ef = _position(end)
    si, sf = _position(start)
    last = iota(weights.shape[0]) == weights.shape[0] - 1
    if _wide_default() if wide is None else wide:
        I, F = _positions_f64(weights, ei, ef, si, sf)
        return mx.where(last, ei, I), mx.where(last, ef, F)
    span_i, span_f = ei - si, ef - sf
    z = blocked_sum(weights)
    span = span_i.astype(mx.float32) + span_f
    I, F = prefix_split(weights * mx.where(z > 0, span / z, 0.0))
    t_i, t_f = I[-1], F[-1]
    d = (span_i - t_i).astype(mx.float32) + (span_f - t_f)  # small: exact enough in float32
    t = t_i.astype(mx.float32) + t_f
    scale = mx.where(t > 0, d / t, 0.0)
    I, F = _normalize(I, F + (I.astype(mx.float32) + F) * scale)
    I, F = _normalize(I + si, F + sf)
    return mx.where(last, ei, I), mx.where(last, ef, F)


def _positions_f64(weights, ei, ef, si, sf) -> tuple[mx.array, mx.array]:
    """:func:`slot_positions` by a float64 cumulative sum (CPU)."""
    f64 = mx.float64
    c = mx.cumsum(weights.astype(f64))
    z = c[-1]
    x0 = si.astype(f64) + sf.astype(f64)
    x1 = ei.astype(f64) + ef.astype(f64)
    X = mx.minimum(x0 + (x1 - x0) * mx.where(z > 0, c / z, 0.0), x1)
    fl = mx.floor(X)
    I, F = fl.astype(mx.int32), (X - fl).astype(mx.float32)
    up = F >= 1  # a fraction within 2^-25 of 1 rounds to 1.0 in float32
    return mx.where(up, I + 1, I), mx.where(up, 0.0, F)
