"""Per-op device times of the sharded SMC resampling step (issue 8 diagnosis): the
primitives it is built from, ``Shards.step_resample`` on a group of one (sync-free: no
windows; ``_exact``: the host-sized path) and the sync-free step of one of 2 virtual
processes (windows of ``window_width(n)`` slots, the gather replaced by a concatenation),
at n particles per process. Prints median µs over repeats (each timed op evaluated and the
stream synchronised).

    python3 benchmarks/gpu/probe_sharded.py [--ns 1000000 10000000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import genmlx  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

from _timing import device_time_us  # noqa: E402
from genmlx.inference import resampling as R  # noqa: E402
from genmlx.inference.prefix_sums import slot_positions  # noqa: E402
from genmlx.inference.sharded import (Shards, _fused, _sync_free_assemble, _sync_free_search,  # noqa: E402
                                     _systematic_head, window_width)


def probe(n: int, repeats: int) -> dict:
    key = mx.random.key(0)
    lw = mx.random.normal((n,), key=key) * 2.0
    w = mx.softmax(lw)
    x = mx.random.normal((n,))
    counts = R.offspring_counts(R.systematic(key, lw, n), n).astype(mx.int32)
    ints = mx.random.randint(0, 7, (n,)).astype(mx.int32)
    perm = mx.random.permutation(n).astype(mx.int32)
    one = Shards(mx.distributed.init())
    stats = mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)])
    pos = slot_positions(R._weights(lw), n)
    key_u = mx.random.uniform(shape=(), key=key)
    mx.eval(lw, w, x, counts, ints, perm, stats, pos, key_u)
    i = mx.arange(n, dtype=mx.int32)
    fused = _fused(lw)
    head_fn = mx.compile(lambda k, l, s: _systematic_head((1, 0, 1.1, fused), k, l, s))
    exact = Shards(mx.distributed.init())
    exact.sync_free = False
    # the sync-free step of rank 0 of 2 virtual processes at n per process (the packed
    # gather replaced by a concatenation of its own exports): the device work of one step
    W = window_width(n, 2)
    pay = (None, 2, 0, 1.1, fused, W)
    stats2 = mx.concatenate([stats[None], stats[None]])

    def sync_free_virtual(k, l, s, xx):
        ess, did, new_lw, Nb, ovf, mid, export = _sync_free_search(pay, k, l, s, [xx])
        got = [mx.concatenate([e, e]) for e in export]
        return _sync_free_assemble(pay, did, Nb, mid, [xx], got), new_lw, ovf

    sf_fn = mx.compile(sync_free_virtual)
    ops = {
        "cumsum_f32": lambda: mx.cumsum(w),
        "cummax_f32": lambda: mx.cummax(w),
        "cumsum_i32": lambda: mx.cumsum(ints),
        "cummax_i32": lambda: mx.cummax(ints),
        "scatter_add_distinct": lambda: mx.zeros((2 * n,), mx.int32).at[i + (i % 2) * n].add(i),
        "scatter_add_perm": lambda: mx.zeros((n,), mx.int32).at[perm].add(i),
        "take_perm": lambda: mx.take(x, perm),
        "take_sorted": lambda: mx.take(x, mx.sort(perm) // 2),
        "logsumexp": lambda: mx.logsumexp(lw),
        "local_stats_two_logsumexps": lambda: R.weight_stats(lw),
        "local_stats_summary_kernel": lambda: R.weight_stats(lw, fused=True),
        "indices_from_counts": lambda: R.indices_from_counts(counts, n),
        "segment_ancestors_generic": lambda: R.segment_ancestors(pos, key_u, 0, n, n),
        "segment_ancestors_fused": lambda: R.segment_ancestors(pos, key_u, 0, n, n, fused=True),
        "systematic_generic": lambda: R.systematic(key, lw, n),
        "systematic_fused": lambda: R.systematic(key, lw, n, fused=True),
        "systematic_head_compiled": lambda: head_fn(key, lw, stats[None]),
        "step_resample_group_of_one": lambda: one.step_resample(key, lw, stats, [x], "systematic", 1.1)[:2],
        "step_resample_group_of_one_exact": lambda: exact.step_resample(key, lw, stats, [x], "systematic", 1.1)[:2],
        "sync_free_step_R2_virtual_compiled": lambda: sf_fn(key, lw, stats2, x),
    }
    out = {}
    for name, fn in ops.items():
        try:
            out[name] = device_time_us(fn, repeats)
        except Exception as e:  # noqa: BLE001 - report and go on
            out[name] = f"error: {type(e).__name__}: {e}"
        print(f"n={n} {name}: {out[name] if isinstance(out[name], str) else f'{out[name]:.0f} µs'}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {str(n): probe(n, a.repeats) for n in a.ns}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(mx.default_device()), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
