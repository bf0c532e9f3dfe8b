"""Scaling of particle-parallel inference from 1 to N processes (one GPU each).

Measures, in the processes of one ``mlx.launch`` group (or one plain process):

* sharded SMC (``gm.inference.sharded_smc``, bootstrap proposal, systematic resampling at
  ESS < n/2) on bench_smc.py's linear-Gaussian SSM, T = 100, n = 1e5 … 1e6 particles in
  total: particle-steps/s and log Ẑ against the Kalman value;
* the same filter hand-written on the state array (no traces) with the same sharded
  resampling and particle movement (``Shards``): the ceiling of the scheme;
* sharded importance sampling (``gm.inference.sharded_importance_sampling``,
  ``keep_traces=False``) on bench_is.py's Bayesian quadratic regression, n = 1e6, 1e7:
  particles/s and log Ẑ.

Each timed call starts and ends with a barrier (a tiny all-sum), so a time is the
slowest process's. Results go to ``--out`` as JSON (rank 0 writes).

``--state-dim D`` (D > 1) runs the SMC rows on the SSM with D independent coordinates
(observation sd ``RR_VEC``; exact log Z the sum of the coordinates' Kalman values): D
times the arithmetic per particle-step against the same per-step collectives.

``--phases`` splits sharded_smc's time into the per-step loop, the end-of-run descent,
the kept arrays' cross-process gathers and the rest (replay, final evaluation).
``--latency`` times a host read and an all-gather of 2 floats followed by a host read
(the fused path's per-step floor beyond arithmetic). ``--count`` also runs sharded SMC
once with every collective counted (the smallest n):
per time step without / with a resampling, and at the end of the run. With one process
``--vs-smc`` times the single-process ``smc`` against the sharded code path on a group of
one (``run_smc(comm=Shards(group of size 1))``: the same draws, the collectives identities)
— the cost of the sharded machinery itself. With several processes ``--exact`` also times
the exact systematic path (``Shards.sync_free = False``: one host read per step, windows
sized on the host) beside the default sync-free one (no host read until the end of the
run; rows ``smc_exact`` / ``smc_hand_exact``).

Launch on one host with 2 GPUs (the lead's H200 machine, MLX CUDA build). How ranks map
to GPUs: ``mlx.launch -n 2 --backend nccl`` (MLX 0.32, mlx/_distributed_utils/launch.py)
starts one local process per rank with MLX_RANK=r, MLX_WORLD_SIZE=2, NCCL_HOST_IP /
NCCL_PORT (rank 0 bootstraps the NCCL id over TCP) and CUDA_VISIBLE_DEVICES=r (``rank %
n``), so rank r sees only physical GPU r; MLX's NCCL group then calls
cudaSetDevice(rank % visible devices) = 0, i.e. that GPU, which is also MLX's default
gpu device. The environment is otherwise inherited (a CUDA_VISIBLE_DEVICES set by hand
is overridden). NVLink multicast stays off::

    cd /path/to/genmlx
    python3 benchmarks/scale_smc.py --vs-smc --out /tmp/scale_1.json             # 1 GPU
    NCCL_NVLS_ENABLE=0 mlx.launch -n 2 --backend nccl --env NCCL_NVLS_ENABLE=0 \\
        --python "$(command -v python3)" benchmarks/scale_smc.py --count --latency --exact --out /tmp/scale_2.json
    python3 benchmarks/scale_smc.py --compare /tmp/scale_1.json /tmp/scale_2.json \\
        --append-results --note "H200 x2, NCCL, NCCL_NVLS_ENABLE=0"

(``--backend ring`` runs the same on CPUs, e.g. to try it on a laptop.) Target: >= 1.8x
throughput from 1 to 2 GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genmlx as gm  # noqa: E402  (before mlx.core: fast BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._timing import append_results, fmt_seconds, machine_info, markdown_table  # noqa: E402
from benchmarks.bench_is import make_data, quadratic  # noqa: E402
from benchmarks.bench_smc import A, Q, RR, kalman_loglik, step  # noqa: E402
from genmlx.harness.zoo.ssm import kalman_filter  # noqa: E402
from genmlx.inference import sharded_importance_sampling, sharded_smc  # noqa: E402
from genmlx.inference._util import cached_call  # noqa: E402
from genmlx.inference.sharded import Shards, shards_for  # noqa: E402
from genmlx.inference.resampling import weight_stats  # noqa: E402
from genmlx.inference.smc import _resample, run_smc, smc  # noqa: E402


def _barrier(sh) -> None:
    if sh is not None:
        mx.eval(sh.all_sum(mx.array(1.0)))


def _time(fn, sh, repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``mx.eval(fn())`` between barriers (the slowest process's)."""
    for _ in range(warmup):
        mx.eval(fn())
    _barrier(sh)
    out = []
    for _ in range(repeats):
        _barrier(sh)
        t0 = time.perf_counter()
        mx.eval(fn())
        _barrier(sh)
        out.append(time.perf_counter() - t0)
    return out


