"""Euclidean metrics (mass matrices) and the leapfrog integrator, batched over chains.

With inverse mass matrix M⁻¹ (per chain), kinetic energy K(p) = ½ pᵀM⁻¹p, momentum
p ~ N(0, M), Hamiltonian H(u, p) = −log π(u) + K(p). A metric is stored as a pair of
arrays: ``minv`` (diag: [C, D]; dense: [C, D, D]) and ``mfac`` with p = mfac·z,
z ~ N(0, I) (diag: 1/sqrt(minv); dense: the Cholesky factor of M).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

KINDS = ("identity", "diag", "dense")


@dataclass(frozen=True)
class Metric:
    """``kind`` ∈ {"identity", "diag", "dense"}; identity is stored as a diagonal of
    ones (``minv`` = ``mfac`` = 1), and kernels that know the kind skip multiplying by it."""

    kind: str
    minv: mx.array
    mfac: mx.array

    @property
    def dense(self) -> bool:
        return self.kind == "dense"


def identity_metric(num_chains: int, dim: int, kind: str = "diag") -> Metric:
    if kind not in KINDS:
        raise ValueError(f"mass matrix kind must be one of {KINDS}, got {kind!r}")
    if kind == "dense":
        eye = mx.broadcast_to(mx.eye(dim), (num_chains, dim, dim))
        return Metric("dense", eye, eye)
    ones = mx.ones((num_chains, dim))
    return Metric(kind, ones, ones)


def metric_from_inverse(minv, num_chains: int, dim: int) -> Metric:
    """A metric from a user-given inverse mass matrix: [D] / [C, D] (diag) or
    [D, D] / [C, D, D] (dense)."""
    a = np.asarray(minv, dtype=np.float64)
    if a.ndim in (1, 2) and a.shape[-1] == dim and (a.ndim == 1 or a.shape[0] == num_chains and a.shape != (dim, dim)):
        a = np.broadcast_to(a, (num_chains, dim))
        if np.any(a <= 0):
            raise ValueError("mass: a diagonal inverse mass matrix must be positive")
        return Metric("diag", mx.array(a, dtype=mx.float32), mx.array(1 / np.sqrt(a), dtype=mx.float32))
    if a.shape[-2:] == (dim, dim):
        a = np.broadcast_to(a, (num_chains, dim, dim))
        return dense_metric(a)
    raise ValueError(f"mass: expected an inverse mass matrix of shape ({dim},) or ({dim}, {dim}) "
                     f"(optionally with a leading chain axis {num_chains}), got {a.shape}")


def dense_metric(minv: np.ndarray) -> Metric:
    try:
        mass = np.linalg.inv(minv)
        fac = np.linalg.cholesky(0.5 * (mass + np.swapaxes(mass, -1, -2)))
    except np.linalg.LinAlgError:
        raise ValueError("mass: the dense inverse mass matrix must be symmetric positive definite") from None
    return Metric("dense", mx.array(minv, dtype=mx.float32), mx.array(fac, dtype=mx.float32))


def velocity(p: mx.array, minv: mx.array, dense: bool) -> mx.array:
    """M⁻¹p for p [..., C, D] (broadcast over leading axes); dense: one batched
    matrix-vector product (one kernel, where a broadcast product and a sum are two)."""
    if dense:
        return (minv @ p[..., None])[..., 0]
    return minv * p


def kinetic(p, minv, dense: bool, keepdims: bool = False):
    """K = ½ p·M⁻¹p per chain ([C]; ``keepdims``: a column [C, 1])."""
    return 0.5 * mx.sum(p * velocity(p, minv, dense), axis=-1, keepdims=keepdims)


def sample_momentum(key, mfac, dense: bool, shape):
    z = mx.random.normal(shape, key=key)
    if dense:
        return (mfac @ z[..., None])[..., 0]
    return mfac * z


def leapfrog(vg, u, p, g, eps, minv, dense: bool):
    """One leapfrog step of size ``eps`` [C, 1] (negative: backwards in time):
    p½ = p + ε/2·∇, u' = u + ε·M⁻¹p½, p' = p½ + ε/2·∇'. ``vg(u) → (log π, ∇ log π)``
    with NaN log densities already mapped to −inf (as every density here does)."""
    return leapfrog_half(vg, u, p, g, eps, minv, dense)[:4]


def leapfrog_half(vg, u, p, g, eps, minv, dense: bool):
    """:func:`leapfrog`, also returning the half-step momentum p½ (p' = p½ + ∇'·(ε/2)):
    a compiled integrator that keeps p½ rather than p' fuses each p' into the next
    step's half-step (p' consumed elsewhere is one more kernel per step)."""
    p = p + 0.5 * eps * g
    u = u + eps * velocity(p, minv, dense)
    lp, g1 = vg(u)
    # the same product written in the other operand order, so that compile does not merge
    # it with the next step's first half-step (a shared ε/2·∇ node would be one more
    # kernel; each half-step fuses into its own consumer instead): identical values
    return u, p + g1 * (eps * 0.5), g1, lp, p


def leapfrog_blocks(vgb, u: list, p: list, g: list, eps: list, minv: list | None):
    """:func:`leapfrog` with a diagonal metric on a position split into blocks of
    columns (lists of arrays [C, …]; ``eps`` and ``minv`` split alike, ε [C, 1, …];
    ``minv`` None: the identity metric, M⁻¹p = p). ``vgb(u) → (log π, ∇ log π as
    blocks)``. The same arithmetic per element as :func:`leapfrog` on the joined arrays,
    without slicing U or concatenating ∇ per step."""
    p = [pi + 0.5 * e * gi for pi, e, gi in zip(p, eps, g)]
    if minv is None:
        u = [ui + e * pi for ui, e, pi in zip(u, eps, p)]
    else:
        u = [ui + e * (m * pi) for ui, e, m, pi in zip(u, eps, minv, p)]
    lp, g = vgb(u)
    p = [pi + 0.5 * e * gi for pi, e, gi in zip(p, eps, g)]
    return u, p, g, lp


def kinetic_blocks(p: list, minv: list | None) -> mx.array:
    """K = ½ Σ_blocks Σ_elements p·M⁻¹p per chain for a diagonal metric given as blocks
    (``minv`` None: the identity); blocks [C, …], result [C]. Summed per chain with kept
    dims (a column block [C, 1] needs no reduction), reshaped to [C] once."""
    tot = None
    for i, pi in enumerate(p):
        q = pi * pi if minv is None else pi * (minv[i] * pi)
        one_each = q.ndim == 1 or q.shape[1:] == (1,) * (q.ndim - 1)
        t = q if one_each else mx.sum(q, axis=tuple(range(1, q.ndim)), keepdims=True)
        t = t if t.shape[1:] == (1,) else t.reshape(t.shape[0], 1)  # a column [C, 1]
        tot = t if tot is None else tot + t
    return 0.5 * tot.reshape(tot.shape[0])
