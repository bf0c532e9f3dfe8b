"""Helpers shared by the combinators: stripped sub-traces, vmapped calls over
particles or elements, leafwise selection between traces, concreteness checks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.pytree import tree_flatten, tree_unflatten
from genmlx.core.vectorize import _constraint_axes, _vmapped


def strip(tr):
    """A sub-trace as stored inside a combinator trace: its arguments are dropped
    (the combinator can rebuild them) so they are not duplicated per step/element."""
    return replace(tr, args=None, batch_size=None)


def dress(sub, args: tuple):
    """A stored sub-trace with its arguments put back, ready for a GFI operation."""
    return replace(sub, args=tuple(args), batch_size=None)


def concrete(x) -> Any:
    """The Python value of a scalar array when it can be evaluated now (not under
    vmap/compile tracing), else ``None``."""
    if not isinstance(x, mx.array):
        return x
    if x.size != 1:
        return None
    try:
        return x.item()
    except ValueError as e:  # tracer: "[eval] ... transformation"
        if "transformation" in str(e) or "compile" in str(e) or "eval" in str(e):
            return None
        raise


def concrete_array(x):
    """``x`` evaluated as a numpy array when possible, else ``None`` (under tracing)."""
    import numpy as np

    if not isinstance(x, mx.array):
        return np.asarray(x)
    try:
        return np.array(x)
    except (ValueError, RuntimeError):
        return None


def _bcast(cond: mx.array, v: mx.array) -> mx.array:
    """Reshape ``cond`` (shape s) to broadcast against ``v`` (shape s + rest)."""
    extra = v.ndim - cond.ndim
    return cond.reshape(cond.shape + (1,) * extra) if extra > 0 else cond


def where(cond: mx.array, a, b):
    """Leafwise ``mx.where(cond, a, b)`` over two structures with the same treedef;
    ``cond`` has the leading (batch) shape of the leaves."""
    la, ta = tree_flatten(a)
    lb, tb = tree_flatten(b)
    if ta != tb:
        raise ValueError("cannot select between two traces or values of different structure")
    return tree_unflatten(ta, [mx.where(_bcast(cond, x), x, y) for x, y in zip(la, lb)])


def select_value(index: mx.array, values: list, default=-mx.inf) -> mx.array:
    """``values[index]`` for an integer array ``index`` (per-particle), via nested
    ``mx.where``; an index matching no entry gives ``default``."""
    out = None
    for b in reversed(range(len(values))):
        v = values[b]
        base = mx.full(v.shape, default, dtype=v.dtype) if out is None else out
        out = mx.where(_bcast(index == b, v), v, base)
    return out


def merge_select(candidates: list) -> ChoiceMap:
    """Union of choice maps ``[(cond, cm), …]``: at an address several maps hold, the
    value of the last one whose ``cond`` is true (else of the first). Used where the
    set of addresses depends on per-particle values (Switch, Mask in batched mode)."""
    vals: dict = {}
    for cond, cm in candidates:
        for p, v in cm.leaves():
            if p in vals:
                vals[p] = mx.where(_bcast(cond, v), v, vals[p]) if cond is not None else v
            else:
                vals[p] = v
    out = ChoiceMap.empty()
    for p, v in vals.items():
        out = out.set_submap(p, ChoiceMap.leaf(v))
    return out


def cm_from_leaves(paths: list, values) -> ChoiceMap:
    out = ChoiceMap.empty()
    for path, v in zip(paths, values):
        out = out.set_submap(path, ChoiceMap.leaf(v))
    return out


def vcall(fn: Callable, keys: mx.array, items: tuple, axes: tuple,
          cm: ChoiceMap | None = None, caxes: list | None = None):
    """Run ``fn(key, *items, cm)`` once per row of ``keys`` as ONE vmapped computation.

    ``items`` are arbitrary structures (traces, states, argument tuples); ``axes[j]``
    is 0 when every array leaf of ``items[j]`` carries the mapped leading axis and
    ``None`` when it is shared. Constraint leaves of ``cm`` are mapped according to
    ``caxes``. Returns the structure ``fn`` returns, its array leaves gaining the
    leading axis (static parts such as retdiffs come back as they are).
    """
    flats = [tree_flatten(it) for it in items]
    leaves, in_axes, counts = [], [], []
    for (lv, _), ax in zip(flats, axes):
        leaves += lv
        in_axes += [ax] * len(lv)
        counts.append(len(lv))
    cpaths, cvals = [], []
    if cm is not None:
        for p, v in cm.leaves():
            cpaths.append(p)
            cvals.append(v)
        caxes = list(caxes) if caxes is not None else [None] * len(cvals)
    else:
        caxes = []
    box = {}

    def body(k, *flat):
        rebuilt, i = [], 0
        for (_, td), c in zip(flats, counts):
            rebuilt.append(tree_unflatten(td, list(flat[i:i + c])))
            i += c
        c_map = cm_from_leaves(cpaths, flat[i:]) if cm is not None else None
        out = fn(k, *rebuilt, c_map) if cm is not None else fn(k, *rebuilt)
        lv, box["td"] = tree_flatten(out)
        return lv

    out = _vmapped(body, in_axes=(0, *in_axes, *caxes))(keys, *leaves, *cvals)
    return tree_unflatten(box["td"], out)


def constraint_axes(gf, key, args, cm: ChoiceMap, n: int, reference=None) -> list:
    """Per-leaf vmap axes of constraints for ``n`` particles (see core.vectorize)."""
    return _constraint_axes(gf, key, args, cm, n, reference=reference)


def take(tree, idx, axis: int = 0):
    """Index every array leaf of ``tree`` along ``axis``."""
    lv, td = tree_flatten(tree)
    return tree_unflatten(td, [mx.take(x, idx, axis=axis) for x in lv])


def stack_trees(trees: list, axis: int = 0):
    """Stack structures of identical treedef leafwise along a new ``axis``."""
    flats = [tree_flatten(t) for t in trees]
    td = flats[0][1]
    return tree_unflatten(td, [mx.stack(xs, axis=axis) for xs in zip(*(f[0] for f in flats))])


def selection_of(paths):
    """The selection of exactly these leaf paths (the root path ``()`` selects all)."""
    from genmlx.core.selection import AddressSelection, select_all

    paths = list(paths)
    if any(len(p) == 0 for p in paths):
        return select_all()
    return AddressSelection.of(paths)
