"""Mask: a generative function switched on or off by a boolean argument.

``masked = gm.Mask(gf)`` is called as ``masked(active, *args)``. Active: it behaves as
``gf(*args)`` (same choices at the same addresses, same score and weights). Inactive: it
makes no choices, its score and every weight are 0, and constraints given to it are an
error (for a concrete ``active``).

    log p(τ; active, args) = active · log p_gf(τ; args).

The inner GF is always executed so the trace structure is static (``active`` may be a
per-particle array under vmap); score and weights are masked with ``mx.where``. The
return value is the inner return value (meaningless when inactive). With a concrete
``active`` in a single trace, ``tr.choices`` is empty when inactive; in a batched trace
it holds the inner choices of every particle (those of inactive particles are
meaningless; ``gm.unbatch(tr, i).choices`` is exact). Turning on in ``update`` generates
the inner GF from its prior with the constraints (w = w_generate); turning off removes
its choices (w = −old score, discard = old choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from genmlx.combinators._util import concrete, dress, merge_select, strip, where
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, default_argdiffs, is_no_change
from genmlx.core.errors import UnvisitedConstraintError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import project_subtrace
from genmlx.core.trace import Trace


def _zero(x):
    return mx.zeros_like(x)


@dataclass(frozen=True, eq=False)
class MaskTrace(Trace):
    gen_fn: Any
    args: tuple
    active_: mx.array
    sub: Any
    score_: mx.array
    batch_size: int | None = None

    @property
    def active(self) -> mx.array:
        return self.active_

    @property
    def retval(self):
        return self.sub.retval

    @property
    def score(self):
        return self.score_

    @property
    def choices(self) -> ChoiceMap:
        from genmlx.combinators.switch import uniform_value

        if uniform_value(self.active_) is False:
            return ChoiceMap.empty()
        return self.sub.choices

    def __getitem__(self, addr):
        return self.choices[addr]

    def _tree_flatten(self):
        return [self.args, self.active_, self.sub, self.score_], (self.gen_fn, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], children[1], children[2], children[3], aux[1])


@dataclass(frozen=True)
class Mask(GenerativeFunction):
    """``Mask(gf)`` called as ``mask(active, *args)``; see the module docstring."""

    inner: GenerativeFunction

    def __post_init__(self):
        from genmlx.combinators.family import as_gf

        object.__setattr__(self, "inner", as_gf(self.inner, "Mask"))

    @property
    def name(self) -> str:
        return f"Mask({getattr(self.inner, 'name', 'gf')})"

    def _active(self, args):
        if not args:
            raise ValueError(f"{self.name} is called as mask(active, *args)")
        a = args[0] if isinstance(args[0], mx.array) else mx.array(args[0])
        return a.astype(mx.bool_)

    def _check(self, active, cm):
        if not cm.is_empty() and active.ndim == 0 and concrete(active) is False:
            raise UnvisitedConstraintError([p for p, _ in cm.leaves()], f"{self.name} (inactive)")

    def simulate(self, key, args):
        args = tuple(args)
        a = self._active(args)
        sub = self.inner.simulate(key, args[1:])
        return MaskTrace(self, args, a, strip(sub), mx.where(a, sub.score, _zero(sub.score)))

    def generate(self, key, args, constraints):
        """w = active · w_gf."""
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        cm = _as_choicemap(constraints)
        a = self._active(args)
        self._check(a, cm)
        sub, w = self.inner.generate(key, args[1:], cm)
        score = mx.where(a, sub.score, _zero(sub.score))
        return MaskTrace(self, args, a, strip(sub), score), mx.where(a, w, _zero(w))

    def assess(self, args, choices):
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        cm = _as_choicemap(choices)
        a = self._active(args)
        if a.ndim == 0 and concrete(a) is not None:
            if not concrete(a):
                self._check(a, cm)
                tr = self.inner.simulate(mx.random.key(0), args[1:])
                return mx.zeros_like(tr.score), tr.retval
            return self.inner.assess(args[1:], cm)
        tr, _ = self.generate(mx.random.key(0), args, cm)
        return tr.score, tr.retval

    def _resolve(self, trace, args, argdiffs):
        if args is None:
            return trace.args, tuple(NoChange for _ in trace.args)
        args = tuple(args)
        return args, tuple(argdiffs) if argdiffs is not None else default_argdiffs(trace.args, args)

    def _update(self, key, trace, constraints, args, argdiffs):
        """on→on: the inner update; off→on: inner generate (w = w_gen); on→off:
        w = −old score, discard = old choices; off→off: w = 0."""
        from genmlx.core.dynamic import _as_choicemap

        cm = _as_choicemap(constraints)
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        if cm.is_empty() and all(is_no_change(d) for d in argdiffs):
            return trace, mx.zeros_like(trace.score_), NoChange, ChoiceMap.empty()
        ao, an = trace.active_, self._active(args)
        self._check(an, cm)
        k1, k2 = mx.random.split(key)
        old = dress(trace.sub, old_args[1:])
        tu, wu, rd, du = self.inner.update(k1, old, cm, args[1:], argdiffs[1:])
        co, cn = concrete(ao) if ao.ndim == 0 else None, concrete(an) if an.ndim == 0 else None
        if co is not None and cn is not None:
            if co and cn:
                return MaskTrace(self, args, an, strip(tu), tu.score), wu, rd, du
            if cn:  # off -> on
                tg, wg = self.inner.generate(k2, args[1:], cm)
                return MaskTrace(self, args, an, strip(tg), tg.score), wg, UnknownChange, ChoiceMap.empty()
            disc = trace.sub.choices if co else ChoiceMap.empty()
            w = -trace.score_ if co else mx.zeros_like(trace.score_)
            return MaskTrace(self, args, an, strip(tu), _zero(tu.score)), w, UnknownChange, disc
        tg, wg = self.inner.generate(k2, args[1:], cm)
        turn_on = an & ~ao
        sub = where(turn_on, strip(tg), strip(tu))
        zero = mx.zeros_like(wu)
        w = mx.where(ao & an, wu, mx.where(turn_on, wg, mx.where(ao & ~an, -trace.score_, zero)))
        score = mx.where(an, sub.score, _zero(sub.score))
        disc = merge_select([(ao & an, du), (ao & ~an, trace.sub.choices)])
        return MaskTrace(self, args, an, sub, score), w, UnknownChange, disc

    def _regenerate(self, key, trace, selection, args, argdiffs):
        """on→on: the inner regenerate's weight; otherwise 0 (new or removed choices
        are drawn from / returned to the prior)."""
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        if selection.is_empty() and all(is_no_change(d) for d in argdiffs):
            return trace, mx.zeros_like(trace.score_), NoChange
        ao, an = trace.active_, self._active(args)
        k1, k2 = mx.random.split(key)
        tr, wr, _ = self.inner.regenerate(k1, dress(trace.sub, old_args[1:]), selection, args[1:], argdiffs[1:])
        ts = self.inner.simulate(k2, args[1:])
        turn_on = an & ~ao
        sub = where(turn_on, strip(ts), strip(tr))
        score = mx.where(an, sub.score, _zero(sub.score))
        w = mx.where(ao & an, wr, mx.zeros_like(wr))
        return MaskTrace(self, args, an, sub, score), w, UnknownChange

    def _project(self, trace, selection):
        w = project_subtrace(dress(trace.sub, trace.args[1:]), selection)
        return mx.where(trace.active_, w, mx.zeros_like(w))
