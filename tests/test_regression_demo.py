"""The main job's example (training/regression_demo.py) on a small budget: importance
sampling and batched MH must recover the exact conjugate posterior.

Tolerances: IS means within 3.5 · sd/√ESS of the exact mean (self-normalized IS error);
MH means within 3.5 standard errors computed from the independent chains' time averages
(plus the exact posterior sd / 100 for the float32 arithmetic), and MH sds within 10%.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "training" / "regression_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("regression_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def result(demo):
    return demo.main(seed=3, n_particles=20_000, n_chains=200, n_steps=120, burn_in=40)


def test_importance_sampling_matches_exact_posterior(result):
    (mean, sd), (is_stats, ess) = result["exact"], result["is"]
    assert ess > 30
    for i in range(2):
        assert abs(is_stats[i][0] - mean[i]) < 3.5 * sd[i] / ess**0.5


def test_batched_mh_matches_exact_posterior(result):
    (mean, sd), mh = result["exact"], result["mh"]
    for i in range(2):
        m, s, se = mh[i]
        assert abs(m - mean[i]) < 3.5 * se + sd[i] / 100
        assert abs(s / sd[i] - 1) < 0.1


def test_exact_posterior_against_direct_formula(demo):
    """The closed form against a brute-force grid posterior (independent oracle)."""
    import numpy as np

    xs = np.linspace(-2, 2, 7)
    ys = 0.8 * xs - 0.3 + np.array([0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2])
    mean, sd = demo.exact_posterior(xs, ys)
    g = np.linspace(-3, 3, 1201)
    S, I = np.meshgrid(g, g, indexing="ij")
    logp = (-(S**2 + I**2) / (2 * demo.PRIOR_SD**2)
            - ((ys - S[..., None] * xs - I[..., None]) ** 2).sum(-1) / (2 * demo.SIGMA**2))
    p = np.exp(logp - logp.max())
    p /= p.sum()
    for v, m, s in ((S, mean[0], sd[0]), (I, mean[1], sd[1])):
        gm_ = (p * v).sum()
        assert abs(gm_ - m) < 1e-3 and abs(np.sqrt((p * (v - gm_) ** 2).sum()) - s) < 1e-3
