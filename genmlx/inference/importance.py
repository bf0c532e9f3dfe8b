"""Importance sampling and importance resampling with any generative function as proposal.

With observations y and a proposal q over the model's latent choices x,

    lw_i = log p(x_i, y; args) − log q(x_i; proposal_args),   x_i ~ q,

computed as the model's ``generate`` weight with every latent and observation
constrained (= log p(x_i, y)) minus the proposal's ``propose`` weight. Without a
proposal the model's internal (prior) proposal is used and lw_i = log p(y | x_i).
Then Ẑ = (1/n) Σ exp(lw_i) is an unbiased estimate of p(y).

All n particles are one batched (vmapped) computation, compiled per chunk with the
PRNG key as an input; very large n is processed in chunks of ``chunk_size`` whose
log-weights are concatenated (log Ẑ = logsumexp over all chunks − log n).
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.dynamic import _as_choicemap
from genmlx.core.errors import GenMLXError, format_address
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.pytree import tree_flatten
from genmlx.core.trace import Trace
from genmlx.core.vectorize import unbatch
from genmlx.inference._util import cached_call, choice_paths, concat_particles, covered, vpropose
from genmlx.inference.particles import WeightedParticles


class ProposalCoverageError(GenMLXError, ValueError):
    """A proposal's choices do not match the model's latent (unobserved) addresses."""

    def __init__(self, missing: list, extra: list, observed: list, proposal_name: str, model_name: str):
        self.missing, self.extra, self.observed = missing, extra, observed
        parts = []
        if missing:
            parts.append(f"does not propose the model's latent address(es) {_names(missing)}")
        if extra:
            parts.append(f"proposes address(es) {_names(extra)} that the model does not make")
        if observed:
            parts.append(f"proposes observed address(es) {_names(observed)}")
        super().__init__(f"proposal '{proposal_name}' for model '{model_name}' " + "; ".join(parts))


def _names(paths) -> str:
    return ", ".join(format_address(p) for p in paths)


def _name(gf) -> str:
    return getattr(gf, "name", type(gf).__name__)


def check_proposal_coverage(model: GenerativeFunction, args: tuple, observations: ChoiceMap,
                            proposal: GenerativeFunction, proposal_args: tuple = (),
                            key: mx.array | None = None) -> None:
    """Raise :class:`ProposalCoverageError` unless the proposal's choices are exactly the
    model's unobserved addresses. Runs each GF once lazily (nothing is evaluated)."""
    key = mx.random.key(0) if key is None else key
    observations = _as_choicemap(observations)
    obs = choice_paths(observations)
    model_paths = choice_paths(model.simulate(key, tuple(args)).choices)
    prop_paths = choice_paths(proposal.simulate(key, tuple(proposal_args)).choices)
    observed = [p for p in prop_paths if covered(p, obs)]
    extra = [p for p in prop_paths if not covered(p, model_paths) and p not in observed]
    missing = [p for p in model_paths if not covered(p, obs) and not covered(p, prop_paths)]
    if missing or extra or observed:
        raise ProposalCoverageError(missing, extra, observed, _name(proposal), _name(model))


def _is_chunk(payload, key, args, observations, proposal_args):
    """One batched chunk: (batched trace, log-weights [n])."""
    model, proposal, n = payload
    k_prop, k_model = mx.random.split(key)
    if proposal is None:
        return model.vgenerate(k_model, args, observations, n)
    choices, q = vpropose(proposal, k_prop, proposal_args, n)
    tr, w = model.vgenerate(k_model, args, observations.merge(choices), n)
    return tr, w - q


def importance_sampling(key: mx.array, model: GenerativeFunction, args: tuple, observations,
                        n: int, proposal: GenerativeFunction | None = None,
                        proposal_args: tuple | None = None, *, chunk_size: int | None = None,
                        keep_traces: bool = True, compile: bool = True) -> WeightedParticles:
    """Importance sampling with n particles (see the module docstring for the weights).

    Returns a :class:`WeightedParticles` with ``.traces`` (batched), ``.log_weights`` [n],
    ``.log_marginal_likelihood``, ``.ess`` and ``.resample(key, m)``. ``chunk_size`` bounds
    the particles processed at once; ``keep_traces=False`` keeps only the weights (memory
    O(n) floats for any model).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"importance_sampling: n must be a positive int, got {n!r}")
    args = tuple(args)
    observations = _as_choicemap(observations)
    proposal_args = tuple(proposal_args or ())
    if proposal is not None:
        check_proposal_coverage(model, args, observations, proposal, proposal_args, key)
    else:
        # one plain (unvmapped, uncompiled) execution: parameter validation and unknown
        # observation addresses raise their clear errors here, not inside vmap/compile
        model.generate(key, args, observations)
    c = n if chunk_size is None else int(chunk_size)
    if c < 1:
        raise ValueError(f"importance_sampling: chunk_size must be positive, got {chunk_size!r}")
    sizes = [c] * (n // c) + ([n % c] if n % c else [])
    keys = mx.random.split(key, len(sizes)) if len(sizes) > 1 else [key]
    traces, lws = [], []
    for k, size in zip(keys, sizes):
        tr, lw = cached_call(_is_chunk, (model, proposal, size), (model, proposal, size),
                             k, args, observations, proposal_args, compile=compile)
        if len(sizes) > 1:
            mx.eval(lw, tree_flatten(tr)[0] if keep_traces else [])  # bound the graph per chunk
        lws.append(lw)
        if keep_traces:
            traces.append(tr)
    lw = lws[0] if len(lws) == 1 else mx.concatenate(lws)
    tr = None if not keep_traces else (traces[0] if len(traces) == 1 else concat_particles(traces))
    return WeightedParticles(tr, lw)


def importance_resampling(key: mx.array, model: GenerativeFunction, args: tuple, observations,
                          n: int, proposal: GenerativeFunction | None = None,
                          proposal_args: tuple | None = None, *, m: int | None = None,
                          scheme: str = "multinomial", chunk_size: int | None = None,
                          compile: bool = True) -> tuple[Trace, mx.array]:
    """Sampling importance resampling: run :func:`importance_sampling` with n particles
    and draw in proportion to the weights. Returns ``(trace, log_ml)``: a single
    (unbatched) trace when ``m`` is None, else a batched trace of m draws, and the
    log marginal-likelihood estimate log Ẑ."""
    k_is, k_res = mx.random.split(key)
    res = importance_sampling(k_is, model, args, observations, n, proposal, proposal_args,
                              chunk_size=chunk_size, compile=compile)
    if m is None:
        return unbatch(res.resample(k_res, 1, scheme), 0), res.log_marginal_likelihood
    return res.resample(k_res, m, scheme), res.log_marginal_likelihood
