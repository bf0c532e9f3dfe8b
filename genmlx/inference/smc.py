"""Sequential Monte Carlo (particle filtering) over sequential models, and conditional
SMC / particle Gibbs.

The target sequence is the model's posterior with arguments ``args_t`` given the
observations of steps 0..t. Step 0 runs ``generate``; step t ≥ 1 extends every particle
with ``update(key, τ, obs_t, args_t, argdiffs_t)``. By default the model follows the
``Unfold`` convention: its first argument is the number of steps T, so
``args_t = (t + 1, *args[1:])`` with argdiffs ``(IntDiff(1), NoChange, …)``; a
``gm.Scan`` model called as ``scan(init_carry, xs)`` runs on the prefixes ``xs[:t + 1]``
(argdiffs ``(NoChange, IntDiff(1))``); pass ``step_args(t) -> (args_t, argdiffs_t)`` for
other models.

Incremental log-weights (with the prior as proposal, the model's internal proposal):

    α_t = log p(obs_t | x_{0:t}, obs_{<t})                     (update weight),

with a custom proposal q(x_t; t, τ_{t−1}, obs_t, …) (a GF called as
``proposal(t, prev_trace_or_None, obs_t, *proposal_args)`` whose choices are the new
latent addresses of step t):

    α_t = log p(x_t, obs_t | x_{0:t−1}) − log q(x_t)           (update weight − q score).

When ESS < ``ess_threshold`` · n the particles are resampled (multinomial, systematic,
stratified or residual) and every log-weight is set to the log mean weight, so that
log Ẑ = log (1/n Σ exp(lw_i)) at the end is the log of an unbiased estimate of p(obs).
An optional MCMC kernel ``rejuvenation(key, traces)`` (MH, HMC, …) is applied after
each step's resampling decision.

For ``gm.Unfold``/``gm.Scan`` models with the prior as proposal (and no rejuvenation,
callback or ``step_args``) each time step is ONE compiled function of the particles'
carry — extension and weight, ESS, the resampling decision (``mx.where``, no host
round trip) and the ancestors' carry — traced once for all t; each step keeps only its
new choices, its carry and the ancestor indices, and the full traces (ancestral paths,
scores) are rebuilt once at the end: the work and the kernel launches per step are
those of a hand-written filter that keeps its paths. The returned sequence trace holds
its steps as columns over the steps (``StackedSteps``; a step's sub-trace is built when
read), so the end of the run builds no per-step objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
from tqdm.auto import tqdm

from genmlx.combinators._sequence import SequenceGF, StackedSteps
from genmlx.combinators._sequence import SequenceTrace as SequenceTraceT
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import IntDiff, NoChange
from genmlx.core.dynamic import _as_choicemap
from genmlx.core import indexing
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.pytree import tree_flatten, tree_map, tree_unflatten
from genmlx.core.selection import select
from genmlx.core.trace import Trace
from genmlx.core.vectorize import stack_traces, unbatch
from genmlx.inference import resampling as R
from genmlx.inference._util import (
    cached_call,
    choice_paths,
    compiled_flat,
    covered,
    flatten_particles,
    gather_rows,
    gather_rows_each,
    grouped_rows,
    rebuild_particles,
    set_particle,
    take_particles,
    vmap_particles,
    vpropose,
)
from genmlx.inference.kernels import as_kernel_output
from genmlx.kernels import paths as paths_kernel
from genmlx.kernels.gather import take_rows, take_rows_batched
from genmlx.inference.particles import WeightedParticles


@dataclass(frozen=True)
class SMCResult(WeightedParticles):
    """Weighted particles after the last step, plus per-step diagnostics:
    ``ess_history`` (ESS before each resampling decision) and ``resampled`` (flags)."""

    ess_history: tuple = ()
    resampled: tuple = ()


# -- problem set-up ------------------------------------------------------------------
def _scan_steps(model, args):
    """For ``gm.Scan`` models called as ``scan(init_carry, xs)``: (T, args_t/argdiffs_t)."""
    from genmlx.combinators import Scan

    if not isinstance(model, Scan) or len(args) != 2:
        return None
    leaves = tree_flatten(args[1])[0]
    if not leaves:
        return None
    T = int(leaves[0].shape[0])

    def args_at(t):
        return (args[0], tree_map(lambda x: x[: t + 1], args[1])), (NoChange, IntDiff(1))

    return T, args_at


def _steps(args: tuple, observations, step_args, model=None):
    """(T, obs_t getter, args_t/argdiffs_t getter)."""
    scan = _scan_steps(model, args) if step_args is None else None
    if isinstance(observations, ChoiceMap):
        if scan is not None:
            T = scan[0]
        elif not args or not isinstance(args[0], int):
            raise ValueError(
                "smc: with observations as one choice map, the model's first argument must be "
                "the number of steps T (an int); or pass a list of per-step choice maps"
            )
        else:
            T = args[0]

        def obs_at(t):
            sub = observations.get_submap(t)
            return ChoiceMap.empty() if sub.is_empty() else ChoiceMap.empty().set_submap((t,), sub)
    else:
        obs_list = [_as_choicemap(o) for o in observations]
        T = len(obs_list)

        def obs_at(t):
            return obs_list[t]

    if T < 1:
        raise ValueError("smc: there must be at least one step")
    if scan is not None:
        if scan[0] < T:
            raise ValueError(f"smc: {T} steps of observations but the Scan inputs xs have length {scan[0]}")
        args_at = scan[1]
    elif step_args is None:
        if not args or not isinstance(args[0], int):
            raise ValueError(
                "smc: by default the model's first argument is the number of steps T (an int, "
                "as for gm.Unfold); otherwise pass step_args=lambda t: (args_t, argdiffs_t)"
            )
        rest = tuple(args[1:])

        def args_at(t):
            return (t + 1, *rest), (IntDiff(1), *(NoChange for _ in rest))
    else:
        def args_at(t):
            a, d = step_args(t)
            return tuple(a), (None if d is None else tuple(d))

    return T, obs_at, args_at


# -- compiled pieces -----------------------------------------------------------------
def _init(payload, key, args, obs, pargs):
    model, proposal, n = payload
    k_prop, k_model = mx.random.split(key)
    if proposal is None:
        return model.vgenerate(k_model, args, obs, n)
    choices, q = vpropose(proposal, k_prop, (0, None, obs, *pargs), n)
    tr, w = model.vgenerate(k_model, args, obs.merge(choices), n)
    return tr, w - q


def _extend(payload, key, traces, lw, args, obs, pargs, prev=None):
    """Extend every particle by step t; a proposal sees ``prev`` (default ``traces``:
    the same particles, possibly as a lazily resolved view)."""
    model, proposal, argdiffs, t = payload
    if proposal is None:
        new, w, _, _ = model.update(key, traces, obs, args, argdiffs)
        return new, lw + w

    def one(k, tr):
        choices, q, _ = proposal.propose(k, (t, tr, obs, *pargs))
        return choices, q

    k_prop, k_model = mx.random.split(key)
    choices, q = vmap_particles(one, k_prop, traces if prev is None else prev)  # [n, …]
    new, w, _, _ = model.update(k_model, traces, obs.merge(choices), args, argdiffs)
    return new, lw + w - q


def _resample(payload, key, lw):
    scheme, threshold = payload
    n = lw.shape[0]
    # the SMC drivers never run under mx.vmap: the fused GPU kernels may serve them
    lse, ess = R.weight_summary(lw, fused=True)  # one summary for the test and the new lw
    do = ess < threshold * n
    idx = mx.where(do, R.resample_indices(key, lw, n, scheme, fused=True), indexing.iota(n))
    new_lw = mx.where(do, mx.broadcast_to(lse - math.log(n), lw.shape), lw)
    return idx, new_lw, ess, do


def _eval_particles(traces, lw, full: bool = True):
    """Evaluate the particles (bounding the lazy graph). ``full=False`` on a sequence
    trace evaluates only what the last step changed: the last step and the score."""
    from genmlx.combinators._sequence import SequenceTrace

    if not full and isinstance(traces, SequenceTrace) and traces.steps:
        mx.eval(lw, traces.score_, tree_flatten(traces.steps[-1])[0])
    else:
        mx.eval(lw, tree_flatten(replace(traces, args=None))[0])


# -- the fused step for Unfold/Scan models -------------------------------------------
def _seq_extend(payload, key, carry, lw, inputs, obs):
    """Step t of every particle: (record of the step, outgoing carry, lw + w_t); the
    record (:meth:`SequenceGF.step_record`) is the step's new choices and carry only."""
    model, n, carry_batched, caxes = payload[:4]
    sub, w = model.vextend(key, inputs, carry, carry_batched, obs, caxes, n)
    return model.step_record(sub, obs), model._carry_out(sub.retval), lw + w


