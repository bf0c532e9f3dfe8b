"""NUTS: exactness on Gaussian and dependent-support targets, result layout,
divergences, tree depth, adaptation schedule, reproducibility."""

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from genmlx.inference.adaptation import DualAveraging, adaptation_windows
from genmlx.inference.nuts import nuts

COV = np.array([[1.0, 0.9 * 2.0], [0.9 * 2.0, 4.0]])
CHOL = np.linalg.cholesky(COV)
MU = np.array([1.0, -2.0])


@gm.gen
def gaussian2():
    """x ~ N(MU, COV) exactly (the observation-free 2-D Gaussian, via a bivariate
    factorisation x0 ~ N(μ0, σ0), x1 | x0 ~ N(μ1 + ρσ1/σ0 (x0 − μ0), σ1√(1 − ρ²)))."""
    x0 = gm.trace("x0", gm.normal(1.0, 1.0))
    return gm.trace("x1", gm.normal(-2.0 + 0.9 * 2.0 * (x0 - 1.0), 2.0 * float(np.sqrt(1 - 0.81))))


@pytest.mark.parametrize("mass", ["diag", "dense"])
def test_nuts_gaussian_moments(mass):
    r = nuts(mx.random.key(1), gaussian2, (), None, num_samples=600, num_warmup=300,
             num_chains=4, mass=mass, progress=False)
    s = r.summary()
    assert r.samples["x0"].shape == (4, 600) and r.divergences.shape == (4, 600)
    for i, k in enumerate(("x0", "x1")):
        assert abs(s[k]["mean"] - MU[i]) < 3.5 * s[k]["mcse_mean"], (k, s[k])
        # sd: the MCSE of the sd is ≈ sd/√(2·ESS)
        sd = np.sqrt(COV[i, i])
        assert abs(s[k]["sd"] - sd) < 3.5 * sd / np.sqrt(2 * s[k]["ess_bulk"]) + 0.02 * sd, (k, s[k])
        # bulk ESS of these 2400 draws: 0.18-0.28 per draw across seeds (diag metric)
        assert s[k]["r_hat"] < 1.02 and s[k]["ess_bulk"] > 200
    # sample correlation: its error is ≈ the mean of the influence statistic
    # h = z0·z1 − ρ/2 (z0² + z1²) (z standardised by the true moments), so 3.5 MCSE of h
    corr = np.corrcoef(r.samples["x0"].ravel(), r.samples["x1"].ravel())[0, 1]
    z0 = (r.samples["x0"] - MU[0]) / np.sqrt(COV[0, 0])
    z1 = (r.samples["x1"] - MU[1]) / np.sqrt(COV[1, 1])
    h = z0 * z1 - 0.45 * (z0**2 + z1**2)
    assert abs(corr - 0.9) < 3.5 * float(gm.diagnostics.mcse_mean(h)), corr
    assert r.num_divergences == 0
    assert np.all(r.tree_depth <= 10) and np.all(r.num_steps >= 1)
    if mass == "dense":  # the adapted dense metric whitens the target: short trees
        assert np.mean(r.num_steps) < 6
        est = np.array(r.metric.minv[0])
        assert abs(est[0, 1] / np.sqrt(est[0, 0] * est[1, 1]) - 0.9) < 0.1


@gm.gen
def dependent(sigma):
    a = gm.trace("a", gm.uniform(0.0, 1.0))
    b = gm.trace("b", gm.uniform(0.0, 1.0 - a))
    gm.trace("y", gm.normal(a + b, sigma))


def _dependent_exact(y=0.7, sigma=0.1, n=1500):
    g = (np.arange(n) + 0.5) / n
    a, s = np.meshgrid(g, g, indexing="ij")
    b = (1 - a) * s  # p(a, s | y) ∝ N(y; a + b, σ): b's 1/(1 − a) cancels the Jacobian
    w = np.exp(-0.5 * ((y - a - b) / sigma) ** 2)
    w /= w.sum()
    return {"a": (w * a).sum(), "b": (w * b).sum()}


def test_nuts_dependent_support_matches_quadrature():
    exact = _dependent_exact()
    r = nuts(mx.random.key(2), dependent, (0.1,), gm.choicemap({"y": 0.7}), num_samples=400,
             num_warmup=300, num_chains=4, progress=False)
    s = r.summary()
    for k in ("a", "b"):
        assert abs(s[k]["mean"] - exact[k]) < 3.5 * s[k]["mcse_mean"], (k, s[k]["mean"], exact[k])
    assert np.all(r.samples["a"] + r.samples["b"] < 1)


@gm.gen
def funnel():
    v = gm.trace("v", gm.normal(0.0, 3.0))
    return gm.trace("x", gm.normal(mx.zeros(5), mx.exp(v / 2)))


def test_divergences_detected_and_depth_capped():
    # a fixed step size far too large for the funnel's neck (x's scale e^{v/2})
    r = nuts(mx.random.key(3), funnel, (), None, num_samples=100, num_warmup=0, num_chains=4,
             max_tree_depth=4, step_size=1.5, progress=False)
    assert r.divergences.dtype == np.bool_ and r.num_divergences > 0
    assert r.tree_depth.max() <= 4 and r.num_steps.max() <= 2**4


def test_reproducible_and_key_dependent():
    kw = dict(num_samples=20, num_warmup=20, num_chains=2, progress=False)
    a = nuts(mx.random.key(5), gaussian2, (), None, **kw)
    b = nuts(mx.random.key(5), gaussian2, (), None, **kw)
    c = nuts(mx.random.key(6), gaussian2, (), None, **kw)
    np.testing.assert_array_equal(a.samples["x0"], b.samples["x0"])
    assert not np.allclose(a.samples["x0"], c.samples["x0"])


def test_result_choicemap_and_gm_namespace():
    r = gm.inference.nuts(mx.random.key(7), dependent, (0.1,), gm.choicemap({"y": 0.7}),
                          num_samples=10, num_warmup=10, num_chains=2, progress=False)
    cm = r.choicemap(1, 3)
    assert float(cm["a"]) == pytest.approx(float(r.samples["a"][1, 3]))
    lp, _ = dependent.assess((0.1,), cm.merge(gm.choicemap({"y": 0.7})))
    assert np.isfinite(float(lp))


def test_stan_windows_and_dual_averaging():
    assert adaptation_windows(1000) == [(75, 100), (100, 150), (150, 250), (250, 450), (450, 950)]
    # too short for the default buffers: 15% / 75% / 10%
    assert adaptation_windows(100) == [(15, 90)]
    assert adaptation_windows(10) == []
    # dual averaging on a fixed accept-rate curve a(ε) = exp(−ε) reaches a(ε̄) ≈ δ
    da = DualAveraging.start(mx.array([1.0]), target=0.8)
    for _ in range(2000):
        da.update(mx.exp(-da.step_size))
    assert abs(float(mx.exp(-da.final_step_size)[0]) - 0.8) < 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tree_depth"):
        nuts(mx.random.key(0), gaussian2, (), None, max_tree_depth=0, progress=False)
    with pytest.raises(ValueError, match="target_accept"):
        nuts(mx.random.key(0), gaussian2, (), None, target_accept=1.5, progress=False)
    with pytest.raises(ValueError, match="init"):
        nuts(mx.random.key(0), gaussian2, (), None, num_chains=2, init=np.zeros(3), progress=False)
