"""Neural generative functions and network helpers (``gm.nn``)."""

from genmlx.nn.layers import Activation, BernoulliHead, GaussianHead, SetEncoder, activation, mlp
from genmlx.nn.neural import NeuralNetGF, NeuralTrace
from genmlx.nn.params import Trainable, find_modules, frozen, trainable

__all__ = [
    "NeuralNetGF", "NeuralTrace", "trainable", "find_modules", "frozen", "Trainable",
    "mlp", "activation", "Activation", "GaussianHead", "BernoulliHead", "SetEncoder",
]
