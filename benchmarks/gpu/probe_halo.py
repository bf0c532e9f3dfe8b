"""The sharded end-of-run halo-paths kernel alone on one GPU (issue 8 diagnosis).

In a 2-process run of the D = 4 coordinate SSM at 5·10⁶ particles per process the kernel
phase took ~63 ms against 7 ms for the scalar model at 1.5·10⁷. Here process 0 of 2
virtual ones, T = 100 steps all resampled, sorted ancestors drifting a few slots, one
float32 kind of w elements per row, halos of H rows: the kernel's median µs and the
bytes it writes per µs, for each w.

    python3 benchmarks/gpu/probe_halo.py [--m 5000000] [--ws 1 2 4] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import genmlx  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from _timing import device_time_us  # noqa: E402
from genmlx.kernels import paths as KP  # noqa: E402


def probe(m: int, w: int, T: int, H: int, repeats: int) -> dict:
    R, r = 2, 0
    n = R * m
    flags = (True,) * T
    keys = mx.random.split(mx.random.key(w), T)
    base = mx.arange(n, dtype=mx.int32)
    anc = [mx.clip(mx.sort(base + mx.random.randint(-3, 8, (n,), key=k)), 0, n - 1).astype(mx.int32) for k in keys]
    idxs = [a[r * m:(r + 1) * m] for a in anc]
    EA = mx.concatenate([mx.stack([mx.concatenate([a[q * m:q * m + H], a[(q + 1) * m - H:(q + 1) * m]])
                                   for a in anc]) for q in range(R)])
    x = mx.random.normal((T, n, w), key=mx.random.key(99))
    own = [[x[t, r * m:(r + 1) * m] for t in range(T)]]
    EX = [mx.concatenate([mx.concatenate([x[:, q * m:q * m + H], x[:, (q + 1) * m - H:(q + 1) * m]], axis=1)
                          for q in range(R)])]
    own = [[mx.contiguous(v) for v in own[0]]]
    mx.eval(idxs, EA, own, EX)
    del x, anc
    f = lambda: KP.halo_paths(idxs, flags, EA, own, EX, r, R, H)  # noqa: E731
    us = device_time_us(f, repeats)
    return {"m": m, "w": w, "T": T, "H": H, "kernel_us": us, "gb_written": T * m * w * 4 / 1e9,
            "gb_per_s_written": T * m * w * 4 / 1e3 / us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=5_000_000)
    ap.add_argument("--ws", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--H", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = []
    for w in a.ws:
        res.append(probe(a.m, w, a.T, a.H, a.repeats))
        print(json.dumps(res[-1]), flush=True)
        mx.clear_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
