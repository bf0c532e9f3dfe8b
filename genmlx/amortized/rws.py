"""Reweighted wake-sleep (Bornschein & Bengio 2015) and neural importance sampling
(inference compilation, Le et al. 2017; Gen's ``train!``).

Wake phase, K particles z_k ~ q_φ(·|x) (no pathwise gradient), normalized weights
w̃_k ∝ p_θ(x, z_k) / q_φ(z_k | x):

    wake-p:  ∇_θ ≈ Σ_k w̃_k ∇_θ log p_θ(x, z_k)        (the IWAE model gradient)
    wake-q:  ∇_φ ≈ Σ_k w̃_k ∇_φ log q_φ(z_k | x)       (inclusive KL(p(z|x) ‖ q) at x)
Sleep phase, (z, x) ~ p_θ:
    sleep-q: ∇_φ = ∇_φ log q_φ(z | x)                  (inclusive KL, averaged over p(x))

NeuralIS is sleep-q alone with a fixed model: it minimizes E_{p(x)} KL(p(z|x) ‖ q_φ(z|x)),
so the guide is amortized over all data the model can produce.
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.amortized.objective import (
    Objective,
    batch_size_of,
    log_mean_exp,
)
from genmlx.core.selection import select


def _sleep_log_q(obj: Objective, key: mx.array, n: int) -> mx.array:
    """log q_φ(z_i | x_i) for n pairs (z_i, x_i) ~ p_θ simulated without gradients."""

    def one(k):
        ch = obj.model.simulate(k, obj.model_args).choices.map_values(mx.stop_gradient)
        x = obj._data_item_from(ch)
        obs = [p for p, _ in obj.observe(x).leaves()]
        latents = ch.filter(~select(*obs))
        lq, _ = obj.guide.assess(obj.guide_args(x), latents)
        return lq

    return mx.vmap(one)(mx.random.split(key, n))


class RWS(Objective):
    """Reweighted wake-sleep with K wake particles; ``wake_p``, ``wake_q``, ``sleep_q``
    switch the three updates (sleep uses as many model samples as the batch has items).

    metrics: ``bound`` (IWAE bound of the wake particles), ``ess``, and ``sleep_log_q``
    when the sleep phase is on."""

    name = "rws"

    def __init__(self, model, guide, K: int = 5, *, wake_p: bool = True, wake_q: bool = True,
                 sleep_q: bool = False, **kw):
        super().__init__(model, guide, **kw)
        if not (wake_p or wake_q or sleep_q):
            raise ValueError("RWS: switch on at least one of wake_p, wake_q, sleep_q")
        self.K = int(K)
        self.wake_p, self.wake_q, self.sleep_q = wake_p, wake_q, sleep_q
        self.trains_model = wake_p

    def _loss_aux(self, key, data):
        k_wake, k_sleep = mx.random.split(key)

        def particle(k, x):
            gargs = self.guide_args(x)
            z = self.guide.simulate(k, gargs).choices.map_values(mx.stop_gradient)
            lq, _ = self.guide.assess(gargs, z)
            return self._log_joint(x, z), lq

        lp, lq = self._batched(particle, k_wake, data, self.K)
        log_w = mx.stop_gradient(lp - lq)
        w = mx.softmax(log_w, axis=-1)
        surrogate = mx.zeros(log_w.shape[:1])
        if self.wake_p:
            surrogate = surrogate + mx.sum(w * lp, axis=-1)
        if self.wake_q:
            surrogate = surrogate + mx.sum(w * lq, axis=-1)
        loss = -mx.mean(surrogate)
        metrics = {"bound": mx.mean(log_mean_exp(log_w)), "ess": mx.mean(1.0 / mx.sum(w * w, axis=-1))}
        if self.sleep_q:
            lq_sleep = _sleep_log_q(self, k_sleep, batch_size_of(data))
            sleep = mx.mean(lq_sleep)
            loss = loss - sleep
            metrics["sleep_log_q"] = mx.stop_gradient(sleep)
        metrics["loss"] = loss
        return loss, metrics, {}


class NeuralIS(Objective):
    """Guide trained on (z, x) ~ p simulated from the (fixed) model by maximizing
    log q_φ(z | x): the inclusive KL amortized over data. ``loss(key, data)`` simulates
    as many pairs as ``data`` has items (an int is accepted too); the data values are
    not used. Only the guide is trained.

    metrics: ``log_q`` (mean log q_φ(z|x) of the simulated pairs)."""

    name = "neural_is"
    trains_model = False

    def _loss_aux(self, key, data):
        n = data if isinstance(data, int) else batch_size_of(data)
        lq = _sleep_log_q(self, key, n)
        loss = -mx.mean(lq)
        return loss, {"loss": loss, "log_q": -mx.stop_gradient(loss)}, {}
