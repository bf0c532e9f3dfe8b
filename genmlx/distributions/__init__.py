"""Probability distributions (each one a generative function).

Lower-case names are the families used in models (``gm.normal(0, 1) @ "x"``); the
CamelCase classes are the same objects.
"""

from genmlx.distributions import constraints, special
from genmlx.distributions.base import Distribution, DistTrace, UnconstrainedValue
from genmlx.distributions.continuous import (
    Cauchy,
    Exponential,
    HalfCauchy,
    HalfNormal,
    Laplace,
    LogNormal,
    Normal,
    TruncatedNormal,
    Uniform,
    cauchy,
    exponential,
    half_cauchy,
    half_normal,
    laplace,
    log_normal,
    lognormal,
    normal,
    truncated_normal,
    uniform,
)
from genmlx.distributions.degenerate import Delta, Flat, delta, flat
from genmlx.distributions.discrete import (
    Bernoulli,
    Binomial,
    Categorical,
    DiscreteUniform,
    Geometric,
    NegBinomial,
    Poisson,
    bernoulli,
    binomial,
    categorical,
    discrete_uniform,
    flip,
    geometric,
    neg_binomial,
    poisson,
)
from genmlx.distributions.gamma_family import (
    Beta,
    Dirichlet,
    Gamma,
    InvGamma,
    StudentT,
    beta,
    dirichlet,
    gamma,
    inv_gamma,
    student_t,
)
from genmlx.distributions.mixture import Mixture, mixture
from genmlx.distributions.multivariate import MvNormal, mv_normal

__all__ = [
    "constraints", "special", "Distribution", "DistTrace", "UnconstrainedValue",
    # classes
    "Normal", "Uniform", "Exponential", "Laplace", "Cauchy", "HalfNormal", "HalfCauchy",
    "LogNormal", "TruncatedNormal", "Gamma", "InvGamma", "Beta", "Dirichlet", "StudentT",
    "MvNormal", "Bernoulli", "Binomial", "Poisson", "Geometric", "NegBinomial",
    "Categorical", "DiscreteUniform", "Delta", "Flat", "Mixture",
    # families
    "normal", "mv_normal", "uniform", "beta", "gamma", "inv_gamma", "exponential",
    "laplace", "cauchy", "half_normal", "half_cauchy", "student_t", "log_normal",
    "lognormal", "truncated_normal", "bernoulli", "flip", "binomial", "poisson",
    "geometric", "neg_binomial", "categorical", "discrete_uniform", "dirichlet", "delta",
    "mixture", "flat",
]
