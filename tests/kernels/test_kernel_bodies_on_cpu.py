"""The paths kernels' generated CUDA bodies, compiled as C++ and run on the CPU (one call
per thread index, as the grid would), against their statements (the halo paths:
:func:`genmlx.kernels.paths.halo_paths_reference`; the one-process ancestral paths: the
walk D_t = a_t[D_{t+1}], path_t = x_t[D_t] in NumPy): the kernels' logic checked where no
GPU is (the GPU tests in test_kernels.py run the kernels themselves). Skipped visibly
without a C++ compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from genmlx.kernels import paths as KP
from genmlx.kernels._rows import WORD as _WORD

from ._halo_cases import FLAGS, halo_cases

CXX = shutil.which("g++") or shutil.which("c++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) to run the kernel body on the CPU")
THREADS = 256


def _ctype(a: np.ndarray) -> str:
    """The pointer type MLX gives the kernel (float, int32_t) or, for types C++ lacks on
    the host (half), unsigned words of the element's size (the bodies copy bits)."""
    return {np.dtype(np.int32): "int32_t", np.dtype(np.float32): "float"}.get(a.dtype, _WORD[a.dtype.itemsize])


def _program(body: str, inputs: dict, outputs: dict, m: int, folder: Path) -> str:
    """A C++ program: reads the inputs from ``folder``, calls the body once per thread index
    i < m (block i // THREADS, thread i % THREADS, a grid of ⌈m / THREADS⌉ blocks) and
    writes the outputs there. Each input
    also has its shape as ``<name>_shape`` (as MLX's kernels do)."""
    params = [f"const {_ctype(a)}* {nm}" for nm, a in inputs.items()]
    params += [f"{_ctype(a)}* {nm}" for nm, a in outputs.items()]
    lines = ["#include <cstdint>", "#include <cstdio>", "#include <vector>",
             "struct Dim { long long x, y, z; };", "static Dim blockIdx, blockDim, threadIdx, gridDim;",
             f"static void body({', '.join(params)}) {{"]
    for nm, a in inputs.items():
        lines.append(f"const int {nm}_shape[{max(a.ndim, 1)}] = {{{', '.join(str(d) for d in a.shape) or '1'}}};")
    lines += [body, "}", "int main() {"]
    for nm, a in {**inputs, **outputs}.items():
        lines.append(f"std::vector<{_ctype(a)}> v_{nm}({a.size});")
    for nm, a in inputs.items():
        lines.append(f'{{ FILE* f = fopen("{folder / nm}.bin", "rb"); '
                     f'if (fread(v_{nm}.data(), {a.itemsize}, {a.size}, f) != {a.size}) return 1; fclose(f); }}')
    args = ", ".join(f"v_{nm}.data()" for nm in [*inputs, *outputs])
    lines += [f"blockDim.x = {THREADS};", f"gridDim.x = {(m + THREADS - 1) // THREADS};",
              f"for (long long i = 0; i < {m}; ++i) {{ blockIdx.x = i / {THREADS}; threadIdx.x = i % {THREADS}; "
              f"body({args}); }}"]
    for nm, a in outputs.items():
        lines.append(f'{{ FILE* f = fopen("{folder / nm}.out", "wb"); fwrite(v_{nm}.data(), {a.itemsize}, {a.size}, f); '
                     "fclose(f); }")
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def _run_body(folder: Path, body: str, inputs: dict, outputs: dict, m: int) -> dict:
    """The outputs (dict of arrays shaped as ``outputs``) of ``body`` run as C++ for m threads."""
    for nm, a in inputs.items():
        a.tofile(folder / f"{nm}.bin")
    src = folder / "body.cpp"
    src.write_text(_program(body, inputs, outputs, m, folder))
    exe = folder / "body"
    subprocess.run([CXX, "-O1", "-w", "-o", str(exe), str(src)], check=True, capture_output=True)
    subprocess.run([str(exe)], check=True)
    return {nm: np.fromfile(folder / f"{nm}.out", dtype=a.dtype).reshape(a.shape) for nm, a in outputs.items()}


def _kinds(xs) -> tuple:
    return tuple((col[0].dtype.itemsize, int(np.prod(col[0].shape[1:], dtype=int))) for col in xs)


