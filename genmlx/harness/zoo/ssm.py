"""A sequential model for the harness: a linear-Gaussian state-space model written with
``gm.Unfold``, and a neural per-step proposal trained by NeuralIS for particle filtering.

Model (scalar state, x₋₁ = 0; parameters ``A, Q, R`` below):

    x_t | x_{t−1} ~ N(A x_{t−1}, Q²),   y_t | x_t ~ N(x_t, R²),   t = 0 … T−1,

addresses ``(t, "x")`` (latent) and ``(t, "y")`` (observed); called as
``ssm_model(T, x₋₁)``. Its evidence p(y_{0:T−1}) and filtering distributions are exact
by the Kalman filter (:func:`kalman_filter`).

Guide: q_φ(x_t | x_{t−1}, y_t) = N(m_φ(d), s_φ(d)²), d = (x_{t−1}, y_t), an MLP with a
linear skip connection (the locally optimal proposal p(x_t | x_{t−1}, y_t) of this model
is Gaussian with a mean affine in d and a constant scale, so the skip path learns it
fast and the MLP is free to model departures). It is trained by NeuralIS on one-step
simulations (x_{t−1}, x_t, y_t) with x_{t−1} drawn from the chain's stationary law
N(0, Q² / (1 − A²)) (inclusive KL amortized over the data), then used

- in SMC (``genmlx infer --method smc``) as the per-step proposal
  ``proposal(t, τ_{t−1}, obs_t)``, with incremental weights
  α_t = log p(x_t, y_t | x_{t−1}) − log q_φ(x_t | x_{t−1}, y_t);
- in IS (``--method is``) as the sequence proposal q(x_{0:T−1} | y) = Π_t q_φ(x_t | x_{t−1}, y_t).

The data of a run are simulated; ``fixed_eval`` gives simulated observation sequences
y_{0:T_EVAL−1} (rows), the format ``genmlx infer --obs`` reads (one sequence per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import mlx.core as mx
import mlx.nn as nn

import genmlx as gm
from genmlx.harness.data import SimulatedData
from genmlx.harness.zoo import Task
from genmlx.harness.zoo.common import init_params, proposal_quality

A, Q, R = 0.9, 1.0, 0.3
X_INIT = 0.0
STATIONARY_SD = Q / math.sqrt(1.0 - A * A)
T_EVAL = 25  # length of the simulated evaluation / example sequences


# -- model --------------------------------------------------------------------------------
@gm.gen
def ssm_step(t, x_prev):
    x = gm.normal(A * x_prev, Q) @ "x"
    gm.normal(x, R) @ "y"
    return x


ssm_model = gm.Unfold(ssm_step)


def model_args(T: int) -> tuple:
    """Arguments of :data:`ssm_model` for T steps."""
    return (int(T), mx.array(X_INIT))


def observe_sequence(ys) -> gm.ChoiceMap:
    """The observation choice map {(t, "y"): y_t} of one sequence ``ys`` [T]."""
    return gm.choicemap({(t, "y"): ys[t] for t in range(int(ys.shape[0]))})


def simulate_observations(key: mx.array, n: int, T: int) -> np.ndarray:
    """n sequences y_{0:T−1} simulated from the model: array [n, T] (float32)."""
    tr = ssm_model.vsimulate(key, model_args(T), n)
    return np.stack([np.asarray(tr[(t, "y")]) for t in range(T)], axis=1).astype(np.float32)


def kalman_filter(ys, a: float = A, q: float = Q, r: float = R, x_init: float = X_INIT):
    """(log p(y_{0:T−1}), filtering means [T], filtering variances [T]) of the model."""
    m, P, ll = float(x_init), 0.0, 0.0
    means, variances = [], []
    for y in np.asarray(ys, dtype=np.float64):
        mp, Pp = a * m, a * a * P + q * q
        S = Pp + r * r
        ll += -0.5 * math.log(2 * math.pi * S) - 0.5 * (y - mp) ** 2 / S
        K = Pp / S
        m, P = mp + K * (y - mp), (1 - K) * Pp
        means.append(m)
        variances.append(P)
    return ll, np.array(means), np.array(variances)


# -- one step, for NeuralIS ---------------------------------------------------------------
@gm.gen
def one_step():
    """(x_{t−1}, x_t, y_t) with x_{t−1} from the stationary law: the guide's training data."""
    xp = gm.normal(0.0, STATIONARY_SD) @ "xp"
    x = gm.normal(A * xp, Q) @ "x"
    return gm.normal(x, R) @ "y"


def step_observe(d) -> gm.ChoiceMap:
    return gm.choicemap({"xp": d[0], "y": d[1]})


def step_data(ch) -> mx.array:
    return mx.stack([ch["xp"], ch["y"]])


class StepProposalNet(nn.Module):
    """d = (x_{t−1}, y_t) ↦ (mean, scale) of q(x_t | d): linear skip + MLP on the
    standardized inputs; scale = softplus(·) + 1e-3."""

    def __init__(self, hidden, activation: str):
        super().__init__()
        self.skip = gm.nn.Linear(2, 2)
        self.body = gm.nn.mlp([2, *hidden, 2], activation)
        y_sd = math.sqrt(STATIONARY_SD ** 2 + R * R)
        self.in_scale = mx.array([STATIONARY_SD, y_sd], dtype=mx.float32)
        self.freeze(keys=["in_scale"], recurse=False)

    def __call__(self, d):
        u = d / self.in_scale
        h = self.skip(u) + self.body(u)
        return h[..., 0] * STATIONARY_SD, nn.softplus(h[..., 1]) + 1e-3


