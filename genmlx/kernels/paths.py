"""Ancestral paths of a particle filter in ONE kernel: the descent rows and the gathered
per-step arrays of every final particle.

A filter that keeps, for each step t, its (pre-resampling) arrays x_t [n, …] and its
ancestor indices a_t [n] (the identity where it did not resample) rebuilds the paths at
the end: D_{T−1} = a_{T−1}, D_t = a_t[D_{t+1}], and path_t = x_t[D_t]. With MLX ops that
is a gather per composition plus one concatenation of the T vectors (a copy kernel per
input on a GPU) per array kind, hundreds of kernel launches for T = 100. The kernel
here takes the T·(J + 1) arrays as its inputs and writes D [T, n] and the J paths
[T, n, …] in one launch: thread i walks its ancestry backwards, t = T−1 … 0, copying row
D_t[i] of every x_t. The code is generated per (T, row types, row sizes): the steps are
unrolled, so each input is named in straight-line code.

:func:`ancestral_paths` dispatches: the kernel on a CUDA device for at most
:data:`MAX_INPUTS` arrays (the kernel parameters are one pointer each), otherwise
:func:`ancestral_paths_generic`, the MLX-ops reference. Integer compositions and copies:
both give the same values bit for bit. Not yet run on a GPU (its source compiles with
nvcc, ``cuda_check``), the kernel is opt-in like the Metal twins: ``GENMLX_KERNELS=1``
(or ``_backend.override("1")``); ``tests/kernels/test_kernels.py`` checks it on a GPU.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from genmlx.kernels import _backend as B

MAX_INPUTS = 480  # pointers in the kernel's parameter block (4 KiB with the outputs)
_WORD = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}
THREADS = 256


def ancestral_paths_generic(idxs: list, xs: list) -> tuple:
    """Reference: (D [T, n] int32, [path_j [T, n, …] for each kind j]) from the ancestor
    vectors ``idxs`` (T arrays [n], int32) and ``xs`` (J lists of T arrays [n, …])."""
    T = len(idxs)
    D, rows = idxs[T - 1], [None] * T
    rows[T - 1] = D
    for t in range(T - 2, -1, -1):
        D = mx.take(idxs[t], D, axis=0)
        rows[t] = D
    Dm = mx.stack(rows)
    paths = []
    for col in xs:
        block = mx.stack(col)
        paths.append(mx.take_along_axis(block, Dm.reshape(Dm.shape + (1,) * (block.ndim - 2)), axis=1))
    return Dm, paths


def _source(T: int, kinds: tuple) -> str:
    """The kernel body: ``kinds`` = ((bytes per element, elements per particle row), …)
    of the J arrays, copied row by row as unsigned words of the element's size."""
    lines = ["const int n = a0_shape[0];",
             "const int i = blockIdx.x * blockDim.x + threadIdx.x;",
             "if (i >= n) return;",
             "int r = i;"]
    for t in range(T - 1, -1, -1):
        lines.append(f"r = a{t}[r]; D[(size_t){t} * n + i] = r;")
        for j, (b, w) in enumerate(kinds):
            word = _WORD[b]
            src = f"reinterpret_cast<const {word}*>(x{j}_{t}) + (size_t)r * {w}"
            dst = f"reinterpret_cast<{word}*>(p{j}) + ((size_t){t} * n + i) * {w}"
            if w == 1:
                lines.append(f"*({dst}) = *({src});")
            else:
                lines.append(f"{{ const {word}* s = {src}; {word}* d = {dst}; "
                             f"for (int e = 0; e < {w}; ++e) d[e] = s[e]; }}")
    return "\n".join(lines)


def names(T: int, J: int) -> tuple:
    """(input names, output names) of the kernel for T steps and J array kinds."""
    return (tuple(f"a{t}" for t in range(T)) + tuple(f"x{j}_{t}" for j in range(J) for t in range(T)),
            ("D",) + tuple(f"p{j}" for j in range(J)))


def kernel_name(T: int, kinds: tuple) -> str:
    return f"genmlx_paths_T{T}_" + "_".join(f"w{b}x{w}" for b, w in kinds)


@functools.lru_cache(maxsize=32)
def _kernel(backend: str, T: int, kinds: tuple):
    ins, outs = names(T, len(kinds))
    return B.build(backend, kernel_name(T, kinds), ins, outs, _source(T, kinds))


def _kind(x: mx.array) -> tuple | None:
    """(bytes per element, elements per particle row) to copy rows of ``x`` [n, …] by
    (words of the element's size: aligned wherever the array's elements are), or None
    for an empty row or an unknown element size."""
    row = 1
    for d in x.shape[1:]:
        row *= d
    b = x.dtype.size
    return (b, row) if row > 0 and b in _WORD else None


def usable(idxs: list, xs: list) -> str | None:
    """The backend to run the kernel on, or None (the generic path applies)."""
    backend = B.active_backend() if B.mode() == "1" else None  # opt-in (module docstring)
    if backend != "cuda" or not idxs or any(i is None or i.dtype != mx.int32 or i.ndim != 1 for i in idxs):
        return None
    T, n = len(idxs), idxs[0].shape[0]
    if T * (len(xs) + 1) > MAX_INPUTS or any(len(c) != T for c in xs):
        return None
    for col in xs:
        k = _kind(col[0])
        if k is None or any(x.shape != col[0].shape or x.dtype != col[0].dtype or x.shape[0] != n
                            for x in col):
            return None
    return backend


def ancestral_paths(idxs: list, xs: list) -> tuple:
    """(D [T, n] int32, [path_j [T, n, …]]) as :func:`ancestral_paths_generic`, by ONE
    kernel launch where :func:`usable` allows (never under ``mx.vmap``: SMC's end of run
    only)."""
    backend = usable(idxs, xs)
    if backend is None:
        return ancestral_paths_generic(idxs, xs)
    T, n = len(idxs), idxs[0].shape[0]
    kinds = tuple(_kind(col[0]) for col in xs)
    k = _kernel(backend, T, kinds)
    outs = k(inputs=list(idxs) + [x for col in xs for x in col],
             output_shapes=[(T, n)] + [(T,) + tuple(col[0].shape) for col in xs],
             output_dtypes=[mx.int32] + [col[0].dtype for col in xs],
             grid=(THREADS * ((n + THREADS - 1) // THREADS), 1, 1), threadgroup=(THREADS, 1, 1))
    return outs[0], list(outs[1:])
