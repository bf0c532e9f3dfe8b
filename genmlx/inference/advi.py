"""Automatic differentiation variational inference (Kucukelbir et al. 2017) on the
unconstrained space of a model's latents.

q(u) = N(m, LLᵀ) on R^D with L = diag(exp ω) (mean-field) or L lower-triangular with
positive diagonal exp(ω) (full-rank). Maximises

    ELBO(m, L) = E_{ε~N(0,I)}[log π(m + Lε)] + Σ_i log L_ii + D/2·(1 + log 2π)

by stochastic gradient ascent (reparameterized gradients, ``num_particles`` draws of ε
per step, Adam). One optimisation step is one ``mx.compile``d function. The returned
parameters are the average of the iterates over the last ``average_fraction`` of the
steps (Polyak–Ruppert averaging), which removes most of the gradient noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.indexing import row
from genmlx.inference.unconstrained import UnconstrainedDensity, path_key

FAMILIES = ("meanfield", "fullrank")


@dataclass
class ADVIResult:
    """The fitted Gaussian q on the unconstrained space: ``mean`` [D],
    ``scale_tril`` [D, D] (diagonal for mean-field), ``elbo`` (per-step estimates)."""

    family: str
    mean: mx.array
    scale_tril: mx.array
    elbo: np.ndarray
    density: UnconstrainedDensity = field(repr=False)

    @property
    def covariance(self) -> mx.array:
        """Covariance LLᵀ of q in unconstrained space."""
        return self.scale_tril @ self.scale_tril.T

    def sample_unconstrained(self, key: mx.array, n: int) -> mx.array:
        """n draws u ~ q, [n, D]."""
        eps = mx.random.normal((n, self.mean.shape[0]), key=key)
        return self.mean + eps @ self.scale_tril.T

    def sample(self, key: mx.array, n: int) -> dict:
        """n draws of the latents in constrained space: ``{addr: [n, *value_shape]}``."""
        vals = self.density.constrain(self.sample_unconstrained(key, n))
        return {path_key(p): v for p, v in vals.items()}

    def sample_choicemaps(self, key: mx.array, n: int) -> list[ChoiceMap]:
        """n draws as choice maps (one per draw) of the latent addresses."""
        s = self.density.constrain(self.sample_unconstrained(key, n))
        out = []
        for i in range(n):
            cm = ChoiceMap.empty()
            for p, v in s.items():
                cm = cm.set_submap(p, ChoiceMap.leaf(v[i]))
            out.append(cm)
        return out

    def log_q(self, u: mx.array) -> mx.array:
        """log q(u) for u [..., D] (unconstrained space)."""
        d = self.mean.shape[0]
        diff = (u - self.mean).reshape(-1, d).T
        z = mx.linalg.solve_triangular(self.scale_tril, diff, upper=False, stream=mx.cpu).T
        logdet = mx.sum(mx.log(mx.diagonal(self.scale_tril)))
        lq = -0.5 * mx.sum(z * z, -1) - logdet - 0.5 * d * math.log(2 * math.pi)
        return lq.reshape(u.shape[:-1])


def _scale_tril(params, fullrank: bool):
    diag = mx.exp(params["omega"])
    if fullrank:
        return mx.tril(params["off"], k=-1) + mx.diag(diag)
    return mx.diag(diag)


def advi(key: mx.array, model, args: tuple, observations, family: str = "meanfield",
         num_steps: int = 5000, num_particles: int = 8, learning_rate: float = 0.01,
         average_fraction: float = 0.5, init=None, progress: bool = True) -> ADVIResult:
    """Fit a Gaussian on the unconstrained latents of ``model(*args)`` given
    ``observations`` by maximising the ELBO; ``family`` is "meanfield" or "fullrank".
    Returns an :class:`ADVIResult` (``.sample(key, n)`` gives constrained draws per
    address)."""
    if family not in FAMILIES:
        raise ValueError(f"advi: family must be one of {FAMILIES}, got {family!r}")
    for name, v in (("num_steps", num_steps), ("num_particles", num_particles)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"advi: {name} must be a positive int, got {v!r}")
    if not 0.0 < average_fraction <= 1.0:
        raise ValueError(f"advi: average_fraction must be in (0, 1], got {average_fraction}")
    density = UnconstrainedDensity(model, args, observations)
    d = density.dim
    fullrank = family == "fullrank"
    m0 = mx.zeros((d,)) if init is None else mx.array(init, dtype=mx.float32).reshape(d)
    params = {"mean": m0, "omega": mx.full((d,), -1.0)}
    if fullrank:
        params["off"] = mx.zeros((d, d))
    const = 0.5 * d * (1.0 + math.log(2 * math.pi))

    def neg_elbo(p, eps):
        L = _scale_tril(p, fullrank)
        u = p["mean"] + eps @ L.T
        lp = density.batched_log_density(u)
        return -(mx.mean(lp) + mx.sum(p["omega"]) + const)

    vg = mx.value_and_grad(neg_elbo)
    b1, b2, adam_eps = 0.9, 0.999, 1e-8

    def step(p, m1, m2, t, key):
        eps = mx.random.normal((num_particles, d), key=key)
        loss, g = vg(p, eps)
        new_p, new_m1, new_m2 = {}, {}, {}
        for k in p:
            gk = mx.where(mx.isfinite(g[k]), g[k], 0.0)
            new_m1[k] = b1 * m1[k] + (1 - b1) * gk
            new_m2[k] = b2 * m2[k] + (1 - b2) * gk * gk
            mh = new_m1[k] / (1 - b1**t)
            vh = new_m2[k] / (1 - b2**t)
            new_p[k] = p[k] - learning_rate * mh / (mx.sqrt(vh) + adam_eps)
        return new_p, new_m1, new_m2, -loss

    cstep = mx.compile(step)
    m1 = {k: mx.zeros_like(v) for k, v in params.items()}
    m2 = {k: mx.zeros_like(v) for k, v in params.items()}
    start_avg = int(num_steps * (1 - average_fraction))
    avg = None
    elbos = []
    keys = mx.random.split(key, num_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="advi", leave=False)
    for i in range(num_steps):
        params, m1, m2, elbo = cstep(params, m1, m2, mx.array(float(i + 1)), row(keys, i))
        if i >= start_avg:
            L = _scale_tril(params, fullrank)
            cur = (params["mean"], L)
            avg = cur if avg is None else tuple(a + c for a, c in zip(avg, cur))
        elbos.append(elbo)
        mx.eval(params, m1, m2, avg)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    n_avg = num_steps - start_avg
    mean, L = avg[0] / n_avg, avg[1] / n_avg
    return ADVIResult(family, mean, L, np.array(mx.stack(elbos)), density)
