"""NaN/inf policy: "stop" saves the last good state and raises a clear error; "skip"
rolls the step back, counts it, and training continues."""

from __future__ import annotations

import numpy as np
import pytest

import genmlx  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

from genmlx.harness.checkpoint import CheckpointManager
from genmlx.harness.config import load_config
from genmlx.harness.runner import NonFiniteError, train
from genmlx.harness.step import step_key
from genmlx.harness.zoo import Task, toy
from tests.harness.conftest import toy_config


class FlakyObjective(toy.ToyObjective):
    """The toy loss, made NaN on the steps whose key draws u < rate."""

    def __init__(self, rate: float, seed: int = 0):
        super().__init__(seed=seed)
        self.rate = rate

    def loss(self, key, x):
        loss, m = super().loss(key, x)
        bad = mx.random.uniform(key=mx.random.split(key)[1]) < self.rate
        loss = mx.where(bad, mx.array(float("nan")), loss)
        return loss, m


def _task(cfg, rate):
    obj = FlakyObjective(rate, cfg.seed)
    data = toy.toy_data(cfg.data.batch_size)
    return Task(obj, data, validate=lambda k, K: toy.toy_validate(obj, data, k, K),
                evaluate=lambda k, e: toy.toy_evaluate(obj, data, k))


def _bad_steps(cfg, rate, n):
    out = []
    for s in range(n):
        _, ko = mx.random.split(step_key(cfg.seed, s))
        if mx.random.uniform(key=mx.random.split(ko)[1]).item() < rate:
            out.append(s)
    return out


def test_skip_policy_counts_and_continues(tmp_path):
    cfg = load_config(toy_config(tmp_path, steps=60, every=20), ["train.nan_policy=skip"])
    bad = _bad_steps(cfg, 0.2, 60)
    assert 3 <= len(bad) < 30
    task = _task(cfg, 0.2)
    res = train(cfg, tmp_path / "run", task=task, final_eval=False)
    assert res["skipped_steps"] == len(bad)
    params = tree_flatten(task.objective.trainable().parameters())
    assert all(np.isfinite(np.asarray(v)).all() for _, v in params)
    # rolled-back steps leave Adam's step counter behind by exactly the skipped count
    ck = CheckpointManager(tmp_path / "run").load_latest()
    assert int(np.asarray(dict(ck.opt_state)["step"])) == 60 - len(bad)
    assert ck.meta["skipped"] == len(bad)


def test_skip_policy_gives_up_after_max_skipped(tmp_path):
    cfg = load_config(toy_config(tmp_path, steps=60), ["train.nan_policy=skip", "train.max_skipped=2"])
    with pytest.raises(NonFiniteError, match="more than train.max_skipped = 2 non-finite steps"):
        train(cfg, tmp_path / "run", task=_task(cfg, 0.2), final_eval=False)


def test_stop_policy_saves_last_good_state(tmp_path):
    cfg = load_config(toy_config(tmp_path, steps=60, every=1000))
    first = _bad_steps(cfg, 0.2, 60)[0]
    task = _task(cfg, 0.2)
    with pytest.raises(NonFiniteError) as e:
        train(cfg, tmp_path / "run", task=task, final_eval=False)
    msg = str(e.value)
    assert f"non-finite loss or gradient in step {first + 1} of 60" in msg
    assert f"after {first} steps" in msg and "train.nan_policy" in msg
    ck = CheckpointManager(tmp_path / "run").load_latest()
    assert ck.meta["step"] == first
    assert all(np.isfinite(np.asarray(v)).all() for _, v in ck.params)
    # the saved state equals the in-memory state (the bad update was rolled back)
    mem = dict(tree_flatten(task.objective.trainable().parameters()))
    assert all(np.array_equal(np.asarray(v), np.asarray(mem[k])) for k, v in ck.params)
