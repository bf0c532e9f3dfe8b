"""Univariate continuous distributions."""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.distributions import constraints as C
from genmlx.distributions.base import Distribution, param

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Normal(Distribution):
    """N(mu, sigma²): log p(x) = −½((x − μ)/σ)² − log σ − ½ log 2π. Reparameterized."""

    name = "normal"
    arg_constraints = {"mu": C.real, "sigma": C.positive}
    reparameterized = True

    def __init__(self, mu, sigma):
        self.mu, self.sigma = param(mu), param(sigma)
        self._init({"mu": self.mu, "sigma": self.sigma})

    @property
    def support(self):
        return C.real

    def _sample(self, key, shape):
        return self.mu + self.sigma * mx.random.normal(shape=shape, key=key)

    def _log_prob(self, x):
        z = (x - self.mu) / self.sigma
        return -0.5 * z * z - mx.log(self.sigma) - _HALF_LOG_2PI

    def mean(self):
        return mx.broadcast_to(self.mu, self.shape)

    def variance(self):
        return mx.broadcast_to(self.sigma**2, self.shape)


class Uniform(Distribution):
    """U(low, high): log p(x) = −log(high − low) on (low, high). Reparameterized;
    bounds may depend on other choices."""

    name = "uniform"
    arg_constraints = {"low": C.real, "high": C.real}
    reparameterized = True

    def __init__(self, low, high):
        self.low, self.high = param(low), param(high)
        self._init({"low": self.low, "high": self.high})

    def _validate(self):
        super()._validate()
        from genmlx.core.validation import concrete_all

        if concrete_all(self.low < self.high) is False:
            raise ValueError(f"uniform: parameter 'high' must exceed 'low' (got low={self.low}, high={self.high})")

    @property
    def support(self):
        return C.interval(self.low, self.high)

    def _sample(self, key, shape):
        u = mx.random.uniform(shape=shape, key=key)
        return self.low + (self.high - self.low) * u

    def _log_prob(self, x):
        inside = (x >= self.low) & (x <= self.high)
        return mx.where(inside, -mx.log(self.high - self.low), -mx.inf)

    def mean(self):
        return mx.broadcast_to((self.low + self.high) / 2, self.shape)

    def variance(self):
        return mx.broadcast_to((self.high - self.low) ** 2 / 12, self.shape)


normal = Normal
uniform = Uniform
