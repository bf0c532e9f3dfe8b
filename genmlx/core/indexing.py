"""Row selection without a gather kernel.

In MLX 0.32 ``x[i]`` for an integer ``i`` becomes a ``Gather`` primitive — a kernel
launch (microseconds on a CPU, ~10 µs on a GPU) — while ``mx.take(x, i, axis=0)`` with
a non-negative Python int is a ``Slice`` + ``Squeeze``: views, no kernel. Hot paths
(NUTS blocks, resampling) pick rows with :func:`row`.

MLX shapes are 32-bit: no axis may exceed :data:`MAX_DIM` entries, so code that joins
many arrays along one axis (T steps × n particles) checks the product first.
"""

from __future__ import annotations

import mlx.core as mx

MAX_DIM = 2**31 - 1  # MLX 0.32: shape dimensions are int32


def row(x: mx.array, i: int) -> mx.array:
    """``x[i]`` along axis 0 as a view (``i`` may be negative, as in Python)."""
    n = x.shape[0]
    if not -n <= i < n:
        raise IndexError(f"row {i} out of range for an axis of size {n}")
    return mx.take(x, i % n, axis=0)
