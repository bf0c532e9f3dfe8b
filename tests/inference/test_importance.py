"""Importance sampling / resampling against the normal–normal conjugate oracle."""

import math

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from genmlx.inference import (
    ProposalCoverageError,
    importance_resampling,
    importance_sampling,
)

PRIOR_SD, NOISE = 1.0, 0.5
YS = np.array([0.9, 1.4, 0.6], dtype=np.float32)


@gm.gen
def model(ys_len):
    mu = gm.trace("mu", gm.normal(0.0, PRIOR_SD))
    for i in range(ys_len):
        gm.trace(("y", i), gm.normal(mu, NOISE))
    return mu


@gm.gen
def wide_proposal(loc, scale):
    gm.trace("mu", gm.normal(loc, scale))


OBS = gm.choicemap({("y", i): float(y) for i, y in enumerate(YS)})


def exact():
    prec = 1 / PRIOR_SD**2 + len(YS) / NOISE**2
    var = 1 / prec
    mean = var * YS.sum() / NOISE**2
    cov = PRIOR_SD**2 * np.ones((3, 3)) + NOISE**2 * np.eye(3)
    d = YS - 0.0
    logz = -0.5 * (d @ np.linalg.solve(cov, d) + np.linalg.slogdet(cov)[1] + 3 * math.log(2 * math.pi))
    return mean, var, logz


def _check_moments(res):
    """Self-normalized estimates of E[mu], Var[mu] within 3.5 delta-method SEs."""
    mean, var, _ = exact()
    w = np.asarray(res.normalized_weights, dtype=np.float64)
    mu = np.asarray(res.traces["mu"], dtype=np.float64)
    m_hat = np.sum(w * mu)
    se_m = np.sqrt(np.sum(w**2 * (mu - m_hat) ** 2))
    c2 = (mu - m_hat) ** 2
    v_hat = np.sum(w * c2)
    se_v = np.sqrt(np.sum(w**2 * (c2 - v_hat) ** 2))
    assert abs(m_hat - mean) < 3.5 * se_m, (m_hat, mean, se_m)
    assert abs(v_hat - var) < 3.5 * se_v, (v_hat, var, se_v)
    assert float(res.estimate("mu")) == pytest.approx(m_hat, abs=1e-4)


def test_prior_proposal_posterior_moments():
    res = importance_sampling(mx.random.key(0), model, (3,), OBS, 20000)
    assert res.log_weights.shape == (20000,)
    assert res.traces.batch_size == 20000
    _check_moments(res)
    assert 0 < float(res.ess) < 20000


