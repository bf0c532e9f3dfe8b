"""Training-step throughput of an image experiment at several batch sizes.

For each batch size B the experiment's compiled train step (the harness's own
``make_train_step``) runs ``--steps`` times on real batches in two host loops:

- ``sync``: the harness's pre-pipelining loop — evaluate every step and read its
  metrics before building the next one (the host waits for the device each step);
- ``async``: dispatch step t+1 with ``mx.async_eval`` before reading step t's metrics.

It prints one JSON line per (B, loop) with steps/s and images/s, and writes them all to
``--out``. On a GPU a step is launch bound at small B (the device idles), so images/s grows
with B at almost constant steps/s until the device saturates: that knee is the batch size
to train at. Example (GPU machine)::

    python experiments/iwae/probe_throughput.py experiments/mnist_iwae.toml \
        --batch 100 250 500 1000 --steps 300 --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import genmlx  # noqa: F401  (loads the BLAS before mlx.core)
import mlx.core as mx

from genmlx.harness.config import load_config
from genmlx.harness.step import build_optimizer, make_train_step, step_key
from genmlx.harness.zoo import build_task


def measure(config: str, batch: int, steps: int, overrides: list[str]) -> list[dict]:
    cfg = load_config(config, [f"data.batch_size={batch}", *overrides])
    task = build_task(cfg)
    module = task.objective.trainable()
    opt = build_optimizer(cfg.optim, task.data.batches_per_epoch)
    opt.init(module.trainable_parameters())
    step_fn = make_train_step(task.objective, opt, compile=True)
    batches = task.data.batches(cfg.seed, 0)

    def inputs(t):
        kd, ko = mx.random.split(step_key(cfg.seed, t))
        return ko, task.data.prepare(kd, next(batches))

    def per_step(m):  # what the harness evaluates every step (other metrics: logging steps only)
        return [m["loss"], m["grad_norm"], module.state, opt.state]

    for t in range(10):  # compile + warm up
        mx.eval(step_fn(*inputs(t)))
    out = []
    # sync loop
    t0 = time.perf_counter()
    for t in range(steps):
        m = step_fn(*inputs(t))
        mx.eval(per_step(m))
        float(m["loss"])
    dt = time.perf_counter() - t0
    out.append({"batch": batch, "loop": "sync", "steps_per_s": steps / dt, "images_per_s": steps * batch / dt})
    # async loop: dispatch step t+1 before reading step t
    t0 = time.perf_counter()
    prev = step_fn(*inputs(0))
    mx.async_eval(per_step(prev))
    for t in range(1, steps):
        cur = step_fn(*inputs(t))
        mx.async_eval(per_step(cur))
        float(prev["loss"])
        prev = cur
    float(prev["loss"])
    dt = time.perf_counter() - t0
    out.append({"batch": batch, "loop": "async", "steps_per_s": steps / dt, "images_per_s": steps * batch / dt})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 250, 500, 1000])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    a = ap.parse_args(argv)
    rows = []
    for b in a.batch:
        for r in measure(a.config, b, a.steps, a.set):
            r["device"] = str(mx.default_device())
            print(json.dumps(r), flush=True)
            rows.append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
