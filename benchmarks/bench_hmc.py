"""HMC on Bayesian quadratic regression: genmlx vs hand-written MLX vs NumPyro.

Model: w ∈ R³ ~ N(0, 1), σ ~ half-N(0, 1), y ~ N(Φw, σ) with Φ = [1, x, x²], N = 100.
All three run 4 chains as one batched computation, 20 leapfrog steps per transition,
1000 transitions, a fixed step size and identity metric (no adaptation), from the
same initial point; wall time of the 1000 transitions after one untimed warm-up call
(compilation). NumPyro runs in its own virtual environment (``--numpyro PYTHON``); its
``MCMC.run`` traces and compiles the vectorized sampler again on every call (its
compiled functions are cached only outside a JAX transformation), so its row's wall time
holds that compilation, and a second row gives it less the wall time of a 10-transition
call (the sampling itself).
genmlx's MCMC driver runs small models with one OpenBLAS thread
(``genmlx._blas.blas_threads_for``); the hand-written loop runs under the same setting, so
that the comparison measures the transition, not the BLAS thread policy.

    python benchmarks/bench_hmc.py [--numpyro /tmp/numpyro-venv/bin/python] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import genmlx as gm
import mlx.core as mx
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _timing import jax_env  # noqa: E402

N, CHAINS, STEPS, ITERS, EPS = 100, 4, 20, 1000, 0.015


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, N)
    y = 0.5 - 1.0 * x + 0.7 * x**2 + rng.normal(0, 1.0, N)
    return x.astype(np.float32), y.astype(np.float32)


def design(x):
    """Φ = [1, x, x²], [N, 3]."""
    return np.stack([np.ones_like(x), x, x * x], 1).astype(np.float32)


@gm.gen
def quadratic(phi):
    w = gm.trace("w", gm.normal(mx.zeros(3), 1.0))
    sigma = gm.trace("sigma", gm.half_normal(1.0))
    return gm.trace("y", gm.normal(phi @ w, sigma))


def run_genmlx(x, y, init):
    def go():
        return gm.inference.hmc(mx.random.key(1), quadratic, (mx.array(design(x)),), gm.choicemap({"y": mx.array(y)}),
                                num_samples=ITERS, num_warmup=0, num_chains=CHAINS, step_size=EPS,
                                num_steps=STEPS, mass="identity", adapt_step_size=False, init=init,
                                progress=False)

    gm.inference.hmc(mx.random.key(0), quadratic, (mx.array(design(x)),), gm.choicemap({"y": mx.array(y)}),
                     num_samples=5, num_warmup=0, num_chains=CHAINS, step_size=EPS, num_steps=STEPS,
                     mass="identity", adapt_step_size=False, init=init, progress=False)
    t = time.perf_counter()
    r = go()
    return time.perf_counter() - t, float(r.accept_prob.mean()), r.samples["w"].reshape(-1, 3).mean(0)


def hand_transition(x, y):
    """The transition written directly in MLX: (compiled step(key, U, lp, g), vg)."""
    PHI = mx.array(design(x))
    Y = mx.array(y)
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def logp(U):
        w, s_u = U[:, :3], U[:, 3]
        s = mx.exp(s_u)
        mean = w @ PHI.T
        z = (Y - mean) / s[:, None]
        ll = mx.sum(-0.5 * z * z, -1) - N * s_u - N * half_log_2pi
        prior = mx.sum(-0.5 * w * w, -1) - 3 * half_log_2pi
        prior_s = math.log(2) - 0.5 * s * s - half_log_2pi + s_u  # half-normal + log-Jacobian
        return ll + prior + prior_s

    def vg(U):
        (_, lp), g = mx.value_and_grad(lambda u: (mx.sum(logp(u)), logp(u)))(U)
        return lp, g

    def transition(key, U, lp, g):
        k1, k2 = mx.random.split(key)
        p = mx.random.normal(U.shape, key=k1)
        h0 = -lp + 0.5 * mx.sum(p * p, -1)
        u1, p1, g1, lp1 = U, p, g, lp
        for _ in range(STEPS):
            p1 = p1 + 0.5 * EPS * g1
            u1 = u1 + EPS * p1
            lp1, g1 = vg(u1)
            p1 = p1 + 0.5 * EPS * g1
        h1 = -lp1 + 0.5 * mx.sum(p1 * p1, -1)
        acc = mx.log(mx.random.uniform(shape=lp.shape, key=k2)) < h0 - h1
        return (mx.where(acc[:, None], u1, U), mx.where(acc, lp1, lp), mx.where(acc[:, None], g1, g),
                acc)

    return mx.compile(transition), vg


def run_hand_mlx(x, y, init):
    """The same transition written directly in MLX (one compiled function)."""
    step, vg = hand_transition(x, y)
    U = mx.array(init)
    lp, g = vg(U)
    keys = mx.random.split(mx.random.key(1), ITERS)
    out = step(keys[0], U, lp, g)
    mx.eval(out)
    t = time.perf_counter()
    accs, draws = [], []
    for i in range(ITERS):
        U, lp, g, acc = step(keys[i], U, lp, g)
        accs.append(acc)
        draws.append(U)
        mx.eval(U, lp, g, acc)
    dt = time.perf_counter() - t
    return dt, float(mx.stack(accs).astype(mx.float32).mean()), np.array(mx.stack(draws))[..., :3].reshape(-1, 3).mean(0)


def transition_times(x, y, init, rounds: int, chunk: int = 200):
    """Per-transition wall time of genmlx's compiled HMC transition (``HMCKernel.step``
    on the block-form state with the identity metric and its outputs evaluated, as
    ``gm.inference.hmc(mass="identity")`` runs it) and of the hand-written
    one, interleaved in chunks of ``chunk`` transitions: {name: [seconds per transition]}."""
    from genmlx.inference.flat_density import cached_density, cached_kernel
    from genmlx.inference.hmc import HMCKernel
    from genmlx.inference.metric import identity_metric

    dens = cached_density(quadratic, (mx.array(design(x)),), gm.choicemap({"y": mx.array(y)}))
    kern = cached_kernel(dens, HMCKernel, STEPS)
    metric = identity_metric(CHAINS, dens.dim, "identity")
    eps = mx.full((CHAINS,), EPS)
    st0 = kern.init_blocks(mx.array(init))
    hand, _ = hand_transition(x, y)
    keys = mx.random.split(mx.random.key(2), chunk)
    mx.eval(st0, keys)

    def gen():
        st = st0
        for i in range(chunk):
            st, info = kern.step(keys[i], st, eps, metric)
            mx.eval(st, info)

    s0 = tuple(kern.init(mx.array(init)))

    def mlx():
        s = s0
        for i in range(chunk):
            *s, acc = hand(keys[i], *s)
            mx.eval(s, acc)

    out = {"genmlx": [], "mlx": []}
    gen(), mlx()  # compile
    for _ in range(rounds):
        for name, fn in (("genmlx", gen), ("mlx", mlx)):
            t = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - t) / chunk)
    return out


def transition_graphs(x, y, init) -> dict:
    """Compiled-graph size of one transition (``benchmarks/graph_ops.py`` counting: nodes,
    launches = non-view primitives): genmlx's block-form identity-metric transition as
    ``gm.inference.hmc(mass="identity")`` runs it, and the hand-written one."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from benchmarks.graph_ops import count_graph
    from genmlx.inference.flat_density import cached_density, cached_kernel
    from genmlx.inference.hmc import HMCKernel
    from genmlx.inference.metric import identity_metric

    dens = cached_density(quadratic, (mx.array(design(x)),), gm.choicemap({"y": mx.array(y)}))
    kern = cached_kernel(dens, HMCKernel, STEPS)
    metric, eps, key = identity_metric(CHAINS, dens.dim, "identity"), mx.full((CHAINS,), EPS), mx.random.key(3)
    st = kern.init_blocks(mx.array(init))
    mx.eval(st, eps, key)
    mx.eval(kern.step(key, st, eps, metric))
    g = count_graph(list(kern.step(key, st, eps, metric)))
    hand, _ = hand_transition(x, y)
    s0 = tuple(kern.init(mx.array(init)))
    mx.eval(s0, hand(key, *s0))
    h = count_graph(list(hand(key, *s0)))
    return {"genmlx": {"nodes": g.nodes, "launches": g.launches}, "mlx": {"nodes": h.nodes, "launches": h.launches}}


