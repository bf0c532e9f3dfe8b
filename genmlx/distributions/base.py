"""The distribution base class: a distribution with parameters is a generative function
with no arguments whose single choice sits at the root address.

Shapes follow ``sample_shape + batch_shape + event_shape``: ``batch_shape`` is the
broadcast of the parameters' shapes (less their event dimensions), ``event_shape`` the
shape of one draw of a multivariate distribution. ``log_prob`` returns one value per
batch element; as a GF (``gm.trace``, ``simulate``, …) the score of an array-valued
choice is the SUM over its elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange
from genmlx.core.errors import AddressedError, ConstraintShapeError, MissingChoiceError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.selection import Selection
from genmlx.core.trace import Trace
from genmlx.core.validation import concrete_all, validation_enabled
from genmlx.distributions import constraints as C


class UnconstrainedValue:
    """A constraint given in unconstrained space: ``generate`` maps it through the
    support's bijection x = f(u) and adds log|det ∂f/∂u| to the weight. Used by HMC,
    NUTS and ADVI to evaluate log densities on R^k, including dependent supports."""

    _is_choice_wrapper = True
    __slots__ = ("u",)

    def __init__(self, u: mx.array):
        self.u = u

    @property
    def shape(self):
        return self.u.shape

    @property
    def ndim(self):
        return self.u.ndim

    def _tree_flatten(self):
        return [self.u], None

    @classmethod
    def _tree_unflatten(cls, aux, children):
        return cls(children[0])


@dataclass(frozen=True, eq=False)
class DistTrace(Trace):
    """Trace of a single draw: ``choices`` is a leaf map holding ``value``."""

    family: type
    args: tuple
    value: mx.array
    score_: mx.array
    batch_size: int | None = None

    @property
    def gen_fn(self):
        return self.family

    @property
    def retval(self):
        return self.value

    @property
    def score(self):
        return self.score_

    @property
    def choices(self) -> ChoiceMap:
        return ChoiceMap.leaf(self.value)

    def __getitem__(self, addr):
        raise MissingChoiceError("a distribution's trace has its value at the root; use tr.retval", (addr,) if not isinstance(addr, tuple) else addr)

    def _tree_flatten(self):
        return [self.args, self.value, self.score_], (self.family, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        args, value, score = children
        return cls(aux[0], args, value, score, aux[1])


class Distribution(GenerativeFunction):
    """A parameterised probability distribution.

    Subclasses set the class attributes and implement ``_sample(key, shape)`` (the
    full output shape) and ``_log_prob(value)`` (elementwise over batch dims, summed
    over event dims); they store parameters as ``mx.array`` attributes and call
    :meth:`_init` with ``{name: value}`` (validated against ``arg_constraints``).
    """

    name: ClassVar[str] = "distribution"
    _is_distribution: ClassVar[bool] = True
    #: "normal" / "uniform" when a draw is ``_from_noise(standard noise)`` (enables
    #: batched base noise in vsimulate/vgenerate); None otherwise.
    _noise_kind: ClassVar[str | None] = None
    arg_constraints: ClassVar[dict] = {}
    reparameterized: ClassVar[bool] = False
    discrete: ClassVar[bool] = False
    event_ndim: ClassVar[int] = 0

    # -- construction ------------------------------------------------------------
    def _init(self, params: dict, batch_shape: tuple | None = None, event_shape: tuple = ()) -> None:
        self._params = params
        if batch_shape is None:
            shapes = [tuple(getattr(v, "shape", ())) for v in params.values()]
            try:
                batch_shape = tuple(mx.broadcast_shapes(*shapes)) if shapes else ()
            except ValueError:
                desc = ", ".join(f"'{k}' {s}" for k, s in zip(params, shapes))
                raise ValueError(f"{self.name}: parameter shapes do not broadcast ({desc})") from None
        self._batch_shape = tuple(batch_shape)
        self._event_shape = tuple(event_shape)
        if validation_enabled():
            self._validate()

    def _validate(self) -> None:
        for pname, constraint in self.arg_constraints.items():
            value = self._params.get(pname)
            if value is None:
                continue
            ok = concrete_all(constraint.check(value))
            if ok is False:
                raise ValueError(
                    f"{self.name}: parameter '{pname}' must be in {constraint!r}, got {_show(value)}"
                )

    @property
    def params(self) -> dict:
        return dict(self._params)

    @property
    def batch_shape(self) -> tuple:
        return self._batch_shape

    @property
    def event_shape(self) -> tuple:
        return self._event_shape

    @property
    def shape(self) -> tuple:
        """Shape of one draw (= of the choice at the address): batch + event."""
        return self._batch_shape + self._event_shape

    @property
    def support(self) -> C.Constraint:
        raise NotImplementedError

    # -- sampling and density ------------------------------------------------------
    def sample(self, key: mx.array, sample_shape: tuple = ()) -> mx.array:
        """Draw ``sample_shape + batch_shape + event_shape`` values. Reparameterized
        (gradients flow to the parameters) where ``reparameterized`` is True.

        The draw is materialised (``mx.contiguous``) so that ``mx.compile`` does not
        fuse the sampler's elementwise tail (erfinv, scaling) into broadcasting
        consumers, where it would be recomputed once per consumer element: for a
        choice broadcast against 50 data points that is 50x the sampling work.
        """
        x = mx.contiguous(self._sample(key, tuple(sample_shape) + self.shape))
        return x if self.reparameterized else mx.stop_gradient(x)

    def log_prob(self, value) -> mx.array:
        """log density (or mass) of ``value``, one per batch element."""
        return self._log_prob(_as_array(value))

    def _sample(self, key, shape):
        raise NotImplementedError

    def _log_prob(self, value):
        raise NotImplementedError

    def mean(self):
        raise NotImplementedError(f"{self.name} has no closed-form mean here")

    def variance(self):
        raise NotImplementedError(f"{self.name} has no closed-form variance here")

    def __matmul__(self, addr):
        from genmlx.core.handlers import trace

        return trace(addr, self)

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={_show(v)}" for k, v in self._params.items())
        return f"{self.name}({ps})"

    # -- GFI -----------------------------------------------------------------------
    def _score(self, value) -> mx.array:
        """Σ log p(value) over the choice's elements (the GF score). Families may override
        it to sum parameter-only terms in closed form (see :func:`sum_broadcast`)."""
        return mx.sum(self._log_prob(value))

    def simulate(self, key, args=()):
        """Draw v; score = Σ log p(v)."""
        v = self.sample(key)
        return DistTrace(type(self), (), v, self._score(v))

    def _from_noise(self, eps: mx.array) -> mx.array:
        raise NotImplementedError

    def simulate_from_noise(self, eps: mx.array) -> DistTrace:
        """Like ``simulate`` with the draw given as a transform of standard noise
        ``eps`` (N(0, 1) or U(0, 1) per ``_noise_kind``) of this choice's shape."""
        v = self._from_noise(eps)
        if v is not eps:  # materialise a transform (see ``sample``); plain noise already is
            v = mx.contiguous(v)
        if not self.reparameterized:
            v = mx.stop_gradient(v)
        return DistTrace(type(self), (), v, self._noise_score(eps, v))

    def _noise_score(self, eps: mx.array, value: mx.array) -> mx.array:
        """Σ log p(value) for ``value = _from_noise(eps)``. Families may compute it from the
        noise (same value, and the same total derivative along the reparameterized path)."""
        return self._score(value)

    def _constrained_value(self, constraints: ChoiceMap):
        """(value, extra log-Jacobian) of a leaf constraint, checking its shape."""
        if not constraints.is_leaf():
            addrs = ", ".join(repr(a) for a in constraints.addresses()[:3])
            raise AddressedError(
                f"{self.name} makes a single choice here, but constraints were given "
                f"below it ({addrs})"
            )
        v = constraints.get_value()
        if isinstance(v, UnconstrainedValue):
            sup = self.support
            u = v.u
            expect_u = sup.unconstrained_shape(self.shape)
            if tuple(u.shape) != tuple(expect_u):
                err = ConstraintShapeError(
                    f"{self.name}: unconstrained value has shape {tuple(u.shape)}, "
                    f"expected {tuple(expect_u)}"
                )
                err.expected_shape = tuple(expect_u)  # read by inference.unconstrained
                raise err
            x = sup.from_unconstrained(u)
            return x, mx.sum(sup.log_abs_det_jacobian(u))
        v = _as_array(v)
        if tuple(v.shape) != self.shape:
            raise ConstraintShapeError(
                f"{self.name}: the constrained value has shape {tuple(v.shape)}, but this "
                f"choice has shape {self.shape}"
            )
        return v, None

    def generate(self, key, args, constraints):
        """Constrained: v = σ, w = log p(v) (plus log|J| for an UnconstrainedValue).
        Unconstrained: v ~ p, w = 0."""
        if constraints is None or constraints.is_empty():
            return self.simulate(key), mx.array(0.0)
        v, logdet = self._constrained_value(constraints)
        s = self._score(v)
        tr = DistTrace(type(self), (), v, s)
        return tr, (s if logdet is None else s + logdet)

    def assess(self, args, choices):
        """log p(v) and v, for the value at the root of ``choices``."""
        if choices is None or choices.is_empty():
            raise MissingChoiceError(f"assess needs a value for this {self.name} choice")
        v, _ = self._constrained_value(choices)
        return self._score(v), v

    def propose(self, key, args=()):
        tr = self.simulate(key)
        return tr.choices, tr.score, tr.value

    def _update(self, key, trace, constraints, args, argdiffs):
        """Constrained: v' = σ, discard = {v}; else v' = v. w = log p'(v') − log p(v)."""
        if constraints is not None and not constraints.is_empty():
            v, _ = self._constrained_value(constraints)
            s = self._score(v)
            new = DistTrace(type(self), (), v, s)
            return new, s - trace.score, UnknownChange, ChoiceMap.leaf(trace.value)
        s = self._score(trace.value)
        new = DistTrace(type(self), (), trace.value, s)
        return new, s - trace.score, NoChange, ChoiceMap.empty()

    def _regenerate(self, key, trace, selection: Selection, args, argdiffs):
        """Selected: v' ~ p', w = 0. Unselected: v' = v, w = log p'(v) − log p(v)."""
        if selection.is_all_here():
            new = self.simulate(key)
            return new, mx.zeros_like(trace.score), UnknownChange
        s = self._score(trace.value)
        return DistTrace(type(self), (), trace.value, s), s - trace.score, NoChange

    def _project(self, trace, selection):
        return trace.score if selection.is_all_here() else mx.zeros_like(trace.score)

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__


