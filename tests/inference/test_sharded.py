"""Particle-parallel IS and SMC (genmlx.inference.sharded).

In-process: with no group (a single process) the sharded functions are the
single-process ones; bad n is rejected; the movement plans and the local systematic
counts are checked for R = 2, 3, 4 simulated processes. Two processes (on the CPU: the
ring backend moves host memory; the package code itself is device-neutral): one ``mlx.launch -n 2 --backend
ring`` run of the worker below (written to a temporary file) checks, against exact
oracles, the normal-normal posterior mean and log p(y) of sharded IS (3.5 delta-method
standard errors), SMC's Ẑ on a linear-Gaussian SSM against the Kalman likelihood (mean
of exp(log Ẑ − log Z) over repeats within 3.5 SE of 1), that global weights, ESS,
log Ẑ and ancestor vectors are bitwise identical on both ranks, that every particle
movement equals the gather-everything reference, and that resolved SMC traces are
coherent (each particle's score equals the log joint of its own path).

The fused sharded SMC path (``Shards.step_resample`` / ``descent`` / ``take_rows_each``):
on a group of one process it draws exactly what ``smc`` draws (every scheme); on two
processes the sync-free systematic step makes two collectives every time step, the exact
path and the other schemes ONE without a resampling and at most two with one (counted by
wrapping ``mx.distributed``'s collectives), the cross-process row gathers equal the
gather-everything reference, and the rebuilt paths are coherent. The sync-free step
equals the exact path bit for bit (several seeds, forced small windows), tiny windows
overflow into a rerun on the exact path, and its time loop makes no host read (counted
by wrapping the array-to-host conversions); on R = 2, 3, 4 virtual processes its windows
give R.systematic's ancestors and the overflow flag is exact.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from genmlx.harness.zoo.ssm import kalman_filter
from genmlx.inference.sharded import SegmentPlan, WindowPlan, _systematic_local, source_bounds, window_width
from genmlx.inference import (
    importance_resampling,
    importance_sampling,
    sharded_importance_resampling,
    sharded_importance_sampling,
    sharded_smc,
    smc,
)

REPO = Path(__file__).resolve().parents[2]

# --- models (also used by the worker) ---------------------------------------------
MU0, S0, SY = 0.3, 1.0, 0.5
Y_NN = [0.9, 1.4, 0.6, 1.2]
A, Q, RR = 0.8, 1.0, 0.7
YS = [0.4, 1.1, 0.3, -0.8, 0.9, 1.6, 0.2, -0.3]


def normal_normal_exact():
    """Posterior mean of mu and log p(y) for mu ~ N(MU0, S0), y_i ~ N(mu, SY)."""
    y = np.array(Y_NN)
    k = len(y)
    prec = 1 / S0**2 + k / SY**2
    mean = (MU0 / S0**2 + y.sum() / SY**2) / prec
    cov = SY**2 * np.eye(k) + S0**2 * np.ones((k, k))
    d = y - MU0
    _, logdet = np.linalg.slogdet(cov)
    logp = -0.5 * (k * math.log(2 * math.pi) + logdet + d @ np.linalg.solve(cov, d))
    return mean, logp


@gm.gen
def ssm_step(t, x, a, q, r):
    """The linear-Gaussian state-space step of the in-process SMC tests (the worker script
    defines its own)."""
    x = gm.trace("x", gm.normal(a * x, q))
    gm.trace("y", gm.normal(x, r))
    return x


def kalman_loglik(ys):
    return kalman_filter(ys, A, Q, RR, 0.0)[0]


WORKER = r'''
import json, math, sys
import genmlx as gm
import mlx.core as mx
import numpy as np
from genmlx.inference import sharded_importance_sampling, sharded_importance_resampling, sharded_smc
from genmlx.inference.sharded import shards_for
from tests.inference.test_sharded import MU0, S0, SY, Y_NN, A, Q, RR, YS

out_dir = sys.argv[1]
# the ring backend moves host memory: keep this correctness run on the CPU even where
# MLX's default device is a GPU (GPU runs use NCCL: benchmarks/scale_smc.py)
mx.set_default_device(mx.cpu)
g = mx.distributed.init()
sh = shards_for(g)
rank = g.rank()
res = {"size": g.size(), "rank": rank}
gm.set_validation(False)

@gm.gen
def nn_model():
    mu = gm.trace("mu", gm.normal(MU0, S0))
    gm.trace("y", gm.normal(mx.broadcast_to(mu, (len(Y_NN),)), SY))

# --- IS ------------------------------------------------------------------------
n_is = 4000
r = sharded_importance_sampling(mx.random.key(3), nn_model, (), gm.choicemap({"y": mx.array(Y_NN)}), n_is)
mu_all = sh.gather(r.traces["mu"])
w = np.array(mx.softmax(r.global_log_weights))
f = np.array(mu_all)
est = float(r.estimate("mu"))
res["is_mean"] = est
res["is_mean_se"] = float(np.sqrt(np.sum(w**2 * (f - np.sum(w * f)) ** 2)))
W = np.exp(np.array(r.global_log_weights, dtype=np.float64))
res["is_logz"] = float(r.log_marginal_likelihood)
res["is_logz_se"] = float(np.sqrt((np.mean(W**2) / np.mean(W) ** 2 - 1) / n_is))
res["is_glw"] = np.array(r.global_log_weights).tolist()
res["is_ess"] = float(r.ess)
res["is_local_n"] = r.n

# --- particle movement against the gather-everything reference ------------------
m_loc = 64
x = mx.random.normal((m_loc, 3), key=mx.random.key(10 + rank))
b = mx.random.bernoulli(0.5, (m_loc,), key=mx.random.key(20 + rank))
X, B = sh.gather(x), sh.gather(b)
ok = True
for i, idx in enumerate([
        mx.sort(mx.random.randint(0, 2 * m_loc, (2 * m_loc,), key=mx.random.key(7))),
        mx.random.randint(0, 2 * m_loc, (2 * m_loc,), key=mx.random.key(8)),
        mx.arange(2 * m_loc),
        mx.sort(mx.random.randint(m_loc - 5, m_loc + 9, (6,), key=mx.random.key(9))),
        # unsorted, both ranks importing: windows from both sides, narrower than a shard
        mx.concatenate([mx.random.randint(m_loc - 5, m_loc + 4, (m_loc,), key=mx.random.key(11)),
                        mx.random.randint(m_loc - 4, m_loc + 6, (m_loc,), key=mx.random.key(12))]),
        mx.full((4,), 2 * m_loc - 1)]):
    k = idx.shape[0] // 2
    mine = idx[rank * k:(rank + 1) * k]
    xo, bo = sh.take_rows([x, b], mine)
    ok = ok and bool(mx.array_equal(xo, X[mine])) and bool(mx.array_equal(bo, B[mine]))
    ok = ok and bo.dtype == mx.bool_
res["take_ok"] = ok

# --- distributed systematic resampling vs systematic on the gathered weights ------
from genmlx.inference import resampling as RS
agree = []
for i, scale in enumerate([0.3, 3.0, 30.0]):
    lw = scale * mx.random.normal((m_loc,), key=mx.random.key(100 + 10 * i + rank))
    if i == 2:  # nearly all the mass on one rank: many particles change rank
        lw = lw + (8.0 if rank == 1 else -8.0)
    k_res = mx.random.key(50 + i)
    idx, new_lw, ess, did = sh.resample(k_res, lw, "systematic", 1.0)
    glw = sh.gather(lw)
    ref = RS.systematic(k_res, glw, 2 * m_loc)
    got = sh.gather(idx)
    agree.append([int(mx.sum(got != ref).item()), bool(did.item()),
                  abs(float(ess) - float(RS.effective_sample_size(glw))) / float(ess),
                  float(mx.max(mx.abs(new_lw - RS.log_mean_exp(glw))))])
    # the particles that moved are the ones the ancestors name
    xo = sh.take_rows([x], idx)[0]
    agree[-1].append(bool(mx.array_equal(sh.gather(xo), X[got])))
res["sys_agree"] = agree

# --- importance resampling ------------------------------------------------------
tr, lz = sharded_importance_resampling(mx.random.key(4), nn_model, (), gm.choicemap({"y": mx.array(Y_NN)}), 200, m=100)
res["sir_local_n"] = tr.batch_size
res["sir_mu"] = np.array(sh.gather(tr["mu"])).tolist()
one, _ = sharded_importance_resampling(mx.random.key(4), nn_model, (), gm.choicemap({"y": mx.array(Y_NN)}), 200)
res["sir_one"] = float(one["mu"])
try:
    sharded_importance_sampling(mx.random.key(0), nn_model, (), gm.choicemap({"y": mx.array(Y_NN)}), 5)
    res["odd_n_error"] = ""
except ValueError as e:
    res["odd_n_error"] = str(e)

# --- SMC ------------------------------------------------------------------------
@gm.gen
def step(t, x, a, q, r):
    x = gm.trace("x", gm.normal(a * x, q))
    gm.trace("y", gm.normal(x, r))
    return x

T = len(YS)
model = gm.Unfold(step)
obs = gm.choicemap({(t, "y"): YS[t] for t in range(T)})
args = (T, mx.array(0.0), A, Q, RR)
lzs, coherent = [], True
for i, k in enumerate(mx.random.split(mx.random.key(5), 40)):
    scheme = "multinomial" if i % 4 == 3 else "systematic"
    out = sharded_smc(k, model, args, obs, 200, progress=False, resampling=scheme, ess_threshold=0.7)
    lzs.append(float(out.log_marginal_likelihood))
    xs = np.stack([np.array(out.traces[(t, "x")]) for t in range(T)], 1)
    prev = np.concatenate([np.zeros((xs.shape[0], 1)), xs[:, :-1]], 1)
    lp = (-0.5 * ((xs - A * prev) / Q) ** 2 - math.log(Q) - 0.5 * ((np.array(YS) - xs) / RR) ** 2
          - math.log(RR) - math.log(2 * math.pi)).sum(1)
    coherent = coherent and bool(np.allclose(lp, np.array(out.traces.score), atol=1e-3, rtol=1e-4))
    if i == 0:
        res["smc_glw"] = np.array(out.global_log_weights).tolist()
        res["smc_anc"] = [np.array(sh.gather(a)).tolist() for a in out.ancestors]
        res["smc_ess"] = list(out.ess_history)
        res["smc_flags"] = list(out.resampled)
        res["smc_local_n"] = out.n
res["smc_logz"] = lzs
res["smc_coherent"] = coherent

# the fused path: collectives per step (the compiled step itself has none), counted with
# compilation off (a compiled function calls the Python collectives only while tracing)
from genmlx.inference.sharded import Shards
calls = {"n": 0}
real = {k: getattr(mx.distributed, k) for k in ("all_gather", "all_sum")}
for name, f in real.items():
    setattr(mx.distributed, name, lambda *a, _f=f, **k: (calls.__setitem__("n", calls["n"] + 1), _f(*a, **k))[1])
per_step, step_real = [], Shards.step_resample

def counted(self, *a, **k):
    c0 = calls["n"]
    out = step_real(self, *a, **k)
    per_step.append(calls["n"] - c0)
    return out

Shards.step_resample = counted
counts = {}
mx.disable_compile()
for scheme, sync_free in (("systematic", True), ("systematic", False), ("stratified", True),
                          ("residual", True)):
    Shards.sync_free = sync_free
    calls["n"], per_step[:] = 0, []
    out = sharded_smc(mx.random.key(8), model, args, obs, 200, progress=False, resampling=scheme,
                      ess_threshold=0.8)
    name = scheme if sync_free else "systematic_exact"
    counts[name] = {"steps": list(per_step), "total": calls["n"]}
    xs = np.stack([np.array(out.traces[(t, "x")]) for t in range(T)], 1)
    prev = np.concatenate([np.zeros((xs.shape[0], 1)), xs[:, :-1]], 1)
    lp = (-0.5 * ((xs - A * prev) / Q) ** 2 - math.log(Q) - 0.5 * ((np.array(YS) - xs) / RR) ** 2
          - math.log(RR) - math.log(2 * math.pi)).sum(1)
    counts[name]["coherent"] = bool(np.allclose(lp, np.array(out.traces.score), atol=1e-3, rtol=1e-4))
    counts[name]["resampled"] = list(out.resampled)
mx.enable_compile()
Shards.sync_free = True
Shards.step_resample = step_real
for name, f in real.items():
    setattr(mx.distributed, name, f)
res["fused_counts"] = counts

# the sync-free systematic step against the exact one (host-sized segments): identical
# particles, weights, ESS, flags, ancestors and log Ẑ; tiny windows overflow and the run
# is redone on the exact path; no host read between the first and the last step
import genmlx.inference.sharded as SH
from genmlx.inference import smc as SMC

def run_summary(key, thr, n=128):
    out = sharded_smc(key, model, args, obs, n, progress=False, ess_threshold=thr)
    return {"glw": np.array(out.global_log_weights).tolist(), "ess": list(out.ess_history),
            "flags": list(out.resampled), "anc": [np.array(sh.gather(a)).tolist() for a in out.ancestors],
            "lz": float(out.log_marginal_likelihood), "score": np.array(out.traces.score).tolist(),
            "xs": [np.array(out.traces[(t, "x")]).tolist() for t in range(T)]}

reads = {"n": 0}
read_names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
real_reads = {k: getattr(mx.array, k) for k in read_names}
real_np = (np.array, np.asarray, mx.eval, mx.synchronize)

def count_reads(on):
    def wrap(f):
        def g(*a, **k):
            reads["n"] += 1
            return f(*a, **k)
        return g
    for k, f in real_reads.items():
        setattr(mx.array, k, wrap(f) if on else f)
    np.array, np.asarray = (wrap(real_np[0]), wrap(real_np[1])) if on else real_np[:2]
    mx.eval, mx.synchronize = (wrap(real_np[2]), wrap(real_np[3])) if on else real_np[2:]

marks = []

def marked(self, *a, **k):
    marks.append(reads["n"])
    out = step_real(self, *a, **k)
    marks.append(reads["n"])
    return out

def loop_reads(key, thr):
    """Host reads from the first step's resampling to the last's (the time loop)."""
    marks[:] = []
    Shards.step_resample = marked
    count_reads(True)
    try:
        sharded_smc(key, model, args, obs, 128, progress=False, ess_threshold=thr)
    finally:
        count_reads(False)
        Shards.step_resample = step_real
    return marks[-1] - marks[0]

sf = {"same": [], "fallbacks": [], "flags": [], "reads": [], "exact_reads": 0}
default_width = SH.window_width
for seed, thr, W in ((0, 0.5, None), (1, 0.5, None), (2, 1.0, None), (3, 0.5, 16), (0, 0.5, 2), (2, 1.0, 1)):
    SH.window_width = default_width if W is None else (lambda m, processes=2, W=W: W)
    f0 = Shards.fallbacks
    a = run_summary(mx.random.key(seed), thr)
    sf["fallbacks"].append(Shards.fallbacks - f0)
    Shards.sync_free = False
    b = run_summary(mx.random.key(seed), thr)
    Shards.sync_free = True
    sf["same"].append([k for k in a if a[k] != b[k]])
    if W is None:  # the end-of-run descent on 16-slot halos (of 64-slot blocks): the same run
        default_halo, h0 = SH.halo_width, Shards.halo_misses
        SH.halo_width = lambda m: 16
        c = run_summary(mx.random.key(seed), thr)
        SH.halo_width = default_halo
        sf.setdefault("halo_same", []).append([k for k in a if a[k] != c[k]])
        sf.setdefault("halo_misses", []).append(Shards.halo_misses - h0)
    sf["flags"].append(a["flags"])
    # the windows carried particles across ranks (not every ancestor in its own block)
    sf.setdefault("crossed", []).append(any(
        any(v // 64 != i // 64 for i, v in enumerate(anc)) for anc in a["anc"]))
    if W is None or W == 16:
        sf["reads"].append(loop_reads(mx.random.key(seed), thr))
SH.window_width = default_width
Shards.sync_free = False
sf["exact_reads"] = loop_reads(mx.random.key(1), 0.5)
Shards.sync_free = True
# the collectives between the two compiled halves: the same draws
SH.COMPILE_COLLECTIVES = False
a = run_summary(mx.random.key(1), 0.5)
SH.COMPILE_COLLECTIVES = True
sf["split_same"] = a == run_summary(mx.random.key(1), 0.5)
res["sync_free"] = sf

# take_rows_each and descent against the gather-everything reference
leaves = [mx.random.normal((m_loc, 2), key=mx.random.key(30 + rank)),
          mx.random.randint(0, 9, (m_loc,), key=mx.random.key(40 + rank)),
          mx.random.bernoulli(0.5, (m_loc,), key=mx.random.key(50 + rank)).astype(mx.bool_),
          mx.random.normal((m_loc,), key=mx.random.key(60 + rank)).astype(mx.float16)]
G = [sh.gather(x) for x in leaves]
full = [mx.sort(mx.random.randint(0, 2 * m_loc, (2 * m_loc,), key=mx.random.key(k))) for k in (70, 71)]
rows = [full[0][rank * m_loc:(rank + 1) * m_loc], None, full[1][rank * m_loc:(rank + 1) * m_loc],
        full[0][rank * m_loc:(rank + 1) * m_loc]]
got = sh.take_rows_each(leaves, rows)
res["take_each_ok"] = all(
    bool(mx.array_equal(g, Gx[r] if r is not None else x)) and g.dtype == x.dtype
    for g, Gx, r, x in zip(got, G, rows, leaves))
# take_blocks ([T, m, …] blocks): lineages at home (nothing moves) and drifting (the
# neighbours' edges), against the gather-everything reference
own = rank * m_loc + mx.arange(m_loc, dtype=mx.int32)
blks = [mx.random.normal((3, m_loc, 2), key=mx.random.key(31 + rank)),
        mx.random.randint(0, 9, (3, m_loc), key=mx.random.key(41 + rank)).astype(mx.int32),
        mx.random.bernoulli(0.5, (3, m_loc), key=mx.random.key(51 + rank))]
drift = [mx.clip(mx.sort(mx.arange(2 * m_loc) + mx.random.randint(-5, 6, (2 * m_loc,), key=mx.random.key(k))),
                 0, 2 * m_loc - 1).astype(mx.int32)[rank * m_loc:(rank + 1) * m_loc] for k in (72, 73)]
res["take_blocks_ok"] = True
import genmlx.inference.sharded as SH
default_cap = SH.BLOCK_ELEMENTS_MAX
# whole blocks, then in chunks of steps (one step; about two) as for arrays past 2^30 entries
for cap in (default_cap, 1, 5 * m_loc):
    SH.BLOCK_ELEMENTS_MAX = cap
    for Ds_b in ([None, own, None], [drift[0], None, drift[1]]):
        got = sh.take_blocks([[x[t] for t in range(3)] for x in blks], Ds_b)
        for g, x in zip(got, blks):
            for t in range(3):
                ref = sh.gather(x[t])[own if Ds_b[t] is None else Ds_b[t]]
                res["take_blocks_ok"] = (res["take_blocks_ok"] and bool(mx.array_equal(g[t], ref))
                                         and g.dtype == x.dtype and g.shape[0] == 3)
SH.BLOCK_ELEMENTS_MAX = default_cap
flags = [True, False, True, True]
anc = [mx.sort(mx.random.randint(0, 2 * m_loc, (2 * m_loc,), key=mx.random.key(80 + t))) for t in range(4)]
ref = anc[3][rank * m_loc:(rank + 1) * m_loc]
want = [anc[0][anc[2][ref]], anc[2][ref], anc[2][ref], ref]
# the neighbours' halos: all of a block (m), enough for these lineages (48 of 64 slots),
# too few (2: one miss each, then 4x as wide, 8, is enough), too few and no wider ones
# (the whole blocks are gathered instead); with and without the log-weights
default_halo, res["descent_ok"], res["halo_misses"] = SH.halo_width, True, []
lw_loc = mx.random.normal((m_loc,), key=mx.random.key(90 + rank))
real_widened = SH.HaloLineage.widened
# (the last two: the whole blocks gathered in chunks of one and of two steps, and the
# halos extended in chunks, as for arrays past 2^30 entries)
for H, wider, cap in ((None, True, None), (48, True, None), (2, True, None), (2, False, None),
                      (2, False, 1), (2, False, 2 * 2 * m_loc)):
    SH.halo_width = default_halo if H is None else (lambda m, H=H: H)
    SH.HaloLineage.widened = real_widened if wider else (lambda self: None)
    SH.BLOCK_ELEMENTS_MAX = default_cap if cap is None else cap
    h0 = Shards.halo_misses
    Ds = sh.descent([a[rank * m_loc:(rank + 1) * m_loc] for a in anc], flags)
    Ds2, glw = sh.descent([a[rank * m_loc:(rank + 1) * m_loc] for a in anc], flags, lw_loc)
    SH.HaloLineage.widened = real_widened
    res["halo_misses"].append(Shards.halo_misses - h0)
    res["descent_ok"] = res["descent_ok"] and all(
        bool(mx.array_equal(d, w)) and bool(mx.array_equal(d2, w)) for d, d2, w in zip(Ds, Ds2, want))
    res["descent_ok"] = res["descent_ok"] and bool(mx.array_equal(glw, sh.gather(lw_loc)))
SH.halo_width, SH.BLOCK_ELEMENTS_MAX = default_halo, default_cap

# the halo-paths kernel's path (lazy lineages, the kept arrays' edges gathered, the miss
# fallback) with the kernel replaced by its NumPy statement: the same run as the MLX path
import genmlx.kernels.paths as KP
real_usable, real_paths = KP.halo_usable, KP.halo_paths

def emulated_paths(idxs, flags, EA, xs, EX, r, R, H):
    outs, bad = KP.halo_paths_reference(idxs, flags, EA, xs, EX, r, R, H)
    return [mx.array(o) for o in outs], mx.array(bad)

want = run_summary(mx.random.key(8), 0.6)
res["halo_kernel_path"] = []
for H in (48, 16, 2):
    SH.halo_width = lambda m, H=H: H
    KP.halo_usable, KP.halo_paths = (lambda idxs, flags, xs: "cuda" if any(flags) else None), emulated_paths
    h0 = Shards.halo_misses
    try:
        got_run = run_summary(mx.random.key(8), 0.6)
    finally:
        KP.halo_usable, KP.halo_paths = real_usable, real_paths
        SH.halo_width = default_halo
    res["halo_kernel_path"].append([got_run == want, Shards.halo_misses - h0])

# rejuvenation and a callback: the full traces are resolved across ranks every step
seen = []

def rejuv(k, tr):
    last = tr.args[0] - 1
    return gm.inference.mh(k, tr, gm.select((last, "x")))

out = sharded_smc(mx.random.key(6), model, args, obs, 100, progress=False, ess_threshold=0.9,
                  rejuvenation=rejuv, callback=lambda t, tr, lw: seen.append(tr.batch_size))
xs = np.stack([np.array(out.traces[(t, "x")]) for t in range(T)], 1)
prev = np.concatenate([np.zeros((xs.shape[0], 1)), xs[:, :-1]], 1)
lp = (-0.5 * ((xs - A * prev) / Q) ** 2 - math.log(Q) - 0.5 * ((np.array(YS) - xs) / RR) ** 2
      - math.log(RR) - math.log(2 * math.pi)).sum(1)
res["rejuv_coherent"] = bool(np.allclose(lp, np.array(out.traces.score), atol=1e-3, rtol=1e-4))
res["rejuv_resampled"] = sum(out.resampled)
res["callback_sizes"] = seen
with open(f"{out_dir}/rank{rank}.json", "w") as fh:
    json.dump(res, fh)
'''


def _launcher() -> str | None:
    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.exists() else shutil.which("mlx.launch")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker on 2 processes (ring backend); the ranks' JSON results."""
    launch = _launcher()
    if launch is None:
        pytest.skip("mlx.launch is not installed: cannot start a 2-process ring group")
    d = tmp_path_factory.mktemp("sharded")
    script = d / "worker.py"
    script.write_text(WORKER)
    import os

    # the repository first, the caller's module path kept (MLX may live there: GPU machine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([launch, "-n", "2", "--backend", "ring", "--python", sys.executable,
                            str(script), str(d)], capture_output=True, text=True, timeout=240,
                           env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process sharded worker timed out")
    outs = [d / f"rank{r}.json" for r in range(2)]
    if not all(o.exists() for o in outs):
        if "ring" in (p.stderr + p.stdout).lower() and p.returncode != 0 and "Traceback" not in p.stderr:
            pytest.skip(f"mlx.launch ring backend unavailable: {p.stderr[-500:]}")
        pytest.fail(f"sharded worker failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return [json.loads(o.read_text()) for o in outs]


# --- two processes ------------------------------------------------------------------
def test_group_of_two(two_ranks):
    assert [r["size"] for r in two_ranks] == [2, 2]
    assert [r["rank"] for r in two_ranks] == [0, 1]


def test_is_normal_normal_oracle(two_ranks):
    mean, logp = normal_normal_exact()
    r0 = two_ranks[0]
    assert r0["is_local_n"] == 2000
    assert abs(r0["is_mean"] - mean) < 3.5 * r0["is_mean_se"]
    assert abs(r0["is_logz"] - logp) < 3.5 * r0["is_logz_se"]
    assert 0 < r0["is_ess"] <= 4000


def test_is_global_quantities_identical_on_ranks(two_ranks):
    r0, r1 = two_ranks
    assert r0["is_glw"] == r1["is_glw"]
    for key in ("is_mean", "is_logz", "is_ess"):
        assert r0[key] == r1[key]
    # the two halves are different particles (rank folded into the key)
    assert r0["is_glw"][:2000] != r0["is_glw"][2000:]


def test_particle_movement_equals_full_gather(two_ranks):
    assert all(r["take_ok"] for r in two_ranks)


def test_distributed_systematic_equals_systematic_on_gathered_weights(two_ranks):
    """Local offspring counts + segment exchange give the single-process systematic
    ancestors on the global weights (an index may differ only where a systematic point
    ties a CDF value to rounding: none here), the global ESS and the log-mean weight."""
    for r in two_ranks:
        for n_diff, did, ess_rel, lw_err, moved_ok in r["sys_agree"]:
            assert n_diff == 0 and did and moved_ok
            assert ess_rel < 1e-4 and lw_err < 1e-4


def test_importance_resampling(two_ranks):
    r0, r1 = two_ranks
    assert r0["sir_local_n"] == r1["sir_local_n"] == 50
    assert r0["sir_mu"] == r1["sir_mu"]
    assert r0["sir_one"] == r1["sir_one"]  # m=None: the same single trace on every rank


def test_bad_n_is_rejected_by_name(two_ranks):
    msg = two_ranks[0]["odd_n_error"]
    assert "n = 5" in msg and "2" in msg


def test_smc_kalman_oracle(two_ranks):
    """Ẑ is unbiased: mean of exp(log Ẑ − log Z) over 40 runs within 3.5 SE of 1."""
    ratios = np.exp(np.array(two_ranks[0]["smc_logz"]) - kalman_loglik(YS))
    se = ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert se > 0
    assert abs(ratios.mean() - 1) < 3.5 * se, (ratios.mean(), se)


def test_smc_global_weights_and_ancestors_identical(two_ranks):
    r0, r1 = two_ranks
    assert r0["smc_local_n"] == 100
    assert r0["smc_logz"] == r1["smc_logz"]
    assert r0["smc_glw"] == r1["smc_glw"]
    assert r0["smc_ess"] == r1["smc_ess"]
    assert r0["smc_flags"] == r1["smc_flags"]
    assert any(r0["smc_flags"]) and r0["smc_anc"] == r1["smc_anc"]
    assert all(len(a) == 200 for a in r0["smc_anc"])


def test_smc_traces_coherent_after_cross_rank_resampling(two_ranks):
    assert all(r["smc_coherent"] for r in two_ranks)


def test_smc_rejuvenation_and_callback_see_local_resolved_particles(two_ranks):
    for r in two_ranks:
        assert r["rejuv_coherent"] and r["rejuv_resampled"] >= 2
        assert r["callback_sizes"] == [50] * len(YS)


def test_fused_smc_one_collective_per_step(two_ranks):
    """Per step: systematic (sync-free) TWO collectives whether or not it resamples (the
    weight summary; the packed windows); the exact systematic path and other schemes ONE
    without a resampling (the summary or the log-weights), at most two with one (plus
    the carry rows); the end of the run: the ancestors' halos with the log-weights, the
    halo check, the kept arrays' bounds and rows."""
    for r in two_ranks:
        for scheme, c in r["fused_counts"].items():
            steps, did = c["steps"], c["resampled"]
            assert len(steps) == len(YS) and any(did), (scheme, did)
            if scheme == "systematic":
                assert all(k == 2 for k in steps), steps
            else:
                assert all(k == 1 for d, k in zip(did, steps) if not d), (scheme, steps)
                assert all(1 <= k <= 2 for d, k in zip(did, steps) if d), (scheme, steps)
            assert c["total"] - sum(steps) <= 4, (scheme, c["total"])
            assert c["coherent"], scheme


def test_sync_free_step_equals_exact_path(two_ranks):
    """The sync-free systematic step (fixed windows, decision on the device) gives the
    exact path's particles, log-weights, ESS history, flags, ancestors and log Ẑ bit for
    bit, for several seeds, runs where the ESS test does not fire at some steps, windows
    that carry particles across ranks, and both compiled layouts (collectives inside
    the compiled function or between two compiled halves)."""
    for r in two_ranks:
        sf = r["sync_free"]
        assert all(diff == [] for diff in sf["same"]), sf["same"]
        assert any(not all(f) and any(f) for f in sf["flags"])
        assert sf["fallbacks"][:4] == [0, 0, 0, 0]  # default and 16-slot windows: no overflow
        assert all(diff == [] for diff in sf["halo_same"]), sf["halo_same"]  # halo descent
        assert 0 in sf["halo_misses"], sf["halo_misses"]  # (composed on the halos, no miss)
        assert sf["crossed"][3]  # 16-slot windows (of 64-particle blocks) carried particles
        assert sf["split_same"]


def test_sync_free_overflow_falls_back_to_exact_path(two_ranks):
    """Windows of 1–2 slots overflow: the run is redone on the exact path from the same key
    (one fallback per run), with the exact path's result."""
    for r in two_ranks:
        sf = r["sync_free"]
        assert sf["fallbacks"][4:] == [1, 1]
        assert sf["same"][4:] == [[], []]


def test_sync_free_loop_makes_no_host_read(two_ranks):
    """No host read (tolist/item/bool/int/float/index of an array, np.array/asarray,
    mx.eval, mx.synchronize) from the first step's resampling to the last's; the exact
    path reads every step (the count works)."""
    for r in two_ranks:
        sf = r["sync_free"]
        assert sf["reads"] == [0, 0, 0, 0], sf["reads"]
        assert sf["exact_reads"] >= len(YS) - 1


def test_fused_row_moves_equal_full_gather(two_ranks):
    """take_rows_each, take_blocks and the end-of-run descent against the gather-everything
    reference; the halo-paths kernel's path (its kernel emulated in NumPy) gives the run the
    MLX path gives, with halos wide enough and too narrow (a miss: the whole blocks);
    the descent on neighbours' halos wide enough (no miss) and too narrow (a miss each
    call: the whole blocks are gathered), with the same rows either way; take_blocks and
    the whole-block descent in chunks of steps (the guard for arrays past 2^30 entries)
    give the same rows as in one piece."""
    for r in two_ranks:
        assert r["take_each_ok"] and r["descent_ok"] and r["take_blocks_ok"]
        # the kernel's path (emulated) gives the same run; the narrowest halo misses
        assert all(same for same, _ in r["halo_kernel_path"]), r["halo_kernel_path"]
        assert r["halo_kernel_path"][0][1] == 0 and r["halo_kernel_path"][-1][1] >= 1, r["halo_kernel_path"]
        assert r["halo_misses"] == [0, 0, 2, 2, 2, 2], r["halo_misses"]


# --- one process: the single-process functions ---------------------------------------
@gm.gen
def _nn():
    mu = gm.trace("mu", gm.normal(MU0, S0))
    gm.trace("y", gm.normal(mx.broadcast_to(mu, (len(Y_NN),)), SY))


def test_single_process_is_equals_importance_sampling():
    obs = gm.choicemap({"y": mx.array(Y_NN)})
    a = sharded_importance_sampling(mx.random.key(1), _nn, (), obs, 64)
    b = importance_sampling(mx.random.key(1), _nn, (), obs, 64)
    assert mx.array_equal(a.log_weights, b.log_weights)
    assert mx.array_equal(a.traces["mu"], b.traces["mu"])
    ta, la = sharded_importance_resampling(mx.random.key(2), _nn, (), obs, 64, m=8)
    tb, lb = importance_resampling(mx.random.key(2), _nn, (), obs, 64, m=8)
    assert mx.array_equal(ta["mu"], tb["mu"]) and float(la) == float(lb)


def test_single_process_smc_equals_smc():
    model = gm.Unfold(ssm_step)
    T = 4
    obs = gm.choicemap({(t, "y"): YS[t] for t in range(T)})
    args = (T, mx.array(0.0), A, Q, RR)
    a = sharded_smc(mx.random.key(3), model, args, obs, 50, progress=False, ess_threshold=0.9)
    b = smc(mx.random.key(3), model, args, obs, 50, progress=False, ess_threshold=0.9)
    assert mx.array_equal(a.log_weights, b.log_weights)
    assert a.resampled == b.resampled and any(a.resampled)
    for t in range(T):
        assert mx.array_equal(a.traces[(t, "x")], b.traces[(t, "x")])


@pytest.mark.parametrize("scheme,kind", [("systematic", "unfold"), ("multinomial", "unfold"),
                                         ("stratified", "unfold"), ("residual", "unfold"),
                                         ("systematic", "scan")])
def test_fused_sharded_path_on_group_of_one_equals_smc(scheme, kind):
    """run_smc(comm=Shards(group of one)): the sharded fused path (local summary, global
    decision, carry moves, ancestors composed by ``descent``, kept arrays by
    ``take_rows_each``) draws exactly what smc draws."""
    from genmlx.inference.sharded import Shards
    from genmlx.inference.smc import run_smc
    from genmlx.kernels import override

    @gm.gen
    def scan_step(x, u):
        x = gm.trace("x", gm.normal(A * x + u, Q))
        gm.trace("y", gm.normal(x, RR))
        return x, x

    T = len(YS)
    obs = gm.choicemap({(t, "y"): YS[t] for t in range(T)})
    if kind == "unfold":
        model, args = gm.Unfold(ssm_step), (T, mx.array(0.0), A, Q, RR)
    else:
        model, args = gm.Scan(scan_step), (mx.array(0.0), 0.1 * mx.arange(T, dtype=mx.float32))
    sh = Shards(mx.distributed.init())
    sh.sort_ancestors = False
    # the generic weight reductions on both sides: smc's fused GPU kernel sums in another
    # order (ESS equal to float32 rounding only, tested in tests/kernels)
    with override(False):
        a = run_smc(mx.random.key(3), model, args, obs, 40, progress=False, ess_threshold=0.9,
                    resampling=scheme, comm=sh)
        b = run_smc(mx.random.key(3), model, args, obs, 40, progress=False, ess_threshold=0.9,
                    resampling=scheme)
    assert mx.array_equal(a.log_weights, b.log_weights) and mx.array_equal(a.global_log_weights, b.log_weights)
    assert a.resampled == b.resampled and sum(a.resampled) >= 3
    assert a.ess_history == b.ess_history
    assert all(mx.array_equal(x, y) for x, y in zip(a.ancestors, b.ancestors))
    for t in range(T):
        assert mx.array_equal(a.traces[(t, "x")], b.traces[(t, "x")])
    assert mx.allclose(a.traces.score, b.traces.score, atol=1e-5)


def test_gather_packed_round_trips_every_dtype():
    """One packed collective (bit views in a uint32 buffer) returns every array as it was
    (a group of one: the gather is the identity)."""
    from genmlx.inference.sharded import Shards

    sh = Shards(mx.distributed.init())
    k = mx.random.key(0)
    xs = [mx.random.normal((5, 2), key=k), mx.arange(5, dtype=mx.int32) - 2,
          mx.array([True, False, True, True, False]), mx.random.normal((5,), key=k).astype(mx.float16),
          mx.random.normal((5, 3), key=k).astype(mx.bfloat16), mx.arange(5, dtype=mx.uint8),
          mx.arange(5, dtype=mx.int64) * (2**40), mx.array([-3, 4, 5, -6, 7], dtype=mx.int16)]
    out = sh.gather_packed(xs)
    for x, y in zip(xs, out):
        assert y.dtype == x.dtype and y.shape == x.shape and mx.array_equal(x, y), x.dtype


def test_gather_packed_splits_buffers_past_the_axis_limit(monkeypatch):
    """A packed buffer longer than MLX's 32-bit axis limit (here made 12 entries) goes
    out in several collectives, each array returned as it was."""
    import genmlx.inference.sharded as SH

    sh = SH.Shards(mx.distributed.init())
    calls = []
    gather = sh.gather
    monkeypatch.setattr(sh, "gather", lambda x: calls.append(x.size) or gather(x))
    monkeypatch.setattr(SH, "MAX_DIM", 12)
    xs = [mx.arange(5, dtype=mx.int32), mx.arange(8, dtype=mx.float32).reshape(4, 2), mx.arange(3, dtype=mx.uint8)]
    out = sh.gather_packed(xs)
    assert calls == [5, 11]
    for x, y in zip(xs, out):
        assert y.dtype == x.dtype and mx.array_equal(x, y)


# --- R processes simulated in one (the collectives replaced by concatenation) ----------
def _virtual_take(blocks, idxs):
    """Shards.take_rows's plan, exports and assembly for every rank of a virtual group."""
    m = blocks[0].shape[0]
    plan = WindowPlan(np.concatenate([np.array(source_bounds(i)) for i in idxs]), m)
    if plan.local:
        return [mx.take(b, i - r * m, axis=0) for r, (b, i) in enumerate(zip(blocks, idxs))], plan
    gathered = mx.concatenate([b if plan.full else plan.export(b, r) for r, b in enumerate(blocks)])
    return [plan.assemble(b, gathered, i, r) for r, (b, i) in enumerate(zip(blocks, idxs))], plan


@pytest.mark.parametrize("R", [3, 4])
def test_window_plan_moves_exactly_the_requested_rows(R):
    m = 16
    n = R * m
    X = mx.random.normal((n, 2), key=mx.random.key(R))
    blocks = [X[r * m:(r + 1) * m] for r in range(R)]
    keys = mx.random.split(mx.random.key(100 + R), 6)
    cases = [
        mx.sort(mx.random.randint(0, n, (n,), key=keys[0])),  # sorted, global
        mx.random.randint(0, n, (n,), key=keys[1]),  # unsorted
        mx.arange(n),  # nothing moves
        mx.sort(mx.random.randint(m - 3, 2 * m + 3, (n,), key=keys[2])),  # around one block
        mx.concatenate([mx.random.randint(max(r * m - 2, 0), min((r + 1) * m + 2, n), (m,), key=k)
                        for r, k in enumerate(mx.random.split(keys[3], R))]),  # both sides, narrow
        mx.full((n,), n - 1),
    ]
    kinds = set()
    for idx in cases:
        idxs = [idx[r * m:(r + 1) * m] for r in range(R)]
        outs, plan = _virtual_take(blocks, idxs)
        kinds.add("local" if plan.local else "full" if plan.full else "windows")
        for o, i in zip(outs, idxs):
            assert mx.array_equal(o, X[i])
    assert kinds == {"local", "full", "windows"}


@pytest.mark.parametrize("R", [2, 3, 4])
def test_block_gathers_on_virtual_processes(R):
    """The end of run's row gathers of whole [T, m, …] blocks: the halo H from every
    process's [min, max] (``block_halo``), the rows from the neighbours' H-row edges
    (``halo_take``) when H ≤ m and from every process's block (``full_take``) otherwise,
    against the gather-everything reference, for lineages that stay home, drift a few
    rows across the block edges, and come from anywhere (R > 2: H > m)."""
    from genmlx.inference.sharded import block_halo, full_take, halo_take

    m, T = 20, 3
    n = R * m
    rng = np.random.default_rng(10 + R)
    X = [mx.array(rng.normal(size=(T, n, 2)).astype(np.float32)),
         mx.array(rng.integers(0, 9, (T, n)).astype(np.int32)),
         mx.array(rng.random((T, n)) < 0.5),
         mx.array(rng.normal(size=(T, n)).astype(np.float16))]
    cases = {
        "home": np.broadcast_to(np.arange(n), (T, n)),
        "drift": np.clip(np.sort(np.arange(n) + rng.integers(-5, 6, (T, n)), axis=1), 0, n - 1),
        "anywhere": rng.integers(0, n, (T, n)),
        "one ancestor": np.full((T, n), n - 1),
    }
    seen = set()
    for name, Dg in cases.items():
        Dg = Dg.astype(np.int32)
        bounds = [(Dg[:, r * m:(r + 1) * m].min(), Dg[:, r * m:(r + 1) * m].max()) for r in range(R)]
        H = block_halo(bounds, m)
        want_H = max(0, max(max(r * m - lo, hi + 1 - (r + 1) * m) for r, (lo, hi) in enumerate(bounds)))
        assert H == want_H
        seen.add("local" if H == 0 else "halo" if H <= m else "full")
        for r in range(R):
            D = mx.array(Dg[:, r * m:(r + 1) * m])
            blocks = [x[:, r * m:(r + 1) * m] for x in X]
            if H == 0:
                got = [mx.take_along_axis(x, (D - r * m).reshape(D.shape + (1,) * (x.ndim - 2)), axis=1)
                       for x in blocks]
            elif H <= m:  # what every process all-gathers: its first and last H rows of each step
                E = [mx.concatenate([mx.concatenate([x[:, q * m:q * m + H], x[:, (q + 1) * m - H:(q + 1) * m]],
                                                    axis=1) for q in range(R)]) for x in X]
                got = halo_take(blocks, D, E, r, R, H)
            else:
                G = [mx.concatenate([x[:, q * m:(q + 1) * m] for q in range(R)]) for x in X]
                got = full_take(blocks, D, G, R)
            for g, x in zip(got, X):
                want = np.take_along_axis(np.array(x), np.array(D).reshape(D.shape + (1,) * (x.ndim - 2)), axis=1)
                assert g.dtype == x.dtype and np.array_equal(np.array(g), want), (name, r)
    assert seen == ({"local", "halo", "full"} if R > 2 else {"local", "halo"}), seen


@pytest.mark.parametrize("R", [2, 3])
def test_halo_paths_statement_on_virtual_processes(R):
    """The halo-paths kernel's NumPy statement (``halo_paths_reference``: lineages followed
    backwards through the own blocks and the neighbours' edges, the kept rows copied)
    against the global composition and gather, on every process of R virtual ones; too
    narrow halos mark a miss."""
    from genmlx.kernels.paths import halo_paths_reference

    m, T = 40, 7
    n = R * m
    rng = np.random.default_rng(20 + R)
    flags = (True, False, True, True, False, True, False)
    # sorted ancestors drifting up by ~3 slots a resampling: lineages cross the block edges
    anc = [np.clip(np.sort(np.arange(n) + rng.integers(-3, 10, n)), 0, n - 1).astype(np.int32) for _ in range(T)]
    xs = [rng.normal(size=(T, n)).astype(np.float32), rng.normal(size=(T, n, 3)).astype(np.float16)]
    for H, want_miss in ((m, False), (30, False), (1, True)):
        misses = []
        for r in range(R):
            ks = [t for t in range(T) if flags[t]]
            EA = np.concatenate([np.stack([np.concatenate([anc[t][q * m:q * m + H], anc[t][(q + 1) * m - H:(q + 1) * m]])
                                           for t in ks]) for q in range(R)])
            EX = [np.concatenate([np.concatenate([x[:, q * m:q * m + H], x[:, (q + 1) * m - H:(q + 1) * m]], axis=1)
                                  for q in range(R)]) for x in xs]
            idxs = [a[r * m:(r + 1) * m] for a in anc]
            own = [[x[t, r * m:(r + 1) * m] for t in range(T)] for x in xs]
            outs, bad = halo_paths_reference(idxs, flags, EA, own, EX, r, R, H)
            misses.append(bool(bad))
            if bad:
                continue
            D = np.arange(r * m, (r + 1) * m)
            for t in reversed(range(T)):
                if flags[t]:
                    D = anc[t][D]
                for x, o in zip(xs, outs):
                    assert np.array_equal(o[t], x[t][D]), (R, r, t)
        assert any(misses) == want_miss, (R, H, misses)


@pytest.mark.parametrize("R", [2, 3, 4])
def test_halo_descent_on_virtual_processes(R):
    """The end-of-run descent on each process's blocks extended by its neighbours' H-slot
    edges (``halo_compose``, fed the edges every process would all-gather) gives the
    lineages of the full composition D_t = a_t[D_{t+1}] on every process (the middle ones
    borrow from both sides) when the halos are wide enough, and says ``miss`` (on some
    process) when they are not."""
    import genmlx.inference.sharded as SH
    from genmlx.inference.sharded import halo_compose

    m, T = 50, 6
    rng = np.random.default_rng(R)
    flags = [True, False, True, True, False, True]
    # sorted ancestors that wander a few slots: lineages drift across the block edges
    anc = [np.clip(np.sort(np.arange(R * m) + rng.integers(-4, 5, R * m)), 0, R * m - 1).astype(np.int32)
           for _ in range(T)]
    for H, want_miss in ((12, False), (1, True)):
        misses = []
        for r in range(R):
            idxs = [mx.array(a[r * m:(r + 1) * m]) for a in anc]
            blocks = mx.stack([idxs[t] for t in range(T) if flags[t]])
            # what the processes all-gather: each one's first and last H entries of each block
            E = mx.array(np.concatenate([
                np.stack([np.concatenate([anc[t][q * m:q * m + H], anc[t][(q + 1) * m - H:(q + 1) * m]])
                          for t in range(T) if flags[t]]) for q in range(R)]))
            got = [halo_compose(idxs, flags, blocks, E, r, R, H, s) for s in (False, True)]
            # the extended blocks in chunks of one and of two steps: the same lineages
            real_cap = SH.BLOCK_ELEMENTS_MAX
            for cap in (1, 2 * (m + 2 * H)):
                SH.BLOCK_ELEMENTS_MAX = cap
                try:
                    got.append(halo_compose(idxs, flags, blocks, E, r, R, H, True))
                finally:
                    SH.BLOCK_ELEMENTS_MAX = real_cap
            # the range test on a lineage's ends (sorted rows) says what the reductions say
            assert bool(got[0][1]) == bool(got[1][1]), (R, H, r)
            Ds, miss = got[0]
            misses.append(bool(miss))
            D = np.arange(r * m, (r + 1) * m)
            for t in reversed(range(T)):
                if flags[t]:
                    D = anc[t][D]
                    if not miss:
                        for Ds_s, _ in got:
                            assert np.array_equal(np.array(Ds_s[t]), D), (R, H, r, t)
        assert any(misses) == want_miss, (R, H, misses)


@pytest.mark.parametrize("R", [2, 3, 4])
def test_local_systematic_counts_equal_systematic_on_all_weights(R):
    """_systematic_local + SegmentPlan on R virtual processes give R.systematic's
    ancestors on the concatenated weights, the global ESS and log-mean weight."""
    from genmlx.inference import resampling as RS

    m = 24
    n = R * m
    for case in range(5):
        k = mx.random.key(10 * R + case)
        lws = [mx.random.normal((m,), key=kk) * (0.5 + 4 * case) for kk in mx.random.split(k, R)]
        if case == 2:  # nearly all the mass in the last process
            lws = [lw + (6.0 if r == R - 1 else -6.0) for r, lw in enumerate(lws)]
        if case == 3:  # one process's particles are all impossible
            lws[0] = mx.full((m,), -mx.inf)
        if case == 4:  # every particle impossible: uniform resampling, as R.systematic
            lws = [mx.full((m,), -mx.inf) for _ in range(R)]
        stats = mx.stack([mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)]) for lw in lws])
        k_res = mx.random.key(1000 + case)
        outs = [_systematic_local((R, r, 1.0, False), k_res, lw, stats) for r, lw in enumerate(lws)]
        Nb = [int(v) for v in np.array(outs[0][3])]
        assert all([int(v) for v in np.array(o[3])] == Nb for o in outs)
        plan = SegmentPlan(Nb, m)
        segs = [plan.segment(o[4], o[5], r) for r, o in enumerate(outs)]
        if plan.local:
            got = mx.concatenate(segs)
        else:
            gathered = mx.concatenate([plan.export(sg, r) for r, sg in enumerate(segs)])
            got = mx.concatenate([plan.assemble(sg, gathered, r) for r, sg in enumerate(segs)])
        glw = mx.concatenate(lws)
        assert mx.array_equal(got, RS.systematic(k_res, glw, n)), case
        if case < 4:
            ess = float(outs[0][0])
            assert abs(ess - float(RS.effective_sample_size(glw))) <= 1e-4 * ess
            assert all(bool(o[1]) for o in outs)
            assert mx.allclose(outs[1][2], mx.broadcast_to(RS.log_mean_exp(glw), (m,)), atol=1e-5)


