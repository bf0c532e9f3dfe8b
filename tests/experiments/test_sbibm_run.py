"""The sbibm experiment's pieces (experiments/sbibm/run.py): the training density is the
guide's density, and refinement respects the likelihood-evaluation budget and recovers
the closed-form gaussian_linear posterior N(x/2, 0.05·I)."""

import copy
import math

import numpy as np

import genmlx as gm
import mlx.core as mx

from experiments.sbibm import run as R
from genmlx.harness.zoo.sbibm import mixture_guide, sbibm_model


def _small(task, n=400, epochs=3):
    cfg = R.load_config()
    cfg["train"]["max_epochs"] = epochs
    model = sbibm_model(task)
    th, x = R.simulate(model, mx.random.key(0), n)
    net, info = R.train_guide(task, th, x, mx.random.key(1), cfg)
    return cfg, model, net, th, x, info


def test_training_density_is_the_guide_density_and_budget_is_fixed():
    cfg, model, net, th, x, info = _small("slcp")
    assert info["n_train"] + info["n_valid"] == len(th) == 400
    g = mixture_guide(net)
    a = [float(g.assess((mx.array(x[i]),), gm.choicemap({"theta": mx.array(th[i])}))[0]) for i in range(4)]
    b = np.asarray(R.mdn_log_q(net, mx.array(th[:4]), mx.array(x[:4])))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _posterior_check(draws, x_obs, n_eff):
    # exact posterior N(x/2, 0.05 I); the draws' mean is within 3.5 SE (SE from n_eff)
    se = math.sqrt(0.05 / n_eff)
    assert np.max(np.abs(draws.mean(0) - x_obs / 2)) < 3.5 * se, (draws.mean(0), x_obs / 2)


def test_refine_budget_and_gaussian_posterior():
    cfg, model, net, th, x, _ = _small("gaussian_linear", n=2000, epochs=20)
    x_obs = np.asarray(x[0], dtype=np.float32)
    rc = cfg["refine"]
    rc.update(max_likelihood_evals=20000, draws=2000, pilot=2000, mh_proposals=2000, smc_init=2000,
              smc_particles=500)
    d, info = R.refine(mx.random.key(3), "gaussian_linear", model, net, x_obs, cfg)
    assert d.shape == (2000, 10) and info["likelihood_evals"] <= 20000
    if info["method"] == "sir":
        _posterior_check(d, x_obs, min(info["ess"], 2000))
    forced = copy.deepcopy(cfg)
    forced["refine"]["min_ess_fraction"] = 1.1  # always "poor": tempered SMC
    d, info = R.refine(mx.random.key(4), "gaussian_linear", model, net, x_obs, forced)
    assert info["method"] == "smc" and d.shape == (2000, 10) and info["likelihood_evals"] <= 20000
    # SMC draws: 500 particles × 4 correlated sweeps; effective size at least the 500 particles / 2
    _posterior_check(d, x_obs, 250)
    np.testing.assert_allclose(d.std(0), math.sqrt(0.05), rtol=0.25)
