"""SMC throughput (particles × steps per second) on a linear-Gaussian state-space model.

    x_t ~ N(0.9 x_{t−1}, 1),  y_t ~ N(x_t, 0.5),  T = 100, n = 10⁴ particles.

Runs genmlx's ``smc`` over ``gm.Unfold`` (bootstrap proposal, systematic resampling
when ESS < n/2), a hand-written MLX bootstrap filter on the state array alone (a lower
bound on the cost: no traces), and reports log Ẑ against the exact Kalman value.

    .venv/bin/python benchmarks/bench_smc.py [--n 10000] [--T 100] [--repeats 3] [--append-results]
"""

from __future__ import annotations

import argparse
import math

import genmlx as gm
import mlx.core as mx
import numpy as np

try:
    from benchmarks._timing import append_results, fmt_seconds, markdown_table, timeit_interleaved
except ImportError:  # run as a script from benchmarks/
    from _timing import append_results, fmt_seconds, markdown_table, timeit_interleaved

from genmlx.harness.zoo.ssm import kalman_filter
from genmlx.inference import smc
from genmlx.inference import resampling as R

A, Q, RR = 0.9, 1.0, 0.5


@gm.gen
def step(t, x, a, q, r):
    x = gm.trace("x", gm.normal(a * x, q))
    gm.trace("y", gm.normal(x, r))
    return x


def kalman_loglik(ys):
    """Exact log p(y_{0:T−1}) of the SSM by the Kalman filter."""
    return kalman_filter(ys, A, Q, RR, 0.0)[0]


@mx.compile
def _hand_step(key, x, lw, y):
    n = x.shape[0]
    k1, k2 = mx.random.split(key)
    x = A * x + Q * mx.random.normal(x.shape, key=k1)
    lw = lw - 0.5 * ((y - x) / RR) ** 2 - math.log(RR) - 0.5 * math.log(2 * math.pi)
    do = R.effective_sample_size(lw) < 0.5 * n
    idx = mx.where(do, R.systematic(k2, lw, n), mx.arange(n, dtype=mx.int32))
    lw = mx.where(do, mx.broadcast_to(R.log_mean_exp(lw), lw.shape), lw)
    return mx.take(x, idx), lw


def bootstrap_mlx(key, ys, n):
    """Hand-written bootstrap filter on the state array (systematic, ESS < n/2), one
    compiled step per time point: the cost floor without traces."""
    x, lw = mx.zeros((n,)), mx.zeros((n,))
    for t, k in enumerate(mx.random.split(key, len(ys))):
        x, lw = _hand_step(k, x, lw, mx.array(ys[t]))
        mx.eval(x, lw)
    return R.log_mean_exp(lw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    n, T = a.n, a.T
    rng = np.random.default_rng(0)
    xs = np.zeros(T)
    for t in range(T):
        xs[t] = A * (xs[t - 1] if t else 0.0) + Q * rng.normal()
    ys = (xs + RR * rng.normal(size=T)).astype(np.float32)
    obs = gm.choicemap({(t, "y"): float(ys[t]) for t in range(T)})
    model = gm.Unfold(step)
    args = (T, mx.array(0.0), A, Q, RR)
    exact = kalman_loglik(ys)
    gm.set_validation(False)
    keys = iter(mx.random.split(mx.random.key(0), 1000))
    last = {}

    def run(label, **kw):
        def f():
            res = smc(next(keys), model, args, obs, n, progress=False, **kw)
            last[label] = res
            return res.log_weights
        return f

    def hand():
        last["hand"] = bootstrap_mlx(next(keys), ys, n)
        return last["hand"]

    fns = {"genmlx smc over gm.Unfold": run("smc"),
           "genmlx smc, compile=True (steps cached from warm-up)": run("smcc", compile=True),
           "hand-written MLX bootstrap filter (states only)": hand}
    tm = timeit_interleaved(fns, warmup=1, repeats=a.repeats)
    rows = []
    for (label, t), key in zip(tm.items(), ["smc", "smcc", "hand"]):
        lz = last[key] if key == "hand" else last[key].log_marginal_likelihood
        rows.append([label, fmt_seconds(t.median), f"{n * T / t.median:.3g}", f"{float(lz):.2f}"])
    body = (f"Linear-Gaussian SSM, T = {T}, n = {n}, bootstrap proposal, systematic resampling at "
            f"ESS < n/2; exact (Kalman) log Z = {exact:.2f}; median of {a.repeats} runs.\n\n"
            + markdown_table(["method", "time / run", "particle-steps / s", "log Ẑ (last run)"], rows))
    print(body)
    if a.append_results:
        append_results("Issue 4: SMC throughput (bench_smc.py)", body, a.note)


if __name__ == "__main__":
    main()