def phases(model, args, obs, n: int, sh, repeats: int) -> dict:
    """Where a sharded_smc run's time goes (median ms, timed between barriers): the
    per-step loop (up to the host's read of the flags), the end-of-run descent (its
    outputs evaluated), the kept arrays' cross-process gathers (``take_blocks``,
    evaluated; with the halo-paths kernel split into the edges' gathers, ``take_edges``,
    and the kernel with its miss check, ``take_kernel``), the local replay of the step
    scores (``replay``) and the rest (the final evaluation). The evaluations at the marks
    serialize what a plain run overlaps, so the sum can exceed a plain run's time a
    little. One process: loop, replay (with the descent and paths) and rest."""
    import importlib

    from genmlx.core.pytree import tree_flatten
    from genmlx.kernels import paths as KP

    S = importlib.import_module("genmlx.inference.smc")
    marks: dict = {}
    orig = (Shards.descent, Shards.take_blocks, S._descent, KP.halo_paths, S._rebuild_columns)

    def arrays(x):
        return [a for a in tree_flatten(x)[0] if isinstance(a, mx.array)]

    def descent(self, *a, **k):
        marks["loop"] = time.perf_counter()
        out = orig[0](self, *a, **k)
        mx.eval(arrays(out))
        marks["descent"] = time.perf_counter()
        return out

    def take(self, *a, **k):
        out = orig[1](self, *a, **k)
        mx.eval(arrays(out))
        marks["take"] = time.perf_counter()
        return out

    def halo_paths(idxs, flags, EA, xs, EX, *a):
        mx.eval(EA, EX)
        marks["take_in"] = time.perf_counter()
        return orig[3](idxs, flags, EA, xs, EX, *a)

    def descent_one(*a):
        marks["loop"] = marks["descent"] = marks["take"] = time.perf_counter()
        return orig[2](*a)

    def rebuild(*a, **k):
        out = orig[4](*a, **k)
        if out is not None:
            mx.eval(arrays(out))
        marks["replay"] = time.perf_counter()
        return out

    Shards.descent, Shards.take_blocks, S._descent, KP.halo_paths, S._rebuild_columns = (
        descent, take, descent_one, halo_paths, rebuild)
    rows = []
    try:
        for r in range(repeats + 1):
            _barrier(sh)
            marks.clear()
            t0 = time.perf_counter()
            out = sharded_smc(mx.random.key(500 + r), model, args, obs, n, progress=False)
            mx.eval(out.log_weights, arrays(out.traces))
            _barrier(sh)
            t1 = time.perf_counter()
            if r:  # the first run compiles
                edges = marks.get("take_in", marks["take"]) - marks["descent"]
                rep = marks.get("replay", marks["take"])
                rows.append([marks["loop"] - t0, marks["descent"] - marks["loop"],
                             marks["take"] - marks["descent"], edges, marks["take"] - marks["descent"] - edges,
                             rep - marks["take"], t1 - rep])
    finally:
        Shards.descent, Shards.take_blocks, S._descent, KP.halo_paths, S._rebuild_columns = orig
    med = np.median(np.array(rows), axis=0) * 1e3
    return dict(zip(("loop_ms", "descent_ms", "take_rows_ms", "take_edges_ms", "take_kernel_ms", "replay_ms",
                     "rest_ms"), (float(v) for v in med)))