def _run_halo_body(folder: Path, idxs, flags, EA, xs, EX, r: int, R_: int, H: int):
    """(paths per kind [T, m, …], miss) from the halo-paths kernel body run as C++."""
    T, K, m = len(flags), sum(flags), int(idxs[0].shape[0])
    ins, _ = KP.halo_names(T, K, len(xs))
    arrays = [idxs[t] for t in range(T) if flags[t]] + [x for col in xs for x in col] + [EA] + list(EX)
    inputs = {nm: np.ascontiguousarray(a) for nm, a in zip(ins, arrays)}
    outputs = {f"p{j}": np.zeros((T,) + col[0].shape, col[0].dtype) for j, col in enumerate(xs)}
    outputs["bad_out"] = np.zeros(m, np.uint8)
    got = _run_body(folder, KP._halo_source(tuple(flags), _kinds(xs), r, R_, H, m), inputs, outputs, m)
    return [got[f"p{j}"] for j in range(len(xs))], int(got["bad_out"].any())


@needs_cxx
@pytest.mark.parametrize("R_,m,H", [(2, 40, 12), (3, 700, 90), (4, 300, 50)])
def test_halo_paths_body_equals_statement(tmp_path, R_, m, H):
    """Every process of R virtual ones, with halos of H rows and of 1 row (lineages then
    leave them: the miss flag): the body's paths equal the statement's bit for bit (a
    float32, a float16 [3], a float32 [2] and a float32 [4] kind per row) and its miss flag matches."""
    misses = 0
    for h, r, idxs, EA, own, EX, want, bad in halo_cases(R_, m, H):
        got, miss = _run_halo_body(tmp_path, idxs, FLAGS, EA, own, EX, r, R_, h)
        assert miss == bad, (r, h)
        misses += miss
        if not bad:
            for g, w in zip(got, want):
                assert np.array_equal(g, w), (r, h)
    assert misses > 0  # the one-row halos were left somewhere: the flag was exercised


@needs_cxx
@pytest.mark.parametrize("T,n", [(1, 5), (7, 300), (40, 64)])
def test_ancestral_paths_body_equals_walk(tmp_path, T, n):
    """The one-process ancestral-paths kernel body: D_t = a_t[D_{t+1}] from the identity
    and path_t = x_t[D_t] for a float32, an int32 [2], a float16 [3], a bool and a float32 [4] kind
    (element, 8-byte and 16-byte words), bit for bit (some steps the identity: no resampling)."""
    rng = np.random.default_rng(T * n)
    idxs = [rng.integers(0, n, n).astype(np.int32) if rng.random() < 0.6 else np.arange(n, dtype=np.int32)
            for _ in range(T)]
    xs = [[rng.standard_normal(n).astype(np.float32) for _ in range(T)],
          [rng.integers(-9, 9, (n, 2)).astype(np.int32) for _ in range(T)],
          [rng.standard_normal((n, 3)).astype(np.float16) for _ in range(T)],
          [rng.random(n) < 0.5 for _ in range(T)],
          [rng.standard_normal((n, 4)).astype(np.float32) for _ in range(T)]]  # 16-byte rows: vector words
    ins, _ = KP.names(T, len(xs))
    inputs = {nm: np.ascontiguousarray(a) for nm, a in zip(ins, idxs + [x for col in xs for x in col])}
    inputs = {nm: a.view(np.uint8) if a.dtype == np.bool_ else a for nm, a in inputs.items()}
    outputs = {"D": np.zeros((T, n), np.int32)}
    outputs.update({f"p{j}": np.zeros((T,) + col[0].shape, np.uint8 if col[0].dtype == np.bool_ else col[0].dtype)
                    for j, col in enumerate(xs)})
    got = _run_body(tmp_path, KP._source(T, _kinds(xs)), inputs, outputs, n)
    r = np.arange(n)
    for t in reversed(range(T)):
        r = idxs[t][r]
        assert np.array_equal(got["D"][t], r), t
        for j, col in enumerate(xs):
            want = col[t][r]
            assert np.array_equal(got[f"p{j}"][t], want.view(np.uint8) if want.dtype == np.bool_ else want), (t, j)


@needs_cxx
@pytest.mark.parametrize("k,N", [(9, 1), (50, 700), (256, 300)])
def test_col_sums_body_equals_sequential_sum(tmp_path, k, N):
    """The column-sum kernel body (one thread per column, rows in turn) run as C++ on the
    CPU equals its NumPy statement bit for bit (the GPU test runs the kernel)."""
    from genmlx.kernels import sums as KS

    x = (np.random.default_rng(k).standard_normal((k, N)) * 10).astype(np.float32)
    got = _run_body(tmp_path, KS._COL_SOURCE, {"x": x}, {"out": np.zeros(N, np.float32)}, N)
    assert np.array_equal(got["out"], KS.col_sums_reference(x))
