"""Row gathers in one plain CUDA kernel: ``out[b, i] = x[b, idx[b, i]]``.

SMC moves whole particle rows by ancestor indices (the carry at each resampling; the
lineage compositions D_t = a_t[D_{t+1}] and the kept arrays' rows at the end of a run).
Those indices are nondecreasing, so consecutive threads read neighbouring rows and a
gather can run at the GPU's memory bandwidth; MLX's generic gather (any rank, any axis)
reaches about a tenth of it on an H200 at 10⁷ rows (≈ 300–430 µs per 1.5·10⁷ int32,
``benchmarks/gpu/probe_sharded.py``). Here each thread copies one row as unsigned
words of the element's size (the bits, whatever the dtype), or of 8 or 16 bytes where the
row's size and alignment allow (:mod:`genmlx.kernels._rows`).

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
from genmlx.kernels._rows import WORD as _WORD, prelude, row_copy

THREADS = 256
_BYTES = {v: k for k, v in _WORD.items()}


def _source(word: str, w: int) -> str:
    """Kernel body: ``x`` [B, N, w words], ``idx`` [B, n] int32 → ``out`` [B, n, w]."""
    return "\n".join(prelude([(_BYTES[word], w)]) + [
        "const size_t n = idx_shape[1];",
        "const size_t N = x_shape[1];",
        "const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;",
        "if (e >= (size_t)idx_shape[0] * n) return;",
        "const size_t b = e / n;",
        "long long r = idx[e];",
        "r = r < 0 ? 0 : (r >= (long long)N ? (long long)N - 1 : r);",
        row_copy(word, _BYTES[word], w, f"reinterpret_cast<const {word}*>(x) + (b * N + (size_t)r) * {w}",
                 f"reinterpret_cast<{word}*>(out) + e * {w}"),
    ])


def _source2(word: str, w: int, identity: bool) -> str:
    """Kernel body of the two-source gather: row ``pos[i]`` of ``concatenate([a, b])``
    (a [Na, w words], b [Nb, w]) without the concatenation; ``identity``: a is the rows
    base + 0 … Na − 1 (int32, one word), not an input."""
    first = ("out[i] = (int32_t)(base[0] + r);" if identity else
             row_copy(word, _BYTES[word], w, f"reinterpret_cast<const {word}*>(a) + (size_t)r * {w}",
                      f"reinterpret_cast<{word}*>(out) + i * {w}"))
    na = "base[1]" if identity else "a_shape[0]"
    return "\n".join(prelude([(_BYTES[word], w)]) + [
        "const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;",
        "if (i >= (size_t)pos_shape[0]) return;",
        f"const long long Na = {na};",
        "const long long Nb = b_shape[0];",
        "long long r = pos[i];",
        "r = r < 0 ? 0 : (r >= Na + Nb ? Na + Nb - 1 : r);",
        "if (r < Na) {",
        first,
        "} else {",
        row_copy(word, _BYTES[word], w, f"reinterpret_cast<const {word}*>(b) + (size_t)(r - Na) * {w}",
                 f"reinterpret_cast<{word}*>(out) + i * {w}"),
        "}",
    ])


@functools.lru_cache(maxsize=32)
def _kernel2(dtype: str, word: str, w: int, identity: bool):
    ins = ("base", "b", "pos") if identity else ("a", "b", "pos")
    name = f"genmlx_take_rows2_{dtype}_x{w}" + ("_identity" if identity else "")
    return B.build("cuda", name, ins, ("out",), _source2(word, w, identity))


def take_rows2(a: mx.array, b: mx.array, pos: mx.array) -> mx.array:
    """``mx.take(concatenate([a, b]), pos, axis=0)`` (rows of a then b, int32 ``pos``
    in [0, Na + Nb)) without materialising the concatenation (the kernel on CUDA)."""
    if (not usable(a, pos, 0) or not usable(b, pos, 0) or pos.ndim != 1 or a.dtype != b.dtype
            or a.shape[1:] != b.shape[1:]):
        return mx.take(mx.concatenate([a, b]), pos, axis=0)
    w = _row_words(a, 1)
    return _launch(_kernel2(str(a.dtype).rsplit(".", 1)[-1], _WORD[a.dtype.size], w, False),
                   [a, b, pos], (int(pos.shape[0]),) + tuple(a.shape[1:]), a.dtype)


def identity_or_rows(base: int, na: int, b: mx.array, pos: mx.array) -> mx.array:
    """``take_rows2(base + arange(na), b, pos)`` for int32 rows ``b`` [Nb]: slot i gets
    base + pos[i] where pos[i] < na, else b[pos[i] − na] (no identity array built)."""
    if not usable(b, pos, 0) or pos.ndim != 1 or b.dtype != mx.int32 or b.ndim != 1:
        return mx.take(mx.concatenate([base + mx.arange(na, dtype=mx.int32), b]), pos, axis=0)
    meta = mx.array([base, na], dtype=mx.int32)
    return _launch(_kernel2("int32", "uint32_t", 1, True), [meta, b, pos], (int(pos.shape[0]),), mx.int32)


def _launch(kernel, inputs: list, shape: tuple, dtype, threads: int | None = None) -> mx.array:
    """One launch of ``kernel``: one output of ``shape``, one thread per row (``threads``:
    that many, default ``shape[0]``)."""
    n = int(shape[0]) if threads is None else threads
    return kernel(inputs=inputs, output_shapes=[shape], output_dtypes=[dtype],
                  grid=(THREADS * ((n + THREADS - 1) // THREADS), 1, 1), threadgroup=(THREADS, 1, 1))[0]


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
            and idx.size > 0 and x.shape[lead] > 0 and _row_words(x, lead + 1) is not None)


def take_rows_batched(x: mx.array, idx: mx.array) -> mx.array:
    """``take_along_axis(x, idx[..., None…], axis=1)``: x [B, N, …], idx [B, n] int32 in
    [0, N) → [B, n, …] (the kernel on CUDA, else MLX's gather)."""
    if not usable(x, idx, 1) or idx.ndim != 2 or idx.shape[0] != x.shape[0]:
        return mx.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    k = _kernel(str(x.dtype).rsplit(".", 1)[-1], _WORD[x.dtype.size], _row_words(x, 2))
    return _launch(k, [x, idx], tuple(idx.shape) + tuple(x.shape[2:]), x.dtype, int(idx.size))


def take_rows(x: mx.array, idx: mx.array) -> mx.array:
    """``mx.take(x, idx, axis=0)`` for int32 indices [n] in [0, N) (the kernel on CUDA)."""
    if not usable(x, idx, 0) or idx.ndim != 1:
        return mx.take(x, idx, axis=0)
    return take_rows_batched(x[None], idx[None]).reshape(tuple(idx.shape) + tuple(x.shape[1:]))
