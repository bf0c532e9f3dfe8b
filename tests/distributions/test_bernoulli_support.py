"""Bernoulli's support test {0, 1}: out-of-support values give −∞ in every form of the
computation the amortized steps use (eager, vmapped with the value shared across
particles, compiled with gradients), and in-support values keep exact log-masses and
the gradient x − σ(l) with respect to the logits. A non-finite value (±∞, NaN), or one so
large that x·l overflows, never gets a finite log-mass (−∞, or NaN in the logits form
where x·l is NaN or +∞)."""

from __future__ import annotations

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest
from scipy import stats as st

# edge cases of the test x(1 − x) = 0: a denormal, the floats next to 1, infinities, huge
X = np.array([0.0, 1.0, 0.5, 2.0, -1.0, np.nan, 1.0, 0.0, 1e-45, 1 - 2**-24, 1 + 2**-23,
              np.inf, -np.inf, 3e38, -1e-45, 0.0], np.float32)
VALID = np.isin(X, [0.0, 1.0])
# out of support, finite and with x·l finite (the logits form adds −∞ to x·l − softplus(l),
# NaN where x·l overflows to +∞): exactly −∞; every out-of-support value: never finite
NUM = np.isfinite(X) & (np.abs(X) < 1e30)
LOGITS = np.array([-2.0, 3.0, 0.1, -0.7, 1.2, 0.4, -0.3, 2.5, 0.2, -1.1, 0.9, 1.5, -0.4,
                   0.3, 0.8, -2.2], np.float32)
P = 1.0 / (1.0 + np.exp(-LOGITS.astype(np.float64)))


def exact(x, p):
    out = np.full(x.shape, -np.inf)
    ok = np.isin(x, [0.0, 1.0])
    out[ok] = st.bernoulli(p[ok]).logpmf(x[ok].astype(int))
    return out


@pytest.mark.parametrize("form", ["p", "logits"])
def test_out_of_support_is_minus_inf_and_in_support_exact(form):
    d = gm.bernoulli(mx.array(P, dtype=mx.float32)) if form == "p" else gm.bernoulli(logits=mx.array(LOGITS))
    lp = np.array(d.log_prob(mx.array(X)))
    ref = exact(X, P)
    assert np.all(lp[~VALID & NUM] == -np.inf)
    assert not np.any(np.isfinite(lp[~VALID]))
    np.testing.assert_allclose(lp[VALID], ref[VALID], rtol=1e-5)
    # the GF score sums to −∞ as soon as one finite value is out of support
    assert float(d._score(mx.array(np.where(NUM, X, 0.5)))) == -np.inf
    assert np.isfinite(float(d._score(mx.array(np.where(VALID, X, 1.0)))))


def test_shared_value_under_vmap_and_compile():
    """x shared by a vmapped particle axis (in_axes None), logits per particle, compiled:
    the support test still masks every particle's out-of-support elements."""
    K = 3
    logits = mx.array(np.stack([LOGITS + k for k in range(K)]))

    def lp(l, x):
        return gm.bernoulli(logits=l).log_prob(x)

    out = mx.compile(lambda L, x: mx.vmap(lp, in_axes=(0, None))(L, x))(logits, mx.array(X))
    out = np.array(out)
    for k in range(K):
        pk = 1.0 / (1.0 + np.exp(-(LOGITS.astype(np.float64) + k)))
        assert np.all(out[k, ~VALID & NUM] == -np.inf)
        assert not np.any(np.isfinite(out[k, ~VALID]))
        np.testing.assert_allclose(out[k, VALID], exact(X, pk)[VALID], rtol=1e-5)


def test_gradient_wrt_logits_is_x_minus_sigmoid_and_loss_minus_inf_out_of_support():
    xv = mx.array(X[VALID])

    def total(l, x):
        return mx.sum(mx.vmap(lambda li: gm.bernoulli(logits=li).log_prob(x))(l))

    L = mx.array(np.stack([LOGITS[VALID], LOGITS[VALID] - 1.0]))
    val, g = mx.compile(mx.value_and_grad(total))(L, xv)
    sig = 1.0 / (1.0 + np.exp(-np.array(L, dtype=np.float64)))
    np.testing.assert_allclose(np.array(g), X[VALID][None] - sig, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(val))
    bad, _ = mx.compile(mx.value_and_grad(total))(mx.array(np.stack([LOGITS[NUM]] * 2)), mx.array(X[NUM]))
    assert float(bad) == -np.inf
