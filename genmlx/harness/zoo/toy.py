"""A tiny self-test task for the harness (no genmlx GFs involved): a noisy linear
autoencoder on fixed Gaussian data. Its loss uses the step key (input noise), so key
derivation, data order, checkpoints and rollback are all exercised in a few ms/step.

    loss = mean ‖dec(enc(x + 0.1·ε)) − x‖²,  ε ~ N(0, I)
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from genmlx.harness.data import ImageData
from genmlx.harness.zoo.common import init_params


class ToyAutoencoder(nn.Module):
    def __init__(self, dim: int, latent: int):
        super().__init__()
        self.enc = nn.Linear(dim, latent)
        self.dec = nn.Linear(latent, dim)

    def __call__(self, x):
        return self.dec(mx.tanh(self.enc(x)))


class ToyObjective:
    """``loss(key, x) -> (loss, metrics)``; ``trainable()`` the autoencoder."""

    harness_local = True

    def __init__(self, dim: int = 8, latent: int = 3, seed: int = 0):
        self.net = init_params(ToyAutoencoder(dim, latent), mx.random.key(seed))

    def trainable(self) -> nn.Module:
        return self.net

    def loss(self, key, x):
        eps = mx.random.normal(shape=x.shape, key=key)
        err = mx.mean(mx.sum(mx.square(self.net(x + 0.1 * eps) - x), axis=-1))
        return err, {"mse": err}


def toy_data(batch_size: int, prefetch: int = 2, n: int = 400, dim: int = 8) -> ImageData:
    rng = np.random.Generator(np.random.Philox(key=[17, 0]))
    A = rng.normal(size=(3, dim))
    x = (np.tanh(rng.normal(size=(n + 100, 3)) @ A)).astype(np.float32)
    return ImageData("toy", x[:n], x[n:n + 50], x[n + 50:], "none", None, batch_size, prefetch)


def toy_evaluate(objective, data, key, particles_list=()):
    x = data.fixed_eval("test")
    loss, _ = objective.loss(key, x)
    return {"test_mse": float(loss)}


def toy_validate(objective, data, key, K):
    x = data.fixed_eval("valid")
    loss, _ = objective.loss(key, x)
    return {"valid_mse": float(loss)}
