"""Vectorized GFI operations: n particles as ONE batched computation.

Each operation runs the single-trace operation under ``mx.vmap``: the model body is
executed once (with batched arrays) for all n particles, so per-particle results are
exactly those of the unbatched operation with the same key and values. A batched trace
is an ordinary trace whose array leaves carry a leading axis n, with ``batch_size = n``
and the (shared) arguments stored once.

Constraint leaves are shared by all particles, or per particle when they carry a
leading axis n in addition to the choice's own shape.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import mlx.core as mx

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.errors import ConstraintShapeError
from genmlx.core.handlers import BatchNoise, batch_noise_scope, planned_noise
from genmlx.core.pytree import tree_flatten, tree_unflatten, unique_by_identity
from genmlx.core.selection import Selection
from genmlx.core.trace import Trace, same_structure
from genmlx.core.validation import tracing, under_transformation, vmap_level


def _split(key: mx.array, n: int) -> mx.array:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of particles n must be a positive int, got {n!r}")
    return mx.random.split(key, n)


def _strip(tr: Trace) -> Trace:
    return replace(tr, args=None, batch_size=None)


def _dress(tr: Trace, args: tuple, n: int) -> Trace:
    return replace(tr, args=tuple(args), batch_size=n)


def _flat_trace(tr: Trace):
    return tree_flatten(_strip(tr))


def _vmapped(body, in_axes=0):
    """``mx.vmap(body)`` for a body returning a list of arrays, robust to the same
    array object appearing several times among the outputs (MLX 0.32 gives the
    repeated outputs a wrong batch axis, so each distinct array is returned once)."""
    box = {}

    def unique_body(*xs):
        uniq, box["index"] = unique_by_identity(body(*xs))
        return uniq

    def call(*xs):
        with tracing(), vmap_level():
            uniq = mx.vmap(unique_body, in_axes=in_axes)(*xs)
        return [uniq[j] for j in box["index"]]

    return call


def _keys_and_noise(key: mx.array, n: int):
    """Per-particle keys, and the unbatched key of the batched base noise."""
    k_particles, k_noise = mx.random.split(key)
    return _split(k_particles, n), k_noise, mx.arange(n)


_PLANS: "OrderedDict" = OrderedDict()  # (gf, argument signature, constraint signature) -> noise sites


def _plan_key(gf, args, constraints: ChoiceMap | None):
    """A hashable signature of a vectorized call's static structure, or None."""
    leaves, td = tree_flatten(args)
    sig = [td, tuple((x.shape, x.dtype) for x in leaves)]
    if constraints is not None:
        sig.append(tuple((p, getattr(v, "shape", None)) for p, v in constraints.leaves()))
    key = (gf, tuple(sig))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _planned_noise(plan_key, k_noise, n):
    """Noise inputs (outside the vmap) for the sites an earlier call recorded under
    ``plan_key`` (see :func:`genmlx.core.handlers.planned_noise`)."""
    return planned_noise(k_noise, _PLANS.get(plan_key) if plan_key is not None else None, n)


def _record_plan(plan_key, plan) -> None:
    if plan_key is None:
        return
    _PLANS[plan_key] = dict(plan)
    _PLANS.move_to_end(plan_key)
    if len(_PLANS) > 512:
        _PLANS.popitem(last=False)


def _noise_for_body(k_noise, i, n, sites, rows):
    return BatchNoise(k_noise, i, n, {s: (spec, r) for (s, spec), r in zip(sites, rows)})


def _planned_vmap_generate(pkey, keys, k_noise, idx, n: int, generate, flatten, rest_axes, rest):
    """One vmapped execution of ``generate(k, rest_i) -> (trace, weight)`` over the n
    particles with batched base noise (planned rows passed in where the plan is known),
    recording the noise plan: ``([w, *trace leaves], box)`` with ``box["td"]`` the traces'
    structure (``flatten``) and ``box["plan"]`` the sites drawn."""
    sites, noise = _planned_noise(pkey, k_noise, n)
    m = len(sites)
    box = {}

    def body(k, i, *r):
        bn = _noise_for_body(k_noise, i, n, sites, r[:m])
        with batch_noise_scope(bn):
            tr, w = generate(k, r[m:])
        box["plan"] = bn.plan
        leaves, box["td"] = flatten(tr)
        return [w] + leaves

    out = _vmapped(body, in_axes=(0, 0, *([0] * m), *rest_axes))(keys, idx, *noise, *rest)
    _record_plan(pkey, box["plan"])
    return out, box


