"""Fused inference kernels vs the generic MLX-ops path (genmlx.kernels).

For n = 10³ … 10⁷ log-weights: the weight summary (logsumexp + ESS), systematic and
stratified ancestors (uniforms pre-drawn), each eager and under ``mx.compile``; the
kernel and generic paths timed round-robin (warm-up first, ``mx.eval`` inside the timed
region). Prints one JSON object; ``--append-results`` adds a table to
``benchmarks/RESULTS.md``. Without a GPU backend the "kernel" rows run the generic path
too (the JSON says so).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_kernels.py [--max-n 10000000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import genmlx  # noqa: E402,F401  (fast BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from benchmarks._timing import append_results, fmt_seconds, markdown_table, timeit_interleaved  # noqa: E402
from genmlx import kernels as K  # noqa: E402
from genmlx.kernels import _backend as B  # noqa: E402


def _ops(n: int) -> dict:
    lw = 3 * mx.random.normal((n,), key=mx.random.key(0))
    U = mx.random.uniform(shape=(n,), key=mx.random.key(1))
    u = mx.random.uniform(shape=(), key=mx.random.key(2))
    mx.eval(lw, U, u)
    return {
        "weight_summary": (lambda x: K.weight_summary(x), lw),
        "systematic": (lambda x: K.resample_systematic(u, x, n), lw),
        "stratified": (lambda x: K.resample_stratified(U, x, n), lw),
    }


def _under(flag: str, fn):
    def run(x):
        with B.override(flag):
            return fn(x)
    return run


def bench(sizes: list[int], repeats: int) -> dict:
    kernel_flag = "1"
    with B.override(kernel_flag):
        backend = B.active_backend()
    out = {"device": str(mx.default_device()), "backend": backend,
           "kernel_path": backend is not None, "results": []}
    for n in sizes:
        for op, (fn, x) in _ops(n).items():
            for compiled in (False, True):
                fns = {}
                for label, flag in (("kernel", kernel_flag), ("generic", "0")):
                    # a fresh function object per label: mx.compile caches traces by the
                    # function's identity, so compiling `fn` twice would time one trace twice
                    f = mx.compile(lambda x, fn=fn: fn(x)) if compiled else fn
                    fns[label] = _under(flag, f)
                t = timeit_interleaved(fns, x, warmup=3, repeats=repeats, min_total=0.2)
                r = {"op": op, "n": n, "compiled": compiled,
                     "kernel_s": t["kernel"].median, "generic_s": t["generic"].median,
                     "speedup": t["generic"].median / t["kernel"].median}
                out["results"].append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-n", type=int, default=1_000)
    ap.add_argument("--max-n", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    sizes, n = [], a.min_n
    while n <= a.max_n:
        sizes.append(n)
        n *= 10
    res = bench(sizes, a.repeats)
    print(json.dumps(res, indent=1))
    if a.append_results:
        rows = [[r["op"], f"{r['n']:.0e}", "yes" if r["compiled"] else "no",
                 fmt_seconds(r["kernel_s"]), fmt_seconds(r["generic_s"]), f"{r['speedup']:.2f}×"]
                for r in res["results"]]
        table = markdown_table(["op", "n", "mx.compile", "kernel", "generic", "speed-up"], rows)
        note = a.note + ("" if res["kernel_path"] else " (no GPU backend: both rows generic)")
        append_results("Issue 8: fused weight-summary / resampling kernels vs generic ops "
                       "(bench_kernels.py)",
                       f"Backend: {res['backend']}; median of ≥{a.repeats} interleaved calls.\n\n"
                       + table, note.strip())


if __name__ == "__main__":
    main()
