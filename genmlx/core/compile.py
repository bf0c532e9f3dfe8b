"""``gm.compile``: ``mx.compile`` for functions taking and returning genmlx structures.

Arguments and results may be traces, choice maps, tuples/lists/dicts of them, and
arrays; they are flattened to arrays (``genmlx.core.pytree``) around an ``mx.compile``d
function. One compiled function is kept per argument structure (treedef), so a call
with a differently structured trace compiles anew instead of silently reusing a graph
traced for another structure. Randomness must come in through an explicit key argument.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from genmlx.core.pytree import tree_flatten, tree_unflatten
from genmlx.core.validation import tracing


def compile(fn: Callable, **compile_kwargs) -> Callable:  # noqa: A001 (mirrors mx.compile)
    cache: dict = {}

    def wrapped(*args: Any) -> Any:
        leaves, td = tree_flatten(args)
        try:
            key = hash(td), td
        except TypeError:  # unhashable static content: compile per call (correct, slower)
            key = None
        entry = cache.get(key) if key is not None else None
        if entry is None:
            box: dict = {}

            def flat_fn(*flat):
                with tracing():
                    out = fn(*tree_unflatten(td, list(flat)))
                out_leaves, box["out"] = tree_flatten(out)
                return out_leaves

            entry = (mx.compile(flat_fn, **compile_kwargs), box)
            if key is not None:
                cache[key] = entry
        compiled, box = entry
        out_leaves = compiled(*leaves)
        return tree_unflatten(box["out"], out_leaves)

    wrapped.__wrapped__ = fn
    wrapped.__doc__ = fn.__doc__
    return wrapped