def _with_plan(run, pkey, key):
    """``run()`` (one batched execution of the body, recording its noise plan). When no
    plan was known and we are being traced (``mx.compile``/``mx.vmap``), run once more
    with the plan just recorded: the traced graph then takes the planned noise inputs
    instead of per-particle gathers (the discarded first pass is never evaluated).
    Eager calls never run the body twice."""
    had_plan = pkey is None or pkey in _PLANS
    out = run()
    if not had_plan and _PLANS.get(pkey) and under_transformation(key):
        out = run()
    return out


def vsimulate(gf, key: mx.array, args: tuple, n: int) -> Trace:
    """n independent ``simulate`` calls, batched."""
    keys, k_noise, idx = _keys_and_noise(key, n)
    pkey = _plan_key(gf, args, None)

    def run():
        sites, noise = _planned_noise(pkey, k_noise, n)
        box = {}

        def body(k, i, *rows):
            bn = _noise_for_body(k_noise, i, n, sites, rows)
            with batch_noise_scope(bn):
                tr = gf.simulate(k, args)
            box["plan"] = bn.plan
            leaves, box["td"] = _flat_trace(tr)
            return leaves

        leaves = _vmapped(body)(keys, idx, *noise)
        _record_plan(pkey, box["plan"])
        return leaves, box

    leaves, box = _with_plan(run, pkey, key)
    return _dress(tree_unflatten(box["td"], leaves), args, n)


def _constraint_axes(gf, key, args, constraints: ChoiceMap, n: int, reference=None) -> list:
    """in_axes (0 = per particle, None = shared) for each constraint leaf.

    A leaf is per-particle when its shape is ``(n,) + s`` where ``s`` is the shape of
    the choice at its address. The choice shapes come from ``reference`` (a batched
    trace's choices) or, only when some leaf could be per-particle, from a lazy
    unevaluated probe execution of the model.
    """
    leaves = list(constraints.leaves())
    maybe = [getattr(v, "ndim", 0) >= 1 and v.shape[0] == n for _, v in leaves]
    if not any(maybe):
        return [None] * len(leaves)
    if reference is None:
        reference = gf.simulate(key, args).choices  # lazy: never evaluated
        shift = 0
    else:
        shift = 1
    axes = []
    for (path, v), m in zip(leaves, maybe):
        if not m:
            axes.append(None)
            continue
        if reference.has_value(path):
            ref = reference[path]
            s = tuple(ref.shape[shift:])
            if tuple(v.shape) == s:
                axes.append(None)
            elif tuple(v.shape) == (n,) + s:
                axes.append(0)
            else:
                raise ConstraintShapeError(
                    f"a constraint of shape {tuple(v.shape)} fits neither the choice's shape "
                    f"{s} (shared by all particles) nor {(n,) + s} (one value per particle)",
                    path,
                )
        else:
            axes.append(0)
    return axes


def _cm_from_leaves(constraints: ChoiceMap, values) -> ChoiceMap:
    out = ChoiceMap.empty()
    for (path, _), v in zip(constraints.leaves(), values):
        out = out.set_submap(path, ChoiceMap.leaf(v))
    return out