@pytest.mark.parametrize("R", [2, 3])
def test_segment_ends_move_as_window_width_assumes(R):
    """window_width's premise: a segment end N(B_q) (from _systematic_local on R virtual
    processes) sits n·(F_q − q/R) slots from q·m with sd CV·√(n·(q/R)(1 − q/R)), CV² =
    n/ESS − 1. Exchangeable log-normal weights, 300 draws: the mean squared z-score is 1
    within 3.5 SE (√(2/K)), no |z| past 5, and W = window_width(m, R) holds ≥ 6 such sd's
    at CV = 10."""
    m = 20_000
    n = R * m
    z = []
    for draw in range(300):
        k_lw, k_res = mx.random.split(mx.random.key(7000 + 100 * R + draw))
        lws = list(mx.random.normal((R, m), key=k_lw) * 1.2)
        stats = mx.stack([mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)]) for lw in lws])
        ess, _, _, Nb = _systematic_local((R, 0, 1.0, False), k_res, lws[0], stats)[:4]
        cv = math.sqrt(n / float(ess) - 1.0)
        Nb = np.array(Nb)
        for q in range(1, R):
            sd = cv * math.sqrt(n * (q / R) * (1 - q / R))
            z.append((int(Nb[q]) - q * m) / sd)
    z = np.array(z)
    assert abs(np.mean(z ** 2) - 1.0) < 3.5 * math.sqrt(2.0 / len(z)), np.mean(z ** 2)
    assert np.max(np.abs(z)) < 5.0
    for mm in (10**5, 10**6, 15 * 10**6):
        W = window_width(mm, R)
        assert min(W, mm) == W and (W == mm or W >= 6 * 10.0 * math.sqrt(R * mm) / 2), (mm, W)


