"""Metropolis-adjusted Langevin (MALA), batched over chains.

Proposal u' ~ N(u + ε²/2 · M⁻¹∇log π(u), ε² M⁻¹), accepted with probability
min(1, π(u') q(u | u') / (π(u) q(u' | u))). This is exactly one leapfrog step of HMC
with fresh momentum p ~ N(0, M) (u' = u + ε M⁻¹(p + ε/2 ∇)), and the HMC acceptance
exp(H(u, p) − H(u', p')) equals the MALA ratio, so the kernel is the one-step
:class:`~genmlx.inference.hmc.HMCKernel` (one compiled call per transition).
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.inference.hmc import HMCKernel, hmc_kernel
from genmlx.inference.unconstrained import UnconstrainedDensity


def mala_kernel(density: UnconstrainedDensity, step_size, inverse_mass=None):
    """A transition ``step(key, U) -> (U, accepted)`` on positions U [C, D] (fixed ε)."""
    return hmc_kernel(density, step_size, num_steps=1, inverse_mass=inverse_mass)


def mala(key: mx.array, model, args: tuple, observations, num_samples: int = 1000,
         num_warmup: int = 1000, num_chains: int = 4, step_size: float | None = None,
         mass: str | object = "diag", adapt_step_size: bool = True, adapt_mass: bool | None = None,
         target_accept: float = 0.57, init=None, progress: bool = True, thin: int = 1):
    """MALA over the unconstrained latents; warm-up adapts ε by dual averaging toward
    ``target_accept`` (0.574 is optimal for MALA) and the metric in Stan's windows.
    Returns an :class:`~genmlx.inference.mcmc.MCMCResult`."""
    from genmlx.inference.flat_density import cached_density, cached_kernel
    from genmlx.inference.mcmc import run_mcmc

    density = cached_density(model, args, observations)
    return run_mcmc(cached_kernel(density, HMCKernel, 1), density, key, num_samples=num_samples,
                    num_warmup=num_warmup, num_chains=num_chains, step_size=step_size, mass=mass,
                    adapt_step_size=adapt_step_size, adapt_mass=adapt_mass,
                    target_accept=target_accept, init=init, progress=progress, desc="mala", thin=thin)
