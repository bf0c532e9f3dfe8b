"""Finite mixtures: p(x) = Σₖ wₖ pₖ(x), a marginal density (the component index is
not a choice)."""

from __future__ import annotations

import mlx.core as mx

from genmlx.core.indexing import row
from genmlx.distributions import constraints as C
from genmlx.distributions._util import categorical_sample
from genmlx.distributions.base import Distribution, param


class Mixture(Distribution):
    """Finite mixture ``mixture(weights, components)`` or ``mixture(logits=…, components=…)``.

    ``components`` is either a list of K distributions of identical shape (any
    families, e.g. two normals and a student_t), or ONE distribution whose rightmost
    batch axis indexes the K components (``mixture(w, gm.normal(mus, sigmas))`` with
    ``mus`` of shape [K]). ``weights`` is a probability vector over the last axis (shape
    [..., K], leading axes broadcast to the components' batch shape); ``logits`` are
    normalised by logsumexp.

    log p(x) = logsumexp_k(log wₖ + log pₖ(x)). Sampling draws k ~ categorical(w) and
    returns the k-th component's draw (not reparameterized). The support is the first
    component's (all are assumed to share it).
    """

    name = "mixture"
    reparameterized = False

    def __init__(self, weights=None, components=None, *, logits=None):
        if components is None:
            raise ValueError("mixture: 'components' is required (a list of distributions or one batched distribution)")
        if (weights is None) == (logits is None):
            raise ValueError("mixture: give exactly one of 'weights' and 'logits'")
        if isinstance(components, Distribution):
            self._stacked = components
            self.components = None
            if len(components.batch_shape) < 1:
                raise ValueError(
                    "mixture: a single batched component distribution needs a batch axis "
                    "indexing the components"
                )
            k = components.batch_shape[-1]
            comp_batch = components.batch_shape[:-1]
            event_shape = components.event_shape
            first = components
        else:
            comps = list(components)
            if not comps or not all(isinstance(c, Distribution) for c in comps):
                raise ValueError("mixture: 'components' must be a non-empty list of distributions")
            shapes = {c.shape for c in comps}
            if len(shapes) != 1:
                raise ValueError(f"mixture: components must have identical shapes, got {sorted(shapes)}")
            self._stacked = None
            self.components = comps
            k = len(comps)
            comp_batch = comps[0].batch_shape
            event_shape = comps[0].event_shape
            first = comps[0]
        pname = "weights" if weights is not None else "logits"
        raw = param(weights if weights is not None else logits)
        if raw.ndim < 1 or raw.shape[-1] != k:
            raise ValueError(
                f"mixture: parameter '{pname}' must have a last axis of length {k} (one per "
                f"component), got shape {tuple(raw.shape)}"
            )
        try:
            ok = tuple(mx.broadcast_shapes(tuple(raw.shape[:-1]), tuple(comp_batch))) == tuple(comp_batch)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"mixture: parameter '{pname}' batch shape {tuple(raw.shape[:-1])} does not "
                f"broadcast to the components' batch shape {tuple(comp_batch)}"
            )
        self.arg_constraints = {pname: C.simplex if pname == "weights" else C.real_vector}
        self.log_weights = mx.log(raw) if pname == "weights" else raw
        self.log_weights = self.log_weights - mx.logsumexp(self.log_weights, axis=-1, keepdims=True)
        self.num_components = k
        self.event_ndim = len(event_shape)
        self.discrete = first.discrete
        self._first = first
        self._init({pname: raw}, tuple(comp_batch), tuple(event_shape))

    @property
    def support(self):
        return self._first.support

    def _component_log_probs(self, x):
        """log pₖ(x) stacked on a last axis of length K."""
        if self._stacked is not None:
            ne = len(self.event_shape)
            return self._stacked.log_prob(mx.expand_dims(x, -ne - 1))
        return mx.stack([c.log_prob(x) for c in self.components], axis=-1)

    def _log_prob(self, x):
        return mx.logsumexp(self.log_weights + self._component_log_probs(x), axis=-1)

    def _sample(self, key, shape):
        ne = len(self.event_shape)
        sample_shape = tuple(shape[: len(shape) - len(self.shape)])
        k_idx, k_comp = mx.random.split(key)
        idx = categorical_sample(k_idx, self.log_weights, sample_shape + self.batch_shape)
        idx = idx.reshape(idx.shape + (1,) * ne)
        if self._stacked is not None:
            xs = self._stacked.sample(k_comp, sample_shape)  # sample + batch + (K,) + event
            sel = mx.take_along_axis(xs, mx.expand_dims(idx, -ne - 1).astype(mx.int32), axis=-ne - 1)
            return mx.squeeze(sel, axis=-ne - 1)
        keys = mx.random.split(k_comp, self.num_components)
        out = None
        for i, c in enumerate(self.components):
            xi = c.sample(row(keys, i), sample_shape)
            out = xi if out is None else mx.where(idx == i, xi, out)
        return out


mixture = Mixture
