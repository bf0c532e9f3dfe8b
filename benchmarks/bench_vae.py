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
time at batch 64 … 1024 and the genmlx / hand-written ratio (target ≤ 1.1).

Run: ``.venv/bin/python benchmarks/bench_vae.py [--append-results] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genmlx as gm  # noqa: E402  (before mlx.core: fast BLAS)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from benchmarks._timing import append_results, fmt_seconds, markdown_table, timeit_interleaved  # noqa: E402

X_DIM, H, Z = 784, 200, 10
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = gm.nn.mlp([X_DIM, H], "tanh", out_activation="tanh")
        self.head = gm.nn.GaussianHead(H, Z)

    def __call__(self, x):
        return self.head(self.body(x))


def make_modules(seed: int):
    mx.random.seed(seed)  # parameter initialisation only (MLX's initialisers use it)
    enc, dec = Encoder(), gm.nn.mlp([Z, H, X_DIM], "tanh")
    mx.eval(enc.parameters(), dec.parameters())
    return enc, dec


def genmlx_step(enc, dec):
    encoder, decoder = gm.nn.NeuralNetGF(enc), gm.nn.NeuralNetGF(dec)

    @gm.gen
    def model():
        z = gm.normal(mx.zeros(Z), 1.0) @ "z"
        logits = decoder(z) @ "dec"
        return gm.bernoulli(logits=logits) @ "x"

    @gm.gen
    def guide(x):
        mu, sigma = encoder(x) @ "enc"
        return gm.normal(mu, sigma) @ "z"

    obj = gm.amortized.ELBO(model, guide)
    return gm.amortized.make_train_step(obj, optim.Adam(learning_rate=1e-3))


def standard_linear(module: nn.Module) -> nn.Module:
    """The same module with MLX's own ``nn.Linear`` (addmm) layers, as a hand-written
    MLX VAE would have them (fast there: no vmap)."""
    for m in module.modules():
        if type(m) is gm.nn.Linear:
            m.__class__ = nn.Linear
    return module


def handwritten_step(enc, dec):
    enc, dec = standard_linear(enc), standard_linear(dec)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = enc, dec

    params = Both()
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(params.trainable_parameters())

    def loss_fn(key, x):
        mu, sigma = enc(x)
        eps = mx.random.normal(mu.shape, key=key)
        z = mu + sigma * eps
        logits = dec(z)
        log_px = mx.sum(x * logits - nn.softplus(logits), axis=-1)
        log_pz = mx.sum(-0.5 * z * z - HALF_LOG_2PI, axis=-1)
        log_qz = mx.sum(-0.5 * eps * eps - mx.log(sigma) - HALF_LOG_2PI, axis=-1)
        return -mx.mean(log_px + log_pz - log_qz)

    lg = nn.value_and_grad(params, loss_fn)
    state = [params.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(key, x):
        loss, grads = lg(key, x)
        opt.update(params, grads)
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    args = ap.parse_args()

    g_step = genmlx_step(*make_modules(0))
    h_step = handwritten_step(*make_modules(0))
    keys = iter(mx.random.split(mx.random.key(0), 100000))
    rows = []
    for B in args.batches:
        x = (mx.random.uniform(shape=(B, X_DIM), key=mx.random.key(B)) < 0.3).astype(mx.float32)
        mx.eval(x)
        fns = {"genmlx": lambda x: g_step(next(keys), x)["loss"],
               "mlx": lambda x: h_step(next(keys), x)}
        t = timeit_interleaved(fns, x, warmup=3, repeats=args.repeats, min_total=0.5)
        ratio = t["genmlx"].median / t["mlx"].median
        rows.append([B, fmt_seconds(t["genmlx"].median), fmt_seconds(t["mlx"].median), f"{ratio:.2f}"])
        print(f"B={B:5d}  genmlx {t['genmlx']}  mlx {t['mlx']}  ratio {ratio:.2f}", flush=True)
    body = markdown_table(["batch", "genmlx step", "hand-written MLX step", "ratio"], rows)
    print(body)
    if args.append_results:
        append_results(
            "VAE ELBO-gradient step (issue 5): genmlx vs hand-written MLX", body,
            note="MNIST VAE 784-200-(2x10) / 10-200-784, tanh, single-sample reparameterized "
                 "ELBO + Adam, random binary data; both compiled with state and key as input. "
                 "Shared 2-core machine: absolute times are noisy, ratios come from interleaved runs.")


if __name__ == "__main__":
    main()
