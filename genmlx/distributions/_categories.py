"""Reductions over a categorical's category axis (log-normalizer, Gumbel-max argmax, the
log-probability of an index) that, over many examples, run as elementwise chains.

Under genmlx's vmaps a categorical's logits are [N, K] (or [K, N]: the batch axis last,
as ``mx.vmap`` leaves logits broadcast from per-particle scalars). MLX 0.32.4's CUDA
reductions of many short rows run far below the memory bandwidth: on an H200 at
N = 10⁷ (``benchmarks/gpu/probe_vec.py``), argmax over K = 3 takes 6.5 ms against
0.19 ms as a chain of compares of the K column views, logsumexp 6.4 ms against 0.14 ms
(K = 8: 6.3 vs 0.67 ms, 6.5 vs 1.0 ms). Each function here is a
:func:`genmlx.core.batchwise.batchwise` function: its vmap rule sees the batched
arrays and, for K ≤ ``UNROLL_MAX`` categories over ≥ ``UNROLL_MIN_EXAMPLES`` examples,
writes the reduction as K views and one fused elementwise chain; otherwise (and outside
vmaps) the MLX reduction. Results are batch-first in either layout:

* :func:`logsumexp_categories` — log Σ_k exp(l_k), with m = max_k l_k (0 when not finite):
  m + log Σ_k exp(l_k − m);
* :func:`argmax_categories` — the first index of the maximum (as ``mx.argmax``), int32;
* :func:`pick_category` — l_i at index i (as ``take_along_axis``), by a chain of selects.
"""

from __future__ import annotations

import mlx.core as mx

from genmlx.core import batchwise as BW
from genmlx.core.batchwise import batchwise


def _axis(batch) -> int:
    """The category axis: the last per-example axis (before a trailing batch axis)."""
    return -2 if batch == "last" else -1


def _chain(batch, *xs: mx.array) -> bool:
    """Whether to write the reduction as a chain: under a vmap, 1 < K ≤ UNROLL_MAX and
    ≥ UNROLL_MIN_EXAMPLES examples (counted on the input with the most)."""
    if batch is None:
        return False
    a = _axis(batch)
    k = xs[0].shape[a]
    return 1 < k <= BW.UNROLL_MAX and max(x.size // x.shape[a] for x in xs) >= BW.UNROLL_MIN_EXAMPLES


def _views(x: mx.array, axis: int) -> list:
    """The K views of ``x`` along ``axis`` (negative), that axis dropped."""
    pre = (slice(None),) * (x.ndim + axis)
    return [x[pre + (j,)] for j in range(x.shape[axis])]


def _batch_first(y: mx.array, batch) -> mx.array:
    """A result with a trailing batch axis ("last" layout) moved to the front."""
    return mx.moveaxis(y, -1, 0) if batch == "last" and y.ndim > 1 else y


@batchwise
def _logsumexp(batch, static, logits):
    a = _axis(batch)
    if not _chain(batch, logits):
        return _batch_first(mx.logsumexp(logits, axis=a), batch)
    cols = _views(logits, a)
    m = cols[0]
    for c in cols[1:]:
        m = mx.maximum(m, c)
    m = mx.where(mx.isinf(m), 0.0, m)  # all −inf (or an +inf): no shift
    total = mx.exp(cols[0] - m)
    for c in cols[1:]:
        total = total + mx.exp(c - m)
    return _batch_first(m + mx.log(total), batch)


@batchwise
def _argmax(batch, static, scores):
    a = _axis(batch)
    if not _chain(batch, scores):
        return _batch_first(mx.argmax(scores, axis=a).astype(mx.int32), batch)
    cols = _views(scores, a)
    best, idx = cols[0], mx.zeros(cols[0].shape, dtype=mx.int32)
    for j, c in enumerate(cols[1:], 1):
        up = c > best  # strict: the first index of the maximum, as mx.argmax
        best, idx = mx.where(up, c, best), mx.where(up, mx.array(j, dtype=mx.int32), idx)
    return _batch_first(idx, batch)


@batchwise
def _pick(batch, static, logits, idx):
    a = _axis(batch)
    if not _chain(batch, logits, idx):
        shape = list(mx.broadcast_shapes(logits.shape, idx.shape))
        k, shape[a] = logits.shape[a], 1
        idx = mx.broadcast_to(idx, tuple(shape))
        shape[a] = k
        out = mx.take_along_axis(mx.broadcast_to(logits, tuple(shape)), idx, axis=a)
        return _batch_first(mx.squeeze(out, a), batch)
    cols = _views(logits, a)
    i = mx.squeeze(idx, a)
    out = cols[0]
    for j, c in enumerate(cols[1:], 1):
        out = mx.where(i == j, c, out)
    return _batch_first(mx.broadcast_to(out, mx.broadcast_shapes(out.shape, i.shape)), batch)


def logsumexp_categories(logits: mx.array) -> mx.array:
    """log Σ_k exp(logits[..., k]) (module docstring)."""
    return _logsumexp(None, logits)


def argmax_categories(scores: mx.array) -> mx.array:
    """The first index of each maximum over the last axis, int32 (module docstring)."""
    return _argmax(None, scores)


def pick_category(logits: mx.array, idx: mx.array) -> mx.array:
    """``logits[..., idx]`` per example: ``logits`` [..., K], ``idx`` int32 of the other
    axes' shape (broadcast against them)."""
    return _pick(None, logits, mx.expand_dims(idx, -1))
