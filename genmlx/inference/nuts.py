"""The No-U-Turn Sampler (Hoffman & Gelman 2014; Betancourt 2017) with multinomial
trajectory sampling, batched over chains.

One transition per chain: draw p ~ N(0, M); the trajectory doubles (depth j adds 2^j
leapfrog steps in a random direction) until a U-turn, a divergence (energy error
> 1000) or ``max_tree_depth``. States are weighted by exp(−H); within a new subtree the
proposal is multinomial over its leaves (∝ w_n = exp(−ΔH_n); drawn per block of leaves
and combined progressively: a block's draw replaces the earlier one with probability
W_block / W_so_far, the same law as leaf-by-leaf progressive sampling), and the
subtree's proposal replaces the trajectory's with probability min(1, W_subtree / W_old)
(biased progressive sampling).

U-turn (generalized criterion, as in Stan): a (sub)trajectory with momentum sum ρ and
end momenta p⁻, p⁺ turns when ρ·M⁻¹p⁻ ≤ 0 or ρ·M⁻¹p⁺ ≤ 0. Whenever two adjacent
halves A (ends a⁻, a⁺) and B (ends b⁻, b⁺, with a⁺ next to b⁻) are merged, the union is
checked, and so are A extended by b⁻ (ρ_A + b⁻ with ends a⁻, b⁻) and B extended by a⁺
(ρ_B + a⁺ with ends a⁺, b⁺): the checks between subtrees that stop trajectories whose
halves have turned against each other. It is checked for the whole trajectory after
each doubling (halves: the old trajectory and the new subtree) and, iteratively, for
every balanced sub-subtree of the subtree under construction: leaf n closes the
sub-subtrees of size 2^k with (n + 1) mod 2^k = 0, whose first momentum and preceding
prefix sum are kept in checkpoint k (written at the leaves n with n mod 2^k = 0),
and the momenta around its middle and the sum before it at the leaf n mod 2^k = 2^(k−1).

Execution: all chains advance in lockstep (a chain that has stopped is masked in the
statistics and rejected by the merge; its trajectory is integrated unmasked). The
momentum draw and the doublings 0..F are ONE compiled call whose bookkeeping is
vectorized over the whole 2^(F+1)-point trajectory (:func:`_prefix`; F ≤ ``fused``
chosen from the recent trees' depths); each further
doubling of 2^j ≤ B leaves (B = ``block``, 16 by default) is one compiled call (subtree
start, its leapfrog steps unrolled, merge: :func:`_doubling`). Both stack their points
per chain and read every U-turn check off the points' Gram matrix Γ_li = p_l·M⁻¹p_i: a
check with momentum sum ρ = Σ_l S_l p_l and an end a is ρ·M⁻¹p_a = (S Γ)_a, so all
checks are one product with a constant table S and one gather (the trajectory's
direction-dependent ends are index arithmetic on the drawn directions), and a chain's
stop, depth and step count follow from one stop code. A longer doubling runs in
compiled blocks of B leaves. Inside a block the leaves are integrated first and their
bookkeeping is vectorized over the stacked leaves (energy errors, the U-turn checks of
the sub-subtrees inside the block, where each chain stopped, a Gumbel-max multinomial
draw of the block's proposal, progressive across blocks); sub-subtrees longer than a
block use carried checkpoints with write/check masks. The host syncs once per doubling
(does any chain continue?) and once between the blocks of a long doubling (does any
subtree continue?), never per leapfrog step.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from genmlx.core.indexing import row
from genmlx.inference.hmc import ChainState, StepInfo
from genmlx.inference.metric import Metric, kinetic, leapfrog, leapfrog_half, sample_momentum, velocity
from genmlx.inference.unconstrained import UnconstrainedDensity

MAX_ENERGY_ERROR = 1000.0


class Tree(NamedTuple):
    ul: mx.array
    pl: mx.array
    gl: mx.array
    ur: mx.array
    pr: mx.array
    gr: mx.array
    uprop: mx.array
    lpprop: mx.array
    gprop: mx.array
    logw: mx.array
    psum: mx.array
    h0: mx.array
    active: mx.array
    diverging: mx.array
    depth: mx.array
    nsteps: mx.array
    accsum: mx.array


class Sub(NamedTuple):
    """The subtree under construction: ``p1`` its first leaf's momentum; for long
    doublings, the checkpoints of sub-subtree sizes > B (tuples of [C, D] arrays): at a
    sub-subtree's first leaf its momentum ``ckp`` and the momentum sum before it ``ckr``;
    at its second half's first leaf that leaf's momentum ``ckm``, the momentum of the
    leaf before it ``ckq`` and the sum before it ``ckh``."""

    u: mx.array
    p: mx.array
    g: mx.array
    us: mx.array
    lps: mx.array
    gs: mx.array
    logw: mx.array
    psum: mx.array
    on: mx.array
    bad: mx.array
    div: mx.array
    nsteps: mx.array
    accsum: mx.array
    fwd: mx.array
    eps: mx.array
    p1: mx.array
    ckp: tuple
    ckr: tuple
    ckm: tuple
    ckq: tuple
    ckh: tuple


def _stack(xs: list) -> mx.array:
    """``mx.stack(xs)`` of equal-shape arrays as one concatenation and a reshape (a
    view): ``mx.stack`` adds an ExpandDims view per element, ~1 µs each on MLX's CPU
    stream, and the NUTS blocks stack dozens of leaves per call."""
    x0 = xs[0]
    if x0.ndim == 0:
        return mx.stack(xs)
    return mx.concatenate(xs, axis=0).reshape((len(xs),) + tuple(x0.shape))


def _w(mask, a, b):
    """where(mask, a, b) with the [C] mask broadcast over trailing axes of a."""
    m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)) if a.ndim > mask.ndim else mask
    return mx.where(m, a, b)


def _start(dense, key, u, lp, g, minv, mfac) -> Tree:
    p = sample_momentum(key, mfac, dense, u.shape)
    h0 = -lp + kinetic(p, minv, dense)
    c = lp.shape[0]
    return Tree(u, p, g, u, p, g, u, lp, g, mx.zeros((c,)), p, h0, mx.ones((c,), dtype=mx.bool_),
                mx.zeros((c,), dtype=mx.bool_), mx.zeros((c,), dtype=mx.int32),
                mx.zeros((c,), dtype=mx.int32), mx.zeros((c,)))


def _sub_init(t: Tree, key, eps, n_hi: int, fwd=None) -> Sub:
    """A new subtree starting from the trajectory's end in a random direction (from
    ``key``, or given as ``fwd`` [C] bool)."""
    c, d = t.ul.shape
    if fwd is None:
        fwd = mx.random.bernoulli(0.5, (c,), key=key)
    u, p, g = _w(fwd, t.ur, t.ul), _w(fwd, t.pr, t.pl), _w(fwd, t.gr, t.gl)
    z = mx.zeros((c, d))
    f = mx.zeros((c,), dtype=mx.bool_)
    return Sub(u, p, g, u, t.lpprop, g, mx.full((c,), -mx.inf), mx.zeros_like(p), t.active, f, f,
               mx.zeros((c,), dtype=mx.int32), mx.zeros((c,)), fwd, mx.where(fwd, eps, -eps), z,
               *(((z,) * n_hi,) * 5))


def _any_turned(checks: list, minv, dense):
    """Whether any of the criteria (ρ, pa, pb) in ``checks`` turns: one stacked product
    and one sum for all of them."""
    rho = _stack([r for r, _, _ in checks])
    ends = _stack([a for _, a, _ in checks] + [b for _, _, b in checks])
    ab = mx.sum(mx.concatenate([rho, rho], axis=0) * velocity(ends, minv, dense), axis=-1)
    return mx.any(ab <= 0, axis=0)


def _leaf_index(n: int) -> mx.array:
    """0 … n − 1 (int32) as a constant array (no kernel inside a compiled block)."""
    return mx.array(np.arange(n, dtype=np.int32))


def _closing_leaves(n: int) -> mx.array:
    """For the checks of the balanced sub-subtrees of a block of n leaves (sizes 2, 4, …,
    n in turn; for each size its unions, then for sizes ≥ 4 its A-extended and its
    B-extended checks, group g within each): the leaf g·size + size − 1 that closes
    the sub-subtree ([M, 1] int32 constant)."""
    closes = []
    for s in _sizes(n):
        c = np.arange(n // s) * s + s - 1
        closes += [c] if s == 2 else [c, c, c]
    return mx.array(np.concatenate(closes).astype(np.int32))[:, None]


def _sizes(n: int) -> list:
    return [2**k for k in range(1, n.bit_length())]


def _block_checks(P: mx.array, V: mx.array, half: mx.array, level: mx.array, s: int, k0: int) -> list:
    """The U-turn checks of the aligned blocks k ≥ ``k0`` of size s of the stacked leaves
    (momenta P, velocities V [n, C, D]; ``half``/``level``: the momentum sums of the
    blocks of size s/2 and s), as (ρ, velocity at one end, velocity at the other) parts:
    each block's union (first and last leaf) and, for s ≥ 4, its first half extended by
    the second half's first leaf and its second half extended by the first half's last
    leaf. Each part has one row per block."""
    a, h = k0 * s, s // 2
    parts = [(level[k0:], V[a::s], V[a + s - 1::s])]
    if s >= 4:
        parts += [(half[2 * k0::2] + P[a + h::s], V[a::s], V[a + h::s]),
                  (half[2 * k0 + 1::2] + P[a + h - 1::s], V[a + h - 1::s], V[a + s - 1::s])]
    return parts


def _first_turn(P: mx.array, V: mx.array, n: int) -> mx.array:
    """The first leaf [C] (n if none) closing a balanced sub-subtree of the block that
    turns: for sub-subtree g of size s with halves A, B, ρ = Σ of its momenta (pairwise:
    the sums of size s from those of size s/2) and the criterion ρ·M⁻¹p⁻ ≤ 0 or
    ρ·M⁻¹p⁺ ≤ 0 with its first and last leaf; for s ≥ 4 also ρ_A + p(B's first leaf)
    with the ends A's first and B's first leaf, and ρ_B + p(A's last leaf) with the ends
    A's last and B's last leaf. All checks are one product and one sum over the stacked
    pairs (a few kernels per block, not a few per size). Also returns the block's
    momentum sum (the sub-subtree of size n)."""
    parts = []
    level = P
    for s in _sizes(n):
        half, level = level, level[0::2] + level[1::2]  # [n/s, C, D]: ρ of each block of size s
        parts += _block_checks(P, V, half, level, s, 0)
    rho = mx.concatenate([r for r, _, _ in parts], axis=0)
    starts, ends = [a for _, a, _ in parts], [b for _, _, b in parts]
    m = rho.shape[0]
    ab = mx.sum(mx.concatenate([rho, rho], axis=0) * mx.concatenate(starts + ends, axis=0), axis=-1)
    turned = (ab[:m] <= 0) | (ab[m:] <= 0)
    return mx.min(mx.where(turned, _closing_leaves(n), n), axis=0), row(level, 0)


def _pick(idx, xs: list, onehot=None):
    """xs[idx[c]][c] for chain c: for short blocks a chain of selects on the rows of
    ``onehot`` ([n, C], idx == i; one kernel shared by every pick), which fuses into one
    kernel; a stack and a gather for long ones."""
    if len(xs) == 1:
        return xs[0]
    if onehot is not None:
        out = xs[0]
        for i in range(1, len(xs)):
            out = _w(row(onehot, i), xs[i], out)
        return out
    c = idx.shape[0]
    X = _stack(xs)
    return row(mx.take_along_axis(X, idx.reshape((1, c) + (1,) * (X.ndim - 2)), axis=0), 0)


def _leaves(vg, dense, s: Sub, h0, unifs, minv, count: int, hi_w=None, hi_c=None, hi_m=None,
            fresh: bool = False) -> Sub:
    """``count`` leaves (leapfrog steps) of the subtree, then their bookkeeping at once.

    The trajectory is integrated unmasked: a chain whose subtree stopped (or never
    started) is rejected by the merge (``bad``, or an inactive trajectory), so only the
    statistics need to know where each chain stopped. Over the stacked leaves
    (P [n, C, D] momenta, log π [n, C]): energy errors, divergences; the U-turn checks
    of the balanced sub-subtrees of sizes 2 … n inside the block (ρ = Σ p over the
    sub-subtree, end momenta at its first and last leaf); leaf n stops a chain on a
    divergence or a check closing at n, and is counted while no earlier leaf stopped
    it. Sizes larger than the block are checked with the carried checkpoints
    ``s.ckp``/``s.ckr`` (write at the first leaf where ``hi_w``, check at the last where
    ``hi_c``) and the middle checkpoints ``s.ckm``/``s.ckq``/``s.ckh`` (written at the
    first leaf where ``hi_m``). The block's proposal is a multinomial draw ∝ exp(−ΔH) over its leaves
    (Gumbel-max), replacing the subtree's earlier proposal with probability
    W_block / (W_earlier + W_block): the same law as leaf-by-leaf progressive sampling.
    ``unifs``: [count + 1, C] uniforms. ``fresh``: ``s`` is a subtree just started (zero
    sums, no proposal, W = 0): the block's values are taken as they are (same result,
    fewer kernels); a single leaf needs no scan and no draw."""
    e = s.eps[:, None]
    u, p, g = s.u, s.p, s.g
    us_, ps_, gs_, lps_ = [], [], [], []
    for _ in range(count):
        u, p, g, lp = leapfrog(vg, u, p, g, e, minv, dense)
        us_.append(u)
        ps_.append(p)
        gs_.append(g)
        lps_.append(lp)
    n = count
    if n == 1:  # views, not copies
        P, LP = mx.expand_dims(ps_[0], 0), mx.expand_dims(lps_[0], 0)
    else:
        P, LP = _stack(ps_), _stack(lps_)  # [n, C, D], [n, C]
    V = velocity(P, minv, dense)
    dh = (0.5 * mx.sum(P * V, axis=-1) - LP) - h0  # energy error H − H₀ per leaf
    dh = mx.where(mx.isnan(dh), mx.inf, dh)
    div = dh > MAX_ENERGY_ERROR
    lw = -dh
    # where each chain stops: the first leaf with a divergence or closing a sub-subtree
    # (inside the block) that turns; n when none does (leaf indices are constants)
    first = psum_b = None
    if n > 1:
        turn, psum_b = _first_turn(P, V, n)
        first = mx.minimum(mx.min(mx.where(div, _leaf_index(n)[:, None], n), axis=0), turn)  # [C]
    psum_b = ps_[0] if n == 1 else psum_b
    psum_end = psum_b if fresh else s.psum + psum_b
    ckp, ckr, ckm, ckq, ckh = (list(x) for x in (s.ckp, s.ckr, s.ckm, s.ckq, s.ckh))
    hi_turn = None
    if hi_w is not None and ckp:
        for k in range(len(ckp)):
            ckp[k] = _w(hi_w[k], ps_[0], ckp[k])
            ckr[k] = _w(hi_w[k], s.psum, ckr[k])
            ckm[k] = _w(hi_m[k], ps_[0], ckm[k])
            ckq[k] = _w(hi_m[k], s.p, ckq[k])
            ckh[k] = _w(hi_m[k], s.psum, ckh[k])
            t = hi_c[k] & _any_turned([(psum_end - ckr[k], ckp[k], ps_[-1]),
                                        (ckh[k] - ckr[k] + ckm[k], ckp[k], ckm[k]),
                                        (psum_end - ckh[k] + ckq[k], ckq[k], ps_[-1])], minv, dense)
            hi_turn = t if hi_turn is None else hi_turn | t
    # leaf i counts while no earlier leaf stopped the chain (i ≤ first)
    if n == 1:
        stopped = row(div, 0)
        on_i = mx.expand_dims(s.on, 0)
    else:
        stopped = first < n
        on_i = s.on & (_leaf_index(n)[:, None] <= first)  # [n, C]
    last_on = s.on & ~stopped  # the last leaf counted and did not stop the chain
    on = s.on & ~stopped
    bad = s.on & stopped if fresh else s.bad | (s.on & stopped)
    if hi_turn is not None:
        bad = bad | (last_on & hi_turn)
        on = on & ~hi_turn
    acc = mx.exp(mx.minimum(lw, 0.0))
    nsteps = mx.sum(on_i.astype(mx.int32), axis=0)
    accsum = mx.sum(mx.where(on_i, acc, 0.0), axis=0)
    div_all = mx.any(on_i & div, axis=0)
    if not fresh:
        nsteps, accsum, div_all = s.nsteps + nsteps, s.accsum + accsum, s.div | div_all
    # multinomial proposal of the block (Gumbel-max), then progressive across blocks
    if n == 1:
        u_b, g_b, lp_b, logw_b = us_[0], gs_[0], lps_[0], row(lw, 0)
    else:
        gumbel = -mx.log(-mx.log(unifs[:n]))
        idx = mx.argmax(lw + gumbel, axis=0)  # [C]
        oh = (_leaf_index(n)[:, None] == idx[None]) if n <= 8 else None
        u_b, g_b, lp_b = _pick(idx, us_, oh), _pick(idx, gs_, oh), _pick(idx, lps_, oh)
        logw_b = mx.logsumexp(lw, axis=0)
    if fresh:  # W_earlier = 0: the block's draw is the subtree's
        logw, us, lps, gs = logw_b, u_b, lp_b, g_b
    else:
        logw = mx.logaddexp(s.logw, logw_b)
        take = mx.log(row(unifs, n)) < logw_b - logw
        us, lps, gs = _w(take, u_b, s.us), mx.where(take, lp_b, s.lps), _w(take, g_b, s.gs)
    return Sub(u, p, g, us, lps, gs, logw, psum_end, on, bad, div_all, nsteps, accsum, s.fwd, s.eps,
               ps_[0] if fresh else s.p1, tuple(ckp), tuple(ckr), tuple(ckm), tuple(ckq), tuple(ckh))


def _merge(dense, max_depth, t: Tree, s: Sub, unif, minv) -> Tree:
    ok = t.active & ~s.bad
    take = ok & (mx.log(unif) < s.logw - t.logw)
    right = ok & s.fwd
    left = ok & ~s.fwd
    near, far = _w(s.fwd, t.pr, t.pl), _w(s.fwd, t.pl, t.pr)  # the old ends: by the subtree, away
    ul, pl, gl = _w(left, s.u, t.ul), _w(left, s.p, t.pl), _w(left, s.g, t.gl)
    ur, pr, gr = _w(right, s.u, t.ur), _w(right, s.p, t.pr), _w(right, s.g, t.gr)
    psum = _w(ok, t.psum + s.psum, t.psum)
    # the union, the old trajectory extended by the subtree's first leaf, the subtree
    # extended by the old end next to it
    turn = _any_turned([(psum, pl, pr), (t.psum + s.p1, far, s.p1), (s.psum + near, near, s.p)],
                       minv, dense)
    depth = t.depth + t.active.astype(mx.int32)
    return Tree(
        ul, pl, gl, ur, pr, gr,
        _w(take, s.us, t.uprop), mx.where(take, s.lps, t.lpprop), _w(take, s.gs, t.gprop),
        mx.where(ok, mx.logaddexp(t.logw, s.logw), t.logw), psum, t.h0,
        ok & ~turn & (depth < max_depth), t.diverging | (t.active & s.div), depth,
        t.nsteps + s.nsteps, t.accsum + s.accsum,
    )


def _uniforms(key, n, c):
    """[n + 2, C] uniforms: n + 1 for a block of n leaves, the last for the merge."""
    return mx.random.uniform(shape=(n + 2, c), key=key)


# -- compiled pieces (pure functions of arrays; the statics are bound by partial) -----------
def _doubling(vg, dense, max_depth, j, t: Tree, key, eps, minv, draws=None) -> Tree:
    """A whole doubling of 2^j leaves (unrolled) as one Gram-matrix bookkeeping: the
    same tree as a fresh subtree (:func:`_sub_init`), its leaves (:func:`_leaves`) and
    the merge (:func:`_merge`). Its randomness from ``key`` (direction from the first
    half of its split, the [2^j + 2, C] uniforms of :func:`_uniforms` from the second),
    or ``draws`` [2^j + 3, C] uniforms (direction, the block's 2^j + 1, the merge's).

    The points are the start (the old near end ν), the leaves 1..n, the old far end φ
    and the old momentum sum Σ (as a point); every check is a constant row of
    :func:`_doubling_checks` on their Gram matrix (see :func:`_prefix`). A chain's stop
    code z: 2·leaf for a divergence or a turning sub-subtree closing there (the subtree
    is rejected), 2n + 1 for a turn of the merged trajectory, 2n + 2 for none."""
    n, (c, d) = 2**j, t.ul.shape
    if draws is None:
        k1, k2 = mx.random.split(key)
        r = _uniforms(k2, n, c)
        f = mx.random.bernoulli(0.5, (c,), key=k1)[:, None]
    else:
        r, f = draws[1:], draws[0:1].T < 0.5
    r = r.T  # [C, n + 2]
    e = mx.where(f, eps[:, None], -eps[:, None])
    cu, cp, cg = mx.where(f, t.ur, t.ul), mx.where(f, t.pr, t.pl), mx.where(f, t.gr, t.gl)
    far, lp0, h0 = mx.where(f, t.pl, t.pr), t.logw[:, None], _zeros(c)
    pieces = [t.ul, t.ul, lp0, cp, h0]  # point 0: the start (only its p is read)
    for _ in range(n):
        cu, cp, cg, clp, ph = leapfrog_half(vg, cu, cp, cg, e, minv, dense)
        pieces += [cu, cg, _col(clp), ph, e * 0.5]
    pieces += [t.ul, t.ul, lp0, far, h0, t.ul, t.ul, lp0, t.psum, h0]  # the far end and Σ as points
    X, P = _points(pieces, c, n + 3, d)
    gram = _gram(P, minv, dense)
    dh = 0.5 * mx.as_strided(gram, (c, n), ((n + 3) ** 2, n + 4), n + 4) - X[:, 1:n + 1, 2 * d] - t.h0[:, None]
    lw = -mx.where(mx.isnan(dh), mx.inf, dh)  # [C, n]: log weight per leaf
    ii = mx.array(np.arange(1, n + 1, dtype=np.int32))
    zd = mx.min(mx.where(lw < -MAX_ENERGY_ERROR, 2 * ii, 2 * n + 2), axis=1, keepdims=True)
    ck = _doubling_checks(j)
    SG = _mm(_per_chain(ck.S, c), _finite(gram))  # [C, m, n + 3]: ρ_k·M⁻¹p_i
    ab = mx.take_along_axis(SG, _per_chain(ck.ends[0], c), axis=2)  # [C, m, 2]
    z = mx.min(mx.where(mx.min(ab, axis=2) <= 0, mx.array(ck.code), 2 * n + 2), axis=1, keepdims=True)
    z = mx.minimum(z, zd)
    ok = t.active[:, None] & (z > 2 * n)
    logw_b = mx.logsumexp(lw, axis=1, keepdims=True)
    idx = mx.argmax(lw - mx.log(-mx.log(r[:, :n])), axis=1, keepdims=True).astype(mx.int32) + 1
    logw_t = t.logw[:, None]
    take = ok & (mx.log(r[:, -1:]) < logw_b - logw_t)
    up, gp, lpp, _ = mx.split(mx.take_along_axis(X, idx[:, :, None], axis=1).reshape(c, 3 * d + 2),
                              [d, 2 * d, 2 * d + 1], axis=1)
    last = mx.minimum(z // 2, n)  # the last leaf counted
    on = t.active[:, None] & (ii <= last)
    depth = t.depth + t.active.astype(mx.int32)
    active = t.active[:, None] & (z == 2 * n + 2) & (depth[:, None] < max_depth)
    return Tree(
        *_new_end(ok, f, False, (cu, cp, cg), (t.ul, t.pl, t.gl)),
        *_new_end(ok, f, True, (cu, cp, cg), (t.ur, t.pr, t.gr)),
        mx.where(take, up, t.uprop), mx.where(take, lpp, t.lpprop[:, None]).reshape(c), mx.where(take, gp, t.gprop),
        mx.where(ok, mx.logaddexp(logw_t, logw_b), logw_t).reshape(c),
        mx.where(ok, t.psum + mx.sum(P[:, 1:n + 1], axis=1), t.psum), t.h0, active.reshape(c),
        t.diverging | (t.active & (zd == 2 * last).reshape(c)), depth,
        t.nsteps + mx.where(t.active[:, None], last, 0).reshape(c),
        t.accsum + mx.sum(mx.where(on, mx.exp(mx.minimum(lw, 0.0)), 0.0), axis=1),
    )


def _new_end(ok, fwd, right: bool, new: tuple, old: tuple) -> list:
    """The trajectory's end on one side after a doubling: ``new`` where the doubling was
    accepted (``ok``) and went that way (``fwd`` [C, 1] == ``right``), else ``old``. Each
    field's mask is written inside its own select (no shared ok & f node: that would be
    one more kernel, as it feeds three outputs)."""
    return [mx.where(ok, mx.where(fwd, a, b) if right else mx.where(fwd, b, a), b) for a, b in zip(new, old)]


def _points(pieces: list, c: int, n: int, d: int):
    """The points (u, g, log π as [C, 1], p½, ε/2 as [C, 1]) of ``pieces`` stacked per
    chain by one concatenation: X [C, n, 3D + 2] and the momenta P = p½ + g·ε/2 [C, n, D]
    (p½ itself where ε/2 = 0: the points that are not leapfrog leaves). In this order
    the fields a tree keeps of a point (u, g, log π) are adjacent."""
    X = mx.concatenate(pieces, axis=1).reshape(c, n, 3 * d + 2)
    return X, _momenta(X, d)


def _momenta(X: mx.array, d: int) -> mx.array:
    """p = p½ + g·ε/2 from stacked points X [..., 3D + 2] (p½ where ε/2 = 0)."""
    ph, h = X[..., 2 * d + 1:3 * d + 1], X[..., 3 * d + 1:]
    return mx.where(h == 0, ph, ph + X[..., d:2 * d] * h)


def _per_chain(a: np.ndarray, c: int) -> mx.array:
    """A constant table repeated for C chains, [C, *a.shape]: an operand of a batched
    matmul or gather that needs no Broadcast node."""
    return mx.array(np.ascontiguousarray(np.broadcast_to(a, (c,) + a.shape)))


def _col(lp: mx.array) -> mx.array:
    """log π per chain as a column [C, 1] (given so by ``value_and_grad_col``: no view)."""
    return lp if lp.ndim == 2 else lp[:, None]


def _zeros(c: int) -> mx.array:
    """A [C, 1] zero constant (no primitive inside a compiled call)."""
    return mx.array(np.zeros((c, 1), np.float32))


def _gram(P: mx.array, minv, dense: bool) -> mx.array:
    """Γ_li = p_l·M⁻¹p_i for the points P [C, n, D] (M⁻¹ symmetric): one product."""
    V = _mm(P, minv) if dense else minv[:, None] * P
    return _mm(P, V.swapaxes(1, 2))


def _mm(a: mx.array, b: mx.array) -> mx.array:
    """a @ b in full float32: a matmul on the CPU; elsewhere, where MLX may run float32
    matmuls at TF32 precision (``MLX_ENABLE_TF32``, ~1e-3 relative — too coarse for
    energy errors), :func:`_mm_exact`."""
    if mx.default_device() == mx.cpu:
        return mx.matmul(a, b)
    return _mm_exact(a, b)


def _mm_exact(a: mx.array, b: mx.array) -> mx.array:
    """a @ b (a [..., m, k], b [..., k, n]) as a broadcast product and a sum over k."""
    return mx.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _finite(x: mx.array) -> mx.array:
    """x with its non-finite entries zeroed (so that 0·x in a product stays 0)."""
    return mx.where(mx.abs(x) < mx.inf, x, 0.0)


class _DoublingChecks(NamedTuple):
    """The checks of one doubling on its points (0 the start ν, 1..n the leaves, n + 1
    the far end φ, n + 2 the old momentum sum): ρ_k = Σ_l S[k, l] p_l, ends [1, m, 2]
    (int32) and stop codes [m]."""

    S: np.ndarray
    ends: np.ndarray
    code: np.ndarray


def _subtree_checks(first: int, n: int) -> list:
    """The U-turn checks of the balanced sub-subtrees of the n = 2^j points first ..
    first + n − 1 (sizes s = 2 .. n, aligned blocks [a, b]): the union (ρ over a..b, ends
    a and b) and, for s ≥ 4, each half extended by the other's adjacent point (ρ over
    a..h with ends a, h; over h − 1..b with ends h − 1, b; h = a + s/2). Each as (first,
    last point of ρ, end, end, closing point b)."""
    rows = []
    for s in _sizes(n):
        for a in range(first, first + n, s):
            b, h = a + s - 1, a + s // 2
            rows.append((a, b, a, b, b))
            if s >= 4:
                rows += [(a, h, a, h, b), (h - 1, b, h - 1, b, b)]
    return rows


def _doubling_checks(j: int) -> _DoublingChecks:
    """The subtree's sub-subtrees (aligned blocks of sizes 2 .. n of the leaves; for
    sizes ≥ 4 also each half extended by the other's adjacent leaf; code 2·closing
    leaf), then the merged trajectory (Σ + the leaves, ends φ and leaf n), the old
    trajectory extended by leaf 1 (Σ + p_1, ends φ and 1) and the subtree extended by
    the old near end (ν + the leaves, ends ν and n), code 2n + 1."""
    n = 2**j
    rows = [(range(lo, hi + 1), a, b, 2 * close) for lo, hi, a, b, close in _subtree_checks(1, n)]
    leaves = list(range(1, n + 1))
    rows += [(leaves + [n + 2], n + 1, n, 2 * n + 1), ([1, n + 2], n + 1, 1, 2 * n + 1),
             ([0] + leaves, 0, n, 2 * n + 1)]
    S = np.zeros((len(rows), n + 3), np.float32)
    for k, (pts, _, _, _) in enumerate(rows):
        S[k, list(pts)] = 1
    ends = np.array([[a, b] for _, a, b, _ in rows], np.int32)[None]
    return _DoublingChecks(S, ends, np.array([r[-1] for r in rows], np.int32))


def _outputs(t: Tree) -> list:
    """The tree, whether any chain continues, and the mean acceptance statistic."""
    return list(t) + [mx.any(t.active), t.accsum / mx.maximum(t.nsteps, 1)]


def _prefix_masks(F: int, sub: bool = False) -> mx.array:
    """The point masks of the vectorized prefix of doublings 0..F over its n = 2^(F+1)
    points (point 0 the start, doubling j the points [2^j, 2^(j+1)) in integration
    order), [2F + 3, n] bool: doubling j's points (rows 0..F), the trajectory before
    doubling j (rows F + 1 .. 2F + 1), all points (last row). ``sub``: rows 0..F only
    (their own constant: no slice in the graph)."""
    idx = np.arange(2 ** (F + 1))
    subs = [(idx >= 2**j) & (idx < 2 ** (j + 1)) for j in range(F + 1)]
    before = [idx < 2**j for j in range(F + 1)]
    return mx.array(np.stack(subs if sub else subs + before + [idx >= 0]))


class _Checks(NamedTuple):
    """Every U-turn check of the prefix of doublings 0..F as tables over its n points:
    check k has momentum sum ρ_k = Σ_l S[k, l] p_l (+ p at the old near end ν_j for the
    new subtree extended by it) and end points a_k, b_k (a_k may be the old far end φ_j
    or ν_j of doubling j). ``M`` [3m, 2(F+1)] and ``K`` [3m] give, from the ends
    (ν_0..ν_F, φ_0..φ_F) of a chain, the index of the point added to ρ_k (−1: none),
    a_k and b_k as (ν, φ) @ Mᵀ + K. ``code``: 2·(closing point) for a check of a
    sub-subtree (its doubling is rejected), 2·(end of doubling j) + 1 for the
    trajectory's checks after doubling j (the chain stops after it)."""

    S: np.ndarray
    M: np.ndarray
    K: np.ndarray
    code: np.ndarray


