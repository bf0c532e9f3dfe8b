"""Discrete distributions."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from genmlx.distributions import constraints as C
from genmlx.distributions.base import Distribution, param


class Bernoulli(Distribution):
    """Bernoulli(p) on {0, 1} (values as bool arrays): log p(x) = x log p + (1 − x) log(1 − p).
    Give ``p`` or ``logits``."""

    name = "bernoulli"
    discrete = True

    def __init__(self, p=None, *, logits=None):
        if (p is None) == (logits is None):
            raise ValueError("bernoulli: give exactly one of 'p' and 'logits'")
        if logits is not None:
            self.logits = param(logits)
            self.p = mx.sigmoid(self.logits)
            self.arg_constraints = {"logits": C.real}
            self._init({"logits": self.logits})
        else:
            self.p = param(p)
            self.logits = mx.log(self.p) - mx.log1p(-self.p)
            self.arg_constraints = {"p": C.interval(0.0, 1.0, closed=True)}
            self._init({"p": self.p})

    @property
    def support(self):
        return C.boolean

    def _sample(self, key, shape):
        return mx.random.uniform(shape=shape, key=key) < self.p

    def _log_prob(self, x):
        x = x.astype(mx.float32)
        # stable in logits: x·l − softplus(l)
        return x * self.logits - nn.softplus(self.logits)

    def mean(self):
        return mx.broadcast_to(self.p, self.shape)

    def variance(self):
        return mx.broadcast_to(self.p * (1 - self.p), self.shape)


bernoulli = Bernoulli
flip = Bernoulli
