"""Hyper-parameter sweeps: grid or random search over config key paths.

A sweep file (TOML)::

    name = "digits_lr"
    base = "../digits_vae.toml"        # experiment config, relative to this file
    mode = "grid"                      # or "random" (then `trials` draws, seeded)
    workers = 2                        # parallel worker processes
    overrides = ["train.steps=500"]    # applied to every trial
    metrics = ["nll"]                  # columns of the results table (default: all)

    [grid]                             # mode = "grid": the Cartesian product
    "optim.lr" = [1e-3, 3e-3]

    [random]                           # mode = "random": one distribution per key
    "optim.lr" = { log_uniform = [1e-4, 1e-2] }
    "model.latent_dim" = { choice = [4, 8, 16] }
    "optim.eps" = { uniform = [1e-8, 1e-4] }
    "train.steps" = { int_uniform = [100, 400] }

Each trial is ``genmlx train BASE --run-dir <sweep>/trial-NNN <overrides>`` in its own
process; its status (ok / failed with the error) goes to ``trial-NNN/status.json``, so
a failed trial never stops the sweep, and running the sweep again skips finished trials
(and resumes interrupted ones from their checkpoints). ``results.csv`` and
``results.md`` tabulate every trial's overrides, status and final metrics.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from genmlx.harness.config import ConfigError, load_config

_KEYS = {"name", "base", "mode", "workers", "overrides", "metrics", "grid", "random", "trials", "seed", "retry_failed"}


def _toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def _sample(spec, rng: np.random.Generator, key: str):
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"random.{key}: expected one of {{choice = […]}}, {{uniform = [a, b]}}, "
                          f"{{log_uniform = [a, b]}}, {{int_uniform = [a, b]}}, got {spec!r}")
    (kind, arg), = spec.items()
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"random.{key}.choice: expected a non-empty list, got {arg!r}")
        return arg[int(rng.integers(len(arg)))]
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(a, (int, float)) for a in arg) and arg[0] <= arg[1]):
        raise ConfigError(f"random.{key}.{kind}: expected [low, high] with low ≤ high, got {arg!r}")
    lo, hi = arg
    if kind == "uniform":
        return float(rng.uniform(lo, hi))
    if kind == "log_uniform":
        if lo <= 0:
            raise ConfigError(f"random.{key}.log_uniform: bounds must be positive, got {arg!r}")
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if kind == "int_uniform":
        return int(rng.integers(int(lo), int(hi) + 1))
    raise ConfigError(f"random.{key}: unknown distribution {kind!r} (choice, uniform, log_uniform, int_uniform)")


def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep file; returns it with ``trials``: [{key: value}] in order."""
    p = Path(path)
    try:
        sw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    for k in sw:
        if k not in _KEYS:
            raise ConfigError(f"{k}: unknown sweep key (known: {', '.join(sorted(_KEYS))})")
    if "base" not in sw:
        raise ConfigError("base: the sweep needs the experiment config it varies (base = \"…toml\")")
    base = (p.parent / sw["base"]).resolve()
    mode = sw.get("mode", "grid")
    if mode not in ("grid", "random"):
        raise ConfigError(f"mode: expected \"grid\" or \"random\", got {mode!r}")
    workers = sw.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers: expected a positive int, got {workers!r}")
    fixed = sw.get("overrides", [])
    load_config(base, fixed)  # the base itself must be valid
    if mode == "grid":
        grid = sw.get("grid", {})
        if not grid:
            raise ConfigError("grid: mode = \"grid\" needs a [grid] table of key = [values]")
        for k, vs in grid.items():
            if not isinstance(vs, list) or not vs:
                raise ConfigError(f"grid.{k}: expected a non-empty list of values, got {vs!r}")
        keys = list(grid)
        trials = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    else:
        space = sw.get("random", {})
        n = sw.get("trials")
        if not space:
            raise ConfigError("random: mode = \"random\" needs a [random] table of key = {distribution}")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"trials: mode = \"random\" needs a positive number of trials, got {n!r}")
        rng = np.random.Generator(np.random.Philox(key=[int(sw.get("seed", 0)), 5]))
        trials = [{k: _sample(space[k], rng, k) for k in space} for _ in range(n)]
    return {"name": sw.get("name", p.stem), "base": base, "mode": mode, "workers": workers,
            "fixed": list(fixed), "metrics": sw.get("metrics"), "trials": trials,
            "retry_failed": bool(sw.get("retry_failed", False))}


