"""Mix: a mixture of generative functions with the component index as a choice.

``mix = gm.Mix([g0, g1, …])`` is called as ``mix(weights, *args)``: it draws the
component index k ~ Categorical(weights) at the address ``"component"`` (an int32
choice) and then runs ``g_k(*args)`` (every component gets the same ``args``); the
component's choices sit at their own addresses beside ``"component"`` (so no component
may use that address). ``weights`` are probabilities (non-negative, summing to 1:
anything else is a ``ValueError`` naming Mix) or, with ``gm.Mix(components,
logits=True)``, unnormalised log-weights.

    log p(τ; w, args) = log w_k + log p_{g_k}(τ \\ {component}; args).

The component call is a :class:`~genmlx.combinators.switch.Switch`, so in batched mode
each particle may use a different component (see Switch for the batched semantics of
``tr.choices``). ``update`` with a new ``"component"`` value generates the new component
from its prior with the remaining constraints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from genmlx.combinators._util import concrete_array, dress, strip
from genmlx.combinators.switch import Switch, index_of
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, default_argdiffs
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.trace import Trace

COMPONENT = "component"


@dataclass(frozen=True, eq=False)
class MixTrace(Trace):
    gen_fn: Any
    args: tuple
    switch_tr: Any  # SwitchTrace of the component call (args dropped)
    index_score: mx.array  # log w_k
    score_: mx.array
    batch_size: int | None = None

    @property
    def component(self) -> mx.array:
        return self.switch_tr.index_

    @property
    def retval(self):
        return self._switch().retval

    def _switch(self):
        from dataclasses import replace

        return replace(self.switch_tr, batch_size=self.batch_size)

    @property
    def score(self):
        return self.score_

    @property
    def choices(self) -> ChoiceMap:
        return ChoiceMap({COMPONENT: ChoiceMap.leaf(self.component)}).merge(self._switch().choices)

    def __getitem__(self, addr):
        return self.choices[addr]

    def _tree_flatten(self):
        return [self.args, self.switch_tr, self.index_score, self.score_], (self.gen_fn, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        return cls(aux[0], *children, aux[1])


def _without_component(cm: ChoiceMap) -> ChoiceMap:
    out = ChoiceMap.empty()
    for p, v in cm.leaves():
        if p[0] != COMPONENT:
            out = out.set_submap(p, ChoiceMap.leaf(v))
    return out


@dataclass(frozen=True, init=False)
class Mix(GenerativeFunction):
    """``Mix(components, logits=False)`` called as ``mix(weights, *args)``."""

    components: tuple
    logits: bool = False
    switch: Switch = field(default=None, compare=False, repr=False)

    def __init__(self, components, logits: bool = False):
        comps = tuple(components)
        for j, c in enumerate(comps):
            if not isinstance(c, GenerativeFunction):
                raise TypeError(f"Mix: component {j} must be a generative function whose choices "
                                f"have addresses (e.g. @gm.gen), got {type(c).__name__}")
        if len(comps) < 1:
            raise ValueError("Mix: give at least one component")
        object.__setattr__(self, "components", comps)
        object.__setattr__(self, "logits", bool(logits))
        object.__setattr__(self, "switch", Switch(*comps))

    @property
    def name(self) -> str:
        return "Mix(" + ", ".join(getattr(c, "name", "?") for c in self.components) + ")"

    def log_weights(self, weights) -> mx.array:
        """Normalised log-weights; checks probabilities when they can be evaluated."""
        w = weights if isinstance(weights, mx.array) else mx.array(weights)
        K = len(self.components)
        if w.ndim != 1 or w.shape[0] != K:
            raise ValueError(f"Mix: expected {K} component weights (shape ({K},)), got shape {tuple(w.shape)}")
        w = w.astype(mx.float32)
        if self.logits:
            return w - mx.logsumexp(w)
        arr = concrete_array(w)
        if arr is not None:
            s = float(arr.sum())
            if (arr < 0).any() or abs(s - 1.0) > 1e-4:
                raise ValueError(
                    f"Mix: the component weights must be probabilities (non-negative, summing to 1); "
                    f"got {arr.tolist()} (sum {s:.6g}). Normalise them, or build "
                    "gm.Mix(components, logits=True) to pass unnormalised log-weights")
        return mx.log(w)

    def _parse(self, args):
        if not args:
            raise ValueError(f"{self.name} is called as mix(weights, *args)")
        return self.log_weights(args[0]), tuple(args[1:])

    def _component_constraint(self, cm: ChoiceMap):
        sub = cm.get_submap(COMPONENT)
        if sub.is_empty():
            return None
        if not sub.is_leaf():
            raise ValueError(f"{self.name}: the address '{COMPONENT}' holds the component index, "
                             "not a sub-map")
        return index_of(sub.get_value(), len(self.components), "Mix")

    # -- the seven operations ------------------------------------------------------------
    def simulate(self, key, args):
        """k ~ Categorical(w), then the component; score = log w_k + component score."""
        return self.generate(key, args, ChoiceMap.empty())[0]

    def generate(self, key, args, constraints):
        """k constrained: w = log w_k + w_component; else k ~ prior and w = w_component."""
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        cm = _as_choicemap(constraints)
        logw, rest = self._parse(args)
        k1, k2 = mx.random.split(key)
        k = self._component_constraint(cm)
        constrained = k is not None
        if not constrained:
            k = mx.random.categorical(logw, key=k1).astype(mx.int32)
        lk = mx.take(logw, k)
        sw, wsw = self.switch.generate(k2, (k, *rest), _without_component(cm))
        tr = MixTrace(self, args, strip(sw), lk, lk + sw.score)
        return tr, (lk + wsw) if constrained else wsw

    def assess(self, args, choices):
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        cm = _as_choicemap(choices)
        logw, rest = self._parse(args)
        k = self._component_constraint(cm)
        if k is None:
            from genmlx.core.errors import MissingChoiceError

            raise MissingChoiceError(f"assess needs the component index ({self.name})", (COMPONENT,))
        lp, r = self.switch.assess((k, *rest), _without_component(cm))
        return mx.take(logw, k) + lp, r

    def _resolve(self, trace, args, argdiffs):
        if args is None:
            return trace.args, tuple(NoChange for _ in trace.args)
        args = tuple(args)
        return args, tuple(argdiffs) if argdiffs is not None else default_argdiffs(trace.args, args)

    def _update(self, key, trace, constraints, args, argdiffs):
        """w = [log w'_{k'} − log w_k] + w_component-update (Switch semantics for a new k')."""
        from genmlx.core.dynamic import _as_choicemap

        cm = _as_choicemap(constraints)
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        logw, rest = self._parse(args)
        k_old = trace.switch_tr.index_
        k = self._component_constraint(cm)
        discard = ChoiceMap.empty()
        if k is None:
            k, kdiff = k_old, NoChange
        else:
            kdiff = UnknownChange
            discard = ChoiceMap({COMPONENT: ChoiceMap.leaf(k_old)})
        lk = mx.take(logw, k)
        old_sw = dress(trace.switch_tr, (k_old, *old_args[1:]))
        sw, wsw, rd, dsw = self.switch.update(key, old_sw, _without_component(cm), (k, *rest),
                                              (kdiff, *argdiffs[1:]))
        if not dsw.is_empty():
            discard = discard.merge(dsw)
        new = MixTrace(self, args, strip(sw), lk, lk + sw.score)
        return new, (lk - trace.index_score) + wsw, rd, discard

    def _regenerate(self, key, trace, selection, args, argdiffs):
        """Component selected: k' ~ Categorical(w'), no weight term for k; otherwise
        log w'_k − log w_k. The component's regenerate (Switch) adds the rest."""
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        logw, rest = self._parse(args)
        k_old = trace.switch_tr.index_
        k1, k2 = mx.random.split(key)
        if selection.contains_path((COMPONENT,)):
            k = mx.random.categorical(logw, key=k1).astype(mx.int32)
            lk = mx.take(logw, k)
            wk, kdiff = mx.zeros_like(lk), UnknownChange
        else:
            k, kdiff = k_old, NoChange
            lk = mx.take(logw, k)
            wk = lk - trace.index_score
        old_sw = dress(trace.switch_tr, (k_old, *old_args[1:]))
        sw, wsw, rd = self.switch.regenerate(k2, old_sw, selection, (k, *rest), (kdiff, *argdiffs[1:]))
        return MixTrace(self, args, strip(sw), lk, lk + sw.score), wk + wsw, rd

    def _project(self, trace, selection):
        k = trace.switch_tr.index_
        sw = dress(trace.switch_tr, (k, *trace.args[1:]))
        w = self.switch._project(sw, selection)
        if selection.contains_path((COMPONENT,)):
            w = w + trace.index_score
        return w
