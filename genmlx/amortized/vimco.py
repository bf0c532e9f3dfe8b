"""VIMCO (Mnih & Rezende 2016): the K-particle bound L_K with leave-one-out control
variates for score-function (e.g. discrete) latents.

    ∇ L_K = E[ Σ_k w̃_k ∇ log w_k  +  Σ_k (L_K − L_{−k}) ∇_φ log q_s(z_k | x) ],

L_{−k} = log (1/K)(Σ_{j≠k} w_j + ŵ_{−k}) with ŵ_{−k} = exp(mean_{j≠k} log w_j): the bound
with particle k replaced by the geometric mean of the others, which does not depend on
z_k, so each control variate leaves the gradient unbiased. Reparameterized choices get
pathwise gradients through the first term. Needs K ≥ 2.
"""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.amortized.objective import (
    Objective,
    guide_particles,
    leave_one_out_mean,
    log_mean_exp,
    logsumexp,
    mean_ess,
)


def vimco_signals(log_w: mx.array, L: mx.array) -> mx.array:
    """L_K − L_{−k} for every k (last axis) from log weights [..., K] and L_K [...]."""
    K = log_w.shape[-1]
    L = L[..., None]
    geo = leave_one_out_mean(log_w)                       # [..., K]
    eye = mx.eye(K, dtype=mx.bool_)
    # M[..., k, j] = log w_j (j ≠ k), ŵ_{−k} (j = k)
    M = mx.where(eye, geo[..., :, None], log_w[..., None, :])
    L_loo = logsumexp(M, axis=-1) - math.log(K)
    return L - L_loo


class VIMCO(Objective):
    """Multi-sample bound with leave-one-out control variates.

    metrics: ``bound`` (batch mean of L_K), ``ess``."""

    name = "vimco"

    def __init__(self, model, guide, K: int = 5, **kw):
        super().__init__(model, guide, **kw)
        if int(K) < 2:
            raise ValueError(f"VIMCO needs K ≥ 2 particles (leave-one-out baselines), got K={K}")
        self.K = int(K)

    def _loss_aux(self, key, data):
        lp, lq, lsf, has_sf = guide_particles(self, key, data, self.K)
        log_w = lp - lq
        L = log_mean_exp(log_w)
        bound = mx.mean(L)
        objective = bound
        if has_sf:
            sig = vimco_signals(mx.stop_gradient(log_w), mx.stop_gradient(L))
            objective = objective + mx.mean(mx.sum(mx.stop_gradient(sig) * lsf, axis=-1))
        loss = -objective
        return loss, {"loss": loss, "bound": mx.stop_gradient(bound),
                      "ess": mx.stop_gradient(mean_ess(log_w, L + math.log(self.K)))}, {}