def _seq_resample(payload, key, lw, carry):
    """ESS and ancestors (identity when not resampling, chosen by ``mx.where``: no host
    round trip) and the carry of the ancestors: (carry, lw, idx, ess). The decision is
    not returned: the host repeats it on the ESS values (:func:`_decisions`)."""
    idx, lw, ess, _ = _resample(payload, key, lw)
    leaves, td = tree_flatten(carry)
    return tree_unflatten(td, grouped_rows(leaves, lambda x: take_rows(x, idx))), lw, idx, ess


def _seq_step(payload, key, k_res, carry, lw, inputs, obs):
    """One whole SMC time step (extend + weight + ESS + resample + carry gather), traced
    once and compiled for every t: (record, next carry, lw, idx, ess); the decision
    ess < threshold · n is not an output (it fuses into the selects that use it; the host
    repeats the float32 comparison on the ESS values at the end, :func:`_decisions`). Only the
    new choices, the carry and the weights are materialised, as in a hand-written
    filter; the step's scores are recomputed once at the end (:meth:`SequenceGF.vreplay`)."""
    rec, out, lw = _seq_extend(payload, key, carry, lw, inputs, obs)
    nxt, lw, idx, ess = _seq_resample(payload[4:], k_res, lw, out)
    return rec, nxt, lw, idx, ess


def _decisions(esss: list, threshold: float, n: int) -> list:
    """The steps' resampling decisions from their (evaluated) ESS values, as
    :func:`_resample` takes them on the device: ess < threshold · n in float32 (the
    Python scalar is rounded to float32 there too)."""
    bound = mx.array(threshold * n, dtype=mx.float32).item()
    return [e.item() < bound for e in esss]


def _seq_step_sharded(payload, key, k_res, carry, lw, inputs, obs):
    """:func:`_seq_step` for particles sharded over processes (``payload[6:8]`` = rank,
    size): the local extension with this process's key and the local weight summary
    (logsumexp(lw), logsumexp(2 lw)); the global resampling follows outside
    (``comm.step_resample``): (record, outgoing carry, lw, summary)."""
    from genmlx.distributed import fold_rank

    rank, size = payload[6:8]
    rec, out, lw = _seq_extend(payload, fold_rank(key, rank, size), carry, lw, inputs, obs)
    return rec, out, lw, R.weight_stats(lw, fused=True)


_INDEX_DEPENDENT: dict = {}  # Unfold models whose kernel reads t (run with the real t)


def _step_constraints(observations, obs_at, T: int):
    """Per-step constraints relative to the step (``obs_t`` at ``(t, …)`` → at ``(…)``),
    or None when some step's observations lie outside its own step. ``obs_at(t)``
    gives step t's observations at full addresses; one choice map in the ``Unfold``
    layout gives them directly (its submap t)."""
    if isinstance(observations, ChoiceMap):
        return [observations.get_submap(t) for t in range(T)]
    out = []
    for t in range(T):
        cm = obs_at(t)
        if cm.is_empty():
            out.append(cm)
            continue
        if cm.is_leaf() or set(cm.children()) != {t}:
            return None
        out.append(cm.get_submap(t))
    return out


def _constraint_axes_at(model, key, kernel_inputs, args, t, carry, carry_batched, cm, n):
    """vmap axes of the step's constraint leaves (None: shared by all particles)."""
    from genmlx.combinators._util import constraint_axes
    from genmlx.core.pytree import tree_map

    if not any(getattr(v, "ndim", 0) >= 1 and v.shape[0] == n for _, v in cm.leaves()):
        return tuple(None for _ in cm.leaves())
    probe = tree_map(lambda x: x[0], carry) if carry_batched else carry
    inputs = kernel_inputs(args, t, t)
    return tuple(constraint_axes(model.kernel, key, model._kernel_args(inputs, probe), cm, n))


