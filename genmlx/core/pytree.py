"""Flattening of genmlx structures to flat lists of arrays and back.

``mx.compile`` and ``mx.vmap`` accept and return only arrays (and lists, tuples and
dicts of them). Traces, choice maps and arbitrary return values are taken apart into
a list of arrays plus a static *treedef*, and rebuilt from the two. Anything that is
not an ``mx.array`` and not a known container (Python numbers, strings, modules,
generative functions) is static: it lives in the treedef, not among the leaves.

Classes join in by defining ``_tree_flatten(self) -> (children, aux)`` and the
classmethod ``_tree_unflatten(aux, children)``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

_LEAF = "leaf"
_STATIC = "static"
_NONE = "none"


def tree_flatten(obj: Any) -> tuple[list[mx.array], Any]:
    """Split ``obj`` into its array leaves (depth-first) and a static treedef."""
    leaves: list[mx.array] = []
    treedef = _flatten(obj, leaves)
    return leaves, treedef


def tree_unflatten(treedef: Any, leaves: list) -> Any:
    """Rebuild the structure described by ``treedef`` from ``leaves``."""
    it = iter(leaves)
    out = _unflatten(treedef, it)
    rest = list(it)
    if rest:
        raise ValueError(f"tree_unflatten: {len(rest)} leaves left over")
    return out


def unique_by_identity(xs: list) -> tuple[list, list[int]]:
    """The distinct objects of ``xs`` (by identity, first-seen order) and, for each item,
    the position of its object among them."""
    uniq, index, pos = [], [], {}
    for x in xs:
        j = pos.get(id(x))
        if j is None:
            j = pos[id(x)] = len(uniq)
            uniq.append(x)
        index.append(j)
    return uniq, index


def tree_map(fn, obj: Any) -> Any:
    """Apply ``fn`` to every array leaf of ``obj``."""
    leaves, treedef = tree_flatten(obj)
    return tree_unflatten(treedef, [fn(x) for x in leaves])


def _flatten(obj: Any, leaves: list) -> Any:
    if isinstance(obj, mx.array):
        leaves.append(obj)
        return _LEAF
    if obj is None:
        return _NONE
    if type(obj) is tuple or type(obj) is list:
        return (type(obj), tuple(_flatten(x, leaves) for x in obj))
    if type(obj) is dict:
        keys = tuple(obj.keys())
        return (dict, keys, tuple(_flatten(obj[k], leaves) for k in keys))
    flat = getattr(type(obj), "_tree_flatten", None)
    if flat is not None:
        children, aux = obj._tree_flatten()
        return (type(obj), aux, tuple(_flatten(c, leaves) for c in children))
    return (_STATIC, obj)


def _unflatten(td: Any, it) -> Any:
    if td == _LEAF and isinstance(td, str):
        return next(it)
    if isinstance(td, str) and td == _NONE:
        return None
    tag = td[0]
    if tag is tuple or tag is list:
        return tag(_unflatten(c, it) for c in td[1])
    if tag is dict:
        return {k: _unflatten(c, it) for k, c in zip(td[1], td[2])}
    if isinstance(tag, str) and tag == _STATIC:
        return td[1]
    return tag._tree_unflatten(td[1], [_unflatten(c, it) for c in td[2]])
