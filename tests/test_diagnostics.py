"""gm.diagnostics against hand computations and analytic values."""

import numpy as np
import pytest
from scipy import special
from scipy.signal import lfilter

import genmlx as gm
from genmlx import diagnostics as D


def _ar1(rng, chains, n, phi):
    e = rng.normal(size=(chains, n))
    e[:, 0] /= np.sqrt(1 - phi**2)  # start in the stationary law
    return lfilter([1.0], [1.0, -phi], e, axis=1)


def test_split_and_rank_normalize_by_hand():
    x = np.array([[1.0, 5.0, 2.0, 8.0, 3.0], [4.0, 7.0, 6.0, 0.0, 9.0]])
    s = D.split_chains(x)
    np.testing.assert_array_equal(s, [[1, 5], [4, 7], [8, 3], [0, 9]])
    z = D.rank_normalize(s)
    ranks = np.array([[2, 5], [4, 6], [7, 3], [1, 8]], dtype=float)
    np.testing.assert_allclose(z, special.ndtri((ranks - 0.375) / (8 + 0.25)))


def test_rhat_formula_by_hand():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 8))
    # basic R-hat on already split chains, written out
    m, n = x.shape
    B = n * np.var(x.mean(1), ddof=1)
    W = np.mean(np.var(x, axis=1, ddof=1))
    expect = np.sqrt(((n - 1) / n * W + B / n) / W)
    np.testing.assert_allclose(D._rhat_basic(x), expect)


def test_rhat_iid_and_shifted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1000))
    assert abs(D.r_hat(x) - 1.0) < 0.01
    shifted = x + np.array([0.0, 0.0, 0.0, 1.0])[:, None]
    assert D.r_hat(shifted) > 1.1
    # a scale difference alone is caught by the folded R-hat
    scaled = x * np.array([1.0, 1.0, 1.0, 4.0])[:, None]
    assert D.r_hat(scaled) > 1.1
    # within-chain trend is caught by splitting
    trend = x + np.linspace(-2, 2, 1000)[None, :]
    assert D.r_hat(trend) > 1.1


def test_ess_ar1_matches_analytic():
    """ESS of a stationary AR(1) chain is S(1 − φ)/(1 + φ). Over 30 repetitions the
    estimator has sd ≈ 5% here (4 × 4000 draws, φ = 0.7), so 3.5 sd ≈ 18%."""
    rng = np.random.default_rng(1)
    phi, chains, n = 0.7, 4, 4000
    x = _ar1(rng, chains, n, phi)
    exact = chains * n * (1 - phi) / (1 + phi)
    for method in ("mean", "bulk"):
        e = D.ess(x, method)
        assert abs(e / exact - 1) < 0.18, (method, e, exact)
    # and it is far from the iid value (the test can fail)
    assert D.ess(x, "mean") < 0.5 * chains * n


def test_ess_iid_and_tail():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 2000))
    for e in (D.ess_bulk(x), D.ess_tail(x), D.ess(x, "mean")):
        assert 0.8 * 8000 < e < 1.25 * 8000


def test_mcse_mean_iid():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 2500)) * 3.0
    assert abs(D.mcse_mean(x) / (3.0 / np.sqrt(10000)) - 1) < 0.15


def test_elementwise_shapes():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 200, 2, 3))
    assert D.r_hat(x).shape == (2, 3)
    assert D.ess_bulk(x).shape == (2, 3)
    assert D.ess_tail(x).shape == (2, 3)


@pytest.mark.parametrize("xi", [0.3, 0.7, 1.2])
def test_psis_khat_pareto_tail(xi):
    """Weights with a Pareto(1/ξ) tail have k = ξ. The tail fit uses M = 3√S = 949 of
    S = 10⁵ weights; the asymptotic sd of the GPD shape estimate is (1 + ξ)/√M, and
    the tolerance is 3.5 of those."""
    rng = np.random.default_rng(int(xi * 100))
    s = 100_000
    w = rng.pareto(1.0 / xi, size=s) + 1.0
    k = D.psis_khat(np.log(w))
    m = 3 * np.sqrt(s)
    assert abs(k - xi) < 3.5 * (1 + xi) / np.sqrt(m), k


def test_psis_khat_light_tail_and_errors():
    rng = np.random.default_rng(6)
    # log-weights N(0, 0.5²): a light (log-normal) tail, k̂ well below 0.5
    assert D.psis_khat(0.5 * rng.normal(size=20000)) < 0.3
    with pytest.raises(ValueError, match="at least 10"):
        D.psis_khat(np.zeros(5))


def test_summary_table():
    rng = np.random.default_rng(7)
    s = D.summary({"a": rng.normal(size=(4, 300)), "b": rng.normal(size=(4, 300, 2)) + 5})
    assert [r["name"] for r in s] == ["a", "b[0]", "b[1]"]
    assert abs(s["b[1]"]["mean"] - 5) < 0.2
    for r in s:
        assert abs(r["r_hat"] - 1) < 0.02 and r["ess_bulk"] > 600
    text = str(s)
    assert "ess_bulk" in text and "b[1]" in text
    assert set(s.to_dict()["a"]) >= {"mean", "sd", "ess_bulk", "ess_tail", "r_hat", "mcse_mean"}


def test_bad_input():
    with pytest.raises(ValueError, match="chains, draws"):
        D.r_hat(np.zeros(10))
    with pytest.raises(ValueError, match="method"):
        D.ess(np.zeros((2, 10)), "median")
    assert gm.diagnostics.r_hat is D.r_hat
