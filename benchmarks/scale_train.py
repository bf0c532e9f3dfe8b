"""Data-parallel training throughput (images/s) of the MNIST IWAE on 1 vs N processes.

The step is the harness's (``genmlx train``): the compiled amortized train step with the
gradients (and loss, metrics) averaged over processes by one ``all_sum`` inside it
(``grad_reduce = genmlx.distributed.all_mean``), each process training on its B/N rows of
the global batch B, steps pipelined as in ``runner.train`` (step t+1 dispatched before
step t's loss is read). Reported: global images/s = steps·B / wall time after
``--warmup`` untimed steps (compilation), the speedup over one process at the same
global batch B (strong scaling) and over one process at the same per-process batch B/N
(weak scaling: list both B and B/N in ``--batch``); the data-parallel target is ≥ 1.8× on
2 GPUs. A launch-bound step (small batches on a GPU) cannot gain from splitting its batch,
and each step's all-reduce adds its latency: scaling needs per-device work that dominates.

On a host with 2 GPUs (MLX CUDA build, NCCL), from the repository root::

    NCCL_NVLS_ENABLE=0 GENMLX_DATA=../shared/data \\
        .venv/bin/python benchmarks/scale_train.py --procs 1,2 --batch 64,256,1024,4096 --append

The script runs the 1-process measurement as ``python benchmarks/scale_train.py --worker``
with ``CUDA_VISIBLE_DEVICES=0``, and the N-process one as::

    mlx.launch -n N --backend nccl --env NCCL_NVLS_ENABLE=0 --python <python> \\
        benchmarks/scale_train.py --worker ...

GPU mapping: for ``--backend nccl`` on one host, ``mlx.launch`` itself exports
``CUDA_VISIBLE_DEVICES=<rank mod n>`` to each rank (MLX 0.32 ``mlx/_distributed_utils/
launch.py``), so rank r sees exactly GPU r as its device 0; a CUDA_VISIBLE_DEVICES set by
the caller is overridden for the ranks (do not rely on it to pick GPUs). Without CUDA the
backend is ``ring`` over 127.0.0.1 (what the CPU test machine can run: there the "devices"
are processes sharing the same cores, so no speedup is expected). ``--backend`` overrides.

``--pipeline-ab`` instead measures the train loop itself on one process:
``genmlx.harness.runner.train`` with ``train.pipeline`` true vs false (interleaved, ``--reps``
each), steady-state steps/s between the middle and the last logged step (compilation
excluded), no validation, checkpoints or TensorBoard in between::

    .venv/bin/python benchmarks/scale_train.py --pipeline-ab --config experiments/digits_vae.toml --steps 400

Options: ``--config`` (default experiments/mnist_iwae.toml; experiments/digits_vae.toml
needs no data files), ``--steps``/``--warmup`` per batch size, ``--set key=value`` config
overrides, ``--append`` adds a section to benchmarks/RESULTS.md, ``--note`` text for it.
Prints one JSON object (all measurements and speedups).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genmlx  # noqa: E402,F401  (fast BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# -- one process of a measurement -----------------------------------------------------------------
def measure(config: str, batch: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    """Global images/s of ``steps`` pipelined data-parallel train steps at global batch
    ``batch`` in this process group (rank 0's wall time between two barriers)."""
    from genmlx import distributed as dist
    from genmlx.harness.config import load_config
    from genmlx.harness.step import build_optimizer, make_train_step, step_key
    from genmlx.harness.zoo import build_task

    R, N = dist.rank(), dist.size()
    cfg = load_config(config, [*overrides, f"data.batch_size={batch}"])
    task = build_task(cfg)
    module = task.objective.trainable()
    optimizer = build_optimizer(cfg.optim, task.data.batches_per_epoch)
    optimizer.init(module.trainable_parameters())
    step_fn = make_train_step(task.objective, optimizer, compile=True, grad_reduce=dist.all_mean if N > 1 else None)
    batches = task.data.batches(cfg.seed, 0)

    def dispatch(s: int):
        kd, ko = mx.random.split(step_key(cfg.seed, s))
        data = task.data.prepare_shard(kd, next(batches), R, N)
        m = step_fn(dist.fold_rank(ko, R, N), data)
        mx.async_eval(m, module.state, optimizer.state)
        return m

    for s in range(warmup):
        mx.eval(dispatch(s))
    dist.barrier()
    t0 = time.perf_counter()
    prev = dispatch(warmup)
    for s in range(warmup + 1, warmup + steps):
        cur = dispatch(s)
        float(prev["loss"])
        prev = cur
    loss = float(prev["loss"])
    mx.eval(module.state, optimizer.state)
    dt = time.perf_counter() - t0
    dist.barrier()
    return {"procs": N, "batch": batch, "per_process_batch": batch // N, "steps": steps, "seconds": dt,
            "images_per_s": steps * batch / dt, "step_ms": 1e3 * dt / steps, "last_loss": loss,
            "device": str(mx.default_device())}


def worker(a) -> None:
    from genmlx import distributed as dist

    rows = [measure(a.config, b, a.steps, a.warmup, a.set) for b in a.batch]
    if dist.is_main():
        Path(a.out).write_text(json.dumps(rows))


# -- the train loop: pipelined vs not ---------------------------------------------------------------
def pipeline_ab(config: str, steps: int, reps: int, overrides: list[str]) -> dict:
    """Median steady-state steps/s of ``runner.train`` with ``train.pipeline`` on and off."""
    import statistics

    from genmlx.harness.config import load_config
    from genmlx.harness.runner import train

    half = steps // 2
    ov = [*overrides, f"train.steps={steps}", f"log.every_steps={half}", f"log.eval_every_steps={10 * steps}",
          f"checkpoint.every_steps={10 * steps}", f"log.histogram_every_steps={10 * steps}", "log.tensorboard=false",
          "log.progress=off", "log.images=false"]
    rates: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            for pipe in (True, False):
                cfg = load_config(config, [*ov, f"train.pipeline={str(pipe).lower()}"])
                run = Path(tmp) / f"r{i}{pipe}"
                train(cfg, run, resume=False, final_eval=False, echo=lambda *a: None)
                recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                        if '"train/steps_per_s"' in line]
                (s1, r1), (s2, r2) = [(r["step"], r["train/steps_per_s"]) for r in recs[-2:]]
                rates[pipe].append((s2 - s1) / (s2 / r2 - s1 / r1))
                print(f"rep {i} pipeline={pipe}: {rates[pipe][-1]:.1f} steps/s", file=sys.stderr, flush=True)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    paired = statistics.median(a / b for a, b in zip(rates[True], rates[False]))
    return {"benchmark": "pipeline_ab", "config": config, "overrides": overrides, "steps": steps, "reps": reps,
            "steps_per_s_pipelined": on, "steps_per_s_unpipelined": off, "gain": on / off, "gain_paired_median": paired,
            "all_pipelined": rates[True], "all_unpipelined": rates[False], "device": str(mx.default_device())}


