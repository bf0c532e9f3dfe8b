"""Shared helpers for the inference algorithms: particle-batched trace surgery and a
cache of ``mx.compile``d functions keyed by static structure.

A batched trace's array leaves (after stripping the shared top-level ``args``) all
carry the particle axis first, so gathering, selecting and concatenating particles
is a map over those leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any, Callable

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.pytree import tree_flatten, tree_unflatten
from genmlx.core.selection import (
    AddressSelection,
    AllSelection,
    Complement,
    Intersection,
    NoneSelection,
    Selection,
    Union,
)
from genmlx.core.trace import Trace, same_structure


# -- batched traces ---------------------------------------------------------------
def flatten_particles(tr: Trace):
    """(leaves with leading particle axis, treedef) of a batched trace (args stripped)."""
    return tree_flatten(replace(tr, args=None, batch_size=None))


def rebuild_particles(td, leaves, args: tuple, n: int) -> Trace:
    return replace(tree_unflatten(td, leaves), args=tuple(args), batch_size=n)


def take_particles(tr: Trace, idx: mx.array) -> Trace:
    """The batched trace made of particles ``idx`` (an int array [m]) of ``tr``."""
    leaves, td = flatten_particles(tr)
    return rebuild_particles(td, gather_rows(leaves, idx), tr.args, int(idx.shape[0]))


def grouped_rows(leaves: list, fn) -> list:
    """Apply a row-wise ``fn`` (same leading axis in and out) to every leaf, with leaves
    of one dtype and row shape stacked along axis 1 and processed together (one op per
    group instead of one per leaf: long sequential traces have hundreds of leaves)."""
    groups: dict = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.dtype, tuple(x.shape[1:])), []).append(i)
    out = [None] * len(leaves)
    for ids in groups.values():
        if len(ids) == 1:
            out[ids[0]] = fn(leaves[ids[0]])
            continue
        big = fn(mx.stack([leaves[i] for i in ids], axis=1))
        for j, i in enumerate(ids):
            out[i] = big[:, j]
    return out


def gather_rows(leaves: list, idx: mx.array) -> list:
    """``[x[idx] for x in leaves]``, gathered per group of alike leaves (:func:`grouped_rows`)."""
    return grouped_rows(leaves, lambda x: mx.take(x, idx, axis=0))


def gather_rows_each(leaves: list, rows: list) -> list:
    """``[x[r] for x, r in zip(leaves, rows)]`` (each leaf with its own index vector of
    one length m): leaves of one dtype and row shape are stacked along a new leading
    axis and gathered by ONE ``take_along_axis`` with the stacked index vectors. A leaf
    repeated (the same array with the same index vector) is gathered once."""
    groups: dict = {}
    first: dict = {}
    out = [None] * len(leaves)
    for i, x in enumerate(leaves):
        j = first.setdefault((id(x), id(rows[i])), i)
        if j == i:
            groups.setdefault((x.dtype, tuple(x.shape[1:])), []).append(i)
    for (_, shape), ids in groups.items():
        if len(ids) == 1:
            i = ids[0]
            out[i] = mx.take(leaves[i], rows[i], axis=0)
            continue
        big = mx.stack([leaves[i] for i in ids])
        r = mx.stack([rows[i] for i in ids]).reshape((len(ids), -1) + (1,) * len(shape))
        got = mx.take_along_axis(big, r, axis=1)
        for j, i in enumerate(ids):
            out[i] = got[j]
    for i, x in enumerate(leaves):
        if out[i] is None:
            out[i] = out[first[(id(x), id(rows[i]))]]
    return out


def concat_particles(traces: list[Trace]) -> Trace:
    """Concatenate batched traces of one structure along the particle axis."""
    flats = same_structure(traces, flatten_particles)
    td = flats[0][1]
    for _, other in flats[1:]:
        if other != td:
            raise ValueError("cannot concatenate batched traces of different structure")
    leaves = [mx.concatenate(xs, axis=0) for xs in zip(*(f[0] for f in flats))]
    return rebuild_particles(td, leaves, traces[0].args, sum(t.batch_size for t in traces))


def _bcast(mask: mx.array, x: mx.array) -> mx.array:
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def where_trace(mask: mx.array, a: Trace, b: Trace) -> Trace:
    """Per particle (``mask`` [n]) or whole-trace (scalar ``mask``) choice of ``a`` where
    ``mask`` else ``b``. Both traces must have the same structure; the result keeps
    ``a``'s (shared) arguments."""
    (la, tda), (lb, tdb) = same_structure(
        [a, b], lambda t: tree_flatten(replace(t, args=None, batch_size=None)))
    if tda != tdb:
        raise ValueError(
            "the proposed trace has a different structure (addresses or static values) "
            "from the current one; accept/reject by mx.where needs a fixed structure"
        )
    out = tree_unflatten(tda, [mx.where(_bcast(mask, x), x, y) for x, y in zip(la, lb)])
    return replace(out, args=a.args, batch_size=a.batch_size)


