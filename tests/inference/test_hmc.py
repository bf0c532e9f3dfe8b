"""HMC and MALA: exact-posterior stationarity, the unconstrained density (Jacobians,
dependent supports), drivers and errors."""

import zlib

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from genmlx.inference.hmc import HMCKernel, hmc, hmc_kernel
from genmlx.inference.mala import mala
from genmlx.inference.metric import identity_metric, metric_from_inverse
from genmlx.inference.unconstrained import UnconstrainedDensity

# -- a conjugate model with an exact posterior -----------------------------------------
# beta ~ N(0, 2² I₂), y1 ~ N(X beta, 0.5²)         (Gaussian posterior, correlation −0.9)
# tau ~ Gamma(3, rate 2), y2_i ~ N(0, 1/sqrt(tau))  (Gamma posterior; log-Jacobian of tau)
_rng = np.random.default_rng(0)
X = np.stack([np.ones(20), _rng.normal(2.0, 1.0, 20)], 1).astype(np.float32)
Y1 = (X @ np.array([1.0, -0.5]) + _rng.normal(0, 0.5, 20)).astype(np.float32)
Y2 = (_rng.normal(0, 0.7, 10)).astype(np.float32)
S0, S1, A0, B0 = 2.0, 0.5, 3.0, 2.0


@gm.gen
def conjugate(X):
    beta = gm.trace("beta", gm.normal(mx.zeros(2), S0))
    gm.trace("y1", gm.normal(X @ beta, S1))
    tau = gm.trace("tau", gm.gamma(A0, B0))
    gm.trace("y2", gm.normal(mx.zeros(Y2.shape), 1.0 / mx.sqrt(tau)))


OBS = gm.choicemap({"y1": mx.array(Y1), "y2": mx.array(Y2)})
PREC = np.eye(2) / S0**2 + X.T @ X / S1**2
COV = np.linalg.inv(PREC)
MEAN = COV @ (X.T @ Y1 / S1**2)
A_POST, B_POST = A0 + len(Y2) / 2, B0 + float(np.sum(Y2.astype(np.float64) ** 2)) / 2


def exact_draws(n, seed):
    rng = np.random.default_rng(seed)
    beta = rng.multivariate_normal(MEAN, COV, size=n)
    tau = rng.gamma(A_POST, 1 / B_POST, size=n)
    return beta, tau


def exact_moments():
    m = {"beta0": (MEAN[0], COV[0, 0] + MEAN[0] ** 2), "beta1": (MEAN[1], COV[1, 1] + MEAN[1] ** 2)}
    mt = A_POST / B_POST
    m["tau"] = (mt, A_POST / B_POST**2 + mt**2)
    return m


def _check_moments(beta, tau, n):
    """E[x] and E[x²] of every coordinate within 3.5 standard errors (computed from
    the exact posterior's moments, the chains being independent)."""
    vals = {"beta0": beta[:, 0], "beta1": beta[:, 1], "tau": tau}
    for k, (m1, m2) in exact_moments().items():
        x = vals[k].astype(np.float64)
        sd1 = np.sqrt(m2 - m1**2)
        sd2 = np.std(x**2)
        assert abs(x.mean() - m1) < 3.5 * sd1 / np.sqrt(n), (k, x.mean(), m1)
        assert abs(np.mean(x**2) - m2) < 3.5 * sd2 / np.sqrt(n), (k, np.mean(x**2), m2)


def test_unconstrained_density_matches_hand_computation():
    dens = UnconstrainedDensity(conjugate, (mx.array(X),), OBS)
    assert [l.path for l in dens.latents] == [("beta",), ("tau",)] and dens.dim == 3
    u = np.array([[0.7, -0.3, 0.4], [1.1, -0.6, -0.2]], dtype=np.float32)
    lp, g = dens.value_and_grad(mx.array(u))
    from scipy import stats

    for i in range(2):
        b, t = u[i, :2].astype(np.float64), np.exp(u[i, 2])
        ref = (stats.norm.logpdf(b, 0, S0).sum() + stats.norm.logpdf(Y1, X @ b, S1).sum()
               + stats.gamma.logpdf(t, A0, scale=1 / B0) + stats.norm.logpdf(Y2, 0, 1 / np.sqrt(t)).sum()
               + u[i, 2])  # log|d tau / d u| = u
        assert abs(float(lp[i]) - ref) < 1e-3 * max(1.0, abs(ref))
    # gradient against central finite differences (float64 scipy reference)
    h = 1e-2
    for j in range(3):
        up, um = u.copy(), u.copy()
        up[:, j] += h
        um[:, j] -= h
        fd = (np.array(dens.batched_log_density(mx.array(up))) - np.array(dens.batched_log_density(mx.array(um)))) / (2 * h)
        np.testing.assert_allclose(np.array(g[:, j]), fd, rtol=2e-2, atol=2e-2)
    vals = dens.constrain(mx.array(u))
    np.testing.assert_allclose(np.array(vals[("tau",)]), np.exp(u[:, 2]), rtol=1e-5)


KERNELS = [
    ("hmc-identity", 8, None, 0.035),
    ("hmc-diag", 5, np.array([0.07, 0.017, 0.13]), 0.25),
    ("hmc-dense", 5, "dense", 0.6),
    ("mala", 1, "dense", 0.9),
]