@pytest.mark.parametrize("R", [2, 3, 4])
def test_sync_free_windows_on_virtual_processes(R):
    """_sync_free_search / _sync_free_assemble on R virtual processes (the packed gather
    replaced by concatenation): where no segment passes its W-slot windows the blocks hold
    R.systematic's ancestors on the concatenated weights and the carry rows they name;
    ``overflow`` is set exactly when some slot lies outside the windows (then the exact
    path redoes the run); without a resampling the identity."""
    from genmlx.inference import resampling as RS
    from genmlx.inference.sharded import _sync_free_assemble, _sync_free_search

    m = 24
    n = R * m
    seen = set()
    for case in range(4):
        k = mx.random.key(100 * R + case)
        lws = [mx.random.normal((m,), key=kk) * (0.5 + 2 * case) for kk in mx.random.split(k, R)]
        if case == 3:  # nearly all the mass in the last process: long segment
            lws = [lw + (4.0 if r == R - 1 else -4.0) for r, lw in enumerate(lws)]
        stats = mx.stack([mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)]) for lw in lws])
        xs = [mx.random.normal((m, 2), key=mx.random.key(7 * r + case)) for r in range(R)]
        k_res = mx.random.key(500 + case)
        glw = mx.concatenate(lws)
        ref = RS.systematic(k_res, glw, n)
        for W in (1, 3, 8, m):
            for thr in (1.0, 0.0):
                pay = [(None, R, r, thr, False, W) for r in range(R)]
                outs = [_sync_free_search(pay[r], k_res, lws[r], stats, [xs[r]]) for r in range(R)]
                Nb = np.array(outs[0][3])
                got = [mx.concatenate([o[6][i] for o in outs]) for i in range(2)]
                blocks = [_sync_free_assemble(pay[r], o[1], o[3], o[5], [xs[r]], got)
                          for r, o in enumerate(outs)]
                idx = mx.concatenate([b[1] for b in blocks])
                moved = mx.concatenate([b[0][0] for b in blocks])
                ovf = [bool(o[4]) for o in outs]
                assert len(set(ovf)) == 1
                if thr == 0.0:  # no resampling: the identity
                    assert not ovf[0] and mx.array_equal(idx, mx.arange(n))
                    assert mx.array_equal(moved, mx.concatenate(xs))
                    continue
                # ground truth: a slot whose owner is another process, outside its window
                owner = np.searchsorted(Nb, np.arange(n), side="right") - 1
                j = np.arange(n)
                blk = j // m
                out_hi = (owner < blk) & (j - (owner + 1) * m >= W)
                out_lo = (owner > blk) & (j < owner * m - W)
                assert ovf[0] == bool(np.any(out_hi | out_lo)), (case, W)
                seen.add(ovf[0])
                if not ovf[0]:
                    assert mx.array_equal(idx, ref), (case, W)
                    assert mx.array_equal(moved, mx.concatenate(xs)[ref])
    assert seen == {True, False}


class _FakeGroup:
    def size(self):
        return 4

    def rank(self):
        return 1


@pytest.mark.parametrize("fn", [sharded_importance_sampling, sharded_smc])
def test_n_not_divisible_names_n(fn):
    with pytest.raises(ValueError, match=r"n = 10 .*\(4\)"):
        fn(mx.random.key(0), _nn, (), gm.choicemap({"y": mx.array(Y_NN)}), 10, group=_FakeGroup())