def set_particle(tr: Trace, i: int, single: Trace) -> Trace:
    """A copy of batched ``tr`` whose particle ``i`` is the unbatched trace ``single``."""
    (leaves, td), (sl, std) = same_structure(
        [tr, single], lambda t: tree_flatten(replace(t, args=None, batch_size=None)))
    if std != td:
        raise ValueError("set_particle: the trace's structure differs from the batch's")
    out = []
    for x, s in zip(leaves, sl):
        s = mx.broadcast_to(s, x.shape[1:]).astype(x.dtype)[None]
        out.append(mx.concatenate([x[:i], s, x[i + 1:]], axis=0))
    return rebuild_particles(td, out, tr.args, tr.batch_size)


def vpropose(gf, key: mx.array, args: tuple, n: int):
    """n independent ``propose`` calls, batched: (choices with leading axis n, weights [n])."""
    keys = mx.random.split(key, n)
    box = {}

    def body(k):
        choices, w, _ = gf.propose(k, args)
        leaves, box["td"] = tree_flatten(choices)
        return [w] + leaves

    out = mx.vmap(body)(keys)
    return tree_unflatten(box["td"], out[1:]), out[0]


def vmap_particles(fn: Callable, key: mx.array, tr: Trace, *shared) -> Any:
    """Apply ``fn(key_i, trace_i, *shared)`` to every particle of batched ``tr`` as one
    vmapped computation. ``fn`` returns a pytree whose arrays get a leading axis n."""
    n = tr.batch_size
    keys = mx.random.split(key, n)
    leaves, td = flatten_particles(tr)
    args = tr.args
    box = {}

    def body(k, *flat):
        single = replace(tree_unflatten(td, list(flat)), args=args)
        out = fn(k, single, *shared)
        ol, box["td"] = tree_flatten(out)
        return ol

    out = mx.vmap(body)(keys, *leaves)
    return tree_unflatten(box["td"], out)


def strip_single(tr: Trace) -> Trace:
    return replace(tr, args=None, batch_size=None)


# -- choice maps and selections ----------------------------------------------------
def choice_paths(cm: ChoiceMap) -> list[tuple]:
    return [p for p, _ in cm.leaves()]


def covered(path: tuple, paths) -> bool:
    """Whether ``path`` equals, or lies below, one of ``paths``."""
    return any(path[: len(p)] == p for p in paths)


def selection_key(s: Selection):
    """A hashable description of a selection (equal for equal selections)."""
    if isinstance(s, AllSelection):
        return ("all",)
    if isinstance(s, NoneSelection):
        return ("none",)
    if isinstance(s, AddressSelection):
        items = sorted(((k, selection_key(v)) for k, v in s._trie.items()), key=repr)
        return ("addr", tuple(items))
    if isinstance(s, Complement):
        return ("not", selection_key(s.inner))
    if isinstance(s, Union):
        return ("or", selection_key(s.a), selection_key(s.b))
    if isinstance(s, Intersection):
        return ("and", selection_key(s.a), selection_key(s.b))
    return ("obj", s)


# -- compile cache --------------------------------------------------------------------
_CACHE: "OrderedDict[Any, tuple]" = OrderedDict()
_CACHE_SIZE = 256


def cached_call(fn: Callable, static_key: Any, payload: Any, *trees, compile: bool = True):
    """Call ``fn(payload, *trees)`` through a cached ``mx.compile``.

    ``trees`` are pytrees of arrays (traces, choice maps, keys, tuples); their array
    leaves are the compiled function's inputs and their treedefs (which hold every
    Python constant) are part of the cache key together with ``fn`` and ``static_key``.
    ``payload`` holds objects used only while tracing (models, selections); anything in
    it that changes the computation must be reflected in ``static_key``.
    """
    if not compile:
        return fn(payload, *trees)
    flats = [tree_flatten(t) for t in trees]
    cfn, box = compiled_flat(fn, static_key, payload, tuple(td for _, td in flats),
                             tuple(len(ls) for ls, _ in flats))
    out = cfn(*[x for ls, _ in flats for x in ls])
    return tree_unflatten(box["td"], out)


def compiled_flat(fn: Callable, static_key: Any, payload: Any, tds: tuple, counts: tuple):
    """The cached compiled function behind :func:`cached_call` for arguments of
    treedefs ``tds`` (with ``counts`` leaves each): ``(cfn, box)``, ``cfn(*leaves)``
    returning the flat output leaves, ``box["td"]`` their treedef (set by the first
    call). For hot loops that keep their state flat."""
    try:
        ckey = (fn, static_key, tds)
        hash(ckey)
    except TypeError:
        ckey = None
    entry = _CACHE.get(ckey) if ckey is not None else None
    if entry is not None:
        _CACHE.move_to_end(ckey)
        return entry
    box: dict = {}

    def flat_fn(*flat):
        it, rebuilt = 0, []
        for c, td in zip(counts, tds):
            rebuilt.append(tree_unflatten(td, list(flat[it:it + c])))
            it += c
        out = fn(payload, *rebuilt)
        ol, box["td"] = tree_flatten(out)
        return ol

    # parameters of neural GFs reachable from the payload are implicit inputs, so a
    # cached function sees the current weights after further training
    state = _module_states(payload)
    entry = (mx.compile(flat_fn, inputs=state) if state else mx.compile(flat_fn), box)
    if ckey is not None:
        _CACHE[ckey] = entry
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return entry


def _module_states(payload: Any) -> list:
    from genmlx.nn.params import find_modules

    return [m.state for m in find_modules(payload)]


def clear_compile_cache() -> None:
    """Forget every cached compiled inference function."""
    _CACHE.clear()
