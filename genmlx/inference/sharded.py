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

Global resampling and particle movement. Ancestors a [m] are drawn by the chosen
scheme from the gathered weights with the shared key (identical in every process, so
the resampling is exactly the single-process one applied to the global particle set);
process r's new particles are global slots a[r·m/R : (r+1)·m/R]. Only rows owned by
another process move (:meth:`Shards.take_rows`): every process knows a, hence for every
destination block the range [min, max] of its sources; process q exports one window
of its rows needed by lower-ranked and one needed by higher-ranked processes (the hulls
of those ranges, padded to the common widths W_lo, W_hi), all windows are all-gathered
([R · (W_lo + W_hi)] rows) and each process gathers its slots from its own rows and the
windows. This is exact for any a. With sorted ancestors (systematic, stratified and
residual are sorted; multinomial ones are sorted here, which leaves the resampled
multiset unchanged) each block's sources are contiguous and the windows hold only the
particles that change process: roughly the weight imbalance between processes, not
the particle state. When the windows would cover a whole shard, the shard is gathered.

SMC. As :func:`~genmlx.inference.smc.smc` (the loop is shared: ``smc.run_smc``): each
step extends and reweights the local particles (no communication), all-gathers the
log-weights, and every process runs the same compiled ESS test and resampling on the
same global weights with the same key — so all processes agree on whether to resample
and on the global ancestor vector, and the log-weights after resampling are the global
log-mean weight. The global particle system is therefore exactly a single-process SMC
with n particles (for a given realisation of the per-process draws), and
log Ẑ = logsumexp(lw_T) − log n is the usual unbiased (in Ẑ) estimate. For
``gm.Unfold``/``gm.Scan`` traces a resampling moves only the last step and the score
(the lazy ancestry of ``smc``); the earlier steps are moved once, when the full traces
are resolved at the end (or for rejuvenation/callbacks/proposals), with the composed
ancestor vectors — still sorted, so again only the boundary particles move.

Communication per step: n log-weights (all-gather) and, on resampling, the moved rows
of the last step. The resampling itself (O(n)) is computed redundantly in every
process; its cost is a small fraction of the particle extension for trace-based models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from genmlx.core.gfi import GenerativeFunction
from genmlx.distributed import fold_rank, world
from genmlx.core.trace import Trace
from genmlx.core.vectorize import unbatch
from genmlx.inference import resampling as R
from genmlx.inference._util import cached_call, flatten_particles, gather_rows, rebuild_particles
from genmlx.inference.importance import importance_resampling, importance_sampling
from genmlx.inference.particles import WeightedParticles
from genmlx.inference.smc import SMCResult, _resample, run_smc, smc

_SORTED_SCHEMES = ("systematic", "stratified", "residual")


