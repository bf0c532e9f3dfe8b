"""Distributions built on the vectorized gamma sampler (Marsaglia–Tsang with implicit
reparameterization gradients, see :mod:`genmlx.distributions._gamma`): gamma,
inv_gamma, beta, dirichlet, student_t. All are reparameterized, including in their
shape parameters (implicit gradients)."""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.distributions import constraints as C
from genmlx.distributions._gamma import standard_gamma
from genmlx.distributions._util import batch_shape, check
from genmlx.distributions.base import Distribution, param, sum_broadcast
from genmlx.distributions.special import lgamma, log_beta

_LOG_PI = math.log(math.pi)


def _log_or_ninf(x):
    """(mask x > 0, log x with a safe placeholder elsewhere)."""
    pos = x > 0
    return pos, mx.log(mx.where(pos, x, 1.0))


class Gamma(Distribution):
    """Gamma with SHAPE α and RATE β (mean α/β, variance α/β²):
    log p(x) = α log β + (α − 1) log x − βx − log Γ(α), x > 0.

    ``gamma(shape, rate=1.0)``; ``gamma(shape, scale=θ)`` is rate 1/θ.
    x = G/β with G ~ Gamma(α, 1) (implicit gradient in α, pathwise in β).
    """

    name = "gamma"
    arg_constraints = {"shape": C.positive, "rate": C.positive}
    reparameterized = True

    def __init__(self, shape, rate=None, *, scale=None):
        if rate is not None and scale is not None:
            raise ValueError("gamma: give at most one of 'rate' and 'scale'")
        self.alpha = param(shape)
        if scale is not None:
            self.rate = 1.0 / param(scale)
            ps = {"shape": self.alpha, "scale": param(scale)}
            self.arg_constraints = {"shape": C.positive, "scale": C.positive}
        else:
            self.rate = param(1.0 if rate is None else rate)
            ps = {"shape": self.alpha, "rate": self.rate}
        self._init(ps, batch_shape(self.name, ps))

    @property
    def support(self):
        return C.positive

    def _sample(self, key, shape):
        return standard_gamma(key, self.alpha, shape) / self.rate

    def _log_prob(self, x):
        pos, lx = _log_or_ninf(x)
        a, b = self.alpha, self.rate
        lp = a * mx.log(b) + (a - 1.0) * lx - b * x - lgamma(a)
        return mx.where(pos, lp, -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.alpha / self.rate, self.shape)

    def variance(self):
        return mx.broadcast_to(self.alpha / self.rate**2, self.shape)


class InvGamma(Distribution):
    """Inverse gamma with shape α and SCALE β (1/x ~ Gamma(α, rate β)):
    log p(x) = α log β − log Γ(α) − (α + 1) log x − β/x, x > 0. x = β/G."""

    name = "inv_gamma"
    arg_constraints = {"shape": C.positive, "scale": C.positive}
    reparameterized = True

    def __init__(self, shape, scale=1.0):
        self.alpha, self.scale = param(shape), param(scale)
        ps = {"shape": self.alpha, "scale": self.scale}
        self._init(ps, batch_shape(self.name, ps))

    @property
    def support(self):
        return C.positive

    def _sample(self, key, shape):
        return self.scale / standard_gamma(key, self.alpha, shape)

    def _log_prob(self, x):
        pos, lx = _log_or_ninf(x)
        a, b = self.alpha, self.scale
        xs = mx.where(pos, x, 1.0)
        lp = a * mx.log(b) - lgamma(a) - (a + 1.0) * lx - b / xs
        return mx.where(pos, lp, -mx.inf)

    def mean(self):
        return mx.broadcast_to(mx.where(self.alpha > 1, self.scale / (self.alpha - 1), mx.inf), self.shape)


class Beta(Distribution):
    """Beta(α, β): log p(x) = (α − 1) log x + (β − 1) log(1 − x) − log B(α, β) on (0, 1).
    x = G₁/(G₁ + G₂), Gᵢ ~ Gamma(·, 1) (implicit gradients)."""

    name = "beta"
    arg_constraints = {"alpha": C.positive, "beta": C.positive}
    reparameterized = True

    def __init__(self, alpha, beta):
        self.alpha, self.beta = param(alpha), param(beta)
        ps = {"alpha": self.alpha, "beta": self.beta}
        self._init(ps, batch_shape(self.name, ps))

    @property
    def support(self):
        return C.unit_interval

    def _sample(self, key, shape):
        k1, k2 = mx.random.split(key)
        g1 = standard_gamma(k1, self.alpha, shape)
        g2 = standard_gamma(k2, self.beta, shape)
        return g1 / (g1 + g2)

    def _log_prob(self, x):
        inside = (x > 0) & (x < 1)
        xs = mx.where(inside, x, 0.5)
        lp = (self.alpha - 1.0) * mx.log(xs) + (self.beta - 1.0) * mx.log1p(-xs)
        lp = lp - log_beta(self.alpha, self.beta)
        return mx.where(inside, lp, -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.alpha / (self.alpha + self.beta), self.shape)

    def variance(self):
        s = self.alpha + self.beta
        return mx.broadcast_to(self.alpha * self.beta / (s * s * (s + 1)), self.shape)


