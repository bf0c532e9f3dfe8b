"""The fast-BLAS loader (genmlx/_blas.py): which BLAS is active, and equal results.

Each configuration runs in a fresh subprocess, because the BLAS is chosen once per process
(before ``mlx.core`` loads). Results with OpenBLAS and with the reference BLAS must agree to
float32 rounding: for C = AB with inner size K, each entry of either result lies within
γ_K = K·ε₃₂ · (|A||B|)_ij of the exact (float64) product — the standard worst-case bound for
any summation order — and the two agree with each other to a few ε relative to the scale.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genmlx import _blas

REPO = Path(__file__).resolve().parent.parent
EPS32 = float(np.finfo(np.float32).eps)

_WORKLOAD = r"""
import json, sys, time
import genmlx as gm
import mlx.core as mx
import mlx.nn as nn
from genmlx._blas import active_blas_library

k = iter(mx.random.split(mx.random.key(0), 16))
out = {}
A = mx.random.normal((192, 320), key=next(k)); B = mx.random.normal((320, 160), key=next(k))
out["A"], out["B"] = A, B
out["AB"] = A @ B
out["AtB"] = A.T @ mx.random.normal((192, 96), key=next(k))
out["bmm"] = mx.random.normal((4, 33, 65), key=next(k)) @ mx.random.normal((4, 65, 17), key=next(k))
M = mx.random.normal((48, 48), key=next(k))
out["spd"] = M @ M.T / 48 + mx.eye(48)
out["chol"] = mx.linalg.cholesky(out["spd"], stream=mx.cpu)

mlp = nn.Sequential(nn.Linear(100, 128), nn.ReLU(), nn.Linear(128, 10))
mlp.update(nn.utils.tree_map(lambda p: 0.1 * mx.random.normal(p.shape, key=next(k)), mlp.parameters()))
x = mx.random.normal((64, 100), key=next(k)); y = mx.random.normal((64, 10), key=next(k))
loss_and_grad = nn.value_and_grad(mlp, lambda m, x, y: mx.mean((m(x) - y) ** 2))
loss, grads = loss_and_grad(mlp, x, y)
out["mlp_out"], out["mlp_loss"] = mlp(x), loss
out["mlp_grad_w0"], out["mlp_grad_w1"] = grads["layers"][0]["weight"], grads["layers"][2]["weight"]
mx.eval(out)
mx.save_safetensors(sys.argv[1], out)

a = mx.random.normal((512, 512), key=next(k)); b = mx.random.normal((512, 512), key=next(k))
for _ in range(3):
    mx.eval(a, b, a @ b)
times = []
for _ in range(10):
    t = time.perf_counter(); mx.eval(a @ b); times.append(time.perf_counter() - t)
print(json.dumps({"report": gm.describe_blas(), "active": active_blas_library(),
                  "gflops": 2 * 512**3 / min(times) / 1e9}))
"""


def _run(tmp_path: Path, tag: str, env_extra: dict, prelude: str = "") -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if k != "GENMLX_OPENBLAS"}
    # One OpenBLAS thread: on a loaded machine a 2-thread gemm can stall on a descheduled
    # thread, and the speed comparison below should not depend on the load.
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out_file = tmp_path / f"{tag}.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + _WORKLOAD, str(out_file)],
        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["stderr"] = proc.stderr
    import mlx.core as mx

    arrays = {k: np.array(v, dtype=np.float64) for k, v in mx.load(str(out_file)).items()}
    return info, arrays


def _openblas_expected() -> bool:
    if not sys.platform.startswith("linux") or not _blas._mlx_uses_reference_blas():
        return False
    try:
        importlib.metadata.distribution("cmeel-openblas")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(info, arrays) with the default loader and with GENMLX_OPENBLAS=0."""
    tmp = tmp_path_factory.mktemp("blas")
    return _run(tmp, "default", {}), _run(tmp, "optout", {"GENMLX_OPENBLAS": "0"})


def test_report_is_one_line_and_idempotent():
    line = _blas.describe_blas()
    assert line.startswith("genmlx BLAS: ") and "\n" not in line
    assert _blas.ensure_fast_blas() == line


