"""Data-parallel training (``mlx.launch -n 2 --backend ring``) and the pipelined loop.

Two processes on tiny toy configs:
- gradient averaging is exact: with a key-free loss, the 2-process SGD trajectory equals
  the 1-process one on the full batch (float rounding), each rank saw its disjoint half
  of every global batch, and both ranks hold bit-identical parameters after every step;
- the amortized (IWAE) compiled step keeps the ranks bit-identical too;
- a NaN on one rank only is rolled back on both (the decision uses the all-reduced loss);
  SIGTERM to one rank stops both after the same step, with rank 0's checkpoint;
- rank 0 alone writes logs, checkpoints and prints; a batch size not divisible by the
  number of processes is a ConfigError naming data.batch_size;
- resume 2 → 1 and 1 → 2 processes.
One process: the pipelined loop is bit-identical to the unpipelined one (with skipped
non-finite steps), and ``train.time_limit_s`` stops early with a resumable checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import genmlx  # noqa: F401
import mlx.core as mx

from genmlx.harness.checkpoint import CheckpointManager
from genmlx.harness.config import load_config
from genmlx.harness.runner import train
from genmlx.harness.step import step_key
from tests.harness.conftest import REPO, cli_env, run_cli, toy_config
from tests.harness.test_faults import _task as flaky_task

SEED = 3
EXACT_STEPS, FLAKY_STEPS, FLAKY_RATE = 6, 30, 0.2

WORKER = r'''
"""Worker of tests/harness/test_distributed.py: run as 1 process or under mlx.launch."""
import json, sys
from pathlib import Path

import genmlx  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

from genmlx import cli, distributed as dist
from genmlx.harness import runner
from genmlx.harness.config import load_config
from genmlx.harness.zoo import Task, toy

out, toml, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
R, N = dist.rank(), dist.size()
records = []
_orig = runner.make_train_step


def recording(objective, optimizer, **kw):
    """The harness step, recording each call's key, data and resulting parameters."""
    fn = _orig(objective, optimizer, **kw)
    mod = objective.trainable()

    def step(key, data):
        m = fn(key, data)
        records.append((key, data, dict(tree_flatten(mod.parameters()))))
        return m

    return step


runner.make_train_step = recording


class Exact(toy.ToyObjective):
    """The toy autoencoder loss without input noise: the mean over the batch of a
    deterministic per-example loss, so the mean of the N shard gradients equals the
    full-batch gradient exactly (up to float rounding)."""

    def loss(self, key, x):
        err = mx.mean(mx.sum(mx.square(self.net(x) - x), axis=-1))
        return err, {"mse": err}


class RankFlaky(toy.ToyObjective):
    """The toy loss, NaN on rank 1 only, at the steps whose key draws u < rate."""

    def loss(self, key, x):
        loss, m = super().loss(key, x)
        bad = (mx.random.uniform(key=mx.random.split(key)[1]) < RATE) & (R == 1)
        return mx.where(bad, mx.array(float("nan")), loss), m


def run(name, obj_cls, overrides, config=None):
    cfg = load_config(config or toml, overrides)
    if obj_cls is None:  # the zoo's task (the amortized objectives' compiled step)
        from genmlx.harness.zoo import build_task

        task = build_task(cfg)
        obj = task.objective
    else:
        obj = obj_cls(seed=cfg.seed)
        data = toy.toy_data(cfg.data.batch_size)
        task = Task(obj, data, validate=lambda k, K: toy.toy_validate(obj, data, k, K),
                    evaluate=lambda k, e: toy.toy_evaluate(obj, data, k))
    records.clear()
    res = runner.train(cfg, out / f"{name}-n{N}", task=task, final_eval=False, echo=lambda *a: None)
    arrays = {}
    for i, (key, x, params) in enumerate(records):
        arrays[f"{i}/key"] = key
        arrays[f"{i}/data"] = x
        arrays.update({f"{i}/p/{k}": v for k, v in params.items()})
    arrays.update({f"final/{k}": v for k, v in tree_flatten(obj.trainable().parameters())})
    mx.save_safetensors(str(out / f"{name}-n{N}-r{R}.safetensors"), arrays)
    (out / f"{name}-n{N}-r{R}.json").write_text(json.dumps(res))


RATE = float(sys.argv[4])
if phase == "one":
    run("exact", Exact, ["log.progress=off", "optim.name=sgd", "optim.lr=0.05", f"train.steps={sys.argv[5]}", "checkpoint.every_steps=3"])
    rc = [cli.main(["train", toml, "--run-dir", str(out / "B"), "--no-eval", "train.steps=20"])]
