"""Univariate continuous distributions with reparameterized (pathwise) sampling.

Every constructor takes an optional keyword ``shape=`` that broadcasts the batch shape
(``normal(0, 1, shape=(3,))`` is three independent standard normals at one address).
"""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.core.batchwise import batchwise, example_sum
from genmlx.distributions import constraints as C
from genmlx.distributions._util import batch_shape, check, is_infinite, open_uniform, bounded_support
from genmlx.distributions.base import Distribution, is_static, param, static_log, sum_broadcast
from genmlx.distributions.special import (
    HALF_LOG_2PI,
    LOG_2,
    log_ndtr,
    log_normal_pdf_std,
    ndtri_log,
)

_LOG_PI = math.log(math.pi)


class Normal(Distribution):
    """N(mu, sigma²): log p(x) = −½((x − μ)/σ)² − log σ − ½ log 2π. x = μ + σ ε."""

    name = "normal"
    arg_constraints = {"mu": C.real, "sigma": C.positive}
    reparameterized = True

    def __init__(self, mu=0.0, sigma=1.0, *, shape=None):
        self.mu, self.sigma = param(mu), param(sigma)
        # statically standard location/scale (Python 0 / 1): x = μ + σε skips the no-op terms;
        # a positive Python σ gives the normaliser as a Python number (no graph nodes)
        self._zero_mu, self._unit_sigma = is_static(mu, 0.0), is_static(sigma, 1.0)
        self._log_norm = static_log(sigma, HALF_LOG_2PI)
        ps = {"mu": self.mu, "sigma": self.sigma}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.real

    _noise_kind = "normal"

    def _sample(self, key, shape):
        return self._from_noise(mx.random.normal(shape=shape, key=key))

    def _from_noise(self, eps):
        x = eps if self._unit_sigma else self.sigma * eps
        return x if self._zero_mu else self.mu + x

    def _log_prob(self, x):
        # (μ − x) rather than (x − μ): under mx.vmap a batched μ on the left keeps the
        # particle axis leading, avoiding a transpose of [n, data] intermediates.
        z = (self.mu - x) / self.sigma
        return -0.5 * z * z - mx.log(self.sigma) - HALF_LOG_2PI

    def _score(self, x):
        """Σ log p(x) = −½ Σ z² − Σ_bcast (log σ + ½ log 2π), z = (μ − x)/σ: only z² is
        computed per element; the factor −½ and the normaliser are applied once."""
        return self._score_of(x, self._zero_mu, self._unit_sigma)

    def _noise_score(self, eps, value):
        """At x = μ + σε, z² = ε²: −½ Σ ε² − Σ_bcast (log σ + ½ log 2π). Along the path the
        total derivative is the value-based score's (∂/∂μ = 0, ∂/∂σ = −1/σ per element),
        and the backward pass needs no (μ − x)/σ (fewer kernels in ELBO/IWAE steps)."""
        return self._score_of(eps, True, True)

    def _score_of(self, v, zero_mu: bool, unit_sigma: bool):
        """Σ log p with z = v (``zero_mu``, ``unit_sigma``: the noise) or z = (μ − v)/σ.
        A Python σ or a σ per element: one :func:`_normal_score` (under genmlx's vmap
        computed on the batched arrays); otherwise Σ_bcast of the normaliser apart."""
        shape = tuple(v.shape)
        if not zero_mu:
            shape = tuple(mx.broadcast_shapes(shape, self.mu.shape))
        if not unit_sigma:
            shape = tuple(mx.broadcast_shapes(shape, self.sigma.shape))
        if self._log_norm is not None:
            size = math.prod(mx.broadcast_shapes(shape, self.shape))
            static = (zero_mu, unit_sigma, False, self._log_norm * size)
        elif tuple(self.sigma.shape) == shape:
            static = (zero_mu, unit_sigma, True, HALF_LOG_2PI * math.prod(shape))
        else:
            d = v if zero_mu else self.mu - v
            z = d if unit_sigma else d / self.sigma
            zz = z * z
            return mx.sum(-0.5 * zz) - sum_broadcast(mx.log(self.sigma) + HALF_LOG_2PI, zz.shape)
        params = ([] if zero_mu else [self.mu]) + ([self.sigma] if static[2] or not unit_sigma else [])
        return _normal_score(static, v, *params)

    def mean(self):
        return mx.broadcast_to(self.mu, self.shape)

    def variance(self):
        return mx.broadcast_to(self.sigma**2, self.shape)


