"""Where a whole NUTS run's time goes (CPU): compiled calls by kind, host syncs, and the
split of the wall time into evaluation (inside syncs), compiled-call graph
construction and the rest of the host's Python, plus the lockstep leaves.

The second (compiled) run of ``gm.inference.nuts`` is timed plain, then again with
every compiled NUTS call, every host sync (``bool``/``int`` of an array in
``genmlx.inference.nuts``, ``mx.eval`` anywhere) and the adaptation's host pieces
wrapped in timers (the instrumented run is a little slower). Graph sizes: each call
kind's primitives, counted once on evaluated inputs (``graph_ops.count_graph``).
Lockstep (sampling phase): leaves integrated per transition (whole doublings of the
deepest chain, at least the prefix's 2^(F+1) − 1) against the deepest chain's own
step count (what a leaf-by-leaf vectorized sampler would integrate).

    GENMLX_DATA=.data python benchmarks/probe_nuts_run.py [posterior]
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "experiments" / "posteriordb"))
sys.path.insert(0, str(HERE))

import genmlx  # noqa: E402,F401  (before mlx.core: fast BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_nuts import timed_nuts  # noqa: E402
from graph_ops import count_graph  # noqa: E402
from models import load  # noqa: E402

import genmlx.inference.mcmc  # noqa: E402,F401
import genmlx.inference.nuts  # noqa: E402,F401

nuts_mod = sys.modules["genmlx.inference.nuts"]
mcmc_mod = sys.modules["genmlx.inference.mcmc"]


def main(name: str = "eight_schools-eight_schools_noncentered", warmup: int = 1000, samples: int = 1000):
    root = Path(os.environ.get("GENMLX_DATA", HERE.parents[1] / "shared" / "data"))
    post, args, obs, _ = load(root, name)

    def go(seed):
        return timed_nuts(post, args, obs, seed, warmup, samples)

    go(0)
    plain, _ = go(1)
    T, N, nodes, F_used = defaultdict(float), defaultdict(int), {}, []

    def timed(label, f):
        def w(*a, **k):
            t = time.perf_counter()
            v = f(*a, **k)
            T[label] += time.perf_counter() - t
            N[label] += 1
            return v
        return w

    K = nuts_mod.NUTSKernel
    fn0, step0, eval0 = K._fn, K.step, mx.eval
    patched = {"bool": timed("sync: bool (does a chain continue?)", bool)}

    def fn(self, dense, kind, *static):
        f, label = fn0(self, dense, kind, *static), f"call {kind}{static}"

        def w(*a):
            if label not in nodes:  # count once, on evaluated inputs
                eval0(*[x for x in a if isinstance(x, mx.array)])
                nodes[label] = count_graph(f(*a))
            return timed(label, f)(*a)
        return w

    def step(self, *a):
        F_used.append(self._prefix_depth)
        return timed("step (whole)", step0)(self, *a)

    K._fn, K.step, mx.eval = fn, step, timed("sync: mx.eval", eval0)
    nuts_mod.bool = patched["bool"]
    saved = {k: getattr(mcmc_mod, k) for k in ("find_reasonable_step_size", "estimate_metric")}
    for k, f in saved.items():
        setattr(mcmc_mod, k, timed(f"adapt: {k}", f))
    try:
        wall, r = go(1)
    finally:
        K._fn, K.step, mx.eval = fn0, step0, eval0
        del nuts_mod.bool
        for k, f in saved.items():
            setattr(mcmc_mod, k, f)
    n_tr = warmup + samples
    calls = sum(N[k] for k in N if k.startswith("call"))
    syncs = sum(N[k] for k in N if k.startswith("sync"))
    construct = sum(T[k] for k in T if k.startswith("call"))
    evals = sum(T[k] for k in T if k.startswith("sync"))
    tot_nodes = sum(N[k] * nodes[k].nodes for k in nodes)
    print(f"{name}: plain run {plain:.2f} s; instrumented {wall:.2f} s, {n_tr} transitions "
          f"({wall / n_tr * 1e6:.0f} µs each)")
    print(f"  per transition: {calls / n_tr:.2f} compiled calls, {syncs / n_tr:.2f} host syncs, "
          f"{tot_nodes / n_tr:.0f} primitives")
    print(f"  time: evaluation (in syncs) {evals:.2f} s ({evals / wall:.0%}), call construction "
          f"{construct:.2f} s ({construct / wall:.0%}), other host {wall - evals - construct:.2f} s "
          f"({(wall - evals - construct) / wall:.0%})")
    for k in sorted(T, key=lambda k: -T[k]):
        g = nodes.get(k)
        extra = f"  {g.launches} launches + {g.view} views" if g else ""
        print(f"  {k:44s} n={N[k]:6d} {T[k] * 1e3:8.1f} ms {T[k] / N[k] * 1e6:7.1f} µs/call{extra}")
    F = np.array(F_used[warmup:])
    d = r.tree_depth.max(axis=0)
    integ = np.where(d <= F + 1, 2 ** (F + 1) - 1, 2 ** d - 1)
    print(f"  sampling lockstep: leaves integrated {integ.mean():.2f} per transition, deepest chain's own "
          f"steps {r.num_steps.max(axis=0).mean():.2f}, mean chain's {r.num_steps.mean():.2f}; "
          f"F used {dict(zip(*(x.tolist() for x in np.unique(F, return_counts=True))))}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
