"""Sweeps: a grid with one deliberately diverging trial and one invalid trial; the
failures are recorded, the other trials finish, tables are written, reruns resume."""

from __future__ import annotations

import csv
import json

import pytest

from genmlx.harness.config import ConfigError
from genmlx.harness.sweep import load_sweep, run_sweep
from tests.harness.conftest import run_cli, toy_config


def _sweep(tmp_path, grid: str, extra: str = "") -> str:
    toy_config(tmp_path, steps=30, every=10)
    p = tmp_path / "sweep.toml"
    p.write_text(f'name = "s"\nbase = "toy.toml"\nworkers = 2\n'
                 f'overrides = ["optim.name=\\"sgd\\"", "log.eval_every_steps=30"]\n{extra}\n[grid]\n{grid}\n')
    return p


def test_grid_with_failing_trials(tmp_path):
    # lr = 1e30 diverges at the first step (nan_policy stop -> exit 1); lr = -1 is invalid
    p = _sweep(tmp_path, '"optim.lr" = [0.01, 1e30, -1.0]\n"seed" = [1]')
    r = run_cli("sweep", p, "--sweep-dir", tmp_path / "sw", check=True, timeout=300)
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    assert len(rows) == 3
    status = {(float(r["optim.lr"]), int(r["seed"])): r for r in rows}
    for seed in (1,):
        assert status[(0.01, seed)]["status"] == "ok" and float(status[(0.01, seed)]["test_mse"]) > 0
        assert status[(1e30, seed)]["status"] == "failed"
        assert "non-finite loss or gradient in step" in status[(1e30, seed)]["error"]
        assert status[(-1.0, seed)]["status"] == "failed"
        assert "optim.lr: expected a positive float, got -1.0" in status[(-1.0, seed)]["error"]
    md = (tmp_path / "sw" / "results.md").read_text()
    assert md.startswith("| trial | optim.lr | seed | status |") and md.count("\n") == 5
    # rerun: everything is recorded, nothing runs again
    r2 = run_cli("sweep", p, "--sweep-dir", tmp_path / "sw", check=True)
    assert "3 trials, 3 done" in r2.stdout and "trial 000" not in r2.stdout
    # a half-finished sweep resumes the missing trial only
    import shutil

    shutil.rmtree(tmp_path / "sw" / "trial-000")
    r3 = run_cli("sweep", p, "--sweep-dir", tmp_path / "sw", check=True)
    assert "3 trials, 2 done" in r3.stdout and "trial 000 ok" in r3.stdout


def test_random_search_is_seeded_and_validated(tmp_path):
    toy_config(tmp_path)
    p = tmp_path / "r.toml"
    p.write_text('base = "toy.toml"\nmode = "random"\ntrials = 5\nseed = 3\n[random]\n'
                 '"optim.lr" = { log_uniform = [1e-4, 1e-1] }\n"model.kind" = { choice = ["toy"] }\n'
                 '"train.steps" = { int_uniform = [10, 20] }\n')
    a, b = load_sweep(p)["trials"], load_sweep(p)["trials"]
    assert a == b and len(a) == 5
    assert all(1e-4 <= t["optim.lr"] <= 1e-1 and 10 <= t["train.steps"] <= 20 for t in a)
    p.write_text('base = "toy.toml"\nmode = "random"\ntrials = 2\n[random]\n"optim.lr" = { normal = [0, 1] }\n')
    with pytest.raises(ConfigError, match="random.optim.lr: unknown distribution 'normal'"):
        load_sweep(p)
    p.write_text('base = "toy.toml"\nmode = "grd"\n')
    with pytest.raises(ConfigError, match='mode: expected "grid" or "random"'):
        load_sweep(p)
