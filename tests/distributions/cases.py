"""Shared table of distributions with their scipy twins and random valid parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.stats as st

import genmlx as gm
import mlx.core as mx

B = 4  # parameter sets (batch size) per distribution


@dataclass
class Case:
    name: str
    make: Callable  # params dict of np arrays -> genmlx distribution
    scipy: Callable  # params dict -> frozen scipy distribution (batched)
    params: Callable  # rng -> dict of float32 np arrays of shape [B]
    discrete: bool = False
    moments: bool = True  # finite mean/variance/kurtosis for the moment test

    def draw_params(self, seed=0):
        return self.params(np.random.default_rng(seed))


def _u(rng, lo, hi):
    return rng.uniform(lo, hi, B).astype(np.float32)


def _a(x):
    return mx.array(np.asarray(x, dtype=np.float32))


CASES = [
    Case("normal", lambda p: gm.normal(_a(p["mu"]), _a(p["s"])),
         lambda p: st.norm(p["mu"], p["s"]), lambda r: {"mu": _u(r, -3, 3), "s": _u(r, 0.2, 3)}),
    Case("uniform", lambda p: gm.uniform(_a(p["lo"]), _a(p["lo"] + p["w"])),
         lambda p: st.uniform(p["lo"], p["w"]), lambda r: {"lo": _u(r, -3, 3), "w": _u(r, 0.5, 4)}),
    Case("exponential", lambda p: gm.exponential(_a(p["rate"])),
         lambda p: st.expon(scale=1 / p["rate"]), lambda r: {"rate": _u(r, 0.3, 4)}),
    Case("laplace", lambda p: gm.laplace(_a(p["loc"]), _a(p["s"])),
         lambda p: st.laplace(p["loc"], p["s"]), lambda r: {"loc": _u(r, -3, 3), "s": _u(r, 0.2, 3)}),
    Case("cauchy", lambda p: gm.cauchy(_a(p["loc"]), _a(p["s"])),
         lambda p: st.cauchy(p["loc"], p["s"]), lambda r: {"loc": _u(r, -3, 3), "s": _u(r, 0.2, 3)},
         moments=False),
    Case("half_normal", lambda p: gm.half_normal(_a(p["s"])),
         lambda p: st.halfnorm(scale=p["s"]), lambda r: {"s": _u(r, 0.2, 3)}),
    Case("half_cauchy", lambda p: gm.half_cauchy(_a(p["s"])),
         lambda p: st.halfcauchy(scale=p["s"]), lambda r: {"s": _u(r, 0.2, 3)}, moments=False),
    Case("student_t", lambda p: gm.student_t(_a(p["df"]), _a(p["loc"]), _a(p["s"])),
         lambda p: st.t(p["df"], p["loc"], p["s"]),
         lambda r: {"df": _u(r, 5, 12), "loc": _u(r, -3, 3), "s": _u(r, 0.2, 3)}),
    Case("log_normal", lambda p: gm.log_normal(_a(p["mu"]), _a(p["s"])),
         lambda p: st.lognorm(p["s"], scale=np.exp(p["mu"])), lambda r: {"mu": _u(r, -1, 1), "s": _u(r, 0.1, 0.6)}),
    Case("truncated_normal", lambda p: gm.truncated_normal(_a(p["mu"]), _a(p["s"]), _a(p["lo"]), _a(p["hi"])),
         lambda p: st.truncnorm((p["lo"] - p["mu"]) / p["s"], (p["hi"] - p["mu"]) / p["s"], p["mu"], p["s"]),
         lambda r: (lambda mu, s, lo: {"mu": mu, "s": s, "lo": lo, "hi": (lo + _u(r, 0.3, 4)).astype(np.float32)})(
             _u(r, -2, 2), _u(r, 0.3, 2), _u(r, -3, 3))),
    Case("gamma", lambda p: gm.gamma(_a(p["a"]), _a(p["rate"])),
         lambda p: st.gamma(p["a"], scale=1 / p["rate"]), lambda r: {"a": _u(r, 0.2, 8), "rate": _u(r, 0.3, 3)}),
    Case("inv_gamma", lambda p: gm.inv_gamma(_a(p["a"]), _a(p["b"])),
         lambda p: st.invgamma(p["a"], scale=p["b"]), lambda r: {"a": _u(r, 9, 14), "b": _u(r, 0.5, 3)}),
    Case("beta", lambda p: gm.beta(_a(p["a"]), _a(p["b"])),
         lambda p: st.beta(p["a"], p["b"]), lambda r: {"a": _u(r, 0.3, 6), "b": _u(r, 0.3, 6)}),
    Case("bernoulli", lambda p: gm.bernoulli(_a(p["p"])),
         lambda p: st.bernoulli(p["p"]), lambda r: {"p": _u(r, 0.05, 0.95)}, discrete=True),
    Case("binomial", lambda p: gm.binomial(_a(p["n"]), _a(p["p"])),
         lambda p: st.binom(p["n"].astype(np.int64), p["p"]),
         lambda r: {"n": r.integers(1, 200, B).astype(np.float32), "p": _u(r, 0.02, 0.98)}, discrete=True),
    Case("poisson", lambda p: gm.poisson(_a(p["rate"])),
         lambda p: st.poisson(p["rate"]), lambda r: {"rate": np.array([0.3, 4.0, 9.9, 10.0], np.float32) * _u(r, 1, 5)}, discrete=True),
    Case("geometric", lambda p: gm.geometric(_a(p["p"])),
         lambda p: st.geom(p["p"], loc=-1), lambda r: {"p": _u(r, 0.1, 0.9)}, discrete=True),
    Case("neg_binomial", lambda p: gm.neg_binomial(_a(p["r"]), _a(p["p"])),
         lambda p: st.nbinom(p["r"], p["p"]), lambda r: {"r": _u(r, 0.5, 20), "p": _u(r, 0.1, 0.9)}, discrete=True),
    Case("discrete_uniform", lambda p: gm.discrete_uniform(_a(p["lo"]), _a(p["lo"] + p["w"])),
         lambda p: st.randint(p["lo"], p["lo"] + p["w"] + 1),
         lambda r: {"lo": r.integers(-5, 5, B).astype(np.float32), "w": r.integers(0, 8, B).astype(np.float32)},
         discrete=True),
]

BY_NAME = {c.name: c for c in CASES}


def scipy_logp(case, params, x):
    d = case.scipy({k: v.astype(np.float64) for k, v in params.items()})
    x = np.asarray(x, dtype=np.float64)
    return d.logpmf(x) if case.discrete else d.logpdf(x)


def scipy_draws(case, params, n, seed=0):
    d = case.scipy({k: v.astype(np.float64) for k, v in params.items()})
    return d.rvs(size=(n, B), random_state=np.random.default_rng(seed)).astype(np.float32)
