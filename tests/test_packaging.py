"""Project skeleton: pyproject metadata, README commands, .ci/run, and the Makefile's
test target (exit code 5 — no tests collected — must fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> list[str]:
    return [r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
            for r in reqs]


def test_pyproject_metadata(project):
    assert project["name"] == "genmlx"
    assert project["requires-python"] == ">=3.11"
    deps = project["dependencies"]
    for name in ("mlx", "mlx-data", "numpy", "tqdm", "tensorboardx", "cmeel-openblas"):
        assert name in _names(deps), f"dependency {name} missing"
    assert all("Linux" in d for d in deps if d.startswith("cmeel-openblas"))
    # MLX's Linux backends are extras; mlx-cpu and mlx-cuda-13 both ship mlx/lib/libmlx.so,
    # so no backend may be a base dependency (genmlx[cuda] would install both)
    assert not any(d.startswith("mlx[") for d in deps)
    extras = project["optional-dependencies"]
    assert any(d.startswith("mlx[cpu]") and "Linux" in d for d in extras["cpu"])
    assert any(d.startswith("mlx[cuda13]") for d in extras["cuda"])
    for name in ("pytest", "hypothesis", "scipy"):
        assert name in _names(extras["dev"])
    assert project["scripts"]["genmlx"] == "genmlx.cli:main"


def test_console_script_target_exists(project):
    module, func = project["scripts"]["genmlx"].split(":")
    assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"{module} is missing"
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_readme_opens_with_the_two_commands():
    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.strip()]
    block = lines[:6]
    assert any(ln.startswith("make run") for ln in block)
    assert any(ln.startswith("make test") for ln in block)


def test_ci_runs_the_readme_test_command():
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert "make test" in text and "set -e" in text


@pytest.fixture
def fake_venv(tmp_path) -> Path:
    """A stand-in .venv (this interpreter, install stamps newer than pyproject.toml) so
    `make test` runs pytest without installing anything."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"  # a wrapper, not a symlink: the real venv must be found
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    for stamp in (".stamp-dev", ".stamp-run"):
        (venv / stamp).touch()
    return venv


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("body, expect_ok", [
    ("", False),  # no tests collected: pytest exits 5, make test must fail
    ("def test_ok():\n    assert True\n", True),
    ("def test_bad():\n    assert False\n", False),
])
def test_make_test_exit_status(tmp_path, fake_venv, body, expect_ok):
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_x.py").write_text(body or "# nothing here\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "test", f"VENV={fake_venv}",
         f"PYTEST_ARGS={tests} -p no:cacheprovider"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
    if not body:
        assert "collected no tests" in proc.stderr
