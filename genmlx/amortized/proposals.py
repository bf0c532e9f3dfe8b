"""Adapters for using a trained guide q(z | x) as a proposal in ``gm.inference``.

``importance_sampling`` and ``smc`` take the guide directly (``proposal=guide,
proposal_args=(x,)``). Custom-proposal MH calls its proposal as ``q(τ, *args)``;
:func:`mh_proposal` wraps a guide into such an *independence* proposal
q(z' | τ, x) = q(z' | x), for which the MH acceptance ratio is
p(x, z') q(z | x) / (p(x, z) q(z' | x)).
"""

from __future__ import annotations

from genmlx.core.gfi import GenerativeFunction


class IndependenceProposal(GenerativeFunction):
    """``proposal(trace, *args)`` behaves as ``guide(*args)`` (the trace is ignored)."""

    def __init__(self, guide: GenerativeFunction):
        if not isinstance(guide, GenerativeFunction):
            raise TypeError(f"mh_proposal: expected a generative function, got {type(guide).__name__}")
        self.guide = guide
        self.name = f"independence({getattr(guide, 'name', type(guide).__name__)})"

    def simulate(self, key, args):
        return self.guide.simulate(key, tuple(args)[1:])

    def generate(self, key, args, constraints):
        return self.guide.generate(key, tuple(args)[1:], constraints)

    def assess(self, args, choices):
        return self.guide.assess(tuple(args)[1:], choices)

    def propose(self, key, args):
        return self.guide.propose(key, tuple(args)[1:])


def mh_proposal(guide: GenerativeFunction) -> IndependenceProposal:
    """Wrap ``guide`` for ``gm.inference.mh(key, trace, mh_proposal(guide), (x,))``."""
    return IndependenceProposal(guide)
