"""Choice maps: immutable trees from addresses to values.

A ``ChoiceMap`` node is either a *leaf* holding one value (an ``mx.array``, possibly
with a leading particle axis in batched traces) or an internal node mapping keys
(str/int) to child choice maps. The empty choice map is an internal node with no
children. Every operation returns a new map; none mutates.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import mlx.core as mx
import numpy as np

from genmlx.core.address import Address, Path, from_path, to_path
from genmlx.core.errors import AddressCollisionError, MissingChoiceError


def as_value(v: Any) -> Any:
    """Convert a user-given choice value to an ``mx.array`` (wrappers pass through)."""
    if isinstance(v, mx.array) or getattr(v, "_is_choice_wrapper", False):
        return v
    if isinstance(v, (bool, int, float, np.ndarray, np.generic, list)):
        return mx.array(v)
    raise TypeError(f"a choice value must be an array or a number, got {type(v).__name__}")


class ChoiceMap:
    """An immutable map from addresses to choice values.

    Build one with :func:`choicemap`. ``cm[addr]`` reads a value, ``addr in cm`` tests
    for a value or non-empty submap, ``cm.get_submap(addr)`` returns the map below an
    address, iteration yields ``(address, value)`` for every leaf (addresses of depth
    one are bare keys, deeper ones tuples).
    """

    __slots__ = ("_value", "_children", "_is_leaf")

    def __init__(self, children: Mapping | None = None, *, _value: Any = None, _leaf: bool = False):
        self._is_leaf = _leaf
        self._value = _value
        self._children = dict(children) if children else {}

    # -- construction -------------------------------------------------------------
    @staticmethod
    def empty() -> "ChoiceMap":
        return _EMPTY

    @staticmethod
    def leaf(value: Any) -> "ChoiceMap":
        """A choice map holding a single value at the root address."""
        return ChoiceMap(_value=as_value(value), _leaf=True)

    @staticmethod
    def from_mapping(mapping: Mapping) -> "ChoiceMap":
        cm = _EMPTY
        for addr, v in mapping.items():
            if isinstance(v, ChoiceMap):
                sub = v
            elif isinstance(v, Mapping):
                sub = ChoiceMap.from_mapping(v)
            else:
                sub = ChoiceMap.leaf(v)
            cm = cm._insert(to_path(addr), sub)
        return cm

    # -- queries -----------------------------------------------------------------
    def is_leaf(self) -> bool:
        return self._is_leaf

    def has_value(self, addr: Address | None = None) -> bool:
        node = self if addr is None else self._find(_path(addr))
        return node is not None and node._is_leaf

    def get_value(self, addr: Address | None = None) -> Any:
        if addr is None:
            if not self._is_leaf:
                raise MissingChoiceError("there is no value at the root of this choice map")
            return self._value
        return self[addr]

    def is_empty(self) -> bool:
        return not self._is_leaf and not self._children

    def get_submap(self, addr: Address) -> "ChoiceMap":
        node = self._find(_path(addr))
        return _EMPTY if node is None else node

    def submap_at_path(self, path: Path) -> "ChoiceMap":
        node = self._find(path) if path else self
        return _EMPTY if node is None else node

    def children(self) -> dict:
        """The immediate children ``{key: ChoiceMap}`` (empty for a leaf)."""
        return dict(self._children)

    def __getitem__(self, addr: Address) -> Any:
        if isinstance(addr, tuple) and not addr:
            return self.get_value()
        path = _path(addr)
        node = self._find(path)
        if node is None or node.is_empty():
            raise MissingChoiceError("no choice at this address", path)
        if not node._is_leaf:
            raise MissingChoiceError(
                "this address holds a sub-map, not a value; use get_submap()", path
            )
        return node._value

    def __contains__(self, addr: Address) -> bool:
        node = self._find(_path(addr))
        return node is not None and not node.is_empty()

    def __iter__(self) -> Iterator[tuple[Address, Any]]:
        for path, v in self.leaves():
            yield from_path(path), v

    def leaves(self, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
        """Yield ``(path, value)`` for every leaf, paths as tuples."""
        if self._is_leaf:
            yield prefix, self._value
            return
        for k, child in self._children.items():
            yield from child.leaves(prefix + (k,))

    def addresses(self) -> list[Address]:
        return [a for a, _ in self]

    def __len__(self) -> int:
        return sum(1 for _ in self.leaves())

    def to_dict(self) -> Any:
        """Nested plain dicts of values (a leaf map gives its value)."""
        if self._is_leaf:
            return self._value
        return {k: c.to_dict() for k, c in self._children.items()}

    # -- functional updates ------------------------------------------------------
    def set(self, addr: Address, value: Any) -> "ChoiceMap":
        """A copy with ``value`` at ``addr`` (replacing what was there)."""
        sub = value if isinstance(value, ChoiceMap) else ChoiceMap.leaf(value)
        return self._insert(to_path(addr), sub, replace=True)

    def set_submap(self, path: Path, sub: "ChoiceMap") -> "ChoiceMap":
        if not path:
            return sub
        return self._insert(path, sub, replace=True)

    def merge(self, other: "ChoiceMap") -> "ChoiceMap":
        """Union of two choice maps; an address present in both is an error."""
        out = self
        for path, v in other.leaves():
            out = out._insert(path, ChoiceMap.leaf(v))
        return out

    def filter(self, selection) -> "ChoiceMap":
        """The sub-map of leaves whose addresses ``selection`` selects."""
        out = _EMPTY
        for path, v in self.leaves():
            if selection.contains_path(path):
                out = out._insert(path, ChoiceMap(_value=v, _leaf=True))
        return out

    def map_values(self, fn) -> "ChoiceMap":
        """A copy with ``fn`` applied to every leaf value."""
        if self._is_leaf:
            return ChoiceMap(_value=fn(self._value), _leaf=True)
        return ChoiceMap({k: c.map_values(fn) for k, c in self._children.items()})

    def __getstate__(self):
        raise TypeError("genmlx objects are not pickled; save arrays with safetensors")

    # -- pytree -------------------------------------------------------------------
    def _tree_flatten(self):
        if self._is_leaf:
            return [self._value], "leaf"
        keys = tuple(self._children.keys())
        return [self._children[k] for k in keys], keys

    @classmethod
    def _tree_unflatten(cls, aux, children):
        if isinstance(aux, str) and aux == "leaf":
            return ChoiceMap(_value=children[0], _leaf=True)
        return ChoiceMap(dict(zip(aux, children)))

    # -- helpers ------------------------------------------------------------------
    def _find(self, path: Path) -> "ChoiceMap | None":
        node = self
        for k in path:
            if node._is_leaf:
                return None
            node = node._children.get(k)
            if node is None:
                return None
        return node

    def _insert(self, path: Path, sub: "ChoiceMap", replace: bool = False) -> "ChoiceMap":
        if not path:
            if not replace and not self.is_empty():
                raise AddressCollisionError("two values were given for the same address")
            return sub
        if self._is_leaf:
            if not replace:
                raise AddressCollisionError(
                    "this address holds a value and also a sub-map below it"
                )
            children = {}
        else:
            children = dict(self._children)
        k = path[0]
        child = children.get(k, _EMPTY)
        try:
            new_child = child._insert(path[1:], sub, replace)
        except AddressCollisionError as e:
            raise e.at((k,))
        if new_child.is_empty():
            children.pop(k, None)
        else:
            children[k] = new_child
        return ChoiceMap(children)

    def __repr__(self) -> str:
        if self._is_leaf:
            return f"ChoiceMap.leaf({_short(self._value)})"
        items = ", ".join(f"{a!r}: {_short(v)}" for a, v in self)
        return f"ChoiceMap({{{items}}})"

    def __eq__(self, other) -> bool:  # structural equality of addresses and values
        if not isinstance(other, ChoiceMap):
            return NotImplemented
        a, b = dict(self.leaves()), dict(other.leaves())
        if a.keys() != b.keys():
            return False
        return all(_values_equal(a[k], b[k]) for k in a)

    __hash__ = None


def _path(addr) -> Path:
    """Like ``to_path`` but ``()`` is the root (used internally and by generic code)."""
    if isinstance(addr, tuple) and not addr:
        return ()
    return to_path(addr)


def _values_equal(x, y) -> bool:
    if isinstance(x, mx.array) and isinstance(y, mx.array):
        return x.shape == y.shape and bool(mx.array_equal(x, y).item())
    return x == y


def _short(v) -> str:
    if isinstance(v, mx.array):
        if v.size <= 4:
            return repr(v.tolist())
        return f"array{tuple(v.shape)}"
    return repr(v)


_EMPTY = ChoiceMap()


def choicemap(mapping: Mapping | None = None, /, **kwargs) -> ChoiceMap:
    """Build a :class:`ChoiceMap` from ``{address: value}`` (tuples are paths).

    Values may be arrays, numbers, nested dicts (sub-maps) or choice maps.
    ``gm.choicemap({"x": 1.0, ("y", 3): 2.0})`` has ``cm["x"]`` and ``cm["y", 3]``.
    """
    items = dict(mapping or {})
    items.update(kwargs)
    return ChoiceMap.from_mapping(items)
