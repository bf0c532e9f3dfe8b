"""Dynamic generative functions: plain Python functions decorated with ``@gm.gen``.

The body may use any Python control flow and deterministic code; random choices and
calls to other GFs are made with ``gm.trace(addr, …)`` or ``invocation @ addr``. Each
GFI operation runs the body once under the matching handler of
:mod:`genmlx.core.handlers`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import mlx.core as mx

from genmlx.core.address import Path
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, is_no_change
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import (
    AssessHandler,
    GenerateHandler,
    RegenerateHandler,
    SimulateHandler,
    UpdateHandler,
    project_subtrace,
    run_with_handler,
)
from genmlx.core.selection import Selection
from genmlx.core.trace import StoredTrace


@dataclass(frozen=True, eq=False)
class DynamicTrace(StoredTrace):
    """Trace of a dynamic GF: the sub-trace recorded at each visited address path."""

    gen_fn: "DynamicGF"
    args: tuple
    retval_: Any
    score_: mx.array
    subtraces: dict = field(default_factory=dict)  # Path -> Trace
    batch_size: int | None = None

    @property
    def choices(self) -> ChoiceMap:
        cm = ChoiceMap.empty()
        for path, sub in self.subtraces.items():
            ch = sub.choices
            if not ch.is_empty():
                cm = cm.set_submap(path, ch)
        return cm

    def __getitem__(self, addr):
        from genmlx.core.address import to_path

        path = to_path(addr)
        for i in range(len(path), 0, -1):
            sub = self.subtraces.get(path[:i])
            if sub is None:
                continue
            rest = path[i:]
            if not rest:
                ch = sub.choices
                return ch.get_value() if ch.is_leaf() else sub.retval
            return sub[rest if len(rest) > 1 else rest[0]]
        return self.choices[addr]

    def _tree_flatten(self):
        paths = tuple(self.subtraces.keys())
        children = [self.args, self.retval_, self.score_] + [self.subtraces[p] for p in paths]
        return children, (self.gen_fn, paths, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        gen_fn, paths, batch_size = aux
        args, retval, score = children[:3]
        return cls(gen_fn, args, retval, score, dict(zip(paths, children[3:])), batch_size)


class DynamicGF(GenerativeFunction):
    """A generative function defined by a Python function (see :func:`gen`)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.name = getattr(fn, "__qualname__", getattr(fn, "__name__", "gen_fn"))
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        return f"<gm.gen {self.name}>"

    def _run(self, handler, args: tuple) -> DynamicTrace:
        args = tuple(args)
        retval = run_with_handler(handler, self.fn, args)
        return DynamicTrace(self, args, retval, handler.score, handler.subtraces)

    def simulate(self, key, args):
        """``tr = simulate(key, args)``: run the body, drawing every choice from its prior.
        ``tr.score`` = Σ_sites log p(v_site | parents)."""
        return self._run(SimulateHandler(self.name, key), args)

    def generate(self, key, args, constraints):
        """``tr, w = generate(key, args, σ)``; choices in σ take their given values, the
        rest are drawn from their priors, and w = Σ_{sites in σ} log p(σ_site | parents)
        (= log p(τ) − log q(τ \\ σ) with q the prior). Raises if σ has addresses the
        execution never visited."""
        constraints = _as_choicemap(constraints)
        h = GenerateHandler(self.name, key, constraints)
        tr = self._run(h, args)
        h.check_all_visited(constraints)
        return tr, h.weight

    def assess(self, args, choices):
        """``log_p, retval = assess(args, τ)`` with log_p = log p(τ; x); every choice the
        execution makes must be in τ, and τ may hold no other address."""
        choices = _as_choicemap(choices)
        h = AssessHandler(self.name, choices)
        retval = run_with_handler(h, self.fn, tuple(args))
        h.check_all_visited(choices)
        return h.score, retval

    def propose(self, key, args):
        """``choices, w, retval = propose(key, args)``: τ ~ p(·; x), w = log p(τ; x)."""
        tr = self.simulate(key, args)
        return tr.choices, tr.score, tr.retval

    def _update(self, key, trace, constraints, args, argdiffs):
        constraints = _as_choicemap(constraints)
        if args is None:
            args, argdiffs = trace.args, tuple(NoChange for _ in trace.args)
        if constraints.is_empty() and argdiffs is not None and all(map(is_no_change, argdiffs)):
            return trace, mx.array(0.0), NoChange, ChoiceMap.empty()
        h = UpdateHandler(self.name, key, trace, constraints)
        new = self._run(h, args)
        h.check_all_visited(constraints)
        h.finish_removed()
        return new, h.weight, UnknownChange, h.discard

    def _regenerate(self, key, trace, selection, args, argdiffs):
        if args is None:
            args, argdiffs = trace.args, tuple(NoChange for _ in trace.args)
        if selection.is_empty() and argdiffs is not None and all(map(is_no_change, argdiffs)):
            return trace, mx.array(0.0), NoChange
        h = RegenerateHandler(self.name, key, trace, selection)
        new = self._run(h, args)
        return new, h.weight, UnknownChange

    def _project(self, trace, selection: Selection):
        w = mx.array(0.0)
        for path, sub in trace.subtraces.items():
            w = w + project_subtrace(sub, selection.subselection(path))
        return w


def _as_choicemap(c) -> ChoiceMap:
    if c is None:
        return ChoiceMap.empty()
    if isinstance(c, ChoiceMap):
        return c
    if isinstance(c, dict):
        return ChoiceMap.from_mapping(c)
    raise TypeError(f"expected a ChoiceMap (gm.choicemap({{…}})), got {type(c).__name__}")


def gen(fn: Callable) -> DynamicGF:
    """Decorator: turn a Python function into a generative function.

    >>> @gm.gen
    ... def model(xs):
    ...     slope = gm.normal(0.0, 2.0) @ "slope"
    ...     return gm.trace("ys", gm.normal(slope * xs, 0.5))
    """
    return DynamicGF(fn)
