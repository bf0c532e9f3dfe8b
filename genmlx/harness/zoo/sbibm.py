"""Simulation-based-inference benchmark tasks (sbibm) with exact likelihoods, and
mixture-density guides trained by NeuralIS on simulations.

- gaussian_linear (dim 10): θ ~ N(0, 0.1·I), x | θ ~ N(θ, 0.1·I).
- two_moons (dim 2): θ ~ U([−1, 1]²); a ~ U(−π/2, π/2), r ~ N(0.1, 0.01²),
  x = (r cos a + 0.25, r sin a) + (−|θ₁+θ₂|/√2, (−θ₁+θ₂)/√2). Likelihood as used for
  the reference posteriors: log N(r; 0.1, 0.01²) with r = ‖x − c(θ) − (0.25, 0)‖, −∞ when
  the first coordinate of that difference is negative (the 1/(π r) polar factor omitted).
- slcp (dim 5, data 8): θ ~ U([−3, 3]⁵); four iid x_j ~ N(m, Σ), m = (θ₁, θ₂),
  Σ = [[s₁², ρ s₁ s₂], [ρ s₁ s₂, s₂²]] + 10⁻⁶ I, s₁ = θ₃², s₂ = θ₄², ρ = tanh θ₅.

Guide: q(θ | x) = Σ_c π_c(x) N(θ; μ_c(x), diag σ_c(x)²), an MLP on the
(standardized) data. The model's latent address is ``"theta"``, the data's ``"x"``.
"""

from __future__ import annotations

import bz2
import io
import math
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn

import genmlx as gm
from genmlx.distributions import constraints as C
from genmlx.distributions.base import Distribution, param
from genmlx.harness.data import SimulatedData, data_dirs
from genmlx.harness.zoo import Task
from genmlx.harness.zoo.common import init_params, proposal_quality

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class TwoMoonsLikelihood(Distribution):
    """x ∈ R² given θ ∈ R² (see the module docstring); sampling is the simulator."""

    name = "two_moons_likelihood"
    arg_constraints = {"theta": C.real}
    event_ndim = 1

    def __init__(self, theta):
        self.theta = param(theta)
        self._init({"theta": self.theta}, batch_shape=tuple(self.theta.shape[:-1]), event_shape=(2,))

    @property
    def support(self):
        return C.real_vector if hasattr(C, "real_vector") else C.real

    def _centre(self):
        t1, t2 = self.theta[..., 0], self.theta[..., 1]
        return mx.stack([-mx.abs(t1 + t2) / math.sqrt(2.0), (-t1 + t2) / math.sqrt(2.0)], axis=-1)

    def _sample(self, key, shape):
        ka, kr = mx.random.split(key)
        a = mx.random.uniform(-math.pi / 2, math.pi / 2, shape[:-1], key=ka)
        r = 0.1 + 0.01 * mx.random.normal(shape[:-1], key=kr)
        p = mx.stack([r * mx.cos(a) + 0.25, r * mx.sin(a)], axis=-1)
        return p + self._centre()

    def _log_prob(self, x):
        d = x - self._centre() - mx.array([0.25, 0.0])
        r = mx.sqrt(mx.sum(d * d, axis=-1))
        z = (r - 0.1) / 0.01
        lp = -0.5 * z * z - math.log(0.01) - _HALF_LOG_2PI
        return mx.where(d[..., 0] < 0, -mx.inf, lp)


