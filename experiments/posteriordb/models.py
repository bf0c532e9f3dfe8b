"""Four posteriordb posteriors written in genmlx, shared by the tests, the full-size
runs (``run.py``) and the NUTS benchmark.

Each entry of :data:`POSTERIORS` gives the model, a function turning ``data.json``
into ``(args, observations)``, and a function mapping NUTS samples to the reference
parameter names (``theta[1]`` …, arrays [chains, draws]). Flat priors use ``gm.flat``;
``<lower=0>`` parameters are constrained positive (see shared/data/README.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import genmlx as gm
import mlx.core as mx
import numpy as np


# -- eight schools, non-centred -------------------------------------------------------
@gm.gen
def eight_schools_noncentered(sigma):
    """θ̃_j ~ N(0, 1), μ ~ N(0, 5), τ ~ half-Cauchy(0, 5); y_j ~ N(μ + τθ̃_j, σ_j)."""
    mu = gm.trace("mu", gm.normal(0.0, 5.0))
    tau = gm.trace("tau", gm.half_cauchy(5.0))
    theta_tilde = gm.trace("theta_tilde", gm.normal(mx.zeros(sigma.shape), 1.0))
    return gm.trace("y", gm.normal(mu + tau * theta_tilde, sigma))


def _eight_schools_data(d):
    return (mx.array(d["sigma"], dtype=mx.float32),), gm.choicemap({"y": mx.array(d["y"], dtype=mx.float32)})


def _eight_schools_params(s):
    theta = s["mu"][..., None] + s["tau"][..., None] * s["theta_tilde"]
    out = {f"theta[{j + 1}]": theta[..., j] for j in range(theta.shape[-1])}
    out["mu"], out["tau"] = s["mu"], s["tau"]
    return out


# -- kidiq: kid_score ~ mom_iq ---------------------------------------------------------
@gm.gen
def kidscore_momiq(mom_iq):
    """β flat on R², σ ~ half-Cauchy(0, 2.5); kid_score ~ N(β₁ + β₂·mom_iq, σ)."""
    beta = gm.trace("beta", gm.flat(shape=(2,)))
    sigma = gm.trace("sigma", gm.half_cauchy(2.5))
    return gm.trace("kid_score", gm.normal(beta[0] + beta[1] * mom_iq, sigma))


def _kidiq_data(d):
    return (mx.array(d["mom_iq"], dtype=mx.float32),), gm.choicemap(
        {"kid_score": mx.array(d["kid_score"], dtype=mx.float32)})


def _kidiq_params(s):
    return {"beta[1]": s["beta"][..., 0], "beta[2]": s["beta"][..., 1], "sigma": s["sigma"]}


# -- sblrc-blr: Bayesian linear regression ----------------------------------------------
@gm.gen
def blr(X):
    """β ~ N(0, 10²)^D, σ ~ half-N(0, 10²); y ~ N(Xβ, σ)."""
    beta = gm.trace("beta", gm.normal(mx.zeros((X.shape[1],)), 10.0))
    sigma = gm.trace("sigma", gm.half_normal(10.0))
    return gm.trace("y", gm.normal(X @ beta, sigma))


def _blr_data(d):
    return (mx.array(d["X"], dtype=mx.float32),), gm.choicemap({"y": mx.array(d["y"], dtype=mx.float32)})


def _blr_params(s):
    out = {f"beta[{j + 1}]": s["beta"][..., j] for j in range(s["beta"].shape[-1])}
    out["sigma"] = s["sigma"]
    return out


# -- garch(1,1) -------------------------------------------------------------------------
@gm.gen
def garch11(y, sigma1):
    """μ flat, α₀ > 0 flat, α₁ ∈ (0, 1) flat, β₁ ∈ (0, 1 − α₁) flat (the joint prior is
    constant on that region, hence gm.flat and not a uniform on the dependent interval);
    σ₁ given, σ_t² = α₀ + α₁(y_{t−1} − μ)² + β₁σ_{t−1}², y_t ~ N(μ, σ_t).

    The linear recursion v_t = β₁v_{t−1} + c_t (c_1 = σ₁², c_t = α₀ + α₁(y_{t−1} − μ)²) is
    solved by a parallel prefix scan (log₂T doubling steps, v ← v + β₁^k·shift_k(v))
    instead of a Python loop over t."""
    mu = gm.trace("mu", gm.flat())
    alpha0 = gm.trace("alpha0", gm.flat(low=0.0))
    alpha1 = gm.trace("alpha1", gm.flat(0.0, 1.0))
    beta1 = gm.trace("beta1", gm.flat(0.0, 1.0 - alpha1))
    T = y.shape[0]
    c = mx.concatenate([mx.full((1,), sigma1**2), alpha0 + alpha1 * (y[:-1] - mu) ** 2])
    v, bk, k = c, beta1, 1
    while k < T:
        v = v + bk * mx.concatenate([mx.zeros((k,)), v[: T - k]])
        bk, k = bk * bk, 2 * k
    return gm.trace("y", gm.normal(mu, mx.sqrt(v)))


def _garch_data(d):
    y = mx.array(d["y"], dtype=mx.float32)
    return (y, float(d["sigma1"])), gm.choicemap({"y": y})


def _garch_params(s):
    return {k: s[k] for k in ("mu", "alpha0", "alpha1", "beta1")}


@dataclass(frozen=True)
class Posterior:
    name: str
    model: object
    data: Callable
    params: Callable
    mass: str = "diag"


POSTERIORS = {
    "eight_schools-eight_schools_noncentered": Posterior(
        "eight_schools-eight_schools_noncentered", eight_schools_noncentered, _eight_schools_data,
        _eight_schools_params),
    "kidiq-kidscore_momiq": Posterior("kidiq-kidscore_momiq", kidscore_momiq, _kidiq_data,
                                      _kidiq_params, mass="dense"),
    "sblrc-blr": Posterior("sblrc-blr", blr, _blr_data, _blr_params, mass="dense"),
    "garch-garch11": Posterior("garch-garch11", garch11, _garch_data, _garch_params),
}


def load(root: Path, name: str):
    """(posterior, args, observations, reference draws {param: [chains, draws]})."""
    post = POSTERIORS[name]
    folder = Path(root) / "posteriordb" / name
    d = json.loads((folder / "data.json").read_text())
    args, obs = post.data(d)
    ref = dict(np.load(folder / "reference_draws.npz"))
    return post, args, obs, ref


def compare(params: dict, ref: dict) -> dict:
    """Per parameter: (mean − ref mean)/ref sd and sd/ref sd − 1."""
    out = {}
    for k, r in ref.items():
        x = np.asarray(params[k], dtype=np.float64)
        rm, rs = r.mean(), r.std()
        out[k] = ((x.mean() - rm) / rs, x.std() / rs - 1.0)
    return out
