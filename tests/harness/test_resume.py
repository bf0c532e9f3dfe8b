"""Exact resume: a run killed with SIGKILL at arbitrary moments and resumed ends with
bit-identical parameters and optimizer state to an uninterrupted run; SIGTERM writes a
checkpoint before exiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import genmlx  # noqa: F401
import mlx.core as mx

from genmlx.harness.checkpoint import CheckpointManager
from tests.harness.conftest import REPO, cli_env, run_cli, toy_config

STEPS = 150


def _final_arrays(run_dir, steps: int = STEPS) -> dict:
    ck = CheckpointManager(run_dir).load_latest()
    assert ck is not None and ck.meta["step"] == steps
    return {k: np.asarray(v) for k, v in ck.params + [("opt/" + k, v) for k, v in ck.opt_state]}


def _start(cfg, run_dir, *overrides):
    return subprocess.Popen([sys.executable, "-m", "genmlx", "train", str(cfg), "--run-dir", str(run_dir), "--no-eval",
                             *overrides],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, run_dir, min_step: int, extra_delay: float) -> None:
    """SIGKILL once a checkpoint at step ≥ min_step exists, after ``extra_delay`` s."""
    mgr = CheckpointManager(run_dir)
    t0 = time.time()
    while time.time() - t0 < 120:
        if proc.poll() is not None:
            return
        if any(s >= min_step for s in mgr.steps()):
            break
        time.sleep(0.01)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    cfg = toy_config(tmp_path, steps=STEPS, every=7)
    run_cli("train", cfg, "--run-dir", tmp_path / "ref", "--no-eval", check=True)
    ref = _final_arrays(tmp_path / "ref")

    run = tmp_path / "killed"
    kills = 0
    # kill points: right after a checkpoint appears, and a little later (mid-step or
    # mid-write); each resumed run continues from the newest good checkpoint
    for min_step, delay in ((14, 0.0), (49, 0.013), (98, 0.031)):
        p = _start(cfg, run)
        _kill_when(p, run, min_step, delay)
        kills += p.returncode == -signal.SIGKILL
    assert kills >= 2, "the kills came too late to interrupt the runs"
    r = run_cli("train", cfg, "--run-dir", run, "--no-eval", check=True)
    assert "resuming" in r.stdout
    got = _final_arrays(run)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), f"{k} differs after kill-and-resume"
    # the metrics log has no duplicated steps after the resumes
    import json

    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if '"train/loss"' in l]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_kill_and_resume_of_an_amortized_objective(tmp_path):
    """The digits IWAE (compiled step, dynamic binarization, validation with the guide as
    proposal) killed once mid-run also resumes bit-identically."""
    cfg = REPO / "experiments" / "digits_vae.toml"
    ov = ["train.steps=60", "checkpoint.every_steps=9", "log.eval_every_steps=20", "log.valid_examples=20",
          "log.histogram_every_steps=30", "log.progress=lines"]
    run_cli("train", cfg, "--run-dir", tmp_path / "ref", "--no-eval", *ov, check=True)
    p = _start(cfg, tmp_path / "k", *ov)
    _kill_when(p, tmp_path / "k", 27, 0.02)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run_cli("train", cfg, "--run-dir", tmp_path / "k", "--no-eval", *ov, check=True)
    ref, got = _final_arrays(tmp_path / "ref", 60), _final_arrays(tmp_path / "k", 60)
    assert sorted(got) == sorted(ref)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path):
    cfg = toy_config(tmp_path, steps=100000, every=100000)
    run = tmp_path / "run"
    p = _start(cfg, run)
    t0 = time.time()
    while time.time() - t0 < 120 and not (run / "metrics.jsonl").exists():
        time.sleep(0.01)
    # at once: the handler is in place before the log exists (on a cold GPU the data and
    # the first step took long enough for a signal to find the default handler)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received" in out and "Run the same command again to resume" in out
    import re

    stopped = int(re.search(r"stopped after step (\d+)", out).group(1))
    assert 0 < stopped < 100000
    assert CheckpointManager(run).steps()[-1] == stopped
    assert CheckpointManager(run).load_latest().meta["step"] == stopped


def test_changed_config_is_refused_on_resume(tmp_path):
    cfg = toy_config(tmp_path, steps=20, every=10)
    run_cli("train", cfg, "--run-dir", tmp_path / "r", "--no-eval", check=True)
    r = run_cli("train", cfg, "--run-dir", tmp_path / "r", "--no-eval", "optim.lr=0.5")
    assert r.returncode == 2 and "keys differ: optim.lr" in r.stderr
    # train.steps may change: training continues to the new total
    r = run_cli("train", cfg, "--run-dir", tmp_path / "r", "--no-eval", "train.steps=30", check=True)
    assert "resuming" in r.stdout and CheckpointManager(tmp_path / "r").steps()[-1] == 30
