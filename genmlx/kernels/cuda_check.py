"""Compile the CUDA kernels offline with ``nvcc`` (no GPU needed) to catch source errors.

:func:`render` rebuilds the translation unit the way MLX's ``cuda_kernel`` generates it
(MLX 0.32: default header, ``namespace mlx::core::cu``, ``const T* name`` per input plus
``name_shape`` / ``name_strides`` / ``name_ndim`` when the source mentions them, then
``T* name`` per output), with a small stand-in for MLX's ``device/utils.cuh`` (the
``Shape``/``Strides`` arrays). ``python -m genmlx.kernels.cuda_check`` compiles all of
them (one file) for sm_90 and prints a JSON report with ptxas' register/shared-memory use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_STANDIN = r"""
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cstdint>
#include <cooperative_groups.h>
#include <cuda_fp16.h>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
using namespace mlx::core::cu;
#define inf cuda::std::numeric_limits<float>::infinity()
"""

_CTYPE = {"float32": "float", "int32": "int32_t", "uint32": "uint32_t", "float16": "__half",
          "bool": "bool", "int64": "int64_t", "uint8": "uint8_t"}


def render(name: str, inputs: list[tuple[str, str, int]], outputs: list[tuple[str, str]],
           source: str, header: str = "") -> tuple[str, str]:
    """(header, kernel definition) for a kernel as MLX generates it; ``inputs`` are
    (name, dtype, ndim), ``outputs`` (name, dtype)."""
    sig = []
    for nm, dt, nd in inputs:
        sig.append(f"    const {_CTYPE[dt]}* {nm}")
        if nd > 0:
            if f"{nm}_shape" in source:
                sig.append(f"    const __grid_constant__ Shape {nm}_shape")
            if f"{nm}_strides" in source:
                sig.append(f"    const __grid_constant__ Strides {nm}_strides")
            if f"{nm}_ndim" in source:
                sig.append(f"    const __grid_constant__ int {nm}_ndim")
    sig += [f"    {_CTYPE[dt]}* {nm}" for nm, dt in outputs]
    return header, ("namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
                    f"__global__ void custom_kernel_{name}(\n" + ",\n".join(sig) + ") {\n"
                    + source + "\n}\n}  // namespace mlx::core::cu\n")


def translation_unit(parts: dict[str, tuple[str, str]]) -> str:
    """One CUDA file holding every rendered kernel (each distinct header once)."""
    headers = list(dict.fromkeys(h for h, _ in parts.values()))
    return _STANDIN + "".join(headers) + "".join(k for _, k in parts.values())


def kernels() -> dict[str, tuple[str, str]]:
    """Every CUDA kernel of the package, rendered."""
    from genmlx.kernels import gather as KG
    from genmlx.kernels import paths as KP
    from genmlx.kernels import resample as KR
    from genmlx.kernels import sums as KS
    from genmlx.kernels import weights as KW

    T, kinds, dts = 3, ((4, 1), (4, 2), (2, 3), (1, 1)), ("float32", "int32", "float16", "bool")
    p_in, p_out = KP.names(T, len(kinds))
    paths = render(KP.kernel_name(T, kinds),
                   [(nm, "int32", 1) for nm in p_in[:T]]
                   + [(nm, dts[int(nm[1:].split("_")[0])], 1) for nm in p_in[T:]],
                   [("D", "int32")] + [(nm, dts[j]) for j, nm in enumerate(p_out[1:])],
                   KP._source(T, kinds))
    gathers = {f"take_rows_{dt}_x{w}": render(f"genmlx_take_rows_{dt}_x{w}",
                                               [("x", dt, 3), ("idx", "int32", 2)], [("out", dt)],
                                               KG._source(KG._WORD[b], w))
               for dt, b, w in (("float32", 4, 1), ("float16", 2, 3), ("bool", 1, 1), ("int64", 8, 2), ("float32", 4, 4))}
    gathers2 = {f"take_rows2_{dt}_x{w}": render(f"genmlx_take_rows2_{dt}_x{w}",
                                                 [("a", dt, 2), ("b", dt, 2), ("pos", "int32", 1)], [("out", dt)],
                                                 KG._source2(KG._WORD[b], w, False))
                for dt, b, w in (("float32", 4, 1), ("float16", 2, 3), ("float32", 4, 2))}
    gathers2["take_rows2_identity"] = render("genmlx_take_rows2_int32_x1_identity",
                                             [("base", "int32", 1), ("b", "int32", 1), ("pos", "int32", 1)],
                                             [("out", "int32")], KG._source2("uint32_t", 1, True))
    hf, hk = (True, False, True, True), ((4, 1), (2, 3), (4, 4))
    h_in, h_out = KP.halo_names(len(hf), sum(hf), len(hk))
    hdt = ("float32", "float16", "float32")
    halo = render(KP.halo_kernel_name(hf, hk, 1, 3, 5, 20),
                  [(nm, "int32", 1) for nm in h_in[:sum(hf)]]
                  + [(nm, hdt[int(nm[1:].split("_")[0])], 1) for nm in h_in[sum(hf):-1 - len(hk)]]
                  + [("EA", "int32", 2)] + [(nm, hdt[int(nm[2:])], 2) for nm in h_in[-len(hk):]],
                  [(nm, hdt[j]) for j, nm in enumerate(h_out[:-1])] + [("bad_out", "uint8")],
                  KP._halo_source(hf, hk, 1, 3, 5, 20))
    return {
        "halo_paths": halo,
        **gathers,
        **gathers2,
        "ancestral_paths": paths,
        "row_sums": render("genmlx_row_sums", [("x", "float32", 2)], [("out", "float32")], KS._SOURCE),
        "col_sums": render("genmlx_col_sums", [("x", "float32", 2)], [("out", "float32")], KS._COL_SOURCE),
        "weight_summary": render("genmlx_weight_summary", [("lw", "float32", 2)],
                                 [("lse", "float32"), ("ess", "float32")], KW._CUDA, KW._HEADER),
        "weight_partial": render("genmlx_weight_partial", [("lw", "float32", 2)],
                                 [("pm", "float32"), ("ps1", "float32"), ("ps2", "float32")],
                                 KW._CUDA_PARTIAL, KW._HEADER),
        "weight_finish": render("genmlx_weight_finish",
                                [("pm", "float32", 2), ("ps1", "float32", 2), ("ps2", "float32", 2)],
                                [("lse", "float32"), ("ess", "float32")], KW._CUDA_FINISH, KW._HEADER),
        "resample_positions": render("genmlx_resample_positions",
                                     [("lw", "float32", 1), ("ends_i", "int32", 1), ("ends_f", "float32", 1)],
                                     [("pos_i", "int32"), ("pos_f", "float32")], KR._CUDA_POSITIONS,
                                     KR._CUDA_HEADER),
        "resample_offsets": render("genmlx_resample_offsets",
                                   [("lw", "float32", 1), ("pm", "float32", 2), ("ps1", "float32", 2),
                                    ("ends_i", "int32", 1), ("ends_f", "float32", 1)],
                                   [("off_i", "int32"), ("off_f", "float32"), ("gmax", "float32")],
                                   KR._CUDA_OFFSETS, KR._CUDA_HEADER),
        "resample_segments": render("genmlx_resample_segments",
                                    [("lw", "float32", 1), ("off_i", "int32", 1), ("off_f", "float32", 1),
                                     ("gmax", "float32", 1)],
                                    [("pos_i", "int32"), ("pos_f", "float32")], KR._CUDA_SEGMENTS,
                                    KR._CUDA_HEADER),
        "resample_search": render("genmlx_resample_search",
                                  [("pos_i", "int32", 1), ("pos_f", "float32", 1), ("U", "float32", 1),
                                   ("meta", "int32", 1)],
                                  [("anc", "int32")], KR._CUDA_SEARCH, KR._CUDA_HEADER),
    }


def nvcc_compile(src: str, arch: str = "sm_90") -> tuple[bool, str]:
    """(ok, compiler output) for ``nvcc -c`` of one translation unit."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return False, "nvcc not found"
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cu"
        f.write_text(src)
        r = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-c", str(f), "-o",
                            str(Path(d) / "k.o"), "-Xptxas", "-v"],
                           capture_output=True, text=True)
        return r.returncode == 0, (r.stdout + r.stderr).strip()


def main() -> int:
    parts = kernels()
    ok, log = nvcc_compile(translation_unit(parts))
    print(json.dumps({"kernels": list(parts), "compiled": ok, "log": log[-4000:]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