def test_openblas_active_by_default(both):
    (info, _), _ = both
    if not _openblas_expected():
        pytest.skip("MLX does not use the reference BLAS here (or cmeel-openblas is absent)")
    assert info["report"].startswith("genmlx BLAS: OpenBLAS"), info["report"]
    assert info["active"] is not None and "libopenblas" in os.path.basename(info["active"])


def test_opt_out_keeps_reference_blas(both):
    _, (info, _) = both
    if not _blas._mlx_uses_reference_blas():
        pytest.skip("MLX does not ship the reference BLAS on this platform")
    assert "reference BLAS" in info["report"] and "GENMLX_OPENBLAS=0" in info["report"]
    assert info["active"] is None


def test_openblas_is_faster(both):
    """The point of the loader: OpenBLAS runs a 512² matmul several times faster (one
    thread: about 100 against 6 GFLOP/s on an idle machine; 3× leaves room for load)."""
    if not _openblas_expected():
        pytest.skip("no OpenBLAS to compare with")
    (fast, _), (ref, _) = both
    assert fast["gflops"] > 3 * ref["gflops"], (fast["gflops"], ref["gflops"])


def _check_product(c, a, b, name):
    """|C − AB| ≤ K ε₃₂ (|A||B|) elementwise, with AB exact in float64."""
    exact = a @ b
    bound = a.shape[-1] * EPS32 * (np.abs(a) @ np.abs(b)) + 1e-30
    assert np.all(np.abs(c - exact) <= bound), f"{name}: error beyond float32 rounding"


def test_results_match_between_blas(both):
    (_, fast), (_, ref) = both
    for name in ref:
        scale = np.max(np.abs(ref[name])) + 1e-30
        np.testing.assert_allclose(fast[name], ref[name], rtol=0, atol=64 * EPS32 * scale,
                                   err_msg=f"{name} differs between OpenBLAS and reference BLAS")
    for arrays in (fast, ref):
        _check_product(arrays["AB"], arrays["A"], arrays["B"], "A @ B")
        L = arrays["chol"]
        assert np.allclose(np.tril(L), L)
        np.testing.assert_allclose(L @ L.T, arrays["spd"], atol=200 * EPS32)


def test_mlx_imported_first_is_reported(tmp_path):
    if not _openblas_expected():
        pytest.skip("only meaningful where OpenBLAS would be loaded")
    info, _ = _run(tmp_path, "late", {}, prelude="import mlx.core\n")
    assert "import genmlx first" in info["report"] and info["active"] is None
    assert "RuntimeWarning" in info["stderr"] and "import genmlx before mlx.core" in info["stderr"]


def test_soname_rewrite_of_bundled_gfortran():
    """The in-memory copy keeps NEEDED entries and gets SONAME libgfortran.so.5."""
    libs = _blas._bundled_gfortrans()
    if not libs:
        pytest.skip("no wheel-bundled libgfortran here")
    data = Path(libs[0]).read_bytes()
    _, needed, soname = _blas._elf_dynamic(data)
    new = _blas._renamed_copy(data, "libgfortran.so.5")
    assert len(new) == len(data)
    _, needed2, soname2 = _blas._elf_dynamic(new)
    assert soname2[1] == "libgfortran.so.5" and needed2 == needed and soname[1] != soname2[1]
    with pytest.raises(ValueError, match="ELF"):
        _blas._elf_dynamic(b"not an elf file at all")


def test_reference_blas_found_in_any_mlx_backend_wheel(tmp_path, monkeypatch):
    """mlx-cpu ships mlx_cpu.libs, mlx-cuda-13 ships mlx_cuda_13.libs: both are detected."""
    (tmp_path / "mlx" / "lib").mkdir(parents=True)
    (tmp_path / "mlx" / "lib" / "libmlx.so").touch()
    monkeypatch.setattr(_blas, "_mlx_locations", lambda: [str(tmp_path / "mlx")])
    assert _blas._mlx_libs_dir() is None and not _blas._mlx_uses_reference_blas()
    libs = tmp_path / "mlx_cuda_13.libs"
    libs.mkdir()
    (libs / "libblas-0123abcd.so.3.10.0").touch()
    assert _blas._mlx_libs_dir() == str(libs)
    _blas._check_linux_backend()  # a backend is present: no error


