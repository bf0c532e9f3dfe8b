"""ELBO-gradient step of an MNIST VAE: genmlx objective vs the same step by hand in MLX.

Architecture (Kingma & Welling's MNIST VAE): encoder 784-200-(2×10) with tanh, giving
the mean and (softplus) scale of q(z | x) = N(μ(x), diag σ(x)²); decoder 10-200-784 with
tanh, giving Bernoulli logits; prior z ~ N(0, I₁₀). One step = a single-sample
reparameterized ELBO estimate for a batch, its gradient, and an Adam update:

    ELBO(x) ≈ log p(x | z) + log p(z) − log q(z | x),   z = μ(x) + σ(x) ε.

* genmlx: ``gm.amortized.make_train_step(gm.amortized.ELBO(model, guide), Adam)`` — the
  model and guide are ``@gm.gen`` functions calling ``NeuralNetGF``s; the batch × 1
  particle computation is vmapped over the data;
* by hand: the same architecture and initial parameters with MLX's ``nn.Linear``, the
  arithmetic written directly on [B, ·] arrays.

Both are one ``mx.compile``d function with parameters and optimizer state declared and
the PRNG key as an input. Data: random binary images (timing only). Reports median step
time at batch 64 … 1024 and the genmlx / hand-written ratio (target ≤ 1.1): the ratio of
the medians, the median of the per-round ratios of the interleaved runs (robust to load
drift on a shared machine) and the ratio of the minima. ``--numpyro-python PY`` also
times the same step in NumPyro + Flax (SVI, Trace_ELBO, jitted) in that Python's venv;
``--pyro-python PY`` in Pyro (SVI, Trace_ELBO and JitTrace_ELBO, Adam, 2 torch threads;
``bench_vae_pyro.py``) in that one.

``--objective iwae --particles 50 --hidden 200 200 --latent 50`` times the IWAE(k) step
of the IWAE paper's architecture instead (hand-written: the same bound on [B, K, ·] arrays
with ``mx.logsumexp``). ``benchmarks/graph_ops.py`` counts the primitives of both steps.

Run: ``.venv/bin/python benchmarks/bench_vae.py [--append-results] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if "--numpyro-worker" not in sys.argv:  # the NumPyro worker runs in its own venv, without MLX
    import genmlx as gm  # noqa: E402  (before mlx.core: fast BLAS)
    import mlx.core as mx  # noqa: E402
    import mlx.nn as nn  # noqa: E402
    import mlx.optimizers as optim  # noqa: E402

    from benchmarks._timing import (  # noqa: E402
        append_results, fmt_seconds, markdown_table, timeit_interleaved,
    )

X_DIM, H, Z = 784, 200, 10
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Encoder(nn.Module if "--numpyro-worker" not in sys.argv else object):
    def __init__(self, hidden=(H,), latent=Z):
        super().__init__()
        self.body = gm.nn.mlp([X_DIM, *hidden], "tanh", out_activation="tanh")
        self.head = gm.nn.GaussianHead(hidden[-1], latent)

    def __call__(self, x):
        return self.head(self.body(x))


def make_modules(seed: int, hidden=(H,), latent: int = Z):
    """(encoder, decoder): X_DIM-hidden-(2×latent) and latent-reversed(hidden)-X_DIM."""
    mx.random.seed(seed)  # parameter initialisation only (MLX's initialisers use it)
    enc = Encoder(tuple(hidden), latent)
    dec = gm.nn.mlp([latent, *reversed(tuple(hidden)), X_DIM], "tanh")
    mx.eval(enc.parameters(), dec.parameters())
    return enc, dec


def genmlx_step(enc, dec, objective: str = "elbo", K: int = 1):
    """The genmlx step: ``objective`` "elbo" (K particles) or "iwae" (K particles) of
    the VAE written as ``@gm.gen`` model and guide around ``NeuralNetGF``s."""
    encoder, decoder = gm.nn.NeuralNetGF(enc), gm.nn.NeuralNetGF(dec)
    latent = enc.head.mean.weight.shape[0]

    @gm.gen
    def model():
        z = gm.normal(mx.zeros(latent), 1.0) @ "z"
        logits = decoder(z) @ "dec"
        return gm.bernoulli(logits=logits) @ "x"

    @gm.gen
    def guide(x):
        mu, sigma = encoder(x) @ "enc"
        return gm.normal(mu, sigma) @ "z"

    if objective == "elbo":
        obj = gm.amortized.ELBO(model, guide, num_particles=K)
    elif objective == "iwae":
        obj = gm.amortized.IWAE(model, guide, K=K)
    else:
        raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")
    return gm.amortized.make_train_step(obj, optim.Adam(learning_rate=1e-3))


def standard_linear(module: nn.Module) -> nn.Module:
    """The same module with MLX's own ``nn.Linear`` (addmm) layers, as a hand-written
    MLX VAE would have them (fast there: no vmap)."""
    for m in module.modules():
        if type(m) is gm.nn.Linear:
            m.__class__ = nn.Linear
    return module


def _handwritten(enc, dec, loss_fn):
    enc, dec = standard_linear(enc), standard_linear(dec)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = enc, dec

    params = Both()
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(params.trainable_parameters())
    lg = nn.value_and_grad(params, partial(loss_fn, enc, dec))
    state = [params.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(key, x):
        loss, grads = lg(key, x)
        opt.update(params, grads)
        return loss

    return step


def _elbo_loss(enc, dec, key, x):
    mu, sigma = enc(x)
    eps = mx.random.normal(mu.shape, key=key)
    z = mu + sigma * eps
    logits = dec(z)
    log_px = mx.sum(x * logits - nn.softplus(logits), axis=-1)
    log_pz = mx.sum(-0.5 * z * z - HALF_LOG_2PI, axis=-1)
    log_qz = mx.sum(-0.5 * eps * eps - mx.log(sigma) - HALF_LOG_2PI, axis=-1)
    return -mx.mean(log_px + log_pz - log_qz)


def _iwae_loss(K, enc, dec, key, x):
    """−mean_b log (1/K) Σ_k w_bk, z_bk = μ(x_b) + σ(x_b) ε_bk (pathwise gradients)."""
    mu, sigma = enc(x)                                        # [B, L]
    eps = mx.random.normal((x.shape[0], K, mu.shape[-1]), key=key)
    z = mu[:, None] + sigma[:, None] * eps                    # [B, K, L]
    logits = dec(z)                                           # [B, K, D]
    log_px = mx.sum(x[:, None] * logits - nn.softplus(logits), axis=-1)
    log_pz = mx.sum(-0.5 * z * z - HALF_LOG_2PI, axis=-1)
    log_qz = mx.sum(-0.5 * eps * eps - HALF_LOG_2PI, axis=-1) - mx.sum(mx.log(sigma), axis=-1)[:, None]
    return -mx.mean(mx.logsumexp(log_px + log_pz - log_qz, axis=-1) - math.log(K))


def handwritten_step(enc, dec, objective: str = "elbo", K: int = 1):
    """The same step written directly on [B, ·] (ELBO, one particle) or [B, K, ·]
    (IWAE) arrays with MLX's ``nn.Linear``."""
    if objective == "elbo":
        if K != 1:
            raise ValueError("the hand-written ELBO step has one particle (K = 1)")
        return _handwritten(enc, dec, _elbo_loss)
    if objective == "iwae":
        return _handwritten(enc, dec, partial(_iwae_loss, K))
    raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")


