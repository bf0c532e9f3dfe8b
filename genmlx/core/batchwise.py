"""Per-example arithmetic that, under genmlx's vmap, runs on batch-leading arrays.

``mx.vmap`` batches each primitive on its own: a scalar constant meeting a batched
array is broadcast to the per-example shape and then reshaped to take the batch axis,
an unbatched operand is reshaped (and transposed where a broadcast put the batch axis
last). Each is a graph node that ``mx.compile`` keeps (a reshape also stops fusion),
and on a GPU every node costs host time. :func:`batchwise` makes a function whose
``vmap`` rule instead moves each batched input's axis to the front and calls the
function once on the batched arrays, as hand-batched code would: scalars and
unbatched operands then broadcast inside the fused kernels, with no node of their own.

The function returns one scalar per example and is written for batch axes first (one
per vmap level: inside nested vmaps the rule returns the next level's custom function,
whose own rule the enclosing vmap applies) or one batch axis last
(:func:`example_sum` reduces the others).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Callable, Hashable

import mlx.core as mx

from genmlx.core.validation import inside_vmap, nested_vmap
from genmlx.kernels import sums


#: per-example sums of at most this many elements over at least UNROLL_MIN_EXAMPLES examples
#: are written as additions of column views (0: never): k − 1 additions of strided views
#: are ONE elementwise kernel, where MLX's reduction of many short rows runs far below the
#: memory bandwidth (MLX 0.32.4 on an H200: the row sums of [2.5·10⁸, 4] float32 75.7 ms,
#: the additions 2.4 ms, an elementwise pass 2.3 ms; [2.5·10⁸, 8] 75.9 vs 8.7 ms; on the
#: CPU ~1.8×). Few examples (NUTS chains, a VAE batch) keep the one Sum node.
UNROLL_MAX = 8
UNROLL_MIN_EXAMPLES = 1 << 15


def example_sum(x: mx.array, batch: int | str | None) -> mx.array:
    """Σ of ``x`` over its per-example axes: all of them (``batch`` None), all but the
    first ``batch`` (an int: that many leading batch axes) or all but the last ("last").
    Short per-example sums over many examples are unrolled (:data:`UNROLL_MAX`); longer
    ones (≤ :data:`genmlx.kernels.sums.K_MAX` entries) run as CUDA kernels
    (:mod:`genmlx.kernels.sums`)."""
    if batch is None:
        return mx.sum(x)
    lead = 1 if batch == "last" else batch
    if x.ndim <= lead:
        return x
    axes = tuple(range(x.ndim - 1)) if batch == "last" else tuple(range(lead, x.ndim))
    k = 1
    for a in axes:
        k *= x.shape[a]
    if 1 < k <= UNROLL_MAX and x.size // k >= UNROLL_MIN_EXAMPLES:
        # one view per per-example index (no reshape: a reshape of a broadcast copies)
        lead_slices = () if batch == "last" else (slice(None),) * lead
        total = None
        for ix in itertools.product(*(range(x.shape[a]) for a in axes)):
            part = x[lead_slices + ix]
            total = part if total is None else total + part
        return total
    if UNROLL_MAX < k <= sums.K_MAX and x.size // k >= UNROLL_MIN_EXAMPLES and sums.on_cuda(x):
        if batch == "last":  # the examples' entries as rows [k, N]: one thread per column
            cols = x.reshape(k, -1)
            if sums.usable(cols, 0):
                return sums.col_sums(cols)
        else:  # as rows [N, k]: one warp per row
            rows = x.reshape(-1, k)
            if sums.usable(rows, 1):
                return sums.row_sums(rows).reshape(x.shape[:lead])
    return mx.sum(x, axis=axes)


def _layout(inputs, axes, level: int) -> str:
    """"last" at the first level when a batched input of per-example rank ≥ 1 has its
    batch axis last (as ``mx.vmap`` of a broadcast leaves it: keeping it avoids a
    transpose that would stop fusion with its producer), else "first"."""
    if level == 0:
        for x, ax in zip(inputs, axes):
            if ax is not None and x.ndim >= 2 and ax == x.ndim - 1:
                return "last"
    return "first"


def _arrange(x: mx.array, ax: int | None, rank: int, batch: str) -> mx.array:
    """An input laid out to broadcast right-aligned in the ``batch`` layout of per-example
    rank ``rank``: a batched one with its axis first (its per-example shape padded with
    unit axes to ``rank``) or last; an unbatched one as it is, or with a unit axis
    appended ("last" layout, per-example rank ≥ 1)."""
    if ax is None:
        return x.reshape(tuple(x.shape) + (1,)) if batch == "last" and x.ndim else x
    to = 0 if batch == "first" else x.ndim - 1
    if ax != to:
        x = mx.moveaxis(x, ax, to)
    pad = rank - (x.ndim - 1)
    if batch == "first" and pad > 0:
        return x.reshape((x.shape[0],) + (1,) * pad + tuple(x.shape[1:]))
    return x


def _custom(cache: dict, key: Hashable, forward: Callable, rule: Callable):
    """The custom function of ``forward`` with vmap rule ``rule``, made once per ``key``."""
    f = cache.get(key)
    if f is None:
        f = cache[key] = mx.custom_function(forward)
        f.vmap(rule)
    return f


class _Batchwise:
    """See :func:`batchwise`. Level k: the function of inputs carrying k leading batch
    axes from k enclosing vmaps already applied (level 0: one example)."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self._custom: dict = {}

    def __call__(self, static: Hashable, *xs: mx.array) -> mx.array:
        if not inside_vmap():
            return self._fn(None, static, *xs)
        return self._custom_for(static, 0)(*xs)

    def _custom_for(self, static, level: int):
        return _custom(self._custom, (static, level), partial(self._fn, level or None, static),
                       partial(self._rule, static, level))

    def _rule(self, static, level: int, inputs, axes):
        if isinstance(inputs, mx.array):  # one input: MLX passes it and its axis bare
            inputs, axes = (inputs,), (axes,)
        batch = _layout(inputs, axes, level)
        if batch == "last":
            if nested_vmap():  # a trailing axis would not compose with an outer one
                return mx.vmap(partial(self._fn, None, static), in_axes=tuple(axes))(*inputs), 0
            lay = "last"
        else:
            lay = level + 1
        rank = max(x.ndim - (ax is not None) for x, ax in zip(inputs, axes))
        xs = [_arrange(x, ax, rank, batch) for x, ax in zip(inputs, axes)]
        if lay != "last" and nested_vmap():  # an enclosing vmap applies the next level
            return self._custom_for(static, level + 1)(*xs), 0
        return self._fn(lay, static, *xs), 0


