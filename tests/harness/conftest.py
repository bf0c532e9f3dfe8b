"""Shared helpers of the harness tests: tiny configs and subprocess runs of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TOY = """
name = "toy"
seed = 3
[model]
kind = "toy"
[data]
dataset = "toy"
binarization = "none"
batch_size = 16
[train]
steps = {steps}
[checkpoint]
every_steps = {every}
keep_last = 2
[log]
every_steps = 20
eval_every_steps = 40
histogram_every_steps = 40
progress = "lines"
"""


def toy_config(tmp: Path, steps: int = 120, every: int = 10, name: str = "toy.toml") -> Path:
    p = tmp / name
    p.write_text(TOY.format(steps=steps, every=every))
    return p


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, timeout: float = 240, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "genmlx", *map(str, args)], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"genmlx {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def toy_toml(tmp_path) -> Path:
    return toy_config(tmp_path)