def _prefix_checks(F: int) -> _Checks:
    """The checks of the prefix of doublings 0..F: each doubling's sub-subtrees (aligned
    blocks of sizes 2 .. 2^j of its points; for sizes ≥ 4 also each half extended by
    the other's adjacent point), then per doubling j the trajectory's union, the old
    trajectory extended by the new subtree's first point and the new subtree extended
    by the old near end."""
    n = 2 ** (F + 1)
    # (first, last point of ρ's block, near end added?, a, b, code); a: int | ("nu"|"phi", j)
    rows = [(lo, hi, None, a, b, 2 * close) for j in range(1, F + 1)
            for lo, hi, a, b, close in _subtree_checks(2**j, 2**j)]  # doubling j's points
    for j in range(F + 1):
        h, e = 2**j, 2 ** (j + 1) - 1
        rows += [(0, e, None, ("phi", j), e, 2 * e + 1), (0, h, None, ("phi", j), h, 2 * e + 1),
                 (h, e, j, ("nu", j), e, 2 * e + 1)]
    m = len(rows)
    S = np.zeros((m, n), np.float32)
    M = np.zeros((3 * m, 2 * (F + 1)), np.float32)
    K = np.zeros(3 * m, np.float32)
    for k, (lo, hi, nu, a, b, _) in enumerate(rows):
        S[k, lo:hi + 1] = 1
        if nu is None:
            K[k] = -1
        else:
            M[k, nu] = 1
        if isinstance(a, tuple):
            M[m + k, a[1] + (F + 1) * (a[0] == "phi")] = 1
        else:
            K[m + k] = a
        K[2 * m + k] = b
    return _Checks(S, M, K, np.array([r[-1] for r in rows], np.int32))


