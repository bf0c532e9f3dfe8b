"""Classifier two-sample test (C2ST) as defined by the sbibm benchmark.

An MLP (two hidden layers of width 10·dim, ReLU, Adam) is trained to tell reference
draws (label 0) from method draws (label 1). Inputs are z-scored with the *reference*
samples' mean and sd. The statistic is the k-fold cross-validated accuracy
(shuffled folds): 0.5 = indistinguishable, 1.0 = fully separated. Under H0 (same
distribution) its standard error is about sqrt(0.25 / (n_ref + n_method)).

Experiment-only dependency: scikit-learn.
"""

from __future__ import annotations

import numpy as np


def c2st(reference: np.ndarray, samples: np.ndarray, *, seed: int = 1, n_folds: int = 5,
         max_iter: int = 10000, early_stopping: bool = False) -> float:
    """Mean ``n_folds``-fold cross-validated accuracy of the sbibm C2ST classifier.

    reference, samples: [n, dim] arrays (the benchmark uses 10000 of each).
    ``early_stopping=True`` (a deviation from the benchmark, for limited CPU) stops each
    fit when the accuracy on 10% of its training fold has not improved for 10 epochs;
    the default trains to sklearn's loss tolerance, up to ``max_iter`` epochs."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    X = np.asarray(reference, dtype=np.float64)
    Y = np.asarray(samples, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"c2st: reference and samples must be [n, dim] with the same dim, "
                         f"got {X.shape} and {Y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("c2st: samples contain non-finite values")
    mean, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    X, Y = (X - mean) / sd, (Y - mean) / sd
    dim = X.shape[1]
    clf = MLPClassifier(activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim),
                        max_iter=max_iter, solver="adam", random_state=seed,
                        early_stopping=early_stopping)
    data = np.concatenate([X, Y])
    target = np.concatenate([np.zeros(len(X)), np.ones(len(Y))])
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, target, cv=folds, scoring="accuracy")))
