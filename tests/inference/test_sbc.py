"""Simulation-based calibration (Talts et al. 2018) of NUTS and HMC on a small
hierarchical model.

R replicate data sets are simulated from the prior; if the sampler targets the exact
posterior, the rank of each true parameter among L (nearly independent) posterior
draws is uniform on {0, …, L}. The R replicates are independent copies of the model
inside ONE model (parameters with a leading axis R), so one batched sampler run
handles all of them: the joint posterior factorises, and each replicate's marginal
draws are that replicate's posterior draws. Ranks are binned into B bins and
compared with the uniform expectation by a χ² test (fixed seed, level 0.001).
"""

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

import genmlx as gm
from genmlx.inference.hmc import hmc
from genmlx.inference.nuts import nuts

R, J = 100, 3


@gm.gen
def hierarchical(R, J):
    """μ ~ N(0, 1), τ ~ half-N(0, 1), z_j ~ N(0, 1), y_j ~ N(μ + τ z_j, 1), j = 1..J,
    for R independent replicates."""
    mu = gm.trace("mu", gm.normal(mx.zeros(R), 1.0))
    tau = gm.trace("tau", gm.half_normal(mx.ones(R)))
    z = gm.trace("z", gm.normal(mx.zeros((R, J)), 1.0))
    return gm.trace("y", gm.normal(mu[:, None] + tau[:, None] * z, 1.0))


def _ranks(draws, truth):
    """draws [chains, L', R] → ranks [R] of the truth among the pooled draws."""
    d = draws.reshape(-1, draws.shape[-1])
    return (d < truth[None, :]).sum(0), d.shape[0]


def _chi2_pvalue(ranks, L, bins=10):
    edges = np.linspace(0, L + 1, bins + 1)
    width = np.diff(np.floor(edges))  # number of rank values per bin
    b = np.clip(np.searchsorted(np.floor(edges), ranks, side="right") - 1, 0, bins - 1)
    obs = np.bincount(b, minlength=bins)
    exp = len(ranks) * width / (L + 1)
    return stats.chisquare(obs, exp).pvalue, obs


@pytest.mark.parametrize("sampler", ["nuts", "hmc"])
def test_sbc_rank_uniformity(sampler):
    tr = hierarchical.simulate(mx.random.key(2024), (R, J))
    truth = {k: np.array(tr[k]) for k in ("mu", "tau")}
    obs = gm.choicemap({"y": tr["y"]})
    kw = dict(num_samples=50, num_warmup=300, num_chains=2, thin=5, progress=False)
    if sampler == "nuts":
        r = nuts(mx.random.key(7), hierarchical, (R, J), obs, **kw)
    else:
        r = hmc(mx.random.key(7), hierarchical, (R, J), obs, num_steps=12, **kw)
    for k in ("mu", "tau"):
        ranks, L = _ranks(r.samples[k], truth[k])
        p, counts = _chi2_pvalue(ranks, L)
        assert p > 1e-3, (sampler, k, p, counts)


def test_sbc_detects_a_miscalibrated_posterior():
    """The same χ² check rejects an overconfident posterior: draws centred at a point
    scattered around the truth with the posterior's scale, but with a 5× too small
    spread, put the ranks at 0 or L."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=R)
    post_sd = np.sqrt(1 / (1 + J / 2.0))  # roughly the right scale
    draws = truth[None, None, :] + 0.2 * post_sd * rng.normal(size=(2, 50, R)) \
        + rng.normal(size=R)[None, None, :] * post_sd
    ranks, L = _ranks(draws, truth)
    p, _ = _chi2_pvalue(ranks, L)
    assert p < 1e-3
