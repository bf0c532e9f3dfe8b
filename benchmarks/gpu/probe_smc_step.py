"""Device time per SMC time step (issue 8 diagnosis): genmlx's compiled step
(``smc._seq_step``) beside bench_smc's plain-MLX hand-written steps, and their resampling
parts alone (genmlx's fused ``systematic`` with its kernels, the generic one, the plain
``mx.cumsum`` version), each chained K times without a host read (as in a run: the host
queues ahead) and timed over the chain. Prints µs per call, and the host's share (the calls queued lazily, before evaluation).

    python3 benchmarks/gpu/probe_smc_step.py [--ns 10000 1000000] [--chain 100] [--repeats 5]
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

import genmlx as gm  # noqa: E402,F401
import mlx.core as mx  # noqa: E402

import benchmarks.bench_smc as BS  # noqa: E402
from genmlx.combinators._sequence import STEP_INDEX  # noqa: E402
from genmlx.inference import resampling as R  # noqa: E402
from genmlx.inference._util import cached_call  # noqa: E402


def chained(fn, keys, state, chain: int, repeats: int) -> tuple[float, float]:
    """(µs per call of ``state = fn(key, state)`` over ``chain`` calls, µs per call of
    the host alone: building the chain lazily, before its evaluation), medians."""
    s = fn(keys[0], state)
    mx.eval(s)
    out, host = [], []
    for _ in range(repeats):
        s = state
        t0 = time.perf_counter()
        for i in range(chain):
            s = fn(keys[i], s)
            mx.async_eval(s)
        mx.eval(s)
        out.append((time.perf_counter() - t0) / chain * 1e6)
        s = state
        t0 = time.perf_counter()
        for i in range(chain):
            s = fn(keys[i], s)
        host.append((time.perf_counter() - t0) / chain * 1e6)
        mx.eval(s)
    return statistics.median(out), statistics.median(host)


def probe(n: int, chain: int, repeats: int) -> dict:
    S = importlib.import_module("genmlx.inference.smc")
    model = gm.Unfold(BS.step)
    args = (3, mx.array(0.0), BS.A, BS.Q, BS.RR)
    payload = (model, n, True, (None,), "systematic", 0.5)
    kin = model._kernel_inputs(args, 1, STEP_INDEX)
    obs = gm.choicemap({"y": 0.3})
    y = mx.array(0.3)
    keys = [mx.contiguous(k) for k in mx.random.split(mx.random.key(0), chain)]
    x0, lw0 = mx.random.normal((n,)), mx.random.normal((n,)) * 3
    mx.eval(keys, x0, lw0)

    def gen_step(k, s):  # s: (carry, lw, …)
        rec, nxt, lw, idx, ess = cached_call(S._seq_step, payload, payload, k, k, s[0], s[1], kin, obs)
        return nxt, lw, rec, idx  # what a run keeps of the step

    sys_fused = mx.compile(lambda k, lw: R.systematic(k, lw, n, fused=True))
    sys_generic = mx.compile(lambda k, lw: R.systematic(k, lw, n))
    sys_plain = mx.compile(lambda k, lw: BS._systematic_mlx(k, lw, n))

    def positions_then_counting(k, lw):  # the positions kernel, the decision by MLX ops
        from genmlx.kernels.resample import positions_kernel

        U = mx.random.uniform(shape=(), key=k)
        I, F = positions_kernel(lw, n) if R._K.use_kernel(lw) == "cuda" else R.slot_positions(R._weights(lw), n)
        return R._ancestors_from_cumulative(mx.cummax(R._points_below(I, F, U, n)), 0, n)

    sys_count = mx.compile(positions_then_counting)
    res = {
        "genmlx_step": chained(gen_step, keys, (x0, lw0), chain, repeats),
        "hand_step_states": chained(lambda k, s: BS._hand_step(k, s[0], s[1], y), keys, (x0, lw0), chain, repeats),
        "hand_step_paths": chained(lambda k, s: BS._hand_path_step(k, s[0], s[1], y)[2:], keys, (x0, lw0), chain,
                                   repeats),
    }
    for name, f in (("systematic_fused", sys_fused), ("systematic_generic", sys_generic),
                    ("systematic_plain_mlx", sys_plain), ("positions_kernel_then_counting", sys_count)):
        res[name] = chained(lambda k, s, f=f: (s[0], s[1] + f(k, s[1]).astype(mx.float32) * 0), keys,
                            (x0, lw0), chain, repeats)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {}
    for n in a.ns:
        res[str(n)] = r = probe(n, a.chain, a.repeats)
        print(f"n={n}: " + ", ".join(f"{k} {v[0]:.1f} µs (host {v[1]:.1f})" for k, v in r.items()), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(mx.default_device()), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