elif phase == "two":
    run("exact", Exact, ["log.progress=off", "optim.name=sgd", "optim.lr=0.05", f"train.steps={sys.argv[5]}", "checkpoint.every_steps=3"])
    run("digits", None, ["log.progress=off", "train.steps=4", "log.valid_examples=10", "log.tensorboard=false",
                         "data.batch_size=16", "eval.particles=10"], config=sys.argv[7])
    run("flaky", RankFlaky, ["log.progress=off", "train.nan_policy=skip", f"train.steps={sys.argv[6]}", "checkpoint.every_steps=7"])
    rc = [cli.main(["train", toml, "--run-dir", str(out / "bad"), "--no-eval", "data.batch_size=15"]),
          cli.main(["train", toml, "--run-dir", str(out / "A"), "--no-eval", "train.steps=20"]),
          cli.main(["train", toml, "--run-dir", str(out / "B"), "--no-eval", "train.steps=40"])]
elif phase == "sig":  # a long run; the test sends SIGTERM to rank 1 only
    import os

    (out / f"pid-r{R}").write_text(str(os.getpid()))
    rc = [cli.main(["train", toml, "--run-dir", str(out / "S"), "--no-eval", "train.steps=1000000",
                    "checkpoint.every_steps=1000000", "log.eval_every_steps=1000000"])]
