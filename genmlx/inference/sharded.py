"""Particle-parallel importance sampling and SMC: the n particles are sharded across the R
processes of an ``mx.distributed`` group (launched with ``mlx.launch``), n/R per process.

Keys. From the user's key k, process r draws its particles with ``split(k, R)[r]`` (the
rank folded into the key), so the global particle set is a deterministic function of
(k, R); every draw that must agree across processes (resampling) uses the unfolded,
shared key. With no group, or a group of size 1, every function here *is* the
single-process one (same key, same result).

Importance sampling. Process r computes its local log-weights lw^(r) [n/R] exactly as
:func:`~genmlx.inference.importance.importance_sampling`; the global vector
lw = concat_r lw^(r) [n] is all-gathered (n floats, the only communication), so that

    log Ẑ = logsumexp(lw) − log n,   ESS = (Σ w)² / Σ w²,   w̄_i = exp(lw_i − logsumexp(lw))

are computed from the same array in every process (identical results). Estimates
Σ_i w̄_i f(x_i) sum the local terms and all-sum them.

Ancestor vectors. After a resampling with m draws, process r holds the global slots
[r·m/R, (r+1)·m/R); its part of the ancestor vector a (``idx`` below, the global source
row of each of its slots) is all it stores. a is identical to what one process would
draw on the gathered weights with the shared key, so all processes agree on it.

Particle movement (:meth:`Shards.take_rows`). The processes all-gather the [min, max]
of their slots' sources (2 ints each); process q then exports one window of its rows
needed by lower-ranked processes and one needed by higher-ranked ones (the hulls of
those ranges within q's rows, padded to common widths W_lo, W_hi); the windows are
all-gathered ([R · (W_lo + W_hi)] rows) and each process gathers its slots from its own
rows and the windows. Exact for any a. Ancestors are kept sorted (systematic, stratified
and residual are; multinomial draws are sorted, which leaves the resampled multiset —
all that matters after resampling, as the particles then carry equal weights —
unchanged), so each process's sources are contiguous and the windows hold only the
particles that change process: about the weight imbalance between processes, not the
particle state. Windows covering a whole shard fall back to gathering the shard.

Systematic resampling in O(n/R) per process (:func:`_systematic_local`, the default of
SMC). Each process all-gathers only (logsumexp(lw^(r)), logsumexp(2 lw^(r))): R·2
scalars give the global ESS, the log-mean weight log Ẑ_t and the process boundaries
B_q of the global CDF, identically everywhere. The decisions are taken on slot
positions, the global CDF in units of the n slots as int32 + float32 fraction (a float32
CDF resolves only n < 2^24 slots: past slot 2^24, n·C is an even integer and every
offspring count there came out even): the
boundaries P_q = n·B_q by int + fraction prefix sums of the R masses (P_R = n exactly),
and process r's particles at P_r + (P_{r+1} − P_r)·c_i from its local normalised CDF c
(double accumulation in the CUDA positions kernel and on the CPU, int + fraction prefix
sums on a GPU's generic path).
With the shared uniform U (the single-process ``systematic`` draws it from the same key)
each process counts, for its own particles, the systematic points j + U at or below
their positions: these offspring counts telescope across processes (the boundary
positions are the same numbers everywhere) to exactly n, and equal the single-process
systematic counts on the global weights up to the positions' rounding (~10⁻⁹ slots in
double, ~10⁻³ with the prefix sums).
Process q's offspring fill the global slots [N(B_q), N(B_{q+1})) in order; the parts
of that segment outside q's own block are all-gathered (index windows, as above) so
that every process knows its slots' sources. Other schemes draw from the gathered
weights (n floats per step, O(n) work per process).

SMC. As :func:`~genmlx.inference.smc.smc` (one loop: ``smc.run_smc`` with this module's
:class:`Shards` as communicator): each step extends and reweights the local particles
(no communication); the ESS test and the resampling are global, as above, so every
process agrees on whether to resample and on the ancestors, and after a resampling
every log-weight is the global log-mean weight. The global particle system is thus a
single-process SMC with n particles (given the per-process draws), and
log Ẑ = logsumexp(lw_T) − log n over all processes is the usual estimate, unbiased in
Ẑ.

Fused path (``gm.Unfold``/``gm.Scan`` models with the prior as proposal, no
rejuvenation, callback or ``step_args``: ``smc._run_sequence`` with ``comm``): each step
is ONE compiled local function (extension, weight, and the summary (logsumexp(lw^(r)),
logsumexp(2 lw^(r)))) that keeps only the step's new choices and carry
(:meth:`Shards.step_resample` then does the rest). With systematic resampling the step
is *sync-free* (the default, ``Shards.sync_free``): no host read and fixed shapes, so
the host queues the steps ahead of the devices and nothing drains their queues
(:func:`_sync_free_step`, compiled as one function with its two collectives):

* one all-gather of the R·2 summaries; :func:`_systematic_local` gives ESS, the decision
  did, N(B) [R+1] (process q's offspring fill the global slots [N(B_q), N(B_{q+1}))) and
  the local global-CDF values, all on the device;
* windows of W slots (:func:`window_width`, default min(m, max(4096, m/64, 32·√(R·m)))): process q
  searches the systematic ancestors of the fixed slot run [q·m − W, (q+1)·m + W)
  (:func:`~genmlx.inference.resampling.window_ancestors`: bit for bit the exact path's on
  the slots of q's segment) and exports the source rows and carry rows of the W slots
  below and the W above its block: ONE packed all-gather of 2W rows per process
  (:meth:`Shards.gather_packed`). Process r fills slot j from the owner p of j
  (N(B_p) ≤ j < N(B_{p+1})): its own search (p = r), row j − (p+1)·m of p's high window
  (p < r), row j − (p·m − W) of p's low window (p > r);
* the outputs are chosen on the device: where(did, resampled, old) for the carry rows and
  the ancestor block (the identity block r·m + [0, m) when did is false); the work is
  done every step, the price of no sync;
* overflow: a nonempty segment reaching past its windows (N(B_{q+1}) > (q+1)·m + W or
  N(B_q) < q·m − W) on a resampling step sets a device flag, identical in every process
  (it depends on N(B) alone). The flags are read ONCE at the end of the run, with the
  decisions; after an overflow the run is redone on the exact path from the same key
  (the same draws, so the same result; :meth:`Shards.fallback`, counted in
  ``Shards.fallbacks``). The segments' offsets from the blocks are the weight imbalance
  between processes: sd CV·√(n·(q/R)(1 − q/R)) slots for exchangeable particles (CV² =
  n/ESS − 1), far inside W ≥ 32·√n unless the ESS is tiny (a few particles holding most
  of the mass), where the run is redone.

The exact path (``Shards.sync_free = False``, and the fallback) reads N(B) and the
decision on the host each step (one read) and sizes the windows to the segments
(:class:`SegmentPlan`): nothing more without a resampling, one packed all-gather of the
segment parts outside the blocks with one. Both keep the ancestor vector a_t sharded
(process r keeps a_t's block of its slots). At the end of the run: ONE all-gather of
the H slots of every resampling's block next to each neighbour (``halo_width``, [K, 2H]
per process, the log-weights riding along) lets every process compose, locally, the
global rows D_t its final particles descend from (:meth:`Shards.descent`); one all-sum of
a flag confirms that no lineage left its extended block (else the whole blocks [K, m] are
gathered and composed); the kept arrays of every step move by those rows in one bounds
gather and one packed window gather (:meth:`Shards.take_rows_each`); the steps are
replayed locally from their choices (scores), as in ``smc``; one gather of the
log-weights.

Other schemes gather the n log-weights instead of the summaries (one collective, O(n)
work per process, one host read), draw the global (sorted) ancestors everywhere, and
move the carry rows in one collective whose windows follow from them. Otherwise (the
general path) a resampling of ``gm.Unfold``/``gm.Scan`` traces moves only the last step
and the score (the lazy ancestry of ``smc``); the earlier steps move when the full
traces are resolved (at the end, or for rejuvenation, callbacks or proposals), along the
composed ancestor vectors (composed with the cross-process :meth:`Shards.take_rows`;
compositions of sorted vectors are sorted, so again only boundary particles move).

Communication per step of the fused systematic path: 2R scalars and R·2W rows (carry
leaves and source indices), two collectives, no host read. Exact path: 2R scalars (one
collective, one host read); on a resampling also the carry rows that change process (one
collective). At the end: 2H·K ancestor indices per process with the n log-weights, R
flags, 2R·T bounds, the moved rows of the kept arrays (four collectives), and host reads
of the decisions and overflow flags, the halo flag and the bounds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from genmlx import kernels as _K
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.indexing import MAX_DIM, iota, row
from genmlx.core.trace import Trace
from genmlx.core.vectorize import unbatch
from genmlx.distributed import fold_rank, world
from genmlx.inference import resampling as R
from genmlx.inference._util import cached_call, flatten_particles, gather_rows, grouped_rows, rebuild_particles
from genmlx.inference.importance import importance_resampling, importance_sampling
from genmlx.inference.particles import WeightedParticles
from genmlx.inference.prefix_sums import slot_positions
from genmlx.inference.smc import SMCResult, _resample, _rows_block, run_smc, smc
from genmlx.kernels import paths as paths_kernel
from genmlx.kernels.gather import identity_or_rows, take_rows, take_rows2, take_rows_batched

_SORTED_SCHEMES = ("systematic", "stratified", "residual")

#: The most entries one array of the end of run's whole-block paths holds (every
#: process's ancestor blocks gathered; the kept arrays' blocks, extended or gathered, and
#: their taken rows): those paths run in chunks of steps below it. Two GPUs holding 10⁷
#: particles each of a 4-coordinate SSM over 100 steps (4·10⁹ kept floats per process)
#: died there with "an illegal memory access" in MLX's ops once an array passed 2³¹
#: entries. The MLX descent on halos (:func:`halo_compose`) chunks its extended blocks
#: the same way; the halo-paths kernel builds no such arrays.
BLOCK_ELEMENTS_MAX = 2**30


class Shards:
    """The particle sharding over an ``mx.distributed`` group of R > 1 processes: key
    folding, weight gathering and cross-process row gathers."""

    #: systematic steps of the fused SMC path without host reads (:func:`_sync_free_step`);
    #: False: the exact path (host-sized segments, one host read per step)
    sync_free: bool = True
    #: runs redone on the exact path after a sync-free window overflowed (all instances)
    fallbacks: int = 0
    #: end-of-run descents whose lineages left the neighbours' halos (all instances):
    #: the whole ancestor blocks were gathered
    halo_misses: int = 0

    def __init__(self, group: Any):
        self.group = group
        self.size = int(group.size())
        self.rank = int(group.rank())
        self.sort_ancestors = True

    # -- keys and weights ----------------------------------------------------------
    def local_key(self, key: mx.array) -> mx.array:
        """This process's key: split(key, R)[rank]."""
        return fold_rank(key, self.rank, self.size)

    def gather(self, x: mx.array) -> mx.array:
        """Concatenation over processes (rank order) along axis 0."""
        return mx.distributed.all_gather(mx.contiguous(x), group=self.group)

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group)

    def local(self, x: mx.array) -> mx.array:
        """This process's block of a global array with leading axis R·m."""
        m = x.shape[0] // self.size
        return x[self.rank * m:(self.rank + 1) * m]

    # -- resampling ----------------------------------------------------------------
    def resample(self, key: mx.array, lw: mx.array, scheme, threshold: float):
        """Global ESS test and resampling of the sharded particles with local
        log-weights ``lw`` [m]: (idx [m], new lw [m], ESS, did), ``idx`` holding the
        global source rows of this process's slots. Systematic resampling runs on local
        data and R·2 gathered scalars (:func:`_systematic_local`); other schemes on the
        gathered weights."""
        if isinstance(scheme, str) and scheme == "systematic":
            return self._systematic(key, lw, threshold)
        glw = self.gather(lw)
        idx, glw, ess, did = cached_call(_resample, (scheme, threshold), (scheme, threshold), key, glw)
        if self.sort_ancestors:
            idx = mx.sort(idx)  # the same multiset of ancestors; sorted ones move least
        return self.local(idx), self.local(glw), ess, did

    def _systematic(self, key, lw, threshold):
        m = int(lw.shape[0])
        stats = self.gather(R.weight_stats(lw, fused=True)[None])
        payload = (self.size, self.rank, threshold, _fused(lw))
        ess, did, new_lw, Nb, pos, U = cached_call(_systematic_local, payload, payload, key, lw, stats)
        mx.eval(ess, did, Nb)
        if not bool(did.item()):
            return self.rank * m + mx.arange(m, dtype=mx.int32), new_lw, ess, did
        plan = SegmentPlan([int(v) for v in np.array(Nb)], m)
        seg = plan.segment(pos, U, self.rank, payload[3])
        if plan.local:
            return seg, new_lw, ess, did
        idx = plan.assemble(seg, self.gather(plan.export(seg, self.rank)), self.rank)
        return idx, new_lw, ess, did

    # -- the fused SMC path (smc._run_sequence with comm=) ---------------------------
    def step_resample(self, key: mx.array, lw: mx.array, stats: mx.array, leaves: list, scheme,
                      threshold: float):
        """A step's global ESS test and resampling of the carry rows ``leaves`` (this
        process's m rows each): (leaves, idx, new lw, ESS, did, overflow).

        Systematic, sync-free (``sync_free``, the default): no host read and fixed
        shapes (:func:`_sync_free_step`): two collectives (the R·2 log-sum-exps
        ``stats``; the 2W-row windows of every process's carry rows and sources, packed
        into one buffer); the outputs are chosen by ``did`` on the device (``idx`` the
        identity block when it is false); ``overflow`` (a device bool, identical in every
        process) says that some segment passed its windows: the caller then redoes the run
        on the exact path (:meth:`fallback`). Systematic, exact: ONE collective and one
        host read (N(B) and the decision); on a resampling the parts of each process's
        segment (:class:`SegmentPlan`) that fall in other blocks are exported with their
        global source rows in ONE more collective. Other schemes: one gather of the n
        log-weights, every process draws the global (sorted) ancestors, and the carry rows
        move in one collective whose windows follow from those ancestors. On the exact
        paths ``idx`` is None without a resampling and ``overflow`` is None."""
        m, r = int(lw.shape[0]), self.rank
        if isinstance(scheme, str) and scheme == "systematic":
            if self.sync_free:
                return self._step_sync_free(key, lw, stats, leaves, float(threshold))
            g = self.gather(stats.reshape(1, 2))
            payload = (self.size, r, threshold, _fused(lw))
            ess, did, new_lw, head, pos, U = cached_call(_systematic_head, payload, payload, key, lw, g)
            head = head.tolist()  # the host sync: N(B) and the decision
            if not head[-1]:
                return leaves, None, new_lw, ess, did, None
            plan = SegmentPlan(head[:-1], m)
            seg = plan.segment(pos, U, r, payload[3])
            own = [seg] + gather_rows(leaves, seg - r * m)
            if plan.local:
                return own[1:], seg, new_lw, ess, did, None
            got = self.gather_packed([plan.export(x, r) for x in own])
            pos = plan.positions(r)
            moved = [mx.take(mx.concatenate([x, gx]), pos, axis=0) for x, gx in zip(own, got)]
            return moved[1:], moved[0], new_lw, ess, did, None
        glw = self.gather(lw)
        idx, glw, ess, did = cached_call(_resample_global, (scheme, threshold, self.size, self.sort_ancestors),
                                         (scheme, threshold, self.size, self.sort_ancestors), key, glw)
        head = np.array(idx[1])  # [R·2 + 1]: every block's [min, max] and the decision
        idx = idx[0]
        if not head[-1]:
            return leaves, None, self.local(glw), ess, did, None
        mine = self.local(idx)
        plan = WindowPlan(head[:-1].reshape(self.size, 2), m)
        return self._move(plan, leaves, mine), mine, self.local(glw), ess, did, None

    def _step_sync_free(self, key, lw, stats, leaves, threshold):
        m = int(lw.shape[0])
        W = 0 if self.size == 1 else max(1, min(m, int(window_width(m, self.size))))
        static = (self.group, self.size, self.rank, threshold, _fused(lw), W, COMPILE_COLLECTIVES)
        payload = (self,) + static[1:6]
        if COMPILE_COLLECTIVES:  # the whole step, collectives included, as one compiled function
            return cached_call(_sync_free_step, static, payload, key, lw, stats, leaves)
        g = self.gather(stats.reshape(1, 2))
        ess, did, new_lw, Nb, ovf, mid, export = cached_call(_sync_free_search, static, payload, key, lw, g,
                                                             leaves)
        got = self.gather_packed(export) if W else []
        moved, idx = cached_call(_sync_free_assemble, static, payload, did, Nb, mid, leaves, got)
        return moved, idx, new_lw, ess, did, ovf

    def fallback(self) -> "Shards":
        """This sharding on the exact systematic path, for redoing a run whose sync-free
        windows overflowed (same keys, hence the same draws); counted in
        ``Shards.fallbacks``."""
        Shards.fallbacks += 1
        twin = copy.copy(self)
        twin.sync_free = False
        return twin

    def descent(self, idxs: list, flags: list, lw: mx.array | None = None):
        """Global rows of each step's (pre-resampling) arrays that this process's final
        particles descend from (as ``smc._descent``, None where no resampling follows),
        D_t = a_t[D_{t+1}] composed locally.

        a_t is sharded (each process holds the block of its own slots). The lineages of a
        process's particles stay near its block (ancestors are sorted and the segments
        sit within their windows of the blocks), so each process first borrows only the
        ``halo_width(m)`` = H slots of every resampling's block next to its own from each
        neighbour (ONE all-gather of [K, 2H] per process, the final log-weights riding
        along) and composes on the slots [r·m − H, (r + 1)·m + H); one all-sum of a flag
        says whether some lineage left that range, and only then are the whole ancestor
        blocks all-gathered ([K, n]: 8.5 GB per process for K = 71 resamplings of
        3·10⁷ particles) and composed (counted in ``Shards.halo_misses``). With ``lw``:
        returns (Ds, global lw)."""
        ks = [t for t, f in enumerate(flags) if f]
        Ds = [None] * len(idxs)
        if not ks:
            return Ds if lw is None else (Ds, self.gather(lw))
        K, m = len(ks), int(idxs[ks[0]].shape[0])
        H = max(0, min(m, int(halo_width(m))))
        if 0 < H < m:  # the edges (the final log-weights riding along), then compose on them
            edges = mx.concatenate([x for t in ks for x in (idxs[t][:H], idxs[t][m - H:])]).reshape(K, 2 * H)
            E, glw = self.gather_packed([edges, lw]) if lw is not None else (self.gather(edges), None)
            lin = HaloLineage(self, idxs, flags, E, H)
            # with the halo-paths kernel (CUDA) the lineages stay lazy: the kernel follows them
            Ds = lin if paths_kernel.halo_usable(idxs, tuple(flags), []) else lin.rows()
            return Ds if lw is None else (Ds, glw)
        blocks = mx.stack([idxs[t] for t in ks])
        if lw is not None and self.size * blocks.size <= BLOCK_ELEMENTS_MAX:  # one collective
            A, glw = self.gather_packed([blocks, lw])
            return self._compose_full(idxs, flags, blocks, A), glw
        Ds = self._compose_full(idxs, flags, blocks)
        return Ds if lw is None else (Ds, self.gather(lw))

    def _compose_full(self, idxs: list, flags: list, blocks: mx.array, A: mx.array | None = None) -> list:
        """The lineages composed on every process's whole ancestor blocks: this process's
        ``blocks`` (the flagged steps' ancestors, [K, m]) all-gathered, in chunks of steps
        of at most BLOCK_ELEMENTS_MAX entries gathered (``A``: already gathered, [R·K, m])."""
        K, m, R_ = int(blocks.shape[0]), int(blocks.shape[1]), self.size
        c = K if A is not None else max(1, BLOCK_ELEMENTS_MAX // (R_ * m))
        rows = []  # per chunk [c, R·m]: step j's ancestors over every process's slots
        for j0 in range(0, K, c):
            g = A if A is not None else self.gather(blocks[j0:j0 + c] if c < K else blocks)
            rows.append(mx.transpose(g.reshape(R_, -1, m), (1, 0, 2)).reshape(-1, R_ * m))
        Ds, D, j = [None] * len(idxs), None, K - 1
        for t in reversed(range(len(idxs))):
            if flags[t]:
                D = idxs[t] if D is None else mx.take(rows[j // c][j % c], D, axis=0)
                j -= 1
            Ds[t] = D
        return Ds

    def take_rows_each(self, leaves: list, rows: list) -> list:
        """``[x[r] for x, r in zip(leaves, rows)]`` across processes (``rows[i]``: global
        source rows of this process's slots, None: its own rows): ONE gather of every
        distinct index vector's [min, max] and ONE (packed) gather of all windows."""
        out = list(leaves)
        todo = [i for i, r in enumerate(rows) if r is not None]
        if not todo:
            return out
        m, r = int(leaves[todo[0]].shape[0]), self.rank
        uniq: dict = {}
        for i in todo:
            uniq.setdefault(id(rows[i]), rows[i])
        keys = list(uniq)
        b = np.array(self.gather(mx.concatenate([source_bounds(uniq[k]) for k in keys])))
        b = b.reshape(self.size, len(keys), 2)
        plans = {k: WindowPlan(b[:, u], m) for u, k in enumerate(keys)}
        send = [i for i in todo if not plans[id(rows[i])].local]
        got = self.gather_packed([leaves[i] if plans[id(rows[i])].full else plans[id(rows[i])].export(leaves[i], r)
                                  for i in send])
        got = dict(zip(send, got))
        for i in todo:
            plan, idx = plans[id(rows[i])], rows[i]
            out[i] = (mx.take(leaves[i], idx - r * m, axis=0) if plan.local
                      else plan.assemble(leaves[i], got[i], idx, r))
        return out

    def take_blocks(self, kept: list, Ds) -> list:
        """Every step's rows of the kept arrays at once: ``kept`` holds, per kind, this
        process's rows of every step (T arrays [m, …]) and ``Ds`` the global source rows
        [m] of this process's slots at each step (the end-of-run lineages of
        :meth:`descent`; None: its own rows); returns per kind [T, m, …] with row (t, i) =
        step t's global row Ds[t][i].

        With the halo-paths kernel (CUDA, unless ``GENMLX_KERNELS=0``; ``Ds`` a
        :class:`HaloLineage`): ONE packed all-gather of every kept array's first and last
        H rows and ONE kernel follow the lineages and copy the rows
        (:func:`genmlx.kernels.paths.halo_paths`); a lineage past the halos (one all-sum
        says) falls back to what follows.

        ONE all-gather of the [min, max] of D (read on the host) sizes the halo H
        (:func:`block_halo`): the lineages of a sorted resampling stay near their block, so
        usually H ≤ m and ONE packed all-gather of every block's first and last H rows
        (:func:`halo_take`) is all that crosses processes; H = 0 moves nothing; H > m
        gathers the whole blocks. Steps go in chunks (one collective each) where the
        arrays would pass BLOCK_ELEMENTS_MAX entries."""
        if not kept:
            return []
        if isinstance(Ds, HaloLineage):
            got = Ds.paths(kept)
            if got is not None:
                return got
        T, m, r, size = len(kept[0]), int(kept[0][0].shape[0]), self.rank, self.size
        own = r * m + iota(m)
        D = _rows_block([own if d is None else d for d in Ds])
        # sorted ancestors give nondecreasing lineages: their extremes are the end columns
        ends = D[:, ::m - 1] if self.sort_ancestors and m > 1 else D
        b = np.array(self.gather(mx.stack([mx.min(ends), mx.max(ends)]).astype(mx.int32)[None]))
        H = block_halo(b, m)
        # the steps in chunks whose largest array (the blocks extended by the halos, or every
        # process's blocks gathered) stays within BLOCK_ELEMENTS_MAX (one chunk unless huge)
        span = m if H == 0 else m + 2 * H if H <= m else size * m
        width = max(_row_elements(col[0]) for col in kept)
        c = max(1, BLOCK_ELEMENTS_MAX // (span * width))
        parts: list = [[] for _ in kept]
        for t0 in range(0, T, c):
            blocks = [_rows_block(col[t0:t0 + c]) for col in kept]
            Dc = D[t0:t0 + c] if c < T else D
            if H == 0:
                got = [take_rows_batched(x, Dc - r * m) for x in blocks]
            elif H <= m:
                got = self.gather_packed([mx.concatenate([x[:, :H], x[:, m - H:]], axis=1) for x in blocks])
                got = halo_take(blocks, Dc, got, r, size, H)
            else:
                got = full_take(blocks, Dc, self.gather_packed(blocks), size)
            for p, g in zip(parts, got):
                p.append(g)
        return [p[0] if len(p) == 1 else mx.concatenate(p, axis=0) for p in parts]

    def gather_packed(self, arrays: list) -> list:
        """All-gather of several arrays (each with the same shape in every process) in
        ONE collective: 4-byte-or-narrower dtypes are packed into one uint32 buffer (bit
        views); wider dtypes (64-bit) are gathered on their own. A buffer whose gathered
        length would pass MLX's 32-bit axis limit is split into several collectives; an
        array longer than that limit by itself is gathered alone in its own shape (e.g. the
        [K, m] ancestor blocks of a long run: [R·K, m]).
        Returns each array's concatenation over processes along axis 0."""
        out: list = [None] * len(arrays)
        groups, size, cap = [[]], 0, MAX_DIM // self.size
        for i, x in enumerate(arrays):
            if x.dtype in _WIDE:
                out[i] = self.gather(x)
                continue
            if x.size > cap:  # too long to flatten: gathered on its own, in its own shape
                out[i] = _from_u32(self.gather(_to_u32(x)), x.dtype)
                continue
            if groups[-1] and size + x.size > cap:
                groups.append([])
                size = 0
            groups[-1].append((i, _to_u32(x).reshape(-1)))
            size += x.size
        for group in groups:
            if not group:
                continue
            parts = [p for _, p in group]
            buf = self.gather(mx.concatenate(parts) if len(parts) > 1 else parts[0]).reshape(self.size, -1)
            off = 0
            for i, p in group:
                x, k = arrays[i], int(p.size)
                rows = buf[:, off:off + k].reshape((self.size * int(x.shape[0]),) + tuple(x.shape[1:]))
                out[i] = _from_u32(rows, x.dtype)
                off += k
        return out

    def _move(self, plan: "WindowPlan", leaves: list, idx: mx.array) -> list:
        """Rows ``idx`` of the sharded ``leaves`` by ``plan``: one packed collective."""
        r, m = self.rank, plan.m
        if plan.local:
            return gather_rows(leaves, idx - r * m)
        got = self.gather_packed([x if plan.full else plan.export(x, r) for x in leaves])
        return [plan.assemble(x, gx, idx, r) for x, gx in zip(leaves, got)]

    # -- particle movement ---------------------------------------------------------
    def compose(self, nxt: mx.array, c: mx.array) -> mx.array:
        """nxt[c] for sharded ancestor vectors (global rows)."""
        return self.take_rows([nxt], c)[0]

    def take_rows(self, leaves: list, idx: mx.array) -> list:
        """Rows ``idx`` (this process's slots' global source rows) of the global arrays
        whose block in this process is ``leaves`` (m rows each). Only windows of rows
        needed elsewhere cross processes (:class:`WindowPlan`); exact for any idx,
        cheapest for nondecreasing idx."""
        if not leaves:
            return []
        m = int(leaves[0].shape[0])
        plan = WindowPlan(np.array(self.gather(source_bounds(idx))), m)
        r = self.rank

        def move(x):
            if plan.local:
                return mx.take(x, idx - r * m, axis=0)
            buf = x if plan.full else plan.export(x, r)
            return plan.assemble(x, self.gather(buf), idx, r)

        return grouped_rows(leaves, _bool_safe(move))


class HaloLineage(Sequence):
    """The end-of-run lineages of :meth:`Shards.descent` from the neighbours' gathered
    halo edges ``E``: :meth:`rows` composes them with :func:`halo_compose` (one all-sum of
    the miss flag), as a list (``Ds[t]``) on first read; :meth:`paths` gives the kept
    arrays' paths by the halo-paths kernel without composing them. After a miss (counted
    in ``Shards.halo_misses``) both retry on halos 4× as wide (:meth:`widened`: a
    degenerate filter's lineages drift by a random walk of the per-resampling weight
    imbalances, past a fixed H) until the halos would cover a block; then the whole blocks
    are gathered (:meth:`rows`) or the MLX path takes over (:meth:`paths` returns None)."""

    def __init__(self, sh: "Shards", idxs: list, flags: list, E: mx.array, H: int):
        self.sh, self.idxs, self.flags, self.E, self.H = sh, list(idxs), list(flags), E, H
        self._rows = None

    def widened(self) -> "HaloLineage | None":
        """The same lineages on halos 4× as wide (the edges all-gathered again), or None
        when those would cover a whole block (the caller then gathers the blocks)."""
        m = int(self.idxs[self.flags.index(True)].shape[0])
        H = 4 * self.H
        if H >= m:
            return None
        ks = [t for t, f in enumerate(self.flags) if f]
        edges = mx.concatenate([x for t in ks for x in (self.idxs[t][:H], self.idxs[t][m - H:])])
        return HaloLineage(self.sh, self.idxs, self.flags, self.sh.gather(edges.reshape(len(ks), 2 * H)), H)

    def _missed(self, miss: mx.array) -> bool:
        """Whether some process's lineage left its halos (one all-sum; counted)."""
        if int(self.sh.all_sum(miss.astype(mx.int32)[None]).item()) > 0:
            Shards.halo_misses += 1
            return True
        return False

    def rows(self) -> list:
        if self._rows is None:
            sh = self.sh
            blocks = mx.stack([i for i, f in zip(self.idxs, self.flags) if f])
            Ds, miss = halo_compose(self.idxs, self.flags, blocks, self.E, sh.rank, sh.size, self.H,
                                    sh.sort_ancestors)
            if self._missed(miss):  # wider halos, else the whole blocks
                wide = self.widened()
                Ds = wide.rows() if wide is not None else sh._compose_full(self.idxs, self.flags, blocks)
            self._rows = Ds
        return self._rows

    def __getitem__(self, t):
        return self.rows()[t]

    def __len__(self) -> int:
        return len(self.idxs)

    def paths(self, kept: list) -> list | None:
        """Per kind [T, m, …] by the kernel, or None (not usable here, or a lineage left
        the halos: the caller takes the MLX path)."""
        sh, H, flags = self.sh, self.H, tuple(bool(f) for f in self.flags)
        if not paths_kernel.halo_usable(self.idxs, flags, kept):
            return None
        m = int(kept[0][0].shape[0])
        edges = [mx.concatenate([y for x in col for y in (x[:H], x[m - H:])]).reshape((len(col), 2 * H)
                                                                                     + tuple(col[0].shape[1:]))
                 for col in kept]
        EX = sh.gather_packed(edges)
        out, miss = paths_kernel.halo_paths(self.idxs, flags, self.E, kept, EX, sh.rank, sh.size, H)
        if self._missed(miss):  # wider halos (a few all-gathers of edges), else the MLX path
            wide = self.widened()
            return None if wide is None else wide.paths(kept)
        return out


def halo_compose(idxs: list, flags: list, blocks: mx.array, E: mx.array, r: int, R_: int, H: int,
                 sorted_rows: bool = False):
    """Process r's lineage rows D_t = a_t[D_{t+1}] composed on its block of every
    resampling's ancestors ``blocks`` [K, m] extended by the neighbours' edges: ``E``
    holds every process's first and last H entries of each block (all-gathered,
    [R·K, 2H]). Returns (Ds, miss): ``miss`` (a device bool) says that some lineage left
    the slots [r·m − H, (r + 1)·m + H), where Ds is then wrong (clipped). One compiled
    call per composition (:func:`_halo_step`); ``sorted_rows`` (every a_t nondecreasing,
    as sorted resampling gives, so every D_t is): the range test reads a lineage's first
    and last entries instead of reducing over it."""
    K, m = int(blocks.shape[0]), int(blocks.shape[1])
    E = E.reshape(R_, K, 2 * H)
    pad = mx.zeros((K, H), dtype=blocks.dtype)
    below = E[r - 1, :, H:] if r > 0 else pad  # slots [r·m − H, r·m) (none below rank 0)
    above = E[r + 1, :, :H] if r + 1 < R_ else pad  # slots [(r+1)·m, (r+1)·m + H)
    # slot s at column s − (r·m − H); in chunks of steps of at most BLOCK_ELEMENTS_MAX entries
    c = max(1, BLOCK_ELEMENTS_MAX // (m + 2 * H))
    ext = [mx.concatenate([below[j:j + c], blocks[j:j + c], above[j:j + c]], axis=1) for j in range(0, K, c)]
    payload = (r * m - H, m + 2 * H, bool(sorted_rows))
    Ds = [None] * len(idxs)
    D, j, miss = None, K - 1, mx.array(False)
    for t in reversed(range(len(idxs))):
        if flags[t]:
            if D is None:
                D = idxs[t]
            else:
                D, miss = cached_call(_halo_step, payload, payload, D, row(ext[j // c], j % c), miss)
            j -= 1
        Ds[t] = D
    return Ds, miss


def _halo_step(payload, D, a, miss):
    """One composition a[D − base] on an extended ancestor row ``a`` (columns [base,
    base + width) of the global slots), clipped into it; ``miss`` or'ed with "some entry
    of D lay outside"."""
    base, width, sorted_rows = payload
    rel = D - base
    lo, hi = (row(rel, 0), row(rel, -1)) if sorted_rows else (mx.min(rel), mx.max(rel))
    miss = mx.logical_or(miss, mx.logical_or(lo < 0, hi >= width))
    return take_rows(a, mx.clip(rel, 0, width - 1)), miss


def block_halo(bounds, m: int) -> int:
    """The smallest H ≥ 0 with every process q's source rows inside [q·m − H, (q+1)·m + H),
    from the gathered [min, max] of each process's rows ``bounds`` [R, 2]."""
    return max(0, max(max(q * m - int(lo), int(hi) + 1 - (q + 1) * m) for q, (lo, hi) in enumerate(bounds)))


def halo_take(blocks: list, D: mx.array, E: list, r: int, R_: int, H: int) -> list:
    """Process r's rows D [T, m] (global, inside [r·m − H, (r+1)·m + H), H ≤ m) of its
    blocks [T, m, …] extended by the neighbours' edges: ``E`` holds, per block, every
    process's first and last H rows of each step (all-gathered, [R·T, 2H, …])."""
    T, m = int(D.shape[0]), int(D.shape[1])
    rel = D - (r * m - H)  # row s at column s − (r·m − H) of the extended block
    out = []
    for x, e in zip(blocks, E):
        e = e.reshape((R_, T, 2 * H) + x.shape[2:])
        pad = mx.zeros((T, H) + x.shape[2:], dtype=x.dtype)
        below = e[r - 1, :, H:] if r > 0 else pad  # rows [r·m − H, r·m)
        above = e[r + 1, :, :H] if r + 1 < R_ else pad  # rows [(r+1)·m, (r+1)·m + H)
        ext = mx.concatenate([below, x, above], axis=1)
        out.append(take_rows_batched(ext, rel))
    return out


def full_take(blocks: list, D: mx.array, G: list, R_: int) -> list:
    """Rows D [T, m] (global) of the blocks [T, m, …] from ``G``, per block every
    process's block all-gathered ([R·T, m, …])."""
    T, m = int(D.shape[0]), int(D.shape[1])
    out = []
    for x, g in zip(blocks, G):
        g = mx.swapaxes(g.reshape((R_, T, m) + x.shape[2:]), 0, 1).reshape((T, R_ * m) + x.shape[2:])
        out.append(take_rows_batched(g, D))
    return out


def _row_elements(x: mx.array) -> int:
    """Elements per row (axis 0) of ``x``."""
    return int(np.prod(x.shape[1:], dtype=np.int64))


def source_bounds(idx: mx.array) -> mx.array:
    """[[min, max]] of a process's source rows (int32 [1, 2]), to be all-gathered."""
    return mx.stack([mx.min(idx), mx.max(idx)]).astype(mx.int32)[None]


class WindowPlan:
    """Which rows cross processes for a row gather, from the gathered [min, max] of every
    process's sources (``bounds`` [R, 2], identical everywhere) and the rows per process m.

    Process q exports the window ``low[q]`` of its rows needed by lower-ranked processes
    and ``high[q]`` of those needed by higher-ranked ones (hulls of the requested ranges
    within its rows), padded to the common widths WL, WH; gathered, process q's windows
    sit at [q·W, q·W + WL) and [q·W + WL, (q + 1)·W), W = WL + WH. ``local``: no process
    needs another's rows; ``full``: the windows would cover a shard, gather all rows."""

    def __init__(self, bounds, m: int):
        self.m = m
        R = len(bounds)
        lo, hi = [int(b[0]) for b in bounds], [int(b[1]) for b in bounds]
        low, high = [], []
        for q in range(R):
            q0, q1 = q * m, (q + 1) * m
            for dests, out in ((range(q), low), (range(q + 1, R), high)):
                hit = [d for d in dests if lo[d] < q1 and hi[d] >= q0]
                out.append((min(max(lo[d], q0) for d in hit) - q0,
                            max(min(hi[d] + 1, q1) for d in hit) - q0) if hit else (0, 0))
        self.WL = max(b - a for a, b in low)
        self.WH = max(b - a for a, b in high)
        self.local = self.WL + self.WH == 0
        self.full = self.WL + self.WH >= m
        # window starts, shifted down so that a padded window stays inside the rows
        self.ls = [min(a, m - self.WL) for a, _ in low]
        self.hs = [min(a, m - self.WH) for a, _ in high]

    def export(self, x: mx.array, q: int) -> mx.array:
        """Process q's windows of its rows ``x`` [m, …] ([WL + WH, …])."""
        return mx.concatenate([x[self.ls[q]:self.ls[q] + self.WL],
                               x[self.hs[q]:self.hs[q] + self.WH]], axis=0)

    def assemble(self, x: mx.array, gathered: mx.array, idx: mx.array, r: int) -> mx.array:
        """Process r's rows ``idx`` from its own rows ``x`` and the gathered windows (or,
        when ``full``, the gathered rows of every process)."""
        if self.full:
            return mx.take(gathered, idx, axis=0)
        m, W = self.m, self.WL + self.WH
        owner = idx // m
        loc = idx - owner * m
        base = m + owner * W
        ls = mx.array(self.ls, dtype=idx.dtype)
        hs = mx.array(self.hs, dtype=idx.dtype)
        pos = mx.where(owner == r, loc,
                       mx.where(owner < r, base + self.WL + loc - mx.take(hs, owner),
                                base + loc - mx.take(ls, owner)))
        return mx.take(mx.concatenate([x, gathered], axis=0), pos, axis=0)


class SegmentPlan:
    """Systematic offspring of process q fill the global slots [S_q, S_{q+1}) (its
    *segment*); process r's slots are its block [r·m, (r+1)·m). Process q exports the
    part of its segment below its block (to lower ranks, ``L[q]`` entries) and above it
    (``H[q]``), padded to WL, WH; every process then reads its block's sources from its
    own segment and the gathered windows."""

    def __init__(self, S: list, m: int):
        self.S, self.m = S, m
        R = len(S) - 1
        self.R = R
        self.L = [max(0, min(S[q + 1], q * m) - S[q]) for q in range(R)]
        self.H = [max(0, S[q + 1] - max(S[q], (q + 1) * m)) for q in range(R)]
        self.WL, self.WH = max(self.L), max(self.H)
        self.local = self.WL + self.WH == 0  # every segment is its own block

    def segment(self, pos: tuple, U: mx.array, q: int, fused: bool = False) -> mx.array:
        """Global source rows of process q's segment: the systematic ancestors of the
        global slots [S_q, S_{q+1}) among its particles, whose global slot positions are
        ``pos`` (:func:`_systematic_local`; ``fused``: the GPU search kernel)."""
        S = self.S
        n_q = S[q + 1] - S[q]
        return q * self.m + R.segment_ancestors(pos, U, S[q], n_q, S[-1], fused=fused)

    def export(self, seg: mx.array, q: int) -> mx.array:
        n_q = self.S[q + 1] - self.S[q]
        return mx.concatenate([_pad(seg[:self.L[q]], self.WL), _pad(seg[n_q - self.H[q]:], self.WH)])

    def assemble(self, seg: mx.array, gathered: mx.array, r: int) -> mx.array:
        return mx.take(mx.concatenate([seg, gathered]), self.positions(r), axis=0)

    def positions(self, r: int) -> mx.array:
        """Rows of ``concatenate([own segment rows, gathered windows])`` that fill
        process r's block, in slot order."""
        S, m, R_ = self.S, self.m, self.R
        n_r = S[r + 1] - S[r]
        j = r * m + mx.arange(m, dtype=mx.int32)
        owner = mx.sum(j[:, None] >= mx.array(S[1:R_], dtype=mx.int32)[None, :], axis=1).astype(mx.int32)
        starts = mx.array(S[:R_], dtype=mx.int32)
        hstarts = mx.array([max(S[q], (q + 1) * m) for q in range(R_)], dtype=mx.int32)
        base = n_r + owner * (self.WL + self.WH)
        return mx.where(owner == r, j - S[r],
                        mx.where(owner < r, base + self.WL + j - mx.take(hstarts, owner),
                                 base + j - mx.take(starts, owner)))


def _bool_safe(fn: Callable) -> Callable:
    """``fn`` on bool arrays through uint8 (NCCL has no bool type)."""
    def wrapped(x):
        if x.dtype != mx.bool_:
            return fn(x)
        return fn(x.astype(mx.uint8)).astype(mx.bool_)
    return wrapped


def _pad(x: mx.array, w: int) -> mx.array:
    if x.shape[0] >= w:
        return x
    return mx.concatenate([x, mx.zeros((w - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype)])


_WIDE = (mx.int64, mx.uint64, mx.float64, mx.complex64)
_AS_U32 = {mx.float32: None, mx.int32: None, mx.uint32: None, mx.float16: mx.float32,
           mx.bfloat16: mx.float32, mx.bool_: mx.uint32, mx.int8: mx.int32, mx.int16: mx.int32,
           mx.uint8: mx.uint32, mx.uint16: mx.uint32}


def _to_u32(x: mx.array) -> mx.array:
    """The bits of ``x`` as uint32 (narrower dtypes widened exactly first)."""
    via = _AS_U32[x.dtype]
    if via is not None:
        x = x.astype(via)
    return x if x.dtype == mx.uint32 else mx.view(x, mx.uint32)


def _from_u32(x: mx.array, dtype) -> mx.array:
    """Inverse of :func:`_to_u32`."""
    via = _AS_U32[dtype]
    if via is None:
        return x if dtype == mx.uint32 else mx.view(x, dtype)
    y = x if via == mx.uint32 else mx.view(x, via)
    return y != 0 if dtype == mx.bool_ else y.astype(dtype)


def _systematic_head(payload, key, lw, stats):
    """:func:`_systematic_local` with N(B) and the decision in one int array [R + 2]
    (read by the host at once): (ESS, did, new lw, head, counts)."""
    ess, did, new_lw, Nb, pos, U = _systematic_local(payload, key, lw, stats)
    return ess, did, new_lw, mx.concatenate([Nb, did.astype(mx.int32)[None]]), pos, U


def _resample_global(payload, key, glw):
    """Non-systematic schemes on the gathered log-weights: ((global ancestors [n],
    [R·2 + 1] every block's [min, max] of its sources and the decision), new global lw,
    ESS, did)."""
    scheme, threshold, Rk, sort = payload
    idx, glw, ess, did = _resample((scheme, threshold), key, glw)
    if sort:
        idx = mx.sort(idx)  # the same multiset of ancestors; sorted ones move least
    blocks = idx.reshape(Rk, -1)
    head = mx.concatenate([mx.stack([mx.min(blocks, axis=1), mx.max(blocks, axis=1)], axis=1).reshape(-1),
                           did.astype(mx.int32)[None]]).astype(mx.int32)
    return (idx, head), glw, ess, did


def _systematic_local(payload, key, lw, stats):
    """Systematic resampling's global offspring counts of this process's particles, on
    slot positions (the global CDF in units of the n slots, as int32 + float32 fraction).

    With per-process log-sums ℓ_q = logsumexp(lw^(q)) (``stats[:, 0]``), the process
    boundaries P_q = n · Σ_{p<q} e^{ℓ_p} / Σ_p e^{ℓ_p} (P_0 = 0, P_R = n exactly;
    :func:`~genmlx.inference.prefix_sums.slot_positions` of the R masses, computed
    identically everywhere from the gathered scalars) and process r's particles at
    X_i = P_r + (P_{r+1} − P_r) c_i, c its local normalised CDF, the last exactly P_{r+1}
    (the positions kernel in double on CUDA, ``fused``; else
    :func:`~genmlx.inference.prefix_sums.slot_positions`). The number of systematic points j + U, j < n, at or below X is
    N(X) = ⌊X⌋ + [U ≤ frac X] (``_points_below``); the counts telescope across processes
    to n, and process r's offspring fill the global slots [N(P_r), N(P_{r+1})) (their
    ancestors: :meth:`SegmentPlan.segment` from the positions and U). A float32 global
    CDF would resolve only n < 2^24 slots. ``payload`` = (R, r, threshold, fused). Returns
    (ESS, did, new lw, N(P) [R+1], positions (I [m], F [m]), U)."""
    Rk, r, threshold, fused = payload
    m = lw.shape[0]
    n = Rk * m
    lse, lse2 = stats[:, 0], stats[:, 1]
    LSE = mx.logsumexp(lse)
    ess = mx.exp(2 * LSE - mx.logsumexp(lse2))
    did = ess < threshold * n
    ok = LSE > -mx.inf  # all particles impossible: resample uniformly (as _safe_logits)
    W = mx.where(ok, mx.exp(lse - LSE), mx.ones_like(lse))
    bi, bf = slot_positions(W, n)
    Pi = mx.concatenate([mx.zeros((1,), mx.int32), bi])
    Pf = mx.concatenate([mx.zeros((1,), mx.float32), bf])
    ends = (Pi[r:r + 2], Pf[r:r + 2])
    pos = _local_positions(lw, ends, fused)
    U = mx.random.uniform(shape=(), key=key)
    Nb = R._points_below(Pi, Pf, U, n)
    Nb = mx.concatenate([mx.zeros((1,), mx.int32), Nb[1:Rk], mx.array([n], dtype=mx.int32)])
    new_lw = mx.where(did, mx.broadcast_to(LSE - math.log(n), lw.shape), lw)
    return ess, did, new_lw, Nb, pos, U


#: compile the sync-free step with its two collectives as ONE function (False: the
#: collectives run between two compiled halves)
COMPILE_COLLECTIVES = True


def halo_width(m: int) -> int:
    """H, the slots of each resampling's ancestor block a process borrows from each
    neighbour for the end-of-run descent (:meth:`Shards.descent`): lineages drift from
    their block by the weight imbalance between processes summed over the resamplings, a
    few CV·√(q·m) slots each. Tests replace this function to force misses."""
    return min(m, max(4096, m // 128))


def window_width(m: int, processes: int = 2) -> int:
    """W, the sync-free step's window width in slots (m particles per process, R =
    ``processes``, n = R·m): process q's offspring may reach W slots past either end of
    its block before the step overflows (:func:`_sync_free_search`) and the run is redone
    on the exact path (the same result, about twice the time). A segment end N(B_q) moves
    from q·m by n·(F_q − q/R) (F_q: the normalized weight of the blocks below q), whose sd
    is CV·√(n·(q/R)(1 − q/R)) ≤ CV·√n / 2 for exchangeable particles (CV² = n/ESS − 1, ≥ 1
    on a resampling step; the scalar linear-Gaussian SSM's resamplings follow it: rms
    1.03 sd, CV ≤ 5). The CV is the model's, and degenerate filters shift further than
    that sd (copies of one ancestor sit side by side: simulated SSMs with 4 coordinates,
    CV up to 19, rms 1.75 sd; 8 coordinates, CV up to 430, rms 3.8 sd). W = max(32·√n,
    m/64) holds ≥ 64/CV of those sd's at every size, and more at large m, where m/64 >
    32·√n: narrower windows there measured no faster on 2 H200s (the window gather's cost
    is its latency; 16·√n: sharded run 196 vs 198 ms at m = 1.5·10⁷). The step searches
    and moves 2W more slots than its block and exports 2W rows per process. At least 4096
    slots, at most m. Tests replace this function to force overflows."""
    return min(m, max(4096, m // 64, math.ceil(32.0 * math.sqrt(processes * m))))


def _sync_free_step(payload, key, lw, stats, leaves):
    """The sync-free systematic step of one process (payload = (Shards, R, r, threshold,
    fused, W)): gather the R·2 summaries, search the window slots
    (:func:`_sync_free_search`), gather every process's 2W exported rows in one packed
    collective, assemble the block (:func:`_sync_free_assemble`). Fixed shapes, no host
    value: (carry leaves, idx, new lw, ESS, did, overflow)."""
    sh, W = payload[0], payload[5]
    g = sh.gather(stats.reshape(1, 2))
    ess, did, new_lw, Nb, ovf, mid, export = _sync_free_search(payload, key, lw, g, leaves)
    got = sh.gather_packed(export) if W else []
    moved, idx = _sync_free_assemble(payload, did, Nb, mid, leaves, got)
    return moved, idx, new_lw, ess, did, ovf


def _sync_free_search(payload, key, lw, g, leaves):
    """Process r's systematic ancestors for the fixed slot run [r·m − W, (r + 1)·m + W)
    (:func:`R.window_ancestors`: bit for bit those of :meth:`SegmentPlan.segment` on the
    slots of r's segment [N(B_r), N(B_{r+1})), the rest masked later). Its exports: the
    source rows and carry rows of the W slots below and the W above its block (for the
    processes there). ``overflow`` = did ∧ ∃ q with a nonempty segment reaching past its
    windows, N(B_{q+1}) > (q + 1)·m + W or N(B_q) < q·m − W: computed from the gathered
    N(B), so identical in every process. Returns (ESS, did, new lw, N(B), overflow, the
    local source rows of the own block [m], exports [source rows [2W], carry rows
    [2W, …] …])."""
    _, Rk, r, threshold, fused, W = payload
    m = lw.shape[0]
    ess, did, new_lw, Nb, pos, U = _systematic_local((Rk, r, threshold, fused), key, lw, g)
    loc = R.window_ancestors(pos, U, r * m - W, m + 2 * W, Rk * m, fused=fused)
    q = mx.arange(Rk, dtype=mx.int32)
    lo, hi = Nb[:-1], Nb[1:]
    past = mx.logical_or(hi > (q + 1) * m + W, lo < q * m - W)
    ovf = mx.logical_and(did, mx.any(mx.logical_and(hi > lo, past)))
    # indices into the own rows: clipped where they are read (the block's inside the
    # assembly's elementwise kernel, the windows' here), not in a pass of their own
    win = mx.clip(mx.concatenate([loc[:W], loc[W + m:]]), 0, m - 1)
    export = [win + r * m] + [mx.take(x, win, axis=0) for x in leaves] if W else []
    return ess, did, new_lw, Nb, ovf, mx.clip(loc[W:W + m], 0, m - 1), export


def _sync_free_assemble(payload, did, Nb, mid, leaves, got):
    """Process r's block from its own search (``mid``) and the gathered windows ``got``
    ([R·2W] sources, then each leaf's [R·2W, …] rows). Slot j = r·m + i has owner
    p = #{q ≥ 1 : N(B_q) ≤ j}: p = r its own row; p < r row j − (p + 1)·m of p's high
    window; p > r row j − (p·m − W) of p's low window (clipped: out of the windows only
    where the step overflowed). Where did is false: the identity (idx = j, old rows).
    Every slot's source is a row of [own rows; gathered windows] (``pos``), read by a
    two-source gather (no concatenation); its global source row is r·m + pos for an own
    row, computed with ``pos``, and the gathered source row for a window's, read only for
    the first and last W slots (when 2W < m)."""
    _, Rk, r, _, _, W = payload
    m = mid.shape[0]
    i = iota(m)
    j = r * m + i
    if W == 0:  # one process: the segment is the block
        pos = mx.where(did, mid, i)
        return [take_rows(x, pos) for x in leaves], r * m + pos
    p = (j >= row(Nb, 1)).astype(mx.int32)  # elementwise over the R − 1 boundaries (fuses)
    for q in range(2, Rk):
        p = p + (j >= row(Nb, q)).astype(mx.int32)
    off = mx.where(p < r, W + j - (p + 1) * m, j - (p * m - W))
    pos = mx.where(p == r, mid, m + p * (2 * W) + mx.clip(off, 0, 2 * W - 1))
    pos = mx.where(did, pos, i)
    if 2 * W < m:  # r·m + pos, then the slots filled from the windows, which lie in the
        # block's first and last W slots (elsewhere only where the step overflowed)
        idx = r * m + pos
        idx[:W] = identity_or_rows(r * m, m, got[0], pos[:W])
        idx[m - W:] = identity_or_rows(r * m, m, got[0], pos[m - W:])
    else:
        idx = identity_or_rows(r * m, m, got[0], pos)
    moved = [take_rows2(x, gx, pos) for x, gx in zip(leaves, got[1:])]
    return moved, idx


def _local_positions(lw: mx.array, ends: tuple, fused: bool) -> tuple:
    """Global slot positions of this process's particles from ends[0] (before the first)
    to ends[1] (the last, exactly), ``ends`` = (int parts [2], fractions [2]), in
    proportion to its weights' running sums (uniform when every local weight is −inf,
    as the kernel and ``resampling._weights`` both do): the CUDA positions kernel
    (``fused``; double accumulation) or
    :func:`~genmlx.inference.prefix_sums.slot_positions`."""
    if fused:
        from genmlx.kernels.resample import positions_kernel

        return positions_kernel(lw, ends)
    w = R._weights(lw)
    return slot_positions(w, (ends[0][1], ends[1][1]), (ends[0][0], ends[1][0]))


def _fused(lw: mx.array) -> bool:
    """Whether the sharded systematic step runs its scan and search as CUDA kernels."""
    return _K.use_kernel(lw) == "cuda"


def shards_for(group: Any = None, n: int | None = None, who: str = "sharded") -> Shards | None:
    """The :class:`Shards` of ``group`` (default: ``genmlx.distributed.world()``), or None when
    it has a single process. Checks that n is divisible by the number of processes."""
    if group is None:
        group = world() if mx.distributed.is_available() else None
    if group is None or group.size() == 1:
        return None
    sh = Shards(group)
    if n is not None and (not isinstance(n, int) or n < 1 or n % sh.size):
        raise ValueError(f"{who}: n = {n!r} particles must be a positive multiple of the "
                         f"number of processes ({sh.size})")
    return sh


# -- results -----------------------------------------------------------------------------
class _Sharded:
    """Global views of sharded weighted particles: ``traces``/``log_weights`` are this
    process's n/R particles; ``global_log_weights`` [n] is identical in every process."""

    global_log_weights: mx.array
    shards: Shards

    @property
    def n_total(self) -> int:
        return int(self.global_log_weights.shape[0])

    @property
    def log_marginal_likelihood(self) -> mx.array:
        """log Ẑ = logsumexp over all processes' weights − log n."""
        return R.log_mean_exp(self.global_log_weights)

    @property
    def ess(self) -> mx.array:
        return R.effective_sample_size(self.global_log_weights)

    @property
    def normalized_weights(self) -> mx.array:
        """The global normalised weights w̄_i of this process's particles [n/R]."""
        return self.shards.local(R.normalized_weights(self.global_log_weights))

    def estimate(self, fn) -> mx.array:
        """Σ_i w̄_i f(x_i) over all n particles (local sums, all-summed)."""
        return self.shards.all_sum(WeightedParticles.estimate(self, fn))

    def resample(self, key: mx.array, m: int | None = None, scheme: str = "multinomial") -> Trace:
        """m global draws ∝ weight (``key`` shared by all processes); this process gets
        draws [rank·m/R, (rank+1)·m/R) as a batched trace."""
        self._need_traces()
        m = self.n_total if m is None else m
        if m % self.shards.size:
            raise ValueError(f"resample: m = {m} draws must be a multiple of the number of "
                             f"processes ({self.shards.size})")
        idx = R.resample_indices(key, self.global_log_weights, m, scheme)
        if scheme not in _SORTED_SCHEMES:
            idx = mx.sort(idx)
        return _take_global(self.shards, self.traces, self.shards.local(idx))


def _take_global(sh: Shards, traces: Trace, idx: mx.array) -> Trace:
    """The batched trace of global particles ``idx`` (this process's slots)."""
    leaves, td = flatten_particles(traces)
    return rebuild_particles(td, sh.take_rows(leaves, idx), traces.args, int(idx.shape[0]))


@dataclass(frozen=True)
class ShardedParticles(_Sharded, WeightedParticles):
    """Importance-sampling result of one process (see :class:`_Sharded`)."""

    global_log_weights: mx.array = None
    shards: Shards = None


@dataclass(frozen=True)
class ShardedSMCResult(_Sharded, SMCResult):
    """SMC result of one process: local particles, global weights, global ESS history
    and resampling flags, and ``ancestors``: for each resampling, the global source rows
    of this process's slots (its block of the global ancestor vector)."""

    global_log_weights: mx.array = None
    shards: Shards = None
    ancestors: tuple = ()


# -- algorithms ----------------------------------------------------------------------------
def sharded_importance_sampling(key: mx.array, model: GenerativeFunction, args: tuple, observations,
                                n: int, proposal: GenerativeFunction | None = None, group: Any = None,
                                *, proposal_args: tuple | None = None, chunk_size: int | None = None,
                                keep_traces: bool = True, compile: bool = True) -> WeightedParticles:
    """Importance sampling with n particles in total, n/R in each of the R processes of
    ``group`` (weights as in :func:`importance_sampling`). Returns a
    :class:`ShardedParticles` (global log Ẑ, ESS, normalised weights; local traces), or
    the single-process result when the group has one process."""
    sh = shards_for(group, n, "sharded_importance_sampling")
    if sh is None:
        return importance_sampling(key, model, args, observations, n, proposal, proposal_args,
                                   chunk_size=chunk_size, keep_traces=keep_traces, compile=compile)
    res = importance_sampling(sh.local_key(key), model, args, observations, n // sh.size, proposal,
                              proposal_args, chunk_size=chunk_size, keep_traces=keep_traces,
                              compile=compile)
    glw = sh.gather(res.log_weights)
    mx.eval(glw)
    return ShardedParticles(res.traces, res.log_weights, glw, sh)


def sharded_importance_resampling(key: mx.array, model: GenerativeFunction, args: tuple, observations,
                                  n: int, proposal: GenerativeFunction | None = None, group: Any = None,
                                  *, proposal_args: tuple | None = None, m: int | None = None,
                                  scheme: str = "multinomial", chunk_size: int | None = None,
                                  compile: bool = True) -> tuple[Trace, mx.array]:
    """Sampling importance resampling over sharded particles: global ancestors from the
    gathered weights with a key shared by all processes; returns ``(trace, log Ẑ)`` with
    the same single trace in every process when ``m`` is None, else this process's m/R
    of the m draws (a batched trace)."""
    sh = shards_for(group, n, "sharded_importance_resampling")
    if sh is None:
        return importance_resampling(key, model, args, observations, n, proposal, proposal_args,
                                     m=m, scheme=scheme, chunk_size=chunk_size, compile=compile)
    k_is, k_res = mx.random.split(key)
    res = sharded_importance_sampling(k_is, model, args, observations, n, proposal, sh.group,
                                      proposal_args=proposal_args, chunk_size=chunk_size,
                                      compile=compile)
    if m is None:
        idx = R.resample_indices(k_res, res.global_log_weights, 1, scheme)
        tr = _take_global(sh, res.traces, idx)
        return unbatch(tr, 0), res.log_marginal_likelihood
    return res.resample(k_res, m, scheme), res.log_marginal_likelihood


def sharded_smc(key: mx.array, model: GenerativeFunction, args: tuple, observations, n: int, *,
                proposal: GenerativeFunction | None = None, proposal_args: tuple = (),
                resampling: str | Callable = "systematic", ess_threshold: float = 0.5,
                rejuvenation: Callable | None = None,
                step_args: Callable[[int], tuple] | None = None,
                callback: Callable[[int, Trace, mx.array], None] | None = None,
                progress: bool = True, compile: bool = True, group: Any = None) -> SMCResult:
    """:func:`~genmlx.inference.smc.smc` with n particles in total, n/R per process of
    ``group``; the ESS test, resampling and log Ẑ are global (module docstring).
    ``rejuvenation(key, traces)`` and ``callback(t, traces, log_weights)`` see this
    process's particles (and local log-weights). ``gm.Unfold``/``gm.Scan`` models with
    the prior as proposal take the fused path (module docstring: with systematic
    resampling two collectives per step and no host read until the end of the run;
    ``Shards.sync_free = False`` for the exact path); ``compile`` (default True, as
    ``smc``) compiles the step. Returns a :class:`ShardedSMCResult`, or the single-process
    :class:`SMCResult` when the group has one process (then this is ``smc`` itself)."""
    kw = dict(proposal=proposal, proposal_args=proposal_args, resampling=resampling,
              ess_threshold=ess_threshold, rejuvenation=rejuvenation, step_args=step_args,
              callback=callback, compile=compile)
    sh = shards_for(group, n, "sharded_smc")
    if sh is None:
        return smc(key, model, args, observations, n, progress=progress, **kw)
    sh.sort_ancestors = not (isinstance(resampling, str) and resampling in _SORTED_SCHEMES)
    out = run_smc(key, model, args, observations, n // sh.size, comm=sh,
                  progress=progress and sh.rank == 0, **kw)
    return ShardedSMCResult(out.traces, out.log_weights, out.ess_history, out.resampled,
                            out.global_log_weights, sh, out.ancestors)