def sum_broadcast(c: mx.array, shape: tuple) -> mx.array:
    """Σ of ``c`` broadcast to ``shape``, without materialising the broadcast:
    sum(c) · (|shape| / |c|) (each element of c is repeated equally often)."""
    size = 1
    for d in shape:
        size *= d
    reps = size // max(c.size, 1)
    total = mx.sum(c) if c.ndim else c
    return total if reps == 1 else total * reps


def _as_array(v) -> mx.array:
    if isinstance(v, mx.array):
        return v
    return mx.array(v)


def _show(v) -> str:
    if isinstance(v, mx.array):
        try:
            return repr(v.item()) if v.size == 1 else f"array of shape {tuple(v.shape)}"
        except ValueError:
            return f"array of shape {tuple(v.shape)}"
    return repr(v)


def is_static(x, value: float) -> bool:
    """Whether the parameter ``x`` was given as the plain Python number ``value``
    (known at trace time, so an operation with it as identity can be skipped)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == value


def static_log(x, offset: float = 0.0) -> float | None:
    """``log(x) + offset`` as a Python float when ``x`` is a positive plain Python number
    (a trace-time constant), else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0:
        return math.log(x) + offset
    return None


def param(x, dtype=mx.float32) -> mx.array:
    """Convert a distribution parameter to an ``mx.array`` (floats to float32)."""
    if isinstance(x, mx.array):
        return x if mx.issubdtype(x.dtype, mx.floating) or dtype is None else x.astype(dtype)
    return mx.array(x, dtype=dtype)
