"""Incremental Unfold updates as in a particle filter: prefix skipping vs full re-execution.

Linear-Gaussian state-space model, kernel

    x_t ~ N(0.9 x_{t−1}, 0.5²),   y_t ~ N(x_t, 1),

as ``gm.Unfold(kernel)`` with n particles in ONE batched trace. A particle-filter-like
loop starts from T = 1 (``vgenerate`` with y_0 observed) and extends the trace one step
at a time, observing y_t:

    tr, w, _, _ = unfold.update(key, tr, {(t, "y"): y_t}, args=(t + 1, x0, …),
                                argdiffs=(IntDiff(1), NoChange, …))

* prefix skipping (genmlx's Unfold): the update runs the kernel once (step t, vmapped
  over the n particles); the earlier steps are reused as they are;
* full re-execution: the same update with every argdiff ``UnknownChange``, which makes
  Unfold revisit every step (the results are identical: per-step keys are folded in).

After an untimed warm-up run, reports the cumulative wall time of the loop up to each T (``mx.eval`` of the weights
and the new trace every step) and the slope of log(time) against log(T): ≈ 1 means
O(T) total work (constant cost per step), ≈ 2 means O(T²). Resampling is not part of
the loop (it is the SMC module's business), so only the update cost is measured.

Run: ``.venv/bin/python benchmarks/bench_unfold.py [--n 1000] [--T-max 1000]
[--full-max 160] [--append-results]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genmlx as gm  # noqa: E402  (before mlx.core: fast BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._timing import append_results, fmt_seconds, markdown_table  # noqa: E402

A, Q, R = 0.9, 0.5, 1.0


@gm.gen
def kernel(t, x, a, q, r):
    x = gm.normal(a * x, q) @ "x"
    gm.normal(x, r) @ "y"
    return x


UNFOLD = gm.Unfold(kernel)


def args_of(T):
    return (T, mx.array(0.0), A, Q, R)


def run_filter(ys: np.ndarray, n: int, T_max: int, full: bool, checkpoints: list[int]) -> dict:
    """Cumulative seconds of the update loop when the trace reaches each checkpoint T."""
    key = mx.random.key(0)
    obs0 = gm.choicemap({(0, "y"): float(ys[0])})
    tr, w = UNFOLD.vgenerate(key, args_of(1), obs0, n)
    mx.eval(w, tr.score)
    diffs = (gm.UnknownChange,) * 5 if full else (gm.IntDiff(1),) + (gm.NoChange,) * 4
    keys = mx.random.split(mx.random.key(1), T_max)
    out, elapsed = {}, 0.0
    for t in range(1, T_max):
        t0 = time.perf_counter()
        tr, w, _, _ = UNFOLD.update(keys[t], tr, gm.choicemap({(t, "y"): float(ys[t])}),
                                    args=args_of(t + 1), argdiffs=diffs)
        mx.eval(w, tr.score, tr.steps[-1].score)
        elapsed += time.perf_counter() - t0
        if t + 1 in checkpoints:
            out[t + 1] = elapsed
    return out


def slope(times: dict) -> float:
    Ts = np.array(sorted(times), dtype=float)
    ts = np.array([times[int(T)] for T in Ts])
    return float(np.polyfit(np.log(Ts), np.log(ts), 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="particles")
    p.add_argument("--T-max", type=int, default=1000)
    p.add_argument("--full-max", type=int, default=160, help="largest T for full re-execution")
    p.add_argument("--append-results", action="store_true")
    a = p.parse_args()

    grid = [T for T in (10, 20, 40, 80, 160, 320, 640, 1000) if T <= a.T_max]
    rng = np.random.default_rng(0)
    x, ys = 0.0, []
    for _ in range(a.T_max):
        x = A * x + Q * rng.normal()
        ys.append(x + R * rng.normal())
    ys = np.array(ys)

    for full_flag in (False, True):  # untimed warm-up: first vmap/eval calls, caches
        run_filter(ys, a.n, 12, full_flag, [])
    fast = run_filter(ys, a.n, a.T_max, False, grid)
    full_grid = [T for T in grid if T <= a.full_max]
    full = run_filter(ys, a.n, max(full_grid), True, full_grid)

    rows = []
    for T in grid:
        f = full.get(T)
        rows.append([T, fmt_seconds(fast[T]), fmt_seconds(fast[T] / (T - 1)),
                     fmt_seconds(f) if f is not None else "—",
                     f"{f / fast[T]:.1f}×" if f is not None else "—"])
    s_fast, s_full = slope(fast), slope(full)
    s_fast_tail = slope({T: v for T, v in fast.items() if T >= 80})
    s_full_tail = slope({T: v for T, v in full.items() if T >= 40})
    table = markdown_table(
        ["T", "prefix skipping: total", "per step", "full re-execution: total", "full / skipping"], rows)
    summary = (f"\nlog-log slope of total time vs T: prefix skipping {s_fast:.2f} "
               f"({s_fast_tail:.2f} for T ≥ 80), full re-execution {s_full:.2f} "
               f"(T ≤ {max(full_grid)}; {s_full_tail:.2f} for 40 ≤ T, where the per-call "
               "overhead no longer dominates). Target: linear (slope ≈ 1) with prefix skipping; "
               "full re-execution is O(T²).\n")
    print(table + summary)
    if a.append_results:
        note = (f"Unfold particle-filter-like loop, n = {a.n} particles in one batched trace, "
                "LG-SSM kernel with 2 choices per step; `benchmarks/bench_unfold.py`. "
                "The machine was shared with other jobs (2 cores), so absolute times are noisy.")
        append_results("Unfold prefix skipping", table + summary, note)


if __name__ == "__main__":
    main()