def lgssm_data(T: int, rr: float = RR, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = np.zeros(T)
    for t in range(T):
        xs[t] = A * (xs[t - 1] if t else 0.0) + Q * rng.normal()
    return (xs + rr * rng.normal(size=T)).astype(np.float32)


#: observation sd of each coordinate of the D-coordinate SSM (``--state-dim D > 1``): with
#: bench_smc's 0.5 a bootstrap filter on 4 coordinates is far more degenerate (ESS ≈ n/10
#: at its resamplings) than anyone would run it
RR_VEC = 1.0


def vector_ssm(T: int, D: int):
    """The SSM with D independent coordinates (x_t = A x_{t−1} + Q ε_t, y_t = x_t + RR_VEC
    δ_t, coordinatewise; x₋₁ = 0): the same ``step`` on D-vectors, D times the work per
    particle-step. Returns (ys [T, D], observations, model args, exact log Z: the sum of
    the coordinates' Kalman log-likelihoods)."""
    ys = np.stack([lgssm_data(T, RR_VEC, seed=d) for d in range(D)], axis=1)
    obs = gm.choicemap({(t, "y"): mx.array(ys[t]) for t in range(T)})
    log_z = sum(float(kalman_filter(ys[:, d], A, Q, RR_VEC, 0.0)[0]) for d in range(D))
    return ys, obs, (T, mx.zeros((D,)), A, Q, RR_VEC), log_z


@mx.compile
def _propagate(key, x, lw, y):
    """One bootstrap step on the state array: x ~ N(A x, Q), lw += log N(y; x, RR)."""
    x = A * x + Q * mx.random.normal(x.shape, key=key)
    z = (y - x) / RR
    return x, lw - 0.5 * z * z - math.log(RR) - 0.5 * math.log(2 * math.pi)


def hand_filter(key, ys, n: int, sh):
    """States-only bootstrap filter, sharded like sharded_smc (systematic, ESS < n/2;
    ``Shards.step_resample``, as sharded_smc's fused path), without traces or paths.
    Sharded: no host read in the loop on the sync-free path (the overflow flags are read
    once at the end; after an overflow the filter is redone on the exact path)."""
    R = 1 if sh is None else sh.size
    m = n // R
    x, lw = mx.zeros((m,)), mx.zeros((m,))
    ovfs = []
    for t, k in enumerate(mx.random.split(key, len(ys))):
        k_prop, k_res = mx.random.split(k)
        x, lw = _propagate(k_prop if sh is None else sh.local_key(k_prop), x, lw, mx.array(ys[t]))
        if sh is None:
            idx, lw, _, did = cached_call(_resample, ("systematic", 0.5), ("systematic", 0.5), k_res, lw)
            mx.eval(x, lw, did)
            if did.item():
                x = mx.take(x, idx)
        else:  # sharded_smc's step: one gather of the weight summary, one of the windows
            stats = weight_stats(lw, fused=True)
            (x,), _, lw, _, did, ovf = sh.step_resample(k_res, lw, stats, [x], "systematic", 0.5)
            ovfs += [] if ovf is None else [ovf]
            mx.async_eval(x, lw, ovfs[-1:])
    if ovfs and any(mx.stack(ovfs).tolist()):
        return hand_filter(key, ys, n, sh.fallback())
    glw = lw if sh is None else sh.gather(lw)
    return mx.logsumexp(glw) - math.log(n)


def latency(sh, reps: int = 200) -> dict:
    """Per-call wall time (median over ``reps``) of what one SMC step costs beyond its
    arithmetic: a host read of a tiny result (``.tolist()``), and an all-gather of the
    2-float weight summary followed by that read (the fused path's per-step collective)."""
    x = mx.zeros((1, 2))
    out = {}
    cases = {"host_read_s": lambda: (x + 1.0).tolist()}
    if sh is not None:
        cases["gather_2_floats_and_read_s"] = lambda: sh.gather(x + 1.0).tolist()
    for name, f in cases.items():
        f()
        _barrier(sh)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def count_collectives(model, args, obs, n: int, sh) -> dict:
    """One sharded SMC run with mx.distributed's collectives counted (compilation off: a
    compiled function calls them only while tracing): per step (inside
    ``Shards.step_resample``) split by whether the step resampled, and the rest (the end
    of the run: ancestors, kept arrays, log-weights)."""
    names = ("all_gather", "all_sum")
    orig = {k: getattr(mx.distributed, k) for k in names}
    count = {"n": 0}

    def wrap(f):
        def g(*a, **k):
            count["n"] += 1
            return f(*a, **k)
        return g

    steps = []
    step_orig = Shards.step_resample

    def step(self, *a, **k):
        c0 = count["n"]
        out = step_orig(self, *a, **k)
        steps.append(count["n"] - c0)
        return out

    for k in names:
        setattr(mx.distributed, k, wrap(orig[k]))
    Shards.step_resample = step
    mx.disable_compile()
    try:
        out = sharded_smc(mx.random.key(123), model, args, obs, n, progress=False)
        mx.eval(out.log_weights)
    finally:
        mx.enable_compile()
        for k in names:
            setattr(mx.distributed, k, orig[k])
        Shards.step_resample = step_orig
    steps = steps[-len(out.resampled):]  # the run's steps (a rerun after an overflow)
    res_steps = [c for c, did in zip(steps, out.resampled) if did]
    plain = [c for c, did in zip(steps, out.resampled) if not did]
    return {"n": n, "T": len(steps), "resamplings": len(res_steps), "total": count["n"],
            "sync_free": Shards.sync_free, "per_plain_step": sorted(set(plain)),
            "per_resampling_step": sorted(set(res_steps)),
            "in_steps": sum(steps), "end_of_run": count["n"] - sum(steps)}


def _save(res: dict, a, rank: int) -> None:
    """The results so far to ``--out`` (rank 0)."""
    if a.out and rank == 0:
        Path(a.out).write_text(json.dumps(res, indent=1))


def run(a) -> dict:
    sh = shards_for()
    R = 1 if sh is None else sh.size
    rank = 0 if sh is None else sh.rank
    gm.set_validation(False)
    T = a.T
    model = gm.Unfold(step)
    if a.state_dim == 1:
        ys = lgssm_data(T)
        obs = gm.choicemap({(t, "y"): float(ys[t]) for t in range(T)})
        args = (T, mx.array(0.0), A, Q, RR)
        log_z = float(kalman_loglik(ys))
    else:  # no hand-written filter for vector states
        ys, obs, args, log_z = vector_ssm(T, a.state_dim)
        a.skip_hand = a.skip_is = True
    res = {"processes": R, "device": str(mx.default_device()), "machine": machine_info(),
           "T": T, "state_dim": a.state_dim, "kalman_log_z": log_z, "smc": {}, "smc_hand": {}, "is": {}}
    keys = iter(mx.random.split(mx.random.key(0), 10_000))
    if a.latency:
        res["latency"] = lat = latency(sh)
        if rank == 0:
            print(f"[{R} proc] per call: " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in lat.items()), flush=True)
    if a.count and sh is not None:
        res["collectives"] = c = count_collectives(model, args, obs, min(a.ns_smc), sh)
        if rank == 0:
            print(f"[{R} proc] collectives, sharded_smc n={c['n']} T={c['T']}: {c['total']} in all; "
                  f"per step without resampling {c['per_plain_step']}, with ({c['resamplings']} steps) "
                  f"{c['per_resampling_step']}; end of run {c['end_of_run']}", flush=True)
    if a.vs_smc and sh is None:
        one = Shards(mx.distributed.init())  # a group of one: the sharded path, collectives identities
        res["vs_smc"] = {}
        for n in a.ns_smc:
            t_smc = _time(lambda: smc(next(keys), model, args, obs, n, progress=False).log_weights, None,
                          a.repeats)
            t_sh = _time(lambda: run_smc(next(keys), model, args, obs, n, progress=False, comm=one).log_weights,
                         None, a.repeats)
            m1, m2 = statistics.median(t_smc), statistics.median(t_sh)
            res["vs_smc"][str(n)] = {"smc_s": m1, "sharded_path_s": m2, "smc_times": t_smc, "sharded_times": t_sh}
            print(f"[1 proc] n={n}: smc {fmt_seconds(m1)}, sharded path on a group of one {fmt_seconds(m2)} "
                  f"({m2 / m1:.2f}x)", flush=True)
    paths = [("", True)] + ([("_exact", False)] if a.exact and sh is not None else [])
    for n in a.ns_smc:
        if n % R:
            continue
        for suffix, sync_free in paths:
            Shards.sync_free = sync_free
            tag = f"[{R} proc{', exact path' if suffix else ''}]"
            last = {}

            def f_smc():
                out = sharded_smc(next(keys), model, args, obs, n, progress=False)
                last["lz"] = out.log_marginal_likelihood
                return out.log_weights

            f0, h0 = Shards.fallbacks, Shards.halo_misses
            ts = _time(f_smc, sh, a.repeats)
            med = statistics.median(ts)
            res.setdefault("smc" + suffix, {})[str(n)] = {
                "median_s": med, "times": ts, "particle_steps_per_s": n * T / med,
                "log_z": float(last["lz"]), "fallbacks": Shards.fallbacks - f0,
                "halo_misses": Shards.halo_misses - h0}
            if rank == 0:
                print(f"{tag} sharded_smc n={n}: {fmt_seconds(med)}, {n * T / med:.3g} particle-steps/s, "
                      f"log Z {float(last['lz']):.2f} (Kalman {res['kalman_log_z']:.2f}); "
                      f"exact-path reruns {Shards.fallbacks - f0}, halo misses {Shards.halo_misses - h0}",
                      flush=True)
            _save(res, a, rank)  # kept should a later, optional pass fail (e.g. --phases' memory)
            if a.phases and not suffix:
                res.setdefault("phases", {})[str(n)] = ph = phases(model, args, obs, n, sh, a.repeats)
                if rank == 0:
                    print(f"{tag} sharded_smc n={n} by phase (median ms): "
                          + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in ph.items()), flush=True)
            if not a.skip_hand:
                ts = _time(lambda: hand_filter(next(keys), ys, n, sh), sh, a.repeats)
                med = statistics.median(ts)
                res.setdefault("smc_hand" + suffix, {})[str(n)] = {
                    "median_s": med, "times": ts, "particle_steps_per_s": n * T / med}
                if rank == 0:
                    print(f"{tag} hand filter n={n}: {fmt_seconds(med)}, {n * T / med:.3g} particle-steps/s",
                          flush=True)
        Shards.sync_free = True
    xs, yq = make_data(mx.random.key(0))
    qobs = gm.choicemap({"ys": yq})
    for n in ([] if a.skip_is else a.ns_is):
        if n % R:
            continue
        last = {}

        def f_is():
            out = sharded_importance_sampling(next(keys), quadratic, (xs,), qobs, n, keep_traces=False,
                                              chunk_size=a.is_chunk)
            last["lz"] = out.log_marginal_likelihood
            return last["lz"]

        ts = _time(f_is, sh, a.repeats)
        med = statistics.median(ts)
        res["is"][str(n)] = {"median_s": med, "times": ts, "particles_per_s": n / med,
                             "log_z": float(last["lz"])}
        if rank == 0:
            print(f"[{R} proc] sharded IS n={n}: {fmt_seconds(med)}, {n / med:.3g} particles/s, "
                  f"log Z {float(last['lz']):.2f}", flush=True)
    return res


