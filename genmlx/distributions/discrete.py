"""Discrete distributions. Counts and indices are int32 arrays; bernoulli values are
bool. ``log_prob`` accepts ints, floats or bools and returns −inf off the support."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from genmlx.core.batchwise import batchwise, example_sum
from genmlx.distributions import constraints as C
from genmlx.distributions._counting import binomial_sample, poisson_sample
from genmlx.distributions._gamma import standard_gamma
from genmlx.distributions._categories import logsumexp_categories, pick_category
from genmlx.distributions._util import as_float, batch_shape, categorical_sample, check, open_uniform
from genmlx.distributions.base import Distribution, param
from genmlx.distributions.special import log_binomial_pmf, log_poisson_pmf

_UNIT = C.interval(0.0, 1.0, closed=True)


def _is_int(x):
    return mx.floor(x) == x


class Bernoulli(Distribution):
    """Bernoulli(p) on {0, 1} (values as bool arrays): log p(x) = x log p + (1 − x) log(1 − p).
    Give ``p`` or ``logits`` (log p − log(1 − p))."""

    name = "bernoulli"
    discrete = True

    def __init__(self, p=None, *, logits=None, shape=None):
        if (p is None) == (logits is None):
            raise ValueError("bernoulli: give exactly one of 'p' and 'logits'")
        self._from_logits = logits is not None
        if self._from_logits:
            self.logits = param(logits)
            self.p = mx.sigmoid(self.logits)
            self.arg_constraints = {"logits": C.real}
            ps = {"logits": self.logits}
        else:
            self.p = param(p)
            self.logits = mx.log(self.p) - mx.log1p(-self.p)
            self.arg_constraints = {"p": _UNIT}
            ps = {"p": self.p}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.boolean

    def _sample(self, key, shape):
        return mx.random.uniform(shape=shape, key=key) < self.p

    def _log_prob(self, x):
        xf = as_float(x)
        if self._from_logits:  # x·l − softplus(l), stable in the logits
            lp = xf * self.logits - nn.softplus(self.logits)
        else:  # exact at p = 0 and p = 1
            lp = mx.where(xf == 1, mx.log(self.p), mx.log1p(-self.p))
        # support {0, 1}: + 0 inside, + (−∞) outside. Added rather than selected: the term
        # depends on x alone, so the backward pass never reads it and mx.compile fuses it
        # into the density's forward kernel when x has the parameters' shape (a select
        # keeps its mask alive for the backward: one more kernel). With x shared by a
        # vmapped particle axis it stays one small kernel on x (evaluating it at the
        # particles' shape instead would save that launch but cost ~8% of a CPU IWAE step).
        # x(1 − x) = 0 exactly iff x ∈ {0, 1} in floating point (for |x| < 2⁻²⁵, 1 − x
        # rounds to 1 and the product is x; elsewhere both factors are ≥ 2⁻²⁵ in size;
        # ±∞ and NaN give ≠ 0), and it is cheaper than two comparisons and an or. A value
        # that is not finite, or so large that x·l overflows, gives NaN in the logits form
        # (lp is NaN or +∞ there) and −∞ otherwise: never a finite log-mass.
        return lp + mx.where(xf * (1 - xf) == 0, 0.0, -mx.inf)

    def _score(self, value):
        """Σ log p(value); from logits one :func:`_bernoulli_logits_score` (under genmlx's
        vmap computed on the batched arrays: no per-constant broadcast/reshape nodes)."""
        if self._from_logits:
            return _bernoulli_logits_score(None, self.logits, value)
        return super()._score(value)

    def mean(self):
        return mx.broadcast_to(self.p, self.shape)

    def variance(self):
        return mx.broadcast_to(self.p * (1 - self.p), self.shape)


@batchwise
def _bernoulli_logits_score(batch, static, logits, x):
    """Σ (x·l − softplus(l)) per example, −∞ off the support (see ``Bernoulli._log_prob``)."""
    xf = as_float(x)
    lp = xf * logits - nn.softplus(logits)
    return example_sum(lp + mx.where(xf * (1 - xf) == 0, 0.0, -mx.inf), batch)


class Binomial(Distribution):
    """Binomial(n, p) on {0, …, n}:
    log p(k) = log Γ(n+1) − log Γ(k+1) − log Γ(n−k+1) + k log p + (n − k) log(1 − p),
    evaluated in Loader's saddle-point form (relative error ~1e-6 in float32)."""

    name = "binomial"
    arg_constraints = {"n": C.nonnegative_integer, "p": _UNIT}
    discrete = True

    def __init__(self, n, p, *, shape=None):
        self.n, self.p = param(n), param(p)
        ps = {"n": self.n, "p": self.p}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.integer_interval(0, self.n)

    def _sample(self, key, shape):
        return binomial_sample(key, self.n, self.p, shape)

    def _log_prob(self, x):
        k = as_float(x)
        n, p = self.n, self.p
        inside = (k >= 0) & (k <= n) & _is_int(k)
        ks = mx.where(inside, k, 0.0)
        return mx.where(inside, log_binomial_pmf(ks, n, p, integer=True), -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.n * self.p, self.shape)

    def variance(self):
        return mx.broadcast_to(self.n * self.p * (1 - self.p), self.shape)


