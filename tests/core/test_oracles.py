"""Importance weights from ``vgenerate`` against exact oracles.

With the prior as proposal, w_i = log p(y | z_i), so mean(exp w) estimates p(y)
unbiasedly and Σ w̃_i f(z_i) estimates E[f(z) | y]. Tolerances are 3.5 standard errors
computed from the same samples (delta method for the self-normalised ratio).
"""

import itertools
import math

import mlx.core as mx
import numpy as np

import genmlx as gm

Z = 3.5


def _snis_check(f, w, exact, what):
    """Self-normalised estimate of E[f] with its delta-method standard error."""
    w = np.asarray(w, np.float64)
    f = np.asarray(f, np.float64)
    ww = np.exp(w - w.max())
    ww /= ww.sum()
    est = float(np.sum(ww * f))
    se = math.sqrt(float(np.sum(ww**2 * (f - est) ** 2)))
    assert abs(est - exact) < Z * se + 1e-12, f"{what}: {est} vs exact {exact} (se {se})"
    return est, se


def _evidence_check(w, exact_log, what):
    w = np.asarray(w, np.float64)
    m = w.max()
    r = np.exp(w - m)
    est, se = r.mean(), r.std(ddof=1) / math.sqrt(len(r))
    exact = math.exp(exact_log - m)
    assert abs(est - exact) < Z * se, f"{what}: {est * math.exp(m)} vs {math.exp(exact_log)}"


@gm.gen
def chain():
    z1 = gm.bernoulli(0.3) @ "z1"
    z2 = gm.bernoulli(mx.where(z1, 0.8, 0.25)) @ "z2"
    z3 = gm.bernoulli(mx.where(z2, 0.7, 0.1)) @ "z3"
    return z3


def _chain_joint(z1, z2, z3):
    p1 = 0.3 if z1 else 0.7
    q2 = 0.8 if z1 else 0.25
    p2 = q2 if z2 else 1 - q2
    q3 = 0.7 if z2 else 0.1
    p3 = q3 if z3 else 1 - q3
    return p1 * p2 * p3


def test_bernoulli_chain_against_enumeration():
    evidence = gm.choicemap({"z3": True})
    exact_py = sum(_chain_joint(a, b, True) for a, b in itertools.product([0, 1], repeat=2))
    post_z1 = sum(_chain_joint(1, b, True) for b in [0, 1]) / exact_py
    post_z2 = sum(_chain_joint(a, 1, True) for a in [0, 1]) / exact_py
    tr, w = chain.vgenerate(mx.random.key(0), (), evidence, 20000)
    _evidence_check(w, math.log(exact_py), "p(z3 = 1)")
    _snis_check(tr["z1"], w, post_z1, "P(z1 | z3)")
    _snis_check(tr["z2"], w, post_z2, "P(z2 | z3)")
    # exact log p(evidence) from assess over the enumerated completions
    total = 0.0
    for a, b in itertools.product([False, True], repeat=2):
        lp, _ = chain.assess((), gm.choicemap({"z1": a, "z2": b, "z3": True}))
        total += math.exp(lp.item())
    assert abs(total - exact_py) < 1e-6


@gm.gen
def normal_normal(n_obs):
    mu = gm.normal(1.0, 2.0) @ "mu"
    return gm.normal(mu * mx.ones(n_obs), 1.5) @ "y"


def test_normal_normal_conjugate():
    y = np.array([0.3, 2.1, 1.7, 0.9, 1.2], np.float64)
    m0, s0, s = 1.0, 2.0, 1.5
    prec = 1 / s0**2 + len(y) / s**2
    post_var = 1 / prec
    post_mean = post_var * (m0 / s0**2 + y.sum() / s**2)
    cov = s0**2 * np.ones((5, 5)) + s**2 * np.eye(5)
    d = y - m0
    log_py = -0.5 * (d @ np.linalg.solve(cov, d) + np.linalg.slogdet(cov)[1] + 5 * math.log(2 * math.pi))
    tr, w = normal_normal.vgenerate(mx.random.key(1), (5,), gm.choicemap({"y": mx.array(y)}), 50000)
    mu = np.asarray(tr["mu"], np.float64)
    _evidence_check(w, log_py, "p(y)")
    _snis_check(mu, w, post_mean, "E[mu | y]")
    _snis_check((mu - post_mean) ** 2, w, post_var, "Var[mu | y]")
    # generate with mu constrained too: weight = exact log joint
    tr1, w1 = normal_normal.generate(mx.random.key(2), (5,), gm.choicemap({"y": mx.array(y), "mu": 0.7}))
    lj = (-0.5 * ((0.7 - m0) / s0) ** 2 - math.log(s0) - 0.5 * math.log(2 * math.pi)
          + np.sum(-0.5 * ((y - 0.7) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)))
    assert abs(w1.item() - lj) < 1e-4 * abs(lj)
