"""Row selection without a gather kernel.

In MLX 0.32 ``x[i]`` for an integer ``i`` becomes a ``Gather`` primitive — a kernel
launch (microseconds on a CPU, ~10 µs on a GPU) — while ``mx.take(x, i, axis=0)`` with
a non-negative Python int is a ``Slice`` + ``Squeeze``: views, no kernel. Hot paths
(NUTS blocks, resampling) pick rows with :func:`row`.

MLX shapes are 32-bit: no axis may exceed :data:`MAX_DIM` entries, so code that joins
many arrays along one axis (T steps × n particles) checks the product first.

:func:`iota` gives 0 … n − 1 as a constant array: inside ``mx.compile`` an
``mx.arange`` is a primitive, run (a kernel launch on a GPU) at every call.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

MAX_DIM = 2**31 - 1  # MLX 0.32: shape dimensions are int32


def row(x: mx.array, i: int) -> mx.array:
    """``x[i]`` along axis 0 as a view (``i`` may be negative, as in Python)."""
    n = x.shape[0]
    if not -n <= i < n:
        raise IndexError(f"row {i} out of range for an axis of size {n}")
    return mx.take(x, i % n, axis=0)


@functools.lru_cache(maxsize=4)
def iota(n: int) -> mx.array:
    """0 … n − 1 (int32), an evaluated constant (cached for the last few n): a compiled
    function that uses it holds it as a constant, where ``mx.arange`` would be a
    primitive run at every call."""
    a = mx.array(np.arange(n, dtype=np.int32))
    mx.eval(a)
    return a
