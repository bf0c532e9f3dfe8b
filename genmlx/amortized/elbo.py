"""The evidence lower bound with reparameterized and score-function gradients.

    ELBO(x) = E_{z~q_φ(·|x)} [log p_θ(x, z) − log q_φ(z | x)].

Write z = (z_r, z_s): z_r reparameterized (z_r = g_φ(ε)), z_s drawn without a pathwise
gradient. With f = log p − log q,

    ∇ ELBO = E[ ∇ f(g_φ(ε), z_s) + f · ∇_φ log q_φ(z_s | parents) ],

(the total derivative of log q_s, parents included). The surrogate per particle is
f + sg(f − b) · log q_s, whose gradient has this expectation for any b independent of
the particle; with K > 1 particles b is the mean of f over the other K − 1 particles.
With ``analytic_kl=True`` the Monte Carlo term log p(z_a) − log q(z_a) of every
top-level latent address a where model and guide both use a distribution with a known
KL (Normal–Normal) is replaced by −KL(q_a ‖ p_a); this assumes the model's distribution
at a depends only on choices the guide samples before a (true for VAEs).
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.amortized.objective import Objective, guide_particles, leave_one_out_mean


class ELBO(Objective):
    """ELBO estimated with ``num_particles`` particles per data item.

    metrics: ``bound`` (batch mean of the ELBO estimate)."""

    name = "elbo"

    def __init__(self, model, guide, *, num_particles: int = 1, analytic_kl: bool = False, **kw):
        super().__init__(model, guide, **kw)
        self.K = int(num_particles)
        self.analytic_kl = bool(analytic_kl)

    def _loss_aux(self, key, data):
        if self.analytic_kl:
            from genmlx.amortized.kl import analytic_particles

            # keeps the [B, K] layout at K = 1: on [B] arrays MLX 0.32's mx.compile fails
            # ("_Map_base::at") on this graph (tests/amortized/test_linear_gaussian.py)
            lp, lq, lsf, has_sf = analytic_particles(self, key, data, self.K)
        else:
            lp, lq, lsf, has_sf = guide_particles(self, key, data, self.K, self.K > 1)
        f = lp - lq  # [B, K]; [B] when K = 1 (everything below is shape-agnostic then)
        # mean over the B × K particles as one sum times a constant (the mean of the
        # per-item means, since every item has K particles); the loss is −bound with the
        # sign folded into that constant: one reduction and one scalar op in the graph
        total = mx.sum(f)
        n = f.size
        if has_sf:
            signal = f - leave_one_out_mean(f) if self.K > 1 else f
            loss = (total + mx.sum(mx.stop_gradient(signal) * lsf)) * (-1.0 / n)
            bound = total * (1.0 / n)
        else:
            loss = total * (-1.0 / n)
            bound = -loss  # fuses with the loss's scaling into one kernel
        return loss, {"loss": loss, "bound": mx.stop_gradient(bound)}, {}
