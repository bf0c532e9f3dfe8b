"""Unbiasedness of the score-function estimators (VIMCO, NVIL, RWS, ELBO with discrete
latents) against exact expected gradients computed by enumeration.

Model: b ∈ {0,1}² with b_i ~ Bernoulli(σ(θ_i)), x ~ Bernoulli(σ(u·b + v)); guide
b_i ~ Bernoulli(σ(A_i x + c_i)). Every parameter's mean gradient over R independent
batch estimates must lie within 3.5 standard errors of the exact value; the test also
checks its own power (the SE is small next to the gradients, and an estimator that drops
the score-function term is detected as biased).
"""

from __future__ import annotations

import itertools
import math

import genmlx as gm
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

X = 1.0
R, M = 30, 256  # R batch estimates of M independent gradient estimates each


class Prior(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = mx.array([0.3, -0.4])
        self.u = mx.array([1.5, -1.0])
        self.v = mx.array(0.2)


class GuideNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = mx.array([0.5, -0.3])
        self.c = mx.array([-0.2, 0.4])


def make():
    prior, gnet = Prior(), GuideNet()

    @gm.gen
    def model():
        b = gm.bernoulli(logits=prior.theta) @ "b"
        return gm.bernoulli(logits=mx.sum(prior.u * b) + prior.v) @ "x"

    @gm.gen
    def guide(x):
        return gm.bernoulli(logits=gnet.A * x + gnet.c) @ "b"

    return model, guide, prior, gnet


def bern(v, logits):
    return v * logits - nn.softplus(logits)


STATES = [mx.array(s, dtype=mx.float32) for s in itertools.product([0.0, 1.0], repeat=2)]


def log_p(prior, b, x):
    return mx.sum(bern(b, prior.theta)) + bern(x, mx.sum(prior.u * b) + prior.v)


def log_q(gnet, b, x):
    return mx.sum(bern(b, gnet.A * x + gnet.c))


def exact_grads(params, fn):
    _, g = nn.value_and_grad(params, fn)()
    return {k: np.array(v) for k, v in tree_flatten(g)}


def estimate(obj, key, n_batches=R, x=X):
    params = obj.trainable()
    data = mx.full((M,), x)
    lg = mx.compile(nn.value_and_grad(params, lambda k: obj.loss(k, data)[0]))
    samples = []
    for k in mx.random.split(key, n_batches):
        _, g = lg(k)
        samples.append({n: np.array(v) for n, v in tree_flatten(g)})
    mean = {n: np.mean([s[n] for s in samples], axis=0) for n in samples[0]}
    se = {n: np.std([s[n] for s in samples], axis=0, ddof=1) / math.sqrt(n_batches) for n in samples[0]}
    return mean, se


def assert_unbiased(mean, se, exact):
    assert set(mean) == set(exact), (sorted(mean), sorted(exact))
    for n in exact:
        z = np.abs(mean[n] - exact[n]) / se[n]
        assert np.all(z < 3.5), f"{n}: estimate {mean[n]}, exact {exact[n]}, se {se[n]}"
    # power: the standard errors are small next to the exact gradients
    big = np.concatenate([np.abs(v).ravel() for v in exact.values()])
    ses = np.concatenate([se[n].ravel() for n in exact])
    assert np.median(ses / np.maximum(big, 1e-3)) < 0.15


def k_tuple_expectation(prior, gnet, K, fn):
    """Σ over K-tuples of states of Π q(b_k|x) · fn(lp [K], lq [K])."""
    total = mx.array(0.0)
    for tup in itertools.product(STATES, repeat=K):
        lp = mx.stack([log_p(prior, b, X) for b in tup])
        lq = mx.stack([log_q(gnet, b, X) for b in tup])
        total = total + mx.exp(mx.sum(lq)) * fn(lp, lq)
    return total


def test_vimco_unbiased():
    model, guide, prior, gnet = make()
    obj = gm.amortized.VIMCO(model, guide, K=3)
    K = 3

    def neg_bound():
        return -k_tuple_expectation(prior, gnet, K, lambda lp, lq: mx.logsumexp(lp - lq) - math.log(K))

    exact = exact_grads(obj.trainable(), neg_bound)
    mean, se = estimate(obj, mx.random.key(1))
    assert_unbiased(mean, se, exact)

    class NoScoreTerm(gm.amortized.VIMCO):  # drops the score-function term: biased
        def _loss_aux(self, key, data):
            from genmlx.amortized.objective import guide_particles, log_mean_exp

            lp, lq, _, _ = guide_particles(self, key, data, self.K)
            loss = -mx.mean(log_mean_exp(lp - lq))
            return loss, {}, {}

    m2, se2 = estimate(NoScoreTerm(model, guide, K=3), mx.random.key(2), n_batches=10)
    z = max(float(np.max(np.abs(m2[n] - exact[n]) / se2[n])) for n in exact if n.startswith("modules_.1"))
    assert z > 3.5


def test_nvil_unbiased():
    model, guide, prior, gnet = make()
    base = nn.Linear(1, 1)
    obj = gm.amortized.NVIL(model, guide, baseline=lambda_module(base))

    def loss():
        elbo = mx.array(0.0)
        bl = mx.array(0.0)
        bx = mx.reshape(base(mx.array([X])), ())
        for b in STATES:
            lq = log_q(gnet, b, X)
            l = log_p(prior, b, X) - lq
            elbo = elbo + mx.exp(lq) * l
            bl = bl + mx.stop_gradient(mx.exp(lq)) * (mx.stop_gradient(l) - bx) ** 2
        return -elbo + bl

    exact = exact_grads(obj.trainable(), loss)
    mean, se = estimate(obj, mx.random.key(3))
    assert_unbiased(mean, se, exact)


class lambda_module(nn.Module):
    """Baseline b(x) for a scalar data item."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def __call__(self, x):
        return self.lin(mx.reshape(x, (1,)).astype(mx.float32))


def test_rws_unbiased():
    model, guide, prior, gnet = make()
    K = 3
    obj = gm.amortized.RWS(model, guide, K=K, sleep_q=True)

    # the tuple probabilities and weights carry no gradient in RWS
    def stopped_loss():
        total = mx.array(0.0)
        for tup in itertools.product(STATES, repeat=K):
            lp = mx.stack([log_p(prior, b, X) for b in tup])
            lq = mx.stack([log_q(gnet, b, X) for b in tup])
            w = mx.stop_gradient(mx.softmax(lp - lq))
            total = total + mx.stop_gradient(mx.exp(mx.sum(lq))) * mx.sum(w * (lp + lq))
        sleep = mx.array(0.0)
        for b in STATES:
            for x in (0.0, 1.0):
                sleep = sleep + mx.stop_gradient(mx.exp(log_p(prior, b, x))) * log_q(gnet, b, x)
        return -total - sleep

    exact = exact_grads(obj.trainable(), stopped_loss)
    mean, se = estimate(obj, mx.random.key(4))
    assert_unbiased(mean, se, exact)


@pytest.mark.parametrize("K", [1, 3])
def test_elbo_discrete_unbiased(K):
    model, guide, prior, gnet = make()
    obj = gm.amortized.ELBO(model, guide, num_particles=K)

    def neg_elbo():
        tot = mx.array(0.0)
        for b in STATES:
            lq = log_q(gnet, b, X)
            tot = tot + mx.exp(lq) * (log_p(prior, b, X) - lq)
        return -tot

    exact = exact_grads(obj.trainable(), neg_elbo)
    mean, se = estimate(obj, mx.random.key(5 + K))
    assert_unbiased(mean, se, exact)
