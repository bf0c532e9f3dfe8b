"""The multivariate normal, with a differentiable Cholesky factorisation and
triangular solve written in MLX ops (MLX's ``linalg.cholesky``/``solve_triangular``
have no VJP). Both loop over the K rows in Python (K static), each step vectorized over
all batch dimensions, so they work under ``mx.grad``, ``mx.vmap`` and ``mx.compile``."""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.core.validation import concrete_all
from genmlx.distributions import constraints as C
from genmlx.distributions._util import batch_shape
from genmlx.distributions.base import Distribution, param

_LOG_2PI = math.log(2 * math.pi)
#: contractions over at most this many entries are written as additions of slices (one
#: fused elementwise kernel under mx.compile) rather than a product and a Sum: vmapped over
#: many particles a Sum is MLX's reduction of many short rows, ~30x slower than an
#: elementwise pass on an H200 (see genmlx.core.batchwise.UNROLL_MAX)
SHORT = 8


def dot_last(a: mx.array, b: mx.array) -> mx.array:
    """Σ_j a[..., j] b[..., j] over the (broadcast) last axis."""
    k = max(a.shape[-1], b.shape[-1])
    if k > SHORT:
        return mx.sum(a * b, axis=-1)
    pa, pb = a.shape[-1] > 1, b.shape[-1] > 1
    total = a[..., 0] * b[..., 0]
    for j in range(1, k):
        total = total + a[..., j if pa else 0] * b[..., j if pb else 0]
    return total


def cholesky(a: mx.array) -> mx.array:
    """Lower Cholesky factor L (L Lᵀ = a) over the last two axes, differentiable.
    Column j: L[j:, j] = (a[j:, j] − L[j:, :j] L[j, :j]) / √(…)ⱼ. Not positive
    definite → nan entries."""
    k = a.shape[-1]
    cols = []
    for j in range(k):
        s = a[..., :, j]
        if cols:
            lprev = mx.stack(cols, axis=-1)  # [..., K, j]
            s = s - dot_last(lprev, lprev[..., j : j + 1, :])
        d = mx.sqrt(s[..., j : j + 1])
        mask = (mx.arange(k) >= j).astype(a.dtype)
        cols.append(mx.where(mask > 0, s / d, 0.0))
    return mx.stack(cols, axis=-1)


def solve_lower(l: mx.array, b: mx.array) -> mx.array:
    """y with L y = b by forward substitution (b: [..., K]; batch axes broadcast)."""
    k = l.shape[-1]
    ys = []
    for i in range(k):
        r = b[..., i]
        if ys:
            y = mx.stack(ys, axis=-1)
            r = r - dot_last(l[..., i, :i], y)
        ys.append(r / l[..., i, i])
    return mx.stack(ys, axis=-1)


class MvNormal(Distribution):
    """N(mean, Σ) on R^K (event shape (K,)), Σ = L Lᵀ given as ``cov`` or ``scale_tril`` L:
    log p(x) = −½‖L⁻¹(x − μ)‖² − Σᵢ log Lᵢᵢ − (K/2) log 2π. x = μ + L ε (reparameterized).
    """

    name = "mv_normal"
    arg_constraints = {"mean": C.real_vector}
    reparameterized = True
    event_ndim = 1

    def __init__(self, mean, cov=None, *, scale_tril=None):
        if (cov is None) == (scale_tril is None):
            raise ValueError("mv_normal: give exactly one of 'cov' and 'scale_tril'")
        self.mean_ = param(mean)
        if self.mean_.ndim < 1:
            raise ValueError("mv_normal: parameter 'mean' must be a vector (last axis = dimension)")
        k = self.mean_.shape[-1]
        pname = "cov" if cov is not None else "scale_tril"
        mat = param(cov if cov is not None else scale_tril)
        if mat.ndim < 2 or mat.shape[-1] != k or mat.shape[-2] != k:
            raise ValueError(
                f"mv_normal: parameter '{pname}' must have shape [..., {k}, {k}] to match 'mean' "
                f"of length {k}, got {tuple(mat.shape)}"
            )
        if cov is not None:
            self.cov = mat
            self.scale_tril = cholesky(mat)
        else:
            self.scale_tril = mat
            self.cov = None
        ps = {"mean": self.mean_, pname: mat}
        self._pname = pname
        self._init(ps, batch_shape(self.name, ps, None, {"mean": 1, pname: 2}), (k,))

    def _validate(self):
        super()._validate()
        l = self.scale_tril
        diag = mx.diagonal(l, axis1=-2, axis2=-1)
        if self._pname == "cov":
            sym = mx.abs(self.cov - mx.swapaxes(self.cov, -1, -2)) <= 1e-5 * (1 + mx.abs(self.cov))
            if concrete_all(sym) is False:
                raise ValueError("mv_normal: parameter 'cov' must be symmetric")
            if concrete_all(diag > 0) is False:  # nan diagonal: factorisation failed
                raise ValueError("mv_normal: parameter 'cov' must be positive definite")
        else:
            ok = (diag > 0) & mx.all(mx.triu(l, k=1) == 0, axis=(-2, -1))[..., None]
            if concrete_all(ok) is False:
                raise ValueError(
                    "mv_normal: parameter 'scale_tril' must be lower triangular with a positive diagonal"
                )

    @property
    def support(self):
        return C.real_vector

    def _sample(self, key, shape):
        eps = mx.random.normal(shape=shape, key=key)
        return self.mean_ + dot_last(self.scale_tril, mx.expand_dims(eps, -2))

    def _log_prob(self, x):
        l = self.scale_tril
        k = l.shape[-1]
        y = solve_lower(l, x - self.mean_)
        if k <= SHORT:  # the diagonal as K slices (mx.diagonal is a gather)
            half_logdet = mx.log(l[..., 0, 0])
            for i in range(1, k):
                half_logdet = half_logdet + mx.log(l[..., i, i])
        else:
            half_logdet = mx.sum(mx.log(mx.diagonal(l, axis1=-2, axis2=-1)), axis=-1)
        return -0.5 * dot_last(y, y) - half_logdet - 0.5 * k * _LOG_2PI

    def mean(self):
        return mx.broadcast_to(self.mean_, self.shape)

    def covariance(self):
        l = self.scale_tril
        return l @ mx.swapaxes(l, -1, -2)


mv_normal = MvNormal
