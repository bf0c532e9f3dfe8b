"""Where importance sampling's time goes at large n on a GPU (issue 8 diagnosis).

The quadratic-regression log-weights of ``bench_is.py`` (3 coefficients per particle, 50
data points) at n particles, by part, each compiled and timed alone (evaluated, stream
synchronised; median µs over repeats):

* ``draws``      — the three [n, 1] standard normal draws (materialised);
* ``elem``       — the [n, 50] standardised residuals from given draws (materialised);
* ``rowsum``     — Σ over the 50 data of a given [n, 50] array (``sum(axis=1)``);
* ``colsum``     — the same sum on the transposed layout [50, n] (``sum(axis=0)``);
* ``matvec``     — the same sum as [n, 50] @ ones[50];
* ``lik``        — the log-likelihood from given draws (elem + rowsum as one compiled call);
* ``lik_T``      — the same on the [50, n] layout;
* ``hand``       — ``bench_is.hand_log_weights`` (draws + lik);
* ``rowsum_kernel`` / ``colsum_kernel`` — the same sums by genmlx's kernels
  (``kernels.sums``: a warp per row of [n, 50], a thread per column of [50, n]);
* ``genmlx``     — ``vgenerate`` as in ``bench_is.genmlx_log_weights`` (its per-particle
  sum by a sum kernel on CUDA);
* ``genmlx_mlx_sum`` — the same with genmlx's kernels off (``GENMLX_KERNELS=0``: MLX's sum);
* ``genmlx_ops`` — the op histogram of genmlx's compiled call (primitives by name).

    python3 benchmarks/gpu/probe_is.py [--ns 1000000 10000000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import genmlx  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
from genmlx import kernels as K  # noqa: E402
from genmlx.kernels import sums as KS  # noqa: E402

import bench_is as B  # noqa: E402
from _timing import device_time_us  # noqa: E402
import graph_ops as G  # noqa: E402


def probe(n: int, repeats: int) -> dict:
    xs, ys = B.make_data(mx.random.key(1))
    key = mx.random.key(0)
    a, b, c = B._coefficient_draws(key, n)
    aT, bT, cT = (v.reshape(1, n) for v in (a, b, c))
    z = (ys - (a + b * xs + c * xs**2)) / B.SIGMA
    xT, yT = xs[:, None], ys[:, None]
    zT = (yT - (aT + bT * xT + cT * xT**2)) / B.SIGMA  # [50, n] (a transposed copy of z
    # fails at n = 10⁷: MLX's CUDA graph rejects the copy kernel's launch)
    ones = mx.ones((B.N_DATA,))
    mx.eval(a, b, c, aT, bT, cT, z, zT, ones)

    draws = mx.compile(lambda k: B._coefficient_draws(k, n))
    elem = mx.compile(lambda a, b, c: (ys - (a + b * xs + c * xs**2)) / B.SIGMA)
    rowsum = mx.compile(lambda z: mx.sum(z, axis=1))
    colsum = mx.compile(lambda z: mx.sum(z, axis=0))
    matvec = mx.compile(lambda z: z @ ones)

    @mx.compile
    def lik(a, b, c):
        r = (ys - (a + b * xs + c * xs**2)) / B.SIGMA
        return mx.sum(-0.5 * r * r, axis=1)

    @mx.compile
    def lik_T(a, b, c):
        r = (yT - (a + b * xT + c * xT**2)) / B.SIGMA
        return mx.sum(-0.5 * r * r, axis=0)

    hand = B.hand_log_weights(xs, ys, n)
    gen = B.genmlx_log_weights(xs, ys, n)
    with K.override(False):
        gen_mlx = B.genmlx_log_weights(xs, ys, n)
        mx.eval(gen_mlx(key))  # traced (and compiled) with the kernels off
    kernel_sum, kernel_col_sum = mx.compile(KS.row_sums), mx.compile(KS.col_sums)
    out = {
        "n": n,
        "draws": device_time_us(lambda: draws(key), repeats),
        "elem": device_time_us(lambda: elem(a, b, c), repeats),
        "rowsum": device_time_us(lambda: rowsum(z), repeats),
        "colsum": device_time_us(lambda: colsum(zT), repeats),
        "matvec": device_time_us(lambda: matvec(z), repeats),
        "lik": device_time_us(lambda: lik(a, b, c), repeats),
        "lik_T": device_time_us(lambda: lik_T(aT, bT, cT), repeats),
        "hand": device_time_us(lambda: hand(key), repeats),
        "rowsum_kernel": device_time_us(lambda: kernel_sum(z), repeats),
        "colsum_kernel": device_time_us(lambda: kernel_col_sum(zT), repeats),
        "genmlx": device_time_us(lambda: gen(key), repeats),
        "genmlx_mlx_sum": device_time_us(lambda: gen_mlx(key), repeats),
    }
    text = G._dot([gen(key)])
    out["genmlx_ops"] = dict(Counter(line.split()[0][:40] for _, line in G._NODE.findall(text)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    rows = []
    for n in a.ns:
        r = probe(n, a.repeats)
        rows.append(r)
        print(f"n={n:.0e}: " + ", ".join(f"{k} {v:.0f} µs" for k, v in r.items()
                                          if isinstance(v, float)), flush=True)
        print(f"  genmlx ops: {r['genmlx_ops']}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
