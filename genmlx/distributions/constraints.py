"""Supports and parameter constraints, each with a bijection from unconstrained space.

A continuous support S ⊆ R^d comes with ``from_unconstrained: R^k → S`` (a bijection,
k = d except for the simplex, k = d − 1), its inverse ``to_unconstrained`` and
``log_abs_det_jacobian(u)`` = log |det ∂from_unconstrained(u)/∂u|, summed over the
event dimensions. HMC, NUTS and ADVI run in unconstrained space and add this term to
the log density. Bounds may be arrays computed from other choices
(``uniform(0, 1 - a)``): the bijection then uses the bounds of the current execution.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


class Constraint:
    """A set of values. ``check(x)`` is an elementwise boolean array."""

    discrete: bool = False
    event_ndim: int = 0

    def check(self, x):
        raise NotImplementedError

    # bijection (continuous supports only)
    def from_unconstrained(self, u):
        raise TypeError(f"{self!r} has no bijection from unconstrained space (discrete support)")

    def to_unconstrained(self, x):
        raise TypeError(f"{self!r} has no bijection to unconstrained space (discrete support)")

    def log_abs_det_jacobian(self, u):
        raise TypeError(f"{self!r} has no bijection (discrete support)")

    def unconstrained_shape(self, shape: tuple) -> tuple:
        return tuple(shape)

    def __repr__(self) -> str:
        return type(self).__name__.lstrip("_")


class _Real(Constraint):
    def check(self, x):
        return ~mx.isnan(x)

    def from_unconstrained(self, u):
        return u

    def to_unconstrained(self, x):
        return x

    def log_abs_det_jacobian(self, u):
        return mx.zeros(u.shape[: u.ndim - self.event_ndim] if self.event_ndim else u.shape)

    def __repr__(self):
        return "real"


class _RealVector(_Real):
    event_ndim = 1

    def __repr__(self):
        return "real_vector"

    def check(self, x):
        return mx.all(~mx.isnan(x), axis=-1)


class GreaterThan(Constraint):
    """(lower, ∞); x = lower + exp(u), log|J| = u."""

    def __init__(self, lower):
        self.lower = lower

    def check(self, x):
        return x > self.lower

    def from_unconstrained(self, u):
        return self.lower + mx.exp(u)

    def to_unconstrained(self, x):
        return mx.log(x - self.lower)

    def log_abs_det_jacobian(self, u):
        return u

    def __repr__(self):
        return f"greater_than({_fmt(self.lower)})"


class GreaterEqual(GreaterThan):
    """[lower, ∞) (same bijection as the open interval)."""

    def check(self, x):
        return x >= self.lower

    def __repr__(self):
        return f"greater_equal({_fmt(self.lower)})"


class LessThan(Constraint):
    """(−∞, upper); x = upper − exp(u), log|J| = u."""

    def __init__(self, upper):
        self.upper = upper

    def check(self, x):
        return x < self.upper

    def from_unconstrained(self, u):
        return self.upper - mx.exp(u)

    def to_unconstrained(self, x):
        return mx.log(self.upper - x)

    def log_abs_det_jacobian(self, u):
        return u

    def __repr__(self):
        return f"less_than({_fmt(self.upper)})"


class Interval(Constraint):
    """(lower, upper); x = lower + (upper − lower)·σ(u),
    log|J| = log(upper − lower) + log σ(u) + log σ(−u)."""

    def __init__(self, lower, upper, closed: bool = False):
        self.lower, self.upper, self.closed = lower, upper, closed

    def check(self, x):
        if self.closed:
            return (x >= self.lower) & (x <= self.upper)
        return (x > self.lower) & (x < self.upper)

    def from_unconstrained(self, u):
        return self.lower + (self.upper - self.lower) * mx.sigmoid(u)

    def to_unconstrained(self, x):
        p = (x - self.lower) / (self.upper - self.lower)
        return mx.log(p) - mx.log1p(-p)

    def log_abs_det_jacobian(self, u):
        width = mx.array(self.upper - self.lower)
        return mx.log(width) - nn.softplus(-u) - nn.softplus(u)

    def __repr__(self):
        if self.closed:
            return f"closed_interval[{_fmt(self.lower)}, {_fmt(self.upper)}]"
        return f"interval({_fmt(self.lower)}, {_fmt(self.upper)})"


class _Simplex(Constraint):
    """Probability vectors of length K; stick-breaking from R^{K−1} (as in Stan):
    z_k = σ(u_k − log(K − k)), x_k = z_k·(1 − Σ_{j<k} x_j), x_K = remaining stick."""

    event_ndim = 1

    def __repr__(self):
        return "simplex"

    def check(self, x):
        return mx.all(x >= 0, axis=-1) & (mx.abs(mx.sum(x, axis=-1) - 1) < 1e-4)

    def unconstrained_shape(self, shape):
        return tuple(shape[:-1]) + (shape[-1] - 1,)

    def _offsets(self, km1: int):
        k = mx.arange(km1, dtype=mx.float32)
        return mx.log(km1 - k)  # log(K − 1 − k) for k = 0..K−2  (K − k with 1-based k)

    def from_unconstrained(self, u):
        km1 = u.shape[-1]
        v = u - self._offsets(km1)
        z = mx.sigmoid(v)
        log_rest = mx.cumsum(-nn.softplus(v), axis=-1)  # log Π_{j≤k}(1 − z_j)
        rest_before = mx.exp(mx.concatenate([mx.zeros(u.shape[:-1] + (1,)), log_rest[..., :-1]], axis=-1))
        x = z * rest_before
        last = mx.exp(log_rest[..., -1:])
        return mx.concatenate([x, last], axis=-1)

    def to_unconstrained(self, x):
        km1 = x.shape[-1] - 1
        xs = x[..., :-1]
        cum = mx.cumsum(xs, axis=-1)
        rest_before = 1 - mx.concatenate([mx.zeros(x.shape[:-1] + (1,)), cum[..., :-1]], axis=-1)
        z = xs / rest_before
        return mx.log(z) - mx.log1p(-z) + self._offsets(km1)

    def log_abs_det_jacobian(self, u):
        km1 = u.shape[-1]
        v = u - self._offsets(km1)
        log_z = -nn.softplus(-v)
        log_1mz = -nn.softplus(v)
        log_rest = mx.cumsum(log_1mz, axis=-1)
        log_rest_before = mx.concatenate([mx.zeros(u.shape[:-1] + (1,)), log_rest[..., :-1]], axis=-1)
        return mx.sum(log_z + log_1mz + log_rest_before, axis=-1)


class _Boolean(Constraint):
    discrete = True

    def __repr__(self):
        return "boolean"

    def check(self, x):
        return (x == 0) | (x == 1)


class IntegerInterval(Constraint):
    """{lower, …, upper}."""

    discrete = True

    def __init__(self, lower, upper):
        self.lower, self.upper = lower, upper

    def check(self, x):
        return (x >= self.lower) & (x <= self.upper) & (mx.floor(x) == x)

    def __repr__(self):
        return f"integer_interval({_fmt(self.lower)}, {_fmt(self.upper)})"


class IntegerGreaterEqual(Constraint):
    """{lower, lower + 1, …}."""

    discrete = True

    def __init__(self, lower):
        self.lower = lower

    def check(self, x):
        return (x >= self.lower) & (mx.floor(x) == x)

    def __repr__(self):
        return f"integer_greater_equal({_fmt(self.lower)})"


class _Integer(Constraint):
    """All integers (as float or int arrays)."""

    discrete = True

    def check(self, x):
        return mx.floor(x) == x

    def __repr__(self):
        return "integer"


class _PositiveDefinite(Constraint):
    event_ndim = 2

    def check(self, x):
        sym = mx.all(mx.abs(x - mx.swapaxes(x, -1, -2)) < 1e-4, axis=(-2, -1))
        diag = mx.all(mx.diagonal(x, axis1=-2, axis2=-1) > 0, axis=-1)
        return sym & diag


class _LowerCholesky(Constraint):
    event_ndim = 2

    def check(self, x):
        upper = mx.triu(x, k=1)
        return mx.all(upper == 0, axis=(-2, -1)) & mx.all(mx.diagonal(x, axis1=-2, axis2=-1) > 0, axis=-1)


def _fmt(v) -> str:
    if isinstance(v, mx.array):
        return f"{v.item():g}" if v.size == 1 else f"array{tuple(v.shape)}"
    return f"{v:g}" if isinstance(v, (int, float)) else repr(v)


real = _Real()
real_vector = _RealVector()
positive = GreaterThan(0.0)
nonnegative = GreaterEqual(0.0)
unit_interval = Interval(0.0, 1.0)
simplex = _Simplex()
boolean = _Boolean()
integer = _Integer()
nonnegative_integer = IntegerGreaterEqual(0)
positive_integer = IntegerGreaterEqual(1)
positive_definite = _PositiveDefinite()
lower_cholesky = _LowerCholesky()
interval = Interval
greater_than = GreaterThan
less_than = LessThan
integer_interval = IntegerInterval
LOG_2PI = math.log(2 * math.pi)
