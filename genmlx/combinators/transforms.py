"""Argument and return-value transforms of a generative function.

``gm.contramap(gf, f)`` is the GF whose call ``h(*x)`` runs ``gf(*f(*x))``;
``gm.dimap(gf, f, g)`` additionally returns ``g(retval)``. ``f`` and ``g`` are
deterministic (array) functions; ``f`` returns the inner argument tuple (a non-tuple
is taken as the single argument). Choices, score and every weight are the inner GF's:

    log p_h(τ; x) = log p_gf(τ; f(x)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


from genmlx.combinators._util import dress, strip
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, default_argdiffs, is_no_change
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import project_subtrace
from genmlx.core.trace import Trace


@dataclass(frozen=True, eq=False)
class TransformTrace(Trace):
    gen_fn: Any
    args: tuple
    sub: Any  # the inner trace, arguments dropped
    batch_size: int | None = None

    @property
    def retval(self):
        return self.gen_fn._out(self.sub.retval)

    @property
    def score(self):
        return self.sub.score

    @property
    def choices(self) -> ChoiceMap:
        return self.sub.choices

    def __getitem__(self, addr):
        return self.sub[addr]

    def _tree_flatten(self):
        return [self.args, self.sub], (self.gen_fn, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], children[1], aux[1])


@dataclass(frozen=True)
class ArgRetTransform(GenerativeFunction):
    """``inner`` with arguments mapped by ``f`` and return value by ``g`` (either may
    be ``None`` for the identity). Built by :func:`contramap` and :func:`dimap`."""

    inner: GenerativeFunction
    f: Callable | None = None
    g: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.inner, GenerativeFunction):
            raise TypeError(f"contramap/dimap: expected a generative function, got {type(self.inner).__name__}")

    @property
    def name(self) -> str:
        return f"dimap({getattr(self.inner, 'name', 'gf')})"

    def _in(self, args) -> tuple:
        if self.f is None:
            return tuple(args)
        out = self.f(*args)
        return tuple(out) if isinstance(out, tuple) else (out,)

    def _out(self, r):
        return r if self.g is None else self.g(r)

    def simulate(self, key, args):
        args = tuple(args)
        return TransformTrace(self, args, strip(self.inner.simulate(key, self._in(args))))

    def generate(self, key, args, constraints):
        args = tuple(args)
        tr, w = self.inner.generate(key, self._in(args), constraints)
        return TransformTrace(self, args, strip(tr)), w

    def assess(self, args, choices):
        lp, r = self.inner.assess(self._in(tuple(args)), choices)
        return lp, self._out(r)

    def _inner_diffs(self, old_args, args, argdiffs):
        if args is None:
            return old_args, None, None
        args = tuple(args)
        if argdiffs is None:
            argdiffs = default_argdiffs(old_args, args)
        new_in = self._in(args)
        if all(is_no_change(d) for d in argdiffs):
            return args, new_in, tuple(NoChange for _ in new_in)
        return args, new_in, tuple(UnknownChange for _ in new_in)

    def _update(self, key, trace, constraints, args, argdiffs):
        args, new_in, diffs = self._inner_diffs(trace.args, args, argdiffs)
        old = dress(trace.sub, self._in(trace.args))
        tr, w, rd, disc = self.inner.update(key, old, constraints, new_in, diffs)
        rd = NoChange if is_no_change(rd) else UnknownChange
        return TransformTrace(self, args, strip(tr)), w, rd, disc

    def _regenerate(self, key, trace, selection, args, argdiffs):
        args, new_in, diffs = self._inner_diffs(trace.args, args, argdiffs)
        old = dress(trace.sub, self._in(trace.args))
        tr, w, rd = self.inner.regenerate(key, old, selection, new_in, diffs)
        rd = NoChange if is_no_change(rd) else UnknownChange
        return TransformTrace(self, args, strip(tr)), w, rd

    def _project(self, trace, selection):
        return project_subtrace(dress(trace.sub, self._in(trace.args)), selection)


def contramap(gf: GenerativeFunction, f: Callable) -> ArgRetTransform:
    """``h(*x) = gf(*f(*x))``: the same choices and density, arguments transformed."""
    return ArgRetTransform(gf, f, None)


def dimap(gf: GenerativeFunction, f: Callable | None, g: Callable | None) -> ArgRetTransform:
    """``h(*x)`` runs ``gf(*f(*x))`` and returns ``g(retval)``."""
    return ArgRetTransform(gf, f, g)


def map_retval(gf: GenerativeFunction, g: Callable) -> ArgRetTransform:
    """``h(*x)`` runs ``gf(*x)`` and returns ``g(retval)``."""
    return ArgRetTransform(gf, None, g)
