"""Unfold: a state-space chain ``state_t = kernel(t, state_{t−1}, *params)``.

``unfold = gm.Unfold(kernel)`` is called as ``unfold(T, init_state, *params)``. The
kernel is a GF called as ``kernel(t, state, *params)`` (``t`` a Python int, 0..T−1)
returning the new state. Choices of step t sit at ``(t, …)``. The return value is the
sequence of states stacked along a leading axis, shape ``[T, *state_shape]`` (for a
tuple/dict state, each leaf stacked; a batched trace's retval is ``[n, T, …]``).

    log p(τ; T, s₀, θ) = Σ_{t<T} log p_kernel(τ_t; t, s_t, θ),   s_{t+1} = retval of step t.

Incremental update: ``unfold.update(key, tr, {(T, …): obs}, args=(T + 1, s0, *θ),
argdiffs=(gm.IntDiff(1), gm.NoChange, gm.NoChange, …))`` runs the kernel once (step T);
steps before the first constrained / changed step are never re-executed.
``argdiffs``: the first (length) is informational (lengths are compared directly);
a changed initial state re-runs from step 0; a changed parameter re-runs every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from genmlx.combinators._sequence import (
    ArgChanges,
    SequenceGF,
    SequenceTrace,
    _NEVER,
    changed_everywhere,
    stack_leading,
    unchanged_everywhere,
)
from genmlx.core.diff import NoChange, UnknownChange, VectorDiff, is_no_change
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.pytree import tree_map

UnfoldTrace = SequenceTrace


def static_length(T, who: str) -> int:
    """``T`` as a non-negative Python int (a concrete integer array is accepted)."""
    if isinstance(T, mx.array):
        try:
            T = T.item()
        except ValueError:
            raise ValueError(f"{who}: the number of steps T must be a concrete int, not a "
                             "traced array (it fixes the trace's structure)") from None
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"{who}: the number of steps T must be a non-negative int, got {T!r}")
    return T


@dataclass(frozen=True)
class Unfold(SequenceGF):
    """T applications of ``kernel(t, state, *params) → state``; see the module docstring."""

    kernel: GenerativeFunction

    def _parse(self, args):
        if len(args) < 2:
            raise ValueError(f"{self.name} is called as unfold(T, init_state, *params); "
                             f"got {len(args)} argument(s)")
        return static_length(args[0], "Unfold"), args[1]

    def _init_carry(self, args):
        return args[1]

    _inputs_vary = False  # the kernel inputs besides t and the carry are the same every step

    def _kernel_inputs(self, args, t, index):
        return (index, *args[2:])

    def _kernel_args(self, inputs, carry):
        return (inputs[0], carry, *inputs[1:])

    def _carry_out(self, retval):
        return retval

    def _retval_of(self, args, step_retvals, batched):
        if not step_retvals:
            return tree_map(lambda x: mx.zeros((0, *x.shape), x.dtype), args[1])
        return stack_leading(step_retvals, batched)

    def _stacked_retval(self, args, steps, batched):
        # the step states stacked along the step axis: the columns themselves
        return steps.stacked().retval if len(steps) else None

    def _arg_changes(self, old_args, new_args, argdiffs):
        if len(new_args) != len(old_args):
            raise ValueError(f"{self.name}: update cannot change the number of parameters")
        pdiffs = argdiffs[2:]
        params_changed = not all(is_no_change(d) for d in pdiffs)
        step_pd = tuple(NoChange if is_no_change(d) else UnknownChange for d in pdiffs)

        def step_argdiffs(t, carry_changed):
            return (NoChange, UnknownChange if carry_changed else NoChange, *step_pd)

        return ArgChanges(
            carry0_changed=not is_no_change(argdiffs[1]),
            first_changed=0 if params_changed else _NEVER,
            changed=changed_everywhere if params_changed else unchanged_everywhere,
            step_argdiffs=step_argdiffs,
        )

    def _retdiff(self, changed_steps, T_old, T_new):
        if not changed_steps and T_old == T_new:
            return NoChange
        return VectorDiff(changed=tuple(changed_steps))