NUMPYRO_SCRIPT = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import numpyro, numpyro.distributions as dist
from numpyro.infer import HMC, MCMC, init_to_value
cfg = json.loads(sys.argv[1])
x, y = np.array(cfg["x"], np.float32), np.array(cfg["y"], np.float32)
init = np.array(cfg["init"], np.float32)
def model(x, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    phi = jnp.stack([jnp.ones_like(x), x, x * x], 1)
    numpyro.sample("y", dist.Normal(phi @ w, sigma), obs=y)
def run(n):
    k = HMC(model, step_size=cfg["eps"], num_steps=cfg["steps"], trajectory_length=cfg["eps"] * cfg["steps"], adapt_step_size=False,
            adapt_mass_matrix=False, init_strategy=init_to_value(values={"w": init[0, :3], "sigma": float(np.exp(init[0, 3]))}))
    m = MCMC(k, num_warmup=0, num_samples=n, num_chains=cfg["chains"], chain_method="vectorized", progress_bar=False)
    t = time.perf_counter(); m.run(jax.random.PRNGKey(1), x, y, extra_fields=("accept_prob",)); 
    jax.block_until_ready(m.get_samples()["w"]); return time.perf_counter() - t, m
t_small, _ = run(cfg["iters"])   # the first call (JAX's one-time work)
t, m = run(cfg["iters"])          # MCMC.run traces and compiles its vectorized sampler again on every call
w = np.asarray(m.get_samples()["w"]).mean(0)
run(10)
t_fixed, _ = run(10)              # what a call costs whatever its length (compilation, initialization)
print(json.dumps({"time_s": t, "first_call_s": t_small, "fixed_s": t_fixed,
                  "accept": float(np.mean(m.get_extra_fields()["accept_prob"])), "w_mean": w.tolist(),
                  "numpyro": numpyro.__version__, "jax": jax.__version__}))
"""


def run_numpyro(python, x, y, init, platform="cpu"):
    cfg = dict(x=x.tolist(), y=y.tolist(), init=np.asarray(init).tolist(), eps=EPS, steps=STEPS,
               iters=ITERS, chains=CHAINS)
    out = subprocess.run([python, "-c", NUMPYRO_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                         env=jax_env(platform))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--numpyro", default=None, help="python of a venv with numpyro")
    ap.add_argument("--numpyro-platform", default="cpu", choices=["cpu", "cuda"],
                    help="JAX platform of the NumPyro run (cuda on a GPU machine)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--transition-rounds", type=int, default=15,
                    help="interleaved rounds of 200 isolated transitions each (0: skip)")
    ap.add_argument("--graph", action="store_true", help="only print the transitions' graph sizes")
    a = ap.parse_args(argv)
    x, y = data()
    init = np.tile(np.array([[0.0, 0.0, 0.0, 0.0]], np.float32), (CHAINS, 1))
    if a.graph:
        print(json.dumps(transition_graphs(x, y, init)))
        return
    from genmlx._blas import blas_threads_for, get_blas_threads
    from genmlx.inference.flat_density import cached_density
    from genmlx.inference.mcmc import _work_elements

    dens = cached_density(quadratic, (mx.array(design(x)),), gm.choicemap({"y": mx.array(y)}))
    with blas_threads_for(_work_elements(dens, CHAINS), cpu=mx.default_device() == mx.cpu):
        res = _measure(a, x, y, init)
        res["blas_threads"] = get_blas_threads()
    report(a, res)


def _measure(a, x, y, init) -> dict:
    res = {"genmlx_s": [], "mlx_s": [], "numpyro_s": []}
    for _ in range(a.repeats):
        tg, ag, wg = run_genmlx(x, y, init)
        th, ah, wh = run_hand_mlx(x, y, init)
        res["genmlx_s"].append(tg)
        res["mlx_s"].append(th)
        if a.numpyro:
            npr = run_numpyro(a.numpyro, x, y, init, a.numpyro_platform)
            res["numpyro_s"].append(npr["time_s"])
            res.setdefault("numpyro_sampling_s", []).append(npr["time_s"] - npr["fixed_s"])
            res["numpyro_accept"], res["numpyro_w_mean"] = npr["accept"], npr["w_mean"]
            res["numpyro_version"] = f"numpyro {npr['numpyro']}, jax {npr['jax']}"
    res.update(genmlx_accept=ag, mlx_accept=ah, genmlx_w_mean=wg.tolist(), mlx_w_mean=wh.tolist())
    best = {k: min(v) for k, v in res.items() if k.endswith("_s") and v}
    med = {k: float(np.median(v)) for k, v in res.items() if k.endswith("_s") and v}
    res["best_s"], res["median_s"] = best, med
    res["genmlx_over_mlx"] = best["genmlx_s"] / best["mlx_s"]
    res["genmlx_over_mlx_median"] = med["genmlx_s"] / med["mlx_s"]
    res["genmlx_over_mlx_paired_median"] = float(np.median(np.array(res["genmlx_s"]) / np.array(res["mlx_s"])))
    if "numpyro_s" in best:
        res["genmlx_over_numpyro"] = best["genmlx_s"] / best["numpyro_s"]
        res["genmlx_over_numpyro_sampling"] = best["genmlx_s"] / best["numpyro_sampling_s"]
    if a.transition_rounds:
        tt = transition_times(x, y, init, a.transition_rounds)
        g_, h_ = np.array(tt["genmlx"]), np.array(tt["mlx"])
        res["transition_ms"] = {"genmlx_median": 1e3 * float(np.median(g_)), "mlx_median": 1e3 * float(np.median(h_)),
                                "genmlx_min": 1e3 * float(g_.min()), "mlx_min": 1e3 * float(h_.min()),
                                "paired_ratio_median": float(np.median(g_ / h_)), "ratio_of_minima": float(g_.min() / h_.min())}
    return res


def report(a, res: dict) -> None:
    best, med = res["best_s"], res["median_s"]
    print(json.dumps(res, indent=1))
    if a.append_results:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
        from _timing import append_results, markdown_table

        rows = [["genmlx `gm.inference.hmc`", f"{best['genmlx_s']:.2f} s", f"{med['genmlx_s']:.2f} s",
                 f"{res['genmlx_accept']:.3f}", "1.00", "1.00"],
                ["hand-written MLX (compiled transition)", f"{best['mlx_s']:.2f} s", f"{med['mlx_s']:.2f} s",
                 f"{res['mlx_accept']:.3f}", f"{best['genmlx_s'] / best['mlx_s']:.2f}",
                 f"{med['genmlx_s'] / med['mlx_s']:.2f}"]]
        if "numpyro_s" in best:
            rows.append([f"NumPyro HMC ({res['numpyro_version']}, {a.numpyro_platform})", f"{best['numpyro_s']:.2f} s",
                         f"{med['numpyro_s']:.2f} s", f"{res['numpyro_accept']:.3f}",
                         f"{best['genmlx_s'] / best['numpyro_s']:.2f}", f"{med['genmlx_s'] / med['numpyro_s']:.2f}"])
            rows.append(["NumPyro HMC, sampling (wall − a 10-transition call)", f"{best['numpyro_sampling_s']:.2f} s",
                         f"{med['numpyro_sampling_s']:.2f} s", "", f"{best['genmlx_s'] / best['numpyro_sampling_s']:.2f}",
                         f"{med['genmlx_s'] / med['numpyro_sampling_s']:.2f}"])
        body = (f"Bayesian quadratic regression (N = {N}), HMC with {STEPS} leapfrog steps, ε = {EPS}, identity "
                f"metric, {ITERS} transitions of {CHAINS} batched chains; {a.repeats} interleaved repeats "
                "(genmlx, hand-written MLX, NumPyro in turn), compiled; best and median. NumPyro's `MCMC.run` "
                "traces and compiles its vectorized sampler on every call, so its wall time is also given less "
                "that of a 10-transition call (sampling).\n\n"
                + markdown_table(["implementation", "best time (1000 transitions)", "median time", "accept rate",
                                  "genmlx / this (best)", "genmlx / this (median)"], rows)
                + f"\nMedian of the per-repeat genmlx / hand-written ratios: {res['genmlx_over_mlx_paired_median']:.2f}. "
                "Target: genmlx ≤ 1.2× hand-written MLX. OpenBLAS threads (genmlx and hand-written alike): "
                f"{res.get('blas_threads')}.\n")
        if "transition_ms" in res:
            t = res["transition_ms"]
            body += (f"\nIsolated compiled transition ({a.transition_rounds} interleaved rounds of 200 transitions; "
                     "genmlx = `HMCKernel.step` with its outputs evaluated as `gm.inference.hmc` does): "
                     f"genmlx {t['genmlx_median']:.3f} ms (min {t['genmlx_min']:.3f}), hand-written "
                     f"{t['mlx_median']:.3f} ms (min {t['mlx_min']:.3f}); median of paired ratios "
                     f"{t['paired_ratio_median']:.2f}, ratio of minima {t['ratio_of_minima']:.2f}.\n")
        append_results("Issue 4: HMC, genmlx vs hand-written MLX vs NumPyro (bench_hmc.py)", body, a.note)


if __name__ == "__main__":
    main()
