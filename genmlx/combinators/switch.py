"""Switch: one of several generative functions, chosen by an index argument.

``switch = gm.Switch(g0, g1, …)`` is called as ``switch(index, *args)`` and behaves as
``g_index(*args)``: its choices are the chosen branch's choices, at the branch's own
addresses, and ``log p(τ; i, args) = log p_{g_i}(τ; args)``.

Batched semantics (index a per-particle array under ``vmap``, e.g. drawn from a choice
in an enclosing model): every branch is executed and the trace keeps one sub-trace per
branch, so the trace structure is static; score, weights and return value are selected
per particle with ``mx.where``, so inactive branches contribute nothing to them. When
the index is a concrete number (a single trace outside vmap), ``tr.choices`` holds only
the active branch's choices; in a batched trace (or under tracing) ``tr.choices`` is the
union of the branches' addresses, the value at an address shared by several branches
being the active branch's — values at addresses only inactive branches use are
meaningless for that particle (``gm.unbatch(tr, i).choices`` gives particle i's exact
choices). Constraints at addresses the active branch does not use are an error for a
concrete index and are ignored by the particles whose branch lacks them otherwise.
A traced out-of-range index gives score −inf; a concrete one raises ``ValueError``.
Changing the branch keeps the old values at the addresses both branches have (unless
constrained, or selected in ``regenerate``) and draws the rest of the new branch from
its prior: ``update`` has w = w_generate(new branch; σ ∪ kept) − score(old branch) and
discards the old values not kept; ``regenerate`` has w = Σ_kept [log p_new − log p_old].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from genmlx.combinators._util import (
    concrete, concrete_array, dress, merge_select, select_value, selection_of, strip, where,
)
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import NoChange, UnknownChange, default_argdiffs, is_no_change
from genmlx.core.errors import UnvisitedConstraintError
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import project_subtrace
from genmlx.core.indexing import row
from genmlx.core.trace import Trace


@dataclass(frozen=True, eq=False)
class SwitchTrace(Trace):
    """Trace of Switch: ``index_`` (int32), one stripped sub-trace per branch."""

    gen_fn: Any
    args: tuple
    index_: mx.array
    subs: tuple
    score_: mx.array
    batch_size: int | None = None

    def _active(self):
        """The branch index when it is concrete and the same for every particle."""
        return uniform_value(self.index_)

    @property
    def index(self) -> mx.array:
        return self.index_

    @property
    def retval(self):
        i = self._active()
        if i is not None:
            return self.subs[i].retval
        return select_tree(self.index_, [s.retval for s in self.subs], self.gen_fn.name)

    @property
    def score(self):
        return self.score_

    @property
    def choices(self) -> ChoiceMap:
        i = self._active()
        if i is not None:
            return self.subs[i].choices
        return merge_select([(self.index_ == b, s.choices) for b, s in enumerate(self.subs)])

    def __getitem__(self, addr):
        return self.choices[addr]

    def _tree_flatten(self):
        return [self.args, self.index_, *self.subs, self.score_], (self.gen_fn, len(self.subs), self.batch_size)

    @classmethod
    def _tree_unflatten(cls, aux, children):
        gen_fn, nb, batch_size = aux
        return cls(gen_fn, children[0], children[1], tuple(children[2:2 + nb]), children[-1], batch_size)


def uniform_value(x):
    """The single value of ``x`` when it can be evaluated and all its entries agree."""
    arr = concrete_array(x)
    if arr is None or arr.size == 0:
        return None
    first = arr.reshape(-1)[0]
    return first.item() if (arr == first).all() else None


def select_tree(index, values: list, who: str):
    """Per-particle selection of return values of identical structure."""
    out = values[0]
    for b in range(1, len(values)):
        try:
            out = where(index == b, values[b], out)
        except ValueError:
            raise ValueError(f"{who}: with a traced or batched index the branches must return "
                             "values of the same structure and shape") from None
    return out


def choice_paths(gf, key, args) -> list:
    """The leaf addresses of ``gf``'s choices (a lazy, never evaluated probe run)."""
    return [p for p, _ in gf.simulate(key, args).choices.leaves()]


