"""Metropolis–Hastings on traces: selection MH and custom-proposal MH.

Selection MH resamples the selected choices from their priors with ``regenerate``;
its weight is the log MH ratio

    log α = log p(τ') − log p(τ) + log q(τ | τ') − log q(τ' | τ)   (= regenerate weight).

Custom-proposal MH: a GF ``q`` called as ``q(τ, *proposal_args)`` proposes new values
υ for some of the model's addresses. With τ', w, δ = update(τ, υ) (δ: the overwritten
old values),

    log α = w + log q(δ; τ', …) − log q(υ; τ, …),

the backward proposal scored with ``assess`` on the discard (valid when q's choices
are the same addresses in both directions, the usual case).

A batched trace (n chains) takes one vmapped step; acceptance is an ``mx.where`` over
the trace leaves and ``accepted`` is a bool array [n]. Each step is a cached
``mx.compile``d function of (key, trace, proposal arguments).
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from genmlx.core.gfi import GenerativeFunction
from genmlx.core.selection import Selection
from genmlx.core.trace import Trace
from genmlx.inference._util import cached_call, selection_key, strip_single, vmap_particles, where_trace


def _accept(key, log_alpha):
    u = mx.random.uniform(shape=log_alpha.shape, key=key)
    return mx.log(u) < log_alpha  # NaN log α rejects


def _select_single(key, tr: Trace, selection: Selection):
    k1, k2 = mx.random.split(key)
    new, w, _ = tr.gen_fn.regenerate(k1, tr, selection)
    acc = _accept(k2, w)
    return _merge(acc, new, tr), acc


def _proposal_single(key, tr: Trace, proposal: GenerativeFunction, proposal_args: tuple):
    k1, k2, k3 = mx.random.split(key, 3)
    fwd, q_fwd, _ = proposal.propose(k1, (tr, *proposal_args))
    new, w, _, discard = tr.gen_fn.update(k2, tr, fwd)
    q_bwd, _ = proposal.assess((new, *proposal_args), discard)
    acc = _accept(k3, w + q_bwd - q_fwd)
    return _merge(acc, new, tr), acc


def _merge(acc, new: Trace, old: Trace) -> Trace:
    return where_trace(acc, new, old)


def _step(payload, key, tr, proposal_args):
    kind, obj = payload
    if kind == "selection":
        single = lambda k, t: _select_single(k, t, obj)  # noqa: E731
    else:
        single = lambda k, t: _proposal_single(k, t, obj, proposal_args)  # noqa: E731
    if tr.batch_size is None:
        return single(key, tr)
    new, acc = vmap_particles(lambda k, t: tuple(_strip_out(single(k, t))), key, tr)
    return replace(new, args=tr.args, batch_size=tr.batch_size), acc


def _strip_out(res):
    t, acc = res
    return strip_single(t), acc


def mh(key: mx.array, trace: Trace, selection_or_proposal: Selection | GenerativeFunction,
       proposal_args: tuple | None = None, *, compile: bool = True) -> tuple[Trace, mx.array]:
    """One Metropolis–Hastings step. ``selection_or_proposal`` is a :class:`Selection`
    (resample those choices from the prior) or a proposal GF called as
    ``proposal(trace, *proposal_args)``. Returns ``(trace, accepted)``; for a batched
    trace of n chains ``accepted`` is a bool array [n]."""
    if isinstance(selection_or_proposal, Selection):
        if proposal_args:
            raise ValueError("mh: proposal_args were given with a selection (they apply to a proposal GF)")
        payload = ("selection", selection_or_proposal)
        skey = ("selection", selection_key(selection_or_proposal))
    elif isinstance(selection_or_proposal, GenerativeFunction):
        payload = ("proposal", selection_or_proposal)
        skey = payload
    else:
        raise TypeError(
            "mh: expected a Selection (gm.select(...)) or a proposal generative function, "
            f"got {type(selection_or_proposal).__name__}"
        )
    return cached_call(_step, skey, payload, key, trace, tuple(proposal_args or ()), compile=compile)