@pytest.mark.parametrize("name,num_steps,inv_mass,eps", KERNELS)
def test_kernel_leaves_exact_posterior_invariant(name, num_steps, inv_mass, eps):
    """Start 4000 independent chains at exact posterior draws, apply the kernel three
    times: the draws are still exact, so moments stay within 3.5 SE."""
    n = 4000
    dens = UnconstrainedDensity(conjugate, (mx.array(X),), OBS)
    # a fixed seed per case (str hash() is salted per process: PYTHONHASHSEED)
    beta, tau = exact_draws(n, seed=zlib.crc32(name.encode()) % 1000)
    U = mx.array(np.concatenate([beta, np.log(tau)[:, None]], 1), dtype=mx.float32)
    if isinstance(inv_mass, str):
        cov = np.zeros((3, 3))
        cov[:2, :2] = COV
        cov[2, 2] = 1.0 / A_POST
        inv_mass = cov
    kern = HMCKernel(dens, num_steps)
    metric = identity_metric(n, 3) if inv_mass is None else metric_from_inverse(inv_mass, n, 3)
    state = kern.init(U)
    acc_total = 0.0
    key = mx.random.key(11)
    for i in range(3):
        key, k = mx.random.split(key)
        state, info = kern.step(k, state, mx.full((n,), eps), metric)
        acc_total += float(info.accepted.astype(mx.float32).mean())
    assert acc_total / 3 > 0.5  # the kernel really moves
    out = np.array(state.u, dtype=np.float64)
    moved = np.corrcoef(out[:, 1], np.array(U[:, 1]))[0, 1]
    assert moved < 0.95
    vals = dens.constrain(state.u)
    _check_moments(np.array(vals[("beta",)]), np.array(vals[("tau",)]), n)


def test_hmc_kernel_closure():
    dens = UnconstrainedDensity(conjugate, (mx.array(X),), OBS)
    step = hmc_kernel(dens, step_size=0.1, num_steps=3)
    beta, tau = exact_draws(64, 1)
    U = mx.array(np.concatenate([beta, np.log(tau)[:, None]], 1), dtype=mx.float32)
    U2, acc = step(mx.random.key(0), U)
    assert U2.shape == (64, 3) and acc.shape == (64,) and acc.dtype == mx.bool_
    U3, _ = step(mx.random.key(1), U)
    assert not np.allclose(np.array(U2), np.array(U3))


# -- dependent support through uniform(0, 1 − a) ------------------------------------------
@gm.gen
def dependent(sigma):
    a = gm.trace("a", gm.uniform(0.0, 1.0))
    b = gm.trace("b", gm.uniform(0.0, 1.0 - a))
    gm.trace("y", gm.normal(a + b, sigma))


def dependent_exact(y=0.7, sigma=0.1, n=1500):
    """Posterior means/sds of a and b by quadrature: with b = (1 − a)s, s ∈ (0, 1),
    p(a, s | y) ∝ N(y; a + (1 − a)s, σ) (the 1/(1 − a) of b's density cancels the
    Jacobian (1 − a))."""
    g = (np.arange(n) + 0.5) / n
    a, s = np.meshgrid(g, g, indexing="ij")
    b = (1 - a) * s
    w = np.exp(-0.5 * ((y - a - b) / sigma) ** 2)
    w /= w.sum()
    out = {}
    for k, v in (("a", a), ("b", b)):
        m = (w * v).sum()
        out[k] = (m, np.sqrt((w * (v - m) ** 2).sum()))
    return out


def test_hmc_driver_dependent_support():
    exact = dependent_exact()
    r = hmc(mx.random.key(3), dependent, (0.1,), gm.choicemap({"y": 0.7}), num_samples=400,
            num_warmup=300, num_chains=4, num_steps=8, progress=False)
    assert r.samples["a"].shape == (4, 400) and r.samples["b"].shape == (4, 400)
    assert np.all((r.samples["b"] > 0) & (r.samples["a"] + r.samples["b"] < 1))
    s = r.summary()
    for k in ("a", "b"):
        m, sd = exact[k]
        assert abs(s[k]["mean"] - m) < 3.5 * s[k]["mcse_mean"] + 1e-3, (k, s[k]["mean"], m)
        assert s[k]["r_hat"] < 1.05
    assert 0.6 < r.accept_prob.mean() < 0.99


def test_mala_driver_adapts_toward_target():
    r = mala(mx.random.key(4), conjugate, (mx.array(X),), OBS, num_samples=300, num_warmup=300,
             num_chains=4, progress=False)
    assert r.samples["beta"].shape == (4, 300, 2) and r.samples["tau"].shape == (4, 300)
    assert 0.35 < r.accept_prob.mean() < 0.85
    s = r.summary()
    assert abs(s["beta[1]"]["mean"] - MEAN[1]) < 3.5 * s["beta[1]"]["mcse_mean"] + 1e-3


def test_errors_name_the_problem():
    @gm.gen
    def discrete():
        k = gm.trace("k", gm.bernoulli(0.3))
        gm.trace("y", gm.normal(k, 1.0))

    with pytest.raises(ValueError, match="'k'.*discrete"):
        hmc(mx.random.key(0), discrete, (), gm.choicemap({"y": 1.0}), progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        HMCKernel(UnconstrainedDensity(dependent, (0.1,), gm.choicemap({"y": 0.7})), 0)
    with pytest.raises(ValueError, match="mass"):
        hmc(mx.random.key(0), dependent, (0.1,), gm.choicemap({"y": 0.7}), mass="full", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        hmc(mx.random.key(0), dependent, (0.1,), gm.choicemap({"y": 0.7}), num_samples=0, progress=False)
    with pytest.raises(ValueError, match="no latent"):
        UnconstrainedDensity(dependent, (0.1,), gm.choicemap({"y": 0.7, "a": 0.2, "b": 0.1}))