def _trajectory_ends(fwd: mx.array, F: int) -> mx.array:
    """The old ends of the trajectory before each doubling j as point indices, [C, 2,
    F + 1, 1] float (kept dims: no Squeeze; from the directions ``fwd`` [C, F + 1]):
    ν_j (near, on doubling j's side: where it starts) and φ_j (far). The trajectory's end on a side is the last
    point E_i = 2^(i+1) − 1 of the latest doubling i that went that way (point 0 if
    none): ν_j = max{E_i : i < j, f_i = f_j}, φ_j = max{E_i : i < j, f_i ≠ f_j}."""
    i = np.arange(F + 1)
    earlier = mx.array((i[None, :] < i[:, None])[None, None])  # [1, 1, j, i]
    side = mx.array(np.array([True, False])[None, :, None, None])  # ν, φ
    same = fwd[:, None, :, None] == fwd[:, None, None, :]  # [C, 1, j, i]
    return mx.max(mx.where(earlier & (same == side), mx.array(_ends_of(F)), 0.0), axis=-1, keepdims=True)


def _ends_of(F: int) -> np.ndarray:
    """E_i = 2^(i+1) − 1, the last point of doubling i (float32, i = 0..F)."""
    return (2.0 ** np.arange(1, F + 2) - 1).astype(np.float32)


