"""Exact vectorized samplers for Poisson and binomial counts.

Both use inversion for small means and Hörmann's transformed rejection with squeeze
(PTRS for Poisson, BTRS for binomial; Hörmann 1993) for means ≥ 10, with a fixed number
of proposal rounds drawn at once and the first accepted one kept (masking, no
data-dependent Python control flow: they work under ``mx.vmap``/``mx.compile``).

Inversion: X = #{k < K : F(k) < u·F(K)} with the pmf built by its ratio recursion (a
cumprod over a trailing axis of K + 1 = 49 terms; P(X > 48) < 1e-14 for means < 10),
exact up to float32 rounding of F.
Rejection: the measured per-round rejection probability is at most 0.25 (PTRS at
λ = 10) and 0.29 (BTRS at np = 10), so with ROUNDS = 24 the chance that no proposal is
accepted is ≤ 0.29²⁴ ≈ 1e-13 per draw; that event falls back to the mode.
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.distributions.special import log_binomial_pmf, log_poisson_pmf

ROUNDS = 24
_K = 48
_SWITCH = 10.0


def _inversion(u, log_f0, ratio_fn):
    """X = #{k < K : F(k) < u F(K)} with f_k = f₀ Π_{j<k} ratio(j) evaluated along a
    trailing axis of length K + 1 (one cumprod and one cumsum: few compiled kernels)."""
    j = mx.arange(_K, dtype=mx.float32)
    ratios = ratio_fn(mx.expand_dims(u, -1) * 0.0 + j)  # [..., K]
    ones = mx.ones(u.shape + (1,), dtype=mx.float32)
    f = mx.exp(mx.expand_dims(log_f0, -1)) * mx.concatenate([ones, mx.cumprod(ratios, axis=-1)], axis=-1)
    cdf = mx.cumsum(f, axis=-1)
    target = u * cdf[..., -1]
    return mx.sum(cdf[..., :-1] < mx.expand_dims(target, -1), axis=-1).astype(mx.int32)


def _first_accepted(accept, k, fallback):
    """k of the first accepted round (rounds on axis 0), else ``fallback``."""
    first = mx.argmax(accept, axis=0)
    chosen = mx.take_along_axis(k, mx.expand_dims(first, 0), axis=0)[0]
    return mx.where(mx.any(accept, axis=0), chosen, fallback)


def poisson_sample(key, rate, shape) -> mx.array:
    """Poisson(rate) draws of ``shape`` (int32)."""
    shape = tuple(shape)
    lam = mx.broadcast_to(mx.stop_gradient(rate), shape)
    small = lam < _SWITCH
    k_inv, k_u, k_v = mx.random.split(key, 3)
    # inversion for λ < 10
    lam_s = mx.where(small, lam, 1.0)
    u0 = mx.random.uniform(shape=shape, key=k_inv)
    lam_e = mx.expand_dims(lam_s, -1)
    x_small = _inversion(u0, -lam_s, lambda j: lam_e / (j + 1.0))
    # PTRS for λ ≥ 10
    lam_l = mx.where(small, _SWITCH, lam)
    slam = mx.sqrt(lam_l)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    rs = (ROUNDS,) + shape
    uu = mx.random.uniform(shape=rs, key=k_u) - 0.5
    v = mx.maximum(mx.random.uniform(shape=rs, key=k_v), 1e-30)
    us = mx.maximum(0.5 - mx.abs(uu), 1e-7)
    k = mx.floor((2.0 * a / us + b) * uu + lam_l + 0.43)
    quick = (us >= 0.07) & (v <= vr)
    ok = (k >= 0) & ~((us < 0.013) & (v > us))
    ks = mx.maximum(k, 0.0)
    lhs = mx.log(v) + mx.log(inv_alpha) - mx.log(a / (us * us) + b)
    rhs = log_poisson_pmf(ks, lam_l)  # = −λ + k log λ − log k!, accurately
    accept = quick | (ok & (lhs <= rhs))
    x_large = _first_accepted(accept, k, mx.floor(lam_l))
    return mx.where(small, x_small, x_large.astype(mx.int32))


def binomial_sample(key, n, p, shape) -> mx.array:
    """Binomial(n, p) draws of ``shape`` (int32); n a (float) count array."""
    shape = tuple(shape)
    n = mx.broadcast_to(mx.stop_gradient(n), shape)
    p = mx.broadcast_to(mx.stop_gradient(p), shape)
    flip = p > 0.5
    pp = mx.where(flip, 1.0 - p, p)  # pp ≤ 1/2
    small = n * pp < _SWITCH
    k_inv, k_u, k_v = mx.random.split(key, 3)
    # inversion: f₀ = (1 − p)ⁿ, f_{k+1} = f_k (n − k)/(k + 1) · p/(1 − p)
    ps = mx.where(small, pp, 0.25)
    ns = mx.where(small, n, 1.0)
    odds = ps / (1.0 - ps)
    u0 = mx.random.uniform(shape=shape, key=k_inv)
    ns_e, odds_e = mx.expand_dims(ns, -1), mx.expand_dims(odds, -1)
    x_small = _inversion(
        u0, ns * mx.log1p(-ps), lambda j: mx.maximum(ns_e - j, 0.0) / (j + 1.0) * odds_e
    )
    # BTRS
    pl = mx.where(small, 0.25, pp)
    nl = mx.where(small, 100.0, n)
    q = 1.0 - pl
    spq = mx.sqrt(nl * pl * q)
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * pl
    c = nl * pl + 0.5
    vr = 0.92 - 4.2 / b
    alpha = (2.83 + 5.1 / b) * spq
    m = mx.floor((nl + 1.0) * pl)
    rs = (ROUNDS,) + shape
    uu = mx.random.uniform(shape=rs, key=k_u) - 0.5
    v = mx.maximum(mx.random.uniform(shape=rs, key=k_v), 1e-30)
    us = mx.maximum(0.5 - mx.abs(uu), 1e-7)
    k = mx.floor((2.0 * a / us + b) * uu + c)
    inside = (k >= 0) & (k <= nl)
    quick = inside & (us >= 0.07) & (v <= vr)
    ks = mx.clip(k, 0.0, nl)
    lhs = mx.log(v * alpha / (a / (us * us) + b))
    # log f(k)/f(m) (Hörmann's h − log k! − log(n−k)! + (k − m) log(p/q)), accurately
    rhs = log_binomial_pmf(ks, nl, pl, True) - log_binomial_pmf(m, nl, pl, True)
    accept = quick | (inside & (lhs <= rhs))
    x_large = _first_accepted(accept, k, m).astype(mx.int32)
    x = mx.where(small, x_small, x_large)
    return mx.where(flip, n.astype(mx.int32) - x, x)
