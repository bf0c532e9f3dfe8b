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
* ``copy``      — a plain elementwise pass over x (x + 1), for the bandwidth scale.

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

    fns = {
        "copy": mx.compile(lambda x: x + 1.0),
        "sum": mx.compile(lambda x: mx.sum(x, axis=-1)),
        "slices": mx.compile(lambda x: sum(x[:, j] for j in range(D))),
        "matvec": mx.compile(lambda x: x @ ones),
        "lp_sum": mx.compile(lambda x, mu: mx.sum(lp(x, mu), axis=-1)),
        "lp_slices": mx.compile(lambda x, mu: sum(lp(x[:, j], mu[:, j]) for j in range(D))),
        "lp_then_slices": mx.compile(lambda x, mu: (lambda v: sum(v[:, j] for j in range(D)))(lp(x, mu))),
        "lp_then_matvec": mx.compile(lambda x, mu: lp(x, mu) @ ones),
    }
    args = {"copy": (x,), "sum": (x,), "slices": (x,), "matvec": (x,), "lp_sum": (x, mu), "lp_slices": (x, mu),
            "lp_then_slices": (x, mu), "lp_then_matvec": (x, mu)}
    ref = fns["lp_sum"](x, mu)
    out = {"rows": N, "dims": D,
           "lp_slices_max_abs_diff": float(mx.max(mx.abs(fns["lp_slices"](x, mu) - ref)))}
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
