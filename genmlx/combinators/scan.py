"""Scan: ``carry, y_t = kernel(carry, x_t)`` over a sequence of inputs.

``scan = gm.Scan(kernel)`` is called as ``scan(init_carry, xs)`` where ``xs`` is an array
(or a tuple/dict of arrays) with a leading axis of length T. The kernel is a GF called as
``kernel(carry, x_t)`` returning the pair ``(carry, y_t)``. Choices of step t sit at
``(t, …)``; the return value is ``(final_carry, ys)`` with ``ys`` stacked along a
leading axis ``[T, …]`` (``None`` when T = 0).

    log p(τ; c₀, xs) = Σ_t log p_kernel(τ_t; c_t, x_t).

``argdiffs`` for ``xs``: ``gm.IntDiff(k)`` — k new elements were appended (the first T
unchanged); ``gm.VectorDiff(changed=(i, …))`` — only those elements changed;
``NoChange``/``UnknownChange``. Updates start at the first constrained or changed step
(prefix skipping), so appending one element and constraining its step runs the kernel
once.
"""

from __future__ import annotations

from dataclasses import dataclass


from genmlx.combinators._sequence import (
    ArgChanges,
    SequenceGF,
    SequenceTrace,
    _NEVER,
    changed_everywhere,
    stack_leading,
    unchanged_everywhere,
)
from genmlx.core.diff import IntDiff, NoChange, UnknownChange, VectorDiff, is_no_change
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.indexing import row
from genmlx.core.pytree import tree_flatten, tree_map

ScanTrace = SequenceTrace


@dataclass(frozen=True)
class Scan(SequenceGF):
    """A scan of ``kernel(carry, x_t) → (carry, y_t)`` over ``xs``; see the module docstring."""

    kernel: GenerativeFunction

    def _parse(self, args):
        if len(args) != 2:
            raise ValueError(f"{self.name} is called as scan(init_carry, xs); got {len(args)} argument(s)")
        leaves, _ = tree_flatten(args[1])
        if not leaves:
            raise ValueError(f"{self.name}: xs must be an array (or a tuple/dict of arrays) "
                             "with a leading axis over the steps")
        lengths = {x.shape[0] if x.ndim else None for x in leaves}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"{self.name}: every array in xs needs the same leading length T; "
                             f"got leading shapes {sorted(str(x.shape) for x in leaves)}")
        return lengths.pop(), args[0]

    def _init_carry(self, args):
        return args[0]

    _inputs_vary = True  # x_t

    def _kernel_inputs(self, args, t, index):
        # a Python int t: a view (x[t] would be a gather kernel); else (a traced index) a take
        return (tree_map(lambda a: row(a, t) if isinstance(t, int) else a[t], args[1]),)

    def _kernel_args(self, inputs, carry):
        return (carry, inputs[0])

    def _carry_out(self, retval):
        if not isinstance(retval, (tuple, list)) or len(retval) != 2:
            raise ValueError(f"{self.name}: the kernel must return a pair (carry, y), got "
                             f"{type(retval).__name__}")
        return retval[0]

    def _retval_of(self, args, step_retvals, batched):
        if not step_retvals:
            return args[0], None
        carry = self._carry_out(step_retvals[-1])
        return carry, stack_leading([r[1] for r in step_retvals], batched)

    def _arg_changes(self, old_args, new_args, argdiffs):
        d0, dxs = argdiffs
        T_old, _ = self._parse(old_args)
        T_new, _ = self._parse(new_args)
        if isinstance(dxs, IntDiff) and dxs.delta != 0:
            if T_new != T_old + dxs.delta:
                raise ValueError(f"{self.name}: argdiff IntDiff({dxs.delta}) on xs, but its length "
                                 f"went from {T_old} to {T_new}")
            first, changed = _NEVER, unchanged_everywhere  # new steps are visited anyway
        elif is_no_change(dxs):
            first, changed = _NEVER, unchanged_everywhere
        elif isinstance(dxs, VectorDiff):
            idx = frozenset(int(i) for i in dxs.changed)
            first, changed = (min(idx) if idx else _NEVER), idx.__contains__
        else:
            first, changed = 0, changed_everywhere

        def step_argdiffs(t, carry_changed):
            return (UnknownChange if carry_changed else NoChange,
                    UnknownChange if changed(t) else NoChange)

        return ArgChanges(not is_no_change(d0), first, changed, step_argdiffs)
