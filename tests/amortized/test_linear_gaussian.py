"""Guides trained with each objective reach the exact posterior of the linear-Gaussian
model; importance-weighted bounds approach log p(x) monotonically in K.

Tolerances come from the posterior: the guide's mean map must match μ(x) within 0.1
posterior standard deviations at test points, and its variances within 10% — well above
the SGD noise left after the low-learning-rate phase, and far below the errors of an
untrained guide (means off by ≥ 1 sd, variances by 5×).
"""

from __future__ import annotations

import math

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from tests.amortized import lingauss as LG

X_TEST = np.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 0.3], [0.5, -3.0, 1.0]])


def assert_exact_posterior(net):
    sd = np.sqrt(np.diag(LG.SIGMA))
    var = np.exp(2 * np.array(net.log_s))
    assert np.all(np.abs(var / np.diag(LG.SIGMA) - 1) < 0.10), (var, np.diag(LG.SIGMA))
    for x in X_TEST:
        m = np.array(net(mx.array(x, dtype=mx.float32))[0])
        assert np.all(np.abs(m - LG.post_mean(x)) < 0.1 * sd), (x, m, LG.post_mean(x))


@pytest.mark.parametrize("name,make", [
    ("ELBO", lambda g: gm.amortized.ELBO(LG.model, g)),
    ("ELBO-analytic", lambda g: gm.amortized.ELBO(LG.model, g, analytic_kl=True)),
    ("IWAE", lambda g: gm.amortized.IWAE(LG.model, g, K=5)),
    ("DReG", lambda g: gm.amortized.DReG(LG.model, g, K=5)),
    ("RWS", lambda g: gm.amortized.RWS(LG.model, g, K=10)),
    ("NeuralIS", lambda g: gm.amortized.NeuralIS(LG.model, g)),
])
def test_objective_recovers_exact_posterior(name, make):
    guide, net = LG.make_guide()
    obj = make(guide)
    m = LG.train(obj)
    assert all(math.isfinite(float(v)) for v in m.values())
    assert_exact_posterior(net)


def test_untrained_guide_fails_the_posterior_check():
    _, net = LG.make_guide(shift=1.0, log_s=0.8)
    with pytest.raises(AssertionError):
        assert_exact_posterior(net)


def test_iwae_bound_increases_with_K_towards_log_evidence():
    guide, _ = LG.make_guide(shift=0.3, log_s=-0.3)  # a fixed, imperfect guide
    xs = LG.model.vsimulate(mx.random.key(7), (), 40)["x"]
    exact = LG.log_evidence(np.array(xs))
    means, ses = [], []
    for i, K in enumerate([1, 10, 100, 1000]):
        lw = gm.amortized.importance_log_weights(mx.random.key(10 + i), (LG.model, guide), xs, K)
        lpx = np.logaddexp.reduce(lw, axis=1) - math.log(K)
        d = lpx - exact                       # ≤ 0 in expectation, → 0 as K grows
        means.append(d.mean())
        ses.append(d.std(ddof=1) / math.sqrt(len(d)))
    for i in range(3):  # monotone within Monte Carlo error
        assert means[i + 1] > means[i] - 3.5 * math.hypot(ses[i], ses[i + 1])
    assert means[0] < -1.0                     # the guide is visibly imperfect at K = 1
    assert abs(means[-1]) < 3.5 * ses[-1] + 0.05 * abs(means[0])


def exact_guide():
    guide, net = LG.make_guide()
    net.lin.weight = mx.array(LG.A_EXACT, dtype=mx.float32)
    net.lin.bias = mx.array(LG.C_EXACT, dtype=mx.float32)
    net.log_s = mx.array(0.5 * np.log(np.diag(LG.SIGMA)), dtype=mx.float32)
    return guide


def test_log_marginal_likelihood_with_exact_posterior_guide_is_exact():
    # q = p(z|x) makes every weight equal p(x): the chunked estimate must be exact
    xs = LG.model.vsimulate(mx.random.key(8), (), 20)["x"]
    est, se = gm.amortized.log_marginal_likelihood(mx.random.key(9), (LG.model, exact_guide()), xs,
                                                   K=5000, chunk_size=1000, batch_size=8)
    exact = LG.log_evidence(np.array(xs))
    assert abs(est - exact.mean()) < 1e-3
    assert se == pytest.approx(exact.std(ddof=1) / math.sqrt(20), rel=1e-3)
