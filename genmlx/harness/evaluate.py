"""Using a trained run: ``genmlx eval`` and ``genmlx infer``.

``load_run(run_dir)`` rebuilds the experiment from the run's ``config.json`` and loads
the best (or latest) checkpoint's parameters into its model and guide. ``infer`` then
uses the trained guide as the importance-sampling proposal on new observations:

    z_k ~ q(z | x),   log w_k = log p(x, z_k) − log q(z_k | x),
    log p̂(x) = logsumexp_k log w_k − log K,   ESS = (Σ w)² / Σ w²,

or, for sequential models, as the per-step proposal of a particle filter (``smc``):
α_t = log p(x_t, y_t | x_{t−1}) − log q(x_t | x_{t−1}, y_t), log Ẑ = Σ over resampling
epochs of the log mean weight (:func:`genmlx.inference.smc`).
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


def _latent_arrays(choices, observed: set, sequential: bool) -> dict:
    """{name: float64 array [n, …]} of the latent choices of batched particles. For a
    sequential model the step index leads each address (``(t, "x")``): the steps of one
    address are stacked into [n, T, …] under the name ``x``."""
    out, steps = {}, {}
    for path, v in choices.leaves():
        if tuple(path) in observed:
            continue
        v = np.asarray(v, dtype=np.float64)
        if sequential and len(path) > 1 and isinstance(path[0], int):
            steps.setdefault("/".join(str(p) for p in path[1:]), []).append((path[0], v))
        else:
            out["/".join(str(p) for p in path)] = v
    for name, tv in steps.items():
        out[name] = np.stack([v for _, v in sorted(tv, key=lambda e: e[0])], axis=1)
    return out


def _smc_one(key, task, x, particles: int, proposal: str):
    """SMC on one observed sequence; (result, filtering means, filtering sds), the
    filtering moments Σ_i w̃_i f(x_t^i) taken after each step's weighting."""
    import genmlx as gm

    spec = task.smc(x, proposal)
    obs = spec["observations"]
    observed = {tuple(p) for p, _ in obs.leaves()}
    means, sds = {}, {}

    def record(t, traces, lw):
        w = np.asarray(mx.softmax(lw.astype(mx.float32)), dtype=np.float64)
        for path, v in traces.choices.get_submap(t).leaves():
            if (t, *path) in observed:
                continue
            v = np.asarray(v, dtype=np.float64)
            wv = w.reshape((-1,) + (1,) * (v.ndim - 1))
            m = (wv * v).sum(0)
            name = "/".join(str(p) for p in path)
            means.setdefault(name, []).append(m)
            sds.setdefault(name, []).append(np.sqrt(np.maximum((wv * (v - m) ** 2).sum(0), 0.0)))

    res = gm.inference.smc(key, spec["model"], spec["args"], obs, particles, proposal=spec["proposal"],
                           callback=record, progress=False)
    return res, observed, {k: np.stack(v) for k, v in means.items()}, {k: np.stack(v) for k, v in sds.items()}


def _rounded(a: np.ndarray, full: bool):
    return np.round(a, 4).tolist() if full or a.size <= 10 else f"array {a.shape}"


def infer_run_dir(run_dir, obs: str | None = None, example: str | None = None, method: str = "is",
                  particles: int = 1000, out: str | None = None, seed: int = 0, checkpoint: str = "best",
                  proposal: str = "guide", echo=print) -> list[dict]:
    """Inference on new observations with the run's trained guide as proposal; prints
    one JSON line per observation and optionally writes ``particles`` resampled posterior
    draws per observation to a safetensors file.

    - ``method="is"``: importance sampling, the guide proposing all latents; prints
      log p̂(x), ESS/N and posterior means/sds.
    - ``method="smc"`` (sequential models, ``task.smc``): a particle filter whose step-t
      proposal is the guide's q(x_t | x_{t−1}, y_t) (``proposal="prior"``: the bootstrap
      filter); prints log Ẑ = log p̂(y_{0:T−1}), the resampling steps, the minimum ESS/N and
      the filtering means/sds E[x_t | y_{0:t}] of every latent; the draws written are the
      final particles' paths (resampled), shaped [particles, T, …].
    Models with an exact evidence (``task.extras["exact_log_px"]``) print it beside."""
    import genmlx as gm

    if method not in ("is", "smc"):
        raise ConfigError(f"--method: expected is or smc, got {method!r}")
    if proposal not in ("guide", "prior"):
        raise ConfigError(f"--proposal: expected guide or prior, got {proposal!r}")
    cfg, task, ck = load_run(run_dir, checkpoint)
    if method == "smc" and task.smc is None:
        raise ConfigError(f"--method smc: model.kind = {cfg.model.kind!r} is not sequential; SMC applies to "
                          "Unfold/Scan models (model.kind = \"ssm\") — use --method is")
    xs = _read_observations(obs) if obs else _example(task, example, cfg.data.data_dir)
    sequential = task.smc is not None
    exact = task.extras.get("exact_log_px")
    key = mx.random.key(seed)
    results, arrays = [], {}
    for j, row in enumerate(xs):
        key, k1, k2 = mx.random.split(key, 3)
        x = mx.array(row)
        if method == "smc":
            res, observed, fmeans, fsds = _smc_one(k1, task, x, particles, proposal)
            summary = {"observation": j, "method": "smc", "proposal": proposal,
                       "log_px": float(res.log_marginal_likelihood)}
            if exact is not None:
                summary["exact_log_px"] = float(exact(row))
            summary.update({"steps": len(res.ess_history), "resampled_steps": int(sum(res.resampled)),
                            "min_ess_per_n": round(min(res.ess_history) / particles, 4),
                            "final_ess_per_n": round(float(res.ess) / particles, 4)})
            for name in fmeans:
                summary[f"filter_mean[{name}]"] = _rounded(fmeans[name], True)
                summary[f"filter_sd[{name}]"] = _rounded(fsds[name], True)
                arrays[f"obs{j}/filter_mean/{name}"] = mx.array(fmeans[name].astype(np.float32))
                arrays[f"obs{j}/filter_sd/{name}"] = mx.array(fsds[name].astype(np.float32))
        else:
            model_args = task.model_args(x) if task.model_args is not None else ()
            gen = None if proposal == "prior" else task.guide
            res = gm.inference.importance_sampling(k1, task.model, model_args, task.observe(x), particles,
                                                   proposal=gen, proposal_args=task.guide_args(x) if gen else ())
            observed = {tuple(p) for p, _ in task.observe(x).leaves()}
            summary = {"observation": j, "log_px": float(res.log_marginal_likelihood),
                       "ess_per_n": float(res.ess) / particles}
            if exact is not None:
                summary["exact_log_px"] = float(exact(row))
        lw = np.asarray(res.log_weights, dtype=np.float64)
        draws = res.resample(k2, particles)
        draws = getattr(draws, "traces", draws)
        for name, v in _latent_arrays(draws.choices, observed, sequential).items():
            if method == "is":
                summary[f"mean[{name}]"] = _rounded(v.mean(0), sequential)
                summary[f"sd[{name}]"] = _rounded(v.std(0), sequential) if sequential or v[0].size <= 10 else ""
            arrays[f"obs{j}/{name}"] = mx.array(v.astype(np.float32))
        arrays[f"obs{j}/log_weights"] = mx.array(lw.astype(np.float32))
        results.append(summary)
        echo(json.dumps(summary))
    if out:
        mx.save_safetensors(out, arrays, metadata={"run_dir": str(run_dir), "checkpoint": ck.path.name,
                                                   "method": method, "proposal": proposal})
        echo(f"posterior draws written to {out}")
    return results
