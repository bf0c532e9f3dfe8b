"""Address coverage: a guide must propose exactly the model's latent addresses.

The check is shared with ``gm.inference`` (guides used as proposals in
``importance_sampling``/``smc``/``mh``): it is
:func:`genmlx.inference.importance.check_proposal_coverage`, which raises
``ProposalCoverageError`` (exported here as ``AddressCoverageError``) when the guide
misses a latent address, proposes an address the model does not have, or proposes an
observed address.
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.inference.importance import ProposalCoverageError as AddressCoverageError
from genmlx.inference.importance import check_proposal_coverage


def check_coverage(key: mx.array, model, model_args: tuple, guide, guide_args: tuple,
                   observations: ChoiceMap) -> None:
    """Raise :class:`AddressCoverageError` unless the guide's choices are exactly the
    model's unobserved choices (each GF run once, lazily; nothing is evaluated)."""
    check_proposal_coverage(model, tuple(model_args), observations, guide, tuple(guide_args), key)


__all__ = ["AddressCoverageError", "check_coverage"]
