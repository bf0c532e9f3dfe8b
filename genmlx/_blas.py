"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links the netlib *reference* BLAS (about 6 GFLOP/s for a
float32 1024² matmul). Loading OpenBLAS from the ``cmeel-openblas`` wheel with
``RTLD_GLOBAL`` before ``mlx.core`` is imported makes MLX's BLAS symbols resolve to
OpenBLAS (about 30× faster, identical results). This runs once, from
``import genmlx``; set ``GENMLX_OPENBLAS=0`` to keep the reference BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys

_state = {"blas": None, "path": None}


def _openblas_path() -> str | None:
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        for cand in glob.glob(os.path.join(entry, "cmeel.prefix", "lib", "libopenblas.so*")):
            return cand
    return None


def _mlx_uses_reference_blas() -> bool:
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    return bool(glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas-*.so*")))


def ensure_fast_blas() -> str:
    """Load OpenBLAS globally when MLX would otherwise use the reference BLAS.

    Returns a one-line description of the BLAS in use. Must run before ``mlx.core``
    is imported to take effect; afterwards it only reports.
    """
    if _state["blas"] is not None:
        return describe_blas()
    if not sys.platform.startswith("linux"):
        _state["blas"] = "platform BLAS (Accelerate on macOS / CUDA libraries on GPU)"
        return describe_blas()
    if os.environ.get("GENMLX_OPENBLAS", "1") in ("0", "false", "False", "no"):
        _state["blas"] = "reference BLAS (GENMLX_OPENBLAS=0)" if _mlx_uses_reference_blas() else "MLX's own BLAS"
        return describe_blas()
    if not _mlx_uses_reference_blas():
        _state["blas"] = "MLX's own BLAS"
        return describe_blas()
    if "mlx.core" in sys.modules:
        _state["blas"] = "reference BLAS (mlx.core was imported before genmlx; import genmlx first)"
        return describe_blas()
    path = _openblas_path()
    if path is None:
        _state["blas"] = "reference BLAS (install cmeel-openblas for ~30x faster matmul)"
        return describe_blas()
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _state["blas"] = f"reference BLAS (loading {path} failed: {e})"
        return describe_blas()
    _state["blas"], _state["path"] = "OpenBLAS", path
    return describe_blas()


def describe_blas() -> str:
    """One line saying which BLAS MLX's CPU backend uses in this process."""
    b = _state["blas"] or "not determined (ensure_fast_blas not run)"
    return f"genmlx BLAS: {b}" + (f" [{_state['path']}]" if _state["path"] else "")