def trial_overrides(params: dict) -> list[str]:
    return [f"{k}={_toml_value(v)}" for k, v in params.items()]


def _status(tdir: Path) -> dict | None:
    p = tdir / "status.json"
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def run_sweep(path: str | Path, workers: int | None = None, sweep_dir: str | Path | None = None,
              echo=print) -> list[dict]:
    """Run (or resume) a sweep; returns one row per trial (also in results.csv / .md)."""
    sw = load_sweep(path)
    workers = workers or sw["workers"]
    root = Path(sweep_dir) if sweep_dir else Path("runs") / "sweeps" / sw["name"]
    root.mkdir(parents=True, exist_ok=True)
    plan = [{"trial": i, "params": t, "overrides": sw["fixed"] + trial_overrides(t)} for i, t in enumerate(sw["trials"])]
    (root / "sweep.json").write_text(json.dumps({"name": sw["name"], "base": str(sw["base"]), "mode": sw["mode"],
                                                 "trials": plan}, indent=1, default=str))
    todo = []
    for t in plan:
        tdir = root / f"trial-{t['trial']:03d}"
        st = _status(tdir)
        if st is not None and (st["status"] == "ok" or not sw["retry_failed"]) and st.get("overrides") == t["overrides"]:
            continue
        todo.append((t, tdir))
    echo(f"genmlx sweep {sw['name']}: {len(plan)} trials, {len(plan) - len(todo)} done, {workers} workers -> {root}")
    running: list = []
    env = dict(os.environ)
    while todo or running:
        while todo and len(running) < workers:
            t, tdir = todo.pop(0)
            tdir.mkdir(parents=True, exist_ok=True)
            # validate first: a bad trial config is recorded without starting a process
            try:
                load_config(sw["base"], t["overrides"])
            except ConfigError as e:
                _finish(tdir, t, 2, f"config error: {e}", 0.0, echo)
                continue
            cmd = [sys.executable, "-m", "genmlx", "train", str(sw["base"]), "--run-dir", str(tdir),
                   *t["overrides"]]
            log = open(tdir / "log.txt", "a")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, t, tdir, log, time.time()))
        time.sleep(0.2)
        for item in list(running):
            proc, t, tdir, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            err = ""
            if proc.returncode != 0:
                lines = [ln for ln in (tdir / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
                errs = [ln for ln in lines if ln.startswith("genmlx: error") or "Error" in ln]
                err = (errs[-1] if errs else (lines[-1] if lines else f"exit status {proc.returncode}"))
            _finish(tdir, t, proc.returncode, err, time.time() - t0, echo)
    rows = collect(root, plan, sw["metrics"])
    write_tables(root, rows)
    ok = sum(r["status"] == "ok" for r in rows)
    echo(f"genmlx sweep {sw['name']}: {ok}/{len(rows)} trials ok; results in {root / 'results.md'}")
    return rows


def _finish(tdir: Path, t: dict, rc: int, err: str, seconds: float, echo) -> None:
    status = "ok" if rc == 0 and (tdir / "results.json").exists() else "failed"
    rec = {"status": status, "returncode": rc, "error": err, "seconds": round(seconds, 2),
           "overrides": t["overrides"], "params": t["params"]}
    (tdir / "status.json").write_text(json.dumps(rec, indent=1, default=str))
    echo(f"  trial {t['trial']:03d} {status}{': ' + err if err else ''} ({seconds:.1f}s) {' '.join(t['overrides'])}")


def collect(root: Path, plan: list, metrics: list | None) -> list[dict]:
    rows = []
    for t in plan:
        tdir = root / f"trial-{t['trial']:03d}"
        st = _status(tdir) or {"status": "pending", "error": ""}
        row = {"trial": t["trial"], **{k: v for k, v in t["params"].items()}, "status": st["status"]}
        res_p = tdir / "results.json"
        if st["status"] == "ok" and res_p.exists():
            res = json.loads(res_p.read_text())
            for k, v in res.items():
                if (metrics is None and isinstance(v, (int, float))) or (metrics and k in metrics):
                    row[k] = v
        row["error"] = st.get("error", "")
        rows.append(row)
    return rows


def write_tables(root: Path, rows: list[dict]) -> None:
    cols: list = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    cols = [c for c in cols if c != "error"] + ["error"]
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")