class Shards:
    """The particle sharding over an ``mx.distributed`` group of R > 1 processes: key
    folding, weight gathering and cross-process row gathers."""

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
        return mx.distributed.all_gather(x, group=self.group)

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
        stats = self.gather(mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)])[None])
        payload = (self.size, self.rank, threshold)
        ess, did, new_lw, Nb, counts = cached_call(_systematic_local, payload, payload, key, lw, stats)
        mx.eval(ess, did, Nb)
        if not bool(did.item()):
            return self.rank * m + mx.arange(m, dtype=mx.int32), new_lw, ess, did
        S = [int(v) for v in np.array(Nb)]
        n_r = S[self.rank + 1] - S[self.rank]
        seg = self.rank * m + (R.indices_from_counts(counts, n_r) if n_r else mx.zeros((0,), mx.int32))
        return self._segments_to_slots(seg, S, m), new_lw, ess, did

    def _segments_to_slots(self, seg: mx.array, S: list, m: int) -> mx.array:
        """Process q holds the sources of the global slots [S_q, S_{q+1}) (``seg`` here);
        return the sources of this process's slots [r·m, (r+1)·m). Process q exports the
        part of its segment below its own block (to lower ranks) and above it (to higher
        ranks); those windows are all-gathered."""
        Rk, r = self.size, self.rank
        L = [max(0, min(S[q + 1], q * m) - S[q]) for q in range(Rk)]
        H = [max(0, S[q + 1] - max(S[q], (q + 1) * m)) for q in range(Rk)]
        WL, WH = max(L), max(H)
        if WL + WH == 0:  # every segment is its process's own block
            return seg
        n_r = S[r + 1] - S[r]
        buf = mx.concatenate([_pad(seg[:L[r]], WL), _pad(seg[n_r - H[r]:], WH)])
        table = mx.concatenate([seg, self.gather(buf)])
        j = r * m + mx.arange(m, dtype=mx.int32)
        owner = mx.sum(j[:, None] >= mx.array(S[1:Rk], dtype=mx.int32)[None, :], axis=1).astype(mx.int32)
        starts = mx.array(S[:Rk], dtype=mx.int32)
        hstarts = mx.array([max(S[q], (q + 1) * m) for q in range(Rk)], dtype=mx.int32)
        base = n_r + owner * (WL + WH)
        pos = mx.where(owner == r, j - S[r],
                       mx.where(owner < r, base + WL + j - mx.take(hstarts, owner),
                                base + j - mx.take(starts, owner)))
        return mx.take(table, pos)

    # -- particle movement ---------------------------------------------------------
    def compose(self, nxt: mx.array, c: mx.array) -> mx.array:
        """nxt[c] for sharded ancestor vectors (global rows)."""
        return self.take_rows([nxt], c)[0]

    def take_rows(self, leaves: list, idx: mx.array) -> list:
        """Rows ``idx`` (this process's slots' global source rows) of the global arrays
        whose block in this process is ``leaves`` (m rows each). Only windows of rows
        needed elsewhere cross processes (see the module docstring); exact for any idx,
        cheapest for nondecreasing idx."""
        if not leaves:
            return []
        Rk, r = self.size, self.rank
        m = int(leaves[0].shape[0])
        bounds = np.array(self.gather(mx.stack([mx.min(idx), mx.max(idx)]).astype(mx.int32)[None]))
        lo_s, hi_s = [int(v) for v in bounds[:, 0]], [int(v) for v in bounds[:, 1]]
        low, high = [], []  # per exporter q: (start, stop) local rows needed by d < q / d > q
        for q in range(Rk):
            q0, q1 = q * m, (q + 1) * m
            for dests, out in ((range(q), low), (range(q + 1, Rk), high)):
                hit = [d for d in dests if lo_s[d] < q1 and hi_s[d] >= q0]
                out.append((min(max(lo_s[d], q0) for d in hit) - q0,
                            max(min(hi_s[d] + 1, q1) for d in hit) - q0) if hit else (0, 0))
        WL = max(b - a for a, b in low)
        WH = max(b - a for a, b in high)
        owner = idx // m
        loc = idx - owner * m
        if WL + WH == 0:  # every source is local
            return gather_rows(leaves, loc)
        full = WL + WH >= m
        if full:
            pos = idx  # rows of the gathered global arrays
        else:
            ls = mx.array([min(a, m - WL) for a, _ in low], dtype=idx.dtype)
            hs = mx.array([min(a, m - WH) for a, _ in high], dtype=idx.dtype)
            base = m + owner * (WL + WH)
            pos = mx.where(owner == r, loc,
                           mx.where(owner < r, base + WL + loc - mx.take(hs, owner),
                                    base + loc - mx.take(ls, owner)))
            l0, h0 = min(low[r][0], m - WL), min(high[r][0], m - WH)

        def move(x):
            cast = x.dtype == mx.bool_
            y = x.astype(mx.uint8) if cast else x
            if full:
                table = self.gather(y)
            else:
                buf = mx.concatenate([y[l0:l0 + WL], y[h0:h0 + WH]], axis=0)
                table = mx.concatenate([y, self.gather(buf)], axis=0)
            out = mx.take(table, pos, axis=0)
            return out.astype(mx.bool_) if cast else out

        return _grouped(leaves, move)


