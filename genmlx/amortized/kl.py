"""Closed-form KL divergences and the analytic-KL variant of the ELBO particles.

    KL(N(m₁, s₁²) ‖ N(m₂, s₂²)) = log(s₂/s₁) + (s₁² + (m₁ − m₂)²) / (2 s₂²) − ½.

``register_kl(P, Q, fn)`` adds a pair; ``fn(q, p)`` returns elementwise KL(q ‖ p).
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from genmlx.core.dynamic import DynamicGF, _as_choicemap
from genmlx.core.handlers import AssessHandler, run_with_handler
from genmlx.distributions.base import Distribution
from genmlx.distributions.continuous import Normal

_KL: dict[tuple[type, type], Callable] = {}


def register_kl(q_family: type, p_family: type, fn: Callable) -> None:
    """Register ``fn(q, p) -> KL(q ‖ p)`` (elementwise) for a pair of families."""
    _KL[(q_family, p_family)] = fn


def _kl_normal_normal(q: Normal, p: Normal) -> mx.array:
    r = q.sigma / p.sigma
    return -mx.log(r) + 0.5 * (r * r + ((q.mu - p.mu) / p.sigma) ** 2) - 0.5


register_kl(Normal, Normal, _kl_normal_normal)


def kl_divergence(q: Distribution, p: Distribution) -> mx.array:
    """KL(q ‖ p), elementwise over the batch shape."""
    fn = _KL.get((type(q), type(p)))
    if fn is None:
        raise NotImplementedError(f"no closed-form KL({q.name} ‖ {p.name}) is registered")
    return fn(q, p)


class _Recorder(AssessHandler):
    """An assess handler that also records the distribution used at each top-level site."""

    def __init__(self, fn_name, choices):
        super().__init__(fn_name, choices)
        self.dists: dict = {}

    def step(self, path, gen_fn, args):
        if isinstance(gen_fn, Distribution):
            self.dists[path] = gen_fn
        return super().step(path, gen_fn, args)


def _assess_recording(gf, args, choices):
    if not isinstance(gf, DynamicGF):
        raise TypeError(f"analytic_kl needs @gm.gen model and guide, got {type(gf).__name__}")
    h = _Recorder(gf.name, _as_choicemap(choices))
    run_with_handler(h, gf.fn, tuple(args))
    h.check_all_visited(choices)
    return h.score, h.dists


def analytic_particles(obj, key, data, K: int, particle_axis: bool = True):
    """Like ``guide_particles``, but log p carries the correction
    −KL(q_a ‖ p_a) − (log p_a(z_a) − log q_a(z_a)) at every top-level address a with a
    registered KL, so that log p − log q is the analytic-KL ELBO integrand."""
    box: dict = {}

    def particle(k, x):
        from genmlx.amortized.sites import score_function_log_q

        gargs = obj.guide_args(x)
        tr = obj.guide.simulate(k, gargs)
        z = tr.choices
        lsf, box["has_sf"] = score_function_log_q(obj.guide, tr)
        _, q_d = _assess_recording(obj.guide, gargs, z)
        lp, p_d = _assess_recording(obj.model, obj.model_args, obj.observe(x).merge(z))
        corr = mx.array(0.0)
        n = 0
        for path, q in q_d.items():
            p = p_d.get(path)
            if p is None or (type(q), type(p)) not in _KL:
                continue
            v = z[path]
            kl = mx.sum(mx.broadcast_to(kl_divergence(q, p), v.shape))
            corr = corr - kl - (p._score(v) - q._score(v))
            n += 1
        box["n"] = n
        return lp + corr, tr.score, lsf

    lp, lq, lsf = obj._batched(particle, key, data, K, particle_axis)
    if box.get("n", 0) == 0:
        raise ValueError("analytic_kl=True, but no latent address has a closed-form KL between "
                         "the guide's and the model's distributions (registered: "
                         + ", ".join(f"{a.__name__}–{b.__name__}" for a, b in _KL) + ")")
    return lp, lq, lsf, box["has_sf"]
