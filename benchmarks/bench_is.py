"""Vectorized importance sampling: compiled genmlx ``vgenerate`` vs hand-written MLX.

Bayesian quadratic regression with 50 data points and known noise σ:

    a, b, c ~ N(0, 1) independently,   y_i ~ N(a + b x_i + c x_i², σ²),  i = 1..50.

With the prior as proposal the importance log-weights are the log-likelihoods

    log w_k = Σ_i log N(y_i; a_k + b_k x_i + c_k x_i², σ²),   (a_k, b_k, c_k) ~ prior,

computed two ways, each compiled with the key as input and returning only the [n] weights:

* genmlx: ``model.vgenerate(key, (xs,), {"ys": y}, n)`` (the model body runs once for n
  particles under ``mx.vmap``);
* by hand: three ``mx.random.normal((n,))`` draws and the Gaussian log-density, [n, 50].

Reports the median time per call (after warm-up, ``mx.eval`` inside the timed region),
the genmlx / hand-written time ratio and the peak MLX memory of one call, for
n = 10³ … 10⁶. Target: ratio ≤ 1.2 at every n.

Run: ``.venv/bin/python benchmarks/bench_is.py [--append-results]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genmlx as gm  # noqa: E402  (before mlx.core: fast BLAS)
import mlx.core as mx  # noqa: E402

from benchmarks._timing import (  # noqa: E402
    append_results, fmt_bytes, fmt_seconds, markdown_table, peak_memory, timeit_interleaved,
)

SIGMA = 0.3
N_DATA = 50
LOG_NORM = -math.log(SIGMA) - 0.5 * math.log(2 * math.pi)


def make_model(likelihood=gm.normal):
    """The model, with ``likelihood(mean, sd)`` as the distribution of the data."""

    @gm.gen
    def quadratic(xs):
        a = gm.trace("a", gm.normal(0.0, 1.0))
        b = gm.trace("b", gm.normal(0.0, 1.0))
        c = gm.trace("c", gm.normal(0.0, 1.0))
        return gm.trace("ys", likelihood(a + b * xs + c * xs**2, SIGMA))

    return quadratic


quadratic = make_model()


def make_data(key) -> tuple[mx.array, mx.array]:
    xs = mx.linspace(-1.0, 1.0, N_DATA)
    ys = 0.5 - 1.2 * xs + 0.8 * xs**2 + SIGMA * mx.random.normal((N_DATA,), key=key)
    mx.eval(xs, ys)
    return xs, ys


def genmlx_log_weights(xs, ys, n: int, model=quadratic):
    """Compiled key -> [n] log-weights through ``vgenerate``."""
    obs = gm.choicemap({"ys": ys})

    @mx.compile
    def f(key):
        _, w = model.vgenerate(key, (xs,), obs, n)
        return w

    return f


def _coefficient_draws(key, n: int):
    """a, b, c ~ N(0, 1), each [n, 1]. ``mx.contiguous`` materialises each draw: without it
    mx.compile fuses the normal sampler's elementwise tail into the [n, 50] kernel and
    recomputes it 50×."""
    ka, kb, kc = mx.random.split(key, 3)
    return tuple(mx.contiguous(mx.random.normal((n, 1), key=k)) for k in (ka, kb, kc))


def hand_log_weights(xs, ys, n: int):
    """Compiled key -> [n] log-weights written directly in MLX."""

    @mx.compile
    def f(key):
        a, b, c = _coefficient_draws(key, n)
        z = (ys - (a + b * xs + c * xs**2)) / SIGMA
        return mx.sum(-0.5 * z * z, axis=1) + N_DATA * LOG_NORM

    return f


def hand_hoisted_log_weights(xs, ys, n: int):
    """Diagnostic: the hand-written version with the algebra genmlx's normal score uses
    (z = (μ − y)/σ; −½ Σ z² − 50 (log σ + ½ log 2π), factor and normaliser applied once
    per particle instead of per element): isolates genmlx's own overhead."""

    @mx.compile
    def f(key):
        a, b, c = _coefficient_draws(key, n)
        z = ((a + b * xs + c * xs**2) - ys) / SIGMA
        return -0.5 * mx.sum(z * z, axis=1) + N_DATA * LOG_NORM

    return f


