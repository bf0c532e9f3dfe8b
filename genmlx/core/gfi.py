"""The generative function interface (GFI).

Notation (Gen's): a GF with arguments x defines a density p(τ; x) over choice maps τ
and an internal proposal q(τ; x, σ) over the choices not fixed by constraints σ. Its
*score* is always log p(τ; x). Every GF implements the seven operations below; the
vectorized ``vsimulate``/``vgenerate`` and the batched forms of ``update``,
``regenerate`` and ``project`` come for free from :mod:`genmlx.core.vectorize`, which
runs the single-trace operation under ``mx.vmap`` (the body executes once for all n).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.errors import MissingChoiceError
from genmlx.core.selection import Selection
from genmlx.core.trace import Trace


class Invocation:
    """A GF applied to arguments, waiting for an address: ``model(a, b) @ "sub"``."""

    __slots__ = ("gen_fn", "args")

    def __init__(self, gen_fn: "GenerativeFunction", args: tuple):
        self.gen_fn = gen_fn
        self.args = tuple(args)

    def __matmul__(self, addr):
        from genmlx.core.handlers import trace

        return trace(addr, self)

    def __repr__(self) -> str:
        return f"Invocation({self.gen_fn!r}, {len(self.args)} args)"


class GenerativeFunction:
    """Abstract generative function. Subclasses implement the single-trace operations
    ``simulate``, ``generate``, ``assess`` (optional: defaults via generate),
    ``_update``, ``_regenerate`` and ``_project``; batched traces are routed to
    :mod:`genmlx.core.vectorize` by the public ``update``/``regenerate``/``project``."""

    name: str = "gen_fn"

    def __call__(self, *args) -> Invocation:
        return Invocation(self, args)

    # -- the seven operations ----------------------------------------------------
    def simulate(self, key: mx.array, args: tuple) -> Trace:
        """``tr = simulate(key, args)``: sample τ ~ p(·; x); ``tr.score`` = log p(τ; x)."""
        raise NotImplementedError

    def generate(self, key: mx.array, args: tuple, constraints: ChoiceMap) -> tuple[Trace, mx.array]:
        """``tr, w = generate(key, args, σ)``: τ ⊇ σ with the unconstrained part drawn
        from q(·; x, σ), and

            w = log p(τ; x) − log q(τ \\ σ; x, σ).

        For GFs whose internal proposal is the prior (dynamic GFs, combinators),
        w = log p(σ | its parents) — the log density of the constrained choices.
        No constraints give w = 0; all choices constrained give w = log p(τ; x).
        """
        raise NotImplementedError

    def assess(self, args: tuple, choices: ChoiceMap) -> tuple[mx.array, Any]:
        """``log_density, retval = assess(args, τ)``: log p(τ; x) for a complete τ."""
        tr, w = self.generate(mx.random.key(0), args, choices)
        self._check_complete(tr, choices)
        return tr.score, tr.retval

    def propose(self, key: mx.array, args: tuple) -> tuple[ChoiceMap, mx.array, Any]:
        """``choices, w, retval = propose(key, args)``: τ ~ p(·; x), w = log p(τ; x)."""
        tr = self.simulate(key, args)
        return tr.choices, tr.score, tr.retval

    def update(self, key: mx.array, trace: Trace, constraints: ChoiceMap,
               args: tuple | None = None, argdiffs: tuple | None = None):
        """``tr', w, retdiff, discard = update(key, tr, σ, args', argdiffs)``.

        The new trace τ' takes the values in σ, keeps the old values at the other
        addresses that still exist under x', and draws choices that are new (exist
        only under x') from the internal proposal. ``discard`` holds the old values
        that were overwritten or no longer exist (δ). Then

            w = log p(τ'; x') − log p(τ; x) − log q(τ' new choices; x', …),

        which for prior proposals is Σ_retained [log p'(v) − log p(v)] +
        Σ_new-constrained log p'(v) − Σ_removed log p(v). ``args=None`` keeps the
        trace's arguments; ``argdiffs`` default to NoChange/UnknownChange by identity.
        """
        from genmlx.core import vectorize

        if trace.batch_size is not None:
            return vectorize.batched_update(self, key, trace, constraints, args, argdiffs)
        return self._update(key, trace, constraints, args, argdiffs)

    def regenerate(self, key: mx.array, trace: Trace, selection: Selection,
                   args: tuple | None = None, argdiffs: tuple | None = None):
        """``tr', w, retdiff = regenerate(key, tr, S, args', argdiffs)``.

        Resamples the selected choices S (and choices new under x') from the prior;
        the other choices keep their values. As an MH proposal q(τ'; τ) this has

            w = log p(τ'; x') − log p(τ; x) + log q(τ; τ') − log q(τ'; τ)
              = Σ_{unselected retained} [log p'(v) − log p(v)],

        since selected, new and removed choices are drawn from their priors in both
        directions and cancel. With unchanged arguments, exp(w) is the MH ratio.
        """
        from genmlx.core import vectorize

        if trace.batch_size is not None:
            return vectorize.batched_regenerate(self, key, trace, selection, args, argdiffs)
        return self._regenerate(key, trace, selection, args, argdiffs)

    def project(self, trace: Trace, selection: Selection) -> mx.array:
        """``w = project(tr, S)``: the log density of the selected choices given the
        rest under the internal proposal; for prior proposals Σ_{v ∈ S} log p(v | parents).
        ``project(tr, select_all()) = tr.score``; ``project(tr, select_none()) = 0``."""
        from genmlx.core import vectorize

        if trace.batch_size is not None:
            return vectorize.batched_project(self, trace, selection)
        return self._project(trace, selection)

    # -- vectorized forms ----------------------------------------------------------
    def vsimulate(self, key: mx.array, args: tuple, n: int) -> Trace:
        """n independent ``simulate`` calls as one batched computation (body runs once)."""
        from genmlx.core import vectorize

        return vectorize.vsimulate(self, key, args, n)

    def vgenerate(self, key: mx.array, args: tuple, constraints: ChoiceMap, n: int):
        """n independent ``generate`` calls as one batched computation: returns the
        batched trace and weights ``[n]``. Each constraint leaf is shared by all
        particles or, with a leading axis ``n``, per particle."""
        from genmlx.core import vectorize

        return vectorize.vgenerate(self, key, args, constraints, n)

    # -- hooks for subclasses --------------------------------------------------------
    def _update(self, key, trace, constraints, args, argdiffs):
        raise NotImplementedError(f"{type(self).__name__} does not implement update")

    def _regenerate(self, key, trace, selection, args, argdiffs):
        raise NotImplementedError(f"{type(self).__name__} does not implement regenerate")

    def _project(self, trace, selection):
        raise NotImplementedError(f"{type(self).__name__} does not implement project")

    def _check_complete(self, tr: Trace, choices: ChoiceMap) -> None:
        given = {p for p, _ in choices.leaves()}
        missing = [p for p, _ in tr.choices.leaves() if p not in given]
        if missing:
            raise MissingChoiceError(
                f"assess needs every choice, but none was given here (function '{self.name}')",
                missing[0],
            )

    def __getstate__(self):
        raise TypeError("generative functions are not pickled; save guides with gm.amortized.save_guide")
