"""Collecting the trainable parameters reachable from generative functions.

Discovery rule (static, no execution needed): starting from each given object,

* a :class:`NeuralNetGF` contributes its module; an ``mlx.nn.Module`` contributes itself;
* a trace contributes the modules of every ``NeuralNetGF`` sub-trace it holds;
* a ``@gm.gen`` function is inspected through its Python function: closure cells,
  default arguments, and the module-level globals its code (including nested functions
  and lambdas) refers to by name;
* any other generative function (combinators) is inspected through its attributes;
* lists, tuples and dicts among those are walked.

Modules are deduplicated by identity, and a module that is a sub-module of another
collected module is dropped (its parameters are already there), so every array appears
exactly once in the container returned by :func:`trainable`.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from genmlx.core.gfi import GenerativeFunction
from genmlx.core.trace import Trace


class Trainable(nn.Module):
    """A container module holding the discovered modules as ``self.modules_[i]``."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.modules_ = list(modules)

    def __call__(self, *args, **kwargs):
        raise TypeError("a gm.nn.Trainable container only holds parameters; call the GFs")


def find_modules(*objs) -> list[nn.Module]:
    """The distinct modules reachable from ``objs`` (see the module docstring)."""
    found: list[nn.Module] = []
    seen_mod: set[int] = set()
    seen: set[int] = set()
    for o in objs:
        _visit(o, found, seen_mod, seen)
    return _drop_nested(found)


def trainable(*gfs_or_modules) -> Trainable:
    """One ``mlx.nn.Module`` holding every module reachable from the given GFs, modules
    or traces, so that one optimizer trains them all:

    >>> params = gm.nn.trainable(model, guide)
    >>> loss_and_grad = nn.value_and_grad(params, loss_fn)
    """
    return Trainable(find_modules(*gfs_or_modules))


@contextlib.contextmanager
def frozen(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block the modules' parameters are ``stop_gradient``-ed copies, so
    computations through them carry no gradient to those parameters (used by DReG)."""
    mods = list(modules)
    saved = [m.parameters() for m in mods]
    try:
        for m, p in zip(mods, saved):
            m.update(tree_map(mx.stop_gradient, p))
        yield
    finally:
        for m, p in zip(mods, saved):
            m.update(p)


def _visit(o, found, seen_mod, seen) -> None:
    from genmlx.core.dynamic import DynamicGF
    from genmlx.nn.neural import NeuralNetGF

    if isinstance(o, nn.Module):
        if id(o) not in seen_mod:
            seen_mod.add(id(o))
            found.append(o)
        return
    if o is None or isinstance(o, (str, bytes, int, float, bool, mx.array, types.ModuleType, type)):
        return
    if id(o) in seen:
        return
    seen.add(id(o))
    if isinstance(o, NeuralNetGF):
        _visit(o.module, found, seen_mod, seen)
    elif isinstance(o, DynamicGF):
        _visit_function(o.fn, found, seen_mod, seen)
    elif isinstance(o, (types.FunctionType, types.MethodType)):
        _visit_function(o, found, seen_mod, seen)
    elif isinstance(o, GenerativeFunction):
        for v in vars(o).values():
            _visit(v, found, seen_mod, seen)
    elif isinstance(o, Trace):
        _visit_trace(o, found, seen_mod, seen)
    elif isinstance(o, (list, tuple, set, frozenset)):
        for v in o:
            _visit(v, found, seen_mod, seen)
    elif isinstance(o, dict):
        for v in o.values():
            _visit(v, found, seen_mod, seen)


def _visit_function(fn, found, seen_mod, seen) -> None:
    if isinstance(fn, types.MethodType):
        _visit(fn.__self__, found, seen_mod, seen)
        fn = fn.__func__
    for cell in fn.__closure__ or ():
        try:
            _visit(cell.cell_contents, found, seen_mod, seen)
        except ValueError:  # empty cell
            pass
    for d in fn.__defaults__ or ():
        _visit(d, found, seen_mod, seen)
    for d in (fn.__kwdefaults__ or {}).values():
        _visit(d, found, seen_mod, seen)
    g = fn.__globals__
    for name in _global_names(fn.__code__):
        if name in g:
            _visit(g[name], found, seen_mod, seen)


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_global_names(c))
    return names


def _visit_trace(tr, found, seen_mod, seen) -> None:
    from genmlx.nn.neural import NeuralTrace

    if isinstance(tr, NeuralTrace):
        _visit(tr.gen_fn, found, seen_mod, seen)
        return
    flat = getattr(type(tr), "_tree_flatten", None)
    if flat is None:
        return
    children, _ = tr._tree_flatten()
    for c in children:
        if isinstance(c, Trace):
            _visit_trace(c, found, seen_mod, seen)
        elif isinstance(c, dict):
            for v in c.values():
                if isinstance(v, Trace):
                    _visit_trace(v, found, seen_mod, seen)


def _drop_nested(mods: list[nn.Module]) -> list[nn.Module]:
    inner: set[int] = set()
    for m in mods:
        for sub in m.modules():
            if sub is not m:
                inner.add(id(sub))
    return [m for m in mods if id(m) not in inner]
