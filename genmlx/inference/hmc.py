"""Hamiltonian Monte Carlo with a fixed number of leapfrog steps (Neal 2011), batched
over chains, on the unconstrained space of a model's latents.

One transition, per chain: p ~ N(0, M), L leapfrog steps of size ε from (u, p) to
(u*, p*), accept with probability min(1, exp(H(u, p) − H(u*, p*))). The whole
transition (momentum draw, L steps, accept) is one ``mx.compile``d function.

Kernel-level use (e.g. as a rejuvenation move inside SMC)::

    dens = UnconstrainedDensity(model, args, observations)
    kern = HMCKernel(dens, num_steps=10)
    state = kern.init(U)                       # U: [C, D] unconstrained positions
    state, info = kern.step(key, state, eps, metric)   # eps: [C]; info.accept_prob
    values = dens.constrain(state.u)           # {path: [C, *shape]}

or :func:`hmc_kernel` for a ready ``step(key, U) -> (U, accepted)`` closure. The
drivers (:func:`hmc`, ``mala``, ``nuts``) evaluate the density by the flat path
(:mod:`genmlx.inference.flat_density`, same values, a smaller graph) and keep the
density and compiled kernel for repeated calls with the same model and data.

Graph size (the cost of a transition on a CPU is ~2–3 µs per graph node): with a
diagonal metric the trajectory runs on the density's blocks (one per latent), and the
drivers keep the chains' state in *block form* between transitions
(:meth:`HMCKernel.init_blocks`; u and ∇ are joined only for draws and adaptation), so
a transition has no split/join of u or ∇; ``mass="identity"`` compiles without the
metric's multiplications. On the 20-step benchmark transition (bench_hmc.py): 505 →
431 nodes, the hand-written MLX transition 439.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import mlx.core as mx

from genmlx.inference.metric import (Metric, identity_metric, kinetic, kinetic_blocks, leapfrog,
                                     leapfrog_blocks, sample_momentum)
from genmlx.inference.unconstrained import UnconstrainedDensity


class ChainState(NamedTuple):
    """Positions u [C, D], log π(u) [C] and ∇ log π(u) [C, D]. In *block form* (see
    :meth:`HMCKernel.init_blocks`) ``u`` and ``grad`` are tuples of the density's blocks
    (``density.split``), kept so across transitions; :func:`joined` gives [C, D]."""

    u: mx.array
    lp: mx.array
    grad: mx.array


class StepInfo(NamedTuple):
    accept_prob: mx.array  # [C] mean Metropolis acceptance statistic of the transition
    diverging: mx.array  # [C] bool: energy error above 1000
    num_steps: mx.array  # [C] leapfrog steps taken
    accepted: mx.array  # [C] HMC/MALA: bool, proposal accepted; NUTS: tree depth reached


def joined(density: UnconstrainedDensity, state: ChainState) -> ChainState:
    """``state`` with u and ∇ as [C, D] arrays (block form joined; else unchanged)."""
    if isinstance(state.u, tuple):
        return ChainState(density.join(list(state.u)), state.lp, density.join(list(state.grad)))
    return state


def _w(mask, a, b):
    """where(mask, a, b) with the [C] mask broadcast over trailing axes of a."""
    return mx.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)) if a.ndim > 1 else mask, a, b)


def _block_transition(density, num_steps: int, unit: bool, key, ub, lp, gb, eps, mb, fb):
    """One HMC transition on the density's blocks (diagonal metric; ``unit``: identity,
    ``mb``/``fb`` unused). Blocks in, blocks out: no split/join of u or ∇.

    p = M^½-scaled N(0, I) (drawn as one [C, D] array and split), H = −log π + ½pᵀM⁻¹p
    summed by blocks, L leapfrog steps, accept iff log U < H₀ − H₁ (NaN → reject)."""
    k1, k2 = mx.random.split(key)
    zb = density.split(mx.random.normal((lp.shape[0], density.dim), key=k1))
    mb = None if unit else mb
    pb = zb if unit else [f * z for f, z in zip(fb, zb)]
    h0 = kinetic_blocks(pb, mb) - lp
    eb = [eps.reshape(eps.shape + (1,) * (b.ndim - 1)) for b in ub]
    u1, p1, g1, lp1 = list(ub), pb, list(gb), lp
    for _ in range(num_steps):
        u1, p1, g1, lp1 = leapfrog_blocks(density.value_and_grad_blocks, u1, p1, g1, eb, mb)
    d = h0 - (kinetic_blocks(p1, mb) - lp1)  # H₀ − H₁
    log_alpha = mx.where(mx.isnan(d), -mx.inf, d)
    acc = mx.log(mx.random.uniform(shape=lp.shape, key=k2)) < log_alpha
    ub = tuple(_w(acc, a, b) for a, b in zip(u1, ub))
    gb = tuple(_w(acc, a, b) for a, b in zip(g1, gb))
    return ub, mx.where(acc, lp1, lp), gb, mx.exp(mx.minimum(log_alpha, 0.0)), d < -1000.0, acc


def _hmc_transition(density, num_steps: int, kind: str, key, u, lp, g, eps, minv, mfac):
    """One transition on joined [C, D] arrays (dense metric; or a diagonal one on the
    density's blocks, split here and joined at the end)."""
    if kind != "dense":
        sp = density.split
        ub, lp, gb, prob, div, acc = _block_transition(density, num_steps, kind == "identity", key, sp(u),
                                                        lp, sp(g), eps, sp(minv), sp(mfac))
        return density.join(list(ub)), lp, density.join(list(gb)), prob, div, acc
    k1, k2 = mx.random.split(key)
    p = sample_momentum(k1, mfac, True, u.shape)
    h0 = -lp + kinetic(p, minv, True)
    u1, p1, g1, lp1 = u, p, g, lp
    for _ in range(num_steps):
        u1, p1, g1, lp1 = leapfrog(density.value_and_grad, u1, p1, g1, eps[:, None], minv, True)
    d = h0 - (-lp1 + kinetic(p1, minv, True))
    log_alpha = mx.where(mx.isnan(d), -mx.inf, d)
    acc = mx.log(mx.random.uniform(shape=lp.shape, key=k2)) < log_alpha
    return (_w(acc, u1, u), mx.where(acc, lp1, lp), _w(acc, g1, g), mx.exp(mx.minimum(log_alpha, 0.0)),
            d < -1000.0, acc)


class HMCKernel:
    """Batched HMC transition with ``num_steps`` leapfrog steps (one compiled call).

    ``step`` takes and returns the state in the form it is given: joined ([C, D], from
    :meth:`init`) or block form (from :meth:`init_blocks`, diagonal metrics only: the
    chains' u and ∇ stay split into the density's blocks between transitions, so a
    transition has no split/join nodes)."""

    block_form = True  # the MCMC driver may keep the state in block form

    def __init__(self, density: UnconstrainedDensity, num_steps: int = 10):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"hmc: num_steps must be a positive int, got {num_steps!r}")
        self.density = density
        self.num_steps = num_steps
        self._compiled = {}
        self._steps = None
        self._metric = None  # (metric, its minv blocks, its mfac blocks)

    def init(self, u: mx.array) -> ChainState:
        lp, g = self.density.value_and_grad(u)
        return ChainState(u, lp, g)

    def init_blocks(self, u: mx.array) -> ChainState:
        """The block-form state at positions u [C, D]."""
        lp, gb = self.density.value_and_grad_blocks(self.density.split(u))
        return ChainState(tuple(self.density.split(u)), lp, tuple(gb))

    def _fn(self, kind: str, blocks: bool):
        f = self._compiled.get((kind, blocks))
        if f is None:
            if blocks:
                fn = partial(_block_transition, self.density, self.num_steps, kind == "identity")
            else:
                fn = partial(_hmc_transition, self.density, self.num_steps, kind)
            f = self._compiled[(kind, blocks)] = mx.compile(fn)
        return f

    def _metric_blocks(self, metric: Metric):
        """The metric's minv and mfac split into the density's blocks (once per metric)."""
        if self._metric is None or self._metric[0] is not metric:
            mb, fb = self.density.split(metric.minv), self.density.split(metric.mfac)
            mx.eval(mb, fb)
            self._metric = (metric, mb, fb)
        return self._metric[1], self._metric[2]

    def step(self, key, state: ChainState, eps: mx.array, metric: Metric):
        if isinstance(state.u, tuple):
            if metric.dense:
                raise ValueError("hmc: a block-form state needs a diagonal metric; got a dense one")
            mb, fb = ((), ()) if metric.kind == "identity" else self._metric_blocks(metric)
            u, lp, g, prob, div, acc = self._fn(metric.kind, True)(key, state.u, state.lp, state.grad, eps,
                                                                    mb, fb)
        else:
            u, lp, g, prob, div, acc = self._fn(metric.kind, False)(key, state.u, state.lp, state.grad, eps,
                                                                     metric.minv, metric.mfac)
        if self._steps is None or self._steps.shape != lp.shape:
            self._steps = mx.full(lp.shape, self.num_steps, dtype=mx.int32)
        return ChainState(u, lp, g), StepInfo(prob, div, self._steps, acc)