def _run_sequence(keys, model, args, args_T, cons: list, n: int, scheme, threshold: float,
                  compile: bool, progress: bool, comm=None) -> "SMCRun":
    """SMC over a ``gm.Unfold``/``gm.Scan`` model with the prior as proposal: per step
    ONE compiled function (:func:`_seq_step`) on the carry alone, keeping the step's new
    choices and carry (pre-resampling row order) and its ancestor indices; the paths and
    the full step sub-traces are rebuilt once at the end (:func:`_rebuild_columns`, or
    :func:`_rebuild` for steps of differing structure), O(n·T) in all. The kernel is
    traced with :data:`STEP_INDEX` for t; if it reads t it runs step by step with the
    real t (uncompiled extension, compiled resampling).

    With ``comm`` (particles sharded over processes, ``n`` = this process's share) the
    compiled step is the local extension (:func:`_seq_step_sharded`) and
    ``comm.step_resample`` makes the global decision and moves only the carry rows; the
    ancestors are global rows, composed once at the end (``comm.descent``), and the
    kept arrays cross processes once (``comm.take_rows_each``). The decisions (and the
    sync-free steps' overflow flags) are read once, after the last step; after an
    overflow the run is redone with ``comm.fallback()`` (the exact path) from the same
    keys."""
    from genmlx.combinators._sequence import STEP_INDEX, StepIndexUsed, holds_step_index

    T = len(cons)
    carry_l, carry_td = tree_flatten(model._init_carry(args))
    lw = mx.zeros((n,), dtype=mx.float32)
    recs, idxs, esss, dos, axes, ovfs = [], [], [], [], [], []
    shared = compile and not _INDEX_DEPENDENT.get(_model_key(model), False)
    thr = float(threshold)
    flat_cons = [tree_flatten(c) for c in cons]
    # per-particle observation leaves are possible only with a leading axis n
    maybe = [any(x.ndim >= 1 and x.shape[0] == n for x in ls) for ls, _ in flat_cons]
    fixed_in = None if model._inputs_vary else tree_flatten(model._kernel_inputs(args, 0, STEP_INDEX))
    kparts = mx.split(keys.reshape(-1), 3 * T)  # every step's keys as views, in one call
    key_td = tree_flatten(kparts[0])[1]
    step_fns: dict = {}  # structure -> (compiled flat step, output layout)
    suspect = False  # the shared step failed: is it the kernel reading t?
    for t in tqdm(range(T), disable=not progress, desc="smc"):
        k_ext, k_res = kparts[3 * t], kparts[3 * t + 1]
        batched = t > 0
        if maybe[t] or not shared:
            carry = tree_unflatten(carry_td, carry_l)
            caxes = _constraint_axes_at(model, k_ext, model._kernel_inputs, args, t, carry, batched,
                                        cons[t], n)
        else:
            caxes = (None,) * len(flat_cons[t][0])
        payload = (model, n, batched, caxes, scheme, thr)
        if comm is not None:
            payload = payload + (comm.rank, comm.size)
        out = None
        if shared:
            in_l, in_td = fixed_in or tree_flatten(model._kernel_inputs(args, t, STEP_INDEX))
            ob_l, ob_td = flat_cons[t]
            sig = (payload, carry_td, in_td, ob_td)
            try:
                entry = step_fns.get(sig)
                leaves = [k_ext, k_res, *carry_l, lw, *in_l, *ob_l]
                if entry is None:
                    tds = (key_td, key_td, carry_td, key_td, in_td, ob_td)
                    counts = (1, 1, len(carry_l), 1, len(in_l), len(ob_l))
                    cfn, box = compiled_flat(_seq_step if comm is None else _seq_step_sharded,
                                             payload, payload, tds, counts)
                    flat = cfn(*leaves)
                    if holds_step_index(box["td"]):
                        raise StepIndexUsed("the step number is stored in the step's output")
                    rec, nxt = tree_unflatten(box["td"], flat)[:2]
                    r, c = len(tree_flatten(rec)[0]), len(tree_flatten(nxt)[0])
                    entry = step_fns[sig] = (cfn, tree_flatten(rec)[1], tree_flatten(nxt)[1], r, c)
                else:
                    flat = entry[0](*leaves)
                _, rec_td, nxt_td, r, c = entry
                out = ((rec_td, flat[:r]), nxt_td, flat[r:r + c], *flat[r + c:])
            except Exception:  # noqa: BLE001 - reading t (or any error): redo with the real t
                out = None
                shared = False
                suspect = True
                carry = tree_unflatten(carry_td, carry_l)
                caxes = _constraint_axes_at(model, k_ext, model._kernel_inputs, args, t, carry,
                                            batched, cons[t], n)
                payload = (model, n, batched, caxes, scheme, thr)
                if comm is not None:
                    payload = payload + (comm.rank, comm.size)
        if out is None:
            k_loc = k_ext if comm is None else comm.local_key(k_ext)
            rec, c_out, lw_w = _seq_extend(payload, k_loc, carry, lw, model._kernel_inputs(args, t, t),
                                           cons[t])
            if suspect:  # the step works with the real t: the kernel reads t
                _INDEX_DEPENDENT[_model_key(model)] = True
                suspect = False
            rl, rtd = tree_flatten(rec)
            if comm is None:
                nxt, lw2, idx, ess = cached_call(_seq_resample, payload[4:6], payload[4:6], k_res,
                                                 lw_w, c_out, compile=compile)
                nl, ntd = tree_flatten(nxt)
                out = ((rtd, rl), ntd, nl, lw2, idx, ess)
            else:
                nl, ntd = tree_flatten(c_out)
                out = ((rtd, rl), ntd, nl, lw_w, R.weight_stats(lw_w, fused=True))
        ovf = do = None
        if comm is None:
            (rec_td, rec_l), carry_td, carry_l, lw, idx, ess = out
        else:  # the global ESS test and resampling: the carry rows alone move
            (rec_td, rec_l), carry_td, carry_l, lw, stats = out
            carry_l, idx, lw, ess, do, ovf = comm.step_resample(k_res, lw, stats, carry_l, scheme, thr)
            if ovf is not None:
                ovfs.append(ovf)
        # scheduled, not waited for: the host queues step t + 1 while the device runs step t
        # (sharded, exact path: the step's decision is read on the host)
        mx.async_eval(rec_l, carry_l, lw, ess, [] if do is None else do, [] if idx is None else idx,
                      [] if ovf is None else ovf)
        recs.append((rec_td, rec_l))
        idxs.append(idx)
        esss.append(ess)
        dos.append(do)
        axes.append(caxes)
    # the run's one read of the decisions (and overflow flags), one by one: evaluated
    # scalars, host reads (stacking them would be a copy kernel per step on a GPU)
    head = _decisions(esss, threshold, n) if comm is None else [bool(f.item()) for f in dos + ovfs]
    if any(head[T:]):  # a sync-free step's windows overflowed: redo the run on the exact
        # path from the same keys (the same draws, so the result an exact run gives)
        return _run_sequence(keys, model, args, args_T, cons, n, scheme, threshold, compile, progress,
                             comm.fallback())
    flags = head[:T]
    ess_hist = tuple(float(e.item()) for e in esss)
    if comm is None:
        Ds = _descent(idxs, flags)
    else:  # the final log-weights travel with the ancestors (one collective)
        Ds, glw = comm.descent(idxs, flags, lw)
    take_each = None if comm is None else comm.take_rows_each
    built = (_rebuild_columns(model, args, recs, Ds, cons, axes, carry_td, n,
                              None if comm is None else comm.take_blocks) if shared else None)
    if built is None:
        recs = [tree_unflatten(td, ls) for td, ls in recs]
        steps = _rebuild(model, args, recs, Ds, cons, axes, carry_td, n, shared, take_each)
        score = mx.sum(mx.stack([s.score for s in steps]), axis=0)
        mx.eval(lw, score, [tree_flatten(s)[0] for s in steps])
    else:
        steps, score, blocks = built
        mx.eval(lw, score, blocks)  # the steps' own views are built only when read
    traces = SequenceTraceT(model, args_T, steps if isinstance(steps, StackedSteps) else tuple(steps),
                            score, n)
    ancestors = tuple(i for i, f in zip(idxs, flags) if f)
    if comm is None:
        glw = lw
    else:  # evaluated here: every process takes part in the gather
        mx.eval(glw)
    return SMCRun(traces, lw, glw, ess_hist, tuple(flags), ancestors)


