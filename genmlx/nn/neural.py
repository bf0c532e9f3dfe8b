"""``NeuralNetGF``: a deterministic generative function around an ``mlx.nn.Module``.

It makes no random choices: for arguments x its density is the point mass on the empty
choice map, so score = 0, every weight = 0, and the return value is ``module(*x)``.
Because the module's parameters are read at call time, ``nn.value_and_grad`` over a
container holding the module (see :func:`genmlx.nn.trainable`) differentiates through
every traced call such as ``decoder(z) @ "dec"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, is_no_change
from genmlx.core.errors import AddressedError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.trace import StoredTrace
from genmlx.nn.layers import use_fast_linear


@dataclass(frozen=True, eq=False)
class NeuralTrace(StoredTrace):
    """Trace of a :class:`NeuralNetGF` call: arguments, return value, score 0."""

    zero_score: ClassVar[bool] = True  # handlers skip adding it (see core.handlers)

    gen_fn: "NeuralNetGF"
    args: tuple
    retval_: Any
    score_: mx.array
    batch_size: int | None = None

    @property
    def choices(self) -> ChoiceMap:
        return ChoiceMap.empty()

    def __getitem__(self, addr):
        raise AddressedError("a neural network makes no random choices; use tr.retval",
                             addr if isinstance(addr, tuple) else (addr,))

    def _tree_flatten(self):
        return [self.args, self.retval_, self.score_], (self.gen_fn, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        args, retval, score = children
        return cls(aux[0], args, retval, score, aux[1])


class NeuralNetGF(GenerativeFunction):
    """Deterministic GF with retval ``module(*args)``, no choices, score and weights 0.

    >>> decoder = gm.nn.NeuralNetGF(gm.nn.mlp([10, 200, 784]))
    >>> @gm.gen
    ... def vae():
    ...     z = gm.normal(mx.zeros(10), 1.0) @ "z"
    ...     logits = decoder(z) @ "dec"
    ...     return gm.bernoulli(logits=logits) @ "x"

    Performance note (MLX 0.32): ``nn.Linear`` computes ``addmm(b, x, Wᵀ)``, whose
    gradient under ``mx.vmap`` (vectorized GFI, the amortized objectives) materializes a
    per-example weight gradient — 10–25× slower for wide layers. ``gm.nn.Linear`` (used
    by ``gm.nn.mlp`` and the heads) computes ``x @ Wᵀ + b`` with the same parameters and
    has no such cost. With ``fast_linear=True`` (default) the wrapped module's plain
    ``nn.Linear`` layers are turned into ``gm.nn.Linear`` in place
    (:func:`gm.nn.use_fast_linear`: same parameter arrays, same outputs up to rounding).
    """

    zero_score = True  # assess scores are identically 0 (see core.handlers)

    def __init__(self, module: nn.Module, name: str | None = None, *, lift: bool = False,
                 fast_linear: bool = True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"NeuralNetGF wraps an mlx.nn.Module, got {type(module).__name__}")
        self.module = use_fast_linear(module) if fast_linear else module
        self.name = name or type(module).__name__
        self.lift = bool(lift)

    def apply(self, *args):
        """``module(*args)``; with ``lift=True`` the module is called on the array
        arguments with a unit leading axis, removed again from every output array (for
        modules that need a batch axis, e.g. convolutions on one image)."""
        if not self.lift:
            return self.module(*args)
        lifted = [a[None] if isinstance(a, mx.array) else a for a in args]
        return _unlift(self.module(*lifted))

    def __repr__(self) -> str:
        return f"NeuralNetGF({self.name})"

    def _run(self, args: tuple) -> NeuralTrace:
        args = tuple(args)
        return NeuralTrace(self, args, self.apply(*args), mx.array(0.0))

    @staticmethod
    def _no_constraints(constraints: ChoiceMap | None, op: str) -> None:
        if constraints is not None and not constraints.is_empty():
            addrs = ", ".join(repr(a) for a in constraints.addresses()[:3])
            raise AddressedError(
                f"{op}: a neural network makes no random choices, but constraints were "
                f"given for it ({addrs})"
            )

    def simulate(self, key, args=()):
        """retval = module(*args); score = 0."""
        return self._run(args)

    def generate(self, key, args, constraints):
        """No choices: constraints must be empty; w = 0."""
        self._no_constraints(constraints, "generate")
        return self._run(args), mx.array(0.0)

    def assess(self, args, choices):
        """log p = 0 (the only choice map is the empty one); retval = module(*args)."""
        self._no_constraints(choices, "assess")
        return mx.array(0.0), self.apply(*tuple(args))

    def propose(self, key, args=()):
        return ChoiceMap.empty(), mx.array(0.0), self.apply(*tuple(args))

    def _update(self, key, trace, constraints, args, argdiffs):
        """Recomputes the output for new arguments; w = 0, discard empty."""
        self._no_constraints(constraints, "update")
        if args is None or (argdiffs is not None and all(map(is_no_change, argdiffs))):
            new = self._run(trace.args if args is None else args)
            return new, mx.array(0.0), NoChange, ChoiceMap.empty()
        return self._run(args), mx.array(0.0), UnknownChange, ChoiceMap.empty()

    def _regenerate(self, key, trace, selection, args, argdiffs):
        """Nothing to resample; w = 0."""
        new, w, retdiff, _ = self._update(key, trace, None, args, argdiffs)
        return new, w, retdiff

    def _project(self, trace, selection):
        return mx.zeros_like(trace.score)


def _unlift(out):
    if isinstance(out, mx.array):
        return out[0]
    if isinstance(out, (tuple, list)):
        return type(out)(_unlift(o) for o in out)
    if isinstance(out, dict):
        return {k: _unlift(v) for k, v in out.items()}
    return out
