"""Peer timings for bench_is.py, run in an environment with JAX (and NumPyro).

Same model and data as bench_is.py: a, b, c ~ N(0, 1), y_i ~ N(a + b x_i + c x_i², 0.3²),
50 points; importance log-weights with the prior as proposal. Two peers, each jitted with
the PRNG key as input and timed after warm-up with ``block_until_ready`` inside the timed
region: hand-written JAX, and NumPyro (``numpyro.infer.util.log_likelihood``-style: the
model's log density of the data, vmapped over prior draws from ``Predictive``-free
``numpyro.handlers``). Prints one JSON object {name: {n: median_seconds}}.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

SIGMA = 0.3


def data():
    xs = jnp.linspace(-1.0, 1.0, 50)
    ys = 0.5 + 1.0 * xs - 0.7 * xs**2 + SIGMA * jax.random.normal(jax.random.PRNGKey(0), (50,))
    return xs, ys


def hand(n, xs, ys):
    c0 = -math.log(SIGMA) - 0.5 * math.log(2 * math.pi)

    @jax.jit
    def f(key):
        ka, kb, kc = jax.random.split(key, 3)
        a = jax.random.normal(ka, (n, 1))
        b = jax.random.normal(kb, (n, 1))
        c = jax.random.normal(kc, (n, 1))
        z = (a + b * xs + c * xs**2 - ys) / SIGMA
        return jnp.sum(-0.5 * z * z + c0, axis=1)

    return f


def numpyro_fn(n, xs, ys):
    import numpyro
    import numpyro.distributions as dist
    from numpyro import handlers

    def model(xs, ys=None):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        c = numpyro.sample("c", dist.Normal(0.0, 1.0))
        numpyro.sample("ys", dist.Normal(a + b * xs + c * xs**2, SIGMA), obs=ys)

    def one(key):
        tr = handlers.trace(handlers.seed(model, key)).get_trace(xs, ys)
        return tr["ys"]["fn"].log_prob(tr["ys"]["value"]).sum()

    @jax.jit
    def f(key):
        return jax.vmap(one)(jax.random.split(key, n))

    return f


def time_fn(f, repeats):
    key = jax.random.PRNGKey(1)
    f(key).block_until_ready()
    ts = []
    for i in range(repeats):
        k = jax.random.PRNGKey(100 + i)
        t = time.perf_counter()
        f(k).block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ns = [int(a) for a in sys.argv[1].split(",")]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    xs, ys = data()
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "hand": {}, "numpyro": {}}
    for n in ns:
        out["hand"][n] = time_fn(hand(n, xs, ys), repeats)
        try:
            out["numpyro"][n] = time_fn(numpyro_fn(n, xs, ys), repeats)
        except Exception as e:  # noqa: BLE001 - report, keep the other peer's numbers
            out["numpyro"][n] = f"failed: {type(e).__name__}: {e}"[:200]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
