"""A linear-Gaussian latent model with exact posterior and evidence (shared by tests).

z ~ N(0, I_d), x | z ~ N(W z + b, s² I_D). Posterior N(μ(x), Σ) with
Σ = (I + WᵀW/s²)⁻¹, μ(x) = Σ Wᵀ(x − b)/s²; evidence x ~ N(b, W Wᵀ + s² I).
W has orthogonal columns, so Σ is diagonal and lies in the guide family
q(z | x) = N(A x + c, diag(exp(2 log_s))): every objective's optimum is exact.
"""

from __future__ import annotations

import genmlx as gm
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import mlx.optimizers as optim
from scipy import stats

d, D, S = 2, 3, 0.5
W_np = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
b_np = np.array([0.5, -1.0, 0.3])
W, b = mx.array(W_np, dtype=mx.float32), mx.array(b_np, dtype=mx.float32)
SIGMA = np.linalg.inv(np.eye(d) + W_np.T @ W_np / S**2)
A_EXACT = SIGMA @ W_np.T / S**2
C_EXACT = -A_EXACT @ b_np


def post_mean(x):
    return A_EXACT @ (np.asarray(x) - b_np)


def log_evidence(xs):
    cov = W_np @ W_np.T + S**2 * np.eye(D)
    return stats.multivariate_normal(b_np, cov).logpdf(np.asarray(xs, dtype=np.float64))


@gm.gen
def model():
    z = gm.normal(mx.zeros(d), 1.0) @ "z"
    return gm.normal(W @ z + b, S) @ "x"


class AffineGaussian(nn.Module):
    def __init__(self, shift: float = 0.0, log_s: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(D, d)
        self.lin.weight = mx.zeros((d, D))
        self.lin.bias = mx.full((d,), shift)
        self.log_s = mx.full((d,), log_s)

    def __call__(self, x):
        return self.lin(x), mx.exp(self.log_s)


def make_guide(shift: float = 0.0, log_s: float = 0.0):
    net = gm.nn.NeuralNetGF(AffineGaussian(shift, log_s))

    @gm.gen
    def guide(x):
        m, sc = net(x) @ "net"
        return gm.normal(m, sc) @ "z"

    return guide, net.module


@gm.gen
def prior_guide(x):
    return gm.normal(mx.zeros(d), 1.0) @ "z"


def train(objective, steps=(600, 300), lrs=(2e-2, 5e-4), batches=(64, 512), seed=0):
    """Two phases of Adam (the second with a lower rate and larger batches)."""
    key = mx.random.key(seed)
    for n, lr, B in zip(steps, lrs, batches):
        opt = optim.Adam(learning_rate=lr)
        step = gm.amortized.make_train_step(objective, opt)
        for _ in range(n):
            key, k1, k2 = mx.random.split(key, 3)
            m = step(k2, model.vsimulate(k1, (), B)["x"])
        mx.eval(m)
    return m