def batchwise(fn: Callable) -> Callable:
    """``fn(batch, static, *arrays) -> per-example scalar`` as ``f(static, *arrays)``:
    called directly (``batch`` None) outside genmlx's vmaps; under them, a custom
    function whose vmap rule calls ``fn(batch, static, *arrays)`` on the batched inputs
    with ``batch`` leading batch axes (an int, one per enclosing vmap), or one trailing
    batch axis ("last") — see the module docstring; ``fn`` reduces with
    :func:`example_sum`. ``static`` is a hashable trace-time configuration (one custom
    function per value and level). Every array passed must reach the result (a batched
    input that did not would leave the result without its batch axis)."""
    return _Batchwise(fn)


class _Elementwise:
    """See :func:`elementwise`."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self._custom: dict = {}

    def __call__(self, static: Hashable, x: mx.array) -> mx.array:
        if not inside_vmap():
            return self._fn(static, x)
        return self._custom_for(static)(x)

    def _custom_for(self, static):
        return _custom(self._custom, static, partial(self._fn, static), partial(self._rule, static))

    def _rule(self, static, x, ax):
        # one input: MLX passes the array and its axis themselves, not in tuples
        run = self._custom_for(static) if nested_vmap() else partial(self._fn, static)
        return run(x), ax


def elementwise(fn: Callable) -> Callable:
    """``fn(static, x)``, elementwise in ``x``, whose vmap rule (under genmlx's vmaps)
    applies ``fn`` to the batched ``x`` as it is: its constants broadcast inside the
    fused kernel instead of costing a broadcast and a reshape node each."""
    return _Elementwise(fn)