def test_missing_linux_backend_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "mlx").mkdir()
    monkeypatch.setattr(_blas, "_mlx_locations", lambda: [str(tmp_path / "mlx")])
    _blas._check_linux_backend()  # mlx.core imports here (another layout): no error
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # now `import mlx.core` fails
    with pytest.raises(ImportError, match=r"genmlx\[cpu\].*genmlx\[cuda\]"):
        _blas._check_linux_backend()


# -- worker-thread policy (genmlx._blas.blas_threads_for) -----------------------------
def test_thread_policy_small_work(monkeypatch):
    """Small work runs with one OpenBLAS thread (or GENMLX_SMALL_BLAS_THREADS), large
    work and GPU runs keep the count, 'keep' disables it, and the count is restored."""
    if _blas.get_blas_threads() is None:
        pytest.skip("OpenBLAS is not loaded (MLX's reference BLAS is in use): there are no worker threads whose count the policy could set")
    before = _blas.get_blas_threads()
    try:
        _blas.set_blas_threads(2)
        monkeypatch.delenv("GENMLX_SMALL_BLAS_THREADS", raising=False)
        with _blas.blas_threads_for(1000):
            assert _blas.get_blas_threads() == 1
        assert _blas.get_blas_threads() == 2
        with _blas.blas_threads_for(_blas.SMALL_WORK_ELEMENTS):  # not small
            assert _blas.get_blas_threads() == 2
        with _blas.blas_threads_for(1000, cpu=False):  # GPU: matmuls are not OpenBLAS's
            assert _blas.get_blas_threads() == 2
        monkeypatch.setenv("GENMLX_SMALL_BLAS_THREADS", "keep")
        with _blas.blas_threads_for(1000):
            assert _blas.get_blas_threads() == 2
        monkeypatch.setenv("GENMLX_SMALL_BLAS_THREADS", "3")
        with _blas.blas_threads_for(1000):
            assert _blas.get_blas_threads() == 3
        assert _blas.get_blas_threads() == 2
    finally:
        _blas.set_blas_threads(before)


def test_thread_policy_bad_setting(monkeypatch):
    monkeypatch.setenv("GENMLX_SMALL_BLAS_THREADS", "many")
    with pytest.raises(ValueError, match="GENMLX_SMALL_BLAS_THREADS"):
        _blas.small_work_threads()
    with pytest.raises(ValueError, match="positive int"):
        _blas.set_blas_threads(0)


def test_mcmc_runs_small_models_on_one_thread():
    """gm.inference.hmc on a 20-point regression runs with one OpenBLAS thread and
    restores the previous count afterwards."""
    if _blas.get_blas_threads() is None:
        pytest.skip("OpenBLAS is not loaded (MLX's reference BLAS is in use): there are no worker threads whose count the policy could set")
    import genmlx as gm
    import mlx.core as mx

    from genmlx.inference import mcmc

    seen = []
    real = mcmc._run

    def spy(*a, **k):
        seen.append(_blas.get_blas_threads())
        return real(*a, **k)

    @gm.gen
    def model(x):
        w = gm.trace("w", gm.normal(0.0, 1.0))
        gm.trace("y", gm.normal(w * x, 1.0))

    before = _blas.get_blas_threads()
    _blas.set_blas_threads(2)
    try:
        mcmc._run = spy
        gm.inference.hmc(mx.random.key(0), model, (mx.arange(20.0),), gm.choicemap({"y": mx.arange(20.0)}),
                         num_samples=3, num_warmup=0, num_chains=2, step_size=0.01, num_steps=2,
                         mass="identity", adapt_step_size=False, progress=False)
        assert seen == [1 if mx.default_device() == mx.cpu else 2]
        assert _blas.get_blas_threads() == 2
    finally:
        mcmc._run = real
        _blas.set_blas_threads(before)
