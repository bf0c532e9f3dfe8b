"""Neural generative functions and network helpers (``gm.nn``)."""

from genmlx.nn.layers import (
    Activation, BernoulliHead, GaussianHead, Linear, SetEncoder, activation, mlp, use_fast_linear,
)
from genmlx.nn.neural import NeuralNetGF, NeuralTrace
from genmlx.nn.params import Trainable, find_modules, frozen, trainable

__all__ = [
    "NeuralNetGF", "NeuralTrace", "trainable", "find_modules", "frozen", "Trainable",
    "mlp", "Linear", "use_fast_linear", "activation", "Activation", "GaussianHead", "BernoulliHead", "SetEncoder",
]
