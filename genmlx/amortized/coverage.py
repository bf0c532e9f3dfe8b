"""Address coverage: a guide must propose exactly the model's latent addresses.

For observations σ (a choice map) and a guide sample τ_q, the model is run on σ ∪ τ_q.
It is an error when the guide proposes an address the model never visits, proposes an
observed address, or misses an address the model samples (a latent it then draws from
its prior, which silently changes every weight). Used by the amortized objectives and
by ``gm.inference`` when a guide is passed as a proposal.
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.errors import GenMLXError, UnvisitedConstraintError, format_address


class AddressCoverageError(GenMLXError, ValueError):
    """The guide's addresses do not match the model's unobserved addresses."""

    def __init__(self, missing: list, unknown: list, observed: list, guide_name: str, model_name: str):
        self.missing, self.unknown, self.observed = missing, unknown, observed
        lines = [f"guide '{guide_name}' does not cover the latents of model '{model_name}':"]
        if missing:
            lines.append("  latent addresses the guide does not propose: "
                         + ", ".join(format_address(p) for p in missing))
        if unknown:
            lines.append("  addresses the guide proposes that the model does not have: "
                         + ", ".join(format_address(p) for p in unknown))
        if observed:
            lines.append("  addresses the guide proposes that are observed: "
                         + ", ".join(format_address(p) for p in observed))
        super().__init__("\n".join(lines))


def check_coverage(key: mx.array, model, model_args: tuple, guide, guide_args: tuple,
                   observations: ChoiceMap) -> None:
    """Raise :class:`AddressCoverageError` unless the guide's choices are exactly the
    model's unobserved choices (checked on one guide sample; nothing is evaluated)."""
    k1, k2 = mx.random.split(key)
    proposed = guide.simulate(k1, tuple(guide_args)).choices
    prop_paths = [p for p, _ in proposed.leaves()]
    obs_paths = [p for p, _ in observations.leaves()]
    obs_set = set(obs_paths)
    clash = [p for p in prop_paths if _under_any(p, obs_set) or any(_under_any(o, {p}) for o in obs_paths)]
    if clash:
        raise AddressCoverageError([], [], clash, _name(guide), _name(model))
    try:
        tr, _ = model.generate(k2, tuple(model_args), observations.merge(proposed))
    except UnvisitedConstraintError as e:
        unvisited = [tuple(p) for p in getattr(e, "addresses", [])]
        unknown = [p for p in prop_paths if any(p[:len(u)] == u or u[:len(p)] == p for u in unvisited)]
        if not unknown:  # an observation the model does not visit
            raise
        raise AddressCoverageError([], unknown, [], _name(guide), _name(model)) from None
    given = set(prop_paths) | obs_set
    missing = [p for p, _ in tr.choices.leaves() if not _under_any(p, given)]
    if missing:
        raise AddressCoverageError(missing, [], [], _name(guide), _name(model))


def _under_any(p: tuple, prefixes: set) -> bool:
    return any(p[:i] in prefixes for i in range(1, len(p) + 1))


def _name(gf) -> str:
    return getattr(gf, "name", type(gf).__name__)
