"""SMC throughput (particles × steps per second) on a linear-Gaussian state-space model.

    x_t ~ N(0.9 x_{t−1}, 1),  y_t ~ N(x_t, 0.5),  T = 100, n = 10⁴ particles.

Runs genmlx's ``smc`` over ``gm.Unfold`` (bootstrap proposal, systematic resampling
when ESS < n/2; compiled step, the default, and ``compile=False``), a hand-written MLX
bootstrap filter on the state array alone (a lower bound on the cost: no traces), the
same filter keeping its paths (per-step states and ancestor indices, paths rebuilt once
at the end: what genmlx returns, O(n·T)), and reports log Ẑ against the exact Kalman
value. Every run evaluates everything it returns (genmlx: the full particle traces).
``--graph`` prints the primitives per time step of the compiled steps (genmlx vs
hand-written; see ``benchmarks/graph_ops.py``) and those of genmlx's end of run.

    .venv/bin/python benchmarks/bench_smc.py [--n 10000] [--T 100] [--repeats 3] [--graph] [--append-results]
"""

from __future__ import annotations

import argparse
import math
import time

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


def _systematic_mlx(key, lw, n):
    """Systematic resampling in plain MLX ops, as written by hand: the float32 CDF by
    ``mx.cumsum``, N_i = #{j : (j + U)/n ≤ C_i} = ⌊n·C_i − U⌋ + 1 (clipped to [0, n]),
    ancestors idx_j = #{i : N_i ≤ j} by a scatter-add of the N_i and a cumulative sum."""
    c = mx.cumsum(mx.softmax(lw))
    U = mx.random.uniform(key=key)
    N = mx.clip(mx.floor(n * c - U) + 1, 0, n).astype(mx.int32)
    marks = mx.zeros((n + 1,), mx.int32).at[N].add(mx.ones((n,), mx.int32))
    return mx.minimum(mx.cumsum(marks[:n]), n - 1)


def _hand_advance(key, x, lw, y):
    """One bootstrap step on the state array, plain MLX ops (no genmlx): (states before
    resampling, ancestor indices (identity when ESS ≥ n/2), new log-weights)."""
    n = x.shape[0]
    k1, k2 = mx.random.split(key)
    x = A * x + Q * mx.random.normal(x.shape, key=k1)
    lw = lw - 0.5 * ((y - x) / RR) ** 2 - math.log(RR) - 0.5 * math.log(2 * math.pi)
    lse = mx.logsumexp(lw)
    do = mx.exp(2 * lse - mx.logsumexp(2 * lw)) < 0.5 * n
    idx = mx.where(do, _systematic_mlx(k2, lw, n), mx.arange(n, dtype=mx.int32))
    lw = mx.where(do, mx.broadcast_to(lse - math.log(n), lw.shape), lw)
    return x, idx, lw


@mx.compile
def _hand_step(key, x, lw, y):
    x, idx, lw = _hand_advance(key, x, lw, y)
    return mx.take(x, idx), lw


def bootstrap_mlx(key, ys, n):
    """Hand-written bootstrap filter on the state array (systematic, ESS < n/2), one
    compiled step per time point: the cost floor without traces."""
    x, lw = mx.zeros((n,)), mx.zeros((n,))
    for t, k in enumerate(mx.random.split(key, len(ys))):
        x, lw = _hand_step(k, x, lw, mx.array(ys[t]))
        mx.async_eval(x, lw)  # scheduled: the host queues the next step meanwhile
    return R.log_mean_exp(lw)


@mx.compile
def _hand_path_step(key, x, lw, y):
    """As :func:`_hand_step`, also returning the step's states before resampling and
    the ancestor indices (identity when not resampling)."""
    x, idx, lw = _hand_advance(key, x, lw, y)
    return x, idx, mx.take(x, idx), lw