class SLCPLikelihood(Distribution):
    """Four iid bivariate normal draws, flattened to x ∈ R⁸ (see the module docstring)."""

    name = "slcp_likelihood"
    arg_constraints = {"theta": C.real}
    event_ndim = 1

    def __init__(self, theta):
        self.theta = param(theta)
        self._init({"theta": self.theta}, batch_shape=tuple(self.theta.shape[:-1]), event_shape=(8,))

    @property
    def support(self):
        return C.real_vector if hasattr(C, "real_vector") else C.real

    def _cov(self):
        t = self.theta
        s1, s2, rho = t[..., 2] ** 2, t[..., 3] ** 2, mx.tanh(t[..., 4])
        return t[..., 0], t[..., 1], s1 * s1 + 1e-6, rho * s1 * s2, s2 * s2 + 1e-6

    def _sample(self, key, shape):
        m1, m2, a, b, c = (v[..., None] for v in self._cov())
        e = mx.random.normal(shape[:-1] + (4, 2), key=key)
        l11 = mx.sqrt(a)
        l21 = b / l11
        l22 = mx.sqrt(mx.maximum(c - l21 * l21, 0.0))
        x1 = m1 + l11 * e[..., 0]
        x2 = m2 + l21 * e[..., 0] + l22 * e[..., 1]
        return mx.stack([x1, x2], axis=-1).reshape(shape)

    def _log_prob(self, x):
        m1, m2, a, b, c = (v[..., None] for v in self._cov())
        xs = x.reshape(x.shape[:-1] + (4, 2))
        dx, dy = xs[..., 0] - m1, xs[..., 1] - m2
        det = a * c - b * b
        quad = (c * dx * dx - 2 * b * dx * dy + a * dy * dy) / det
        return mx.sum(-math.log(2 * math.pi) - 0.5 * mx.log(det) - 0.5 * quad, axis=-1)


TASKS = {
    # name: (theta dim, data dim, prior box or None for gaussian_linear)
    "gaussian_linear": (10, 10, None),
    "two_moons": (2, 2, 1.0),
    "slcp": (5, 8, 3.0),
}


def sbibm_model(name: str):
    """The task's generative model (no arguments): ``"theta"`` then ``"x"``."""
    d, _, box = TASKS[name]
    sd = math.sqrt(0.1)

    if name == "gaussian_linear":
        @gm.gen
        def gaussian_linear():
            theta = gm.normal(mx.zeros((d,)), sd) @ "theta"
            return gm.normal(theta, sd) @ "x"
        return gaussian_linear
    lik = TwoMoonsLikelihood if name == "two_moons" else SLCPLikelihood

    @gm.gen
    def sbibm_task():
        theta = gm.uniform(-box * mx.ones((d,)), box * mx.ones((d,))) @ "theta"
        return lik(theta) @ "x"

    sbibm_task.name = name
    return sbibm_task


class MixtureDensityNet(nn.Module):
    """x ↦ (mixture logits [C], means [C, d], scales [C, d]) of a diagonal-Gaussian
    mixture over θ; inputs are standardized with fixed (simulated) statistics."""

    def __init__(self, x_dim: int, theta_dim: int, components: int, hidden, activation: str,
                 x_mean: np.ndarray, x_std: np.ndarray):
        super().__init__()
        self.C, self.d = components, theta_dim
        self.trunk = gm.nn.mlp([x_dim, *hidden], activation, out_activation=activation)
        self.out = nn.Linear(hidden[-1], components * (1 + 2 * theta_dim))
        self.x_mean, self.x_std = mx.array(x_mean), mx.array(x_std)
        self.freeze(keys=["x_mean", "x_std"], recurse=False)

    def __call__(self, x):
        h = self.out(self.trunk((x - self.x_mean) / self.x_std))
        C, d = self.C, self.d
        logits = h[..., :C]
        mu = h[..., C:C + C * d].reshape(h.shape[:-1] + (C, d))
        sigma = nn.softplus(h[..., C + C * d:].reshape(h.shape[:-1] + (C, d))) + 1e-3
        return logits, mu, sigma


def mixture_guide(net: MixtureDensityNet):
    g = gm.nn.NeuralNetGF(net, name="posterior_net")

    @gm.gen
    def mdn_guide(x):
        logits, mu, sigma = g(x) @ "net"
        comps = gm.mv_normal(mu, scale_tril=sigma[..., :, None] * mx.eye(mu.shape[-1]))
        return gm.mixture(logits=logits, components=comps) @ "theta"

    return mdn_guide


def _simulator(model, key, n: int) -> dict:
    tr = model.vsimulate(key, (), n)
    return {"theta": tr["theta"], "x": tr["x"]}


