"""NUTS effective samples per second: genmlx vs NumPyro on eight schools
(non-centred) and sblrc-blr (posteriordb).

Both samplers: 4 chains (genmlx: one batched computation; NumPyro: both
``chain_method="vectorized"`` and ``"sequential"``, the better one is compared), the same numbers of warm-up and sampling iterations,
target accept 0.8, max tree depth 10, diagonal (eight schools) / dense (blr) mass
matrix adapted in Stan's windows. Both sets of draws go through the same ESS
estimator (gm.diagnostics, bulk ESS, minimum over parameters); ESS/s divides by the
wall time of the whole run (warm-up + sampling) of a second call (NumPyro: on the same
MCMC object; genmlx: reusing the compiled density and kernel ``gm.inference`` caches for
the same model and data), and, below, by its sampling time. ``--repeats k`` interleaves k
repeats of the three samplers and reports median times. ``--seeds s`` times runs from s
keys (1..s, after the compiling run from key 0) for each sampler: a sampler's trajectories
are chaotic in float rounding (the same key on another device or library ends with other
step sizes), so one key's leapfrogs per draw and ESS are one draw from a spread; the
table then gives per-run means and ESS/s = Σ ESS / Σ wall time over the keys.

A run's wall time holds costs that do not grow with its iterations, and they differ
between the samplers: NumPyro's ``MCMC.run`` traces and compiles its sampler again on
every call with vectorized (or sequential) chains — its compiled functions are cached only
outside a JAX transformation, and the chains run under ``vmap`` — about 3.4 s per call for
eight schools on the 2-core development machine, against ~0.5 s for the 2000 iterations
themselves. So each sampler also times a run of ``--fixed-iters`` K warm-up + K draws
(key 1, the second such call, after its other runs), and the table gives the sampling
time, wall − that run's time (the iterations' cost beyond a run's fixed part; K
iterations of both phases are counted in neither), and ESS/s on both. genmlx runs these small models
with one OpenBLAS thread (its MCMC driver's default for small data on the CPU,
``GENMLX_SMALL_BLAS_THREADS``); JAX/XLA uses its own threading.

    GENMLX_DATA=../shared/data python benchmarks/bench_nuts.py \
        [--numpyro /tmp/numpyro-venv/bin/python] [--warmup 1000] [--samples 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import genmlx as gm
import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "posteriordb"))
from models import POSTERIORS, load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import jax_env  # noqa: E402

NAMES = ["eight_schools-eight_schools_noncentered", "sblrc-blr"]

NUMPYRO_SCRIPT = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import numpyro, numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS
cfg = json.loads(sys.argv[1])
d = json.load(open(cfg["data"]))
if cfg["name"].startswith("eight_schools"):
    sigma, y = np.array(d["sigma"], np.float32), np.array(d["y"], np.float32)
    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        tt = numpyro.sample("theta_tilde", dist.Normal(jnp.zeros(len(y)), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(mu + tau * tt, sigma).to_event(1), obs=y)
    dense = False
else:
    X, y = np.array(d["X"], np.float32), np.array(d["y"], np.float32)
    def model():
        beta = numpyro.sample("beta", dist.Normal(jnp.zeros(X.shape[1]), 10.0).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
        numpyro.sample("y", dist.Normal(X @ beta, sigma).to_event(1), obs=y)
    dense = True
m = MCMC(NUTS(model, dense_mass=dense, target_accept_prob=0.8, max_tree_depth=10),
         num_warmup=cfg["warmup"], num_samples=cfg["samples"], num_chains=4,
         chain_method=cfg["chain_method"], progress_bar=False)
def run(seed):
    t = time.perf_counter()
    m.run(jax.random.PRNGKey(seed), extra_fields=("num_steps", "diverging"))
    s = m.get_samples(group_by_chain=True)
    jax.block_until_ready(s)
    return time.perf_counter() - t, m
t0, _ = run(0)  # the first call (JAX's one-time work); every call compiles the sampler again
for seed in cfg["seeds"]:
    t, m = run(seed)
    s = {k: np.asarray(v) for k, v in m.get_samples(group_by_chain=True).items()}
    np.savez(cfg["out"] + f".{seed}.npz", **s)
    e = m.get_extra_fields(group_by_chain=True)
    print(json.dumps({"time_s": t, "first_run_s": t0, "mean_steps": float(np.mean(e["num_steps"])),
                      "divergences": int(np.sum(e["diverging"])), "version": f"numpyro {numpyro.__version__}, jax {jax.__version__}"}))
K = cfg["fixed_iters"]  # a short run: what every call costs whatever its length
m = MCMC(NUTS(model, dense_mass=dense, target_accept_prob=0.8, max_tree_depth=10),
         num_warmup=K, num_samples=K, num_chains=4, chain_method=cfg["chain_method"], progress_bar=False)
run(0)  # as for the long runs: time the second call of this MCMC object
t_fixed, _ = run(1)
print(json.dumps({"fixed_s": t_fixed}))
"""


