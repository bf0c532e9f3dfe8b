"""The switch for parameter validation of distributions (on by default).

Validation evaluates a boolean reduction of the parameters, so it is skipped
automatically under ``mx.compile``/``mx.vmap`` tracing (where arrays cannot be
evaluated) and can be turned off for speed with ``gm.set_validation(False)``, the
``gm.validation(False)`` context manager, or ``GENMLX_VALIDATE=0``.
"""

from __future__ import annotations

import contextlib
import os

import mlx.core as mx

_state = {"on": os.environ.get("GENMLX_VALIDATE", "1") not in ("0", "false", "False"), "tracing": 0,
          "vmaps": 0}


def validation_enabled() -> bool:
    return _state["on"]


def set_validation(on: bool) -> None:
    """Turn distribution-parameter validation on or off for the whole process."""
    _state["on"] = bool(on)


@contextlib.contextmanager
def validation(on: bool):
    """Context manager setting validation on/off inside a ``with`` block."""
    old = _state["on"]
    _state["on"] = bool(on)
    try:
        yield
    finally:
        _state["on"] = old


@contextlib.contextmanager
def tracing():
    """Marks a region traced by genmlx's own mx.vmap/mx.compile calls, where checks
    are skipped without paying for a failed evaluation."""
    _state["tracing"] += 1
    try:
        yield
    finally:
        _state["tracing"] -= 1


@contextlib.contextmanager
def vmap_level():
    """Marks one of genmlx's own ``mx.vmap`` calls (vectorized GFI operations, amortized
    particles), so that custom ``vmap`` rules can tell whether another such vmap encloses
    theirs (:func:`nested_vmap`)."""
    _state["vmaps"] += 1
    try:
        yield
    finally:
        _state["vmaps"] -= 1


def inside_vmap() -> bool:
    """Whether one of genmlx's own vmaps is being traced (see :func:`vmap_level`)."""
    return _state["vmaps"] > 0


def nested_vmap() -> bool:
    """Whether a custom vmap rule runs inside two or more of genmlx's vmaps: its result
    will be vmapped again, so it should stay a custom function (its rule is then applied
    once more) instead of plain primitives (their own, slower, vmap rules would apply)."""
    return _state["vmaps"] > 1


def concrete_all(cond) -> bool | None:
    """``bool(cond.all())`` when ``cond`` can be evaluated now, ``None`` under tracing."""
    if not isinstance(cond, mx.array):
        return bool(cond)
    if _state["tracing"]:
        return None
    try:
        return bool(mx.all(cond).item())
    except ValueError as e:  # [eval] ... during function transformations like compile
        if "transformation" in str(e) or "compile" in str(e):
            return None
        raise


def under_transformation(x: mx.array) -> bool:
    """Whether ``x`` is being traced by ``mx.compile``/``mx.vmap`` (or genmlx's own
    traced regions): it cannot be evaluated now. Evaluates ``x`` otherwise."""
    if _state["tracing"]:
        return True
    try:
        mx.eval(x)
        return False
    except ValueError as e:
        if "transformation" in str(e) or "compile" in str(e):
            return True
        raise