def _loglik_one(a, b, c, xs, ys, mu_first: bool = False):
    """log N(ys; a + b x + c x², σ²) summed over the data, for ONE particle; z = (y − μ)/σ,
    or (μ − y)/σ (same value, the order genmlx's normal uses) with ``mu_first``."""
    mu = a + b * xs + c * xs**2
    z = ((mu - ys) if mu_first else (ys - mu)) / SIGMA
    return mx.sum(-0.5 * z * z) + N_DATA * LOG_NORM


def _vmap_keys_variant(xs, ys, n: int, site_key):
    """n particle keys; per particle, ``site_key(k, i)`` gives choice i's key; one scalar
    draw per key and the per-particle likelihood, all under ``mx.vmap``."""

    def one(k):
        a, b, c = (mx.contiguous(mx.random.normal(key=site_key(k, i))) for i in (1, 2, 3))
        return _loglik_one(a, b, c, xs, ys)

    @mx.compile
    def f(key):
        return mx.vmap(one)(mx.random.split(key, n))

    return f


def vmap_split_keys_log_weights(xs, ys, n: int):
    """Diagnostic, no genmlx code: per-particle keys, a threefry split per choice."""

    def site_key(k, i):
        for _ in range(i):
            k, sub = mx.random.split(k)
        return sub

    return _vmap_keys_variant(xs, ys, n, site_key)


def vmap_added_keys_log_weights(xs, ys, n: int):
    """Diagnostic, no genmlx code: per-particle keys, choice i's key = key + (0, i·φ)
    (one add per choice; genmlx's scheme for sites without a noise transform)."""

    def site_key(k, i):
        return k + mx.array([0, (i * 0x9E3779B9) & 0xFFFFFFFF], dtype=mx.uint32)

    return _vmap_keys_variant(xs, ys, n, site_key)


def vmap_lik_log_weights(xs, ys, n: int, per_particle_shape: tuple = (), mu_first: bool = False):
    """Diagnostic: batched draws from one key (as by hand), likelihood under ``mx.vmap``.
    With ``per_particle_shape=(1,)`` each particle's a, b, c have shape (1,) instead of
    () — the layout MLX's vmap handles without transposes; ``mu_first`` as in
    :func:`_loglik_one` (what proposals (a) + (b) in RESULTS.md would give genmlx)."""

    @mx.compile
    def f(key):
        ka, kb, kc = mx.random.split(key, 3)
        shape = (n,) + per_particle_shape
        a, b, c = (mx.contiguous(mx.random.normal(shape, key=kk)) for kk in (ka, kb, kc))
        return mx.vmap(lambda a, b, c: _loglik_one(a, b, c, xs, ys, mu_first))(a, b, c)

    return f


VARIANTS = {
    "genmlx": genmlx_log_weights,
    "hand": hand_log_weights,
    "hand_hoisted": hand_hoisted_log_weights,
    "vmap_split_keys": vmap_split_keys_log_weights,
    "vmap_added_keys": vmap_added_keys_log_weights,
    "vmap_lik": vmap_lik_log_weights,
    "vmap_lik_1": lambda xs, ys, n: vmap_lik_log_weights(xs, ys, n, (1,)),
    "vmap_lik_mu_first": lambda xs, ys, n: vmap_lik_log_weights(xs, ys, n, mu_first=True),
}
DIAGNOSTICS = {
    "hand_hoisted": "hand-written, −½Σz² and normaliser once per particle",
    "vmap_split_keys": "mx.vmap, key split per choice",
    "vmap_added_keys": "mx.vmap, key + constant per choice",
    "vmap_lik": "batched draws, mx.vmap likelihood",
    "vmap_lik_1": "same, particle values shaped (1,)",
    "vmap_lik_mu_first": "batched draws, mx.vmap likelihood as (μ − x)/σ",
}


def check_agree(xs, ys, n: int = 2000) -> float:
    """genmlx's log-weights equal the hand formula on genmlx's own particles (sanity)."""
    tr, w = quadratic.vgenerate(mx.random.key(1), (xs,), gm.choicemap({"ys": ys}), n)
    a, b, c = (tr[k][:, None] for k in "abc")
    z = (ys - (a + b * xs + c * xs**2)) / SIGMA
    w_hand = mx.sum(-0.5 * z * z, axis=1) + N_DATA * LOG_NORM
    return mx.max(mx.abs(w - w_hand) / (1 + mx.abs(w_hand))).item()


