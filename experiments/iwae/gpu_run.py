"""Drive the MNIST experiments on a GPU machine within per-call time limits.

Two commands, each meant to be one call on the GPU machine (the run directories persist
on that machine's disk between calls while it stays up):

``main`` — one run with a GPU-time budget (the IWAE table's k = 50 row, "within 10
GPU-minutes"). The first call probes the training-step throughput at several batch sizes
(``probe_throughput.py``), picks the batch size with the most images/s whose step rate
is still ≥ ``--min-step-fraction`` of the smallest batch's (on a GPU a small step is
launch bound, so a larger batch is nearly free until the device saturates), sizes the
cosine schedule to the steps that fit the budget, and trains until ``--phase-s`` runs
out (SIGTERM → the harness checkpoints). Later calls resume until the budget (wall time
of the training processes, start-up and compilation included) is spent or the steps
are done; the call whose phase runs to the end of the budget evaluates (test −log p(x),
K = 5000) and every call copies the run's files to ``--out``. The plan (with each phase's
start) is written before a phase runs: a driver killed from outside (the call's own time
limit) is charged up to the run's last write, and the next call resumes from the last
checkpoint (``--fresh`` only while the run has none).

``rows`` — the other table rows side by side on one GPU for ``--seconds`` each (the
processes share the device; their GPU time is reported as wall time / number of runs),
then evaluated. Rows: VAE k = 1, 5, 50 and IWAE k = 5 (IWAE k = 1 is VAE k = 1) on
dynamically binarized MNIST; VIMCO, RWS (K = 5) and NVIL on the sigmoid belief net.

Usage (GPU machine, MNIST under $GENMLX_DATA)::

    python experiments/iwae/gpu_run.py main --run-dir /root/runs/iwae50 --budget-s 600 --phase-s 420 --out $OUT/iwae50
    python experiments/iwae/gpu_run.py main --run-dir /root/runs/iwae50 --budget-s 600 --phase-s 420 --out $OUT/iwae50
    python experiments/iwae/gpu_run.py rows --seconds 300 --out $OUT/rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXP = HERE.parent
PY = sys.executable
KEEP = ("config.json", "results.json", "eval.json", "metrics.jsonl", "samples.png", "plan.json")


def _genmlx(*args: str, timeout: float | None = None, log: Path | None = None) -> tuple[int, float]:
    """Run ``python -m genmlx ARGS``; SIGTERM at ``timeout`` (the harness checkpoints and
    exits). Returns (exit code, wall seconds)."""
    t0 = time.time()
    with open(log, "a") if log else open(os.devnull, "w") as f:
        p = subprocess.Popen([PY, "-m", "genmlx", *args], stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                rc = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
    return rc, time.time() - t0


def choose(probe: list[dict], min_fraction: float) -> dict:
    """The probed batch size with the most images/s among those whose steps/s is at least
    ``min_fraction`` of the smallest batch's (loop ``async``: the harness pipelines its steps)."""
    rows = sorted((r for r in probe if r["loop"] == "async"), key=lambda r: r["batch"])
    base = rows[0]["steps_per_s"]
    ok = [r for r in rows if r["steps_per_s"] >= min_fraction * base]
    return max(ok, key=lambda r: r["images_per_s"])


