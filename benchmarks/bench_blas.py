"""float32 matmul throughput with OpenBLAS (genmlx's default on Linux) vs MLX's bundled
reference BLAS (``GENMLX_OPENBLAS=0``).

Each configuration runs in its own process (the BLAS is chosen at ``import genmlx``).
GFLOP/s = 2 n³ / median seconds of ``mx.eval(a @ b)`` after warm-up.

Run: ``.venv/bin/python benchmarks/bench_blas.py [--append-results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks._timing import timeit
import genmlx as gm
import mlx.core as mx
n = int(sys.argv[2])
a = mx.random.normal((n, n), key=mx.random.key(0)); b = mx.random.normal((n, n), key=mx.random.key(1))
mx.eval(a, b)
t = timeit(lambda: a @ b, warmup=3, repeats=int(sys.argv[3]))
print(json.dumps({"blas": gm.describe_blas(), "median": t.median, "min": t.min}))
"""

CONFIGS = [
    ("OpenBLAS (default)", {}),
    ("OpenBLAS, 1 thread", {"OPENBLAS_NUM_THREADS": "1"}),
    ("reference BLAS (GENMLX_OPENBLAS=0)", {"GENMLX_OPENBLAS": "0"}),
]


def measure(env_extra: dict, n: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GENMLX_OPENBLAS", "OPENBLAS_NUM_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(REPO), str(n), str(repeats)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from benchmarks._timing import append_results, fmt_seconds, markdown_table

    flops = 2 * args.n**3
    rows = []
    for label, env in CONFIGS:
        r = measure(env, args.n, args.repeats)
        rows.append([label, fmt_seconds(r["median"]), f"{flops / r['median'] / 1e9:.1f}",
                     f"{flops / r['min'] / 1e9:.1f}"])
        print(f"{label:38s} {fmt_seconds(r['median']):>10s}  {flops / r['median'] / 1e9:7.1f} GFLOP/s"
              f"  ({r['blas']})", flush=True)
    table = markdown_table(["BLAS", f"median time ({args.n}² matmul)", "GFLOP/s (median)",
                            "GFLOP/s (best)"], rows)
    print("\n" + table)
    if args.append_results:
        append_results("Issue 2: float32 matmul, OpenBLAS vs reference BLAS (bench_blas.py)",
                       f"`a @ b` with a, b float32 {args.n}×{args.n}, one process per row.\n\n"
                       + table, args.note)


if __name__ == "__main__":
    main()