@dataclass(frozen=True)
class SSMGuides:
    """The trained network in its three uses (they share one NeuralNetGF)."""

    net: gm.nn.NeuralNetGF
    step: gm.GenerativeFunction        # step(d) proposes "x": NeuralIS training
    smc_step: gm.GenerativeFunction    # smc_step(t, prev, obs_t) proposes (t, "x")
    sequence: gm.GenerativeFunction    # sequence(ys) proposes (t, "x") for all t (IS)


def make_guides(net_module: StepProposalNet) -> SSMGuides:
    net = gm.nn.NeuralNetGF(net_module, name="step_proposal")

    @gm.gen
    def step_guide(d):
        m, s = net(d) @ "net"
        return gm.normal(m, s) @ "x"

    @gm.gen
    def smc_step_guide(t, prev, obs):
        xp = mx.array(X_INIT) if prev is None else prev[(t - 1, "x")]
        m, s = net(mx.stack([xp, obs[(t, "y")]])) @ "net"
        return gm.normal(m, s) @ (t, "x")

    @gm.gen
    def sequence_guide(ys):
        xp = mx.array(X_INIT)
        for t in range(int(ys.shape[0])):
            m, s = net(mx.stack([xp, ys[t]])) @ ("net", t)
            xp = gm.normal(m, s) @ (t, "x")
        return xp

    return SSMGuides(net, step_guide, smc_step_guide, sequence_guide)


# -- the harness task -----------------------------------------------------------------------
class SequenceData(SimulatedData):
    """Simulated training batches (NeuralIS draws its own one-step simulations: only the
    batch size is used) and simulated observation sequences [n, T_EVAL] for ``--example``."""

    def fixed_eval(self, split: str, n: int = 0, seed: int = 1234) -> np.ndarray:
        salt = {"train": 0, "valid": 1, "test": 2}[split]
        return simulate_observations(mx.random.key(seed + salt), n or self.valid_size, T_EVAL)


def smc_inputs(guides: SSMGuides, ys, proposal: str = "guide") -> dict:
    """Keyword arguments of ``gm.inference.smc`` for one observed sequence ``ys`` [T]:
    the guide's per-step proposal, or the model's prior (bootstrap filter)."""
    ys = mx.array(ys)
    return {"model": ssm_model, "args": model_args(ys.shape[0]), "observations": observe_sequence(ys),
            "proposal": guides.smc_step if proposal == "guide" else None}


def build(cfg) -> Task:
    if cfg.objective.kind != "neural_is":
        raise ValueError(f"objective.kind: the ssm trains its proposal with neural_is, got {cfg.objective.kind!r}")
    k_init = mx.random.key(cfg.seed)
    net_module = init_params(StepProposalNet(cfg.model.guide_hidden, cfg.model.activation), k_init)
    guides = make_guides(net_module)
    obj = gm.amortized.NeuralIS(one_step, guides.step, observe=step_observe, data_from=step_data)
    data = SequenceData("ssm", lambda k, n: mx.zeros((n, 1)), cfg.data.batch_size,
                        valid_size=cfg.data.valid_size or 200)
    log = cfg.log

    def one_step_pairs(key, n):
        tr = one_step.vsimulate(key, (), n)
        return mx.stack([tr["xp"], tr["y"]], axis=-1)

    def validate(k, K):
        fixed = mx.random.key(cfg.seed + 99991)  # the same held-out simulations every time
        lq = -float(obj.loss(fixed, mx.zeros((log.valid_examples, 1)))[0])
        diag = proposal_quality(k, obj, one_step_pairs(fixed, log.valid_examples), K)
        return {"valid_log_q": lq, "ess_per_n": diag["ess_per_n"], "khat": diag["khat"]}

    def evaluate(k, ecfg):
        """One-step proposal quality, and SMC over simulated sequences with the guide and
        with the bootstrap proposal: error of log Ẑ against the Kalman filter's log Z."""
        n_seq = max(ecfg.examples or 10, 2)
        ys = simulate_observations(mx.random.key(cfg.seed + 4242), n_seq, T_EVAL)
        k_diag, k_smc = mx.random.split(k)
        diag = proposal_quality(k_diag, obj, one_step_pairs(mx.random.key(cfg.seed + 4243), 100),
                                min(1000, ecfg.particles))
        out = {"step_ess_per_n": diag["ess_per_n"], "step_khat": diag["khat"],
               "smc_sequences": n_seq, "smc_steps": T_EVAL, "smc_particles": ecfg.particles}
        for name in ("guide", "bootstrap"):
            errs = []
            for kk, row in zip(mx.random.split(k_smc, n_seq), ys):
                res = gm.inference.smc(kk, **smc_inputs(guides, row, "guide" if name == "guide" else "prior"),
                                       n=ecfg.particles, progress=False)
                errs.append(float(res.log_marginal_likelihood) - kalman_filter(row)[0])
            errs = np.array(errs)
            out[f"smc_{name}_logz_err_mean"] = float(errs.mean())
            out[f"smc_{name}_logz_err_sd"] = float(errs.std(ddof=1))
        return out

    return Task(obj, data, validate, evaluate, None, model=ssm_model, guide=guides.sequence,
                observe=observe_sequence, guide_args=lambda ys: (mx.array(ys),),
                model_args=lambda ys: model_args(ys.shape[0]),
                smc=lambda ys, proposal="guide": smc_inputs(guides, ys, proposal),
                extras={"exact_log_px": lambda ys: kalman_filter(ys)[0]})