def restrict_to(cm: ChoiceMap, paths: list) -> ChoiceMap:
    """The constraint leaves lying on or above one of ``paths``."""
    out = ChoiceMap.empty()
    for p, v in cm.leaves():
        if any(q[:len(p)] == p or p[:len(q)] == q for q in paths):
            out = out.set_submap(p, ChoiceMap.leaf(v))
    return out


def index_of(x, n_branches: int, who: str) -> mx.array:
    """The branch index as an int32 array, range-checked when concrete."""
    idx = x if isinstance(x, mx.array) else mx.array(x)
    if idx.dtype == mx.bool_:
        idx = idx.astype(mx.int32)
    elif not mx.issubdtype(idx.dtype, mx.integer):
        raise TypeError(f"{who}: the branch index must be an integer, got dtype {idx.dtype}")
    idx = idx.astype(mx.int32)
    c = concrete(idx) if idx.ndim == 0 else None
    if c is not None and not 0 <= c < n_branches:
        raise ValueError(f"{who}: branch index {c} is out of range for {n_branches} branches "
                         f"(valid: 0..{n_branches - 1})")
    return idx


@dataclass(frozen=True, init=False)
class Switch(GenerativeFunction):
    """``Switch(*branches)`` called as ``switch(index, *args)``; see the module docstring."""

    branches: tuple

    def __init__(self, *branches):
        if len(branches) == 1 and isinstance(branches[0], (list, tuple)):
            branches = tuple(branches[0])
        if not branches:
            raise ValueError("Switch: give at least one branch")
        from genmlx.combinators.family import as_gf

        branches = tuple(as_gf(b, f"Switch branch {j}") for j, b in enumerate(branches))
        object.__setattr__(self, "branches", branches)

    @property
    def name(self) -> str:
        return "Switch(" + ", ".join(getattr(b, "name", "?") for b in self.branches) + ")"

    def _index(self, args):
        if not args:
            raise ValueError(f"{self.name} is called as switch(index, *args)")
        return index_of(args[0], len(self.branches), "Switch")

    def _branch_cons(self, key, cm: ChoiceMap, bargs, active) -> list:
        """Constraints for each branch; checks they are used by the active branch
        (concrete index) or by some branch (traced index)."""
        B = len(self.branches)
        if cm.is_empty():
            return [ChoiceMap.empty()] * B
        if B == 1:
            return [cm]
        paths = [choice_paths(b, key, bargs) for b in self.branches]
        out = [restrict_to(cm, ps) for ps in paths]
        if active is not None:
            used = {p for p, _ in out[active].leaves()}
        else:
            used = {p for c in out for p, _ in c.leaves()}
        left = [p for p, _ in cm.leaves() if p not in used]
        if left:
            where_ = f"branch {active}" if active is not None else "any branch"
            raise UnvisitedConstraintError(left, f"{self.name} ({where_})")
        return out

    # -- the seven operations ------------------------------------------------------------
    def simulate(self, key, args):
        """Every branch runs; score = score of the active branch."""
        return self._generate(key, tuple(args), ChoiceMap.empty())[0]

    def generate(self, key, args, constraints):
        """w = the active branch's generate weight."""
        from genmlx.core.dynamic import _as_choicemap

        return self._generate(key, tuple(args), _as_choicemap(constraints))

    def _generate(self, key, args, cm):
        idx = self._index(args)
        bargs = args[1:]
        keys = mx.random.split(key, len(self.branches))
        cons = self._branch_cons(row(keys, 0), cm, bargs, concrete(idx) if idx.ndim == 0 else None)
        subs, ws = [], []
        for b, g in enumerate(self.branches):
            if cons[b].is_empty():
                tr, w = g.simulate(row(keys, b), bargs), mx.array(0.0)
            else:
                tr, w = g.generate(row(keys, b), bargs, cons[b])
            subs.append(strip(tr))
            ws.append(w)
        score = select_value(idx, [s.score for s in subs])
        return SwitchTrace(self, args, idx, tuple(subs), score), select_value(idx, ws)

    def assess(self, args, choices):
        from genmlx.core.dynamic import _as_choicemap

        args = tuple(args)
        idx = self._index(args)
        c = concrete(idx) if idx.ndim == 0 else None
        if c is not None:
            return self.branches[c].assess(args[1:], _as_choicemap(choices))
        tr, _ = self._generate(mx.random.key(0), args, _as_choicemap(choices))
        return tr.score, tr.retval

    def _resolve(self, trace, args, argdiffs):
        if args is None:
            return trace.args, tuple(NoChange for _ in trace.args)
        args = tuple(args)
        if argdiffs is None:
            argdiffs = default_argdiffs(trace.args, args)
        return args, tuple(argdiffs)

    def _into(self, key, b, bargs, old_sub, old_bargs, cm, selection=None):
        """Switch a particle from its old branch (sub-trace ``old_sub``) into branch b.

        Old values at addresses branch b also has are kept (unless constrained, or
        selected in regenerate); the rest of branch b is drawn from its prior.
        update:     w = w_generate(b; σ ∪ kept) − score(old branch),
                    discard = the old choices not kept;
        regenerate: w = w_generate(b; kept) − Σ_kept log p_old(v)   (Σ over kept).
        """
        g = self.branches[b]
        paths_b = set(choice_paths(g, key, bargs))
        given = {p for p, _ in cm.leaves()}
        old_ch = old_sub.choices
        kept, dropped = ChoiceMap.empty(), ChoiceMap.empty()
        for p, v in old_ch.leaves():
            keep = p in paths_b and p not in given
            if selection is not None and selection.contains_path(p):
                keep = False
            if keep:
                kept = kept.set_submap(p, ChoiceMap.leaf(v))
            else:
                dropped = dropped.set_submap(p, ChoiceMap.leaf(v))
        merged = kept if cm.is_empty() else cm.merge(kept)
        tr, w = g.generate(key, bargs, merged)
        if selection is None:
            return strip(tr), w - old_sub.score, dropped
        kept_paths = [p for p, _ in kept.leaves()]
        if not kept_paths:
            return strip(tr), w, None
        w_old = project_subtrace(dress(old_sub, old_bargs), selection_of(kept_paths))
        return strip(tr), w - w_old, None

    def _update(self, key, trace, constraints, args, argdiffs):
        """Same branch: the branch's update. New branch: generated from its prior with
        the constraints and the old values at the addresses it shares with the old
        branch: w = w_generate − old score; discard = the old values not kept."""
        from genmlx.core.dynamic import _as_choicemap

        cm = _as_choicemap(constraints)
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        if cm.is_empty() and all(is_no_change(d) for d in argdiffs):
            return trace, mx.zeros_like(trace.score_), NoChange, ChoiceMap.empty()
        io, inew = trace.index_, self._index(args)
        ci_old = concrete(io) if io.ndim == 0 else None
        ci_new = concrete(inew) if inew.ndim == 0 else None
        bold, bnew, bdiffs = old_args[1:], args[1:], argdiffs[1:]
        B = len(self.branches)
        keys = mx.random.split(key, B + B * B)
        cons = self._branch_cons(row(keys, 0), cm, bnew, ci_new)
        if ci_old is not None and ci_new is not None:  # both concrete: only the needed work
            subs = list(trace.subs)
            if ci_old == ci_new:
                g = self.branches[ci_new]
                tr, w, rd, disc = g.update(row(keys, ci_new), dress(subs[ci_new], bold), cons[ci_new], bnew, bdiffs)
                subs[ci_new] = strip(tr)
            else:
                subs[ci_new], w, disc = self._into(row(keys, B + ci_old * B + ci_new), ci_new, bnew,
                                                   trace.subs[ci_old], bold, cons[ci_new])
                rd = UnknownChange
            new = SwitchTrace(self, args, inew, tuple(subs), subs[ci_new].score)
            return new, w, rd, disc
        subs, ws, cands = [], [], []
        for b, g in enumerate(self.branches):
            tu, wu, _, du = g.update(row(keys, b), dress(trace.subs[b], bold), cons[b], bnew, bdiffs)
            sub, w = strip(tu), wu
            cands.append(((inew == b) & (io == b), du))
            for a in range(B):
                if a == b:
                    continue
                tg, wg, dg = self._into(row(keys, B + a * B + b), b, bnew, trace.subs[a], bold, cons[b])
                sub = where(io == a, tg, sub)
                w = mx.where(io == a, wg, w)
                cands.append(((inew == b) & (io == a), dg))
            subs.append(sub)
            ws.append(w)
        score = select_value(inew, [s.score for s in subs])
        new = SwitchTrace(self, args, inew, tuple(subs), score)
        return new, select_value(inew, ws), UnknownChange, merge_select(cands)

    def _regenerate(self, key, trace, selection, args, argdiffs):
        """Same branch: the branch's regenerate. New branch: its prior, keeping the
        unselected old values at shared addresses; w = Σ_kept [log p_new − log p_old]."""
        old_args = trace.args
        args, argdiffs = self._resolve(trace, args, argdiffs)
        if selection.is_empty() and all(is_no_change(d) for d in argdiffs):
            return trace, mx.zeros_like(trace.score_), NoChange
        io, inew = trace.index_, self._index(args)
        ci_old = concrete(io) if io.ndim == 0 else None
        ci_new = concrete(inew) if inew.ndim == 0 else None
        bold, bnew, bdiffs = old_args[1:], args[1:], argdiffs[1:]
        B = len(self.branches)
        keys = mx.random.split(key, B + B * B)
        empty = ChoiceMap.empty()
        if ci_old is not None and ci_new is not None:
            subs = list(trace.subs)
            if ci_old == ci_new:
                g = self.branches[ci_new]
                tr, w, rd = g.regenerate(row(keys, ci_new), dress(subs[ci_new], bold), selection, bnew, bdiffs)
                subs[ci_new] = strip(tr)
            else:
                subs[ci_new], w, _ = self._into(row(keys, B + ci_old * B + ci_new), ci_new, bnew,
                                                trace.subs[ci_old], bold, empty, selection)
                rd = UnknownChange
            return SwitchTrace(self, args, inew, tuple(subs), subs[ci_new].score), w, rd
        subs, ws = [], []
        for b, g in enumerate(self.branches):
            tr_, wr, _ = g.regenerate(row(keys, b), dress(trace.subs[b], bold), selection, bnew, bdiffs)
            sub, w = strip(tr_), wr
            for a in range(B):
                if a == b:
                    continue
                tg, wg, _ = self._into(row(keys, B + a * B + b), b, bnew, trace.subs[a], bold, empty, selection)
                sub = where(io == a, tg, sub)
                w = mx.where(io == a, wg, w)
            subs.append(sub)
            ws.append(w)
        score = select_value(inew, [s.score for s in subs])
        return SwitchTrace(self, args, inew, tuple(subs), score), select_value(inew, ws), UnknownChange

    def _project(self, trace, selection):
        bargs = trace.args[1:]
        c = concrete(trace.index_) if trace.index_.ndim == 0 else None
        if c is not None:
            return project_subtrace(dress(trace.subs[c], bargs), selection)
        vals = [project_subtrace(dress(s, bargs), selection) for s in trace.subs]
        return select_value(trace.index_, vals, default=0.0)
