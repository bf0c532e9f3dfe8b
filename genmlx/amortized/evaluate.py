"""Evaluation of a guide as an importance-sampling proposal.

For a data item x and K proposals z_k ~ q(·|x), log w_k = log p(x, z_k) − log q(z_k|x),

    log p̂(x) = log (1/K) Σ_k w_k        (exp of it is unbiased for p(x); K = 5000 as in
                                          the IWAE paper's test log-likelihoods),
    ESS/K    = (Σ w)² / (K Σ w²),
    k̂        = Pareto shape of the largest weights (PSIS; < 0.5 good, > 0.7 unreliable).

Particles are drawn in chunks (``chunk_size`` per data item, ``batch_size`` data items at
a time) and combined with a running log-sum-exp, so memory is bounded for any K.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from genmlx.amortized.objective import Objective, batch_size_of, tree_map


class _Pair(Objective):
    name = "proposal"


def _as_objective(obj) -> Objective:
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, tuple) and 2 <= len(obj) <= 5:
        model, guide, *rest = obj
        kw = {}
        names = ["observe", "guide_args", "model_args"]
        for n, v in zip(names, rest):
            kw[n] = v
        return _Pair(model, guide, **kw)
    raise TypeError("expected an objective or a tuple (model, guide[, observe[, guide_args[, model_args]]])")


def _log_weights_chunk(obj: Objective, key, data, K: int) -> mx.array:
    def particle(k, x):
        tr = obj.guide.simulate(k, obj.guide_args(x))
        z = tr.choices.map_values(mx.stop_gradient)
        return mx.stop_gradient(obj._log_joint(x, z) - tr.score)

    return obj._batched(particle, key, data, K)


def importance_log_weights(key, objective_or_pair, data, K: int, chunk_size: int = 1000,
                           batch_size: int = 100) -> np.ndarray:
    """log w [N, K] of the guide as proposal for every data item (float64 NumPy)."""
    obj = _as_objective(objective_or_pair)
    N = batch_size_of(data)
    rows = []
    for b0 in range(0, N, batch_size):
        xb = tree_map(lambda a: a[b0:b0 + batch_size], data)
        cols = []
        for c0 in range(0, K, chunk_size):
            key, sub = mx.random.split(key)
            lw = _log_weights_chunk(obj, sub, xb, min(chunk_size, K - c0))
            mx.eval(lw)
            cols.append(np.asarray(lw, dtype=np.float64))
        rows.append(np.concatenate(cols, axis=1))
    return np.concatenate(rows, axis=0)


def log_marginal_likelihood(key: mx.array, objective_or_pair, data, K: int = 5000,
                            chunk_size: int = 500, batch_size: int = 50) -> tuple[float, float]:
    """(mean over data items of log p̂(x), its standard error over the items).

    ``objective_or_pair`` is an objective (its model, guide, observe, guide_args are used)
    or a tuple ``(model, guide, observe, guide_args[, model_args])``. Only K × batch_size
    particles live at a time (in chunks of ``chunk_size``): memory is bounded for K = 5000."""
    obj = _as_objective(objective_or_pair)
    N = batch_size_of(data)
    vals = []
    for b0 in range(0, N, batch_size):
        xb = tree_map(lambda a: a[b0:b0 + batch_size], data)
        acc = None
        for c0 in range(0, K, chunk_size):
            key, sub = mx.random.split(key)
            lw = _log_weights_chunk(obj, sub, xb, min(chunk_size, K - c0))
            lse = mx.logsumexp(lw, axis=-1)
            acc = lse if acc is None else mx.logaddexp(acc, lse)
            mx.eval(acc)
        vals.append(np.asarray(acc - math.log(K), dtype=np.float64))
    v = np.concatenate(vals)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def proposal_diagnostics(key: mx.array, objective_or_pair, data, K: int = 1000,
                         chunk_size: int = 1000) -> dict:
    """Guide-as-proposal quality over the data items: ``ess_per_n`` (mean ESS/K),
    ``khat`` (mean PSIS k̂), ``khat_max``, and ``frac_khat_gt_0.7``."""
    from genmlx.diagnostics import psis_khat

    lw = importance_log_weights(key, objective_or_pair, data, K, chunk_size)
    w = np.exp(lw - lw.max(axis=1, keepdims=True))
    ess = w.sum(axis=1) ** 2 / (w * w).sum(axis=1) / K
    khat = np.array([psis_khat(row) for row in lw])
    return {"ess_per_n": float(ess.mean()), "khat": float(np.mean(khat)),
            "khat_max": float(np.max(khat)), "frac_khat_gt_0.7": float(np.mean(khat > 0.7))}
