"""Sums over a small trailing axis at large row counts on a GPU (issue 8 diagnosis).

Sharded SMC on the SSM with D = 4 coordinates spends most of a one-GPU run in the end-of-run
replay (344 ms of 566 at 5·10⁶ particles, against 28 ms of 115 for D = 1 at 10⁷), whose
scores are sums over the D coordinates of [T·n, D] arrays. Each variant below, compiled and
timed alone (evaluated, stream synchronised; median µs), computes one such per-row sum:

* ``sum``       — ``mx.sum(x, axis=-1)`` of a given [N, D] array;
* ``slices``    — Σ_j x[:, j] (views and one fused elementwise kernel);
* ``matvec``    — x @ ones[D];
* ``lp_sum``    — a normal log-density of x about μ (both [N, D]) and its row sum, as the
  replay computes a score (one fused kernel, then the sum);
* ``lp_slices`` — the same with the coordinates as input slices (one fused kernel);
* ``lp_then_slices`` / ``lp_then_matvec`` — the fused log-density, then Σ_j of its column
  views / its product with ones[D] (what a per-example sum could do in place of ``sum``);
* ``copy``      — a plain elementwise pass over x (x + 1), for the bandwidth scale;
* ``kernel_sum`` — genmlx's warp-per-row sum kernel (``kernels.sums``; 8 < D ≤ 256, CUDA);
* ``argmax`` / ``argmax_slices`` — the index of each row's maximum (a categorical draw by
  Gumbel-max), by MLX's reduction / as a chain of elementwise compares of column views;
* ``lse`` / ``lse_slices`` — each row's log Σ exp (a categorical's normalizer), likewise.

    python3 benchmarks/gpu/probe_vec.py [--rows 250000000] [--dims 4] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import genmlx  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
from genmlx.kernels import sums as KS  # noqa: E402

from _timing import device_time_us  # noqa: E402


def probe(N: int, D: int, repeats: int) -> dict:
    x = mx.random.normal((N, D), key=mx.random.key(0))
    mu = mx.random.normal((N, D), key=mx.random.key(1))
    ones = mx.ones((D,))
    mx.eval(x, mu, ones)
    c = -0.5 * math.log(2 * math.pi)

    def lp(a, b):
        z = (a - b) / 0.5
        return c - math.log(0.5) - 0.5 * z * z

    def argmax_slices(x):
        best, idx = x[:, 0], mx.zeros(x.shape[:1], dtype=mx.uint32)
        for j in range(1, D):
            take = x[:, j] > best
            best, idx = mx.where(take, x[:, j], best), mx.where(take, mx.array(j, mx.uint32), idx)
        return idx

    def lse_slices(x):
        m = x[:, 0]
        for j in range(1, D):
            m = mx.maximum(m, x[:, j])
        return m + mx.log(sum(mx.exp(x[:, j] - m) for j in range(D)))

    fns = {
        "copy": mx.compile(lambda x: x + 1.0),
        "argmax": mx.compile(lambda x: mx.argmax(x, axis=-1)),
        "argmax_slices": mx.compile(argmax_slices),
        "lse": mx.compile(lambda x: mx.logsumexp(x, axis=-1)),
        "lse_slices": mx.compile(lse_slices),
        "sum": mx.compile(lambda x: mx.sum(x, axis=-1)),
        "slices": mx.compile(lambda x: sum(x[:, j] for j in range(D))),
        "matvec": mx.compile(lambda x: x @ ones),
        "lp_sum": mx.compile(lambda x, mu: mx.sum(lp(x, mu), axis=-1)),
        "lp_slices": mx.compile(lambda x, mu: sum(lp(x[:, j], mu[:, j]) for j in range(D))),
        "lp_then_slices": mx.compile(lambda x, mu: (lambda v: sum(v[:, j] for j in range(D)))(lp(x, mu))),
        "lp_then_matvec": mx.compile(lambda x, mu: lp(x, mu) @ ones),
    }
    if KS.usable(x):
        fns["kernel_sum"] = mx.compile(KS.row_sums)
    args = {"copy": (x,), "sum": (x,), "slices": (x,), "matvec": (x,), "lp_sum": (x, mu), "lp_slices": (x, mu),
            "lp_then_slices": (x, mu), "lp_then_matvec": (x, mu), "argmax": (x,), "argmax_slices": (x,),
            "lse": (x,), "lse_slices": (x,), "kernel_sum": (x,)}
    ref = fns["lp_sum"](x, mu)
    out = {"rows": N, "dims": D,
           "lp_slices_max_abs_diff": float(mx.max(mx.abs(fns["lp_slices"](x, mu) - ref))),
           "argmax_slices_equal": bool(mx.array_equal(fns["argmax_slices"](x), mx.argmax(x, axis=-1))),
           "lse_slices_max_abs_diff": float(mx.max(mx.abs(fns["lse_slices"](x) - mx.logsumexp(x, axis=-1))))}
    for name, f in fns.items():
        out[name + "_us"] = device_time_us(lambda f=f, a=args[name]: f(*a), repeats)
    gb = N * D * 4 / 1e9
    out["gb_per_array"] = gb
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 250_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[4])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = []
    for N in a.rows:
        for D in a.dims:
            r = probe(N, D, a.repeats)
            res.append(r)
            print(json.dumps(r), flush=True)
            mx.clear_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
