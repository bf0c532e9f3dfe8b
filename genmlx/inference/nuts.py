"""The No-U-Turn Sampler (Hoffman & Gelman 2014; Betancourt 2017) with multinomial
trajectory sampling, batched over chains.

One transition per chain: draw p ~ N(0, M); the trajectory doubles (depth j adds 2^j
leapfrog steps in a random direction) until a U-turn, a divergence (energy error
> 1000) or ``max_tree_depth``. States are weighted by exp(−H); within a new subtree the
proposal is drawn by progressive multinomial sampling (leaf n replaces the subtree's
proposal with probability w_n / Σ_{m≤n} w_m), and the subtree's proposal replaces the
trajectory's with probability min(1, W_subtree / W_old) (biased progressive sampling).

U-turn (generalized criterion): a (sub)trajectory with momentum sum ρ and end momenta
p⁻, p⁺ turns when ρ·M⁻¹p⁻ ≤ 0 or ρ·M⁻¹p⁺ ≤ 0. It is checked for the whole
trajectory after each doubling and, iteratively, for every balanced sub-subtree of
the subtree under construction: leaf n closes the sub-subtrees of size 2^k with
(n + 1) mod 2^k = 0, whose first momentum and preceding prefix sum are kept in
checkpoint slot k (written at the leaves n with n mod 2^k = 0).

All chains advance in lockstep: a chain that has stopped keeps its state (masked),
so each leapfrog step is one compiled call for all chains, and the only Python loops
are over the tree depth and the 2^j steps of a subtree.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import mlx.core as mx

from genmlx.inference.hmc import ChainState, StepInfo
from genmlx.inference.metric import Metric, kinetic, leapfrog, sample_momentum, velocity
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
    u: mx.array
    p: mx.array
    g: mx.array
    us: mx.array
    lps: mx.array
    gs: mx.array
    logw: mx.array
    psum: mx.array
    ckp: mx.array
    ckr: mx.array
    on: mx.array
    bad: mx.array
    div: mx.array
    nsteps: mx.array
    accsum: mx.array


def _w(mask, a, b):
    """where(mask, a, b) with the [C] mask broadcast over trailing axes of a."""
    m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)) if a.ndim > mask.ndim else mask
    return mx.where(m, a, b)


def _start(dense, key, u, lp, g, minv, mfac):
    p = sample_momentum(key, mfac, dense, u.shape)
    h0 = -lp + kinetic(p, minv, dense)
    c = lp.shape[0]
    return Tree(u, p, g, u, p, g, u, lp, g, mx.zeros((c,)), p, h0, mx.ones((c,), dtype=mx.bool_),
                mx.zeros((c,), dtype=mx.bool_), mx.zeros((c,), dtype=mx.int32),
                mx.zeros((c,), dtype=mx.int32), mx.zeros((c,)))


def _sub_init(max_depth, t: Tree, fwd):
    u = _w(fwd, t.ur, t.ul)
    p = _w(fwd, t.pr, t.pl)
    g = _w(fwd, t.gr, t.gl)
    c, d = u.shape
    z = mx.zeros((max_depth, c, d))
    return Sub(u, p, g, u, t.lpprop, g, mx.full((c,), -mx.inf), mx.zeros_like(p), z, z, t.active,
               mx.zeros((c,), dtype=mx.bool_), mx.zeros((c,), dtype=mx.bool_),
               mx.zeros((c,), dtype=mx.int32), mx.zeros((c,)))


def _leaf(vg, dense, max_depth, s: Sub, n, unif, eps, h0, minv):
    u1, p1, g1, lp1 = leapfrog(vg, s.u, s.p, s.g, eps[:, None], minv, dense)
    dh = (-lp1 + kinetic(p1, minv, dense)) - h0  # energy error H − H₀
    dh = mx.where(mx.isnan(dh), mx.inf, dh)
    div = dh > MAX_ENERGY_ERROR
    lw = -dh
    acc = mx.exp(mx.minimum(lw, 0.0))
    logw = mx.logaddexp(s.logw, lw)
    take = mx.log(unif) < lw - logw
    psum = s.psum + p1
    # checkpoints and iterative U-turn checks over balanced sub-subtrees
    sizes = mx.power(2, mx.arange(1, max_depth + 1, dtype=mx.int32))
    write = (mx.remainder(n, sizes) == 0)[:, None, None]
    ckp = mx.where(write, p1[None], s.ckp)
    ckr = mx.where(write, s.psum[None], s.ckr)
    check = mx.remainder(n + 1, sizes) == 0  # [K]
    rho = psum[None] - ckr
    a = mx.sum(rho * velocity(ckp, minv, dense), axis=-1)
    b = mx.sum(rho * velocity(p1, minv, dense)[None], axis=-1)
    turn = mx.any(check[:, None] & ((a <= 0) | (b <= 0)), axis=0)
    on = s.on
    stop = turn | div
    return Sub(
        _w(on, u1, s.u), _w(on, p1, s.p), _w(on, g1, s.g),
        _w(on & take, u1, s.us), mx.where(on & take, lp1, s.lps), _w(on & take, g1, s.gs),
        mx.where(on, logw, s.logw), _w(on, psum, s.psum),
        mx.where(on[None, :, None], ckp, s.ckp), mx.where(on[None, :, None], ckr, s.ckr),
        on & ~stop, s.bad | (on & stop), s.div | (on & div),
        s.nsteps + on.astype(mx.int32), s.accsum + mx.where(on, acc, 0.0),
    )


def _merge(dense, max_depth, t: Tree, s: Sub, fwd, unif, minv):
    ok = t.active & ~s.bad
    take = ok & (mx.log(unif) < s.logw - t.logw)
    right = ok & fwd
    left = ok & ~fwd
    ul, pl, gl = _w(left, s.u, t.ul), _w(left, s.p, t.pl), _w(left, s.g, t.gl)
    ur, pr, gr = _w(right, s.u, t.ur), _w(right, s.p, t.pr), _w(right, s.g, t.gr)
    psum = _w(ok, t.psum + s.psum, t.psum)
    turn = (mx.sum(psum * velocity(pl, minv, dense), -1) <= 0) | (mx.sum(psum * velocity(pr, minv, dense), -1) <= 0)
    depth = t.depth + t.active.astype(mx.int32)
    return Tree(
        ul, pl, gl, ur, pr, gr,
        _w(take, s.us, t.uprop), mx.where(take, s.lps, t.lpprop), _w(take, s.gs, t.gprop),
        mx.where(ok, mx.logaddexp(t.logw, s.logw), t.logw), psum, t.h0,
        ok & ~turn & (depth < max_depth), t.diverging | (t.active & s.div), depth,
        t.nsteps + s.nsteps, t.accsum + s.accsum,
    )


class NUTSKernel:
    """Batched NUTS transition; ``step(key, state, eps, metric) → (state, info)`` with
    ``info.accepted`` holding the tree depth reached."""

    def __init__(self, density: UnconstrainedDensity, max_tree_depth: int = 10):
        if not isinstance(max_tree_depth, int) or not 1 <= max_tree_depth <= 15:
            raise ValueError(f"nuts: max_tree_depth must be an int in [1, 15], got {max_tree_depth!r}")
        self.density = density
        self.max_depth = max_tree_depth
        self._fns = {}
        self._n = [mx.array(i, dtype=mx.int32) for i in range(2 ** (max_tree_depth - 1))]

    def init(self, u: mx.array) -> ChainState:
        lp, g = self.density.value_and_grad(u)
        return ChainState(u, lp, g)

    def _get(self, dense: bool):
        f = self._fns.get(dense)
        if f is None:
            vg, k = self.density.value_and_grad, self.max_depth
            start = mx.compile(partial(_start, dense))
            sub_init = mx.compile(lambda *a: _sub_init(k, Tree(*a[:-1]), a[-1]))
            leaf = mx.compile(lambda *a: _leaf(vg, dense, k, Sub(*a[:15]), *a[15:]))
            merge = mx.compile(lambda *a: _merge(dense, k, Tree(*a[:17]), Sub(*a[17:32]), *a[32:]))
            f = self._fns[dense] = (start, sub_init, leaf, merge)
        return f

    def step(self, key, state: ChainState, eps: mx.array, metric: Metric):
        start, sub_init, leaf, merge = self._get(metric.dense)
        c = state.lp.shape[0]
        k1, k2, k3, k4 = mx.random.split(key, 4)
        tree = Tree(*start(k1, state.u, state.lp, state.grad, metric.minv, metric.mfac))
        fwd_all = mx.random.bernoulli(0.5, (self.max_depth, c), key=k2)
        eps_all = mx.where(fwd_all, eps[None], -eps[None])
        u_merge = mx.random.uniform(shape=(self.max_depth, c), key=k3)
        u_leaf = mx.random.uniform(shape=(2 ** (self.max_depth - 1), c), key=k4)
        for j in range(self.max_depth):
            fwd = fwd_all[j]
            sub = sub_init(*tree, fwd)
            e = eps_all[j]
            for n in range(2**j):
                sub = leaf(*sub, self._n[n], u_leaf[n], e, tree.h0, metric.minv)
                if n % 8 == 7 and not bool(mx.any(sub[10])):
                    break
            tree = Tree(*merge(*tree, *sub, fwd, u_merge[j], metric.minv))
            if not bool(mx.any(tree.active)):
                break
        steps = mx.maximum(tree.nsteps, 1)
        info = StepInfo(tree.accsum / steps, tree.diverging, tree.nsteps, tree.depth)
        return ChainState(tree.uprop, tree.lpprop, tree.gprop), info


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
    from genmlx.inference.mcmc import run_mcmc

    density = UnconstrainedDensity(model, args, observations)
    return run_mcmc(NUTSKernel(density, max_tree_depth), density, key, num_samples=num_samples,
                    num_warmup=num_warmup, num_chains=num_chains, step_size=step_size, mass=mass,
                    adapt_step_size=adapt_step_size, adapt_mass=adapt_mass,
                    target_accept=target_accept, init=init, progress=progress, desc="nuts", thin=thin)
