"""Degenerate and improper distributions: ``delta`` (a point mass) and ``flat`` (an
improper constant density)."""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.distributions import constraints as C
from genmlx.distributions._util import batch_shape, bounded_support, check, is_infinite
from genmlx.distributions.base import Distribution, param


class _Point(C.Constraint):
    """The single point {v}: no bijection (nothing to infer)."""

    discrete = True

    def __init__(self, v):
        self.v = v

    def check(self, x):
        return x == self.v

    def __repr__(self):
        return "point"


class Delta(Distribution):
    """Point mass at ``v``: log p(x) = 0 if x = v else −inf (elementwise). Sampling
    returns v (so gradients flow to v: "reparameterized")."""

    name = "delta"
    arg_constraints: dict = {}
    reparameterized = True

    def __init__(self, v, *, shape=None):
        self.v = v if isinstance(v, mx.array) else param(v)
        ps = {"v": self.v}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return _Point(self.v)

    def _sample(self, key, shape):
        return mx.broadcast_to(self.v, shape)

    def _log_prob(self, x):
        return mx.where(x == self.v, 0.0, -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.v, self.shape)

    def variance(self):
        return mx.zeros(self.shape)


class Flat(Distribution):
    """Improper flat "density" on (low, high): log p(x) = 0 inside, −inf outside.

    The support is real, greater_than(low), less_than(high) or interval(low, high),
    chosen by which bounds are infinite (give infinite bounds as Python floats, the
    default; array bounds — e.g. depending on other choices — count as finite), so HMC,
    NUTS and ADVI work through ``UnconstrainedValue``. It cannot be sampled unless both
    bounds are finite, in which case ``sample``/``simulate`` draw uniformly on
    (low, high) (a proposal, not the improper law itself). Use it via generate/assess
    with the value constrained (or in unconstrained space).
    """

    name = "flat"
    arg_constraints = {"low": C.real, "high": C.real}
    reparameterized = True

    def __init__(self, low=-math.inf, high=math.inf, shape=()):
        self._low_inf, self._high_inf = is_infinite(low, -1.0), is_infinite(high, 1.0)
        self.low = param(-math.inf if low is None else low)
        self.high = param(math.inf if high is None else high)
        ps = {"low": self.low, "high": self.high}
        self._init(ps, batch_shape(self.name, ps, shape))

    def _validate(self):
        super()._validate()
        check(self.name, self.low < self.high, "parameter 'high' must exceed 'low'")

    @property
    def support(self):
        return bounded_support(self.low, self.high, self._low_inf, self._high_inf)

    def _sample(self, key, shape):
        if self._low_inf or self._high_inf:
            raise ValueError(
                "flat: cannot sample the improper flat distribution on an unbounded range "
                f"(low={'-inf' if self._low_inf else 'finite'}, high={'inf' if self._high_inf else 'finite'}); "
                "constrain this choice (generate/assess, or an UnconstrainedValue for HMC/NUTS/VI) "
                "instead of sampling it"
            )
        u = mx.random.uniform(shape=shape, key=key)
        return self.low + (self.high - self.low) * u

    def _log_prob(self, x):
        inside = (x > self.low) & (x < self.high)
        return mx.where(inside, 0.0, -mx.inf)


delta = Delta
flat = Flat