def hmc_kernel(density: UnconstrainedDensity, step_size, num_steps: int = 10, inverse_mass=None,
               num_chains: int | None = None):
    """A ready transition ``step(key, U) -> (U, accepted)`` on positions U [C, D] that
    leaves π invariant (fixed ε, fixed metric); for rejuvenation moves."""
    kern = HMCKernel(density, num_steps)
    cache = {}

    def step(key, U):
        c = U.shape[0]
        if c not in cache:
            from genmlx.inference.metric import metric_from_inverse

            m = identity_metric(c, density.dim, "identity") if inverse_mass is None else metric_from_inverse(inverse_mass, c, density.dim)
            cache[c] = (m, mx.broadcast_to(mx.array(step_size, dtype=mx.float32), (c,)))
        m, eps = cache[c]
        st, info = kern.step(key, kern.init(U), eps, m)
        return st.u, info.accepted

    return step


def hmc(key: mx.array, model, args: tuple, observations, num_samples: int = 1000,
        num_warmup: int = 1000, num_chains: int = 4, step_size: float | None = None,
        num_steps: int = 10, mass: str | object = "diag", adapt_step_size: bool = True,
        adapt_mass: bool | None = None, target_accept: float = 0.8, init=None,
        progress: bool = True, thin: int = 1):
    """HMC over the unconstrained latents of ``model(*args)`` given ``observations``.

    ``mass``: "identity", "diag" or "dense" (adapted in Stan's windows when
    ``adapt_mass``, default True unless "identity"), or a fixed inverse mass matrix
    array ([D] diagonal or [D, D] dense). ``step_size``: the initial ε (searched for
    when None), kept fixed when ``adapt_step_size`` is False. Returns an
    :class:`~genmlx.inference.mcmc.MCMCResult`.
    """
    from genmlx.inference.flat_density import cached_density, cached_kernel
    from genmlx.inference.mcmc import run_mcmc

    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"hmc: num_steps must be a positive int, got {num_steps!r}")
    density = cached_density(model, args, observations)
    return run_mcmc(cached_kernel(density, HMCKernel, num_steps), density, key, num_samples=num_samples,
                    num_warmup=num_warmup, num_chains=num_chains, step_size=step_size, mass=mass,
                    adapt_step_size=adapt_step_size, adapt_mass=adapt_mass,
                    target_accept=target_accept, init=init, progress=progress, desc="hmc", thin=thin)