def bootstrap_mlx_paths(key, ys, n):
    """The hand-written filter keeping its paths: per-step states x_t (pre-resampling)
    and ancestors idx_t; at the end D_{T−1} = idx_{T−1}, D_t = idx_t[D_{t+1}] and the
    paths x_t[D_t] [T, n], gathered at once. Returns (log Ẑ, paths)."""
    x, lw = mx.zeros((n,)), mx.zeros((n,))
    xs, idxs = [], []
    for t, k in enumerate(mx.random.split(key, len(ys))):
        pre, idx, x, lw = _hand_path_step(k, x, lw, mx.array(ys[t]))
        mx.async_eval(pre, idx, x, lw)
        xs.append(pre)
        idxs.append(idx)
    D, Ds = idxs[-1], [None] * len(ys)
    for t in reversed(range(len(ys))):
        D = idxs[t] if t == len(ys) - 1 else mx.take(idxs[t], D)
        Ds[t] = D
    paths = mx.take_along_axis(mx.stack(xs), mx.stack(Ds), axis=1)
    return R.log_mean_exp(lw), paths


def step_graphs(n: int = 1000):
    """Primitives per time step of the compiled steps (the lazy graph of one call after
    warm-up): genmlx's :func:`genmlx.inference.smc._seq_step` vs the hand-written steps."""
    import importlib

    from benchmarks.graph_ops import count_graph
    from genmlx.combinators._sequence import STEP_INDEX
    from genmlx.core.pytree import tree_flatten
    from genmlx.inference._util import cached_call

    S = importlib.import_module("genmlx.inference.smc")
    model = gm.Unfold(step)
    args = (3, mx.array(0.0), A, Q, RR)
    x, lw, y = mx.zeros((n,)), mx.zeros((n,)), mx.array(0.3)
    ks = mx.random.split(mx.random.key(0), 4)
    k_ext, k_res, k_a, k_b = (mx.contiguous(k) for k in ks)  # evaluated inputs, no indexing in the graph
    mx.eval(x, lw, y, k_ext, k_res, k_a, k_b)
    payload = (model, n, True, (None,), "systematic", 0.5)

    def gen(k):
        return tree_flatten(cached_call(S._seq_step, payload, payload, k, k_res, x, lw,
                                        model._kernel_inputs(args, 1, STEP_INDEX), gm.choicemap({"y": 0.3})))[0]

    rows = []
    for label, f in (("genmlx smc step (compiled)", gen),
                     ("hand-written step (states only)", lambda k: _hand_step(k, x, lw, y)),
                     ("hand-written step (keeping paths)", lambda k: _hand_path_step(k, x, lw, y))):
        mx.eval(f(k_a))
        g = count_graph(f(k_b))
        rows.append([label, *g.row()])
    return rows


def end_graph(model, args, obs, n: int) -> list:
    """The graph smc's end of run leaves for its final evaluation (descent, gathers of
    the kept arrays, the replay, the score), captured at ``_rebuild_columns``' return:
    [launches, launches with every concatenation input counted as the copy kernel a
    GPU runs for it, views, by kind]. A second run (compiled step warm)."""
    import importlib
    import re

    from benchmarks import graph_ops as G

    S = importlib.import_module("genmlx.inference.smc")
    orig, seen = S._rebuild_columns, {}

    def counted(*a, **k):
        out = orig(*a, **k)
        if out is not None:
            outs = [out[1], out[2]]
            g = G.count_graph(outs)
            text = G._dot([x for x in outs[1] + [outs[0]] if isinstance(x, mx.array)])
            labels = dict(G._NODE.findall(text))
            ins: dict = {}
            for x, y in re.findall(r'^"?([^"\s]+)"? -> "?([^"\s]+)"?$', text, flags=re.M):
                if y in labels:
                    ins[y] = ins.get(y, 0) + 1
            copies = sum(ins.get(k_, 1) - 1 for k_, v in labels.items() if v.startswith("Concatenate"))
            seen["row"] = [g.launches, g.launches + copies, g.view,
                           ", ".join(f"{k_} {v}" for k_, v in sorted(g.by_name.items()))]
        return out

    S._rebuild_columns = counted
    try:
        for r in range(2):
            smc(mx.random.key(7 + r), model, args, obs, n, progress=False)
    finally:
        S._rebuild_columns = orig
    return seen["row"]