# -- the driver -------------------------------------------------------------------------------------
def _free_port(n: int) -> int:
    for _ in range(200):
        p = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the ring backend")


def launch_command(n: int, backend: str, worker_args: list[str]) -> tuple[list[str], dict]:
    """(argv, env) running this script's worker in ``n`` processes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    me = [str(Path(__file__).resolve()), "--worker", *worker_args]
    if n == 1:
        if backend == "nccl":
            env["CUDA_VISIBLE_DEVICES"] = "0"
        return [sys.executable, *me], env
    launcher = Path(sys.executable).parent / "mlx.launch"
    launcher = str(launcher) if launcher.exists() else (shutil.which("mlx.launch") or "mlx.launch")
    argv = [launcher, "-n", str(n), "--backend", backend]
    if backend == "ring":
        argv += ["-p", str(_free_port(n))]
    if backend == "nccl":
        argv += ["--env", f"NCCL_NVLS_ENABLE={env.get('NCCL_NVLS_ENABLE', '0')}"]
    return [*argv, "--python", sys.executable, *me], env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--batch", default="64,256,1024", help="comma-separated global batch sizes")
    p.add_argument("--config", default=str(REPO / "experiments" / "mnist_iwae.toml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--backend", default=None, help="nccl (default with CUDA), ring (default otherwise) or mpi")
    p.add_argument("--set", action="append", default=[], help="config override key.path=value (repeatable)")
    p.add_argument("--append", action="store_true", help="append a section to benchmarks/RESULTS.md")
    p.add_argument("--note", default="")
    p.add_argument("--pipeline-ab", action="store_true", help="measure the pipelined vs unpipelined train loop (1 process)")
    p.add_argument("--reps", type=int, default=3, help="--pipeline-ab: runs of each variant")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch = [int(b) for b in str(a.batch).split(",")]
    if a.worker:
        worker(a)
        return 0
    if a.pipeline_ab:
        res = pipeline_ab(a.config, a.steps, a.reps, a.set)
        print(json.dumps(res, indent=1))
        if a.append:
            from benchmarks._timing import append_results

            body = (f"`runner.train` on `{Path(a.config).name}` ({' '.join(a.set)}), {a.steps} steps, one process, "
                    f"device {res['device']}; steady-state steps/s (median of {a.reps} interleaved runs): pipelined "
                    f"{res['steps_per_s_pipelined']:.1f}, unpipelined {res['steps_per_s_unpipelined']:.1f}, "
                    f"gain {res['gain']:.2f}x (median of the paired ratios {res['gain_paired_median']:.2f}x).\n")
            append_results("Issue 8: pipelined train loop (scale_train.py --pipeline-ab)", body, a.note)
        return 0
    procs = [int(n) for n in a.procs.split(",")]
    backend = a.backend or ("nccl" if mx.cuda.is_available() else "ring")
    for n in procs:
        bad = [b for b in a.batch if b % n]
        if bad:
            p.error(f"--batch {bad}: every global batch must be divisible by each process count ({n})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in procs:
            out = Path(tmp) / f"n{n}.json"
            wargs = ["--config", a.config, "--batch", ",".join(map(str, a.batch)), "--steps", str(a.steps),
                     "--warmup", str(a.warmup), "--out", str(out), *sum((["--set", s] for s in a.set), [])]
            cmd, env = launch_command(n, backend, wargs)
            print("running:", " ".join(cmd), file=sys.stderr, flush=True)
            r = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
            if r.returncode != 0 or not out.exists():
                print(f"scale_train: the {n}-process run failed (exit {r.returncode})", file=sys.stderr)
                return 1
            rows += json.loads(out.read_text())
    base = {r["batch"]: r["images_per_s"] for r in rows if r["procs"] == 1}
    for r in rows:
        r["speedup"] = r["images_per_s"] / base[r["batch"]] if r["batch"] in base else None
        # weak scaling: against one process at this row's per-process batch (same work per device)
        b1 = r["per_process_batch"]
        r["weak_speedup"] = r["images_per_s"] / base[b1] if b1 in base else None
    result = {"benchmark": "scale_train", "config": a.config, "backend": backend, "steps": a.steps,
              "warmup": a.warmup, "overrides": a.set, "rows": rows}
    print(json.dumps(result, indent=1))
    if a.append:
        from benchmarks._timing import append_results, markdown_table

        table = markdown_table(["global batch", "processes", "per-process batch", "step", "images/s",
                                "speedup vs 1 (same global batch)", "speedup vs 1 (same per-process batch)"],
                               [[r["batch"], r["procs"], r["per_process_batch"], f"{r['step_ms']:.2f} ms",
                                 f"{r['images_per_s']:.0f}", f"{r['speedup']:.2f}" if r["speedup"] else "-",
                                 f"{r['weak_speedup']:.2f}" if r["weak_speedup"] else "-"]
                                for r in sorted(rows, key=lambda r: (r["batch"], r["procs"]))])
        body = (f"Data-parallel training of `{Path(a.config).name}` ({' '.join(a.set)}): the harness's compiled, "
                f"pipelined train step, gradients averaged by one all-reduce inside it; backend `{backend}`; "
                f"{a.steps} timed steps after {a.warmup} warm-up steps per row; device {rows[0]['device']}.\n\n"
                + table + "\n")
        append_results("Issue 8: data-parallel training throughput (scale_train.py)", body, a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