def _model_key(model):
    try:
        hash(model)
        return model
    except TypeError:
        return id(model)


#: the gathered carries' size (bytes, all steps) from which the end of a fused run replays
#: step 0 on its own instead of copying every step's incoming carry into one block
#: (:func:`_rebuild_columns`): one more call against a copy of [T, n, …] (16 GB for 10⁷
#: particles of a 4-coordinate state over 100 steps)
CARRY_COPY_MAX_BYTES = 1 << 26

#: the largest n for which a GPU builds the descent block by doubling (:meth:`_Descent.block`)
DOUBLING_MAX_N = 1 << 17


def _descent(idxs: list, flags: list) -> "_Descent":
    """Rows of each step's (pre-resampling) arrays that the final particles descend
    from: D_{T−1} = idx_{T−1}, D_t = idx_t[D_{t+1}], identity factors (no resampling)
    skipped; None where all are identity. A list-like :class:`_Descent`, built when
    read; its :meth:`_Descent.block` gives all of them as one [T, n] array instead."""
    return _Descent(idxs, flags)


class _Descent:
    """The descent rows D_t of :func:`_descent`: as a list (``Ds[t]``, iteration; the
    chain of ``take``s, built on first read) or as ONE block [T, n] (:meth:`block`)."""

    def __init__(self, idxs: list, flags: list):
        self.idxs, self.flags = idxs, flags
        self._rows = None

    def rows(self) -> list:
        if self._rows is None:
            D, Ds = None, [None] * len(self.idxs)
            for t in reversed(range(len(self.idxs))):
                if self.flags[t]:
                    D = self.idxs[t] if D is None else take_rows(self.idxs[t], D)
                Ds[t] = D
            self._rows = Ds
        return self._rows

    def __getitem__(self, t):
        return self.rows()[t]

    def __iter__(self):
        return iter(self.rows())

    def __len__(self) -> int:
        return len(self.idxs)

    def block(self, n: int, doubling: bool | None = None) -> mx.array:
        """[T, n]: row t is D_t (the identity where None). On a GPU, by doubling: the T
        ancestor vectors (the identity where no resampling) stacked once, then
        ⌈log₂ T⌉ rounds G_t ← G_t[G_{t+2^r}] of ONE ``take_along_axis`` each, over
        rows padded with identity rows (a round's last 2^r rows need no partner): about
        T + ⌈log₂ T⌉ kernels instead of a gather per resampling plus a copy per step.
        The doubling gathers ~⌈log₂ T⌉·2^⌈log₂ T⌉ rows of n against the chain's T, so it
        wins only while the launches dominate: n ≤ :data:`DOUBLING_MAX_N` (an H200 at
        n = 10⁷, T = 100: 519 ms for the whole run against 140 ms by the chain). On the
        CPU (where the extra row work costs more than the kernels it saves) and for
        larger n the chain of :meth:`rows`, stacked (``doubling`` forces either).
        Integer compositions: the same rows either way."""
        T = len(self.idxs)
        if doubling is None:
            doubling = mx.default_device().type == mx.DeviceType.gpu and n <= DOUBLING_MAX_N
        if not doubling or T < 2 or any(i is None for i in self.idxs) or not any(self.flags) \
                or (2 * T) * n > indexing.MAX_DIM:
            ar = mx.arange(n, dtype=mx.int32)
            return _rows_block([ar if d is None else d for d in self.rows()])
        R = (T - 1).bit_length()  # rounds: 2^R ≥ T
        pad = mx.broadcast_to(mx.arange(n, dtype=mx.int32), ((1 << R) - 1, n))
        G = mx.concatenate([i[None] for i in self.idxs] + [pad], axis=0)
        L = G.shape[0]
        for r in range(R):
            off = 1 << r
            L -= off
            G = mx.take_along_axis(G[:L], G[off:off + L], axis=1)
        return G[:T]


