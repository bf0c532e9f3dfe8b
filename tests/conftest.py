"""Shared test fixtures.

Reference data (MNIST, posteriordb, sbibm) is read from the directory named by the
``GENMLX_DATA`` environment variable; when it is unset, the ``shared/data`` folder beside
the repository (``../shared/data``) is used if present. Tests needing a dataset that is not
there are skipped with a reason naming the missing path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# float32 matmuls at float32 precision: MLX's CUDA backend (and Metal's matrix units)
# default to TF32 (10-bit mantissa), beyond the float32 tolerances the oracles here
# derive; set before MLX's first matmul (MLX's own test harness does the same)
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import genmlx  # noqa: E402,F401  (loads the fast BLAS before mlx.core)

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    env = os.environ.get("GENMLX_DATA")
    if env:
        return Path(env)
    cand = REPO.parent / "shared" / "data"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def genmlx_data() -> Path:
    """The reference-data directory; skips the test when it is missing."""
    root = data_root()
    if root is None or not root.is_dir():
        pytest.skip("reference data not found: set GENMLX_DATA to the shared/data directory")
    return root


def require_data(root: Path, *parts: str) -> Path:
    """``root/parts…``, skipping the calling test (visibly) when it does not exist."""
    p = root.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data missing: {p}")
    return p


def posteriordb_models():
    """``experiments/posteriordb/models.py`` as a module (the genmlx ports of the
    posteriordb models; loaded once, shared by the tests that use it)."""
    import importlib.util
    import sys

    name = "posteriordb_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "posteriordb" / "models.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
