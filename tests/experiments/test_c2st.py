"""C2ST (experiments/sbibm/c2st.py) against exact oracles: the accuracy of the classifier
on 2·10⁴ cross-validated classifications has binomial standard error sqrt(p(1−p)/20000);
tolerances are 3.5 of those (plus nothing else)."""

import math

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn (experiment-only extra) is not installed: pip install -e '.[experiments]' to check the C2ST oracles")

from experiments.sbibm.c2st import c2st  # noqa: E402

N = 10000
SE = lambda p: math.sqrt(p * (1 - p) / (2 * N))  # noqa: E731


def test_same_distribution_is_chance():
    r = np.random.default_rng(0)
    acc = c2st(r.normal(size=(N, 2)), r.normal(size=(N, 2)), seed=1)
    assert abs(acc - 0.5) < 3.5 * SE(0.5), acc


def test_known_bayes_accuracy():
    # N(0, I) vs N((1, 0), I): the Bayes classifier's accuracy is Φ(1/2); a flexible
    # classifier reaches it up to its estimation error, never exceeds it by more than noise
    r = np.random.default_rng(1)
    y = r.normal(size=(N, 2))
    y[:, 0] += 1.0
    p = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
    acc = c2st(r.normal(size=(N, 2)), y, seed=1)
    assert abs(acc - p) < 3.5 * SE(p), (acc, p)


def test_separated_is_one_and_scale_invariant():
    # 10 sd apart (Bayes error Φ(−5) ≈ 3e-7); the z-scoring makes the test invariant to units
    r = np.random.default_rng(2)
    x, y = r.normal(size=(N, 2)), r.normal(size=(N, 2)) + np.array([10.0, 0.0])
    acc = c2st(1e3 * x, 1e3 * y, seed=1, early_stopping=True)
    assert acc > 0.999, acc  # expected misclassifications ≈ 0.006 of 20000


def test_bad_input():
    with pytest.raises(ValueError, match="same dim"):
        c2st(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        c2st(np.zeros((10, 2)), np.full((10, 2), np.nan))
