"""Importance-weighted bounds: IWAE and its doubly-reparameterized gradient (DReG).

With K particles z_k ~ q_φ(·|x), log w_k = log p_θ(x, z_k) − log q_φ(z_k|x) and
normalized weights w̃_k = w_k / Σ_j w_j,

    L_K(x) = log (1/K) Σ_k w_k  ≤ log p(x),   increasing in K.

IWAE gradient: ∇ L_K = E[ Σ_k w̃_k ∇ log w_k ] for reparameterized choices, plus the
score-function term L_K · Σ_k ∇ log q_s(z_k) for the others (no control variate; use
VIMCO for discrete latents).

DReG (Tucker et al. 2018), all choices reparameterized: for the guide

    ∇_φ L_K = E[ Σ_k w̃_k² ∂ log w_k/∂z_k · ∂z_k/∂φ ],

i.e. gradients through z only, with log q's parameters held fixed; for the model
∇_θ L_K = E[ Σ_k w̃_k ∇_θ log p_θ(x, z_k) ].
"""

from __future__ import annotations

import math

import mlx.core as mx

from genmlx.amortized.objective import Objective, guide_particles, log_mean_exp, mean_ess
from genmlx.nn.params import frozen


class IWAE(Objective):
    """Importance-weighted bound with K particles.

    metrics: ``bound`` (batch mean of L_K), ``ess`` (batch mean ESS of the K weights)."""

    name = "iwae"

    def __init__(self, model, guide, K: int = 5, **kw):
        super().__init__(model, guide, **kw)
        self.K = int(K)

    def _loss_aux(self, key, data):
        lp, lq, lsf, has_sf = guide_particles(self, key, data, self.K)
        log_w = lp - lq
        B, K = log_w.shape
        # L_K + log K = logsumexp_k log w (MLX's fused primitive: no stop_gradient twin of
        # log_w in this graph); batch mean and sign folded into one constant
        lse = mx.logsumexp(log_w, axis=-1)
        total = mx.sum(lse)
        if has_sf:  # plain score function with learning signal L_K
            L = lse - math.log(K)
            loss = (total + mx.sum(mx.stop_gradient(L) * mx.sum(lsf, axis=-1))) * (-1.0 / B) + math.log(K)
            bound = total * (1.0 / B) - math.log(K)
        else:
            loss = total * (-1.0 / B) + math.log(K)
            bound = -loss  # fuses with the loss's scaling into one kernel
        return loss, {"loss": loss, "bound": mx.stop_gradient(bound),
                      "ess": mx.stop_gradient(mean_ess(log_w, lse))}, {}


class DReG(IWAE):
    """IWAE bound with doubly-reparameterized guide gradients (all guide choices must be
    reparameterized). metrics: ``bound``, ``ess``."""

    name = "dreg"

    def _loss_aux(self, key, data):
        box: dict = {}

        def particle(k, x):
            from genmlx.amortized.sites import score_function_paths

            gargs = self.guide_args(x)
            tr = self.guide.simulate(k, gargs)
            sf = score_function_paths(tr)
            if sf:
                raise ValueError(
                    f"DReG needs reparameterized guide choices, but {sf[0]!r} is not; "
                    "use IWAE or VIMCO for discrete latents"
                )
            z = tr.choices
            with frozen(self.guide_modules):
                lq_path, _ = self.guide.assess(gargs, z)
            with frozen(self.model_modules):
                lp_path = self._log_joint(x, z)
            lp_model = self._log_joint(x, z.map_values(mx.stop_gradient))
            return lp_path - lq_path, lp_model

        log_w_path, lp_model = self._batched(particle, key, data, self.K)
        sg = mx.stop_gradient(log_w_path)
        w = mx.softmax(sg, axis=-1)
        w2 = w * w
        surrogate = mx.sum(w2 * log_w_path, axis=-1) + mx.sum(w * lp_model, axis=-1)
        loss = -mx.mean(surrogate)
        metrics = {"loss": loss, "bound": mx.mean(log_mean_exp(sg)),
                   "ess": mx.mean(1.0 / mx.sum(w2, axis=-1))}
        return loss, metrics, {}
