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
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import mlx.core as mx

from genmlx.inference.metric import (Metric, identity_metric, kinetic, leapfrog, leapfrog_blocks,
                                     sample_momentum)
from genmlx.inference.unconstrained import UnconstrainedDensity


class ChainState(NamedTuple):
    """Positions u [C, D], log π(u) [C] and ∇ log π(u) [C, D]."""

    u: mx.array
    lp: mx.array
    grad: mx.array


class StepInfo(NamedTuple):
    accept_prob: mx.array  # [C] mean Metropolis acceptance statistic of the transition
    diverging: mx.array  # [C] bool: energy error above 1000
    num_steps: mx.array  # [C] leapfrog steps taken
    accepted: mx.array  # [C] HMC/MALA: bool, proposal accepted; NUTS: tree depth reached


def _trajectory(density: UnconstrainedDensity, num_steps: int, dense: bool, u, p, g, lp, eps, minv):
    """``num_steps`` leapfrog steps from (u, p) [C, D]. A diagonal metric integrates the
    density's blocks (one per latent for the flat density: no per-step slicing of U or
    concatenation of ∇; the same values)."""
    if dense:
        e = eps[:, None]
        for _ in range(num_steps):
            u, p, g, lp = leapfrog(density.value_and_grad, u, p, g, e, minv, dense)
        return u, p, g, lp
    split = density.split
    ub, pb, gb, mb = split(u), split(p), split(g), split(minv)
    eb = [eps.reshape(eps.shape + (1,) * (b.ndim - 1)) for b in ub]
    for _ in range(num_steps):
        ub, pb, gb, lp = leapfrog_blocks(density.value_and_grad_blocks, ub, pb, gb, eb, mb)
    return density.join(ub), density.join(pb), density.join(gb), lp


def _hmc_transition(density, num_steps: int, dense: bool, key, u, lp, g, eps, minv, mfac):
    k1, k2 = mx.random.split(key)
    p = sample_momentum(k1, mfac, dense, u.shape)
    h0 = -lp + kinetic(p, minv, dense)
    u1, p1, g1, lp1 = _trajectory(density, num_steps, dense, u, p, g, lp, eps, minv)
    h1 = -lp1 + kinetic(p1, minv, dense)
    log_alpha = h0 - h1
    log_alpha = mx.where(mx.isnan(log_alpha), -mx.inf, log_alpha)
    acc = mx.log(mx.random.uniform(shape=lp.shape, key=k2)) < log_alpha
    u = mx.where(acc[:, None], u1, u)
    g = mx.where(acc[:, None], g1, g)
    lp = mx.where(acc, lp1, lp)
    prob = mx.exp(mx.minimum(log_alpha, 0.0))
    return u, lp, g, prob, (h1 - h0) > 1000.0, acc


class HMCKernel:
    """Batched HMC transition with ``num_steps`` leapfrog steps (one compiled call)."""

    def __init__(self, density: UnconstrainedDensity, num_steps: int = 10):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"hmc: num_steps must be a positive int, got {num_steps!r}")
        self.density = density
        self.num_steps = num_steps
        self._compiled = {}
        self._steps = None

    def init(self, u: mx.array) -> ChainState:
        lp, g = self.density.value_and_grad(u)
        return ChainState(u, lp, g)

    def _fn(self, dense: bool):
        f = self._compiled.get(dense)
        if f is None:
            f = self._compiled[dense] = mx.compile(
                partial(_hmc_transition, self.density, self.num_steps, dense))
        return f

    def step(self, key, state: ChainState, eps: mx.array, metric: Metric):
        u, lp, g, prob, div, acc = self._fn(metric.dense)(key, state.u, state.lp, state.grad, eps,
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

            m = identity_metric(c, density.dim) if inverse_mass is None else metric_from_inverse(inverse_mass, c, density.dim)
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