@batchwise
def _normal_score(batch, static, v, *params):
    """Σ (−½ z² [− log σ]) − c per example, z = v, v/σ, μ − v or (μ − v)/σ (the sign is
    squared away); ``static`` = (zero μ, unit σ, σ per element, c); ``params`` are the
    μ and σ used (only those: every input must reach the result). −½ is applied per
    element, inside the sum: it then fuses with z² (forward) and with the consumer of
    the broadcast cotangent (backward) instead of being a kernel of its own; with σ per
    element Σ (−½ z² − log σ) is ONE reduction of one fused elementwise kernel."""
    zero_mu, unit_sigma, per_element, const = static
    mu = None if zero_mu else params[0]
    sigma = params[-1] if per_element or not unit_sigma else None
    d = v if zero_mu else mu - v
    z = d if unit_sigma else d / sigma
    zz = z * z
    terms = -0.5 * zz - mx.log(sigma) if per_element else -0.5 * zz
    return example_sum(terms, batch) - const


class Uniform(Distribution):
    """U(low, high): log p(x) = −log(high − low) on [low, high]. x = low + (high − low)u.
    Bounds may depend on other choices (support interval(low, high))."""

    name = "uniform"
    arg_constraints = {"low": C.real, "high": C.real}
    reparameterized = True

    def __init__(self, low=0.0, high=1.0, *, shape=None):
        self.low, self.high = param(low), param(high)
        ps = {"low": self.low, "high": self.high}
        self._init(ps, batch_shape(self.name, ps, shape))

    def _validate(self):
        super()._validate()
        check(self.name, self.low < self.high, "parameter 'high' must exceed 'low'")

    @property
    def support(self):
        return C.interval(self.low, self.high)

    _noise_kind = "uniform"

    def _sample(self, key, shape):
        return self._from_noise(mx.random.uniform(shape=shape, key=key))

    def _from_noise(self, u):
        return self.low + (self.high - self.low) * u

    def _log_prob(self, x):
        # logical_and: MLX 0.32's vmap of `&` with one batched operand mis-shapes
        inside = mx.logical_and(x >= self.low, x <= self.high)
        return mx.where(inside, -mx.log(self.high - self.low), -mx.inf)

    def mean(self):
        return mx.broadcast_to((self.low + self.high) / 2, self.shape)

    def variance(self):
        return mx.broadcast_to((self.high - self.low) ** 2 / 12, self.shape)


class Exponential(Distribution):
    """Exponential with ``rate`` λ: log p(x) = log λ − λx on x ≥ 0. x = −log(u)/λ."""

    name = "exponential"
    arg_constraints = {"rate": C.positive}
    reparameterized = True

    def __init__(self, rate=1.0, *, shape=None):
        self.rate = param(rate)
        ps = {"rate": self.rate}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.positive

    def _sample(self, key, shape):
        return -mx.log(open_uniform(key, shape)) / self.rate

    def _log_prob(self, x):
        return mx.where(x >= 0, mx.log(self.rate) - self.rate * x, -mx.inf)

    def mean(self):
        return mx.broadcast_to(1.0 / self.rate, self.shape)

    def variance(self):
        return mx.broadcast_to(self.rate**-2, self.shape)


class Laplace(Distribution):
    """Laplace(loc, scale): log p(x) = −|x − loc|/scale − log(2 scale).
    x = loc − scale·sign(v)·log(1 − 2|v|), v ~ U(−½, ½)."""

    name = "laplace"
    arg_constraints = {"loc": C.real, "scale": C.positive}
    reparameterized = True

    def __init__(self, loc=0.0, scale=1.0, *, shape=None):
        self.loc, self.scale = param(loc), param(scale)
        ps = {"loc": self.loc, "scale": self.scale}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.real

    def _sample(self, key, shape):
        v = open_uniform(key, shape) - 0.5
        return self.loc - self.scale * mx.sign(v) * mx.log1p(-2.0 * mx.abs(v))

    def _log_prob(self, x):
        return -mx.abs(x - self.loc) / self.scale - mx.log(2.0 * self.scale)

    def _score(self, x):
        """Σ log p(x) = −Σ |loc − x|/scale − Σ_bcast log(2 scale)."""
        e = mx.abs(self.loc - x) / self.scale
        return -mx.sum(e) - sum_broadcast(mx.log(2.0 * self.scale), e.shape)

    def mean(self):
        return mx.broadcast_to(self.loc, self.shape)

    def variance(self):
        return mx.broadcast_to(2.0 * self.scale**2, self.shape)


