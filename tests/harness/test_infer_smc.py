"""``genmlx infer --method smc``: the zoo's linear-Gaussian state-space model (``gm.Unfold``)
with its NeuralIS-trained per-step proposal, run through the CLI entry point in-process.

Oracle: an independent Kalman filter (exact log p(y_{0:T−1}) and filtering means).
The observation file repeats one simulated sequence REPS times, so one ``infer`` call
gives REPS independent SMC runs; tolerances come from their spread:

- evidence: Ẑ is unbiased, so mean(Ẑ / Z) lies within 3.5 standard errors of 1;
- filtering means: the average over runs lies within t·SE of the Kalman mean at every
  step, t the Student-t quantile for a family-wise level 0.001 over the T steps;
- the guide as proposal beats the bootstrap filter: sd(log Ẑ) at most half of it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import genmlx  # noqa: F401  (fast BLAS before mlx.core)
from genmlx.cli import main
from genmlx.harness.config import ConfigError, load_config
from tests.harness.conftest import REPO, toy_config

CFG = REPO / "experiments" / "ssm_neural_is.toml"
A, Q, R = 0.9, 1.0, 0.3  # the zoo model's parameters (genmlx/harness/zoo/ssm.py)
T, REPS, N = 20, 16, 100


def kalman(ys):
    m, P, ll, means = 0.0, 0.0, 0.0, []
    for y in ys:
        mp, Pp = A * m, A * A * P + Q * Q
        S = Pp + R * R
        ll += -0.5 * math.log(2 * math.pi * S) - 0.5 * (y - mp) ** 2 / S
        m, P = mp + Pp / S * (y - mp), Pp * R * R / S
        means.append(m)
    return ll, np.array(means)


def simulate(seed: int, T: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, ys = 0.0, []
    for _ in range(T):
        x = A * x + Q * rng.normal()
        ys.append(x + R * rng.normal())
    return np.array(ys, dtype=np.float32)


def infer(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main(["infer", *map(str, args)]) == 0
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]


@pytest.fixture(scope="module")
def ssm_run(tmp_path_factory):
    """The shipped config, trained as is (1000 NeuralIS steps, a few seconds)."""
    run = tmp_path_factory.mktemp("ssm") / "run"
    code = main(["train", str(CFG), "--run-dir", str(run), "log.progress=off", "log.tensorboard=false",
                 "eval.particles=200", "eval.examples=3"])
    assert code == 0
    return run


def test_training_and_eval_of_the_ssm_config(ssm_run):
    ev = json.loads((ssm_run / "eval.json").read_text())
    # one-step proposal quality: the locally optimal proposal is in the guide's family
    # (ESS/N = 1); an untrained guide has ESS/N ≈ 0.25
    assert ev["step_ess_per_n"] > 0.8
    for name in ("guide", "bootstrap"):
        assert math.isfinite(ev[f"smc_{name}_logz_err_mean"]) and ev[f"smc_{name}_logz_err_sd"] > 0


def test_smc_with_trained_guide_matches_kalman_and_beats_bootstrap(ssm_run, tmp_path, capsys):
    import mlx.core as mx

    ys = simulate(7, T)
    ll, kmeans = kalman(ys.astype(np.float64))
    obs = tmp_path / "ys.csv"
    np.savetxt(obs, np.tile(ys, (REPS, 1)), delimiter=",", header=",".join(f"y{t}" for t in range(T)))
    out = tmp_path / "smc.safetensors"
    guided = infer(capsys, ssm_run, "--method", "smc", "--obs", obs, "--particles", N, "--seed", 1, "--out", out)
    boot = infer(capsys, ssm_run, "--method", "smc", "--proposal", "prior", "--obs", obs,
                 "--particles", N, "--seed", 2)
    assert len(guided) == len(boot) == REPS
    for rec in guided + boot:
        assert rec["steps"] == T and len(rec["filter_mean[x]"]) == T and len(rec["filter_sd[x]"]) == T
        assert abs(rec["exact_log_px"] - ll) < 1e-4 * abs(ll)
    # runs are independent (different keys per observation row)
    lz = np.array([r["log_px"] for r in guided])
    assert len(set(lz.tolist())) == REPS

    ratio = np.exp(lz - ll)
    assert abs(ratio.mean() - 1) < 3.5 * ratio.std(ddof=1) / math.sqrt(REPS), ratio

    from scipy.stats import t as student_t

    fm = np.array([r["filter_mean[x]"] for r in guided])
    se = fm.std(0, ddof=1) / math.sqrt(REPS)
    tol = student_t.ppf(1 - 0.001 / (2 * T), REPS - 1)
    assert np.all(np.abs(fm.mean(0) - kmeans) < tol * se), (fm.mean(0), kmeans, se)

    lz_boot = np.array([r["log_px"] for r in boot])
    assert lz.std(ddof=1) < 0.5 * lz_boot.std(ddof=1), (lz.std(ddof=1), lz_boot.std(ddof=1))

    arr = mx.load(str(out))
    assert arr["obs0/x"].shape == (N, T) and arr["obs0/filter_mean/x"].shape == (T,)
    assert np.allclose(np.asarray(arr["obs3/filter_mean/x"]), guided[3]["filter_mean[x]"], atol=1e-4)


def test_importance_sampling_still_works_on_the_sequential_run(ssm_run, tmp_path, capsys):
    ys = simulate(8, 10)
    obs = tmp_path / "ys.npy"
    np.save(obs, ys[None])
    (rec,) = infer(capsys, ssm_run, "--method", "is", "--obs", obs, "--particles", 2000)
    ll, _ = kalman(ys.astype(np.float64))
    assert abs(rec["exact_log_px"] - ll) < 1e-4 * abs(ll)
    # the guide as whole-sequence proposal: an untrained guide is off by tens of nats
    assert rec["ess_per_n"] > 0.05 and abs(rec["log_px"] - ll) < 1.0
    assert len(rec["mean[x]"]) == len(rec["sd[x]"]) == 10


def test_smc_on_a_non_sequential_run_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "toy"
    assert main(["train", str(toy_config(tmp_path, steps=4, every=4)), "--run-dir", str(run), "--no-eval",
                 "log.progress=off", "log.tensorboard=false"]) == 0
    obs = tmp_path / "o.csv"
    obs.write_text("1.0,2.0\n")
    capsys.readouterr()
    assert main(["infer", str(run), "--method", "smc", "--obs", str(obs)]) == 2
    err = capsys.readouterr().err
    assert "--method smc" in err and "not sequential" in err and "ssm" in err


def test_ssm_config_checks():
    with pytest.raises(ConfigError, match="objective.kind: the state-space model 'ssm' trains its guide with \"neural_is\""):
        load_config(CFG, ["objective.kind=elbo"])
    with pytest.raises(ConfigError, match="data.dataset: the state-space model 'ssm' trains on simulations"):
        load_config(CFG, ["data.dataset=digits"])
