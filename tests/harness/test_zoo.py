"""Model zoo: the sbibm likelihoods against independent formulas and the reference
posteriors, and the image models' address structure."""

from __future__ import annotations

import math

import numpy as np
import pytest

import genmlx as gm
import mlx.core as mx

from genmlx.harness.zoo.images import sbn, vae
from genmlx.harness.zoo.sbibm import SLCPLikelihood, TwoMoonsLikelihood, reference_observations, sbibm_model
from tests.conftest import require_data


def test_slcp_likelihood_matches_scipy():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    for _ in range(5):
        th = rng.uniform(-3, 3, 5).astype(np.float32)
        s1, s2, rho = th[2] ** 2, th[3] ** 2, np.tanh(th[4])
        cov = np.array([[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]]) + 1e-6 * np.eye(2)
        x = rng.multivariate_normal(th[:2], cov, size=4).astype(np.float32)
        want = multivariate_normal(th[:2].astype(np.float64), cov).logpdf(x.astype(np.float64)).sum()
        got = SLCPLikelihood(mx.array(th)).log_prob(mx.array(x.reshape(-1))).item()
        assert abs(got - want) < 1e-3 * max(1.0, abs(want))
    # the simulator draws from that density: sample covariance of many draws
    th = mx.array([0.5, -1.0, 1.2, 0.9, 0.4])
    xs = np.asarray(SLCPLikelihood(th).sample(mx.random.key(1), (20000,))).reshape(-1, 2)
    s1, s2, rho = 1.2 ** 2, 0.9 ** 2, math.tanh(0.4)
    c = np.cov(xs.T)
    assert abs(c[0, 0] - s1 * s1) < 3.5 * s1 * s1 * math.sqrt(2 / len(xs))
    assert abs(c[0, 1] - rho * s1 * s2) < 3.5 * s1 * s2 * math.sqrt((1 + rho * rho) / len(xs))


def test_two_moons_simulator_and_likelihood_agree():
    th = mx.array([0.3, -0.6])
    d = TwoMoonsLikelihood(th)
    x = d.sample(mx.random.key(2), (20000,))
    lp = np.asarray(d.log_prob(x))
    assert np.isfinite(lp).all()
    c = np.array([-abs(0.3 - 0.6) / math.sqrt(2), (-0.3 - 0.6) / math.sqrt(2)]) + np.array([0.25, 0.0])
    r = np.linalg.norm(np.asarray(x) - c, axis=1)
    assert abs(r.mean() - 0.1) < 3.5 * 0.01 / math.sqrt(len(r))
    # log N(r; 0.1, 0.01²), and -inf on the other side of the moon's centre
    assert np.allclose(lp, -0.5 * ((r - 0.1) / 0.01) ** 2 - math.log(0.01) - 0.5 * math.log(2 * math.pi), atol=1e-3)
    bad = mx.array(c - np.array([0.05, 0.0]))
    assert d.log_prob(bad).item() == -math.inf


@pytest.mark.parametrize("task", ["gaussian_linear", "two_moons"])
def test_prior_importance_sampling_reproduces_reference_posterior(genmlx_data, task):
    require_data(genmlx_data, "sbibm", task, "obs_1")
    x_obs, ref = reference_observations(task, str(genmlx_data))[0]
    model = sbibm_model(task)
    n = 200_000
    tr, w = model.vgenerate(mx.random.key(5), (), gm.choicemap({"x": mx.array(x_obs)}), n)
    w = np.asarray(w, dtype=np.float64)
    w = np.exp(w - w.max())
    w /= w.sum()
    th = np.asarray(tr["theta"], dtype=np.float64)
    ess = 1.0 / np.sum(w * w)
    assert ess > 200
    mean = (w[:, None] * th).sum(0)
    sd = ref.std(0)
    se = sd * np.sqrt(1.0 / ess + 1.0 / len(ref))
    assert np.all(np.abs(mean - ref.mean(0)) < 3.5 * se), (mean, ref.mean(0), se)
    if task == "gaussian_linear":  # conjugate: posterior N(x/2, 0.05 I)
        assert np.allclose(ref.mean(0), x_obs / 2, atol=3.5 * math.sqrt(0.05 / len(ref)))


def test_image_models_have_matching_addresses():
    key = mx.random.key(0)
    m, g = vae(64, 8, (32,), "tanh", key)
    x = mx.zeros((64,))
    gm.amortized.check_coverage(key, m, (), g, (x,), gm.choicemap({"x": x}))
    tr = m.simulate(key, ())
    assert tr["z"].shape == (8,) and tr["decoder"].shape == (64,)
    m, g = sbn(64, (16, 8, 4), key)
    gm.amortized.check_coverage(key, m, (), g, (x,), gm.choicemap({"x": x}))
    tr = g.simulate(key, (x,))
    assert [tuple(tr[f"h{i}"].shape) for i in (1, 2, 3)] == [(16,), (8,), (4,)]


def test_neural_is_task_trains_evaluates_and_infers(genmlx_data, tmp_path, monkeypatch):
    from tests.harness.conftest import REPO, run_cli

    require_data(genmlx_data, "sbibm", "two_moons", "obs_1")
    import json

    monkeypatch.delenv("GENMLX_DATA", raising=False)  # the run's data.data_dir is used
    run = tmp_path / "tm"
    run_cli("train", REPO / "experiments" / "neural_is_two_moons.toml", "--run-dir", run, "train.steps=40",
            "log.eval_every_steps=20", "log.valid_examples=20", "log.valid_particles=100", "eval.particles=500",
            "eval.examples=20", "data.batch_size=64", "model.guide_hidden=[32]", "model.guide_components=3",
            f"data.data_dir={json.dumps(str(genmlx_data))}", check=True)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["ref_observations"] == 5 and 0 < ev["ref_ess_per_n"] <= 1 and math.isfinite(ev["ref_log_px"])
    r = run_cli("infer", run, "--example", "ref:1", "--particles", "400", check=True)
    rec = json.loads(r.stdout.splitlines()[0])
    assert len(rec["mean[theta]"]) == 2 and rec["ess_per_n"] > 0
