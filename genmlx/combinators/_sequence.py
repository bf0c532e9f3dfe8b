"""The engine behind Unfold and Scan: a chain of kernel calls, one sub-trace per step.

The trace keeps every step's sub-trace (its choices, score and return value, hence the
carried state), so an ``update``/``regenerate`` that changes only steps ≥ t₀ starts at
t₀: the prefix is reused as it is (no kernel call, no array work), and the kernel runs
only at steps whose constraints/selection, inputs or incoming carry changed. Extending
a trace from T to T+1 steps and constraining step T runs the kernel exactly once.

Batched traces (``batch_size = n``) are updated by the same loop, with each visited
step's kernel operation vmapped over the n particles (see ``_Batched``), so the
per-update cost does not grow with T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import mlx.core as mx

from genmlx.combinators._util import constraint_axes, dress, strip, vcall
from genmlx.core.address import to_path
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, default_argdiffs, is_no_change
from genmlx.core.errors import MissingChoiceError, UnvisitedConstraintError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import project_subtrace
from genmlx.core.indexing import row
from genmlx.core.pytree import tree_unflatten, unique_by_identity
from genmlx.core.selection import Selection, select_none
from genmlx.core.trace import Trace


class StackedSteps(Sequence):
    """The step sub-traces of a sequence trace held as stacked columns: the steps
    ``h..h+k−1`` share one structure ``td`` and each distinct leaf of theirs is ONE
    array with a step axis of length k after the batch axes (``[n, k, …]`` for n
    particles; ``[k, …]`` for one trace, e.g. under ``vmap`` or after ``unbatch``);
    steps ``0..h−1`` (``head``) are ordinary sub-traces. A step is built (its leaves
    as views of the columns) when it is read, and kept; a sequence trace holding one
    flattens to the columns (:meth:`SequenceTrace._tree_flatten`), so taking rows,
    gathering particles or evaluating the trace never builds the k step sub-traces.

    ``StepsLayout`` (static): (h, k, td, leaf → column map, per column the number of
    axes after the step axis). ``src`` (optional, as SMC builds it): each column's
    step-major source ``[k·n, …]`` with n rows per step, whose contiguous slices are
    the steps' leaves."""

    __slots__ = ("head", "cols", "layout", "_src", "_subs")

    def __init__(self, head: tuple, cols: list, layout: "StepsLayout", src: tuple | None = None):
        self.head = tuple(head)
        self.cols = list(cols)
        self.layout = layout
        self._src = src  # (n, [k·n, …] sources) or None
        self._subs: dict = {}

    @classmethod
    def from_rows(cls, head: tuple, leaves: list, td, k: int, n: int) -> "StackedSteps":
        """Steps from the leaves ``[k·n, …]`` of one (stripped) sub-trace of k·n rows
        (rows t·n..(t+1)·n: step h+t of n particles); a leaf that appears twice in the
        tree (e.g. a return value that is a choice) is one column."""
        srcs, lmap = unique_by_identity(leaves)
        cols = [mx.swapaxes(x.reshape((k, n) + x.shape[1:]), 0, 1) for x in srcs]
        layout = StepsLayout(len(head), k, td, tuple(lmap), tuple(x.ndim - 1 for x in srcs))
        return cls(head, cols, layout, (n, srcs))

    def __len__(self) -> int:
        return self.layout.h + self.layout.k

    def _col_step(self, j: int, s: int):
        """Leaf column j at stacked step s (a view)."""
        if self._src is not None:
            n, srcs = self._src
            return srcs[j][s * n:(s + 1) * n]
        col = self.cols[j]
        ax = col.ndim - 1 - self.layout.trail[j]
        return col[(slice(None),) * ax + (s,)]

    def _build(self, s: int, cols: list):
        """Stacked step s from its columns' views ``cols`` (kept)."""
        sub = self._subs[s] = tree_unflatten(self.layout.td, [cols[j] for j in self.layout.lmap])
        return sub

    def stacked(self):
        """One sub-trace of the stacked steps' structure whose every leaf is the whole
        column (step axis after the batch axes): e.g. its ``retval`` is the step return
        values stacked along the step axis."""
        return tree_unflatten(self.layout.td, [self.cols[j] for j in self.layout.lmap])

    def _all(self) -> None:
        """Build every stacked step at once: one Split node per column."""
        lay = self.layout
        if len(self._subs) == lay.k:
            return
        parts = []
        for j, col in enumerate(self.cols):
            if self._src is not None:
                parts.append(mx.split(self._src[1][j], lay.k, axis=0))
            else:
                ax = col.ndim - 1 - lay.trail[j]
                parts.append([p.squeeze(ax) for p in mx.split(col, lay.k, axis=ax)])
        for s in range(lay.k):
            if s not in self._subs:
                self._build(s, [p[s] for p in parts])

    def __getitem__(self, t):
        if isinstance(t, slice):
            ts = range(*t.indices(len(self)))
            if sum(1 for u in ts if u >= self.layout.h) > 1:
                self._all()
            return tuple(self[u] for u in ts)
        t = range(len(self))[t]  # negative indices; IndexError past the end
        h = self.layout.h
        if t < h:
            return self.head[t]
        s = t - h
        sub = self._subs.get(s)
        if sub is None:
            sub = self._build(s, [self._col_step(j, s) for j in range(len(self.cols))])
        return sub

    def __iter__(self):
        self._all()
        return iter(self[:])

    def __repr__(self) -> str:
        return (f"StackedSteps(head={len(self.head)}, k={self.layout.k}, "
                f"cols={[tuple(getattr(c, 'shape', ())) for c in self.cols]})")


