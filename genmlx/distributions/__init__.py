"""Probability distributions (each one a generative function)."""

from genmlx.distributions import constraints
from genmlx.distributions.base import Distribution, DistTrace, UnconstrainedValue
from genmlx.distributions.continuous import Normal, Uniform, normal, uniform
from genmlx.distributions.discrete import Bernoulli, bernoulli, flip

__all__ = [
    "constraints", "Distribution", "DistTrace", "UnconstrainedValue",
    "Normal", "Uniform", "Bernoulli", "normal", "uniform", "bernoulli", "flip",
]
