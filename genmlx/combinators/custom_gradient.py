"""CustomGradientGF: a deterministic generative function with a user-supplied gradient.

``cg = gm.CustomGradientGF(forward, backward, differentiable=(True, False))`` is called
as ``cg(*args)``; it makes no random choices (score 0, every weight 0) and returns
``forward(*args)``. Differentiating through the return value uses ``backward`` instead
of differentiating ``forward`` (an ``mx.custom_function`` with a custom vjp):

    backward(args, cotangent, output) → one gradient per argument

(``None`` allowed for a non-differentiable argument). ``differentiable`` flags which
arguments have gradients; the others get zero cotangents, and
``cg.argument_differentiable`` (alias ``has_argument_grads``) tells gradient-based
inference which arguments to skip. Under ``mx.vmap`` the forward and backward are called
on the batched arrays (the batch axis moved to the front), so both must broadcast over a
leading batch axis for batched gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, is_no_change
from genmlx.core.errors import UnvisitedConstraintError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.trace import Trace


@dataclass(frozen=True, eq=False)
class CustomGradientTrace(Trace):
    gen_fn: Any
    args: tuple
    retval_: Any
    batch_size: int | None = None

    @property
    def retval(self):
        return self.retval_

    @property
    def score(self):
        return mx.array(0.0) if self.batch_size is None else mx.zeros((self.batch_size,))

    @property
    def choices(self) -> ChoiceMap:
        return ChoiceMap.empty()

    def _tree_flatten(self):
        return [self.args, self.retval_], (self.gen_fn, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], children[1], aux[1])


@dataclass(frozen=True, init=False)
class CustomGradientGF(GenerativeFunction):
    """A deterministic GF ``forward(*args)`` whose vjp is ``backward``; see the module docstring."""

    forward: Callable
    backward: Callable
    differentiable: tuple | None
    fn: Any = field(compare=False, repr=False)

    def __init__(self, forward: Callable, backward: Callable, differentiable=None):
        if not callable(forward) or not callable(backward):
            raise TypeError("CustomGradientGF: forward and backward must be callables")
        if differentiable is not None:
            differentiable = tuple(bool(d) for d in differentiable)
        object.__setattr__(self, "forward", forward)
        object.__setattr__(self, "backward", backward)
        object.__setattr__(self, "differentiable", differentiable)
        object.__setattr__(self, "fn", self._build())

    @property
    def name(self) -> str:
        return f"CustomGradientGF({getattr(self.forward, '__name__', 'forward')})"

    @property
    def argument_differentiable(self) -> tuple | None:
        """Per-argument flags: True where gradients flow (``None``: all arguments)."""
        return self.differentiable

    has_argument_grads = argument_differentiable

    def is_differentiable(self, i: int) -> bool:
        return True if self.differentiable is None else self.differentiable[i]

    def _build(self):
        fwd, bwd = self.forward, self.backward
        flags = self.differentiable

        @mx.custom_function
        def fn(*args):
            return fwd(*args)

        @fn.vjp
        def fn_vjp(primals, cotangent, output):
            grads = bwd(tuple(primals), cotangent, output)
            if not isinstance(grads, (tuple, list)):
                grads = (grads,)
            if len(grads) != len(primals):
                raise ValueError(f"CustomGradientGF: backward returned {len(grads)} gradients "
                                 f"for {len(primals)} arguments")
            out = []
            for i, (g, x) in enumerate(zip(grads, primals)):
                off = flags is not None and not flags[i]
                out.append(mx.zeros_like(x) if (off or g is None) else g)
            return tuple(out)

        @fn.vmap
        def fn_vmap(inputs, axes):
            moved = [x if ax is None else mx.moveaxis(x, ax, 0) for x, ax in zip(inputs, axes)]
            return fn(*moved), 0

        return fn

    def _check_args(self, args):
        if self.differentiable is not None and len(self.differentiable) != len(args):
            raise ValueError(f"{self.name}: {len(args)} arguments but {len(self.differentiable)} "
                             "differentiable flags")

    def _run(self, args) -> CustomGradientTrace:
        args = tuple(args)
        self._check_args(args)
        arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in args]
        return CustomGradientTrace(self, args, self.fn(*arrays))

    def _no_choices(self, cm):
        if cm is not None and not cm.is_empty():
            raise UnvisitedConstraintError([p for p, _ in cm.leaves()], f"{self.name} (makes no choices)")

    def simulate(self, key, args):
        return self._run(args)

    def generate(self, key, args, constraints):
        self._no_choices(constraints)
        return self._run(args), mx.array(0.0)

    def assess(self, args, choices):
        self._no_choices(choices)
        return mx.array(0.0), self._run(args).retval

    def _update(self, key, trace, constraints, args, argdiffs):
        self._no_choices(constraints)
        if args is None or (argdiffs is not None and all(is_no_change(d) for d in argdiffs)):
            return trace, mx.array(0.0), NoChange, ChoiceMap.empty()
        return self._run(args), mx.array(0.0), UnknownChange, ChoiceMap.empty()

    def _regenerate(self, key, trace, selection, args, argdiffs):
        if args is None or (argdiffs is not None and all(is_no_change(d) for d in argdiffs)):
            return trace, mx.array(0.0), NoChange
        return self._run(args), mx.array(0.0), UnknownChange

    def _project(self, trace, selection):
        return mx.array(0.0)