def _rebuild_columns(model, args, recs, Ds, cons, axes, carry_td, n: int, take_blocks=None):
    """:func:`_rebuild` when every step has one structure (the shared compiled step):
    each kept array is stacked over the steps into a block [T, n, …] and gathered by ONE
    ``take_along_axis`` with the stacked D_t (:meth:`_Descent.block`); the steps are
    replayed as ONE vmapped call on T·n rows (the kernel given :data:`STEP_INDEX`; step
    0 apart when its initial carry has another structure) and kept as columns
    (:class:`StackedSteps`: a step's sub-trace is built when it is read). Returns
    (steps, total score, arrays to evaluate) or None (the general path applies).
    ``take_blocks`` (sharded particles: ``comm.take_blocks``) gathers the kept arrays
    (per kind, T arrays [n, …]) by the global rows D_t instead."""
    from genmlx.combinators._sequence import STEP_INDEX, holds_step_index, same_leaves

    T = len(recs)
    if T * n > indexing.MAX_DIM:  # T·n rows in one axis: the general path replays per step
        # (a columns replay in chunks of steps was tried: at 3·10⁷ particles on an H200
        # its whole-run graph ran out of memory where the step-by-step path fits)
        return None
    td0 = recs[0][0]
    obs = [dict(c.leaves()) for c in cons]
    ob_paths = list(obs[0])
    if T < 2 or any(td != td0 for td, _ in recs) or any(a != axes[0] for a in axes) \
            or any(list(o) != ob_paths for o in obs) \
            or any(getattr(o[p], "shape", None) != getattr(obs[0][p], "shape", None)
                   for o in obs for p in ob_paths):
        return None
    J = len(recs[0][1])
    kept = [[ls[j] for _, ls in recs] for j in range(J)]  # per kind: T arrays [n, …]
    cols = []
    if take_blocks is not None:  # rows across processes (per-particle observations excluded)
        if any(a is not None for a in axes[0]):
            return None
        cols = take_blocks(kept, Ds)
    elif isinstance(Ds, _Descent) and paths_kernel.usable(Ds.idxs, kept):
        # GPU: the descent and every kind's gather in ONE kernel (no T-input concatenations)
        D, cols = paths_kernel.ancestral_paths(Ds.idxs, kept)
    else:
        if isinstance(Ds, _Descent):
            D = Ds.block(n)  # [T, n]
        else:
            ar = mx.arange(n, dtype=mx.int32)
            D = _rows_block([ar if d is None else d for d in Ds])
        for col in kept:
            block = _rows_block(col)  # [T, n, …]
            cols.append(take_rows_batched(block, D))
    cm_cols, carry_cols = tree_unflatten(td0, cols)
    choices = list(cm_cols.leaves())
    carry_cols = [choices[c][1] if isinstance(c, int) else c for c in carry_cols]
    ob_cols = []
    for j, p in enumerate(ob_paths):
        vals = _stack_values([o[p] for o in obs])
        if axes[0][j] is None:  # shared by all particles
            vals = mx.broadcast_to(vals[:, None], (T, n) + vals.shape[1:])
        else:  # one per particle slot: follows the ancestry like the choices
            vals = mx.take_along_axis(vals, D.reshape(D.shape + (1,) * (vals.ndim - 2)), axis=1)
        ob_cols.append(vals)
    # the carry into each step: the initial carry (broadcast) at step 0 when it has the
    # carry's structure and the carries are small, else step 0 is replayed on its own and
    # the others read their carries as views of the gathered columns (no copy)
    init_l, init_td = tree_flatten(model._init_carry(args))
    with0 = init_td == carry_td and all(
        x.shape == c.shape[2:] and x.dtype == c.dtype for x, c in zip(init_l, carry_cols)) \
        and sum(c.nbytes for c in carry_cols) < CARRY_COPY_MAX_BYTES
    lo = 0 if with0 else 1
    k = T - lo

    def rows(x):  # steps lo..T-1 of a block [T, n, …] as [k·n, …]
        return x[lo:].reshape((k * n,) + x.shape[2:])

    if with0:
        carry_in = [mx.concatenate([mx.broadcast_to(x[None, None], (1, n) + x.shape), c[:-1]])
                    for x, c in zip(init_l, carry_cols)]
        carry_in = [c.reshape((k * n,) + c.shape[2:]) for c in carry_in]
    else:
        carry_in = [c[:-1].reshape((k * n,) + c.shape[2:]) for c in carry_cols]
    try:
        in_flat = [tree_flatten(model._kernel_inputs(args, t, STEP_INDEX))
                   for t in (range(lo, T) if model._inputs_vary else [lo])]
        shared_in = same_leaves(in_flat)
        if shared_in:
            inp = tree_unflatten(in_flat[0][1], in_flat[0][0])
        else:
            inp = tree_unflatten(in_flat[0][1], [
                mx.broadcast_to(mx.stack(xs)[:, None], (k, n) + xs[0].shape).reshape((k * n,) + xs[0].shape)
                for xs in zip(*(a for a, _ in in_flat))])
        cm = ChoiceMap.empty()
        for p, v in choices + list(zip(ob_paths, ob_cols)):
            cm = cm.set_submap(p, ChoiceMap.leaf(rows(v)))
        payload = (model, k * n, not shared_in)
        sub = cached_call(_replay, payload, payload, inp, tree_unflatten(carry_td, carry_in), cm)
        leaves, td = tree_flatten(sub)
        if holds_step_index(td):
            return None
    except Exception:  # noqa: BLE001 - e.g. the kernel reads t while replaying: general path
        return None
    score = mx.sum(sub.score.reshape(k, n), axis=0)
    head = ()
    if not with0:
        cm0 = ChoiceMap.empty()
        for p, v in choices + list(zip(ob_paths, ob_cols)):
            cm0 = cm0.set_submap(p, ChoiceMap.leaf(v[0]))
        sub0, _ = model.vextend(mx.random.key(0), model._kernel_inputs(args, 0, 0),
                                model._init_carry(args), False, cm0, tuple(0 for _ in cm0.leaves()), n)
        head, score = (sub0,), sub0.score + score
    # the replayed steps stay columns [n, k, …] (a step's leaves are views, built when
    # read): no k sub-traces to build, and the trace flattens to a few arrays
    steps = StackedSteps.from_rows(head, leaves, td, k, n)
    return steps, score, leaves + steps.cols + [x for h in head for x in tree_flatten(h)[0]]


def _stack_values(vals: list) -> mx.array:
    """``mx.stack`` of per-step observation values. Scalars of one type (0-d arrays of
    one dtype, as a choice map stores numbers, or Python numbers) are read on the host
    and made ONE array, with the same values: not a T-input concatenation (on a GPU a
    copy kernel per input)."""
    if all(isinstance(v, mx.array) and v.ndim == 0 for v in vals):
        dtype = vals[0].dtype
        if all(v.dtype == dtype for v in vals):
            return mx.array([v.item() for v in vals], dtype=dtype)
    elif len({type(v) for v in vals}) == 1 and type(vals[0]) in (float, int, bool):
        return mx.array(vals)
    return mx.stack([v if isinstance(v, mx.array) else mx.array(v) for v in vals])


def _rows_block(xs: list) -> mx.array:
    """``mx.stack(xs)`` of T arrays [n, …]: one concatenation along axis 0 (no per-array
    view nodes) while T·n fits one axis, else the stack."""
    if xs[0].ndim and len(xs) * int(xs[0].shape[0]) > indexing.MAX_DIM:
        return mx.stack(xs)
    return mx.concatenate(xs, axis=0).reshape((len(xs),) + xs[0].shape)


def _replay(payload, inputs, carry, cm):
    """Steps rebuilt from their choices on m rows (compiled: the score arithmetic fuses)."""
    model, m, inputs_batched = payload
    return model.vextend(mx.random.key(0), inputs, carry, True, cm, tuple(0 for _ in cm.leaves()), m,
                         inputs_batched=inputs_batched)[0]


