"""The training loop: ``train(cfg, run_dir)``.

Each step t (0-based): key_t = step_key(seed, t) split into a data key (dynamic
binarization / simulation) and an objective key; the batch is batch t mod nb of epoch
t // nb in the order permutation(seed, epoch); one (compiled) optimizer step. Every
input of step t is therefore a pure function of (config, t, parameters, optimizer
state), and a run resumed from a checkpoint after step t ends with bit-identical
parameters to an uninterrupted one.

Faults: a non-finite loss or gradient norm rolls the step back; ``train.nan_policy``
"stop" then writes the last good state and raises :class:`NonFiniteError`, "skip" counts
it and goes on (at most ``train.max_skipped`` times). SIGINT/SIGTERM finish the current
step, write a checkpoint and raise :class:`Interrupted`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import mlx.core as mx

from genmlx.harness.checkpoint import CheckpointError, CheckpointManager, flat_opt_state, flat_params, restore
from genmlx.harness.config import RESUMABLE_CHANGES, ConfigError, ExperimentConfig, config_diff
from genmlx.harness.logging import MetricsLog, Progress, image_grid, write_png
from genmlx.harness.step import build_optimizer, make_train_step, rollback, snapshot, step_key

VALID_SALT, EVAL_SALT, IMAGE_SALT = 1, 2, 3


class TrainingError(RuntimeError):
    """Training stopped; the message says why and where the last good state is."""


class NonFiniteError(TrainingError):
    pass


class Interrupted(TrainingError):
    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


def genmlx_version() -> str:
    import genmlx

    return getattr(genmlx, "__version__", "unknown")


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None


def _clear_run(run_dir: Path) -> None:
    """Remove the outputs of an earlier run (``--fresh``): checkpoints, logs, results."""
    import shutil

    for name in ("checkpoints", "tb"):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
    for name in ("metrics.jsonl", "eval.json", "results.json", "samples.png"):
        (run_dir / name).unlink(missing_ok=True)


def _resumable(old: dict, new: dict) -> list[str]:
    return [k for k in config_diff(old, new) if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)]


class _Signals:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second one aborts)."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _finite(*vals) -> bool:
    return all(math.isfinite(v) for v in vals)


def train(cfg: ExperimentConfig, run_dir: str | Path, *, task=None, resume: bool = True,
          final_eval: bool = True, echo=print) -> dict:
    """Train (or resume) the experiment ``cfg`` in ``run_dir``; returns the final metrics."""
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
    if not resume:
        _clear_run(run_dir)
    ck = ckpts.load_latest() if resume else None
    cfg_dict = cfg.to_dict()
    if ck is not None:
        diff = _resumable(ck.meta.get("config", {}), cfg_dict)
        if diff:
            raise ConfigError(f"{run_dir} holds a checkpoint of a different experiment (keys differ: "
                              f"{', '.join(diff)}); use another --run-dir or the same config")
    (run_dir / "config.json").write_text(json.dumps(cfg_dict, indent=1, sort_keys=True))

    if task is None:
        from genmlx.harness.zoo import build_task

        task = build_task(cfg)
    module = task.objective.trainable()
    optimizer = build_optimizer(cfg.optim, task.data.batches_per_epoch)
    optimizer.init(module.trainable_parameters())
    start, skipped, best = 0, 0, None
    if ck is not None:
        restore(module, optimizer, ck)
        start, skipped, best = ck.meta["step"], ck.meta.get("skipped", 0), ck.meta.get("best")
        echo(f"resuming {run_dir} from {ck.path.name} (step {start})")
    step_fn = make_train_step(task.objective, optimizer, compile=cfg.train.compile)
    total = cfg.train.steps
    log = MetricsLog(run_dir, cfg.log.tensorboard, resume_step=start if ck is not None else None)
    prog = Progress(total, start, cfg.log.progress, desc=cfg.name)

    def save(step: int, is_best: bool = False, **extra) -> Path:
        epoch, pos = task.data.position(step)
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": pos, "seed": cfg.seed,
                "next_key": step_key(cfg.seed, step).tolist(),
                "skipped": skipped, "best": best, "config": cfg_dict,
                "genmlx_version": genmlx_version(), "time": time.time(), **extra}
        return ckpts.save(step, flat_params(module), flat_opt_state(optimizer), meta, best=is_best)

    def validate(step: int) -> dict:
        nonlocal best
        m = task.validate(step_key(cfg.seed, step, VALID_SALT), cfg.log.valid_particles)
        log.scalars(step, m, prefix="valid/")
        # higher is better: the validation bound, or minus a loss
        score = m.get("valid_bound", m.get("valid_log_q", -m.get("valid_mse", math.nan)))
        improved = math.isfinite(score) and (best is None or score > best)
        if improved:
            best = score
        return {"improved": improved, **m}

    def log_images(step: int) -> None:
        if task.images is None or not cfg.log.images or log.tb is None:
            return
        for tag, img in task.images(step_key(cfg.seed, step, IMAGE_SALT)).items():
            log.image(f"images/{tag}", img, step)

    def log_histograms(step: int, key, data) -> None:
        """Parameters, and the gradient of the objective at this step's key and batch
        (an extra, uncompiled evaluation that changes no state)."""
        if log.tb is None:
            return
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        for name, p in tree_flatten(module.trainable_parameters()):
            log.histogram(f"params/{name}", p, step)
        _, grads = nn.value_and_grad(module, lambda k, d: task.objective.loss(k, d)[0])(key, data)
        for name, g in tree_flatten(grads):
            log.histogram(f"grads/{name}", g, step)

    batches = task.data.batches(cfg.seed, start)
    t0 = time.time()
    step = start
    try:
        with _Signals() as sig:
            while step < total:
                kd, ko = mx.random.split(step_key(cfg.seed, step))
                data = task.data.prepare(kd, next(batches))
                snap = snapshot(module, optimizer)
                metrics = step_fn(ko, data)
                mx.eval(metrics)
                loss, gn = float(metrics["loss"]), float(metrics["grad_norm"])
                if not _finite(loss, gn):
                    rollback(module, optimizer, snap)
                    if cfg.train.nan_policy == "stop" or skipped >= cfg.train.max_skipped:
                        path = save(step, nonfinite_step=step)
                        why = (f"non-finite loss or gradient in step {step + 1} of {total} (loss={loss}, grad_norm={gn})"
                               if cfg.train.nan_policy == "stop" else
                               f"more than train.max_skipped = {cfg.train.max_skipped} non-finite steps (the last in step {step + 1})")
                        raise NonFiniteError(f"{why}; the last good state (after {step} steps) was saved to {path}. "
                                             f"Lower optim.lr, or set train.nan_policy = \"skip\" to skip such steps.")
                    skipped += 1
                    log.scalars(step + 1, {"skipped_steps": skipped}, prefix="train/")
                step += 1
                prog.update(1, epoch=task.data.position(step - 1)[0], loss=loss)
                if step % cfg.log.every_steps == 0 or step == total:
                    lr = optimizer.learning_rate
                    vals = {k: float(v) for k, v in metrics.items() if getattr(v, "size", 1) == 1}
                    vals.update(lr=float(lr), skipped_steps=skipped, steps_per_s=(step - start) / max(time.time() - t0, 1e-9))
                    log.scalars(step, vals, prefix="train/")
                    prog.line()
                if step % cfg.log.histogram_every_steps == 0:
                    log_histograms(step, ko, data)
                is_best = False
                if step % cfg.log.eval_every_steps == 0 or step == total:
                    v = validate(step)
                    is_best = v["improved"] and cfg.checkpoint.keep_best
                    log_images(step)
                if step % cfg.checkpoint.every_steps == 0 or step == total or is_best:
                    save(step, is_best=is_best)
                if sig.signum is not None:
                    path = save(step)
                    name = signal.Signals(sig.signum).name
                    raise Interrupted(f"{name} received: stopped after step {step}; checkpoint {path}. "
                                      f"Run the same command again to resume.", sig.signum)
    except CheckpointError as e:
        raise TrainingError(str(e)) from e
    finally:
        prog.close()
        if step < total:
            log.close()
    elapsed = time.time() - t0
    result = {"steps": total, "skipped_steps": skipped, "train_seconds": elapsed, "best_valid": best}
    if final_eval:
        result.update(evaluate_run(cfg, task, run_dir, log=log, echo=echo))
    log.hparams(_flat_hparams(cfg_dict), {k: v for k, v in result.items() if isinstance(v, (int, float))})
    log.close()
    (run_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def evaluate_run(cfg: ExperimentConfig, task, run_dir: Path, log: MetricsLog | None = None, echo=print) -> dict:
    """Test metrics of the current parameters (bounds, log p(x), proposal quality) and the
    sample image; written to ``eval.json`` and ``samples.png`` in ``run_dir``."""
    t0 = time.time()
    m = task.evaluate(step_key(cfg.seed, 0, EVAL_SALT), cfg.eval)
    m["eval_seconds"] = time.time() - t0
    if task.images is not None and cfg.eval.samples:
        imgs = task.images(step_key(cfg.seed, 0, IMAGE_SALT), n=cfg.eval.samples, raw=True)
        if "samples" in imgs:
            shape = task.data.image_shape
            p = write_png(run_dir / "samples.png", image_grid(imgs["samples"], shape, scale=max(1, 56 // shape[0])))
            m["samples_png"] = str(p)
    if log is not None:
        log.scalars(cfg.train.steps, {k: v for k, v in m.items() if isinstance(v, (int, float))}, prefix="test/")
    (Path(run_dir) / "eval.json").write_text(json.dumps(m, indent=1, sort_keys=True))
    echo(f"{cfg.name}: test metrics (eval.json)")
    for line in format_metrics(m):
        echo(line)
    if "nll" in m:
        echo(f"{cfg.name}: test log p(x) = {-m['nll']:.3f} ± {m.get('log_px_se', float('nan')):.3f} nats "
             f"(importance sampling with the trained guide, K = {cfg.eval.particles})")
    return m


def format_metrics(m: dict) -> list[str]:
    out = []
    for k, v in m.items():
        if isinstance(v, float):
            out.append(f"  {k:<28} {v:.4f}")
        else:
            out.append(f"  {k:<28} {v}")
    return out


def _flat_hparams(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
