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
step, write a checkpoint and raise :class:`Interrupted`. ``train.time_limit_s`` > 0 stops
after that much training wall time the same way, but returns normally with
``stopped_early = True`` in the result (running again resumes).

Pipelining (``train.pipeline``, default on): step t+1 is dispatched (``mx.async_eval``)
before step t's metrics are read, so the host builds the next step while the device
runs this one. It is skipped when something after step t needs its state (validation,
histograms, a checkpoint, the last step). When step t turns out non-finite, the
dispatched step t+1 is discarded with the rollback to the state before step t and
redone from it on the same batch; since every step input is a pure function of
(seed, step), the result is bit-identical to the unpipelined loop.
Each step evaluates only the loss, the gradient norm and the state; the other metrics
of the step (ESS, bound, ...) stay lazy and are computed on logging steps alone.
The state before each step is kept for the rollback as the list of its arrays in fixed
slots (``StateSnapshots``: no tree rebuilt per step).

Data-parallel (N processes from ``mlx.launch -n N``, ``genmlx.distributed``): step t's
global batch (``data.batch_size``, divisible by N) is prepared once per process and each
process r trains on rows [r·B/N, (r+1)·B/N) (simulated data: B/N fresh simulations with
the rank's key); the objective key is ``split(key_t, N)[r]``. Inside the compiled step
the gradients, the loss, the metrics and the running-state updates are averaged over
the processes with ONE all-reduce, so every process applies the same update and holds
the same parameters; the non-finite decision uses the averaged loss and gradient norm,
so all ranks agree. A stop request (signal, time limit) on any process is all-reduced
with each step, so all stop after the same step. Rank 0 alone writes checkpoints (with
``world_size``), logs, results and shows progress; validation and the final evaluation
run on rank 0 while the others wait in the next step's all-reduce (or exit at the end).
A checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from genmlx.harness.checkpoint import CheckpointError, CheckpointManager, flat_opt_state, flat_params, restore
from genmlx.harness.config import RESUMABLE_CHANGES, ConfigError, ExperimentConfig, config_diff
from genmlx.harness.logging import MetricsLog, Progress, image_grid, write_png
from genmlx.harness.step import StateSnapshots, build_optimizer, make_train_step, step_key

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


class _NullLog:
    """The metrics log of processes other than rank 0: writes nothing."""

    tb = None

    def scalars(self, *a, **k) -> None:
        pass

    histogram = image = hparams = scalars

    def close(self) -> None:
        pass


@dataclass
class _Pending:
    """A dispatched (possibly still running) optimizer step ``step``: its raw batch, the
    state before it (for rollback), its lazy metrics, key and data shard, and (N > 1)
    the all-reduced stop flag dispatched right after it."""

    step: int
    raw: object
    snap: tuple
    metrics: dict
    key: mx.array
    data: object
    stop: mx.array | None = None


def train(cfg: ExperimentConfig, run_dir: str | Path, *, task=None, resume: bool = True,
          final_eval: bool = True, echo=print) -> dict:
    """Train (or resume) the experiment ``cfg`` in ``run_dir``; returns the final metrics.

    Data-parallel when launched as N processes (``mlx.launch -n N …``): see the module
    docstring of :mod:`genmlx.harness.runner` and ``genmlx/harness/README.md``."""
    from genmlx import distributed as dist

    run_dir = Path(run_dir)
    R, N = dist.rank(), dist.size()
    main = R == 0
    if cfg.data.batch_size % N:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by the number of processes ({N}); "
                          f"each process trains on an equal share of the global batch, so use a multiple of {N}")
    if not main:
        echo = _silent
    if main:
        _check_writable(run_dir)
    ckpts = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
    if not resume and main:
        _clear_run(run_dir)
    ck = ckpts.load_latest() if resume else None
    cfg_dict = cfg.to_dict()
    if ck is not None:
        diff = _resumable(ck.meta.get("config", {}), cfg_dict)
        if diff:
            raise ConfigError(f"{run_dir} holds a checkpoint of a different experiment (keys differ: "
                              f"{', '.join(diff)}); use another --run-dir or the same config")
    if main:
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
        was = ck.meta.get("world_size", 1)
        echo(f"resuming {run_dir} from {ck.path.name} (step {start}"
             f"{f', written by {was} processes, now {N}' if was != N else ''})")
    if N > 1:
        got = float(dist.all_mean(mx.array(float(start))))
        if got != start:
            raise TrainingError(f"the {N} processes start from different steps (rank {R}: {start}, mean {got}); "
                                f"every process must see the same run directory {run_dir}")
    step_fn = make_train_step(task.objective, optimizer, compile=cfg.train.compile,
                              grad_reduce=dist.all_mean if N > 1 else None)
    states = StateSnapshots(module, optimizer)
    total = cfg.train.steps
    # SIGINT/SIGTERM from here on stop the run cleanly (after a step, with a checkpoint), also
    # while the data and the first step are still being prepared (slow on a cold GPU)
    sig = _Signals().__enter__()
    try:
        log = (MetricsLog(run_dir, cfg.log.tensorboard, resume_step=start if ck is not None else None)
               if main else _NullLog())
        prog = Progress(total, start, cfg.log.progress if main else "off", desc=cfg.name)
        batches = task.data.batches(cfg.seed, start)
    except BaseException:
        sig.__exit__()
        raise
    saved = {"step": None}

    def save(step: int, is_best: bool = False, **extra) -> Path | None:
        if not main:
            return None
        epoch, pos = task.data.position(step)
        meta = {"step": step, "epoch": epoch, "batch_in_epoch": pos, "seed": cfg.seed,
                "next_key": step_key(cfg.seed, step).tolist(),
                "skipped": skipped, "best": best, "config": cfg_dict, "world_size": N,
                "genmlx_version": genmlx_version(), "time": time.time(), **extra}
        saved["step"] = step
        return ckpts.save(step, flat_params(module), flat_opt_state(optimizer), meta, best=is_best)

    def validate(step: int) -> dict:
        """Rank 0 only (the others go on to the next step, whose all-reduce waits for it)."""
        nonlocal best
        if not main:
            return {"improved": False}
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
        """Parameters, and the gradient of the objective at this step's key and (rank 0's)
        batch (an extra, uncompiled evaluation that changes no state)."""
        if log.tb is None:
            return
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        for name, p in tree_flatten(module.trainable_parameters()):
            log.histogram(f"params/{name}", p, step)
        _, grads = nn.value_and_grad(module, lambda k, d: task.objective.loss(k, d)[0])(key, data)
        for name, g in tree_flatten(grads):
            log.histogram(f"grads/{name}", g, step)

    limit = cfg.train.time_limit_s
    every = (cfg.checkpoint.every_steps, cfg.log.eval_every_steps, cfg.log.histogram_every_steps)
    t0 = time.time()

    def local_flags(sig) -> tuple[bool, bool]:
        """(a signal arrived, the time limit is reached) on this process."""
        return sig.signum is not None, limit > 0 and time.time() - t0 >= limit

    def dispatch(s: int, raw, sig) -> _Pending:
        """Build and enqueue step s (asynchronously): keys and data are pure functions of
        (seed, s, rank), so a discarded step is redone identically."""
        kd, ko = mx.random.split(step_key(cfg.seed, s))
        data = task.data.prepare_shard(kd, raw, R, N)
        key = dist.fold_rank(ko, R, N)
        snap = states.take()
        metrics = step_fn(key, data)
        stop = None
        if N > 1:  # every rank learns whether any rank wants to stop after step s (one tiny all-reduce)
            stop = mx.distributed.all_sum(mx.array([float(f) for f in local_flags(sig)]), group=dist.world())
        # only what every step needs (the non-finite check and the state): the other metrics
        # stay lazy and are computed on logging steps alone (fewer kernels per step on a GPU)
        mx.async_eval(metrics["loss"], metrics["grad_norm"], module.state, optimizer.state,
                      *(() if stop is None else (stop,)))
        return _Pending(s, raw, snap, metrics, key, data, stop)

    step = start
    stopped_early = False
    try:
        cur = dispatch(step, next(batches), sig) if step < total else None
        while step < total:
            p, cur = cur, None
            n1 = step + 1
            # step t+1 may run ahead unless something after step t needs its state
            if cfg.train.pipeline and n1 < total and all(n1 % e for e in every) and not (N == 1 and any(local_flags(sig))):
                cur = dispatch(n1, next(batches), sig)
            metrics = p.metrics
            loss, gn = float(metrics["loss"]), float(metrics["grad_norm"])
            if not _finite(loss, gn):
                redo = cur
                cur = None  # the already-dispatched step t+1 ran on the bad state: discard it
                states.restore(p.snap)
                if cfg.train.nan_policy == "stop" or skipped >= cfg.train.max_skipped:
                    path = save(step, nonfinite_step=step)
                    dist.barrier()  # the others exit (non-zero) only once rank 0 has written it
                    why = (f"non-finite loss or gradient in step {step + 1} of {total} (loss={loss}, grad_norm={gn})"
                           if cfg.train.nan_policy == "stop" else
                           f"more than train.max_skipped = {cfg.train.max_skipped} non-finite steps (the last in step {step + 1})")
                    raise NonFiniteError(f"{why}; the last good state (after {step} steps) was saved to {path}. "
                                         f"Lower optim.lr, or set train.nan_policy = \"skip\" to skip such steps.")
                skipped += 1
                log.scalars(step + 1, {"skipped_steps": skipped}, prefix="train/")
                if redo is not None:  # redo step t+1 from the rolled-back state, on the same batch
                    cur = dispatch(n1, redo.raw, sig)
            step += 1
            if step == start + 1:
                states.check()  # an optimizer that grew its state in the first update
            prog.update(1, epoch=task.data.position(step - 1)[0], loss=loss)
            if step % cfg.log.every_steps == 0 or step == total:
                lr = optimizer.learning_rate
                vals = {k: float(v) for k, v in metrics.items() if getattr(v, "size", 1) == 1}
                vals.update(lr=float(lr), skipped_steps=skipped, steps_per_s=(step - start) / max(time.time() - t0, 1e-9))
                log.scalars(step, vals, prefix="train/")
                prog.line()
            if step % cfg.log.histogram_every_steps == 0:
                log_histograms(step, p.key, p.data)
            is_best = False
            if step % cfg.log.eval_every_steps == 0 or step == total:
                v = validate(step)
                is_best = v["improved"] and cfg.checkpoint.keep_best
                log_images(step)
            if step % cfg.checkpoint.every_steps == 0 or step == total or is_best:
                save(step, is_best=is_best)
            if p.stop is not None:
                interrupted, timed_out = (bool(f > 0) for f in p.stop.tolist())
            else:
                interrupted, timed_out = local_flags(sig)
            if (interrupted or timed_out) and step < total:
                if cur is not None:  # discard the step dispatched ahead: back to the state after this one
                    states.restore(cur.snap)
                    cur = None
                path = save(step) if saved["step"] != step else ckpts.dir / f"ckpt-{step:09d}.json"
                dist.barrier()  # mlx.launch kills all ranks when one exits non-zero: let rank 0 finish writing
                if interrupted:
                    signum = sig.signum if sig.signum is not None else signal.SIGTERM
                    who = (f"{signal.Signals(signum).name} received" if sig.signum is not None
                           else "another process was interrupted")
                    raise Interrupted(f"{who}: stopped after step {step}; checkpoint {path}. "
                                      f"Run the same command again to resume.", signum)
                stopped_early = True
                echo(f"train.time_limit_s = {limit:g} s reached: stopped after step {step} of {total}; "
                     f"checkpoint {path}. Run the same command again to continue.")
                break
            if cur is None and step < total:
                cur = dispatch(step, next(batches), sig)
    except CheckpointError as e:
        raise TrainingError(str(e)) from e
    finally:
        sig.__exit__()
        prog.close()
        if step < total and not stopped_early:
            log.close()
    elapsed = time.time() - t0
    result = {"steps": step, "total_steps": total, "skipped_steps": skipped, "train_seconds": elapsed,
              "best_valid": best, "world_size": N, "stopped_early": stopped_early}
    if not main:
        log.close()
        return result
    if final_eval:
        result.update(evaluate_run(cfg, task, run_dir, log=log, echo=echo, step=step))
    log.hparams(_flat_hparams(cfg_dict), {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    log.close()
    (run_dir / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def _silent(*args, **kwargs) -> None:
    pass


def evaluate_run(cfg: ExperimentConfig, task, run_dir: Path, log: MetricsLog | None = None, echo=print,
                 step: int | None = None) -> dict:
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
        at = cfg.train.steps if step is None else step  # the step trained to (a time limit may stop early)
        log.scalars(at, {k: v for k, v in m.items() if isinstance(v, (int, float))}, prefix="test/")
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