def reference_observations(name: str, data_dir: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """[(x_obs, reference posterior samples)] for the sbibm observations found in the data
    directories (empty when none is available)."""
    for d in data_dirs(data_dir):
        root = Path(d) / "sbibm" / name
        if root.is_dir():
            out = []
            for obs in sorted(root.glob("obs_*"), key=lambda p: int(p.name.split("_")[1])):
                x = np.loadtxt(obs / "observation.csv", delimiter=",", skiprows=1, dtype=np.float32).reshape(-1)
                ref = np.loadtxt(io.StringIO(bz2.decompress((obs / "reference_posterior_samples.csv.bz2").read_bytes()).decode()),
                                 delimiter=",", skiprows=1, dtype=np.float64)
                out.append((x, ref))
            return out
    return []


def build(cfg) -> Task:
    name = cfg.model.kind
    theta_dim, x_dim, _ = TASKS[name]
    model = sbibm_model(name)
    key = mx.random.key(cfg.seed)
    k_stats, k_init = mx.random.split(key)
    sims = _simulator(model, k_stats, 4096)
    xs = np.asarray(sims["x"], dtype=np.float64)
    net = MixtureDensityNet(x_dim, theta_dim, cfg.model.guide_components, cfg.model.guide_hidden,
                            cfg.model.activation, xs.mean(0).astype(np.float32), (xs.std(0) + 1e-6).astype(np.float32))
    init_params(net, k_init)
    guide = mixture_guide(net)
    if cfg.objective.kind != "neural_is":
        raise ValueError(f"objective.kind: sbibm tasks train with neural_is, got {cfg.objective.kind!r}")
    obj = gm.amortized.NeuralIS(model, guide)
    B = cfg.data.batch_size
    data = SimulatedData(name, lambda k, n: mx.zeros((n, 1)), B, valid_size=cfg.data.valid_size or 200)
    log = cfg.log

    def validate(k, K):
        k1, k2 = mx.random.split(k)
        n = log.valid_examples
        fixed = mx.random.key(cfg.seed + 99991)  # the same held-out simulations every time
        lq = -float(obj.loss(fixed, mx.zeros((n, 1)))[0])
        x = _simulator(model, fixed, n)["x"]
        diag = proposal_quality(k2, obj, x, K)
        return {"valid_log_q": lq, "ess_per_n": diag["ess_per_n"], "khat": diag["khat"]}

    def evaluate(k, ecfg):
        out = {}
        refs = reference_observations(name, cfg.data.data_dir)
        keys = mx.random.split(k, 2 + len(refs))
        x_test = _simulator(model, mx.random.key(cfg.seed + 4242), max(ecfg.examples or 100, 2))["x"]
        diag = proposal_quality(keys[0], obj, x_test, min(1000, ecfg.particles))
        out.update({"sim_ess_per_n": diag["ess_per_n"], "sim_khat": diag["khat"]})
        errs, esss, lps = [], [], []
        for kk, (xo, ref) in zip(keys[2:], refs):
            res = gm.inference.importance_sampling(kk, model, (), gm.choicemap({"x": mx.array(xo)}), ecfg.particles,
                                                   proposal=guide, proposal_args=(mx.array(xo),))
            lw = np.asarray(res.log_weights, dtype=np.float64)
            w = np.exp(lw - lw.max())
            w /= w.sum()
            th = np.asarray(res.traces["theta"], dtype=np.float64)
            mean = (w[:, None] * th).sum(0)
            errs.append(float(np.max(np.abs(mean - ref.mean(0)) / ref.std(0))))
            esss.append(float(1.0 / np.sum(w * w) / len(w)))
            lps.append(float(res.log_marginal_likelihood))
        if refs:
            out.update({"ref_observations": len(refs), "ref_ess_per_n": float(np.mean(esss)),
                        "ref_log_px": float(np.mean(lps)),
                        "ref_max_mean_err_sd": float(np.max(errs)),
                        "ref_mean_err_sd": float(np.mean(errs))})
        return out

    return Task(obj, data, validate, evaluate, None, model=model, guide=guide,
                observe=gm.amortized.observe_x, guide_args=gm.amortized.guide_args_x)