@dataclass(frozen=True)
class StepsLayout:
    """Static part of :class:`StackedSteps` (hashable: a treedef component)."""

    h: int
    k: int
    td: Any
    lmap: tuple
    trail: tuple


@dataclass(frozen=True, eq=False)
class SequenceTrace(Trace):
    """Trace of Unfold/Scan: ``steps[t]`` is the kernel's sub-trace of step t (its
    arguments dropped; rebuilt from the previous step's carry), ``score_`` the sum of
    the step scores. Choices of step t sit at ``(t, …)``. ``steps`` is a tuple, or a
    :class:`StackedSteps` (columns over the steps; SMC returns those), which reads the
    same (``len``, indexing, slicing, iteration) but flattens to its columns."""

    gen_fn: Any
    args: tuple
    steps: tuple
    score_: mx.array
    batch_size: int | None = None

    @property
    def retval(self):
        s = self.steps
        if isinstance(s, StackedSteps) and not s.head and self.score_.ndim <= 1:
            r = self.gen_fn._stacked_retval(self.args, s, self.score_.ndim > 0)
            if r is not None:
                return r
        # particle axes (batched, or nested in a batched trace) lead: stack after them
        return self.gen_fn._retval_of(self.args, [s.retval for s in self.steps], self.score_.ndim > 0)

    @property
    def score(self):
        return self.score_

    @property
    def choices(self) -> ChoiceMap:
        children = {}
        for t, sub in enumerate(self.steps):
            ch = sub.choices
            if not ch.is_empty():
                children[t] = ch
        return ChoiceMap(children)

    def __len__(self) -> int:
        return len(self.steps)

    def _canonical(self) -> "SequenceTrace":
        """Steps as a tuple of sub-traces (the layout of every other sequence trace)."""
        if isinstance(self.steps, StackedSteps):
            return replace(self, steps=tuple(self.steps))
        return self

    def step_scores(self) -> list:
        """log p of each step's choices given the incoming carry."""
        return [s.score for s in self.steps]

    def __getitem__(self, addr):
        path = to_path(addr)
        t = path[0]
        if not isinstance(t, int) or not 0 <= t < len(self.steps):
            raise MissingChoiceError(f"{self.gen_fn.name} has steps 0..{len(self.steps) - 1}", path)
        sub, rest = self.steps[t], path[1:]
        if not rest:
            ch = sub.choices
            return ch.get_value() if ch.is_leaf() else sub.retval
        return sub[rest if len(rest) > 1 else rest[0]]

    def _tree_flatten(self):
        s = self.steps
        if isinstance(s, StackedSteps):
            return [self.args, self.score_, *s.head, *s.cols], (self.gen_fn, s.layout, self.batch_size)
        return [self.args, self.score_, *s], (self.gen_fn, len(s), self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        gen_fn, shape, batch_size = aux
        if isinstance(shape, StepsLayout):
            h = shape.h
            steps = StackedSteps(children[2:2 + h], children[2 + h:], shape)
        else:
            steps = tuple(children[2:])
        return cls(gen_fn, children[0], steps, children[1], batch_size)


@dataclass(frozen=True)
class ArgChanges:
    """How the arguments changed, as the sequence engine needs it."""

    carry0_changed: bool  # the initial carry/state changed
    first_changed: int  # first step whose own (non-carry) inputs changed (large if none)
    changed: Any  # t -> bool: step t's own inputs changed
    step_argdiffs: Any  # (t, carry_changed) -> argdiffs of the kernel call at step t


_NEVER = 1 << 62


def fold_in(key: mx.array, t: int) -> mx.array:
    """The key of step t, derived from ``key`` and t alone, so a step draws the same
    randomness whichever step an update starts from (prefix skipping and full
    re-execution give identical traces for the same key)."""
    return row(mx.random.split(key + mx.array([0, t], dtype=mx.uint32), 2), 1)


class StepIndexUsed(Exception):
    """A kernel used the step number while it was being traced for all steps at once."""


class _StepIndex:
    """Stands in for the step number t when a kernel is traced once for every step
    (e.g. SMC's compiled step function): any use of its value (arithmetic, comparison,
    conversion, formatting, hashing into a lookup) raises :class:`StepIndexUsed`, so a
    kernel that depends on t is detected and run with the real t instead. Identity
    comparison and the identity hash (cache keys) are the only allowed uses."""

    __slots__ = ()

    def _used(self, *_, **__):
        raise StepIndexUsed("the kernel reads the step number t")

    def __eq__(self, other):
        return True if other is self else self._used()

    def __ne__(self, other):
        return False if other is self else self._used()

    __hash__ = object.__hash__
    __index__ = __int__ = __float__ = __complex__ = __bool__ = __len__ = _used
    __repr__ = __str__ = __format__ = __iter__ = __getitem__ = __call__ = _used
    __lt__ = __le__ = __gt__ = __ge__ = _used
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _used
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _used
    __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = __divmod__ = __rdivmod__ = _used
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __lshift__ = __rshift__ = _used
    __matmul__ = __rmatmul__ = __round__ = __trunc__ = __floor__ = __ceil__ = _used


STEP_INDEX = _StepIndex()


def same_leaves(flats: list) -> bool:
    """Whether flattened trees ``[(leaves, treedef), …]`` hold the very same leaf objects
    (the kernel inputs of every step are one set, so they need no per-step stacking)."""
    first = flats[0][0]
    return all(len(a) == len(first) and all(x is y for x, y in zip(a, first)) for a, _ in flats)


def holds_step_index(treedef) -> bool:
    """Whether a treedef (nested tuples of statics) holds :data:`STEP_INDEX`, i.e. the
    stand-in leaked into a returned structure (e.g. a sub-call's stored arguments)."""
    if treedef is STEP_INDEX:
        return True
    if isinstance(treedef, (tuple, list)):
        return any(holds_step_index(x) for x in treedef)
    return False


class _Single:
    """Kernel operations for one trace (also used per particle under vmap)."""

    def step_keys(self, key, t0, t1):
        return key

    def key_at(self, keys, t):
        return fold_in(keys, t)

    def simulate(self, k, gf, args_fn, carry, cb):
        return strip(gf.simulate(k, args_fn(carry)))

    def generate(self, k, gf, args_fn, carry, cb, cm):
        tr, w = gf.generate(k, args_fn(carry), cm)
        return strip(tr), w

    def update(self, k, gf, sub, old_fn, old_carry, args_fn, carry, cb, cm, argdiffs):
        tr, w, rd, disc = gf.update(k, dress(sub, old_fn(old_carry)), cm, args_fn(carry), argdiffs)
        return strip(tr), w, rd, disc

    def regenerate(self, k, gf, sub, old_fn, old_carry, args_fn, carry, cb, sel, argdiffs):
        tr, w, rd = gf.regenerate(k, dress(sub, old_fn(old_carry)), sel, args_fn(carry), argdiffs)
        return strip(tr), w, rd


class _Batched:
    """The same operations on n particles at once: each is ONE vmapped kernel call.
    ``cb`` says whether the carry is per particle (every step but the first)."""

    def __init__(self, n: int):
        self.n = n

    def step_keys(self, key, t0, t1):
        return mx.random.split(key, self.n)

    def key_at(self, keys, t):
        return mx.vmap(lambda k: fold_in(k, t))(keys)

    def simulate(self, k, gf, args_fn, carry, cb):
        fn = lambda kk, c: strip(gf.simulate(kk, args_fn(c)))  # noqa: E731
        return vcall(fn, k, (carry,), (0 if cb else None,))

    def generate(self, k, gf, args_fn, carry, cb, cm):
        probe = args_fn(_first(carry) if cb else carry)
        caxes = constraint_axes(gf, k[0], probe, cm, self.n)

        def fn(kk, c, cmm):
            tr, w = gf.generate(kk, args_fn(c), cmm)
            return strip(tr), w

        return vcall(fn, k, (carry,), (0 if cb else None,), cm, caxes)

    def update(self, k, gf, sub, old_fn, old_carry, args_fn, carry, cb, cm, argdiffs):
        caxes = constraint_axes(gf, k[0], None, cm, self.n, reference=sub.choices)
        ax = 0 if cb else None

        def fn(kk, s, oc, c, cmm):
            tr, w, rd, disc = gf.update(kk, dress(s, old_fn(oc)), cmm, args_fn(c), argdiffs)
            return strip(tr), w, rd, disc

        return vcall(fn, k, (sub, old_carry, carry), (0, ax, ax), cm, caxes)

    def regenerate(self, k, gf, sub, old_fn, old_carry, args_fn, carry, cb, sel, argdiffs):
        ax = 0 if cb else None

        def fn(kk, s, oc, c):
            tr, w, rd = gf.regenerate(kk, dress(s, old_fn(oc)), sel, args_fn(c), argdiffs)
            return strip(tr), w, rd

        return vcall(fn, k, (sub, old_carry, carry), (0, ax, ax))


def _first(tree):
    from genmlx.core.pytree import tree_map

    return tree_map(lambda x: x[0], tree)


class SequenceGF(GenerativeFunction):
    """Base of Unfold and Scan. Subclasses define ``kernel`` and the hooks
    ``_parse(args) -> (T, init_carry)``, ``_kernel_inputs(args, t, index)`` (the step's
    kernel inputs other than the carry, with ``index`` passed where the kernel gets the
    step number), ``_kernel_args(inputs, carry)`` (the kernel's argument tuple),
    ``_carry_out(step_retval)``, ``_retval_of(args, step_retvals, batched)``,
    ``_arg_changes(old_args, new_args, argdiffs) -> ArgChanges``."""

    kernel: GenerativeFunction
    _inputs_vary = True  # whether _kernel_inputs(args, t, index) differs between steps

    def __post_init__(self):
        from genmlx.combinators.family import as_gf

        object.__setattr__(self, "kernel", as_gf(self.kernel, type(self).__name__))

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({getattr(self.kernel, 'name', 'kernel')})"

    # -- helpers -----------------------------------------------------------------------
    def _step_keys(self, constraints: ChoiceMap, T: int) -> dict:
        if constraints.is_empty():
            return {}
        if constraints.is_leaf():
            raise UnvisitedConstraintError([()], self.name)
        ch = constraints.children()
        bad = [k for k in ch if not (isinstance(k, int) and 0 <= k < T)]
        if bad:
            raise UnvisitedConstraintError([(k,) for k in bad], f"{self.name} with {T} steps")
        return ch

    def _init_carry(self, args):
        return self._parse(args)[1]

    def _stacked_retval(self, args, steps: StackedSteps, batched: bool):
        """The return value from stacked steps (no step sub-traces built), or None:
        build the steps and use :meth:`_retval_of`."""
        return None

    def _step_args(self, args, t, carry):
        """The kernel's argument tuple at step t."""
        return self._kernel_args(self._kernel_inputs(args, t, t), carry)

    def _carry_before(self, trace, args, t):
        return self._init_carry(args) if t == 0 else self._carry_out(trace.steps[t - 1].retval)

    # -- the seven operations ------------------------------------------------------------
    def simulate(self, key, args):
        """Run the kernel T times from the initial carry; score = Σ_t log p(step t)."""
        return self._generate(key, tuple(args), ChoiceMap.empty())[0]

    def generate(self, key, args, constraints):
        """Constraints for step t are given at ``(t, …)``; w = Σ_t w_t (each step's
        generate weight given its incoming carry)."""
        from genmlx.core.dynamic import _as_choicemap

        return self._generate(key, tuple(args), _as_choicemap(constraints))

    def _generate(self, key, args, cm):
        T, carry = self._parse(args)
        cons = self._step_keys(cm, T)
        steps, score, weight = [], mx.array(0.0), mx.array(0.0)
        for t in range(T):
            a = self._step_args(args, t, carry)
            c = cons.get(t)
            if c is None or c.is_empty():
                tr = self.kernel.simulate(fold_in(key, t), a)
            else:
                tr, w = self.kernel.generate(fold_in(key, t), a, c)
                weight = weight + w
            steps.append(strip(tr))
            score = score + tr.score
            carry = self._carry_out(tr.retval)
        return SequenceTrace(self, args, tuple(steps), score), weight

    def assess(self, args, choices):
        """log p(τ) = Σ_t log p(τ_t | carry_t) via the kernel's ``assess``."""
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        choices = _as_choicemap(choices)
        T, carry = self._parse(args)
        cons = self._step_keys(choices, T)
        score, rets = mx.array(0.0), []
        for t in range(T):
            lp, r = self.kernel.assess(self._step_args(args, t, carry), cons.get(t, ChoiceMap.empty()))
            score = score + lp
            rets.append(r)
            carry = self._carry_out(r)
        return score, self._retval_of(args, rets, False)

    def _project(self, trace, selection: Selection):
        w = mx.zeros_like(trace.score_)
        carry = self._init_carry(trace.args)
        for t, sub in enumerate(trace.steps):
            s = selection.subselection((t,))
            if not s.is_empty():
                w = w + project_subtrace(dress(sub, self._step_args(trace.args, t, carry)), s)
            carry = self._carry_out(sub.retval)
        return w

    # -- one new step of n particles (sequential Monte Carlo) ----------------------------------
    def vextend(self, key: mx.array, inputs, carry, carry_batched: bool, constraints: ChoiceMap,
                caxes: tuple, n: int, inputs_batched: bool = False):
        """Step t of n particles as ONE vmapped kernel ``generate``: ``(sub, w)`` with the
        stripped step sub-trace (leaves [n, …]) and w_i = log p(c_t | carry_i) − …, the
        kernel's generate weight (0 without constraints), which is also the weight of
        extending a sequence trace by this step.

        ``inputs = self._kernel_inputs(args, t, index)`` are the step's other kernel
        inputs (shared, or per particle when ``inputs_batched``); ``carry`` is per
        particle (leading n) when ``carry_batched``, else
        shared; ``constraints`` are relative to the step, their leaves mapped by ``caxes``.
        Base noise is drawn for all particles from one key (``BatchNoise``, as ``vgenerate``).
        """
        from genmlx.core.pytree import tree_flatten, tree_unflatten
        from genmlx.core.vectorize import _cm_from_leaves, _keys_and_noise, _planned_vmap_generate, _with_plan

        keys, k_noise, idx = _keys_and_noise(key, n)
        cleaves, ctd = tree_flatten(carry)
        ileaves, itd = tree_flatten(inputs)
        cvals = [v for _, v in constraints.leaves()]
        try:
            pkey = (self, "vextend", itd, ctd, carry_batched, inputs_batched, tuple(caxes),
                    tuple((x.shape, x.dtype) for x in ileaves + cleaves),
                    tuple((p, getattr(v, "shape", None)) for p, v in constraints.leaves()))
            hash(pkey)
        except TypeError:
            pkey = None
        nc, cax = len(cleaves), 0 if carry_batched else None
        ni = len(ileaves) if inputs_batched else 0

        def generate(k, rest):
            c = tree_unflatten(ctd, list(rest[:nc]))
            inp = tree_unflatten(itd, list(rest[nc:nc + ni])) if ni else inputs
            cm = _cm_from_leaves(constraints, rest[nc + ni:])
            return self.kernel.generate(k, self._kernel_args(inp, c), cm)

        def run():
            return _planned_vmap_generate(pkey, keys, k_noise, idx, n, generate,
                                          lambda tr: tree_flatten(strip(tr)),
                                          (*([cax] * nc), *([0] * ni), *caxes),
                                          (*cleaves, *(ileaves if ni else []), *cvals))

        out, box = _with_plan(run, pkey, key)
        return tree_unflatten(box["td"], out[1:]), out[0]

    def step_record(self, sub, constraints: ChoiceMap):
        """What a particle filter keeps of a step (:meth:`vreplay` rebuilds the rest):
        ``(choices, carry)`` — the step's unconstrained choices (a choice map) and the
        leaves of its outgoing carry, each an array or, when it is one of those choice
        values, that value's position (an int)."""
        from genmlx.core.pytree import tree_flatten

        held = {p for p, _ in constraints.leaves()}
        vals = [(p, v) for p, v in sub.choices.leaves() if p not in held]
        pos = {id(v): i for i, (_, v) in enumerate(vals)}
        carry = [pos.get(id(x), x) for x in tree_flatten(self._carry_out(sub.retval))[0]]
        out = ChoiceMap.empty()
        for p, v in vals:
            out = out.set_submap(p, ChoiceMap.leaf(v))
        return out, carry

    def vreplay(self, args, steps: list, n: int, shared_index: bool = True) -> list:
        """Step sub-traces rebuilt from their choices: ``steps`` holds ``(t, carry,
        carry_batched, choices)`` with every choice of step t given per particle
        ([n, …]); each is ``generate`` with all choices constrained, deterministic (the
        same values, their scores and return value). The batched steps of one structure
        run as ONE vmapped call over steps × particles, with the kernel's step number
        :data:`STEP_INDEX` when ``shared_index`` (else, or if the kernel reads t, step
        by step with the real t)."""
        from genmlx.core.pytree import tree_flatten

        key = mx.random.key(0)  # nothing is sampled
        out = [None] * len(steps)
        groups: dict = {}
        for j, (t, carry, batched, cm) in enumerate(steps):
            if not (batched and shared_index):
                continue
            cl, ctd = tree_flatten(carry)
            il, itd = tree_flatten(self._kernel_inputs(args, t, STEP_INDEX))
            sig = (ctd, itd, tuple((x.shape, x.dtype) for x in cl + il),
                   tuple((p, v.shape, v.dtype) for p, v in cm.leaves()))
            groups.setdefault(sig, []).append(j)
        for ids in groups.values():
            if len(ids) < 2:
                continue
            try:
                subs = self._vreplay_group(key, args, [steps[j] for j in ids], n)
            except Exception:  # noqa: BLE001 - e.g. the kernel reads t: step by step below
                continue
            for j, sub in zip(ids, subs):
                out[j] = sub
        for j, (t, carry, batched, cm) in enumerate(steps):
            if out[j] is None:
                caxes = tuple(0 for _ in cm.leaves())
                out[j] = self.vextend(key, self._kernel_inputs(args, t, t), carry, batched, cm,
                                      caxes, n)[0]
        return out

    def _vreplay_group(self, key, args, steps: list, n: int) -> list:
        """:meth:`vreplay` of k steps of one structure as one call on k·n rows."""
        from genmlx.core.pytree import tree_flatten, tree_unflatten

        k = len(steps)

        def rows(xs):  # k arrays [n, …] -> one [k·n, …]
            return mx.concatenate(xs, axis=0)

        flats = [tree_flatten(c) for _, c, _, _ in steps]
        carry = tree_unflatten(flats[0][1], [rows(list(xs)) for xs in zip(*(f[0] for f in flats))])
        cms = [list(cm.leaves()) for *_, cm in steps]
        cm = ChoiceMap.empty()
        for i, (p, _) in enumerate(cms[0]):
            cm = cm.set_submap(p, ChoiceMap.leaf(rows([c[i][1] for c in cms])))
        ins = [tree_flatten(self._kernel_inputs(args, t, STEP_INDEX)) for t, *_ in steps]
        if same_leaves(ins):
            inputs = tree_unflatten(ins[0][1], ins[0][0])
        else:
            inputs = tree_unflatten(ins[0][1], [
                rows([mx.broadcast_to(x[None], (n,) + x.shape) for x in xs])
                for xs in zip(*(a for a, _ in ins))])
        sub, _ = self.vextend(key, inputs, carry, True, cm, tuple(0 for _ in cm.leaves()), k * n,
                              inputs_batched=not shared)
        leaves, td = tree_flatten(sub)
        if holds_step_index(td):
            raise StepIndexUsed("the step number is stored in the step's trace")
        # rows j·n..(j+1)·n: one Split node per leaf (k indexed views would be k nodes)
        parts = [mx.split(x, k, axis=0) for x in leaves]
        return [tree_unflatten(td, [ps[j] for ps in parts]) for j in range(k)]

    # -- update / regenerate with prefix skipping -----------------------------------------
    def update(self, key, trace, constraints, args=None, argdiffs=None):
        """See :meth:`GenerativeFunction.update`. Only steps ≥ t₀ are visited, where t₀
        is the first step that is constrained, new, or whose inputs changed (argdiffs);
        a batched trace is updated step by step, one vmapped kernel call per step."""
        if trace.batch_size is None:
            return self._update(key, trace, constraints, args, argdiffs)
        new, w, rd, disc = self._update_impl(key, trace, constraints, args, argdiffs,
                                             _Batched(trace.batch_size))
        return replace(new, batch_size=trace.batch_size), w, rd, disc

    def regenerate(self, key, trace, selection, args=None, argdiffs=None):
        """See :meth:`GenerativeFunction.regenerate`; prefix skipping as in ``update``."""
        if trace.batch_size is None:
            return self._regenerate(key, trace, selection, args, argdiffs)
        new, w, rd = self._regenerate_impl(key, trace, selection, args, argdiffs,
                                           _Batched(trace.batch_size))
        return replace(new, batch_size=trace.batch_size), w, rd

    def _update(self, key, trace, constraints, args, argdiffs):
        return self._update_impl(key, trace, constraints, args, argdiffs, _Single())

    def _regenerate(self, key, trace, selection, args, argdiffs):
        return self._regenerate_impl(key, trace, selection, args, argdiffs, _Single())

    def _resolve_args(self, trace, args, argdiffs):
        old_args = trace.args
        if args is None:
            return old_args, tuple(NoChange for _ in old_args)
        args = tuple(args)
        if argdiffs is None:
            argdiffs = default_argdiffs(old_args, args)
        if len(argdiffs) != len(args):
            raise ValueError(f"{self.name}: {len(args)} arguments but {len(argdiffs)} argdiffs")
        return args, tuple(argdiffs)

    def _update_impl(self, key, trace, constraints, args, argdiffs, E):
        from genmlx.core.dynamic import _as_choicemap

        old_args = trace.args
        args, argdiffs = self._resolve_args(trace, args, argdiffs)
        cm = _as_choicemap(constraints)
        T_old = len(trace.steps)
        T_new, _ = self._parse(args)
        cons = self._step_keys(cm, T_new)
        ch = self._arg_changes(old_args, args, argdiffs)

        weight = mx.zeros_like(trace.score_)
        score = trace.score_
        discard = {}
        for t in range(T_new, T_old):  # removed steps
            weight = weight - trace.steps[t].score
            score = score - trace.steps[t].score
            d = trace.steps[t].choices
            if not d.is_empty():
                discard[t] = d
        starts = [T_new, ch.first_changed] + list(cons)
        if ch.carry0_changed:
            starts.append(0)
        if T_new > T_old:
            starts.append(T_old)
        t0 = min(starts)
        steps = list(trace.steps[:min(T_old, T_new)])
        changed_steps = []
        if t0 < T_new:
            keys = E.step_keys(key, t0, T_new)
            carry_old = self._carry_before(trace, old_args, t0)
            carry_new = self._carry_before(trace, args, t0)
            carry_changed = ch.carry0_changed if t0 == 0 else False
            for t in range(t0, T_new):
                c = cons.get(t, ChoiceMap.empty())
                new_fn = partial(self._step_args, args, t)
                if t < T_old:
                    old_sub = trace.steps[t]
                    if not (carry_changed or ch.changed(t) or not c.is_empty()):
                        carry_old = carry_new = self._carry_out(old_sub.retval)
                        continue
                    old_fn = partial(self._step_args, old_args, t)
                    sub, w, rd, d = E.update(E.key_at(keys, t), self.kernel, old_sub, old_fn,
                                             carry_old, new_fn, carry_new, t > 0, c,
                                             ch.step_argdiffs(t, carry_changed))
                    if not d.is_empty():
                        discard[t] = d
                    score = score + (sub.score - old_sub.score)
                    carry_changed = not is_no_change(rd)
                    if carry_changed:
                        changed_steps.append(t)
                    carry_old = self._carry_out(old_sub.retval)
                    steps[t] = sub
                else:
                    if c.is_empty():
                        sub = E.simulate(E.key_at(keys, t), self.kernel, new_fn, carry_new, t > 0)
                        w = mx.zeros_like(weight)
                    else:
                        sub, w = E.generate(E.key_at(keys, t), self.kernel, new_fn, carry_new, t > 0, c)
                    score = score + sub.score
                    changed_steps.append(t)
                    steps.append(sub)
                weight = weight + w
                carry_new = self._carry_out(sub.retval)
        new = SequenceTrace(self, args, tuple(steps), score)
        retdiff = self._retdiff(changed_steps, T_old, T_new)
        return new, weight, retdiff, ChoiceMap(discard)

    def _regenerate_impl(self, key, trace, selection, args, argdiffs, E):
        old_args = trace.args
        args, argdiffs = self._resolve_args(trace, args, argdiffs)
        T_old = len(trace.steps)
        T_new, _ = self._parse(args)
        ch = self._arg_changes(old_args, args, argdiffs)
        sels = {}
        for t in range(min(T_old, T_new)):
            s = selection.subselection((t,))
            if not s.is_empty():
                sels[t] = s
        weight = mx.zeros_like(trace.score_)
        score = trace.score_
        for t in range(T_new, T_old):  # removed steps: no weight term (prior in both directions)
            score = score - trace.steps[t].score
        starts = [T_new, ch.first_changed] + list(sels)
        if ch.carry0_changed:
            starts.append(0)
        if T_new > T_old:
            starts.append(T_old)
        t0 = min(starts)
        steps = list(trace.steps[:min(T_old, T_new)])
        changed_steps = []
        if t0 < T_new:
            keys = E.step_keys(key, t0, T_new)
            carry_old = self._carry_before(trace, old_args, t0)
            carry_new = self._carry_before(trace, args, t0)
            carry_changed = ch.carry0_changed if t0 == 0 else False
            none = select_none()
            for t in range(t0, T_new):
                new_fn = partial(self._step_args, args, t)
                s = sels.get(t)
                if t < T_old:
                    old_sub = trace.steps[t]
                    if not (carry_changed or ch.changed(t) or s is not None):
                        carry_old = carry_new = self._carry_out(old_sub.retval)
                        continue
                    old_fn = partial(self._step_args, old_args, t)
                    sub, w, rd = E.regenerate(E.key_at(keys, t), self.kernel, old_sub, old_fn,
                                              carry_old, new_fn, carry_new, t > 0,
                                              s if s is not None else none,
                                              ch.step_argdiffs(t, carry_changed))
                    score = score + (sub.score - old_sub.score)
                    weight = weight + w
                    carry_changed = not is_no_change(rd)
                    if carry_changed:
                        changed_steps.append(t)
                    carry_old = self._carry_out(old_sub.retval)
                    steps[t] = sub
                else:
                    sub = E.simulate(E.key_at(keys, t), self.kernel, new_fn, carry_new, t > 0)
                    score = score + sub.score
                    changed_steps.append(t)
                    steps.append(sub)
                carry_new = self._carry_out(sub.retval)
        new = SequenceTrace(self, args, tuple(steps), score)
        return new, weight, self._retdiff(changed_steps, T_old, T_new)

    def _retdiff(self, changed_steps, T_old, T_new):
        if not changed_steps and T_old == T_new:
            return NoChange
        return UnknownChange


def stack_leading(values: list, batched: bool):
    """Stack per-step values along the step axis (axis 1 for batched traces, whose
    leaves lead with the particle axis)."""
    from genmlx.combinators._util import stack_trees

    return stack_trees(values, axis=1 if batched else 0)


def unchanged_everywhere(_t) -> bool:
    return False


def changed_everywhere(_t) -> bool:
    return True


__all__ = ["SequenceGF", "SequenceTrace", "StackedSteps", "StepsLayout", "ArgChanges",
           "stack_leading", "fold_in", "STEP_INDEX", "StepIndexUsed", "holds_step_index"]