def test_custom_proposal_posterior_moments():
    res = importance_sampling(mx.random.key(1), model, (3,), OBS, 20000, wide_proposal, (0.5, 1.5))
    _check_moments(res)
    # with a proposal, every latent is constrained: weights are log p(mu, y) − log q(mu)
    mu = np.asarray(res.traces["mu"], dtype=np.float64)[:5]
    from scipy.stats import norm

    lw = norm.logpdf(mu, 0, PRIOR_SD) + norm.logpdf(YS[None, :], mu[:, None], NOISE).sum(1) - norm.logpdf(mu, 0.5, 1.5)
    np.testing.assert_allclose(np.asarray(res.log_weights)[:5], lw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_proposal", [False, True])
def test_log_ml_unbiased(use_proposal):
    """mean over repeats of exp(log Ẑ − log Z) = 1 within 3.5 sample SEs."""
    _, _, logz = exact()
    reps = 300
    prop = (wide_proposal, (0.5, 1.5)) if use_proposal else (None, None)
    ratios = []
    for k in mx.random.split(mx.random.key(7), reps):
        res = importance_sampling(k, model, (3,), OBS, 8, *prop)
        ratios.append(math.exp(float(res.log_marginal_likelihood) - logz))
    ratios = np.array(ratios)
    se = ratios.std(ddof=1) / math.sqrt(reps)
    assert abs(ratios.mean() - 1.0) < 3.5 * se, (ratios.mean(), se)
    # and the estimator is not degenerate: log Ẑ is biased low by Jensen for small n
    assert np.mean(np.log(ratios)) < 0.0


def test_chunking_matches_manual_chunks_and_keeps_all():
    key = mx.random.key(3)
    res = importance_sampling(key, model, (3,), OBS, 2500, chunk_size=1000)
    assert res.log_weights.shape == (2500,) and res.traces.batch_size == 2500
    keys = mx.random.split(key, 3)
    parts = [importance_sampling(k, model, (3,), OBS, s) for k, s in zip(keys, [1000, 1000, 500])]
    np.testing.assert_allclose(
        np.asarray(res.log_weights), np.concatenate([np.asarray(p.log_weights) for p in parts]), rtol=1e-6
    )
    light = importance_sampling(key, model, (3,), OBS, 2500, chunk_size=1000, keep_traces=False)
    assert light.traces is None
    np.testing.assert_allclose(np.asarray(light.log_weights), np.asarray(res.log_weights), rtol=1e-6)
    with pytest.raises(ValueError, match="keep_traces"):
        light.resample(key, 3)


def test_compiled_equals_uncompiled_and_keys_differ():
    a = importance_sampling(mx.random.key(5), model, (3,), OBS, 64, wide_proposal, (0.0, 2.0))
    b = importance_sampling(mx.random.key(5), model, (3,), OBS, 64, wide_proposal, (0.0, 2.0), compile=False)
    c = importance_sampling(mx.random.key(6), model, (3,), OBS, 64, wide_proposal, (0.0, 2.0))
    np.testing.assert_allclose(np.asarray(a.log_weights), np.asarray(b.log_weights), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(a.log_weights), np.asarray(c.log_weights))
    # new proposal arguments are inputs, not stale compiled constants
    d = importance_sampling(mx.random.key(5), model, (3,), OBS, 64, wide_proposal, (0.3, 2.0))
    assert not np.allclose(np.asarray(a.traces["mu"]), np.asarray(d.traces["mu"]))


def test_importance_resampling_shapes_and_posterior():
    tr, lml = importance_resampling(mx.random.key(2), model, (3,), OBS, 500)
    assert tr.batch_size is None and tr["mu"].shape == ()
    trs, _ = importance_resampling(mx.random.key(2), model, (3,), OBS, 20000, m=4000)
    assert trs.batch_size == 4000
    mean, var, _ = exact()
    mu = np.asarray(trs["mu"])
    # resampled draws: SE at least that of 4000 i.i.d. posterior draws; the extra IS error
    # is bounded by using 20000 proposals (ESS ≈ 8000), so allow 3.5 × the combined SE
    se = math.sqrt(var / 4000 + var / 8000)
    assert abs(mu.mean() - mean) < 3.5 * se


@gm.gen
def prop_missing(a):
    gm.trace("other", gm.normal(0.0, 1.0))


@gm.gen
def prop_observed(a):
    gm.trace("mu", gm.normal(0.0, 1.0))
    gm.trace(("y", 0), gm.normal(0.0, 1.0))


def test_coverage_errors_name_addresses():
    with pytest.raises(ProposalCoverageError) as e:
        importance_sampling(mx.random.key(0), model, (3,), OBS, 10, prop_missing, (0.0,))
    msg = str(e.value)
    assert "'mu'" in msg and "'other'" in msg and "does not propose" in msg and "does not make" in msg
    assert e.value.missing == [("mu",)] and e.value.extra == [("other",)]
    with pytest.raises(ProposalCoverageError, match=r"observed address\(es\) \('y', 0\)"):
        importance_sampling(mx.random.key(0), model, (3,), OBS, 10, prop_observed, (0.0,))


def test_unknown_observation_address_is_named():
    with pytest.raises(gm.UnvisitedConstraintError, match="'nope'"):
        importance_sampling(mx.random.key(0), model, (3,), OBS.merge(gm.choicemap({"nope": 1.0})), 10)
