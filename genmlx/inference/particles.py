"""A weighted particle collection: the result of importance sampling and SMC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from genmlx.core.trace import Trace
from genmlx.inference import resampling as R
from genmlx.inference._util import take_particles


@dataclass(frozen=True)
class WeightedParticles:
    """n weighted traces: ``traces`` (batched, or None when not kept) and
    ``log_weights`` [n] (unnormalized, on the scale of p(τ, obs)/q(τ)).

    ``log_marginal_likelihood`` = log (1/n Σ_i exp(lw_i)), an estimate of log p(obs)
    whose exponential is unbiased; ``ess`` = (Σ w)²/Σ w².
    """

    traces: Trace | None
    log_weights: mx.array

    @property
    def n(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def log_marginal_likelihood(self) -> mx.array:
        return R.log_mean_exp(self.log_weights)

    @property
    def ess(self) -> mx.array:
        return R.effective_sample_size(self.log_weights)

    @property
    def normalized_weights(self) -> mx.array:
        return R.normalized_weights(self.log_weights)

    def estimate(self, fn: Callable[[Trace], Any] | Any) -> mx.array:
        """Self-normalized estimate Σ_i w_i f(τ_i). ``fn`` maps the batched trace to an
        array with leading axis n, or is an address (the mean of that choice)."""
        self._need_traces()
        vals = fn(self.traces) if callable(fn) else self.traces[fn]
        vals = vals.astype(mx.float32)
        w = self.normalized_weights.reshape((-1,) + (1,) * (vals.ndim - 1))
        return mx.sum(w * vals, axis=0)

    def resample(self, key: mx.array, m: int | None = None, scheme: str = "multinomial") -> Trace:
        """A batched trace of m particles drawn by ``scheme`` in proportion to the weights."""
        self._need_traces()
        idx = R.resample_indices(key, self.log_weights, self.n if m is None else m, scheme)
        return take_particles(self.traces, idx)

    def _need_traces(self) -> None:
        if self.traces is None:
            raise ValueError("the traces were not kept (keep_traces=False); only weights are available")