def vgenerate(gf, key: mx.array, args: tuple, constraints: ChoiceMap, n: int):
    """n independent ``generate`` calls, batched: (batched trace, weights [n])."""
    from genmlx.core.dynamic import _as_choicemap

    constraints = _as_choicemap(constraints)
    keys, k_noise, idx = _keys_and_noise(key, n)
    axes = _constraint_axes(gf, key, args, constraints, n)
    cvals = [v for _, v in constraints.leaves()]
    pkey = _plan_key(gf, args, constraints)

    def run():
        return _planned_vmap_generate(pkey, keys, k_noise, idx, n,
                                      lambda k, r: gf.generate(k, args, _cm_from_leaves(constraints, r)),
                                      _flat_trace, axes, cvals)

    out, box = _with_plan(run, pkey, key)
    return _dress(tree_unflatten(box["td"], out[1:]), args, n), out[0]


def batched_update(gf, key, trace: Trace, constraints, args, argdiffs):
    """``update`` applied to each particle of a batched trace, batched."""
    from genmlx.core.dynamic import _as_choicemap

    n = trace.batch_size
    constraints = _as_choicemap(constraints)
    keys = _split(key, n)
    old_args = trace.args
    tleaves, ttd = _flat_trace(trace)
    axes = _constraint_axes(gf, key, old_args, constraints, n, reference=trace.choices)
    cvals = [v for _, v in constraints.leaves()]
    nt = len(tleaves)
    box = {}

    def body(k, *flat):
        tr = replace(tree_unflatten(ttd, list(flat[:nt])), args=old_args)
        cm = _cm_from_leaves(constraints, flat[nt:])
        new, w, retdiff, discard = gf._update(k, tr, cm, args, argdiffs)
        leaves, box["td"] = _flat_trace(new)
        dleaves, box["dtd"] = tree_flatten(discard)
        box["retdiff"] = retdiff
        box["nl"] = len(leaves)
        return [w] + leaves + dleaves

    out = _vmapped(body, in_axes=(0, *([0] * nt), *axes))(keys, *tleaves, *cvals)
    nl = box["nl"]
    new = tree_unflatten(box["td"], out[1:1 + nl])
    discard = tree_unflatten(box["dtd"], out[1 + nl:])
    new_args = old_args if args is None else args
    return _dress(new, new_args, n), out[0], box["retdiff"], discard


def batched_regenerate(gf, key, trace: Trace, selection: Selection, args, argdiffs):
    """``regenerate`` applied to each particle of a batched trace, batched."""
    n = trace.batch_size
    keys = _split(key, n)
    old_args = trace.args
    tleaves, ttd = _flat_trace(trace)
    box = {}

    def body(k, *flat):
        tr = replace(tree_unflatten(ttd, list(flat)), args=old_args)
        new, w, retdiff = gf._regenerate(k, tr, selection, args, argdiffs)
        leaves, box["td"] = _flat_trace(new)
        box["retdiff"] = retdiff
        return [w] + leaves

    out = _vmapped(body, in_axes=(0, *([0] * len(tleaves))))(keys, *tleaves)
    new = tree_unflatten(box["td"], out[1:])
    new_args = old_args if args is None else args
    return _dress(new, new_args, n), out[0], box["retdiff"]


def batched_project(gf, trace: Trace, selection: Selection) -> mx.array:
    """``project`` of each particle of a batched trace: weights ``[n]``."""
    old_args = trace.args
    tleaves, ttd = _flat_trace(trace)

    def body(*flat):
        tr = replace(tree_unflatten(ttd, list(flat)), args=old_args)
        return [gf._project(tr, selection)]

    return _vmapped(body)(*tleaves)[0]


def unbatch(trace: Trace, i: int) -> Trace:
    """Particle ``i`` of a batched trace, as an ordinary trace."""
    if trace.batch_size is None:
        raise ValueError("unbatch: this trace is not batched")
    leaves, td = _flat_trace(trace)
    return replace(tree_unflatten(td, [x[i] for x in leaves]), args=trace.args, batch_size=None)


def stack_traces(traces: list[Trace]) -> Trace:
    """Stack single traces of identical structure into one batched trace."""
    flats = same_structure(traces, _flat_trace)
    td = flats[0][1]
    leaves = [mx.stack(xs) for xs in zip(*(f[0] for f in flats))]
    return _dress(tree_unflatten(td, leaves), traces[0].args, len(traces))