def numpyro_worker(batches: list[int], repeats: int) -> None:
    """The same VAE step in NumPyro (SVI, Trace_ELBO, Flax modules, Adam), jitted; prints
    JSON {batch: median seconds}. Runs under the NumPyro venv's Python."""
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.contrib.module import flax_module
    from numpyro.infer import SVI, Trace_ELBO

    class Enc(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = jnp.tanh(fnn.Dense(H)(x))
            return fnn.Dense(Z)(h), jax.nn.softplus(fnn.Dense(Z)(h)) + 1e-4

    class Dec(fnn.Module):
        @fnn.compact
        def __call__(self, z):
            return fnn.Dense(X_DIM)(jnp.tanh(fnn.Dense(H)(z)))

    def model(x):
        dec = flax_module("dec", Dec(), input_shape=(1, Z))
        with numpyro.plate("batch", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(Z), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        enc = flax_module("enc", Enc(), input_shape=(1, X_DIM))
        m, s = enc(x)
        with numpyro.plate("batch", x.shape[0]):
            numpyro.sample("z", dist.Normal(m, s).to_event(1))

    out = {}
    for B in batches:
        x = (jax.random.uniform(jax.random.PRNGKey(B), (B, X_DIM)) < 0.3).astype(jnp.float32)
        svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
        state = svi.init(jax.random.PRNGKey(0), x)
        update = jax.jit(svi.update)
        for _ in range(3):
            state, loss = update(state, x)
        loss.block_until_ready()
        times = []
        while len(times) < repeats or sum(times) < 0.5:
            t0 = time.perf_counter()
            state, loss = update(state, x)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        out[B] = statistics.median(times)
    print(json.dumps(out))


def numpyro_times(python: str, batches: list[int], repeats: int) -> dict[int, float]:
    cmd = [python, __file__, "--numpyro-worker", "--repeats", str(repeats), "--batches", *map(str, batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def pyro_times(python: str, batches: list[int], repeats: int) -> dict[str, dict[int, float]]:
    """Median Pyro step times {"trace_elbo" | "jit_trace_elbo": {batch: s}} from
    ``bench_vae_pyro.py`` run by ``python`` (a venv with torch and pyro-ppl)."""
    script = Path(__file__).resolve().parent / "bench_vae_pyro.py"
    cmd = [python, str(script), "--repeats", str(repeats), "--batches", *map(str, batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"Pyro worker: {out.pop('versions')}", flush=True)
    return {name: {int(k): v for k, v in t.items()} for name, t in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--numpyro-python", default=None,
                    help="Python of a venv with jax, numpyro, flax: also time the NumPyro step")
    ap.add_argument("--pyro-python", default=None,
                    help="Python of a venv with torch and pyro-ppl: also time the Pyro step")
    ap.add_argument("--note", default="", help="extra note for the results section")
    ap.add_argument("--objective", choices=["elbo", "iwae"], default="elbo",
                    help="iwae: the IWAE(k) step (use with --particles, --hidden, --latent; "
                         "MLX only, no NumPyro/Pyro)")
    ap.add_argument("--particles", type=int, default=1, help="K (IWAE)")
    ap.add_argument("--hidden", type=int, nargs="*", default=[H])
    ap.add_argument("--latent", type=int, default=Z)
    ap.add_argument("--numpyro-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.numpyro_worker:
        numpyro_worker(args.batches, args.repeats)
        return
    arch = (tuple(args.hidden), args.latent)
    if args.objective == "iwae" and (args.numpyro_python or args.pyro_python):
        ap.error("--numpyro-python/--pyro-python time the ELBO step only")

    g_step = genmlx_step(*make_modules(0, *arch), args.objective, args.particles)
    h_step = handwritten_step(*make_modules(0, *arch), args.objective, args.particles)
    keys = iter(mx.random.split(mx.random.key(0), 100000))
    rows = []
    for B in args.batches:
        x = (mx.random.uniform(shape=(B, X_DIM), key=mx.random.key(B)) < 0.3).astype(mx.float32)
        mx.eval(x)
        fns = {"genmlx": lambda x: g_step(next(keys), x)["loss"],
               "mlx": lambda x: h_step(next(keys), x)}
        t = timeit_interleaved(fns, x, warmup=3, repeats=args.repeats, min_total=0.5)
        ratio = t["genmlx"].median / t["mlx"].median
        paired = statistics.median(a / b for a, b in zip(t["genmlx"].times, t["mlx"].times))
        rows.append([B, fmt_seconds(t["genmlx"].median), fmt_seconds(t["mlx"].median),
                     f"{ratio:.2f}", f"{paired:.2f}", f"{t['genmlx'].min / t['mlx'].min:.2f}"])
        print(f"B={B:5d}  genmlx {t['genmlx']}  mlx {t['mlx']}  ratio {ratio:.2f} paired {paired:.2f}", flush=True)
    header = ["batch", "genmlx step", "hand-written MLX step", "ratio of medians",
              "median of paired ratios", "ratio of minima"]
    if args.numpyro_python:
        np_t = numpyro_times(args.numpyro_python, args.batches, args.repeats)
        for r, B in zip(rows, args.batches):
            r.append(fmt_seconds(np_t[B]))
        header.append("NumPyro+Flax step (jit)")
    if args.pyro_python:
        py_t = pyro_times(args.pyro_python, args.batches, args.repeats)
        for r, B in zip(rows, args.batches):
            r += [fmt_seconds(py_t["trace_elbo"][B]), fmt_seconds(py_t["jit_trace_elbo"][B])]
        header += ["Pyro step (Trace_ELBO)", "Pyro step (JitTrace_ELBO)"]
    body = markdown_table(header, rows)
    print(body)
    if args.append_results:
        others = [n for n, a in (("NumPyro", args.numpyro_python), ("Pyro", args.pyro_python)) if a]
        title = ("VAE ELBO-gradient step (issue 5): genmlx vs hand-written MLX" if args.objective == "elbo"
                 else f"IWAE k={args.particles} step ({X_DIM}-{'-'.join(map(str, args.hidden))}-2x{args.latent}): "
                      "genmlx vs hand-written MLX")
        append_results(
            title + "".join(f", {n}" for n in others), body,
            note=(f"MNIST VAE {X_DIM}-{'-'.join(map(str, args.hidden))}-(2x{args.latent}), tanh, "
                  + ("single-sample reparameterized ELBO" if args.objective == "elbo"
                     else f"IWAE bound with k={args.particles}")
                  + " + Adam, random binary data; both compiled with state and key as input. ")
                 + "Shared 2-core machine: absolute times are noisy, ratios come from interleaved runs."
                 + (" NumPyro/Pyro run after the MLX rounds, each in its own venv and process."
                    if others else "") + (f" {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