class Poisson(Distribution):
    """Poisson(rate λ) on {0, 1, …}: log p(k) = k log λ − λ − log Γ(k + 1)."""

    name = "poisson"
    arg_constraints = {"rate": C.nonnegative}
    discrete = True

    def __init__(self, rate, *, shape=None):
        self.rate = param(rate)
        ps = {"rate": self.rate}
        self._init(ps, batch_shape(self.name, ps, shape))

    @property
    def support(self):
        return C.nonnegative_integer

    def _sample(self, key, shape):
        return poisson_sample(key, self.rate, shape)

    def _log_prob(self, x):
        k = as_float(x)
        inside = (k >= 0) & _is_int(k)
        ks = mx.where(inside, k, 0.0)
        return mx.where(inside, log_poisson_pmf(ks, self.rate), -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.rate, self.shape)

    def variance(self):
        return mx.broadcast_to(self.rate, self.shape)


class Geometric(Distribution):
    """Geometric(p): the number of FAILURES k ∈ {0, 1, …} before the first success
    (success probability p): log p(k) = k log(1 − p) + log p. (scipy's ``geom`` counts
    trials: ours equals ``scipy.stats.geom(p, loc=-1)``.) x = ⌊log u / log(1 − p)⌋."""

    name = "geometric"
    arg_constraints = {"p": C.Interval(0.0, 1.0, closed=True)}
    discrete = True

    def __init__(self, p, *, shape=None):
        self.p = param(p)
        ps = {"p": self.p}
        self._init(ps, batch_shape(self.name, ps, shape))

    def _validate(self):
        super()._validate()
        check(self.name, self.p > 0, "parameter 'p' must be > 0")

    @property
    def support(self):
        return C.nonnegative_integer

    def _sample(self, key, shape):
        u = open_uniform(key, shape)
        return mx.floor(mx.log(u) / mx.log1p(-self.p)).astype(mx.int32)

    def _log_prob(self, x):
        k = as_float(x)
        inside = (k >= 0) & _is_int(k)
        ks = mx.where(inside, k, 0.0)
        lp = mx.where(ks > 0, ks * mx.log1p(-self.p), 0.0) + mx.log(self.p)
        return mx.where(inside, lp, -mx.inf)

    def mean(self):
        return mx.broadcast_to((1 - self.p) / self.p, self.shape)

    def variance(self):
        return mx.broadcast_to((1 - self.p) / self.p**2, self.shape)


class NegBinomial(Distribution):
    """Negative binomial(r, p): the number of FAILURES k before the r-th success, p the
    success probability (= ``scipy.stats.nbinom(r, p)``; mean r(1 − p)/p):
    log p(k) = log Γ(k + r) − log Γ(r) − log Γ(k + 1) + r log p + k log(1 − p).
    r may be any positive real. Sampled as Poisson(λ), λ ~ Gamma(r, rate p/(1 − p))."""

    name = "neg_binomial"
    arg_constraints = {"r": C.positive, "p": C.Interval(0.0, 1.0, closed=True)}
    discrete = True

    def __init__(self, r, p, *, shape=None):
        self.r, self.p = param(r), param(p)
        ps = {"r": self.r, "p": self.p}
        self._init(ps, batch_shape(self.name, ps, shape))

    def _validate(self):
        super()._validate()
        check(self.name, self.p > 0, "parameter 'p' must be > 0")

    @property
    def support(self):
        return C.nonnegative_integer

    def _sample(self, key, shape):
        kg, kp = mx.random.split(key)
        g = mx.stop_gradient(standard_gamma(kg, mx.stop_gradient(self.r), shape))
        lam = g * (1.0 - self.p) / self.p
        return poisson_sample(kp, lam, shape)

    def _log_prob(self, x):
        k = as_float(x)
        inside = (k >= 0) & _is_int(k)
        ks = mx.where(inside, k, 0.0)
        r, p = self.r, self.p
        # NB(k; r, p) = r/(k + r) · Binomial(r; k + r, p), in Loader's accurate form
        lp = mx.log(r / (ks + r)) + log_binomial_pmf(r, ks + r, p)
        return mx.where(inside, lp, -mx.inf)

    def mean(self):
        return mx.broadcast_to(self.r * (1 - self.p) / self.p, self.shape)

    def variance(self):
        return mx.broadcast_to(self.r * (1 - self.p) / self.p**2, self.shape)