class Cauchy(Distribution):
    """Cauchy(loc, scale): log p(x) = −log π − log scale − log(1 + ((x − loc)/scale)²).
    x = loc + scale·tan(π(u − ½))."""

    name = "cauchy"
    arg_constraints = {"loc": C.real, "scale": C.positive}
    reparameterized = True

    def __init__(self, loc=0.0, scale=1.0, *, shape=None):
        self.loc, self.scale = param(loc), param(scale)
        ps = {"loc": self.loc, "scale": self.scale}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.real

    def _sample(self, key, shape):
        u = open_uniform(key, shape)
        return self.loc + self.scale * mx.tan(math.pi * (u - 0.5))

    def _log_prob(self, x):
        z = (x - self.loc) / self.scale
        return -_LOG_PI - mx.log(self.scale) - mx.log1p(z * z)

    def _score(self, x):
        """Σ log p(x) = −Σ log(1 + z²) − Σ_bcast (log π + log scale), z = (loc − x)/scale."""
        z = (self.loc - x) / self.scale
        e = mx.log1p(z * z)
        return -mx.sum(e) - sum_broadcast(_LOG_PI + mx.log(self.scale), e.shape)


class HalfNormal(Distribution):
    """|N(0, sigma²)|: log p(x) = log 2 − ½(x/σ)² − log σ − ½ log 2π on x ≥ 0. x = σ|ε|."""

    name = "half_normal"
    arg_constraints = {"sigma": C.positive}
    reparameterized = True

    def __init__(self, sigma=1.0, *, shape=None):
        self.sigma = param(sigma)
        ps = {"sigma": self.sigma}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.positive

    def _sample(self, key, shape):
        return self.sigma * mx.abs(mx.random.normal(shape=shape, key=key))

    def _log_prob(self, x):
        z = x / self.sigma
        lp = LOG_2 - 0.5 * z * z - mx.log(self.sigma) - HALF_LOG_2PI
        return mx.where(x >= 0, lp, -mx.inf)

    def _score(self, x):
        """Σ log p(x) = −½ Σ z² + Σ_bcast (log 2 − log σ − ½ log 2π), z = x/σ (−∞ if any x < 0)."""
        z = x / self.sigma
        e = mx.where(x >= 0, z * z, mx.inf)
        return -0.5 * mx.sum(e) + sum_broadcast(LOG_2 - mx.log(self.sigma) - HALF_LOG_2PI, e.shape)

    def mean(self):
        return mx.broadcast_to(self.sigma * math.sqrt(2 / math.pi), self.shape)

    def variance(self):
        return mx.broadcast_to(self.sigma**2 * (1 - 2 / math.pi), self.shape)


class HalfCauchy(Distribution):
    """|Cauchy(0, scale)|: log p(x) = log 2 − log π − log scale − log(1 + (x/scale)²), x ≥ 0.
    x = scale·tan(πu/2)."""

    name = "half_cauchy"
    arg_constraints = {"scale": C.positive}
    reparameterized = True

    def __init__(self, scale=1.0, *, shape=None):
        self.scale = param(scale)
        ps = {"scale": self.scale}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.positive

    def _sample(self, key, shape):
        return self.scale * mx.tan(0.5 * math.pi * open_uniform(key, shape))

    def _log_prob(self, x):
        z = x / self.scale
        lp = LOG_2 - _LOG_PI - mx.log(self.scale) - mx.log1p(z * z)
        return mx.where(x >= 0, lp, -mx.inf)


class LogNormal(Distribution):
    """exp(N(mu, sigma²)): log p(x) = −log x − log σ − ½ log 2π − ½((log x − μ)/σ)², x > 0.
    x = exp(μ + σ ε)."""

    name = "log_normal"
    arg_constraints = {"mu": C.real, "sigma": C.positive}
    reparameterized = True

    def __init__(self, mu=0.0, sigma=1.0, *, shape=None):
        self.mu, self.sigma = param(mu), param(sigma)
        ps = {"mu": self.mu, "sigma": self.sigma}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.positive

    def _sample(self, key, shape):
        return mx.exp(self.mu + self.sigma * mx.random.normal(shape=shape, key=key))

    def _log_prob(self, x):
        pos = x > 0
        lx = mx.log(mx.where(pos, x, 1.0))
        z = (lx - self.mu) / self.sigma
        lp = -lx - mx.log(self.sigma) - HALF_LOG_2PI - 0.5 * z * z
        return mx.where(pos, lp, -mx.inf)

    def _score(self, x):
        """Σ log p(x) = −Σ (log x + ½ z²) − Σ_bcast (log σ + ½ log 2π), z = (μ − log x)/σ."""
        pos = x > 0
        lx = mx.log(mx.where(pos, x, 1.0))
        z = (self.mu - lx) / self.sigma
        e = mx.where(pos, lx + 0.5 * z * z, mx.inf)
        return -mx.sum(e) - sum_broadcast(mx.log(self.sigma) + HALF_LOG_2PI, e.shape)

    def mean(self):
        return mx.broadcast_to(mx.exp(self.mu + 0.5 * self.sigma**2), self.shape)

    def variance(self):
        s2 = self.sigma**2
        return mx.broadcast_to(mx.expm1(s2) * mx.exp(2 * self.mu + s2), self.shape)