def _rebuild(model, args, recs, Ds, cons, axes, carry_td, n: int, shared: bool, take_each=None) -> list:
    """The step sub-traces of the final particles. Step t was kept in its
    pre-resampling row order; final particle i descends from row D_t[i] of step t
    (:func:`_descent`). The kept choices and carries are gathered in one
    :func:`gather_rows_each` call, then every step is replayed from its choices
    (:meth:`SequenceGF.vreplay`) with the carry of its predecessor."""
    # one gather of every kept array (choices, and carry leaves that are not choices)
    flat, rows, where = [], [], []
    for t, (cm, carry) in enumerate(recs):
        vals = [v for _, v in cm.leaves()]
        for i, v in enumerate(vals):
            where.append((t, "v", i))
            flat.append(v)
            rows.append(Ds[t])
        for i, c in enumerate(carry):
            if not isinstance(c, int):
                where.append((t, "c", i))
                flat.append(c)
                rows.append(Ds[t])
    moved = [i for i, r in enumerate(rows) if r is not None]
    got = list(flat)
    take_each = gather_rows_each if take_each is None else take_each
    for i, x in zip(moved, take_each([flat[i] for i in moved], [rows[i] for i in moved])):
        got[i] = x
    vals = [[None] * sum(1 for _ in cm.leaves()) for cm, _ in recs]
    carries = [list(c) for _, c in recs]
    for (t, kind, i), x in zip(where, got):
        (vals if kind == "v" else carries)[t][i] = x
    steps = []
    for t, (cm, _) in enumerate(recs):
        choices = ChoiceMap.empty()
        for (p, _), v in zip(cm.leaves(), vals[t]):
            choices = choices.set_submap(p, ChoiceMap.leaf(v))
        for (p, v), ax in zip(cons[t].leaves(), axes[t]):  # observations, per particle
            if ax == 0:  # one per particle slot: follows the ancestry like the choices
                v = v if Ds[t] is None else mx.take(v, Ds[t], axis=0)
            else:
                v = mx.broadcast_to(mx.array(v)[None], (n,) + tuple(mx.array(v).shape))
            choices = choices.set_submap(p, ChoiceMap.leaf(v))
        if t == 0:
            carry_in, batched = model._init_carry(args), False
        else:
            prev = [vals[t - 1][c] if isinstance(c, int) else c for c in carries[t - 1]]
            carry_in, batched = tree_unflatten(carry_td, prev), True
        steps.append((t, carry_in, batched, choices))
    return model.vreplay(args, steps, n, shared_index=shared)


# -- lazy ancestry for sequence traces -----------------------------------------------
class _Ancestry:
    """Resampling of particles whose trace is a ``gm.Unfold``/``gm.Scan`` trace (steps
    stored separately), in O(n) per resampling instead of O(t · n).

    Extending a sequence trace reads only the last step (its carry) and the total score,
    and passes the earlier step sub-traces through untouched (the very same objects).
    So a resampling gathers just the last step and the score; each earlier step keeps
    its row order from the resampling *epoch* in which it was last gathered, and
    :meth:`resolve` applies the composed ancestor indices
    C_e = idx_{e+1}[idx_{e+2}[… idx_K]] once, when the full trace is needed (end of the
    run, callbacks, rejuvenation). If an update re-executes an earlier step (it is not
    the same object afterwards), the step is redone on the resolved trace.
    """

    def __init__(self, enabled: bool, take_rows: Callable | None = None,
                 compose: Callable | None = None):
        self.enabled = enabled
        # ``take_rows(leaves, idx) -> leaves``: rows ``idx`` of every leaf;
        # ``compose(nxt, c)``: nxt[c]. Particle-sharded runs pass cross-process versions
        # (``idx`` then holds this process's slots' global source rows).
        self.take_rows = gather_rows if take_rows is None else take_rows
        self.compose = (lambda nxt, c: mx.take(nxt, c, axis=0)) if compose is None else compose
        self.history: list = []  # ancestor indices of each resampling
        self.epoch: dict = {}  # step -> number of resamplings its rows reflect

    def _applies(self, traces) -> bool:
        from genmlx.combinators._sequence import SequenceTrace

        return self.enabled and isinstance(traces, SequenceTrace) and len(traces.steps) > 0

    def resample(self, traces: Trace, idx: mx.array) -> Trace:
        if not self._applies(traces):
            leaves, td = flatten_particles(traces)
            return rebuild_particles(td, self.take_rows(leaves, idx), traces.args, int(idx.shape[0]))
        K = len(self.history)
        steps = list(traces.steps)
        for t in range(len(steps)):
            self.epoch.setdefault(t, K)
        self.history.append(idx)
        (steps[-1],), score = _take_subs([steps[-1]], idx, self.take_rows, extra=traces.score_)
        self.epoch[len(steps) - 1] = K + 1
        return replace(traces, steps=tuple(steps), score_=score, batch_size=int(idx.shape[0]))

    def stale(self, traces) -> bool:
        K = len(self.history)
        return self._applies(traces) and any(e < K for e in self.epoch.values())

    def resolve(self, traces: Trace) -> Trace:
        """The full trace with every step in the current row order (recorded: later
        resamplings start from it)."""
        return self._resolved(traces, record=True)

    def view(self, traces: Trace) -> Trace:
        """The resolved trace for reading only (proposals, callbacks), not recorded: its
        gathers are lazy, so only the steps actually read are ever computed (O(n) per
        step for a proposal reading the last step), and no chains of gathers build up."""
        return self._resolved(traces, record=False)

    def _resolved(self, traces: Trace, record: bool) -> Trace:
        if not self.stale(traces):
            return traces
        K = len(self.history)
        steps = list(traces.steps)
        by_epoch: dict = {}
        for t in range(len(steps)):
            e = self.epoch.get(t, K)
            if e < K:
                by_epoch.setdefault(e, []).append(t)
            if record:
                self.epoch[t] = K
        comp, c = {}, None
        for e in range(K - 1, min(by_epoch) - 1, -1):
            nxt = self.history[e]
            c = nxt if c is None else self.compose(nxt, c)
            comp[e] = c
        for e, ts in sorted(by_epoch.items()):  # one gather per epoch, all its steps
            subs, _ = _take_subs([steps[t] for t in ts], comp[e], self.take_rows)
            for t, sub in zip(ts, subs):
                steps[t] = sub
        return replace(traces, steps=tuple(steps))

    def extend(self, fn, traces: Trace):
        """Run ``fn(traces) -> (new_traces, lw)``; redo it on the resolved trace if it
        re-executed a step whose rows are stale."""
        if not self.stale(traces):
            return fn(traces)
        out = fn(traces)
        new = out[0]
        K = len(self.history)
        stale = [t for t, e in self.epoch.items() if e < K]
        if all(t < len(new.steps) and new.steps[t] is traces.steps[t] for t in stale):
            return out
        return fn(self.resolve(traces))


