"""Using a trained run: ``genmlx eval`` and ``genmlx infer``.

``load_run(run_dir)`` rebuilds the experiment from the run's ``config.json`` and loads
the best (or latest) checkpoint's parameters into its model and guide. ``infer`` then
uses the trained guide as the importance-sampling proposal on new observations:

    z_k ~ q(z | x),   log w_k = log p(x, z_k) − log q(z_k | x),
    log p̂(x) = logsumexp_k log w_k − log K,   ESS = (Σ w)² / Σ w².
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

import mlx.core as mx

from genmlx.harness.checkpoint import CheckpointError, CheckpointManager, restore
from genmlx.harness.config import ConfigError, ExperimentConfig, from_dict


def load_run(run_dir: str | Path, checkpoint: str = "best"):
    """(config, task with trained parameters, checkpoint) of a run directory."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json); train one with `genmlx train CONFIG --run-dir {run_dir}`")
    cfg = from_dict(ExperimentConfig, json.loads(cfg_path.read_text()))
    from genmlx.harness.zoo import build_task

    task = build_task(cfg)
    mgr = CheckpointManager(run_dir)
    ck = mgr.load_best() if checkpoint == "best" else mgr.load_latest()
    if ck is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint yet")
    restore(task.objective.trainable(), None, ck)
    return cfg, task, ck


def eval_run_dir(run_dir, particles: int | None = None, examples: int | None = None,
                 checkpoint: str = "best", echo=print) -> dict:
    """Test metrics of a trained run (written to ``eval.json``; samples to ``samples.png``)."""
    from genmlx.harness.runner import evaluate_run

    cfg, task, ck = load_run(run_dir, checkpoint)
    ev = cfg.eval
    if particles is not None:
        ev = dataclasses.replace(ev, particles=particles)
    if examples is not None:
        ev = dataclasses.replace(ev, examples=examples)
    cfg = dataclasses.replace(cfg, eval=ev)
    echo(f"genmlx eval: {run_dir} ({ck.path.name}, step {ck.meta['step']}), K = {ev.particles}")
    return evaluate_run(cfg, task, Path(run_dir), echo=echo)


def _read_observations(path: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--obs: file not found: {p}")
    if p.suffix == ".npy":
        a = np.load(p, allow_pickle=False)
    elif p.suffix in (".csv", ".txt"):
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
        try:
            float(lines[0].split(",")[0])
        except ValueError:
            lines = lines[1:]  # header row
        a = np.array([[float(v) for v in ln.split(",")] for ln in lines])
    else:
        raise ConfigError(f"--obs: expected a .csv or .npy file, got {p.name}")
    return np.atleast_2d(a).astype(np.float32)


def _example(task, spec: str, data_dir: str = "") -> np.ndarray:
    try:
        split, i = spec.split(":")
        i = int(i)
    except ValueError:
        raise ConfigError(f"--example: expected SPLIT:INDEX (e.g. test:3), got {spec!r}") from None
    if split == "ref":
        from genmlx.harness.zoo.sbibm import reference_observations

        refs = reference_observations(task.data.name, data_dir)
        if not 1 <= i <= len(refs):
            raise ConfigError(f"--example ref:{i}: {len(refs)} reference observations available (1-based)")
        return refs[i - 1][0][None]
    if split not in ("train", "valid", "test"):
        raise ConfigError(f"--example: split must be train, valid, test or ref, got {split!r}")
    x = np.asarray(task.data.fixed_eval(split))
    if not 0 <= i < len(x):
        raise ConfigError(f"--example {spec}: the {split} split has {len(x)} examples")
    return x[i:i + 1]


def infer_run_dir(run_dir, obs: str | None = None, example: str | None = None, method: str = "is",
                  particles: int = 1000, out: str | None = None, seed: int = 0, checkpoint: str = "best",
                  echo=print) -> list[dict]:
    """Importance sampling on new observations with the run's trained guide as proposal;
    prints log p̂(x), ESS/N and posterior summaries, and optionally writes ``particles``
    resampled posterior draws per observation to a safetensors file."""
    import genmlx as gm

    if method != "is":
        raise ConfigError(f"--method {method}: the zoo's models are not sequential; SMC applies to "
                          "Unfold/Scan models — use --method is")
    cfg, task, ck = load_run(run_dir, checkpoint)
    xs = _read_observations(obs) if obs else _example(task, example, cfg.data.data_dir)
    key = mx.random.key(seed)
    results, arrays = [], {}
    for j, row in enumerate(xs):
        key, k1, k2 = mx.random.split(key, 3)
        x = mx.array(row)
        res = gm.inference.importance_sampling(k1, task.model, (), task.observe(x), particles,
                                               proposal=task.guide, proposal_args=task.guide_args(x))
        lw = np.asarray(res.log_weights, dtype=np.float64)
        summary = {"observation": j, "log_px": float(res.log_marginal_likelihood),
                   "ess_per_n": float(res.ess) / particles}
        draws = res.resample(k2, particles)
        draws = getattr(draws, "traces", draws)
        for path, v in draws.choices.leaves():
            name = "/".join(str(p) for p in path)
            if any(name == "/".join(str(p) for p in q) for q, _ in task.observe(x).leaves()):
                continue
            v = np.asarray(v, dtype=np.float64)
            summary[f"mean[{name}]"] = np.round(v.mean(0), 4).tolist() if v[0].size <= 10 else f"array {v.shape[1:]}"
            summary[f"sd[{name}]"] = np.round(v.std(0), 4).tolist() if v[0].size <= 10 else ""
            arrays[f"obs{j}/{name}"] = mx.array(v.astype(np.float32))
        arrays[f"obs{j}/log_weights"] = mx.array(lw.astype(np.float32))
        results.append(summary)
        echo(json.dumps(summary))
    if out:
        mx.save_safetensors(out, arrays, metadata={"run_dir": str(run_dir), "checkpoint": ck.path.name})
        echo(f"posterior draws written to {out}")
    return results