def run_peers(python: str, ns, repeats: int) -> dict:
    """Timings of the JAX / NumPyro peers (benchmarks/peers/is_jax.py) in their own process."""
    import json
    import os
    import subprocess

    script = Path(__file__).resolve().parent / "peers" / "is_jax.py"
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run([python, str(script), ",".join(map(str, ns)), str(repeats)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        print("peer run failed:", out.stderr[-2000:])
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="time only genmlx and the hand-written version")
    ap.add_argument("--append-results", action="store_true",
                    help="append a section to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="note for the results section")
    ap.add_argument("--jax-python", default=None,
                    help="python of an environment with JAX/NumPyro: adds peer columns")
    args = ap.parse_args()

    xs, ys = make_data(mx.random.key(0))
    err = check_agree(xs, ys)
    print(gm.describe_blas())
    print(f"max relative difference of genmlx vs hand log-weights on the same particles: {err:.1e}")
    assert err < 1e-5, "genmlx and hand-written log-weights disagree"

    names = ["genmlx", "hand"] + ([] if args.no_diagnostics else list(DIAGNOSTICS))
    rows, diag_rows, genmlx_median = [], [], {}
    key = mx.random.key(42)
    for n in args.ns:
        fns = {name: VARIANTS[name](xs, ys, n) for name in names}
        reps = args.repeats if n >= 10**5 else 3 * args.repeats
        tm = timeit_interleaved(fns, key, repeats=reps, min_total=0.3)
        mem = {name: peak_memory(fn, key) for name, fn in fns.items()}
        g, h = tm["genmlx"], tm["hand"]
        genmlx_median[n] = g.median
        n_s = f"1e{round(math.log10(n))}" if n == 10 ** round(math.log10(n)) else str(n)
        rows.append([n_s, fmt_seconds(g.median), fmt_seconds(h.median), f"{g.median / h.median:.2f}",
                     f"{g.min / h.min:.2f}", fmt_bytes(mem["genmlx"]), fmt_bytes(mem["hand"]),
                     f"{mem['genmlx'] / mem['hand']:.2f}"])
        line = f"n={n:>8d}  " + "  ".join(
            f"{k} {fmt_seconds(v.median)} ({fmt_bytes(mem[k])})" for k, v in tm.items())
        print(line, flush=True)
        if not args.no_diagnostics:
            diag_rows.append([n_s] + [f"{tm[k].median / h.median:.2f} / {mem[k] / mem['hand']:.2f}"
                                      for k in ["genmlx", *DIAGNOSTICS]])

    header = ["n", "genmlx vgenerate", "hand-written MLX", "time ratio (median)", "time ratio (min)",
              "peak mem genmlx", "peak mem hand", "mem ratio"]
    if args.jax_python:
        peers = run_peers(args.jax_python, args.ns, args.repeats)
        header += ["hand-written JAX (jit)", "genmlx / JAX", "NumPyro (jit, vmap)", "genmlx / NumPyro"]
        for row, n in zip(rows, args.ns):
            g = genmlx_median[n]
            for name in ("hand", "numpyro"):
                t = peers.get(name, {}).get(str(n))
                if isinstance(t, (int, float)):
                    row += [fmt_seconds(t), f"{g / t:.2f}"]
                else:
                    row += [str(t), "—"]
        print("peers:", peers.get("device"), "jax", peers.get("jax"))
    table = markdown_table(header, rows)
    print("\n" + table)
    diag = ""
    if diag_rows:
        diag = markdown_table(["n", "genmlx", *DIAGNOSTICS.values()], diag_rows)
        print("time / peak-memory ratios to hand-written:\n" + diag)
    if args.append_results:
        body = ("Bayesian quadratic regression, 50 points; compiled `vgenerate` log-weights "
                "vs the same log-weights hand-written in MLX (compiled, batched); median time "
                "per call (eval included; runs interleaved) and peak MLX memory of one call. "
                "Target: time ratio ≤ 1.2.\n\n" + table)
        if diag:
            body += ("\nDiagnostics — time / peak-memory ratio to hand-written of the same "
                     "log-weights computed with plain `mx.vmap` (no genmlx code):\n\n" + diag)
        append_results("Issue 2: vectorized importance sampling (bench_is.py)", body, args.note)


if __name__ == "__main__":
    main()
