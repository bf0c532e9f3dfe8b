"""Bayesian linear regression: importance sampling and batched MH against the exact posterior.

Model (known noise σ, independent normal priors — conjugate):

    slope ~ N(0, 2²),  intercept ~ N(0, 2²),  y_i ~ N(slope·x_i + intercept, σ²).

With design X = [x, 1] and prior covariance Σ₀ = 4 I the posterior is Gaussian,

    Σ = (Σ₀⁻¹ + XᵀX / σ²)⁻¹,   μ = Σ Xᵀy / σ²,

which this script prints next to two genmlx estimates:

* importance sampling with the prior as proposal — one ``model.vgenerate`` call for all
  particles; log-weights w_i = log p(y | θ_i); self-normalized estimates
  E[f] ≈ Σ_i softmax(w)_i f(θ_i);
* N independent MH chains run as ONE batched computation: each step regenerates the
  slope, then the intercept, from the prior (``model.regenerate``; weight = log MH
  ratio) and makes a joint Gaussian random-walk move (``model.update``; symmetric
  proposal, weight = log MH ratio). Accept/reject is an ``mx.where`` over the trace's
  flattened arrays, and the whole step is compiled with the key as input.

Run: ``make run`` (or ``.venv/bin/python training/regression_demo.py``).
"""

from __future__ import annotations

import time
from dataclasses import replace

import genmlx as gm  # before mlx.core: loads the fast BLAS on Linux
import mlx.core as mx
import numpy as np
from genmlx.core.pytree import tree_flatten, tree_unflatten

SIGMA = 0.5
PRIOR_SD = 2.0


@gm.gen
def model(xs):
    slope = gm.trace("slope", gm.normal(0.0, PRIOR_SD))
    intercept = gm.trace("intercept", gm.normal(0.0, PRIOR_SD))
    return gm.trace("ys", gm.normal(slope * xs + intercept, SIGMA))