def flat_params(name, samples):
    """Reference-named parameters {name: [chains, draws]} from either sampler."""
    return POSTERIORS[name].params(samples)


def min_ess(params):
    return min(float(gm.diagnostics.ess_bulk(v)) for v in params.values())


def timed_nuts(post, args, obs, seed: int, warmup: int, samples: int):
    """(wall seconds, result) of one 4-chain genmlx NUTS run on a posteriordb posterior."""
    t = time.perf_counter()
    r = gm.inference.nuts(mx.random.key(seed), post.model, args, obs, num_samples=samples,
                          num_warmup=warmup, num_chains=4, mass=post.mass, progress=False)
    return time.perf_counter() - t, r


def run_genmlx(root, name, warmup, samples, seeds=(1,), fixed_iters=10):
    """(one record per key in ``seeds``, after a compiling run from key 0; the wall time
    of a run of ``fixed_iters`` warm-up + draws from key 1)."""
    post, args, obs, _ = load(root, name)

    def go(seed):
        return timed_nuts(post, args, obs, seed, warmup, samples)

    t0, _ = go(0)
    out = []
    for seed in seeds:
        t, r = go(seed)
        p = flat_params(name, r.samples)
        out.append(dict(time_s=t, first_run_s=t0, min_ess_bulk=min_ess(p), mean_steps=float(r.num_steps.mean()),
                        divergences=r.num_divergences))
    timed_nuts(post, args, obs, 0, fixed_iters, fixed_iters)  # timed as the long runs: a second call
    return out, timed_nuts(post, args, obs, 1, fixed_iters, fixed_iters)[0]


def peer_runs(platforms: list[str]) -> list[tuple[str, str, str]]:
    """(label, chain method, platform): on the CPU both chain methods, on a GPU the
    vectorized one (sequential chains there are only slower)."""
    out = []
    for pf in platforms:
        for cm in (("vectorized", "sequential") if pf == "cpu" else ("vectorized",)):
            out.append((f"numpyro-{cm}" + ("" if pf == "cpu" else f"-{pf}"), cm, pf))
    return out


