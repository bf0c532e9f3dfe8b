"""Operator rewrites while :class:`~genmlx.inference.flat_density.FlatDensity` traces
a model body under ``mx.vmap`` over chains (the graph is built once per compilation).

Two patterns of ordinary model code give needlessly large graphs there (MLX 0.32):

* ``tau * theta`` with ``tau`` a scalar per chain and ``theta`` a vector: vmap aligns
  the batched operands from the right, so the product is laid out [*shape, C] (chain
  axis last) and transposed back at the vmap's output; the transposes are views, but
  they split the elementwise arithmetic before and after them into separate kernels
  (in the reverse pass as well). Swapping the operands of ``+`` and ``*`` when the
  first has fewer dimensions keeps the chain axis leading; IEEE addition and
  multiplication are commutative, so the values are bit-identical (``a − b`` of
  floats is taken as ``(−b) + a``, also exact).
* a chain-dependent operand of lower rank (``mu`` or ``tau`` against ``theta``): vmap
  aligns it by a Broadcast and a Transpose, and its gradient by a Transpose before
  the reduction. Giving it the other operand's rank first (leading size-1 axes, one
  ExpandDims: what broadcasting does anyway, so the same values) keeps both operands'
  chain axes in place: 2 view nodes fewer forward, 1 in the reverse pass
  (``+ − * /``).
* a scalar latent per chain is given to the body twice: as the scalar the model sees and
  as its [C, 1] column (its block of U, a (1,) array per chain). Lifting the scalar to
  rank 1 returns the column instead of an ExpandDims of the scalar (same values), so a
  body that only uses the scalar against vectors never reshapes the block [C, 1] → [C]
  and back, and its gradient comes out as the column's, without a Squeeze.
* ``beta[0]`` on a latent vector: an integer index is a ``Gather`` (and a ``Scatter`` in
  the reverse pass). For a latent whose elements the body takes one by one, the flat
  density passes each element as its own input (its own column of U) and ``x[i]``
  returns that input: no gather, and its gradient is the column's gradient.

Only the operators of ``mx.array`` are replaced, only while a :class:`BodyOps` is
entered, and the previous ones are restored on exit (the tracing is single-threaded).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def _int_index(key, n: int) -> int | None:
    """``key`` as a non-negative index into an axis of ``n`` when it is one integer."""
    if isinstance(key, tuple) and len(key) == 1:
        key = key[0]
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and -n <= key < n:
        return int(key) % n
    return None


class BodyOps:
    """A context manager installing the rewrites above. ``watch(x, path, cols)``
    registers a latent vector ``x``: integer indices into it are recorded in
    ``indexed[path]`` and, given ``cols`` (one array per element), answered by them."""

    def __init__(self):
        self._watched: dict = {}  # id(x) -> (x, path, cols or None)
        self._columns: dict = {}  # id(x) -> (x, its (1,) column) for scalar latents
        self.indexed: dict = {}  # path -> set of element indices seen
        self._saved: dict = {}

    def column(self, x: mx.array, col: mx.array) -> None:
        """Register ``col`` (shape (1,)) as the rank-1 lift of the scalar ``x``."""
        self._columns[id(x)] = (x, col)

    def _lift(self, a: mx.array, rank: int):
        """``a`` with leading size-1 axes up to ``rank`` (:func:`_lifted`), a registered
        scalar's column where one is known."""
        hit = self._columns.get(id(a))
        if hit is not None and hit[0] is a and rank > a.ndim:
            col = hit[1]
            return col if rank == 1 else mx.expand_dims(col, tuple(range(rank - 1)))
        return _lifted(a, rank)

    def watch(self, x: mx.array, path: tuple, cols: list | None = None) -> None:
        self._watched[id(x)] = (x, path, cols)
        self.indexed.setdefault(path, set())

    def __enter__(self) -> "BodyOps":
        cls = mx.array
        self._saved = {k: getattr(cls, k) for k in ("__getitem__", "__add__", "__mul__", "__sub__",
                                                     "__truediv__")}
        getitem = self._saved["__getitem__"]

        def __getitem__(a, key):
            hit = self._watched.get(id(a))
            if hit is not None and a.ndim == 1:
                i = _int_index(key, a.shape[0])
                if i is not None:
                    self.indexed[hit[1]].add(i)
                    if hit[2] is not None:
                        return hit[2][i]
            return getitem(a, key)

        cls.__getitem__ = __getitem__
        lift = self._lift
        add = _leading(self._saved["__add__"], lift)
        sub = _ranked(self._saved["__sub__"], lift)
        cls.__add__ = add
        cls.__mul__ = _leading(self._saved["__mul__"], lift)
        cls.__truediv__ = _ranked(self._saved["__truediv__"], lift)

        def __sub__(a, b):
            if isinstance(b, mx.array) and b.ndim > a.ndim and mx.issubdtype(b.dtype, mx.floating):
                return add(-b, a)
            return sub(a, b)

        cls.__sub__ = __sub__
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self._saved.items():
            setattr(mx.array, k, v)
        self._saved = {}
        self._watched = {}
        self._columns = {}


def _traced(a) -> bool:
    """Whether ``a`` is an array depending on the traced inputs (inside the vmapped body:
    on the chain), i.e. it cannot be evaluated now."""
    if not isinstance(a, mx.array):
        return False
    try:
        mx.eval(a)
        return False
    except (RuntimeError, ValueError):
        return True


def _lifted(a, rank: int):
    """``a`` with leading size-1 axes up to ``rank`` when it is chain-dependent (one
    ExpandDims; broadcasting would add the same axes), else ``a``."""
    k = rank - a.ndim
    return mx.expand_dims(a, tuple(range(k))) if k > 0 and _traced(a) else a


def _ranked(op, lift=_lifted):
    """A binary operator whose chain-dependent operand of lower rank is lifted to the
    other's rank first (``lift``, :func:`_lifted` by default): same values, no vmap
    transposes."""
    def f(a, b):
        if isinstance(b, mx.array):
            if b.ndim < a.ndim:
                b = lift(b, a.ndim)
            elif a.ndim < b.ndim:
                a = lift(a, b.ndim)
        return op(a, b)

    return f


def _leading(op, lift=_lifted):
    """A commutative operator that puts the operand with more dimensions first (and
    lifts a chain-dependent operand of lower rank: :func:`_ranked`)."""
    ranked = _ranked(op, lift)

    def f(a, b):
        if isinstance(b, mx.array) and b.ndim > a.ndim:
            return ranked(b, a)
        return ranked(a, b)

    return f

