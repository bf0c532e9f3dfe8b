"""A distribution family (``gm.normal``, ``gm.bernoulli``, …) as a generative function of
its parameters, so it can be the kernel of a combinator: ``gm.Map(gm.normal)(mus, sigmas)``
makes one choice per element, at ``(i,)``.

``FamilyGF(family)(*params)`` makes a single choice at its root, distributed as
``family(*params)``; its trace is the family's ``DistTrace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genmlx.core.gfi import GenerativeFunction


@dataclass(frozen=True)
class FamilyGF(GenerativeFunction):
    """``family(*params)`` as a GF of ``params``; see the module docstring."""

    family: Any

    @property
    def name(self) -> str:
        return getattr(self.family, "name", getattr(self.family, "__name__", "distribution"))

    def _dist(self, args):
        from genmlx.distributions.base import Distribution

        d = self.family(*args)
        if not isinstance(d, Distribution):
            raise TypeError(f"{self.name}(*args) did not build a distribution")
        return d

    def simulate(self, key, args):
        return self._dist(args).simulate(key)

    def generate(self, key, args, constraints):
        return self._dist(args).generate(key, (), constraints)

    def assess(self, args, choices):
        return self._dist(args).assess((), choices)

    def _update(self, key, trace, constraints, args, argdiffs):
        args = trace.args if args is None else args
        tr, w, rd, d = self._dist(args)._update(key, trace, constraints, (), ())
        return tr, w, rd, d

    def _regenerate(self, key, trace, selection, args, argdiffs):
        args = trace.args if args is None else args
        return self._dist(args)._regenerate(key, trace, selection, (), ())

    def _project(self, trace, selection):
        import mlx.core as mx

        return trace.score if selection.is_all_here() else mx.zeros_like(trace.score)


def as_gf(g, who: str) -> GenerativeFunction:
    """``g`` itself when it is a generative function; a distribution family (class)
    wrapped as :class:`FamilyGF`; anything else is a ``TypeError`` naming ``who``."""
    from genmlx.distributions.base import Distribution

    if isinstance(g, GenerativeFunction):
        return g
    if isinstance(g, type) and issubclass(g, Distribution):
        return FamilyGF(g)
    raise TypeError(f"{who}: expected a generative function (e.g. @gm.gen) or a distribution "
                    f"family such as gm.normal, got {type(g).__name__}")
