"""NVIL (Mnih & Gregor 2014): single-sample score-function gradients with an
input-dependent baseline and running centring/scaling of the learning signal.

For z ~ q_φ(·|x) the learning signal is l = log p_θ(x, z) − log q_φ(z | x). With a
baseline network b_ψ(x), running mean c and running variance v of r = l − b_ψ(x),

    A = (l − c − b_ψ(x)) / max(1, √v),
    surrogate = l + sg(A) · log q_s(z | x)          (guide and model gradients)
    baseline loss = (sg(l) − c − b_ψ(x))²           (ψ gradient)

A does not depend on the particle beyond l (c, v come from previous steps), so the
guide gradient is unbiased for the ELBO gradient scaled by 1 / max(1, √v).
Reparameterized choices get pathwise gradients through l. After each optimizer step
c ← α c + (1−α) mean(r), v ← α v + (1−α) var(r) (:meth:`NVIL.update_state`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from genmlx.amortized.objective import Objective, guide_particles


class SignalStats(nn.Module):
    """Running mean and variance of NVIL's learning signal (frozen: not trained)."""

    def __init__(self):
        super().__init__()
        self.mean = mx.array(0.0)
        self.var = mx.array(1.0)
        self.freeze()


class NVIL(Objective):
    """Score-function ELBO gradients with baseline ``baseline`` (an ``mlx.nn.Module``
    mapping one data item to a scalar, or None), ``centre``/``scale`` running
    normalization with decay ``alpha``.

    metrics: ``bound`` (batch mean ELBO estimate), ``baseline_loss``, ``signal_mean``,
    ``signal_var``."""

    name = "nvil"

    def __init__(self, model, guide, *, baseline: nn.Module | None = None, centre: bool = True,
                 scale: bool = True, alpha: float = 0.8, baseline_weight: float = 1.0, **kw):
        if baseline is not None and not isinstance(baseline, nn.Module):
            from genmlx.nn.neural import NeuralNetGF

            if isinstance(baseline, NeuralNetGF):
                baseline = baseline.module
            else:
                raise TypeError(f"NVIL: baseline must be an mlx.nn.Module or None, got {type(baseline).__name__}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"NVIL: alpha must be in [0, 1), got {alpha}")
        self.baseline = baseline
        self.stats = SignalStats()
        mods = tuple(kw.pop("modules", ())) + ((baseline,) if baseline is not None else ()) + (self.stats,)
        super().__init__(model, guide, modules=mods, **kw)
        self.centre, self.scale, self.alpha = centre, scale, float(alpha)
        self.baseline_weight = float(baseline_weight)

    def _baseline_values(self, data) -> mx.array:
        if self.baseline is None:
            from genmlx.amortized.objective import batch_size_of

            return mx.zeros((batch_size_of(data),))
        return mx.vmap(lambda x: mx.reshape(self.baseline(x), ()))(data)

    def _loss_aux(self, key, data):
        lp, lq, lsf, has_sf = guide_particles(self, key, data, 1, particle_axis=False)
        l = lp - lq
        b = self._baseline_values(data)
        ls = mx.stop_gradient(l)
        c = self.stats.mean if self.centre else mx.array(0.0)
        resid = ls - c - b
        A = mx.stop_gradient(resid)
        if self.scale:
            A = A / mx.maximum(1.0, mx.sqrt(self.stats.var))
        bound = mx.mean(l)
        objective = bound + (mx.mean(A * lsf) if has_sf else 0.0)
        baseline_loss = mx.mean(resid * resid) if self.baseline is not None else mx.array(0.0)
        loss = -objective + self.baseline_weight * baseline_loss
        r = ls - mx.stop_gradient(b)
        aux = {"signal_mean": mx.mean(r), "signal_var": mx.var(r)}
        metrics = {"loss": loss, "bound": mx.stop_gradient(bound), "baseline_loss": mx.stop_gradient(baseline_loss),
                   "signal_mean": self.stats.mean, "signal_var": self.stats.var}
        return loss, metrics, aux

    def update_state(self, aux: dict) -> None:
        """c ← α c + (1−α) mean(r), v ← α v + (1−α) var(r)."""
        a = self.alpha
        self.stats.mean = a * self.stats.mean + (1 - a) * aux["signal_mean"]
        self.stats.var = a * self.stats.var + (1 - a) * aux["signal_var"]