class Dirichlet(Distribution):
    """Dirichlet(α) on the simplex (event shape (K,)):
    log p(x) = Σ (αₖ − 1) log xₖ + log Γ(Σαₖ) − Σ log Γ(αₖ). x = G/ΣG, Gₖ ~ Gamma(αₖ, 1)."""

    name = "dirichlet"
    arg_constraints = {"alpha": C.positive}
    reparameterized = True
    event_ndim = 1

    def __init__(self, alpha):
        self.alpha = param(alpha)
        if self.alpha.ndim < 1 or self.alpha.shape[-1] < 2:
            raise ValueError(
                f"dirichlet: parameter 'alpha' must have a last axis of length ≥ 2, got shape {tuple(self.alpha.shape)}"
            )
        ps = {"alpha": self.alpha}
        self._init(ps, tuple(self.alpha.shape[:-1]), (self.alpha.shape[-1],))

    @property
    def support(self):
        return C.simplex

    def _sample(self, key, shape):
        g = standard_gamma(key, self.alpha, shape)
        return g / mx.sum(g, axis=-1, keepdims=True)

    def _log_prob(self, x):
        a = self.alpha
        pos = mx.all(x > 0, axis=-1)
        lx = mx.log(mx.where(x > 0, x, 1.0))
        lp = mx.sum((a - 1.0) * lx, axis=-1) + lgamma(mx.sum(a, axis=-1)) - mx.sum(lgamma(a), axis=-1)
        return mx.where(pos, lp, -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.alpha / mx.sum(self.alpha, axis=-1, keepdims=True), self.shape)


class StudentT(Distribution):
    """Student's t with ``df`` ν, ``loc`` μ, ``scale`` σ:
    log p(x) = log Γ((ν+1)/2) − log Γ(ν/2) − ½ log(νπ) − log σ − (ν+1)/2 · log(1 + t²/ν),
    t = (x − μ)/σ. x = μ + σ ε/√(V/ν), V = 2G ~ χ²_ν, G ~ Gamma(ν/2, 1)
    (pathwise in μ, σ; implicit in ν)."""

    name = "student_t"
    arg_constraints = {"df": C.positive, "loc": C.real, "scale": C.positive}
    reparameterized = True

    def __init__(self, df, loc=0.0, scale=1.0, *, shape=None):
        self.df, self.loc, self.scale = param(df), param(loc), param(scale)
        ps = {"df": self.df, "loc": self.loc, "scale": self.scale}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.real

    def _sample(self, key, shape):
        kz, kg = mx.random.split(key)
        z = mx.random.normal(shape=shape, key=kz)
        v = 2.0 * standard_gamma(kg, 0.5 * self.df, shape)
        return self.loc + self.scale * z * mx.rsqrt(v / self.df)

    def _log_prob(self, x):
        nu = self.df
        t = (x - self.loc) / self.scale
        return (
            lgamma(0.5 * (nu + 1.0)) - lgamma(0.5 * nu) - 0.5 * (mx.log(nu) + _LOG_PI)
            - mx.log(self.scale) - 0.5 * (nu + 1.0) * mx.log1p(t * t / nu)
        )

    def _score(self, x):
        """Σ log p(x) = −Σ ½(ν + 1) log(1 + t²/ν) + Σ_bcast c(ν, scale), t = (loc − x)/scale,
        c = log Γ((ν+1)/2) − log Γ(ν/2) − ½ log(νπ) − log scale."""
        nu = self.df
        t = (self.loc - x) / self.scale
        e = 0.5 * (nu + 1.0) * mx.log1p(t * t / nu)
        c = lgamma(0.5 * (nu + 1.0)) - lgamma(0.5 * nu) - 0.5 * (mx.log(nu) + _LOG_PI) - mx.log(self.scale)
        return -mx.sum(e) + sum_broadcast(c, e.shape)

    def mean(self):
        return mx.broadcast_to(mx.where(self.df > 1, self.loc, mx.nan), self.shape)

    def variance(self):
        v = self.scale**2 * self.df / (self.df - 2.0)
        return mx.broadcast_to(mx.where(self.df > 2, v, mx.inf), self.shape)


gamma = Gamma
inv_gamma = InvGamma
beta = Beta
dirichlet = Dirichlet
student_t = StudentT