def _pad(x: mx.array, w: int) -> mx.array:
    if x.shape[0] >= w:
        return x
    return mx.concatenate([x, mx.zeros((w - x.shape[0],), dtype=x.dtype)])


def _systematic_local(payload, key, lw, stats):
    """Systematic resampling's global offspring counts of this process's particles.

    With per-process log-sums ℓ_q = logsumexp(lw^(q)) (``stats[:, 0]``), the global CDF
    at local particle i of process r is C = B_r + (B_{r+1} − B_r) c_i with the process
    boundaries B_q = Σ_{p<q} e^{ℓ_p} / Σ_p e^{ℓ_p} (computed identically everywhere from
    the gathered scalars) and the local normalised CDF c. The number of systematic
    points u_j = (j + U)/n, j < n, at or below C is N(C) (``strata_counts``); particle
    i's count is N(C_i) − N(C_{i−1}), with C_{−1} = B_r and the last C set to B_{r+1}
    exactly, so the counts of all processes telescope to N(1) − N(0) = n and process r's
    offspring fill the global slots [N(B_r), N(B_{r+1})). Returns (ESS, did, new lw,
    N(B) [R+1], counts [m])."""
    Rk, r, threshold = payload
    m = lw.shape[0]
    n = Rk * m
    lse, lse2 = stats[:, 0], stats[:, 1]
    LSE = mx.logsumexp(lse)
    ess = mx.exp(2 * LSE - mx.logsumexp(lse2))
    did = ess < threshold * n
    ok = LSE > -mx.inf  # all particles impossible: resample uniformly (as _safe_logits)
    W = mx.where(ok, mx.exp(lse - LSE), mx.ones_like(lse))
    B = mx.concatenate([mx.zeros((1,)), mx.cumsum(W)])
    B = B / B[-1]
    own = mx.where(ok, lse[r], mx.array(0.0))
    w = mx.where(own > -mx.inf, mx.exp(lw - own), mx.ones_like(lw))
    c = mx.cumsum(w)
    c = c / c[-1]
    C = B[r] + (B[r + 1] - B[r]) * c
    C = mx.concatenate([C[:-1], B[r + 1:r + 2]])
    U = mx.random.uniform(shape=(), key=key)
    Nb = R.strata_counts(B, U, n)
    Nb = mx.concatenate([mx.zeros((1,), mx.int32), Nb[1:Rk], mx.array([n], dtype=mx.int32)])
    Nc = R.strata_counts(C, U, n)
    Nc = mx.concatenate([Nc[:-1], Nb[r + 1:r + 2]])
    counts = Nc - mx.concatenate([Nb[r:r + 1], Nc[:-1]])
    new_lw = mx.where(did, mx.broadcast_to(LSE - math.log(n), lw.shape), lw)
    return ess, did, new_lw, Nb, counts


def _grouped(leaves: list, fn: Callable) -> list:
    """Apply a row-wise ``fn`` to the leaves with leaves of one dtype and row shape
    stacked along axis 1 (one collective per group instead of one per leaf)."""
    groups: dict = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.dtype, tuple(x.shape[1:])), []).append(i)
    out = [None] * len(leaves)
    for ids in groups.values():
        if len(ids) == 1:
            out[ids[0]] = fn(leaves[ids[0]])
            continue
        big = fn(mx.stack([leaves[i] for i in ids], axis=1))
        for j, i in enumerate(ids):
            out[i] = big[:, j]
    return out


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
    and resampling flags, and ``ancestors`` (the global ancestor vector [n] of each
    resampling, identical in every process)."""

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
                progress: bool = True, compile: bool = False, group: Any = None) -> SMCResult:
    """:func:`~genmlx.inference.smc.smc` with n particles in total, n/R per process of
    ``group``; the ESS test, resampling and log Ẑ are global (module docstring).
    ``rejuvenation(key, traces)`` and ``callback(t, traces, log_weights)`` see this
    process's particles (and local log-weights). Returns a :class:`ShardedSMCResult`,
    or the single-process :class:`SMCResult` when the group has one process."""
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