_BIG = 1e3  # standardized bounds beyond ±_BIG are treated as ±∞ (Φ(−1000) = 0 in float32)


class TruncatedNormal(Distribution):
    """N(mu, sigma²) restricted to (low, high):
    log p(x) = log φ((x − μ)/σ) − log σ − log(Φ(b) − Φ(a)), a = (low − μ)/σ, b = (high − μ)/σ.

    Sampled by inversion, reparameterized: z = Φ⁻¹((1 − u)Φ(a) + uΦ(b)), x = μ + σz,
    evaluated in log space (log Φ, Φ⁻¹ of a log-probability) after reflecting the
    interval into the lower tail (a + b ≤ 0), so that it stays accurate far in either
    tail (e.g. low = 8σ). Bounds may be ±inf (give them as Python floats) or arrays
    depending on other choices; the support is real / greater_than / less_than /
    interval accordingly.
    """

    name = "truncated_normal"
    arg_constraints = {"mu": C.real, "sigma": C.positive}
    reparameterized = True

    def __init__(self, mu=0.0, sigma=1.0, low=-math.inf, high=math.inf, *, shape=None):
        self._low_inf, self._high_inf = is_infinite(low, -1.0), is_infinite(high, 1.0)
        self.mu, self.sigma = param(mu), param(sigma)
        self.low = param(-math.inf if low is None else low)
        self.high = param(math.inf if high is None else high)
        ps = {"mu": self.mu, "sigma": self.sigma, "low": self.low, "high": self.high}
        self._init(ps, batch_shape(self.name, ps, shape))

    def _validate(self):
        super()._validate()
        check(self.name, self.low < self.high, "parameter 'high' must exceed 'low'")

    @property
    def support(self):
        return bounded_support(self.low, self.high, self._low_inf, self._high_inf)

    def _std_bounds(self):
        """Standardized bounds, infinite ones replaced by ∓_BIG with finite gradients."""
        lo_inf = self.low == -mx.inf
        hi_inf = self.high == mx.inf
        a = (mx.where(lo_inf, self.mu, self.low) - self.mu) / self.sigma
        b = (mx.where(hi_inf, self.mu, self.high) - self.mu) / self.sigma
        a = mx.where(lo_inf, -_BIG, mx.clip(a, -_BIG, _BIG))
        b = mx.where(hi_inf, _BIG, mx.clip(b, -_BIG, _BIG))
        flip = (a + b) > 0
        a_r = mx.where(flip, -b, a)
        b_r = mx.where(flip, -a, b)
        return a, b, flip, log_ndtr(a_r), log_ndtr(b_r)

    def _log_z(self, lpa, lpb):
        """log(Φ(b_r) − Φ(a_r)) from the reflected log-CDFs."""
        return lpb + mx.log(-mx.expm1(lpa - lpb))

    def _sample(self, key, shape):
        a, b, flip, lpa, lpb = self._std_bounds()
        u = open_uniform(key, shape)
        lp = mx.logaddexp(mx.log1p(-u) + lpa, mx.log(u) + lpb)
        z = ndtri_log(lp)
        z = mx.where(flip, -z, z)
        z = mx.clip(z, a, b)
        return self.mu + self.sigma * z

    def _log_prob(self, x):
        _, _, _, lpa, lpb = self._std_bounds()
        z = (x - self.mu) / self.sigma
        lp = log_normal_pdf_std(z) - mx.log(self.sigma) - self._log_z(lpa, lpb)
        inside = (x >= self.low) & (x <= self.high)
        return mx.where(inside, lp, -mx.inf)


normal = Normal
uniform = Uniform
exponential = Exponential
laplace = Laplace
cauchy = Cauchy
half_normal = HalfNormal
half_cauchy = HalfCauchy
log_normal = LogNormal
lognormal = LogNormal
truncated_normal = TruncatedNormal