def run_numpyro(python, root, name, warmup, samples, chain_method="vectorized", platform="cpu", seeds=(1,),
                fixed_iters=10):
    """(one record per key in ``seeds``, the short run's wall time) as :func:`run_genmlx`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "draws")
        cfg = dict(name=name, data=str(Path(root) / "posteriordb" / name / "data.json"), warmup=warmup,
                   samples=samples, out=out, chain_method=chain_method, seeds=list(seeds), fixed_iters=fixed_iters)
        res = subprocess.run([python, "-c", NUMPYRO_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                             env=jax_env(platform))
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        lines = [json.loads(line) for line in res.stdout.strip().splitlines()[-len(seeds) - 1:]]
        infos, fixed = lines[:-1], lines[-1]["fixed_s"]
        for seed, info in zip(seeds, infos):
            info["min_ess_bulk"] = min_ess(flat_params(name, dict(np.load(f"{out}.{seed}.npz"))))
    return infos, fixed


def summarize(rs: list) -> dict:
    """One sampler's row from its repeats ``rs`` (each (per-key records, short run's wall
    time)): wall
    time per run = the median over repeats of the mean over keys; ESS, leapfrogs per draw
    and divergences per run = means over keys (the same every repeat); ESS/s = Σ ESS / Σ
    time over the keys (of the median repeat); the same on the sampling time (wall −
    the short run's, medians over repeats)."""
    per_rep = [float(np.mean([x["time_s"] for x in r])) for r, _ in rs]
    first = rs[0][0]
    row = dict(first[0])
    row["times_s"] = per_rep
    row["time_s"] = float(np.median(per_rep))
    row["min_ess_bulk"] = float(np.mean([x["min_ess_bulk"] for x in first]))
    row["mean_steps"] = float(np.mean([x["mean_steps"] for x in first]))
    row["divergences"] = float(np.mean([x["divergences"] for x in first]))
    row["per_seed"] = [{k: x[k] for k in ("time_s", "min_ess_bulk", "mean_steps", "divergences")} for x in first]
    row["ess_per_s"] = row["min_ess_bulk"] / row["time_s"]
    row["fixed_s"] = float(np.median([f for _, f in rs]))
    row["sampling_s"] = float(np.median([t - f for t, (_, f) in zip(per_rep, rs)]))
    row["ess_per_sampling_s"] = row["min_ess_bulk"] / row["sampling_s"] if row["sampling_s"] > 0 else float("nan")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--numpyro", default=None)
    ap.add_argument("--numpyro-platforms", default="cpu",
                    help="comma-separated JAX platforms for NumPyro (cpu, cuda): on a GPU machine "
                         "'cpu,cuda' times NumPyro on both")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved repeats (genmlx, NumPyro vectorized, NumPyro sequential); "
                         "times are medians (each sampler's draws, hence its ESS, are the same every repeat)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="time runs from keys 1..SEEDS per sampler (means per run; ESS/s = total ESS / total time)")
    ap.add_argument("--fixed-iters", type=int, default=10,
                    help="warm-up and draws of the short run whose time is a run's fixed cost")
    ap.add_argument("names", nargs="*", default=NAMES)
    a = ap.parse_args(argv)
    root = Path(os.environ.get("GENMLX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    out = {}
    peers = peer_runs(a.numpyro_platforms.split(",")) if a.numpyro else []
    if a.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {a.seeds}")
    seeds = tuple(range(1, a.seeds + 1))
    who = ["genmlx"] + [label for label, _, _ in peers]
    for name in a.names:
        runs = {w: [] for w in who}
        for _ in range(a.repeats):
            runs["genmlx"].append(run_genmlx(root, name, a.warmup, a.samples, seeds, a.fixed_iters))
            for label, cm, pf in peers:
                runs[label].append(run_numpyro(a.numpyro, root, name, a.warmup, a.samples, cm, pf, seeds,
                                               a.fixed_iters))
        row = {w: summarize(rs) for w, rs in runs.items()}
        if peers:
            best = max(row[label]["ess_per_s"] for label, _, _ in peers)
            row["genmlx_over_numpyro_ess_per_s"] = row["genmlx"]["ess_per_s"] / best
            best = max(row[label]["ess_per_sampling_s"] for label, _, _ in peers)
            row["genmlx_over_numpyro_ess_per_sampling_s"] = row["genmlx"]["ess_per_sampling_s"] / best
        out[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    if a.append_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _timing import append_results, markdown_table

        rows = []
        for name, row in out.items():
            for who in ["genmlx"] + [label for label, _, _ in peers]:
                if who in row:
                    r = row[who]
                    rows.append([name, who, f"{r['time_s']:.2f} s", f"{r['fixed_s']:.2f} s", f"{r['sampling_s']:.2f} s",
                                 f"{r['mean_steps']:.1f}", f"{r['min_ess_bulk']:.0f}", f"{r['ess_per_s']:.1f}",
                                 f"{r['ess_per_sampling_s']:.1f}", f"{r['divergences']:g}"])
        ratios = "; ".join(f"{n}: {row['genmlx_over_numpyro_ess_per_s']:.2f}× (whole run), "
                           f"{row['genmlx_over_numpyro_ess_per_sampling_s']:.2f}× (sampling)" for n, row in out.items()
                           if "genmlx_over_numpyro_ess_per_s" in row)
        body = (f"NUTS, 4 chains (genmlx batched on {mx.default_device()}; NumPyro vectorized and sequential on "
                f"{a.numpyro_platforms}, vectorized only on a GPU), {a.warmup} warm-up + "
                f"{a.samples} draws per chain, second (compiled) run timed; ESS = bulk ESS (gm.diagnostics, "
                "min over parameters) of both samplers' draws; ESS/s over the whole run"
                + (f"; runs from keys 1..{a.seeds} per sampler (means per run, ESS/s = total ESS / total time)"
                   if a.seeds > 1 else "")
                + (f"; wall time = median of {a.repeats} interleaved repeats" if a.repeats > 1 else "")
                + f"; fixed = wall time of a {a.fixed_iters} + {a.fixed_iters}-iteration run, sampling = wall − fixed "
                "(NumPyro's MCMC.run recompiles its sampler on every call).\n\n"
                + markdown_table(["posterior", "sampler", "wall time", "fixed", "sampling", "mean leapfrogs/draw",
                                  "min bulk ESS", "ESS/s (wall)", "ESS/s (sampling)", "divergences"], rows)
                + (f"\ngenmlx / NumPyro (the fastest chain method and platform) ESS/s: {ratios} (target ≥ 1.0).\n" if ratios else ""))
        append_results("Issue 4: NUTS ESS/s vs NumPyro (bench_nuts.py)", body, a.note)


if __name__ == "__main__":
    main()