def _columns(x: mx.array) -> list:
    """The columns of x [C, k] as [C, 1] arrays: one Split (views)."""
    return mx.split(x, x.shape[1], axis=1)


def _prefix(vg, dense, max_depth, F, key, u, lp, g, eps, minv, mfac):
    """The momentum draw and the doublings 0..F as one call, their bookkeeping
    vectorized over the whole trajectory of n = 2^(F+1) points (no per-doubling merge).

    The directions are drawn first, so the old ends of the trajectory before each
    doubling are known as point indices (:func:`_trajectory_ends`); the 2^(F+1) − 1
    leapfrog steps are integrated (doubling j from its near end) and stacked per chain
    with the start at point 0: doubling j holds the points [2^j, 2^(j+1)), and every
    balanced sub-subtree of a doubling is an aligned block of the stack. Every U-turn
    check ρ·M⁻¹p_a ≤ 0 (ρ = Σ_l S_kl p_l) is read off the Gram matrix
    Γ_li = p_l·M⁻¹p_i of the points: (S Γ)_{k a} (:class:`_Checks`; Γ's non-finite
    entries zeroed — such a point diverges, so only checks that close after a stop see
    them). A chain's stop is the least code z over its divergences (2·point), turning
    sub-subtrees (2·closing point: the doubling is rejected) and trajectory checks
    (2·end of doubling j + 1: the chain stops after it); its depth, step count and the
    doublings accepted follow from z. The trajectory weights W_j (doubling j) and W_<j
    (before it) are masked logsumexps; each doubling's multinomial proposal is a
    Gumbel-max over its points; subtree j replaces the proposal with probability
    min(1, W_j / W_<j) (biased progressive sampling), so the proposal is the latest
    doubling that takes. The same law as doubling by doubling (tested equal on common
    uniforms)."""
    ks = mx.random.split(key, max_depth + 1)
    t = _start(dense, row(ks, -1), u, lp, g, minv, mfac)
    n, (c, d) = 2 ** (F + 1), u.shape
    R = mx.random.uniform(shape=(n + 2 * (F + 1), c), key=row(ks, 0)).T  # [C, ·]
    fwd, ut = R[:, n:n + F + 1] < 0.5, R[:, n + F + 1:]
    ends = _trajectory_ends(fwd, F)  # [C, 2, F + 1, 1]: ν_j, φ_j
    E = _ends_of(F)
    # hit[j][i]: doubling j starts at E_i (from an earlier doubling i), else at point 0
    hit = _columns((ends[:, :1] == mx.array(E)).reshape(c, (F + 1) ** 2))
    es = _columns(mx.where(fwd, eps[:, None], -eps[:, None]))  # ±ε per doubling
    pts = [(u, t.pl, g)]
    lp1 = lp[:, None]
    pieces = [u, g, lp1, t.pl, _zeros(c)]
    for j in range(F + 1):
        cu, cp, cg = pts[0]
        for i in range(j):
            h = hit[j * (F + 1) + i]
            ui, pi, gi = pts[2 ** (i + 1) - 1]
            cu, cp, cg = mx.where(h, ui, cu), mx.where(h, pi, cp), mx.where(h, gi, cg)
        for _ in range(2**j):
            cu, cp, cg, clp, ph = leapfrog_half(vg, cu, cp, cg, es[j], minv, dense)
            pieces += [cu, cg, _col(clp), ph, es[j] * 0.5]
        pts += [None] * (2**j - 1) + [(cu, cp, cg)]
    X, P = _points(pieces, c, n, d)  # point i: u, g, log π, p½, ε/2
    LP = X[:, :, 2 * d]
    gram = _gram(P, minv, dense)  # [C, n, n]: Γ_li = p_l·M⁻¹p_i
    kin = mx.as_strided(gram, (c, n), (n * n, n + 1))  # 2·(kinetic energy) per point
    ii, fi = _leaf_index(n), mx.array(np.arange(n, dtype=np.float32))
    h0 = -lp1 + kinetic(t.pl, minv, dense, keepdims=True)  # t.h0 as [C, 1]
    dh = (0.5 * kin - LP) - h0
    lw = mx.where(ii == 0, 0.0, -mx.where(mx.isnan(dh), mx.inf, dh))  # log weight per point
    zd = mx.min(mx.where(lw < -MAX_ENERGY_ERROR, 2 * ii, 2 * n), axis=1, keepdims=True)  # 2·first divergence
    ck = _prefix_checks(F)
    m = ck.S.shape[0]
    flat_ends = ends.reshape(c, 2 * (F + 1), 1)  # (ν_0..ν_F, φ_0..φ_F) as a column per chain
    # (ν, φ) @ Mᵀ + K as [C, 3m, 1] (small integers: exact), K added by each consumer's kernel
    sel = mx.matmul(_per_chain(ck.M, c), flat_ends)
    S = mx.array(ck.S) + (fi == sel[:, :m] + mx.array(ck.K[:m, None]))  # [C, m, n]
    SG = _mm(S, _finite(gram))  # [C, m, n]: ρ_k·M⁻¹p_i
    ends_ab = sel[:, m:].reshape(c, 2, m, 1) + mx.array(ck.K[m:].reshape(2, m, 1))
    ab = mx.sum(mx.where(fi == ends_ab, SG[:, None], 0.0), axis=-1, keepdims=True)
    aa, ab = mx.split(ab, 2, axis=1)  # [C, 1, m, 1]: the criterion at either end
    turned = (aa <= 0) | (ab <= 0)
    z = mx.minimum(mx.min(mx.where(turned, mx.array(ck.code[:, None]), 2 * n), axis=(1, 2)), zd)  # [C, 1]
    if max_depth <= F + 1:  # the depth cap stops the chain after doubling max_depth − 1
        z = mx.minimum(z, 2 ** (max_depth + 1) - 1)
    masks = _prefix_masks(F)
    W = mx.logsumexp(mx.where(masks, lw[:, None], -mx.inf), axis=-1)  # [C, 2F + 3]
    w_sub, w_before, w_all = mx.split(W, [F + 1, 2 * F + 2], axis=1)
    gumbel = -mx.log(-mx.log(R[:, :n]))
    pick = mx.argmax(mx.where(_prefix_masks(F, sub=True), (lw + gumbel)[:, None], -mx.inf), axis=-1)  # [C, F + 1]
    good = z >= mx.array((2 ** np.arange(2, F + 3) - 1).astype(np.int32))  # doubling j accepted
    take = good & (mx.log(ut) < w_sub - w_before)
    idx = mx.max(mx.where(take, pick.astype(mx.int32), 0), axis=1, keepdims=True)  # latest taking
    last = mx.minimum(z // 2, n - 1)  # [C, 1]: the last point counted
    depth = sum((last >= 2**i).astype(mx.int32) for i in range(F + 1))
    on = (ii >= 1) & (ii <= last)  # the points counted: 1 .. last
    accsum = mx.sum(mx.where(on, mx.exp(mx.minimum(lw, 0.0)), 0.0), axis=1)
    diverging = (zd == 2 * last)  # the first divergence is counted (no stop before it)
    at = mx.where(_leaf_index(3) == 0, idx,  # the proposal, the left and the right end
                  mx.where(fwd[:, F:] == (_leaf_index(3) == 2), E[F], flat_ends[:, 2 * F + 1]).astype(mx.int32))
    Y = mx.take_along_axis(X, at[:, :, None], axis=1)  # [C, 3, 3D + 2]
    _, pl, pr = mx.split(_momenta(Y, d).reshape(c, 3 * d), 3, axis=1)
    k = 3 * d + 2  # one split of ≤ 10 parts (one Split node; MLX slices one of more)
    up, gp, lpp, _, ul, gl, _, ur, gr, _ = mx.split(
        Y.reshape(c, -1), [d, 2 * d, 2 * d + 1, k, k + d, k + 2 * d, 2 * k, 2 * k + d, 2 * k + 2 * d], axis=1)
    t = Tree(ul, pl, gl, ur, pr, gr, up, lpp.reshape(c), gp, w_all.reshape(c), mx.sum(P, axis=1),
             h0.reshape(c), (z == 2 * n).reshape(c), diverging.reshape(c), depth.reshape(c), last.reshape(c), accsum)
    return _outputs(t) + [mx.max(depth)]


def _small(vg, dense, max_depth, j, t: Tree, key, eps, minv):
    """Doubling j (2^j ≤ B leaves) as one call."""
    kj = row(mx.random.split(key, max_depth + 1), j)
    return _outputs(_doubling(vg, dense, max_depth, j, t, kj, eps, minv))


def _block_key(k2, b):
    """The uniform stream of block ``b`` (int32 scalar array) of a doubling: k2 + [0, b]
    (block 0 — a whole short doubling — uses k2 itself)."""
    return k2 + mx.concatenate([mx.zeros((1,), dtype=mx.uint32), b.reshape(1).astype(mx.uint32)])


def _big(vg, dense, max_depth, B, n_hi, part, t: Tree, s, kj, b, eps, hi_w, hi_c, hi_m, minv):
    """Block ``b`` of B leaves of a long doubling with key ``kj`` (the direction comes
    from kj as in a short doubling, so trees do not depend on B): ``part`` "first"
    (starts the subtree), "mid", or "last" (merges it into the trajectory)."""
    k1, k2 = mx.random.split(kj)
    r = _uniforms(_block_key(k2, b), B, eps.shape[0])
    if part == "first":
        s = _sub_init(t, k1, eps, n_hi)
    s = _leaves(vg, dense, s, t.h0, r, minv, B, hi_w, hi_c, hi_m, fresh=part == "first")
    if part == "last":
        return _outputs(_merge(dense, max_depth, t, s, row(r, -1), minv))
    return _flat_sub(s) + [mx.any(s.on)]


class NUTSKernel:
    """Batched NUTS transition; ``step(key, state, eps, metric) → (state, info)`` with
    ``info.accepted`` holding the tree depth reached. ``block``: leaves per compiled
    call (a power of two). The momentum draw and the doublings 0..F run as one call
    with their bookkeeping vectorized over the whole trajectory (:func:`_prefix`). F ≤
    ``fused`` minimizes the expected cost over the deepest trees d of the last
    transitions (``init`` clears them; F = ``fused`` while none is known): leaves
    2^max(F+1, d) − 1 plus ``CALL_COST`` leaves per further call, 1 + max(0, d − 1 − F)
    calls. Every F gives the same transition law; only the use of the random stream
    differs."""

    CALL_COST = 4.0  # one more compiled call (its bookkeeping, a host sync), in leapfrog steps
    WINDOW = 64  # transitions whose deepest trees choose F 

    def __init__(self, density: UnconstrainedDensity, max_tree_depth: int = 10, block: int = 16,
                 fused: int = 3):
        if not isinstance(max_tree_depth, int) or not 1 <= max_tree_depth <= 15:
            raise ValueError(f"nuts: max_tree_depth must be an int in [1, 15], got {max_tree_depth!r}")
        if not isinstance(block, int) or block < 1 or block & (block - 1):
            raise ValueError(f"nuts: block must be a power of two, got {block!r}")
        self.density = density
        self.max_depth = max_tree_depth
        self.block = block
        self.fused = max(0, min(fused, max_tree_depth - 1))
        self.log_block = block.bit_length() - 1
        self.n_hi = max(0, max_tree_depth - 1 - self.log_block)  # checkpoint sizes > B
        self._fns: dict = {}
        self._masks: dict = {}
        d = np.arange(self.max_depth + 1)
        F = np.arange(self.fused + 1)[:, None]
        # expected cost of prefix depth F for a deepest tree d, in leapfrog steps
        self._cost = 2.0 ** np.maximum(F + 1, d) - 1 + self.CALL_COST * (1 + np.maximum(0, d - 1 - F))
        self._depths: deque = deque(maxlen=self.WINDOW)
        self._counts = np.zeros(self.max_depth + 1)

    def init(self, u: mx.array) -> ChainState:
        self._depths.clear()
        self._counts[:] = 0
        lp, g = self.density.value_and_grad(u)
        return ChainState(u, lp, g)

    def _fn(self, dense: bool, kind, *static):
        k = (dense, kind) + static
        f = self._fns.get(k)
        if f is None:
            vg, md = self.density.value_and_grad, self.max_depth
            vgc = self.density.value_and_grad_col  # log π as a column: stacked as one
            ns = len(Sub._fields) - 5
            nh = self.n_hi

            def sub_of(rest):
                cks = [tuple(rest[ns + i * nh:ns + (i + 1) * nh]) for i in range(5)]
                return Sub(*rest[:ns], *cks), rest[ns + 5 * nh:]

            if kind == "first":
                f = mx.compile(partial(_prefix, vgc, dense, md, static[0]))
            elif kind == "small":
                j = static[0]
                f = mx.compile(lambda *a: _small(vgc, dense, md, j, Tree(*a[:17]), *a[17:]))
            elif kind == "merge":
                def merge_only(*a):
                    s, (kj, b, minv) = sub_of(a[17:])
                    t = Tree(*a[:17])
                    k = _block_key(row(mx.random.split(kj), 1), b)
                    return _outputs(_merge(dense, md, t, s, mx.random.uniform(shape=t.lpprop.shape, key=k), minv))

                f = mx.compile(merge_only)
            else:
                part = static[0]

                def big(*a):
                    t = Tree(*a[:17])
                    if part == "first":
                        s, rest = None, a[17:]
                    else:
                        s, rest = sub_of(a[17:])
                    return _big(vg, dense, md, self.block, nh, part, t, s, *rest)

                f = mx.compile(big)
            self._fns[k] = f
        return f

    @property
    def _prefix_depth(self) -> int:
        """The prefix depth F of the next transition, from the recorded deepest trees."""
        if not self._depths:
            return self.fused
        return int(np.argmin(self._cost @ self._counts))  # the least F of least cost

    def _record(self, depth: int) -> None:
        """Keep the deepest tree of the last WINDOW transitions (and their counts)."""
        if len(self._depths) == self.WINDOW:
            self._counts[self._depths[0]] -= 1
        self._depths.append(depth)
        self._counts[depth] += 1

    def _index(self, b: int) -> mx.array:
        k = ("index", b)
        if k not in self._masks:
            self._masks[k] = mx.array(b, dtype=mx.int32)
        return self._masks[k]

    def _hi_masks(self, j: int, blk: int):
        """Write, check and middle-write masks of the checkpoint sizes 2^k > B for block
        ``blk`` of a doubling of depth j (sizes above 2^j never fire)."""
        k = (j, blk)
        m = self._masks.get(k)
        if m is None:
            lb = self.log_block
            w = np.zeros(self.n_hi, bool)
            c = np.zeros(self.n_hi, bool)
            mid = np.zeros(self.n_hi, bool)
            for i in range(self.n_hi):
                size_blocks = 2 ** (i + 1)  # size 2^(lb+1+i) leaves = 2^(i+1) blocks
                if lb + 1 + i <= j:
                    w[i] = blk % size_blocks == 0
                    c[i] = (blk + 1) % size_blocks == 0
                    mid[i] = blk % size_blocks == size_blocks // 2
            m = self._masks[k] = (mx.array(w), mx.array(c), mx.array(mid))
        return m

    def step(self, key, state: ChainState, eps: mx.array, metric: Metric):
        dense = metric.dense
        minv, mfac = metric.minv, metric.mfac
        F = self._prefix_depth
        out = first = self._fn(dense, "first", F)(key, state.u, state.lp, state.grad, eps, minv, mfac)
        deepest = None  # the last doubling that some chain ran, past the prefix
        for j in range(F + 1, self.max_depth):
            if not bool(out[17]):  # one host sync per doubling: does any chain continue?
                break
            deepest = j
            tree = out[:17]
            if 2**j <= self.block:
                out = self._fn(dense, "small", j)(*tree, key, eps, minv)
                continue
            nb = 2**j // self.block
            kj = row(mx.random.split(key, self.max_depth + 1), j)
            w, c, mid = self._hi_masks(j, 0)
            sub = self._fn(dense, "big", "first")(*tree, kj, self._index(0), eps, w, c, mid, minv)
            for b in range(1, nb):
                if not bool(sub[-1]):  # every subtree has stopped: merge now
                    out = self._fn(dense, "merge")(*tree, *sub[:-1], kj, self._index(b), minv)
                    break
                w, c, mid = self._hi_masks(j, b)
                part = "last" if b == nb - 1 else "mid"
                res = self._fn(dense, "big", part)(*tree, *sub[:-1], kj, self._index(b), eps, w, c, mid, minv)
                if part == "last":
                    out = res
                else:
                    sub = res
        depth = deepest + 1 if deepest is not None else int(first[19])  # evaluated already
        self._record(depth)
        tree = Tree(*out[:17])
        info = StepInfo(out[18], tree.diverging, tree.nsteps, tree.depth)
        return ChainState(tree.uprop, tree.lpprop, tree.gprop), info


def _flat_sub(s: Sub) -> list:
    return list(s[:-5]) + [a for ck in s[-5:] for a in ck]


def nuts(key: mx.array, model, args: tuple, observations, num_samples: int = 1000,
         num_warmup: int = 1000, num_chains: int = 4, *, max_tree_depth: int = 10,
         target_accept: float = 0.8, mass: str | object = "diag", adapt_mass: bool | None = None,
         step_size: float | None = None, adapt_step_size: bool = True, init=None,
         progress: bool = True, thin: int = 1):
    """NUTS over the unconstrained latents of ``model(*args)`` given ``observations``.

    Returns an :class:`~genmlx.inference.mcmc.MCMCResult`: ``.samples[addr]`` shaped
    [num_chains, num_samples, *value_shape], ``.summary()``, ``.divergences`` (bool
    [chains, draws]), ``.tree_depth``, ``.num_steps``, ``.step_size``.
    ``mass``: "identity", "diag" (default) or "dense", adapted in Stan's windows, or
    a fixed inverse mass matrix array.
    """
    from genmlx.inference.flat_density import cached_density, cached_kernel
    from genmlx.inference.mcmc import run_mcmc

    if not isinstance(max_tree_depth, int) or not 1 <= max_tree_depth <= 15:
        raise ValueError(f"nuts: max_tree_depth must be an int in [1, 15], got {max_tree_depth!r}")
    density = cached_density(model, args, observations)
    kernel = cached_kernel(density, NUTSKernel, max_tree_depth)
    return run_mcmc(kernel, density, key, num_samples=num_samples,
                    num_warmup=num_warmup, num_chains=num_chains, step_size=step_size, mass=mass,
                    adapt_step_size=adapt_step_size, adapt_mass=adapt_mass,
                    target_accept=target_accept, init=init, progress=progress, desc="nuts", thin=thin)