def _take_subs(subs: list, idx, take_rows=gather_rows, extra=None):
    """Rows ``idx`` of several sub-traces (and of the array ``extra``) in one
    ``take_rows`` call: (sub-traces, taken extra)."""
    flats = [tree_flatten(sub) for sub in subs]
    leaves = [x for ls, _ in flats for x in ls] + ([] if extra is None else [extra])
    out = take_rows(leaves, idx)
    res, i = [], 0
    for ls, td in flats:
        res.append(tree_unflatten(td, out[i:i + len(ls)]))
        i += len(ls)
    return res, (None if extra is None else out[-1])


# -- SMC -----------------------------------------------------------------------------
def smc(key: mx.array, model: GenerativeFunction, args: tuple, observations, n: int, *,
        proposal: GenerativeFunction | None = None, proposal_args: tuple = (),
        resampling: str | Callable = "systematic", ess_threshold: float = 0.5,
        rejuvenation: Callable | None = None,
        step_args: Callable[[int], tuple] | None = None,
        callback: Callable[[int, Trace, mx.array], None] | None = None,
        progress: bool = True, compile: bool = True) -> SMCResult:
    """Particle filter with n particles over the steps of a sequential model.

    ``observations`` is a list of per-step choice maps (full addresses, e.g.
    ``{(t, "y"): y_t}``) or one choice map whose top-level keys are the steps 0..T−1
    (the ``Unfold`` layout). ``ess_threshold`` ∈ [0, 1]: 1 resamples every step, 0 never.
    ``callback(t, traces, log_weights)`` sees the weighted particles after each step's
    weighting (before resampling), e.g. to record filtering estimates.

    Fast path (``gm.Unfold``/``gm.Scan`` models with the prior as proposal, no
    rejuvenation, callback or ``step_args``): each time step is ONE compiled function of
    the carry alone (extend + weight + ESS + resampling decision by ``mx.where`` +
    ancestor gather of the carry, :func:`_seq_step`), traced once for all t when the
    kernel does not read t (``compile=False`` runs it uncompiled); each step keeps its
    new choices, its carry and the ancestor indices, and the traces (paths, scores) are
    rebuilt once at the end. Otherwise each step's extension runs uncompiled (a growing
    trace would be a new compilation every step) and resampling is compiled (unless
    ``compile=False``); for ``Unfold``/``Scan`` traces a resampling then gathers only the
    last step (see :class:`_Ancestry`), and proposals and callbacks read a lazily
    resolved view (O(n) array work per step when they read only the last steps).
    Rejuvenation sees (and may change) the whole trace: O(t · n) per step.
    Returns an :class:`SMCResult` (batched traces, log-weights, ``log_marginal_likelihood``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"smc: n must be a positive int, got {n!r}")
    out = run_smc(key, model, args, observations, n, proposal=proposal, proposal_args=proposal_args,
                  resampling=resampling, ess_threshold=ess_threshold, rejuvenation=rejuvenation,
                  step_args=step_args, callback=callback, progress=progress, compile=compile)
    return SMCResult(out.traces, out.log_weights, out.ess_history, out.resampled)


@dataclass(frozen=True)
class SMCRun:
    """Raw output of :func:`run_smc`: this process's particles and log-weights, the
    global log-weights (equal to ``log_weights`` without a communicator), the ESS
    history, the resampling flags and the ancestor indices of each resampling."""

    traces: Trace
    log_weights: mx.array
    global_log_weights: mx.array
    ess_history: tuple
    resampled: tuple
    ancestors: tuple


def run_smc(key: mx.array, model: GenerativeFunction, args: tuple, observations, n_local: int, *,
            proposal: GenerativeFunction | None = None, proposal_args: tuple = (),
            resampling: str | Callable = "systematic", ess_threshold: float = 0.5,
            rejuvenation: Callable | None = None,
            step_args: Callable[[int], tuple] | None = None,
            callback: Callable[[int, Trace, mx.array], None] | None = None,
            progress: bool = True, compile: bool = True, comm=None) -> SMCRun:
    """The SMC loop behind :func:`smc` with ``n_local`` particles in this process.

    ``comm`` (None: one process) shards the particles across processes; it provides
    ``local_key(k)`` (this process's key for particle-wise randomness; resampling keys
    stay shared), ``resample(key, lw, scheme, threshold) -> (idx, lw, ess, did)`` (the
    global ESS test and resampling; ``idx`` holds the global source rows of this
    process's slots), ``take_rows(leaves, idx)`` and ``compose(nxt, c)`` (their
    cross-process versions of row gathers) and ``gather(lw)`` (the global log-weights).
    The fused path (``gm.Unfold``/``gm.Scan`` models) also uses ``step_resample(key, lw,
    stats, carry_leaves, scheme, threshold) -> (leaves, idx, lw, ess, did, overflow)``,
    ``descent``, ``take_rows_each`` and ``fallback()`` (see
    :class:`~genmlx.inference.sharded.Shards`).
    """
    if not 0.0 <= ess_threshold <= 1.0:
        raise ValueError(f"smc: ess_threshold must lie in [0, 1], got {ess_threshold!r}")
    R.get_scheme(resampling)
    args, pargs = tuple(args), tuple(proposal_args or ())
    T, obs_at, args_at = _steps(args, observations, step_args, model)
    keys = mx.random.split(key, 3 * T).reshape(T, 3, -1)
    if (step_args is None and proposal is None and rejuvenation is None and callback is None
            and isinstance(model, SequenceGF)
            and (comm is None or hasattr(comm, "step_resample"))):
        cons = _step_constraints(observations, obs_at, T)
        # sharded: per-particle observations (leading axis n_local) take the general path
        if cons is not None and (comm is None or not any(
                getattr(v, "ndim", 0) >= 1 and v.shape[0] == n_local for c in cons for _, v in c.leaves())):
            return _run_sequence(keys, model, args, args_at(T - 1)[0], cons, n_local, resampling,
                                 ess_threshold, compile, progress, comm)
    ess_hist, flags, ancestors = [], [], []
    traces = lw = None
    anc = _Ancestry(enabled=step_args is None, take_rows=None if comm is None else comm.take_rows,
                    compose=None if comm is None else comm.compose)
    for t in tqdm(range(T), disable=not progress, desc="smc"):
        k_ext, k_res, k_rej = keys[t, 0], keys[t, 1], keys[t, 2]
        if comm is not None:
            k_ext, k_rej = comm.local_key(k_ext), comm.local_key(k_rej)
        a_t, d_t = args_at(t)
        obs = obs_at(t)
        if t == 0:
            traces, lw = _init((model, proposal, n_local), k_ext, a_t, obs, pargs)
        else:
            prev = None
            if proposal is not None:  # a proposal may read any earlier step
                if comm is None:
                    prev = anc.view(traces)
                else:
                    traces = anc.resolve(traces)
            payload = (model, proposal, d_t, t)
            traces, lw = anc.extend(
                lambda tr, lw=lw, payload=payload, k=k_ext, a=a_t, o=obs, p=prev: _extend(
                    payload, k, tr, lw, a, o, pargs, p if tr is traces else None),
                traces)
        if callback is not None:
            if comm is None:
                callback(t, anc.view(traces), lw)
            else:
                traces = anc.resolve(traces)
                callback(t, traces, lw)
        if comm is None:
            idx, lw, ess, did = cached_call(_resample, (resampling, float(ess_threshold)),
                                            (resampling, float(ess_threshold)), k_res, lw,
                                            compile=compile)
        else:
            idx, lw, ess, did = comm.resample(k_res, lw, resampling, float(ess_threshold))
        mx.eval(idx, lw, ess, did)
        ess_hist.append(float(ess.item()))
        flags.append(bool(did.item()))
        if flags[-1]:
            ancestors.append(idx)
            traces = anc.resample(traces, idx)
        if rejuvenation is not None:
            traces = anc.resolve(traces)
            traces, _ = as_kernel_output(rejuvenation(k_rej, traces))
        _eval_particles(traces, lw, full=rejuvenation is not None or t == 0)
    traces = anc.resolve(traces)
    _eval_particles(traces, lw)
    glw = lw if comm is None else comm.gather(lw)
    return SMCRun(traces, lw, glw, tuple(ess_hist), tuple(flags), tuple(ancestors))


# -- conditional SMC and particle Gibbs ---------------------------------------------
def _reference_choices(reference: Trace, paths) -> ChoiceMap:
    cm = ChoiceMap.empty()
    ref = reference.choices
    for p in paths:
        cm = cm.set_submap(p, ref.submap_at_path(p))
    return cm


def _new_latents(new: Trace, old: Trace | None, obs: ChoiceMap) -> list:
    old_paths = [] if old is None else choice_paths(old.choices)
    obs_paths = choice_paths(obs)
    return [p for p in choice_paths(new.choices) if p not in old_paths and not covered(p, obs_paths)]


def conditional_smc(key: mx.array, model: GenerativeFunction, args: tuple, observations, n: int,
                    reference: Trace, *, proposal: GenerativeFunction | None = None,
                    proposal_args: tuple = (), step_args: Callable[[int], tuple] | None = None,
                    progress: bool = False, compile: bool = False) -> SMCResult:
    """Conditional SMC (Andrieu, Doucet & Holenstein 2010): particle 0 is pinned to the
    ``reference`` trace (an unbatched trace of the full model) at every step; the other
    n − 1 particles are resampled multinomially from all n at every step. The returned
    particles and final weights define the particle-Gibbs update (draw one ∝ weight).
    ``compile`` is accepted for compatibility: the extension of the growing traces runs
    uncompiled (compiling it would trace and compile anew at every step)."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"conditional_smc: n must be an int ≥ 2, got {n!r}")
    if reference.batch_size is not None:
        raise ValueError("conditional_smc: the reference must be a single (unbatched) trace")
    args, pargs = tuple(args), tuple(proposal_args or ())
    T, obs_at, args_at = _steps(args, observations, step_args, model)
    keys = mx.random.split(key, 3 * T).reshape(T, 3, -1)
    traces = lw = None
    for t in tqdm(range(T), disable=not progress, desc="csmc"):
        k_ext, k_res, k_ref = keys[t, 0], keys[t, 1], keys[t, 2]
        a_t, d_t = args_at(t)
        obs = obs_at(t)
        if t == 0:
            prev0, base = None, mx.array(0.0)
            traces, lw = _init((model, proposal, n), k_ext, a_t, obs, pargs)
            latents = _new_latents(traces, None, obs)
            cons = obs.merge(_reference_choices(reference, latents))
            tr0, w0 = model.generate(k_ref, a_t, cons)
        else:
            anc = mx.random.categorical(lw, num_samples=n - 1, key=k_res).astype(mx.int32)
            idx = mx.concatenate([mx.zeros((1,), dtype=mx.int32), anc])
            prev = take_particles(traces, idx)
            base = R.log_mean_exp(lw)
            lw = mx.broadcast_to(base, lw.shape)
            payload = (model, proposal, d_t, t)
            traces, lw = _extend(payload, k_ext, prev, lw, a_t, obs, pargs)
            latents = _new_latents(traces, prev, obs)
            prev0 = unbatch(prev, 0)
            cons = obs.merge(_reference_choices(reference, latents))
            tr0, w0, _, _ = model.update(k_ref, prev0, cons, a_t, d_t)
        if proposal is None:
            q0 = model.project(tr0, select(*latents)) if latents else mx.array(0.0)
        else:
            q0, _ = proposal.assess((t, prev0, obs, *pargs), _reference_choices(reference, latents))
        traces = set_particle(traces, 0, tr0)
        lw = mx.concatenate([(base + w0 - q0)[None], lw[1:]])
        _eval_particles(traces, lw)
    return SMCResult(traces, lw)