def compare(paths: list[str], append: bool, note: str) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = min(runs, key=lambda r: r["processes"])
    rows = []
    for kind, rate in (("smc", "particle_steps_per_s"), ("smc_exact", "particle_steps_per_s"),
                       ("smc_hand", "particle_steps_per_s"), ("smc_hand_exact", "particle_steps_per_s"),
                       ("is", "particles_per_s")):
        bkind = kind.removesuffix("_exact")  # one process has no exact/sync-free split
        one = base.get(bkind, {})
        if not one:
            continue
        best = max(one, key=lambda n: one[n][rate])  # the one-process run at its best rate
        for r in runs:
            if r is base:
                continue
            for n, x in r.get(kind, {}).items():
                # against one process at the same n where it ran, else at its best rate
                bn = n if n in one else best
                b = one[bn][rate]
                rows.append([kind, n, f"1 → {r['processes']}", f"{fmt_seconds(one[bn]['median_s'])} (n = {bn})",
                             fmt_seconds(x["median_s"]), f"{b:.3g}", f"{x[rate]:.3g}", f"{x[rate] / b:.2f}",
                             f"{x['log_z']:.2f}" if "log_z" in x else "—"])
    table = markdown_table(["benchmark", "n (total)", "processes", "time (1)", "time (N)", "rate (1)",
                            "rate (N)", "speed-up", "log Ẑ (N)"], rows)
    D = base.get("state_dim", 1)
    ssm = ("linear-Gaussian SSM" if D == 1 else
           f"linear-Gaussian SSM with {D} independent coordinates, observation sd {RR_VEC}")
    body = (f"Sharded SMC ({ssm}, T = {base['T']}, systematic resampling at ESS < n/2; "
            f"Kalman log Z = {base['kalman_log_z']:.2f}), the states-only hand-written filter with the "
            "same sharding, and sharded IS (quadratic regression, 50 points, keep_traces=False); "
            "rates are particle-steps/s (SMC) and particles/s (IS); the speed-up is against one "
            "process at the same n where it ran, else at its best rate (the n in the time (1) column); "
            f"median of the runs, timed between barriers. Devices: {', '.join(sorted({r['device'] for r in runs}))}.\n\n" + table)
    print(body)
    if append:
        append_results("Issue 8: particle-parallel scaling (scale_smc.py)", body, note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns-smc", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--ns-is", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--is-chunk", type=int, default=None, help="IS chunk_size (particles per process at once)")
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--no-unroll", action="store_true",
                    help="per-example sums as one reduction (genmlx.core.batchwise.UNROLL_MAX = 0)")
    ap.add_argument("--state-dim", type=int, default=1,
                    help="SSM coordinates D (D > 1: observation sd RR_VEC, no hand-written filter, no IS rows)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hand", action="store_true", help="skip the hand-written filter")
    ap.add_argument("--skip-is", action="store_true", help="skip sharded importance sampling")
    ap.add_argument("--count", action="store_true", help="count the collectives of one sharded SMC run")
    ap.add_argument("--latency", action="store_true",
                    help="time a host read and a 2-float all-gather + read (the per-step floor)")
    ap.add_argument("--phases", action="store_true",
                    help="also time sharded_smc by phase: loop, descent, cross-process gathers, rest")
    ap.add_argument("--exact", action="store_true",
                    help="N processes: also time the exact systematic path (Shards.sync_free = False; "
                         "one host read per step) beside the default sync-free one")
    ap.add_argument("--vs-smc", action="store_true",
                    help="one process: time smc() against the sharded path on a group of one")
    ap.add_argument("--split-collectives", action="store_true",
                    help="run the sync-free step's collectives between two compiled halves "
                         "(sharded.COMPILE_COLLECTIVES = False) instead of inside one compiled step")
    ap.add_argument("--window-div", type=int, default=None,
                    help="sync-free window W = max(4096, m // DIV) slots (default: sharded.window_width)")
    ap.add_argument("--whole-block", action="store_true",
                    help="the end of run on the whole-block paths (halos of one slot, never widened, no "
                         "halo-paths kernel): checks those paths at scale")
    ap.add_argument("--out", default=None, help="JSON file for this run's results (rank 0 writes)")
    ap.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                    help="no run: compare result files of 1 and N processes")
    ap.add_argument("--append-results", action="store_true", help="with --compare: append to RESULTS.md")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    if a.split_collectives:
        import genmlx.inference.sharded as _sharded

        _sharded.COMPILE_COLLECTIVES = False
    if a.no_unroll:
        import genmlx.core.batchwise as _bw

        _bw.UNROLL_MAX = 0
    if a.window_div:
        import genmlx.inference.sharded as _sharded

        _sharded.window_width = lambda m, processes=2, d=a.window_div: min(m, max(4096, m // d))
    if a.whole_block:
        import genmlx.inference.sharded as _sharded
        import genmlx.kernels.paths as _paths

        _sharded.halo_width = lambda m: 1
        _sharded.HaloLineage.widened = lambda self: None
        _paths.halo_usable = lambda *args: None
    if a.compare:
        compare(a.compare, a.append_results, a.note)
        return
    res = run(a)
    sh = shards_for()
    _save(res, a, 0 if sh is None else sh.rank)
    if a.out and (sh is None or sh.rank == 0):
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