def exact_posterior(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and sd of (slope, intercept) in closed form (float64)."""
    X = np.stack([xs, np.ones_like(xs)], axis=1).astype(np.float64)
    cov = np.linalg.inv(np.eye(2) / PRIOR_SD**2 + X.T @ X / SIGMA**2)
    mean = cov @ X.T @ ys.astype(np.float64) / SIGMA**2
    return mean, np.sqrt(np.diag(cov))


def importance_sampling(key, xs, obs, n: int):
    """Self-normalized IS with the prior as proposal: (means, sds, ESS)."""
    tr, logw = model.vgenerate(key, (xs,), obs, n)
    w = mx.softmax(logw)
    ess = 1.0 / mx.sum(w * w)
    out = []
    for addr in ("slope", "intercept"):
        v = tr[addr]
        m = mx.sum(w * v)
        out.append((m, mx.sqrt(mx.sum(w * (v - m) ** 2))))
    mx.eval(out, ess)
    return [(m.item(), s.item()) for m, s in out], ess.item()


def _where_trace(accept: mx.array, new, old):
    """Per chain: the new trace where ``accept``, else the old one (batched traces)."""
    new_leaves, td = tree_flatten(replace(new, args=None, batch_size=None))
    old_leaves, _ = tree_flatten(replace(old, args=None, batch_size=None))
    mixed = [
        mx.where(accept.reshape(accept.shape + (1,) * (a.ndim - 1)), a, b)
        for a, b in zip(new_leaves, old_leaves)
    ]
    return replace(tree_unflatten(td, mixed), args=old.args, batch_size=old.batch_size)


def _mh_accept(key, new, old, log_ratio):
    u = mx.random.uniform(shape=log_ratio.shape, key=key)
    accept = mx.log(u) < log_ratio
    return _where_trace(accept, new, old), accept


def mh_step(key, tr, step_size: float = 0.1):
    """One sweep of three MH kernels on every chain; returns (trace, acceptance rates)."""
    keys = mx.random.split(key, 6)
    rates = []
    for i, addr in enumerate(("slope", "intercept")):
        prop, w, _ = model.regenerate(keys[2 * i], tr, gm.select(addr))
        tr, acc = _mh_accept(keys[2 * i + 1], prop, tr, w)
        rates.append(mx.mean(acc.astype(mx.float32)))
    # Joint random walk: symmetric Gaussian proposal, so the update weight is the MH ratio.
    k_slope, k_int = mx.random.split(keys[4], 2)
    n = tr.batch_size
    moved = gm.choicemap({
        "slope": tr["slope"] + step_size * mx.random.normal((n,), key=k_slope),
        "intercept": tr["intercept"] + step_size * mx.random.normal((n,), key=k_int),
    })
    prop, w, _, _ = model.update(keys[5], tr, moved)
    tr, acc = _mh_accept(mx.random.split(keys[5], 2)[1], prop, tr, w)
    rates.append(mx.mean(acc.astype(mx.float32)))
    return tr, mx.stack(rates)


def run_mh(key, xs, obs, n_chains: int, n_steps: int, burn_in: int):
    """n_chains batched MH chains from prior-IS initial states; posterior means/sds."""
    k_init, key = mx.random.split(key, 2)
    tr, _ = model.vgenerate(k_init, (xs,), obs, n_chains)
    leaves0, td = tree_flatten(replace(tr, args=None, batch_size=None))

    def rebuild(leaves):
        return replace(tree_unflatten(td, list(leaves)), args=tr.args, batch_size=n_chains)

    @mx.compile
    def compiled_step(k, *leaves):
        new, rates = mh_step(k, rebuild(leaves))
        return [rates] + tree_flatten(replace(new, args=None, batch_size=None))[0]

    leaves, rates_sum, draws = leaves0, mx.zeros(3), {"slope": [], "intercept": []}
    for t, k in enumerate(mx.random.split(key, n_steps)):
        rates, *leaves = compiled_step(k, *leaves)
        rates_sum = rates_sum + rates
        if t >= burn_in:
            cur = rebuild(leaves)
            for addr in draws:
                draws[addr].append(cur[addr])
        mx.eval(leaves, rates_sum)
    stats = []
    for addr in ("slope", "intercept"):
        d = mx.stack(draws[addr])  # [kept steps, chains]
        # Monte Carlo standard error from the independent chains' time averages
        se = mx.sqrt(mx.var(mx.mean(d, axis=0), ddof=1) / n_chains)
        stats.append((mx.mean(d).item(), mx.sqrt(mx.var(d)).item(), se.item()))
    return stats, (rates_sum / n_steps).tolist()


def main(seed: int = 0, n_data: int = 20, n_particles: int = 100_000,
         n_chains: int = 1_000, n_steps: int = 300, burn_in: int = 100) -> dict:
    """Run both estimators, print the comparison table, and return the numbers:
    ``{"exact": (mean[2], sd[2]), "is": ([(mean, sd)] * 2, ess), "mh": [(mean, sd, se)] * 2}``."""
    print(gm.describe_blas())
    k_data, k_is, k_mh = mx.random.split(mx.random.key(seed), 3)
    xs = mx.linspace(-2.0, 2.0, n_data)
    true_slope, true_intercept = 1.3, -0.7
    ys = true_slope * xs + true_intercept + SIGMA * mx.random.normal((n_data,), key=k_data)
    obs = gm.choicemap({"ys": ys})
    mean, sd = exact_posterior(np.array(xs), np.array(ys))
    print(f"data: {n_data} points, true slope {true_slope}, intercept {true_intercept}, "
          f"noise sd {SIGMA}")

    t0 = time.perf_counter()
    is_stats, ess = importance_sampling(k_is, xs, obs, n_particles)
    t_is = time.perf_counter() - t0
    t0 = time.perf_counter()
    mh_stats, rates = run_mh(k_mh, xs, obs, n_chains, n_steps, burn_in)
    t_mh = time.perf_counter() - t0

    print(f"\nimportance sampling: {n_particles} particles, ESS {ess:.0f}, {t_is:.2f} s")
    print(f"MH: {n_chains} chains x {n_steps} sweeps ({burn_in} burn-in), {t_mh:.2f} s; "
          f"acceptance regen(slope) {rates[0]:.2f}, regen(intercept) {rates[1]:.2f}, "
          f"random walk {rates[2]:.2f}")
    print(f"\n{'':10s} {'exact mean':>11s} {'exact sd':>9s} {'IS mean':>9s} {'IS sd':>7s} "
          f"{'MH mean':>9s} {'MH sd':>7s}")
    for i, addr in enumerate(("slope", "intercept")):
        print(f"{addr:10s} {mean[i]:11.4f} {sd[i]:9.4f} {is_stats[i][0]:9.4f} {is_stats[i][1]:7.4f} "
              f"{mh_stats[i][0]:9.4f} {mh_stats[i][1]:7.4f}")
    return {"exact": (mean, sd), "is": (is_stats, ess), "mh": mh_stats}


if __name__ == "__main__":
    main()