def particle_gibbs(key: mx.array, model: GenerativeFunction, args: tuple, observations, n: int,
                   num_iters: int, reference: Trace | None = None, *,
                   proposal: GenerativeFunction | None = None, proposal_args: tuple = (),
                   step_args: Callable[[int], tuple] | None = None, progress: bool = True,
                   compile: bool = False) -> Trace:
    """Particle Gibbs: iterate conditional SMC, each time drawing the new reference from
    the final particles in proportion to their weights (a Markov kernel leaving the
    posterior invariant). Without ``reference`` the chain starts from a draw of an
    ordinary SMC run. Returns the ``num_iters`` references as one batched trace."""
    k0, *ks = mx.random.split(key, num_iters + 1)
    if reference is None:
        k_smc, k_pick = mx.random.split(k0)
        res = smc(k_smc, model, args, observations, n, proposal=proposal, proposal_args=proposal_args,
                  step_args=step_args, progress=False, compile=compile, ess_threshold=1.0)
        reference = unbatch(res.resample(k_pick, 1), 0)
    chain = []
    for k in tqdm(ks, disable=not progress, desc="particle gibbs"):
        k_run, k_pick = mx.random.split(k)
        res = conditional_smc(k_run, model, args, observations, n, reference, proposal=proposal,
                              proposal_args=proposal_args, step_args=step_args, compile=compile)
        reference = unbatch(res.resample(k_pick, 1), 0)
        chain.append(reference)
    return stack_traces(chain)
