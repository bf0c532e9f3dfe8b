"""Device time per time step of sharded SMC's loop beside the single-process step (issue 8
diagnosis), at m particles per process: genmlx's compiled single-process step
(``smc._seq_step``, each process on its own GPU), the sharded step as ``sharded_smc`` runs it
(``_seq_step_sharded`` then ``Shards.step_resample``, sync-free, collectives inside the
compiled step or between two halves), and the step's two collectives alone (the 2-float
summary gather, the packed 2W-row window gather). Each is chained ``--chain`` times without
a host read and timed between barriers; prints µs per step (median over repeats) and how
often the host queued a step (far below the step time: the host runs ahead; close to it:
the host waits on the device, e.g. at a collective, and the device idles while the host
queues what follows).

    mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 --python python3 \\
        benchmarks/gpu/probe_sharded_loop.py --per-process 15000000
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import genmlx as gm  # noqa: E402
import mlx.core as mx  # noqa: E402

import benchmarks.bench_smc as BS  # noqa: E402
from genmlx.combinators._sequence import STEP_INDEX  # noqa: E402
from genmlx.inference._util import cached_call  # noqa: E402
from genmlx.inference.sharded import shards_for, window_width  # noqa: E402


def chained(fn, state, keys, sh, repeats: int, name: str = "") -> float:
    """µs per call of ``state = fn(key, state)`` over len(keys) calls, timed between
    barriers (printed by rank 0 as soon as measured)."""
    def barrier():
        if sh is not None:
            mx.eval(sh.all_sum(mx.array(1.0)))

    mx.eval(fn(keys[0], state))
    out, host = [], []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        s = state
        for k in keys:
            s = fn(k, s)
            mx.async_eval(s)
        t_host = time.perf_counter()  # the host has queued every step: near t0 when it runs
        # ahead of the device, near the end when something (a collective) holds it back
        mx.eval(s)
        barrier()
        out.append((time.perf_counter() - t0) / len(keys) * 1e6)
        host.append((t_host - t0) / len(keys) * 1e6)
    if sh is None or sh.rank == 0:
        print(f"{name}: {statistics.median(out):.0f} µs per step "
              f"(host queued a step every {statistics.median(host):.0f} µs)", flush=True)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-process", type=int, default=15_000_000, help="particles per process")
    ap.add_argument("--chain", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gm.set_validation(False)
    S = importlib.import_module("genmlx.inference.smc")
    SH = importlib.import_module("genmlx.inference.sharded")
    sh = shards_for()
    m = a.per_process
    model = gm.Unfold(BS.step)
    args = (3, mx.array(0.0), BS.A, BS.Q, BS.RR)
    kin = model._kernel_inputs(args, 1, STEP_INDEX)
    obs = gm.choicemap({"y": 0.3})
    keys = [mx.contiguous(k) for k in mx.random.split(mx.random.key(0), a.chain)]
    x0, lw0 = mx.random.normal((m,)), mx.random.normal((m,)) * 3
    mx.eval(keys, x0, lw0)
    thr = 1.1  # resample at every step (ESS < 1.1 n always)
    res = {"m": m, "processes": 1 if sh is None else sh.size}
    pay1 = (model, m, True, (None,), "systematic", thr)

    def local(k, s):
        rec, nxt, lw, idx, ess = cached_call(S._seq_step, pay1, pay1, k, k, s[0], s[1], kin, obs)
        return nxt, lw, rec, idx

    res["local_step"] = chained(local, (x0, lw0), keys, sh, a.repeats, "local_step")
    if sh is not None:
        pay = pay1 + (sh.rank, sh.size)

        def sharded(k, s):
            rec, nxt, lw, stats = cached_call(S._seq_step_sharded, pay, pay, k, k, s[0], s[1], kin, obs)
            nl, idx, lw, ess, did, ovf = sh.step_resample(k, lw, stats, [nxt], "systematic", thr)
            return nl[0], lw, rec, idx, ovf

        res["sharded_step"] = chained(sharded, (x0, lw0), keys, sh, a.repeats, "sharded_step")
        SH.COMPILE_COLLECTIVES = False
        res["sharded_step_split"] = chained(sharded, (x0, lw0), keys, sh, a.repeats, "sharded_step_split")
        SH.COMPILE_COLLECTIVES = True
        W = window_width(m, sh.size)
        st = mx.zeros((1, 2))
        res["stats_gather"] = chained(lambda k, s: (sh.gather(s[0] + 1.0)[sh.rank:sh.rank + 1],), (st,), keys, sh,
                                      a.repeats, "stats_gather")
        win = [mx.zeros((2 * W,), mx.int32), mx.zeros((2 * W,))]
        res["window_gather"] = chained(lambda k, s: tuple(g[:2 * W] + 1 for g in sh.gather_packed(list(s))),
                                       tuple(win), keys, sh, a.repeats,
                                       "window_gather")
        res["W"] = W
    if sh is None or sh.rank == 0:
        print(json.dumps(res), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
