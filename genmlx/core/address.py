"""Addresses: a string, an int, or a tuple path (``("y", 3)`` is y → 3)."""

from __future__ import annotations

from typing import Union

Key = Union[str, int]
Address = Union[str, int, tuple]
Path = tuple


def to_path(addr: Address) -> Path:
    """Normalise an address to a non-empty tuple path of str/int keys."""
    if isinstance(addr, tuple):
        if len(addr) == 0:
            raise ValueError("an address path must not be empty")
        return tuple(_check_key(k, addr) for k in addr)
    return (_check_key(addr, addr),)


def from_path(path: Path) -> Address:
    """The user-facing form of a path: the bare key for depth 1, else the tuple."""
    return path[0] if len(path) == 1 else path


def _check_key(k, addr) -> Key:
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise TypeError(
            f"address {addr!r}: each address key must be a str or an int, got {type(k).__name__}"
        )
    return int(k.__index__())