def copy_run(run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (run / name).exists():
            shutil.copy2(run / name, out / name)


def _settle_unfinished_phase(plan: dict, run: Path) -> None:
    """A phase whose driver was killed (the call's own time limit) has a start but no wall
    time: charge it from its start to the run's last write (metrics or checkpoint), so
    the budget counts the GPU time it spent."""
    for ph in plan["phases"]:
        if "wall_s" not in ph:
            files = [*run.glob("metrics.jsonl"), *(run / "checkpoints").glob("ckpt-*")]
            last = max((f.stat().st_mtime for f in files), default=ph["start"])
            ph.update({"rc": None, "wall_s": max(0.0, last - ph["start"]), "killed": True})
            plan["used_s"] += ph["wall_s"]


def main_cmd(a) -> int:
    run, out = Path(a.run_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    plan_path = run / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        run.mkdir(parents=True, exist_ok=True)
        probe_out = out / "probe.json"
        subprocess.run([PY, str(HERE / "probe_throughput.py"), a.config, "--steps", str(a.probe_steps),
                        "--batch", *map(str, a.batch), "--out", str(probe_out), "--set", *a.set], check=True)
        best = choose(json.loads(probe_out.read_text()), a.min_step_fraction)
        steps = int(a.step_fill * a.budget_s * best["steps_per_s"])
        plan = {"config": a.config, "batch": best["batch"], "steps": steps, "probe": best,
                "budget_s": a.budget_s, "used_s": 0.0, "phases": [], "overrides": list(a.set)}
        plan_path.write_text(json.dumps(plan, indent=1))
    steps, B = plan["steps"], plan["batch"]
    overrides = [f"data.batch_size={B}", f"train.steps={steps}", f"optim.lr={a.lr}", "optim.schedule=cosine",
                 f"optim.decay_steps={steps}", f"log.every_steps={max(steps // 200, 100)}",
                 f"log.eval_every_steps={max(steps // 12, 1000)}", f"checkpoint.every_steps={max(steps // 40, 1000)}",
                 "log.progress=lines", "log.histogram_every_steps=100000000", *plan["overrides"]]
    _settle_unfinished_phase(plan, run)
    left = plan["budget_s"] - plan["used_s"]
    done = (run / "results.json").exists()
    budget_bound = False
    if not done and left > 5:
        # --fresh only for a run with no checkpoint yet: a phase killed from outside must
        # not make the next call wipe the training it did
        first = not any((run / "checkpoints").glob("ckpt-*.json"))
        args = ["train", plan["config"], "--run-dir", str(run), *(["--fresh"] if first else []), *overrides]
        budget_bound = left <= a.phase_s
        plan["phases"].append({"start": time.time()})  # recorded before it runs (see _settle_unfinished_phase)
        plan_path.write_text(json.dumps(plan, indent=1))
        rc, wall = _genmlx(*args, timeout=min(left, a.phase_s), log=log)
        plan["used_s"] += wall
        plan["phases"][-1].update({"rc": rc, "wall_s": wall, "time": time.time()})
        plan_path.write_text(json.dumps(plan, indent=1))
        done = (run / "results.json").exists()
    if not done and (budget_bound or plan["budget_s"] - plan["used_s"] <= 5):
        extra = ["--particles", str(a.eval_particles)] if a.eval_particles else []
        rc, wall = _genmlx("eval", str(run), "--checkpoint", "latest", *extra, log=log, timeout=a.eval_timeout_s)
        plan["eval"] = {"rc": rc, "wall_s": wall}
        plan_path.write_text(json.dumps(plan, indent=1))
    copy_run(run, out)
    print(json.dumps({k: plan[k] for k in ("batch", "steps", "used_s", "phases")}))
    return 0


ROWS = {
    # name: (config, overrides)
    "vae_k1": ("mnist_iwae.toml", ["objective.kind=elbo", "objective.particles=1"]),
    "vae_k5": ("mnist_iwae.toml", ["objective.kind=elbo", "objective.particles=5"]),
    "vae_k50": ("mnist_iwae.toml", ["objective.kind=elbo", "objective.particles=50"]),
    "iwae_k5": ("mnist_iwae.toml", ["objective.kind=iwae", "objective.particles=5"]),
    "sbn_vimco_k5": ("sbn_vimco.toml", ["objective.particles=5"]),
    "sbn_rws_k5": ("sbn_rws.toml", ["objective.particles=5"]),
    "sbn_nvil": ("sbn_nvil.toml", []),
}


def rows_cmd(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.only or list(ROWS)
    procs = {}
    t0 = time.time()
    for name in names:
        cfg, ov = ROWS[name]
        mnist = cfg.startswith("mnist")
        batch, lr = (a.mnist_batch, a.mnist_lr) if mnist else (a.sbn_batch, a.sbn_lr)
        run = Path(a.runs) / name
        args = [PY, "-m", "genmlx", "train", str(EXP / cfg), "--run-dir", str(run), "--fresh", *ov,
                f"data.batch_size={batch}", f"optim.lr={lr}", "optim.schedule=constant", "train.steps=100000000",
                "log.every_steps=500", "log.eval_every_steps=10000", "checkpoint.every_steps=5000",
                "log.progress=lines", "log.histogram_every_steps=100000000"]
        (out / name).mkdir(parents=True, exist_ok=True)
        f = open(out / name / "train.log", "w")
        procs[name] = (subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT), f, run)
    deadline = t0 + a.seconds
    while any(p.poll() is None for p, _, _ in procs.values()) and time.time() < deadline:
        time.sleep(2)
    for p, _, _ in procs.values():
        if p.poll() is None:
            p.terminate()
    for p, f, _ in procs.values():
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
        f.close()
    wall = time.time() - t0
    evals = {}
    for name in names:
        run = procs[name][2]
        f = open(out / name / "eval.log", "w")
        extra = ["--particles", str(a.eval_particles)] if a.eval_particles else []
        evals[name] = (subprocess.Popen([PY, "-m", "genmlx", "eval", str(run), "--checkpoint", "latest", *extra],
                                        stdout=f, stderr=subprocess.STDOUT), f)
    for name, (p, f) in evals.items():
        try:
            p.wait(timeout=a.eval_timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
        f.close()
        copy_run(procs[name][2], out / name)
    summary = {"runs": names, "wall_s": wall, "concurrent": len(names), "gpu_s_each": wall / len(names)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("main")
    m.add_argument("--config", default=str(EXP / "mnist_iwae.toml"))
    m.add_argument("--run-dir", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--budget-s", type=float, default=600.0)
    m.add_argument("--phase-s", type=float, default=420.0)
    m.add_argument("--batch", type=int, nargs="+", default=[100, 250, 500, 1000])
    m.add_argument("--probe-steps", type=int, default=150)
    m.add_argument("--min-step-fraction", type=float, default=0.6)
    m.add_argument("--step-fill", type=float, default=0.8, help="planned steps = fill × budget × probed steps/s")
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--eval-timeout-s", type=float, default=240.0)
    m.add_argument("--eval-particles", type=int, default=0, help="K for log p(x) (default: the config's)")
    m.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    r = sub.add_parser("rows")
    r.add_argument("--seconds", type=float, default=300.0)
    r.add_argument("--out", required=True)
    r.add_argument("--runs", default="/root/runs")
    r.add_argument("--only", nargs="*")
    r.add_argument("--mnist-batch", type=int, default=100)
    r.add_argument("--mnist-lr", type=float, default=1e-3)
    r.add_argument("--sbn-batch", type=int, default=100)
    r.add_argument("--sbn-lr", type=float, default=5e-4)
    r.add_argument("--eval-timeout-s", type=float, default=200.0)
    r.add_argument("--eval-particles", type=int, default=0, help="K for log p(x) (default: the config's)")
    a = ap.parse_args(argv)
    return main_cmd(a) if a.cmd == "main" else rows_cmd(a)


if __name__ == "__main__":
    sys.exit(main())
