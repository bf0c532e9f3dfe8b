"""Data-parallel helpers over ``mx.distributed`` (one process per device).

Launch N processes with ``mlx.launch -n N --backend ring|nccl|mpi …``; each calls
:func:`world` (``mx.distributed.init()``, cached). Without a launcher the group has size 1
and every helper is the identity, so the same code runs on one device.

- :func:`all_mean` ``(tree) -> tree``: the element-wise mean over processes,
  ``(1/N) Σ_r tree_r``, as ONE ``all_sum`` of the leaves packed into a float32 buffer
  (one collective per call; traceable, so it runs inside ``mx.compile``).
- :func:`barrier`: every process waits until all reach it (a tiny ``all_sum``).
- :func:`shard_bounds` / :func:`shard`: rank r's contiguous share ``[r·n/N, (r+1)·n/N)``
  of a leading axis of length n (n must be divisible by N).
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map

_WORLD = None


def world():
    """The process group (``mx.distributed.init()``, made once per process)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = mx.distributed.init()
    return _WORLD


def rank() -> int:
    """This process's rank in :func:`world` (0 without a launcher)."""
    return world().rank()


def size() -> int:
    """The number of processes in :func:`world` (1 without a launcher)."""
    return world().size()


def is_main() -> bool:
    """True on rank 0, the process that writes files and prints."""
    return rank() == 0


def all_mean(tree):
    """``(1/N) Σ_r tree_r`` over the N processes, for a tree of arrays (dicts, lists,
    tuples). Leaves are flattened into one float32 buffer, summed with a single
    ``mx.distributed.all_sum`` and cast back to their dtypes. Identity when N = 1."""
    n = size()
    if n == 1:
        return tree
    if isinstance(tree, mx.array):
        return (mx.distributed.all_sum(tree.astype(mx.float32), group=world()) * (1.0 / n)).astype(tree.dtype)
    leaves = []
    tree_map(lambda v: leaves.append(v) if isinstance(v, mx.array) else None, tree)
    if not leaves:
        return tree
    buf = mx.concatenate([v.astype(mx.float32).reshape(-1) for v in leaves])
    buf = mx.distributed.all_sum(buf, group=world()) * (1.0 / n)
    parts, off = [], 0
    for v in leaves:
        parts.append(buf[off:off + v.size].reshape(v.shape).astype(v.dtype))
        off += v.size
    it = iter(parts)
    return tree_map(lambda v: next(it) if isinstance(v, mx.array) else v, tree)


def barrier() -> None:
    """Block until every process has reached this call (no-op when N = 1)."""
    if size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world()))


def any_flag(flag: bool) -> bool:
    """True when ``flag`` is true on any process (a tiny all-reduce; all ranks agree)."""
    if size() == 1:
        return bool(flag)
    return float(mx.distributed.all_sum(mx.array(1.0 if flag else 0.0), group=world())) > 0


def shard_bounds(n: int, r: int | None = None, N: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank r's share of a length-n axis split into N equal parts."""
    r = rank() if r is None else r
    N = size() if N is None else N
    if n % N:
        raise ValueError(f"cannot split {n} items evenly over {N} processes")
    b = n // N
    return r * b, (r + 1) * b


def shard(x, axis: int = 0, r: int | None = None, N: int | None = None):
    """Rank r's contiguous share of ``x`` along ``axis`` (a tree of arrays is sharded leaf-wise)."""
    if isinstance(x, dict):
        return {k: shard(v, axis, r, N) for k, v in x.items()}
    lo, hi = shard_bounds(x.shape[axis], r, N)
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(lo, hi)
    return x[tuple(idx)]


def fold_rank(key: mx.array, r: int | None = None, N: int | None = None) -> mx.array:
    """A per-rank key: ``split(key, N)[r]`` when N > 1, ``key`` itself when N = 1."""
    r = rank() if r is None else r
    N = size() if N is None else N
    return key if N == 1 else mx.random.split(key, N)[r]


__all__ = ["world", "rank", "size", "is_main", "all_mean", "barrier", "any_flag", "shard_bounds", "shard",
           "fold_rank"]
