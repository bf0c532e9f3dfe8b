"""Probability distributions (each one a generative function).

Lower-case names are the families used in models (``gm.normal(0, 1) @ "x"``); the
CamelCase classes are the same objects. Every distribution has ``sample(key,
sample_shape=())`` (shape ``sample_shape + batch_shape + event_shape``), ``log_prob``
(one value per batch element), ``support`` (a constraint with a bijection from
unconstrained space for continuous supports) and declared ``arg_constraints``.

=====================  ====================================================  ==============
family                 parameters (support)                                  sampling
=====================  ====================================================  ==============
normal                 mu, sigma                                             pathwise
mv_normal              mean [K], cov [K,K] | scale_tril= (event (K,))        pathwise
uniform                low, high (interval(low, high))                       pathwise
exponential            rate (positive)                                       pathwise
laplace, cauchy        loc, scale                                            pathwise
half_normal            sigma (positive)                                      pathwise
half_cauchy            scale (positive)                                      pathwise
log_normal             mu, sigma of log x (positive)                         pathwise
student_t              df, loc, scale                                        pathwise + implicit (df)
truncated_normal       mu, sigma, low, high (±inf allowed)                   pathwise (inverse CDF)
gamma                  shape α, rate β (or scale=) — mean α/β                implicit
inv_gamma              shape α, scale β (1/x ~ gamma(α, rate β))             implicit
beta                   alpha, beta (unit interval)                           implicit
dirichlet              alpha [K] (simplex, event (K,))                       implicit
bernoulli = flip       p | logits= (bool values)                             —
binomial               n, p (int32)                                          exact (inversion/BTRS)
poisson                rate (int32)                                          exact (inversion/PTRS)
geometric              p: FAILURES before the first success (int32)          exact (inversion)
neg_binomial           r, p: FAILURES before the r-th success (int32)        gamma–Poisson
categorical            probs [K] | logits= (int32 indices)                   Gumbel-max
discrete_uniform       low, high, both inclusive (int32)                     exact
delta                  v (point mass)                                        returns v
mixture                weights [K] | logits=, components (list or batched)   index ~ categorical
flat                   low=-inf, high=inf, shape=() (improper, log p = 0)    only if bounded
=====================  ====================================================  ==============

Most univariate families take ``shape=`` to broadcast their batch shape. Validation
(ValueError naming distribution and parameter) is on by default, off with
``gm.set_validation(False)``, and skipped under ``mx.compile``/``mx.vmap`` tracing.
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
