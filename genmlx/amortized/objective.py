"""The common machinery of amortized objectives.

Setting: a model p_θ(z, x) and a guide q_φ(z | x), both generative functions. For one
data item x the model is called as ``model(*model_args)`` with observations
``observe(x)`` (a choice map), and the guide as ``guide(*guide_args(x))``; the guide's
choices must be exactly the model's unobserved choices (checked on the first call).

A *particle* is z ~ q_φ(· | x) with

    log w = log p_θ(x, z) − log q_φ(z | x),

and every objective works on the [B, K] arrays (data batch × particles) of log p,
log q and log q_sf (the log density of the guide's score-function choices, see
:mod:`genmlx.amortized.sites`), computed as ONE batched computation: the single-particle
function is ``mx.vmap``-ed over K particles and then over the B data items, with batched
base noise (:mod:`genmlx.amortized.particles`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import mlx.core as mx

from genmlx.amortized.particles import NoisePlans, batched_particles
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.gfi import GenerativeFunction
from genmlx.nn.params import Trainable, find_modules


def observe_x(x) -> ChoiceMap:
    """Default ``observe``: the data item is the choice at address ``"x"``."""
    return ChoiceMap.from_mapping({"x": x})


def guide_args_x(x) -> tuple:
    """Default ``guide_args``: the guide takes the data item as its only argument."""
    return (x,)


def tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def batch_size_of(data) -> int:
    leaf = data
    while isinstance(leaf, (dict, list, tuple)):
        leaf = next(iter(leaf.values())) if isinstance(leaf, dict) else leaf[0]
    if not isinstance(leaf, mx.array) or leaf.ndim < 1:
        raise ValueError("data must be an mx.array (or a dict of them) with a leading batch axis")
    return int(leaf.shape[0])


def logsumexp(a: mx.array, axis: int = -1) -> mx.array:
    """Stable log Σ exp along ``axis``, written out (MLX 0.32's compile fails when the
    LogSumExp primitive is applied to both an array and its stop_gradient)."""
    m = mx.stop_gradient(mx.max(a, axis=axis, keepdims=True))
    m = mx.where(mx.isfinite(m), m, 0.0)
    return mx.log(mx.sum(mx.exp(a - m), axis=axis)) + mx.squeeze(m, axis=axis)


def log_mean_exp(a: mx.array, axis: int = -1) -> mx.array:
    return logsumexp(a, axis=axis) - math.log(a.shape[axis])


def ess_of(log_w: mx.array, axis: int = -1) -> mx.array:
    """(Σ w)² / Σ w² = 1 / Σ w̃² along ``axis`` (w̃ = softmax(log w))."""
    w = mx.softmax(log_w, axis=axis)
    return 1.0 / mx.sum(w * w, axis=axis)


def mean_ess(log_w: mx.array, lse: mx.array) -> mx.array:
    """Mean over the leading axes of ESS = 1 / Σ_k w̃_k² (last axis), w̃_k = exp(log w_k − lse),
    from ``lse`` = logsumexp_k log w_k that a bound already computed: one fused elementwise
    kernel and two sums (``ess_of`` takes a softmax, a square, and a divide and mean on top)."""
    s = mx.sum(mx.exp(2.0 * (log_w - mx.expand_dims(lse, -1))), axis=-1)
    return mx.sum(1.0 / (s * s.size))


# Note on stop_gradient: MLX 0.32's mx.compile fails ("_Map_base::at") on a graph that
# applies the same operation to an array x and to stop_gradient(x) (e.g. exp(x) and
# exp(sg(x))). Metrics are therefore taken as sg(<node already in the loss graph>), and
# learning signals are built so that no op is duplicated on a stopped twin.


class Objective:
    """Base class: holds model, guide and the data-item conventions.

    Subclasses implement ``_loss_aux(key, data) -> (loss, metrics, aux)``; ``aux`` is
    passed to :meth:`update_state` after each optimizer step (running statistics).
    """

    name = "objective"
    trains_model = True

    def __init__(self, model: GenerativeFunction, guide: GenerativeFunction, *,
                 model_args: tuple = (), observe: Callable[[Any], ChoiceMap] = observe_x,
                 guide_args: Callable[[Any], tuple] = guide_args_x,
                 data_from: Callable[[ChoiceMap], Any] | None = None,
                 modules: tuple = (), check: bool = True):
        for label, gf in (("model", model), ("guide", guide)):
            if not isinstance(gf, GenerativeFunction):
                raise TypeError(f"{type(self).__name__}: {label} must be a generative function, "
                                f"got {type(gf).__name__}")
        if not callable(observe) or not callable(guide_args):
            raise TypeError(f"{type(self).__name__}: observe and guide_args must be callables of one data item")
        self.model, self.guide = model, guide
        self.model_args = tuple(model_args)
        self.observe, self.guide_args = observe, guide_args
        self._data_from = data_from
        self._extra_modules = list(modules)
        self._check = check
        self._checked = False
        self._container: Trainable | None = None
        self._noise_plans = NoisePlans()
        self.model_modules = find_modules(model)
        self.guide_modules = find_modules(guide)

    # -- parameters ----------------------------------------------------------------
    def trainable(self) -> Trainable:
        """One container module with every trained parameter (model — unless the
        objective does not train it —, guide, baselines); the same object every call."""
        if self._container is None:
            mods = (self.model_modules if self.trains_model else []) + self.guide_modules + self._extra_modules
            self._container = Trainable(find_modules(*mods))
        return self._container

    def update_state(self, aux: dict) -> None:
        """Apply running-statistics updates computed by ``_loss_aux`` (default: none)."""

    # -- the public loss -----------------------------------------------------------
    def loss(self, key: mx.array, data) -> tuple[mx.array, dict]:
        """(scalar loss, metrics): the loss is the batch mean of the negative surrogate
        whose gradient is this estimator's gradient; metrics are scalar arrays."""
        loss, metrics, _ = self._loss_aux(key, data)
        return loss, metrics

    def loss_aux(self, key: mx.array, data) -> tuple[mx.array, dict, dict]:
        """(loss, metrics, aux): :meth:`loss` plus the running-state update ``aux`` to
        pass to :meth:`update_state` after the optimizer step (for custom loops)."""
        return self._loss_aux(key, data)

    def _loss_aux(self, key, data):
        raise NotImplementedError

    # -- shared helpers --------------------------------------------------------------
    def _first_check(self, key, data) -> None:
        if self._check and not self._checked:
            from genmlx.amortized.coverage import check_coverage

            x0 = tree_map(lambda a: a[0], data)
            check_coverage(key, self.model, self.model_args, self.guide,
                           self.guide_args(x0), self.observe(x0))
            self._checked = True

    def _log_joint(self, x, latents: ChoiceMap) -> mx.array:
        """log p_θ(x, z) for one data item and one latent choice map."""
        lp, _ = self.model.assess(self.model_args, self.observe(x).merge(latents))
        return lp

    def _batched(self, fn: Callable, key: mx.array, data, K: int, particle_axis: bool = True):
        """``fn(key, x)`` (one particle, one data item → tuple of arrays) evaluated for
        K particles of each of the B data items: every output gets shape [B, K, …]
        ([B, …] with ``particle_axis=False`` and K = 1).
        One batched computation; the first GF ``fn`` runs draws its reparameterizable
        choices from batched base noise (:mod:`genmlx.amortized.particles`)."""
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"{type(self).__name__}: the number of particles K must be a positive int, got {K!r}")
        self._first_check(key, data)
        B = batch_size_of(data)
        return batched_particles(fn, key, data, B, K, self._noise_plans, particle_axis)

    def _data_item_from(self, choices: ChoiceMap):
        """The data item a model sample would be observed as (the inverse of observe)."""
        if self._data_from is not None:
            return self._data_from(choices)
        if self.observe is observe_x:
            return choices["x"]
        raise ValueError(
            f"{type(self).__name__}: simulated data need data_from=<choices → data item> when "
            "observe is not the default lambda x: gm.choicemap({'x': x})"
        )

    def _observed_paths(self, x) -> list[tuple]:
        return [p for p, _ in self.observe(x).leaves()]


def guide_particles(obj: Objective, key: mx.array, data, K: int, particle_axis: bool = True):
    """[B, K] arrays (log p(x, z), log q(z | x), log q_sf(z | x)) for z ~ q with pathwise
    gradients through reparameterized choices, and whether any score-function choice
    exists (log q_sf is then identically 0). [B] arrays with ``particle_axis=False`` and
    K = 1 (objectives whose arithmetic is shape-agnostic: one kernel fewer per output)."""
    box: dict = {}

    def particle(k, x):
        from genmlx.amortized.sites import score_function_log_q

        tr = obj.guide.simulate(k, obj.guide_args(x))
        lsf, box["has_sf"] = score_function_log_q(obj.guide, tr)
        return obj._log_joint(x, tr.choices), tr.score, lsf

    lp, lq, lsf = obj._batched(particle, key, data, K, particle_axis)
    return lp, lq, lsf, box["has_sf"]


def leave_one_out_mean(f: mx.array) -> mx.array:
    """For each k, the mean of f_j over j ≠ k (along the last axis, K ≥ 2)."""
    K = f.shape[-1]
    return (mx.sum(f, axis=-1, keepdims=True) - f) / (K - 1)
