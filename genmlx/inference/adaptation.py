"""Warm-up adaptation as in Stan: dual-averaging step size and windowed mass matrix.

Dual averaging (Nesterov 2009; Hoffman & Gelman 2014), per chain, with target accept
rate δ, after iteration t with accept statistic a_t:
    H̄_t = (1 − 1/(t + t₀)) H̄_{t−1} + (δ − a_t)/(t + t₀),
    log ε_t = μ − √t/γ · H̄_t,   log ε̄_t = t^{−κ} log ε_t + (1 − t^{−κ}) log ε̄_{t−1},
μ = log(10 ε₀), γ = 0.05, t₀ = 10, κ = 0.75. Warm-up uses ε_t, sampling uses ε̄.

Mass matrix windows (Stan): an initial fast window (75 iterations; step size only),
slow windows of 25, 50, 100, … iterations (the last stretched to the terminal window),
a terminal fast window (50). At the end of each slow window the (co)variance of that
window's draws, regularised as n/(n+5)·Σ̂ + 10⁻³·5/(n+5)·I, becomes M⁻¹ and the step
size search and dual averaging restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from genmlx.inference.metric import Metric, dense_metric, kinetic, leapfrog, sample_momentum


@dataclass
class DualAveraging:
    """Per-chain dual-averaging state (arrays [C])."""

    log_eps: mx.array
    log_eps_bar: mx.array
    h_bar: mx.array
    mu: mx.array
    t: int = 0
    target: float = 0.8
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75

    @classmethod
    def start(cls, eps: mx.array, target: float = 0.8) -> "DualAveraging":
        le = mx.log(eps)
        return cls(le, mx.zeros_like(le), mx.zeros_like(le), mx.log(10.0) + le, 0, target)

    def update(self, accept_prob: mx.array) -> None:
        self.t += 1
        t = self.t
        consts = mx.array([1.0 / (t + self.t0), t**0.5 / self.gamma, t ** (-self.kappa), self.target])
        self.h_bar, self.log_eps, self.log_eps_bar = _da_update(
            consts, accept_prob, self.h_bar, self.mu, self.log_eps_bar)

    @property
    def step_size(self) -> mx.array:
        return mx.exp(self.log_eps)

    @property
    def final_step_size(self) -> mx.array:
        return mx.exp(self.log_eps_bar)


@mx.compile
def _da_update(consts, accept_prob, h_bar, mu, log_eps_bar):
    """One dual-averaging step (see the module docstring); ``consts`` = [1/(t + t₀),
    √t/γ, t^−κ, δ] (an input, so one compiled function serves every t)."""
    w, sg, eta, target = consts[0], consts[1], consts[2], consts[3]
    a = mx.where(mx.isnan(accept_prob), 0.0, accept_prob)
    h_bar = (1 - w) * h_bar + w * (target - a)
    log_eps = mu - sg * h_bar
    return h_bar, log_eps, eta * log_eps + (1 - eta) * log_eps_bar


def adaptation_windows(num_warmup: int, init_buffer: int = 75, term_buffer: int = 50,
                       base_window: int = 25) -> list[tuple[int, int]]:
    """Slow windows ``[(start, end), …]`` (end exclusive) of Stan's warm-up schedule.
    With fewer than 20 warm-up iterations the mass matrix is not adapted; when the
    defaults do not fit, the buffers become 15% / 10% of the warm-up."""
    if num_warmup < 20:
        return []
    if init_buffer + term_buffer + base_window > num_warmup:
        init_buffer = int(0.15 * num_warmup)
        term_buffer = int(0.1 * num_warmup)
        base_window = num_warmup - init_buffer - term_buffer
    out, start, size = [], init_buffer, base_window
    end_slow = num_warmup - term_buffer
    while start < end_slow:
        end = start + size
        if end + 2 * size > end_slow:
            end = end_slow
        out.append((start, end))
        start, size = end, 2 * size
    return out


def estimate_metric(draws: np.ndarray, kind: str) -> Metric:
    """Regularised per-chain metric from warm-up draws [C, n, D]."""
    x = np.asarray(draws, dtype=np.float64)
    c, n, d = x.shape
    shrink, reg = n / (n + 5.0), 1e-3 * 5.0 / (n + 5.0)
    if kind == "dense":
        xc = x - x.mean(axis=1, keepdims=True)
        cov = np.einsum("cni,cnj->cij", xc, xc) / max(n - 1, 1)
        cov = shrink * cov + reg * np.eye(d)
        return dense_metric(cov)
    var = shrink * x.var(axis=1, ddof=1) + reg
    return Metric("diag", mx.array(var, dtype=mx.float32), mx.array(1 / np.sqrt(var), dtype=mx.float32))


def find_reasonable_step_size(key, density, u, lp, g, metric: Metric, eps: mx.array,
                              max_iters: int = 60) -> mx.array:
    """Stan's step-size initialisation, per chain: starting from ε, double (or halve)
    until the one-step acceptance exp(H₀ − H) crosses 0.8; fresh momentum each try."""
    dense = metric.dense
    log08 = float(np.log(0.8))
    eps = np.array(eps, dtype=np.float64)
    direction = None
    done = np.zeros(eps.shape, bool)
    for _ in range(max_iters):
        key, k = mx.random.split(key)
        p = sample_momentum(k, metric.mfac, dense, u.shape)
        h0 = -lp + kinetic(p, metric.minv, dense)
        e = mx.array(eps, dtype=mx.float32)[:, None]
        _, p1, _, lp1 = leapfrog(density.value_and_grad, u, p, g, e, metric.minv, dense)
        dh = np.array(h0 - (-lp1 + kinetic(p1, metric.minv, dense)), dtype=np.float64)
        dh = np.where(np.isnan(dh), -np.inf, dh)
        up = dh > log08
        if direction is None:
            direction = np.where(up, 1.0, -1.0)
        crossed = np.where(direction > 0, ~up, up)
        done = done | crossed
        if done.all():
            break
        eps = np.where(done, eps, eps * 2.0**direction)
        eps = np.clip(eps, 1e-8, 1e4)
    return mx.array(eps, dtype=mx.float32)
