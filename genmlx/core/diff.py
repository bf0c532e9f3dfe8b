"""Change hints (``argdiffs`` / ``retdiff``) for incremental ``update``.

A diff says how an argument or return value changed between the old and new trace:
``NoChange`` (identical), ``UnknownChange`` (anything may have changed), or a
structured hint that combinators exploit (``IntDiff`` for a changed length,
``VectorDiff`` naming the changed elements of a batched argument).
"""

from __future__ import annotations

from dataclasses import dataclass


class Diff:
    """Base class of change hints."""


@dataclass(frozen=True)
class _NoChange(Diff):
    def __repr__(self) -> str:
        return "NoChange"


@dataclass(frozen=True)
class _UnknownChange(Diff):
    def __repr__(self) -> str:
        return "UnknownChange"


NoChange = _NoChange()
UnknownChange = _UnknownChange()


@dataclass(frozen=True)
class IntDiff(Diff):
    """An integer argument changed by ``delta`` (e.g. a sequence length grew by 1)."""

    delta: int


@dataclass(frozen=True)
class VectorDiff(Diff):
    """Only the listed indices of a leading-axis argument changed."""

    changed: tuple[int, ...]


def is_no_change(d: Diff) -> bool:
    return d is NoChange or isinstance(d, _NoChange) or (isinstance(d, IntDiff) and d.delta == 0)


def default_argdiffs(old_args: tuple, new_args: tuple | None) -> tuple:
    """``NoChange`` for arguments that are the very same objects, else ``UnknownChange``."""
    if new_args is None:
        return tuple(NoChange for _ in old_args)
    if len(new_args) != len(old_args):
        return tuple(UnknownChange for _ in new_args)
    return tuple(NoChange if a is b else UnknownChange for a, b in zip(old_args, new_args))
