"""Metropolis–Hastings: stationarity from exact posterior draws, convergence, kernels."""

import math

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from genmlx.inference import cycle, mh, mh_kernel, mix, repeat, run_kernel

Y = 1.2
# x ~ N(0, 1), z ~ N(x, 1), y ~ N(z, 0.5): a Gaussian posterior over (x, z)
PRIOR_COV = np.array([[1.0, 1.0], [1.0, 2.0]])


@gm.gen
def model():
    x = gm.trace("x", gm.normal(0.0, 1.0))
    z = gm.trace("z", gm.normal(x, 1.0))
    gm.trace("y", gm.normal(z, 0.5))


OBS = gm.choicemap({"y": Y})


def posterior():
    # y = z + e; Cov(latents, y) = [1, 2], Var(y) = 2 + 0.25
    c = np.array([1.0, 2.0])
    vy = 2.25
    mean = c * Y / vy
    cov = PRIOR_COV - np.outer(c, c) / vy
    return mean, cov


def exact_traces(n, seed):
    mean, cov = posterior()
    draws = np.random.default_rng(seed).multivariate_normal(mean, cov, size=n).astype(np.float32)
    cons = OBS.merge(gm.choicemap({"x": mx.array(draws[:, 0]), "z": mx.array(draws[:, 1])}))
    tr, _ = model.vgenerate(mx.random.key(seed), (), cons, n)
    return tr


def check_moments(tr, n):
    """Means and variances of x, z within 3.5 SEs of the exact posterior (independent chains)."""
    mean, cov = posterior()
    for j, a in enumerate(["x", "z"]):
        v = np.asarray(tr[a], dtype=np.float64)
        sd = math.sqrt(cov[j, j])
        assert abs(v.mean() - mean[j]) < 3.5 * sd / math.sqrt(n), (a, v.mean(), mean[j])
        se_var = cov[j, j] * math.sqrt(2 / (n - 1))
        assert abs(v.var(ddof=1) - cov[j, j]) < 3.5 * se_var, (a, v.var(), cov[j, j])


@gm.gen
def rw(tr, scale):
    gm.trace("x", gm.normal(tr["x"], scale))


@gm.gen
def skewed(tr, scale):
    """An asymmetric proposal (shrinks toward 0.5 z): the q terms do not cancel."""
    gm.trace("x", gm.normal(0.5 * tr["z"] + 0.3, scale))
    gm.trace("z", gm.normal(0.8 * tr["z"] + 0.2, scale))


N = 3000


def test_selection_mh_stationary():
    tr = exact_traces(N, 1)
    sel = gm.select("x")
    accs = []
    for i, k in enumerate(mx.random.split(mx.random.key(10), 6)):
        tr, acc = mh(k, tr, sel if i % 2 == 0 else gm.select("z"))
        accs.append(np.asarray(acc))
    assert acc.shape == (N,) and acc.dtype == mx.bool_
    assert 0.05 < np.mean(accs) < 0.95
    check_moments(tr, N)


def test_asymmetric_proposal_mh_stationary():
    tr = exact_traces(N, 2)
    for k in mx.random.split(mx.random.key(11), 6):
        tr, acc = mh(k, tr, skewed, (0.7,))
    assert 0.05 < float(mx.mean(acc.astype(mx.float32))) < 0.95
    check_moments(tr, N)


def test_mh_converges_from_bad_start():
    tr, _ = model.vgenerate(mx.random.key(3), (), OBS.merge(gm.choicemap({"x": -3.0, "z": 4.0})), 2000)
    kernel = cycle(mh_kernel(rw, (0.8,)), mh_kernel(gm.select("z")), mh_kernel(skewed, (0.6,)))
    tr, hist = run_kernel(mx.random.key(4), tr, kernel, 150, progress=False)
    assert hist[-1].shape == (3, 2000)
    check_moments(tr, 2000)


def test_kernel_combinators_stationary():
    tr = exact_traces(N, 4)
    k_rw, k_sel = mh_kernel(rw, (1.0,)), mh_kernel(gm.select("z"))
    kernel = mix([repeat(k_rw, 2), cycle(k_sel, mh_kernel(skewed, (0.5,)))], [0.3, 0.7])
    tr, hist = run_kernel(mx.random.key(12), tr, kernel, 3, progress=False)
    assert hist[0].shape == (2, N)  # info of the chosen kernel (both give [2, N])
    check_moments(tr, N)


def test_single_trace_and_compiled_matches_uncompiled():
    tr = model.simulate(mx.random.key(0), ())
    tr, _ = model.generate(mx.random.key(0), (), OBS)
    a, acc_a = mh(mx.random.key(5), tr, rw, (0.5,))
    b, acc_b = mh(mx.random.key(5), tr, rw, (0.5,), compile=False)
    assert acc_a.shape == () and bool(acc_a.item()) == bool(acc_b.item())
    assert float(a["x"]) == pytest.approx(float(b["x"]), abs=1e-6)
    assert float(a.score) == pytest.approx(float(b.score), abs=1e-5)
    # the trace's score stays the log joint of its choices
    lp, _ = model.assess((), a.choices)
    assert float(lp) == pytest.approx(float(a.score), abs=1e-5)
    c, _ = mh(mx.random.key(6), tr, gm.select("x", "z"))
    assert c.batch_size is None


def test_bad_arguments():
    tr, _ = model.generate(mx.random.key(0), (), OBS)
    with pytest.raises(TypeError, match="Selection"):
        mh(mx.random.key(0), tr, "x")
    with pytest.raises(ValueError, match="proposal_args"):
        mh(mx.random.key(0), tr, gm.select("x"), (1.0,))
    with pytest.raises(ValueError, match="probs"):
        mix([mh_kernel(gm.select("x"))], [0.5])


def test_hmc_kernel_lifted_to_traces_is_stationary():
    """The other engineer's position-space HMC kernel, lifted to batched traces with
    ``unconstrained_kernel`` (the form used for SMC rejuvenation)."""
    from genmlx.inference import hmc_kernel, unconstrained_kernel

    tr = exact_traces(N, 9)
    kernel = unconstrained_kernel(lambda d: hmc_kernel(d, 0.4, 5), gm.select("y"))
    tr2, acc = kernel(mx.random.key(13), tr)
    assert acc.shape == (N,) and 0.3 < float(mx.mean(acc.astype(mx.float32))) <= 1.0
    assert not np.allclose(np.asarray(tr2["x"]), np.asarray(tr["x"]))
    np.testing.assert_allclose(np.asarray(tr2["y"]), Y)
    check_moments(tr2, N)