class Categorical(Distribution):
    """Categorical over {0, …, K−1} (int32 indices): log p(k) = log probs[k]. Give
    ``probs`` (last axis on the simplex) or ``logits`` (normalised by logsumexp); the
    leading axes are batch axes."""

    name = "categorical"
    discrete = True

    def __init__(self, probs=None, *, logits=None, shape=None):
        if (probs is None) == (logits is None):
            raise ValueError("categorical: give exactly one of 'probs' and 'logits'")
        if logits is not None:
            raw = param(logits)
            pname = "logits"
            self.arg_constraints = {"logits": C.real_vector}
        else:
            raw = param(probs)
            pname = "probs"
            self.arg_constraints = {"probs": C.simplex}
        if raw.ndim < 1:
            raise ValueError(f"categorical: parameter '{pname}' needs a last axis indexing the categories, got a scalar")
        if logits is not None:
            self.logits = raw - mx.expand_dims(logsumexp_categories(raw), -1)
        else:
            self.logits = mx.log(raw)
        self.probs = mx.exp(self.logits)
        ps = {pname: raw}
        self._init(ps, batch_shape(self.name, ps, shape, {pname: 1}))

    @property
    def num_categories(self) -> int:
        return self.logits.shape[-1]

    @property
    def support(self):
        return C.integer_interval(0, self.num_categories - 1)

    def _sample(self, key, shape):
        return categorical_sample(key, self.logits, shape)

    def _log_prob(self, x):
        x = x if isinstance(x, mx.array) else mx.array(x)
        xi = x.astype(mx.int32)
        k = self.num_categories
        inside = (xi >= 0) & (xi < k) & (as_float(x) == as_float(xi))
        idx = mx.where(inside, xi, 0)
        out_shape = tuple(mx.broadcast_shapes(tuple(idx.shape), self.logits.shape[:-1]))
        lp = pick_category(mx.broadcast_to(self.logits, out_shape + (k,)), mx.broadcast_to(idx, out_shape))
        return mx.where(mx.broadcast_to(inside, out_shape), lp, -mx.inf)

    def mean(self):
        raise NotImplementedError("categorical: indices have no meaningful mean")


class DiscreteUniform(Distribution):
    """Uniform over the integers {low, …, high} (both inclusive):
    log p(k) = −log(high − low + 1)."""

    name = "discrete_uniform"
    arg_constraints = {"low": C.integer, "high": C.integer}
    discrete = True

    def __init__(self, low, high, *, shape=None):
        self.low, self.high = param(low), param(high)
        ps = {"low": self.low, "high": self.high}
        self._init(ps, batch_shape(self.name, ps, shape))

    def _validate(self):
        super()._validate()
        check(self.name, self.low <= self.high, "parameter 'high' must be ≥ 'low'")

    @property
    def support(self):
        return C.integer_interval(self.low, self.high)

    def _sample(self, key, shape):
        u = mx.random.uniform(shape=shape, key=key)
        k = mx.floor(self.low + u * (self.high - self.low + 1.0))
        return mx.minimum(k, self.high).astype(mx.int32)

    def _log_prob(self, x):
        k = as_float(x)
        inside = (k >= self.low) & (k <= self.high) & _is_int(k)
        return mx.where(inside, -mx.log(self.high - self.low + 1.0), -mx.inf)

    def mean(self):
        return mx.broadcast_to((self.low + self.high) / 2, self.shape)

    def variance(self):
        n = self.high - self.low + 1.0
        return mx.broadcast_to((n * n - 1) / 12, self.shape)


bernoulli = Bernoulli
flip = Bernoulli
binomial = Binomial
poisson = Poisson
geometric = Geometric
neg_binomial = NegBinomial
categorical = Categorical
discrete_uniform = DiscreteUniform
