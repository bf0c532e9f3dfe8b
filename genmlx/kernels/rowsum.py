"""Sums of the rows of x [N, k] (float32, 8 < k ≤ :data:`K_MAX`), one warp per row.

Every batched score of a vector-valued choice ends in a per-example sum (an importance
weight sums a 50-point likelihood per particle). MLX 0.32's CUDA reduction of many short
rows runs far below the memory bandwidth (an H200 at [10⁷, 50] float32: 3.4 ms for 2 GB
read, ``benchmarks/gpu/probe_is.py``); sums of ≤ 8 entries are unrolled into views and
additions (:func:`genmlx.core.batchwise.example_sum`), longer rows come here on CUDA.

A warp reads a row in coalesced 32-entry strips: lane l adds x[r, l], x[r, l + 32], …
in that order, then the 32 partial sums meet in a butterfly of shuffles
(s_l ← s_l + s_{l xor o}, o = 16, 8, 4, 2, 1) and lane 0 writes the row's sum. The order
is fixed: :func:`row_sums_reference` states it in NumPy (the GPU test compares bit for
bit); against ``mx.sum`` the sum differs by float32 rounding only. A grid-stride loop
over rows bounds the grid. Elsewhere (CPU, other dtypes, kernels off) ``mx.sum``; vjp
and jvp through ``mx.sum`` (:func:`genmlx.kernels._backend.with_generic_transforms`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from genmlx.kernels import _backend as B

#: the longest rows the kernel takes (longer ones: MLX's reduction reads them well enough)
K_MAX = 256
THREADS = 256
#: grid-stride loop: at most this many warps in the grid
MAX_WARPS = 1 << 20

_SOURCE = r"""
const long long N = x_shape[0];
const int k = x_shape[1];
const int lane = threadIdx.x & 31;
const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
for (long long r = (((long long)blockIdx.x * blockDim.x) + threadIdx.x) >> 5; r < N; r += warps) {
  const float* row = x + r * k;
  float s = 0.0f;
  for (int j = lane; j < k; j += 32) s += row[j];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) out[r] = s;
}
"""


@functools.lru_cache(maxsize=1)
def _kernel():
    return B.build("cuda", "genmlx_row_sums", ("x",), ("out",), _SOURCE)


def usable(x: mx.array) -> bool:
    """The kernel applies: CUDA kernels on, float32 [N, k] with 8 < k ≤ K_MAX."""
    return (x.ndim == 2 and 8 < x.shape[1] <= K_MAX and x.shape[0] > 0
            and B.use_kernel(x) == "cuda")


def _launch(x: mx.array) -> tuple:
    warps = min(int(x.shape[0]), MAX_WARPS)
    threads = THREADS * ((32 * warps + THREADS - 1) // THREADS)
    return tuple(_kernel()(inputs=[x], output_shapes=[(int(x.shape[0]),)], output_dtypes=[mx.float32],
                           grid=(threads, 1, 1), threadgroup=(THREADS, 1, 1)))


def _generic(x: mx.array) -> tuple:
    return (mx.sum(x, axis=1),)


_transformable = B.with_generic_transforms(_launch, _generic, 1, True)


def row_sums(x: mx.array) -> mx.array:
    """Σ_j x[i, j] for x [N, k]: the warp-per-row kernel where :func:`usable`, else
    ``mx.sum(x, axis=1)``."""
    if not usable(x):
        return mx.sum(x, axis=1)
    return _transformable(x)[0]


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