def phases(model, args, obs, n: int, repeats: int = 5) -> dict:
    """Where a genmlx run's wall time goes (median ms): the per-step loop up to the host's
    read of the resampling flags, the rest of ``smc`` (ancestry, the trace rebuild and
    the replay of the step scores, built lazily) and the final evaluation of the traces."""
    import importlib

    from genmlx.core.pytree import tree_flatten

    S = importlib.import_module("genmlx.inference.smc")
    marks, orig = {}, S._descent

    def descent(*a):
        marks["loop_end"] = time.perf_counter()
        return orig(*a)

    S._descent = descent
    try:
        rows = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            res = smc(mx.random.key(100 + r), model, args, obs, n, progress=False)
            t1 = time.perf_counter()
            mx.eval(res.log_weights, tree_flatten(res.traces)[0])
            t2 = time.perf_counter()
            if r:  # the first run compiles
                rows.append((marks["loop_end"] - t0, t1 - marks["loop_end"], t2 - t1))
    finally:
        S._descent = orig
    med = np.median(np.array(rows), axis=0) * 1e3
    return {"loop_ms": float(med[0]), "rebuild_ms": float(med[1]), "final_eval_ms": float(med[2])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="")
    ap.add_argument("--graph", action="store_true", help="print the primitives per time step")
    ap.add_argument("--phases", action="store_true",
                    help="also print where a genmlx run's time goes (loop / rebuild / final evaluation)")
    a = ap.parse_args()
    if a.graph:
        print(markdown_table(["step", "launches", "fused", "lone elementwise", "non-fusable", "views",
                              "non-fusable by kind"], step_graphs()))
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

    from genmlx.core.pytree import tree_flatten

    def run(label, **kw):
        def f():
            res = smc(next(keys), model, args, obs, n, progress=False, **kw)
            last[label] = res.log_marginal_likelihood
            return [res.log_weights, tree_flatten(res.traces)[0]]  # evaluated: the full traces
        return f

    def hand():
        last["hand"] = bootstrap_mlx(next(keys), ys, n)
        return last["hand"]

    def hand_paths():
        last["paths"], paths = bootstrap_mlx_paths(next(keys), ys, n)
        return [last["paths"], paths]

    fns = {"genmlx smc over gm.Unfold (compiled step, default)": run("smc"),
           "genmlx smc, compile=False (uncompiled step)": run("smce", compile=False),
           "hand-written MLX bootstrap filter (states only)": hand,
           "hand-written MLX filter keeping paths (states + ancestors, paths at the end)": hand_paths}
    tm = timeit_interleaved(fns, warmup=1, repeats=a.repeats)
    rows = []
    for (label, t), key in zip(tm.items(), ["smc", "smce", "hand", "paths"]):
        rows.append([label, fmt_seconds(t.median), f"{n * T / t.median:.3g}", f"{float(last[key]):.2f}"])
    body = (f"Linear-Gaussian SSM, T = {T}, n = {n}, bootstrap proposal, systematic resampling at "
            f"ESS < n/2; exact (Kalman) log Z = {exact:.2f}; median of {a.repeats} runs.\n\n"
            + markdown_table(["method", "time / run", "particle-steps / s", "log Ẑ (last run)"], rows))
    if a.graph:
        body += "\n\n" + markdown_table(
            ["genmlx end of run (graph left for smc's final evaluation)", "launches",
             "launches, concatenation inputs as copies (GPU)", "views", "by kind"],
            [[f"T = {T}, n = {n}", *end_graph(model, args, obs, n)]])
    if a.phases:
        ph = phases(model, args, obs, n)
        body += ("\n\ngenmlx run by phase (median ms): per-step loop to the flags read "
                 f"{ph['loop_ms']:.2f}, ancestry + rebuild {ph['rebuild_ms']:.2f}, final evaluation "
                 f"{ph['final_eval_ms']:.2f}.")
    print(body)
    if a.append_results:
        append_results("Issue 4: SMC throughput (bench_smc.py)", body, a.note)


if __name__ == "__main__":
    main()
