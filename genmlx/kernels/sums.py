"""Per-example sums over many examples on CUDA: rows of x [N, k] (one warp per row) and
columns of x [k, N] (one thread per column).

Every batched score of a vector-valued choice ends in a per-example sum (an importance
weight sums a 50-point likelihood per particle). MLX 0.32's CUDA reductions of many short
rows or columns run far below the memory bandwidth (an H200 at 10⁷ examples of 50
float32: rows 3.2 ms, columns 2.1 ms for 2 GB read, ``benchmarks/gpu/probe_is.py``);
sums of ≤ 8 entries are unrolled into views and additions
(:func:`genmlx.core.batchwise.example_sum`), longer ones come here on CUDA, in whichever
layout the batch axis has: first (rows) or last (columns, as ``mx.vmap`` leaves an
array broadcast from per-example scalars and data).

Rows: a warp reads a row in coalesced 32-entry strips: lane l adds x[r, l], x[r, l + 32],
… in that order, then the 32 partial sums meet in a butterfly of shuffles
(s_l ← s_l + s_{l xor o}, o = 16, 8, 4, 2, 1) and lane 0 writes the row's sum; a warp
takes two rows a pass, interleaved, for more loads in flight (:func:`row_sums_reference`
states the order in NumPy; the GPU test compares bit for bit). Columns: thread i adds
x[0, i], x[1, i], … in turn, each step a coalesced read of the warp's 32 neighbouring
columns (the order of a sequential sum). Against ``mx.sum`` both differ by float32
rounding only. Grid-stride loops bound the grids. Elsewhere
(CPU, other dtypes, kernels off) ``mx.sum``; vjp and jvp through ``mx.sum``
(:func:`genmlx.kernels._backend.with_generic_transforms`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from genmlx.kernels import _backend as B

#: the most entries per example the kernels take (longer sums stay MLX's reductions; the
#: kernels were measured up to 50 entries, tested up to this many)
K_MAX = 256
THREADS = 256
#: grid-stride loop: at most this many warps in the grid (each takes two rows a pass)
MAX_WARPS = 1 << 20

_SOURCE = r"""
const long long N = x_shape[0];
const int k = x_shape[1];
const int lane = threadIdx.x & 31;
const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
// two rows per pass (r and r + warps, whose loads are independent): more reads in flight
for (long long r = (((long long)blockIdx.x * blockDim.x) + threadIdx.x) >> 5; r < N; r += 2 * warps) {
  const long long r2 = r + warps;
  const bool two = r2 < N;  // the same for the whole warp
  const float* a = x + r * k;
  const float* b = x + (two ? r2 : r) * k;
  float s = 0.0f, t = 0.0f;
  for (int j = lane; j < k; j += 32) {
    s += a[j];
    t += b[j];
  }
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
    t += __shfl_xor_sync(0xffffffffu, t, o);
  }
  if (lane == 0) {
    out[r] = s;
    if (two) out[r2] = t;
  }
}
"""


_COL_SOURCE = r"""
const int k = x_shape[0];
const long long N = x_shape[1];
const long long stride = (long long)gridDim.x * blockDim.x;
for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride) {
  float s = 0.0f;
  for (int j = 0; j < k; ++j) s += x[(long long)j * N + i];
  out[i] = s;
}
"""
#: grid-stride loop of the column kernel: at most this many threads
MAX_THREADS = 1 << 25


@functools.lru_cache(maxsize=1)
def _kernel():
    return B.build("cuda", "genmlx_row_sums", ("x",), ("out",), _SOURCE)


@functools.lru_cache(maxsize=1)
def _col_kernel():
    return B.build("cuda", "genmlx_col_sums", ("x",), ("out",), _COL_SOURCE)


def on_cuda(x: mx.array) -> bool:
    """The CUDA kernels are on for ``x`` (float32, a CUDA default device, kernels not off)."""
    return B.use_kernel(x) == "cuda"


def usable(x: mx.array, axis: int = 1) -> bool:
    """A kernel applies: CUDA kernels on, float32 2-D with 8 < k ≤ K_MAX entries to sum
    along ``axis`` (1: rows, 0: columns)."""
    return x.ndim == 2 and 8 < x.shape[axis] <= K_MAX and x.shape[1 - axis] > 0 and on_cuda(x)


def _launch(x: mx.array) -> tuple:
    warps = min((int(x.shape[0]) + 1) // 2, MAX_WARPS)
    threads = THREADS * ((32 * warps + THREADS - 1) // THREADS)
    return tuple(_kernel()(inputs=[x], output_shapes=[(int(x.shape[0]),)], output_dtypes=[mx.float32],
                           grid=(threads, 1, 1), threadgroup=(THREADS, 1, 1)))


def _launch_cols(x: mx.array) -> tuple:
    n = min(int(x.shape[1]), MAX_THREADS)
    return tuple(_col_kernel()(inputs=[x], output_shapes=[(int(x.shape[1]),)], output_dtypes=[mx.float32],
                               grid=(THREADS * ((n + THREADS - 1) // THREADS), 1, 1), threadgroup=(THREADS, 1, 1)))


_transformable = B.with_generic_transforms(_launch, lambda x: (mx.sum(x, axis=1),), 1, True)
_transformable_cols = B.with_generic_transforms(_launch_cols, lambda x: (mx.sum(x, axis=0),), 1, True)


def row_sums(x: mx.array) -> mx.array:
    """Σ_j x[i, j] for x [N, k]: the warp-per-row kernel where :func:`usable`, else
    ``mx.sum(x, axis=1)``."""
    if not usable(x, 1):
        return mx.sum(x, axis=1)
    return _transformable(x)[0]


def col_sums(x: mx.array) -> mx.array:
    """Σ_j x[j, i] for x [k, N]: the thread-per-column kernel where :func:`usable`, else
    ``mx.sum(x, axis=0)``."""
    if not usable(x, 0):
        return mx.sum(x, axis=0)
    return _transformable_cols(x)[0]


def row_sums_reference(x: np.ndarray) -> np.ndarray:
    """The kernel's summation order in NumPy (float32): per lane l the entries l, l + 32,
    … in turn, then the shuffle butterfly over the 32 lanes' partial sums."""
    x = np.asarray(x, dtype=np.float32)
    N, k = x.shape
    s = np.zeros((N, 32), dtype=np.float32)
    for j0 in range(0, k, 32):
        w = min(32, k - j0)
        s[:, :w] = s[:, :w] + x[:, j0:j0 + w]
    lanes = np.arange(32)
    for o in (16, 8, 4, 2, 1):
        s = s + s[:, lanes ^ o]
    return s[:, 0]


def col_sums_reference(x: np.ndarray) -> np.ndarray:
    """The column kernel's order in NumPy (float32): x[0] + x[1] + … in turn."""
    x = np.asarray(x, dtype=np.float32)
    s = np.zeros(x.shape[1:], dtype=np.float32)
    for row in x:
        s = s + row
    return s
