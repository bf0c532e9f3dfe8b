"""Row gathers in one plain CUDA kernel: ``out[b, i] = x[b, idx[b, i]]``.

SMC moves whole particle rows by ancestor indices (the carry at each resampling; the
lineage compositions D_t = a_t[D_{t+1}] and the kept arrays' rows at the end of a run).
Those indices are nondecreasing, so consecutive threads read neighbouring rows and a
gather can run at the GPU's memory bandwidth; MLX's generic gather (any rank, any axis)
reaches about a tenth of it on an H200 at 10⁷ rows (≈ 300–430 µs per 1.5·10⁷ int32,
``benchmarks/gpu/probe_sharded.py``). Here each thread copies one row as unsigned
words of the element's size (the bits, whatever the dtype).

:func:`take_rows` (axis 0, one index vector) and :func:`take_rows_batched` (axis 1 of
[B, N, …] with indices [B, n], as ``take_along_axis``) dispatch to the kernel on a CUDA
device for arrays of 1-, 2-, 4- or 8-byte elements, else to ``mx.take`` /
``mx.take_along_axis`` (the reference, equal bit for bit). Indices must lie in [0, N)
(the kernel clamps them, where MLX's gather reads past nothing either). No vmap rule:
callers are SMC's unvmapped drivers.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from genmlx.kernels import _backend as B

THREADS = 256
_WORD = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}


def _source(word: str, w: int) -> str:
    """Kernel body: ``x`` [B, N, w words], ``idx`` [B, n] int32 → ``out`` [B, n, w]."""
    copy = ("d[0] = s[0];" if w == 1 else f"for (int k = 0; k < {w}; ++k) d[k] = s[k];")
    return "\n".join([
        "const size_t n = idx_shape[1];",
        "const size_t N = x_shape[1];",
        "const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;",
        "if (e >= (size_t)idx_shape[0] * n) return;",
        "const size_t b = e / n;",
        "long long r = idx[e];",
        "r = r < 0 ? 0 : (r >= (long long)N ? (long long)N - 1 : r);",
        f"const {word}* s = reinterpret_cast<const {word}*>(x) + (b * N + (size_t)r) * {w};",
        f"{word}* d = reinterpret_cast<{word}*>(out) + e * {w};",
        copy,
    ])


@functools.lru_cache(maxsize=32)
def _kernel(dtype: str, word: str, w: int):
    return B.build("cuda", f"genmlx_take_rows_{dtype}_x{w}", ("x", "idx"), ("out",), _source(word, w))


def _row_words(x: mx.array, lead: int) -> int | None:
    """Elements per row of ``x`` after its first ``lead`` axes (None: empty or unknown size)."""
    w = 1
    for d in x.shape[lead:]:
        w *= d
    return w if w > 0 and x.dtype.size in _WORD else None


def usable(x: mx.array, idx: mx.array, lead: int) -> bool:
    """Kernel on: a CUDA backend active, int32 indices, a known element size, rows."""
    return (B.active_backend() == "cuda" and idx.dtype == mx.int32 and x.ndim > lead
            and idx.size > 0 and _row_words(x, lead + 1) is not None)


def take_rows_batched(x: mx.array, idx: mx.array) -> mx.array:
    """``take_along_axis(x, idx[..., None…], axis=1)``: x [B, N, …], idx [B, n] int32 in
    [0, N) → [B, n, …] (the kernel on CUDA, else MLX's gather)."""
    if not usable(x, idx, 1) or idx.ndim != 2 or idx.shape[0] != x.shape[0]:
        return mx.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    w = _row_words(x, 2)
    Bn = int(idx.shape[0]) * int(idx.shape[1])
    out = _kernel(str(x.dtype).rsplit(".", 1)[-1], _WORD[x.dtype.size], w)(
        inputs=[x, idx], output_shapes=[tuple(idx.shape) + tuple(x.shape[2:])], output_dtypes=[x.dtype],
        grid=(THREADS * ((Bn + THREADS - 1) // THREADS), 1, 1), threadgroup=(THREADS, 1, 1))
    return out[0]


def take_rows(x: mx.array, idx: mx.array) -> mx.array:
    """``mx.take(x, idx, axis=0)`` for int32 indices [n] in [0, N) (the kernel on CUDA)."""
    if not usable(x, idx, 0) or idx.ndim != 1:
        return mx.take(x, idx, axis=0)
    return take_rows_batched(x[None], idx[None]).reshape(tuple(idx.shape) + tuple(x.shape[1:]))
