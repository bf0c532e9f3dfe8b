"""Map: a generative function applied independently over the leading axis of its arguments.

``mapped = gm.Map(gf)`` is called as ``mapped(*args)``; every array in ``args`` has the
same leading length N (non-array arguments such as Python numbers are shared by all
elements). Element i runs ``gf(*args_i)`` with ``args_i`` the i-th slices; its choices
sit at ``(i, …)``; the return value is the elements' return values stacked ``[N, …]``.

    log p(τ; args) = Σ_i log p_gf(τ_i; args_i).

All N elements run as ONE ``mx.vmap`` of the kernel's GFI operation (the kernel's trace
is stored stacked, leaves ``[N, …]``). Elements whose constraints (or selections)
touch different addresses are grouped, one vmapped call per group. ``update`` visits
only elements that are constrained or whose arguments changed: pass
``gm.VectorDiff(changed=(i, …))`` as an argument's argdiff to say which elements changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from genmlx.combinators._util import dress, selection_of, strip, take, vcall
from genmlx.core.address import to_path
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, VectorDiff, default_argdiffs, is_no_change
from genmlx.core.errors import MissingChoiceError, UnvisitedConstraintError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.pytree import tree_flatten, tree_unflatten
from genmlx.core.selection import Selection
from genmlx.core.trace import Trace


@dataclass(frozen=True, eq=False)
class MapTrace(Trace):
    """Trace of Map: ``sub`` is the kernel's trace with every leaf stacked over the N
    elements (``[N, …]``; ``[n, N, …]`` in a batched trace), arguments dropped."""

    gen_fn: Any
    args: tuple
    sub: Any
    score_: mx.array
    length: int
    batch_size: int | None = None

    @property
    def retval(self):
        return self.sub.retval

    @property
    def score(self):
        return self.score_

    @property
    def element_scores(self) -> mx.array:
        """log p of each element's choices, ``[N]`` (``[n, N]`` batched)."""
        return self.sub.score

    @property
    def choices(self) -> ChoiceMap:
        leaves = list(self.sub.choices.leaves())
        if not leaves:
            return ChoiceMap.empty()
        ax = self.score_.ndim  # element axis: after any particle axes (batched/nested traces)
        children = {}
        for i in range(self.length):
            cm = ChoiceMap.empty()
            for p, v in leaves:
                cm = cm.set_submap(p, ChoiceMap.leaf(mx.take(v, i, axis=ax)))
            children[i] = cm
        return ChoiceMap(children)

    def __getitem__(self, addr):
        path = to_path(addr)
        i = path[0]
        if not isinstance(i, int) or not 0 <= i < self.length:
            raise MissingChoiceError(f"Map has elements 0..{self.length - 1}", path)
        rest = path[1:]
        ch = self.sub.choices.submap_at_path(rest)
        if ch.is_leaf():
            return mx.take(ch.get_value(), i, axis=self.score_.ndim)
        return self.choices[addr]

    def _tree_flatten(self):
        return [self.args, self.sub, self.score_], (self.gen_fn, self.length, self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        gen_fn, length, batch_size = aux
        return cls(gen_fn, children[0], children[1], children[2], length, batch_size)


def _pattern(cm: ChoiceMap) -> tuple:
    return tuple(sorted(((p, type(v).__name__) for p, v in cm.leaves()), key=repr))


def _stack_cms(cms: list) -> ChoiceMap:
    """Stack choice maps of one pattern leafwise (values gain a leading axis)."""
    first = cms[0]
    if first.is_empty():
        return ChoiceMap.empty()
    from genmlx.distributions.base import UnconstrainedValue

    out = ChoiceMap.empty()
    for p, v in first.leaves():
        vals = [c.submap_at_path(p).get_value() for c in cms]
        if isinstance(v, UnconstrainedValue):
            leaf = UnconstrainedValue(mx.stack([x.u for x in vals]))
        else:
            leaf = mx.stack([mx.array(x) if not isinstance(x, mx.array) else x for x in vals])
        out = out.set_submap(p, ChoiceMap.leaf(leaf))
    return out


def _merge(parts: list, N: int, who: str):
    """Stacked structures for disjoint index sets → one structure ordered 0..N−1."""
    parts = [(idx, tree) for idx, tree in parts if idx]
    if len(parts) == 1 and parts[0][0] == list(range(N)):
        return parts[0][1]
    flats = [tree_flatten(tree) for _, tree in parts]
    td = flats[0][1]
    for _, t in flats[1:]:
        if t != td:
            raise ValueError(f"{who}: the kernel's traces differ in structure between elements "
                             "(different addresses or shapes); Map needs one static structure")
    order = [i for idx, _ in parts for i in idx]
    inv = [0] * N
    for pos, i in enumerate(order):
        inv[i] = pos
    inv = mx.array(inv, dtype=mx.int32)
    leaves = [mx.take(mx.concatenate(xs, axis=0), inv, axis=0) for xs in zip(*(f[0] for f in flats))]
    return tree_unflatten(td, leaves)


def _split_elem(cm: ChoiceMap, idx_pos: list) -> dict:
    """A stacked discard (leaves ``[len(idx), …]``) → {element i: its choice map}."""
    out = {}
    leaves = list(cm.leaves())
    for j, i in enumerate(idx_pos):
        sub = ChoiceMap.empty()
        for p, v in leaves:
            sub = sub.set_submap(p, ChoiceMap.leaf(v[j]))
        if not sub.is_empty():
            out[i] = sub
    return out


@dataclass(frozen=True)
class Map(GenerativeFunction):
    """``gf`` mapped over the leading axis of its arguments; see the module docstring."""

    kernel: GenerativeFunction

    def __post_init__(self):
        from genmlx.combinators.family import as_gf

        object.__setattr__(self, "kernel", as_gf(self.kernel, "Map"))

    @property
    def name(self) -> str:
        return f"Map({getattr(self.kernel, 'name', 'kernel')})"

    # -- helpers -----------------------------------------------------------------------
    def _length(self, args: tuple) -> int:
        lengths = {}
        for j, a in enumerate(args):
            for x in tree_flatten(a)[0]:
                if x.ndim == 0:
                    raise ValueError(f"Map: argument {j} is a 0-d array; every array argument "
                                     "needs a leading axis over the elements")
                lengths.setdefault(x.shape[0], []).append(j)
        if not lengths:
            raise ValueError("Map: at least one argument must be an array with a leading axis "
                             "over the elements")
        if len(lengths) > 1:
            desc = "; ".join(f"length {n} for argument(s) {sorted(set(js))}" for n, js in lengths.items())
            raise ValueError(f"Map: all array arguments need the same leading length ({desc})")
        N = next(iter(lengths))
        if N == 0:
            raise ValueError("Map: the arguments have no elements (leading length 0)")
        return N

    def _cons(self, cm: ChoiceMap, N: int) -> dict:
        if cm.is_empty():
            return {}
        if cm.is_leaf():
            raise UnvisitedConstraintError([()], self.name)
        ch = cm.children()
        bad = [k for k in ch if not (isinstance(k, int) and 0 <= k < N)]
        if bad:
            raise UnvisitedConstraintError([(k,) for k in bad], f"{self.name} with {N} elements")
        return ch

    def _groups(self, indices, keyfn) -> dict:
        groups: dict = {}
        for i in indices:
            groups.setdefault(keyfn(i), []).append(i)
        return groups

    def _take_args(self, args, idx):
        return take(args, mx.array(idx, dtype=mx.int32))

    # -- the seven operations ------------------------------------------------------------
    def simulate(self, key, args):
        """Every element drawn from the kernel's prior, one vmapped call."""
        return self._generate(key, tuple(args), ChoiceMap.empty())[0]

    def generate(self, key, args, constraints):
        """w = Σ_i w_i (each element's generate weight)."""
        from genmlx.core.dynamic import _as_choicemap

        return self._generate(key, tuple(args), _as_choicemap(constraints))

    def _generate(self, key, args, cm):
        N = self._length(args)
        cons = self._cons(cm, N)
        keys = mx.random.split(key, N)
        empty = ChoiceMap.empty()
        groups = self._groups(range(N), lambda i: _pattern(cons.get(i, empty)))
        parts, weight = [], mx.array(0.0)
        kernel = self.kernel
        for pat, idx in groups.items():
            ii = mx.array(idx, dtype=mx.int32)
            a = self._take_args(args, idx)
            if not pat:
                sub = vcall(lambda k, aa: strip(kernel.simulate(k, aa)), keys[ii], (a,), (0,))
            else:
                c = _stack_cms([cons[i] for i in idx])

                def fn(k, aa, cc):
                    tr, w = kernel.generate(k, aa, cc)
                    return strip(tr), w

                sub, w = vcall(fn, keys[ii], (a, c), (0, 0))
                weight = weight + mx.sum(w)
            parts.append((idx, sub))
        sub = _merge(parts, N, self.name)
        return MapTrace(self, args, sub, mx.sum(sub.score), N), weight

    def assess(self, args, choices):
        """log p = Σ_i assess_i; every element needs all its choices."""
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        N = self._length(args)
        cons = self._cons(_as_choicemap(choices), N)
        empty = ChoiceMap.empty()
        groups = self._groups(range(N), lambda i: _pattern(cons.get(i, empty)))
        kernel, parts, total = self.kernel, [], mx.array(0.0)
        for pat, idx in groups.items():
            c = _stack_cms([cons.get(i, empty) for i in idx])
            fn = lambda k, aa, cc: kernel.assess(aa, cc)  # noqa: E731
            keys = mx.zeros((len(idx), 2), dtype=mx.uint32)
            lp, r = vcall(fn, keys, (self._take_args(args, idx), c), (0, 0))
            total = total + mx.sum(lp)
            parts.append((idx, r))
        return total, _merge(parts, N, self.name)

    def _elem_diffs(self, argdiffs, i) -> tuple:
        out = []
        for d in argdiffs:
            if is_no_change(d):
                out.append(NoChange)
            elif isinstance(d, VectorDiff):
                out.append(UnknownChange if i in d.changed else NoChange)
            else:
                out.append(UnknownChange)
        return tuple(out)

    def _resolve(self, trace, args, argdiffs):
        if args is None:
            return trace.args, tuple(NoChange for _ in trace.args)
        args = tuple(args)
        if argdiffs is None:
            argdiffs = default_argdiffs(trace.args, args)
        return args, tuple(argdiffs)

    def _update(self, key, trace, constraints, args, argdiffs):
        """Visits elements that are constrained or whose arguments changed;
        w = Σ_visited w_i + Σ_new w_i − Σ_removed score_i."""
        from genmlx.core.dynamic import _as_choicemap

        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        N_old, N_new = trace.length, self._length(args)
        cons = self._cons(_as_choicemap(constraints), N_new)
        empty = ChoiceMap.empty()
        n_keep = min(N_old, N_new)
        visit = [i for i in range(n_keep)
                 if i in cons or any(not is_no_change(d) for d in self._elem_diffs(argdiffs, i))]
        weight = mx.zeros_like(trace.score_)
        discard = {}
        if N_new < N_old:
            rem = list(range(N_new, N_old))
            weight = weight - mx.sum(take(trace.sub.score, mx.array(rem, dtype=mx.int32)))
            old_ch = trace.choices
            for i in rem:
                d = old_ch.get_submap(i)
                if not d.is_empty():
                    discard[i] = d
        if not visit and N_new == N_old:
            return MapTrace(self, args, trace.sub, trace.score_, N_new), weight, NoChange, ChoiceMap(discard)
        keys = mx.random.split(key, N_new)
        kernel = self.kernel
        vset = set(visit)
        keep = [i for i in range(n_keep) if i not in vset]
        parts = [(keep, take(trace.sub, mx.array(keep, dtype=mx.int32)))] if keep else []
        changed = []
        ugroups = self._groups(visit, lambda i: (_pattern(cons.get(i, empty)), self._elem_diffs(argdiffs, i)))
        for (pat, ad), idx in ugroups.items():
            ii = mx.array(idx, dtype=mx.int32)
            c = _stack_cms([cons.get(i, empty) for i in idx])

            def fn(k, s, oa, na, cc, ad=ad):
                tr, w, rd, d = kernel.update(k, dress(s, oa), cc, na, ad)
                return strip(tr), w, rd, d

            items = (take(trace.sub, ii), self._take_args(old_args, idx), self._take_args(args, idx), c)
            sub, w, rd, d = vcall(fn, keys[ii], items, (0, 0, 0, 0))
            weight = weight + mx.sum(w)
            discard.update(_split_elem(d, idx))
            if not is_no_change(rd):
                changed += idx
            parts.append((idx, sub))
        new_idx = list(range(N_old, N_new))
        if new_idx:
            ggroups = self._groups(new_idx, lambda i: _pattern(cons.get(i, empty)))
            for pat, idx in ggroups.items():
                ii = mx.array(idx, dtype=mx.int32)
                c = _stack_cms([cons.get(i, empty) for i in idx])

                def gfn(k, aa, cc):
                    tr, w = kernel.generate(k, aa, cc)
                    return strip(tr), w

                sub, w = vcall(gfn, keys[ii], (self._take_args(args, idx), c), (0, 0))
                weight = weight + mx.sum(w)
                parts.append((idx, sub))
            changed += new_idx
        sub = _merge(parts, N_new, self.name)
        new = MapTrace(self, args, sub, mx.sum(sub.score, axis=-1), N_new)
        if not changed and N_new == N_old:
            retdiff = NoChange
        else:
            retdiff = VectorDiff(changed=tuple(sorted(changed)))
        return new, weight, retdiff, ChoiceMap(discard)

    def _selection_keys(self, trace, selection: Selection, n: int) -> dict:
        """Per element i < n: the kernel's leaf paths that ``selection`` selects below
        (i,) — a canonical, comparable form of the element's sub-selection."""
        paths = [p for p, _ in trace.sub.choices.leaves()]
        out = {}
        for i in range(n):
            s = selection.subselection((i,))
            out[i] = () if s.is_empty() else tuple(p for p in paths if s.contains_path(p))
        return out

    def _regenerate(self, key, trace, selection, args, argdiffs):
        """Selected choices (and new elements) drawn from the prior;
        w = Σ_visited w_i (unselected retained density change)."""
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        N_old, N_new = trace.length, self._length(args)
        n_keep = min(N_old, N_new)
        skeys = self._selection_keys(trace, selection, n_keep)
        visit = [i for i in range(n_keep)
                 if skeys[i] or any(not is_no_change(d) for d in self._elem_diffs(argdiffs, i))]
        weight = mx.zeros_like(trace.score_)
        if not visit and N_new == N_old:
            return MapTrace(self, args, trace.sub, trace.score_, N_new), weight, NoChange
        keys = mx.random.split(key, N_new)
        kernel = self.kernel
        vset = set(visit)
        keep = [i for i in range(n_keep) if i not in vset]
        parts = [(keep, take(trace.sub, mx.array(keep, dtype=mx.int32)))] if keep else []
        changed = []
        groups = self._groups(visit, lambda i: (skeys[i], self._elem_diffs(argdiffs, i)))
        for (sk, ad), idx in groups.items():
            ii = mx.array(idx, dtype=mx.int32)
            sel = selection_of(sk)

            def fn(k, s, oa, na, ad=ad, sel=sel):
                tr, w, rd = kernel.regenerate(k, dress(s, oa), sel, na, ad)
                return strip(tr), w, rd

            items = (take(trace.sub, ii), self._take_args(old_args, idx), self._take_args(args, idx))
            sub, w, rd = vcall(fn, keys[ii], items, (0, 0, 0))
            weight = weight + mx.sum(w)
            if not is_no_change(rd):
                changed += idx
            parts.append((idx, sub))
        new_idx = list(range(N_old, N_new))
        if new_idx:
            ii = mx.array(new_idx, dtype=mx.int32)
            sub = vcall(lambda k, aa: strip(kernel.simulate(k, aa)), keys[ii],
                        (self._take_args(args, new_idx),), (0,))
            parts.append((new_idx, sub))
            changed += new_idx
        sub = _merge(parts, N_new, self.name)
        new = MapTrace(self, args, sub, mx.sum(sub.score, axis=-1), N_new)
        retdiff = NoChange if not changed and N_new == N_old else VectorDiff(changed=tuple(sorted(changed)))
        return new, weight, retdiff

    def _project(self, trace, selection):
        """Σ_i project_i(τ_i, S_i), one vmapped call per distinct selection pattern."""
        w = mx.zeros_like(trace.score_)
        skeys = self._selection_keys(trace, selection, trace.length)
        groups = self._groups([i for i in range(trace.length) if skeys[i]], lambda i: skeys[i])
        kernel = self.kernel
        for sk, idx in groups.items():
            ii = mx.array(idx, dtype=mx.int32)
            sel = selection_of(sk)
            fn = lambda k, s, a, sel=sel: kernel.project(dress(s, a), sel)  # noqa: E731
            keys = mx.zeros((len(idx), 2), dtype=mx.uint32)
            wp = vcall(fn, keys, (take(trace.sub, ii), self._take_args(trace.args, idx)), (0, 0))
            w = w + mx.sum(wp)
        return w
