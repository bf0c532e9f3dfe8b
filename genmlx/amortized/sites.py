"""Which of a guide's choices need score-function gradients.

A choice drawn from a distribution with ``reparameterized = True`` carries pathwise
gradients (x = g_φ(ε)); any other draw is stop-gradient-ed by ``Distribution.sample``
and its gradient must come from the score function ∇_φ log q_φ(x | parents). This
module walks a guide trace and returns the selection of the latter addresses; the
objectives then take log q_sf = ``guide.project(trace, selection)``, the summed log
density of exactly those choices (with gradients flowing through their parents).
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.core.selection import Selection, select, select_all, select_none
from genmlx.core.trace import Trace
from genmlx.distributions.base import DistTrace


class MixedSiteError(ValueError):
    """A combinator's sub-trace mixes reparameterized and non-reparameterized draws."""


def score_function_paths(tr: Trace, prefix: tuple = ()) -> list[tuple]:
    """Paths of the choices of ``tr`` whose distributions are not reparameterized."""
    from genmlx.core.dynamic import DynamicTrace
    from genmlx.nn.neural import NeuralTrace

    if isinstance(tr, DistTrace):
        return [] if tr.family.reparameterized else [prefix]
    if isinstance(tr, NeuralTrace):
        return []
    if isinstance(tr, DynamicTrace):
        out: list[tuple] = []
        for path, sub in tr.subtraces.items():
            out.extend(score_function_paths(sub, prefix + tuple(path)))
        return out
    families = _nested_families(tr)
    flags = {f.reparameterized for f in families}
    if flags == {False}:
        return [prefix]
    if flags == {True, False}:
        raise MixedSiteError(
            f"the sub-trace at {prefix!r} ({type(tr).__name__}) mixes reparameterized and "
            "score-function choices; the amortized objectives cannot tell its addresses apart. "
            "Split it into separate calls, one per kind of latent."
        )
    return []


def _nested_families(obj) -> set:
    out: set = set()
    if isinstance(obj, DistTrace):
        out.add(obj.family)
        return out
    if isinstance(obj, (list, tuple)):
        for c in obj:
            out |= _nested_families(c)
        return out
    if isinstance(obj, dict):
        for c in obj.values():
            out |= _nested_families(c)
        return out
    if getattr(type(obj), "_tree_flatten", None) is not None and isinstance(obj, Trace):
        children, _ = obj._tree_flatten()
        for c in children:
            out |= _nested_families(c)
    return out


def score_function_selection(tr: Trace) -> Selection:
    """The selection of ``tr``'s score-function choices (``select_none()`` if none)."""
    paths = score_function_paths(tr)
    if not paths:
        return select_none()
    if () in paths:
        return select_all()
    return select(*paths)


def score_function_log_q(guide, tr: Trace) -> tuple[mx.array, bool]:
    """(Σ log q of the score-function choices of ``tr``, whether there are any)."""
    sel = score_function_selection(tr)
    if sel.is_empty():
        return mx.zeros_like(tr.score), False
    return guide.project(tr, sel), True