(out / f"rc-{phase}-r{R}.json").write_text(json.dumps(rc))
'''


def _mlx_launch() -> Path | None:
    p = Path(sys.executable).parent / "mlx.launch"
    if p.exists():
        return p
    w = shutil.which("mlx.launch")
    return Path(w) if w else None


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(200):
        p = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair found")


def _load(path: Path) -> dict:
    return {k: np.asarray(v) for k, v in mx.load(str(path)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1 (one process): the exact reference and a 20-step CLI run B. Phase 2
    (mlx.launch -n 2): exact, rank-flaky, a bad batch size, a 20-step CLI run A and run
    B resumed to 40 steps. Phase 3 (one process): run A resumed to 40 steps."""
    launch = _mlx_launch()
    if launch is None:
        pytest.skip("mlx.launch is not installed (it comes with the mlx package)")
    if not mx.distributed.is_available("ring"):
        pytest.skip("MLX's ring distributed backend is not available in this build")
    tmp = tmp_path_factory.mktemp("dist")
    toml = toy_config(tmp, steps=40, every=10)
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    args = [str(worker), str(tmp), str(toml)]
    extra = [str(FLAKY_RATE), str(EXACT_STEPS), str(FLAKY_STEPS), str(REPO / "experiments" / "digits_vae.toml")]
    t0 = time.time()
    one = subprocess.run([sys.executable, *args, "one", *extra], cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stdout + one.stderr
    t1 = time.time()
    two = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "-p", str(_free_port_pair()),
                          "--python", sys.executable, *args, "two", *extra], cwd=REPO, env=cli_env(),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    if two.returncode != 0 and not (tmp / "rc-two-r0.json").exists() and "ring" in two.stderr.lower():
        pytest.skip(f"the ring backend could not start here: {two.stderr[-500:]}")
    assert two.returncode == 0, two.stdout + two.stderr
    t2 = time.time()
    three = run_cli("train", toml, "--run-dir", tmp / "A", "--no-eval", "train.steps=40", check=True)
    print(f"phases: one {t1 - t0:.1f} s, two {t2 - t1:.1f} s, three {time.time() - t2:.1f} s")
    return {"dir": tmp, "two": two, "three": three}


def test_gradient_average_matches_the_full_batch_step(runs):
    d = runs["dir"]
    ref = _load(d / "exact-n1-r0.safetensors")
    r0, r1 = _load(d / "exact-n2-r0.safetensors"), _load(d / "exact-n2-r1.safetensors")
    names = sorted(k[len("final/"):] for k in ref if k.startswith("final/"))
    moved = 0.0
    for i in range(EXACT_STEPS):
        # each rank trained on its disjoint half of the same global batch
        assert r0[f"{i}/data"].shape[0] == r1[f"{i}/data"].shape[0] == ref[f"{i}/data"].shape[0] // 2
        assert np.array_equal(np.concatenate([r0[f"{i}/data"], r1[f"{i}/data"]]), ref[f"{i}/data"])
        # ... with its own objective key
        assert not np.array_equal(r0[f"{i}/key"], r1[f"{i}/key"])
        for n in names:
            a, b, c = r0[f"{i}/p/{n}"], r1[f"{i}/p/{n}"], ref[f"{i}/p/{n}"]
            assert np.array_equal(a, b), f"step {i}: ranks hold different {n}"
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=2e-6, err_msg=f"step {i}: {n} vs the 1-process step")
    for n in names:
        moved = max(moved, float(np.max(np.abs(ref[f"final/{n}"] - ref[f"0/p/{n}"]))))
    assert moved > 1e-2, "the SGD steps barely moved the parameters: the comparison would be vacuous"
    # the logged loss and gradient norm are those of the global batch (all-reduced), not rank 0's
    last = [json.loads((d / f"exact-n{n}" / "metrics.jsonl").read_text().splitlines()[0]) for n in (1, 2)]
    assert last[0]["step"] == last[1]["step"] == EXACT_STEPS
    for tag in ("train/loss", "train/grad_norm"):
        assert last[1][tag] == pytest.approx(last[0][tag], rel=1e-5)


def test_amortized_step_keeps_ranks_identical(runs):
    """The digits IWAE (gm.amortized.make_train_step with the grad_reduce hook, compiled):
    both ranks hold bit-identical parameters after every step, with different keys."""
    d = runs["dir"]
    a, b = _load(d / "digits-n2-r0.safetensors"), _load(d / "digits-n2-r1.safetensors")
    params = [k for k in a if "/p/" in k]
    assert len({k.split("/")[0] for k in params}) == 4
    assert all(np.array_equal(a[k], b[k]) for k in params)
    assert not np.array_equal(a["0/data"], b["0/data"]) and a["0/data"].shape[0] == 8
    assert not np.array_equal(a["0/p/" + params[0].split("/p/")[1]], a["3/p/" + params[0].split("/p/")[1]])


def test_a_nan_on_one_rank_is_rolled_back_on_all(runs):
    from genmlx.distributed import fold_rank

    d = runs["dir"]
    bad = []
    for s in range(FLAKY_STEPS):
        _, ko = mx.random.split(step_key(SEED, s))
        k1 = fold_rank(ko, 1, 2)
        if mx.random.uniform(key=mx.random.split(k1)[1]).item() < FLAKY_RATE:
            bad.append(s)
    assert 2 <= len(bad) < FLAKY_STEPS // 2
    res = [json.loads((d / f"flaky-n2-r{r}.json").read_text()) for r in (0, 1)]
    assert res[0]["skipped_steps"] == res[1]["skipped_steps"] == len(bad)
    a, b = _load(d / "flaky-n2-r0.safetensors"), _load(d / "flaky-n2-r1.safetensors")
    finals = [k for k in a if k.startswith("final/")]
    assert finals and all(np.array_equal(a[k], b[k]) and np.isfinite(a[k]).all() for k in finals)
    ck = CheckpointManager(d / "flaky-n2").load_latest()
    assert ck.meta["skipped"] == len(bad) and ck.meta["world_size"] == 2
    assert int(np.asarray(dict(ck.opt_state)["step"])) == FLAKY_STEPS - len(bad)


def test_rank_zero_alone_writes_and_prints(runs):
    d, two = runs["dir"], runs["two"]
    out = two.stdout + two.stderr
    rcs = [json.loads((d / f"rc-two-r{r}.json").read_text()) for r in (0, 1)]
    assert rcs[0] == rcs[1] == [2, 0, 0]
    assert "data.batch_size: 15 is not divisible by the number of processes (2)" in out
    # one progress stream and one resume message, not two
    assert out.count("toy: 100%") == 2, out  # runs A and B, rank 0 only
    assert out.count("resuming") == 1
    lines = (d / "A" / "metrics.jsonl").read_text().splitlines()  # 20 steps on 2 processes, then 20 on one
    steps = [json.loads(l)["step"] for l in lines if '"train/loss"' in l]
    assert steps == [20, 40], "metrics.jsonl has duplicated records (written by more than one rank?)"
    ck = CheckpointManager(d / "B").load_latest()
    assert ck.meta["step"] == 40 and ck.meta["world_size"] == 2
    assert not list(d.glob("**/.tmp-*")), "leftover temporary files"


def test_resume_across_device_counts(runs):
    d = runs["dir"]
    # 1 -> 2: B was trained to 20 steps by one process, then resumed by two
    ckB = CheckpointManager(d / "B").load_latest()
    assert ckB.meta["step"] == 40 and ckB.meta["world_size"] == 2
    stepsB = [json.loads(l)["step"] for l in (d / "B" / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in l]
    assert stepsB == [20, 40]
    assert "written by 1 processes, now 2" in runs["two"].stdout
    # 2 -> 1: A was trained to 20 steps by two processes, then resumed by one
    assert "written by 2 processes, now 1" in runs["three"].stdout
    ckA = CheckpointManager(d / "A").load_latest()
    assert ckA.meta["step"] == 40 and ckA.meta["world_size"] == 1
    assert all(np.isfinite(np.asarray(v)).all() for _, v in ckA.params)


def test_a_signal_to_one_rank_stops_all_after_the_same_step(runs):
    """SIGTERM to rank 1 alone: the stop request is all-reduced with the step, every rank
    stops after the same step, rank 0 writes that checkpoint, both exit with 128 + 15."""
    import signal

    d = runs["dir"]
    toml = d / "toy.toml"
    p = subprocess.Popen([str(_mlx_launch()), "-n", "2", "--backend", "ring", "-p", str(_free_port_pair()),
                          "--python", sys.executable, str(d / "worker.py"), str(d), str(toml), "sig", "0"],
                         cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < 60 and not ((d / "pid-r1").exists() and (d / "S" / "metrics.jsonl").exists()):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(int((d / "pid-r1").read_text()), signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    rcs = [json.loads((d / f"rc-sig-r{r}.json").read_text()) for r in (0, 1)]
    assert rcs == [[128 + signal.SIGTERM]] * 2, out
    assert "another process was interrupted: stopped after step" in out
    stopped = int(re.search(r"stopped after step (\d+)", out).group(1))
    ck = CheckpointManager(d / "S").load_latest()
    assert ck.meta["step"] == stopped > 0 and ck.meta["world_size"] == 2


# -- one process: pipelining and the time limit ---------------------------------------------------
def _state(run_dir) -> dict:
    ck = CheckpointManager(run_dir).load_latest()
    return {k: np.asarray(v) for k, v in ck.params + [("opt/" + k, v) for k, v in ck.opt_state]}


def test_pipelined_loop_is_bit_identical_with_rollbacks(tmp_path):
    got = {}
    for pipe in (True, False):
        cfg = load_config(toy_config(tmp_path, steps=50, every=13),
                          ["train.nan_policy=skip", f"train.pipeline={str(pipe).lower()}", "log.progress=off"])
        res = train(cfg, tmp_path / f"p{pipe}", task=flaky_task(cfg, 0.2), final_eval=False, echo=lambda *a: None)
        got[pipe] = (res["skipped_steps"], _state(tmp_path / f"p{pipe}"))
    assert got[True][0] == got[False][0] >= 3
    a, b = got[True][1], got[False][1]
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_time_limit_stops_early_and_resumes(tmp_path):
    cfg = load_config(toy_config(tmp_path, steps=10**6, every=10**6), ["train.time_limit_s=0.5", "log.progress=off"])
    res = train(cfg, tmp_path / "r", final_eval=False, echo=lambda *a: None)
    done = res["steps"]
    assert res["stopped_early"] and 0 < done < 10**6
    assert json.loads((tmp_path / "r" / "results.json").read_text())["stopped_early"] is True
    assert CheckpointManager(tmp_path / "r").load_latest().meta["step"] == done
    cfg2 = load_config(toy_config(tmp_path, steps=done + 5, every=10**6), ["log.progress=off"])
    res2 = train(cfg2, tmp_path / "r", final_eval=False, echo=lambda *a: None)
    assert res2["steps"] == done + 5 and not res2["stopped_early"]
    # the same total in one go gives bit-identical parameters (the stop is an exact resume point)
    train(cfg2, tmp_path / "ref", final_eval=False, echo=lambda *a: None)
    a, b = _state(tmp_path / "r"), _state(tmp_path / "ref")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_distributed_helpers_on_one_process():
    from genmlx import distributed as dist

    assert dist.size() == 1 and dist.rank() == 0 and dist.is_main()
    tree = {"a": mx.array([1.0, 2.0]), "b": [mx.array(3, dtype=mx.int32)], "c": None}
    assert dist.all_mean(tree) is tree  # identity on one process
    assert dist.shard_bounds(12, 1, 3) == (4, 8)
    x = mx.arange(12).reshape(6, 2)
    assert np.array_equal(np.asarray(dist.shard(x, 0, 2, 3)), np.asarray(x[4:6]))
    with pytest.raises(ValueError, match="cannot split 10 items evenly over 4"):
        dist.shard_bounds(10, 0, 4)
    k = mx.random.key(5)
    assert np.array_equal(np.asarray(dist.fold_rank(k, 0, 1)), np.asarray(k))
    assert not np.array_equal(np.asarray(dist.fold_rank(k, 0, 2)), np.asarray(dist.fold_rank(k, 1, 2)))
    dist.barrier()


def test_batch_size_not_divisible_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    from genmlx import distributed as dist
    from genmlx.harness.config import ConfigError

    monkeypatch.setattr(dist, "size", lambda: 3)
    cfg = load_config(toy_config(tmp_path, steps=5), ["data.batch_size=16"])
    with pytest.raises(ConfigError, match=r"data.batch_size: 16 is not divisible by the number of processes \(3\)"):
        train(cfg, tmp_path / "r", final_eval=False, echo=lambda *a: None)


def test_time_limited_run_logs_its_test_metrics_at_the_step_reached(tmp_path):
    cfg = load_config(toy_config(tmp_path, steps=10**6, every=10**6), ["train.time_limit_s=0.3", "log.progress=off"])
    res = train(cfg, tmp_path / "r", echo=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tested = [r["step"] for r in rows if any(k.startswith("test/") for k in r)]
    assert res["stopped_early"] and tested == [res["steps"]]
