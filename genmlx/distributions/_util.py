"""Small helpers shared by the distribution families."""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.core.validation import concrete_all, validation_enabled
from genmlx.distributions._categories import argmax_categories
from genmlx.distributions import constraints as C

_U_EPS = 2.0**-25


def open_uniform(key, shape) -> mx.array:
    """U(0, 1) draws strictly inside (0, 1) (safe for log u and log(1 − u))."""
    u = mx.random.uniform(shape=tuple(shape), key=key)
    return mx.clip(u, _U_EPS, 1.0 - 2.0**-24)


def categorical_sample(key, logits, shape) -> mx.array:
    """Indices of ``shape`` (= sample + batch) drawn from ``logits`` [..., K] by the
    Gumbel-max trick, argmax_k(logits_k + G_k), G_k = −log(−log u_k). Unlike
    ``mx.random.categorical`` it works when ``logits`` are vmapped."""
    k = logits.shape[-1]
    u = open_uniform(key, tuple(shape) + (k,))
    return argmax_categories(logits - mx.log(-mx.log(u)))


def batch_shape(name: str, params: dict, shape=None, event_ndims: dict | None = None) -> tuple:
    """Broadcast of the parameters' batch shapes (less their event dims) and of ``shape``
    (an extra requested batch shape); ValueError naming the distribution otherwise."""
    event_ndims = event_ndims or {}
    shapes = []
    for k, v in params.items():
        s = tuple(getattr(v, "shape", ()))
        e = event_ndims.get(k, 0)
        shapes.append(s[: len(s) - e] if e else s)
    if shape is not None:
        shapes.append(tuple(shape) if not isinstance(shape, int) else (shape,))
    try:
        return tuple(mx.broadcast_shapes(*shapes)) if shapes else ()
    except ValueError:
        names = list(params) + (["shape"] if shape is not None else [])
        desc = ", ".join(f"'{k}' {s}" for k, s in zip(names, shapes))
        raise ValueError(f"{name}: parameter shapes do not broadcast ({desc})") from None


def is_infinite(bound, sign: float) -> bool:
    """Whether a bound is statically ±inf (Python number or concrete array, all
    elements); traced arrays count as finite."""
    if bound is None:
        return True
    if isinstance(bound, (int, float)):
        return math.isinf(bound) and math.copysign(1.0, bound) == sign
    ok = concrete_all(bound == sign * math.inf)
    return bool(ok)


def bounded_support(low, high, low_inf: bool, high_inf: bool) -> C.Constraint:
    """real, greater_than(low), less_than(high) or interval(low, high)."""
    if low_inf and high_inf:
        return C.real
    if low_inf:
        return C.less_than(high)
    if high_inf:
        return C.greater_than(low)
    return C.interval(low, high)


def check(name: str, cond, message: str) -> None:
    """Raise ValueError(f"{name}: {message}") when validation is on and ``cond`` is
    concretely false somewhere (skipped under tracing)."""
    if validation_enabled() and concrete_all(cond) is False:
        raise ValueError(f"{name}: {message}")


def as_float(x) -> mx.array:
    """An array value as float32 (counts and booleans included)."""
    x = x if isinstance(x, mx.array) else mx.array(x)
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def sum_rightmost(x, n: int):
    return mx.sum(x, axis=tuple(range(-n, 0))) if n else x
