"""The halo-paths kernel's generated CUDA body, compiled as C++ and run on the CPU (one call
per thread index, as the grid would), against its NumPy statement
(:func:`genmlx.kernels.paths.halo_paths_reference`): the kernel's logic checked where no
GPU is (the GPU test in test_kernels.py runs the kernel itself). Skipped visibly without a
C++ compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from genmlx.kernels import paths as KP

from ._halo_cases import FLAGS, halo_cases

CXX = shutil.which("g++") or shutil.which("c++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) to run the kernel body on the CPU")
THREADS = 256
_WORD = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}


def _ctype(a: np.ndarray) -> str:
    return "int32_t" if a.dtype == np.int32 else _WORD[a.dtype.itemsize]


def _program(body: str, inputs: dict, outputs: dict, m: int, folder: Path) -> str:
    """A C++ program: reads the inputs from ``folder``, calls the body once per thread index
    i < m (block i // THREADS, thread i % THREADS) and writes the outputs there."""
    params = [f"const {_ctype(a)}* {nm}" for nm, a in inputs.items()]
    params += [f"{_ctype(a)}* {nm}" for nm, a in outputs.items()]
    lines = ["#include <cstdint>", "#include <cstdio>", "#include <vector>",
             "struct Dim { long long x, y, z; };", "static Dim blockIdx, blockDim, threadIdx;",
             f"static void body({', '.join(params)}) {{", body, "}", "int main() {"]
    for nm, a in {**inputs, **outputs}.items():
        lines.append(f"std::vector<{_ctype(a)}> v_{nm}({a.size});")
    for nm, a in inputs.items():
        lines.append(f'{{ FILE* f = fopen("{folder / nm}.bin", "rb"); '
                     f'if (fread(v_{nm}.data(), {a.itemsize}, {a.size}, f) != {a.size}) return 1; fclose(f); }}')
    args = ", ".join(f"v_{nm}.data()" for nm in [*inputs, *outputs])
    lines += [f"blockDim.x = {THREADS};",
              f"for (long long i = 0; i < {m}; ++i) {{ blockIdx.x = i / {THREADS}; threadIdx.x = i % {THREADS}; "
              f"body({args}); }}"]
    for nm, a in outputs.items():
        lines.append(f'{{ FILE* f = fopen("{folder / nm}.out", "wb"); fwrite(v_{nm}.data(), {a.itemsize}, {a.size}, f); '
                     "fclose(f); }")
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def _run_halo_body(folder: Path, idxs, flags, EA, xs, EX, r: int, R_: int, H: int):
    """(paths per kind [T, m, …], miss) from the kernel body run as C++."""
    T, K, m = len(flags), sum(flags), int(idxs[0].shape[0])
    kinds = tuple((col[0].dtype.itemsize, int(np.prod(col[0].shape[1:], dtype=int))) for col in xs)
    ins, outs = KP.halo_names(T, K, len(xs))
    arrays = [idxs[t] for t in range(T) if flags[t]] + [x for col in xs for x in col] + [EA] + list(EX)
    inputs = {nm: np.ascontiguousarray(a) for nm, a in zip(ins, arrays)}
    outputs = {f"p{j}": np.zeros((T,) + col[0].shape, col[0].dtype) for j, col in enumerate(xs)}
    outputs["bad_out"] = np.zeros(m, np.uint8)
    for nm, a in inputs.items():
        a.tofile(folder / f"{nm}.bin")
    src = folder / "body.cpp"
    src.write_text(_program(KP._halo_source(tuple(flags), kinds, r, R_, H, m), inputs, outputs, m, folder))
    exe = folder / "body"
    subprocess.run([CXX, "-O1", "-w", "-o", str(exe), str(src)], check=True, capture_output=True)
    subprocess.run([str(exe)], check=True)
    got = {nm: np.fromfile(folder / f"{nm}.out", dtype=a.dtype).reshape(a.shape) for nm, a in outputs.items()}
    return [got[f"p{j}"] for j in range(len(xs))], int(got["bad_out"].any())


@needs_cxx
@pytest.mark.parametrize("R_,m,H", [(2, 40, 12), (3, 700, 90), (4, 300, 50)])
def test_halo_paths_body_equals_statement(tmp_path, R_, m, H):
    """Every process of R virtual ones, with halos of H rows and of 1 row (lineages then
    leave them: the miss flag): the body's paths equal the statement's bit for bit (a
    float32 and a float16 kind of 3 elements per row) and its miss flag matches."""
    misses = 0
    for h, r, idxs, EA, own, EX, want, bad in halo_cases(R_, m, H):
        got, miss = _run_halo_body(tmp_path, idxs, FLAGS, EA, own, EX, r, R_, h)
        assert miss == bad, (r, h)
        misses += miss
        if not bad:
            for g, w in zip(got, want):
                assert np.array_equal(g, w), (r, h)
    assert misses > 0  # the one-row halos were left somewhere: the flag was exercised
