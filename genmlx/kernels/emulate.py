"""NumPy emulations of the kernels' algorithms, thread by thread.

They validate the algorithms on any machine: the chunked scans + binary searches must
agree with the MLX reference (``genmlx.inference.resampling``) in their tie handling, and
the online (max, S1, S2) merge with ``logsumexp``. The block scans here add chunk sums
left to right, so the emulated results equal the GPU's only up to rounding order
(float32 for the weight summary and Metal's CDF; double for the CUDA slot positions).
"""

from __future__ import annotations

import numpy as np

THREADS = 1024


def weight_summary(lw: np.ndarray, threads: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logsumexp, ESS) over the last axis by per-thread online triples merged pairwise."""
    lw = np.asarray(lw, np.float32)
    rows = lw.reshape(-1, lw.shape[-1])
    lse, ess = [], []
    for x in rows:
        triples = [_online(x[t::threads]) for t in range(threads)]
        while len(triples) > 1:  # tree merge, as the shuffles do
            triples = [_merge(triples[i], triples[i + 1]) for i in range(0, len(triples), 2)]
        m, s1, s2 = triples[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            lse.append(np.float32(m + np.log(s1)))
            ess.append(np.float32(s1 * s1 / s2))
    shape = lw.shape[:-1]
    return np.array(lse, np.float32).reshape(shape), np.array(ess, np.float32).reshape(shape)


def _online(x: np.ndarray) -> tuple:
    m, s1, s2 = np.float32(-np.inf), np.float32(0), np.float32(0)
    with np.errstate(invalid="ignore", over="ignore"):
        for v in x:
            if v > m:
                r = np.float32(0) if m == -np.inf else np.exp(m - v)
                s1, s2, m = s1 * r + np.float32(1), s2 * r * r + np.float32(1), v
            elif v != -np.inf:
                e = np.exp(v - m)
                s1, s2 = s1 + e, s2 + e * e
    return m, s1, s2


def _merge(a: tuple, b: tuple) -> tuple:
    (m, s1, s2), (mo, o1, o2) = a, b
    M = max(m, mo)
    if M == -np.inf:
        return M, s1 + o1, s2 + o2
    ea = np.float32(1) if m == M else np.exp(m - M)
    eb = np.float32(1) if mo == M else np.exp(mo - M)
    return M, s1 * ea + o1 * eb, s2 * ea * ea + o2 * eb * eb


def _block_scan(lw: np.ndarray, M, uniform: bool, threads: int) -> tuple[np.ndarray, np.float32]:
    """One block's float32 chunked scan of exp(lw − M): (prefix sums, block total).
    Threads own contiguous chunks of ⌈len/threads⌉ entries; chunk starts are made monotone
    (running max, capped at the total) and each chunk is capped at the next chunk's start,
    as in the Metal kernel."""
    n = lw.shape[0]
    w = np.ones(n, np.float32) if uniform else np.exp(lw - M).astype(np.float32)
    chunk = -(-n // threads)
    bounds = [(min(t * chunk, n), min(t * chunk + chunk, n)) for t in range(threads)]
    sums = [np.float32(0)] * threads
    for t, (lo, hi) in enumerate(bounds):
        for i in range(lo, hi):
            sums[t] = np.float32(sums[t] + w[i])
    prefix, total = [], np.float32(0)
    for sm in sums:
        prefix.append(total)
        total = np.float32(total + sm)
    lim = total
    starts = np.minimum(np.maximum.accumulate(np.array(prefix, np.float32)), lim)
    out = np.empty(n, np.float32)
    for t, (lo, hi) in enumerate(bounds):
        acc, cap = starts[t], starts[t + 1] if t + 1 < threads else lim
        for i in range(lo, hi):
            acc = np.float32(acc + w[i])
            out[i] = min(acc, cap)
    return out, total


def cdf(lw: np.ndarray, threads: int = THREADS) -> np.ndarray:
    """Normalised float32 CDF by the chunked scan (the Metal kernel): max; per-thread
    serial chunk sums; exclusive scan of the chunk sums; each chunk re-walked from its
    (monotone) start, capped at the next one; C_{n−1} = 1."""
    lw = np.asarray(lw, np.float32)
    n = lw.shape[0]
    M = lw.max()
    pre, total = _block_scan(lw, M, not M > -np.inf, threads)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.minimum((pre / total).astype(np.float32), np.float32(1))
    out[n - 1] = 1
    return out


def search(cdf: np.ndarray, U: np.ndarray, m: int) -> np.ndarray:
    """The Metal search: a_j = first i ≤ n−2 with "u_j ≤ C_i" (else n − 1), decided in
    float32 as x = m·C_i, f = ⌊x⌋: f > j, or f = j and U_j ≤ x − f."""
    cdf = np.asarray(cdf, np.float32)
    U = np.broadcast_to(np.asarray(U, np.float32), (m,))
    n, mf = cdf.shape[0], np.float32(m)
    out = np.empty(m, np.int32)
    for j in range(m):
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            x = np.float32(mf * cdf[mid])
            f = np.floor(x)
            hit = f > j or (f == j and U[j] <= np.float32(x - f))
            lo, hi = (lo, mid) if hit else (mid + 1, hi)
        out[j] = lo
    return out


def _put(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 positions x ≥ 0 as (int32 part, float32 fraction in [0, 1))."""
    fl = np.floor(x)
    i, f = fl.astype(np.int64), (x - fl).astype(np.float32)
    up = f >= 1
    return np.where(up, i + 1, i).astype(np.int32), np.where(up, np.float32(0), f)


def _segment_positions(w: np.ndarray, threads: int, x0: float, x1: float) -> np.ndarray:
    """One block's double positions of the weights w from x0 to x1 (the last exactly):
    per-thread chunk sums, exclusive scan, monotone starts, capped chunks."""
    n = w.shape[0]
    chunk = -(-n // threads)
    bounds = [(min(t * chunk, n), min(t * chunk + chunk, n)) for t in range(threads)]
    sums = [float(np.sum(w[lo:hi], dtype=np.float64)) for lo, hi in bounds]
    starts, total = [], 0.0
    for sm in sums:
        starts.append(total)
        total += sm
    starts = np.minimum(np.maximum.accumulate(np.array(starts)), total)
    scale = (x1 - x0) / total if total > 0 else 0.0
    out = np.empty(n, np.float64)
    for t, (lo, hi) in enumerate(bounds):
        if hi <= lo:
            continue
        cap = starts[t + 1] if t + 1 < threads else total
        acc = starts[t] + np.cumsum(w[lo:hi], dtype=np.float64)
        out[lo:hi] = np.minimum(x0 + np.minimum(acc, cap) * scale, x1)
    if n:
        out[n - 1] = x1
    return out


def positions(lw: np.ndarray, x1: float, x0: float = 0.0, threads: int = THREADS,
              segment: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slot positions X_i = x0 + (x1 − x0)·(running sum of w)/Σ w as (int32, float32
    fraction), the CUDA positions kernel's algorithm: w_k = exp(lw_k − M) in float32
    (1 each when every lw is −inf), accumulated in double by per-thread chunks and a
    block scan; with ``segment``, G = min(threads, ⌈n/segment⌉) contiguous segments whose
    float32 (max, Σ exp) give double segment offsets from x0 to x1, each segment then
    scanned from its offset to the next."""
    lw = np.asarray(lw, np.float32)
    n = lw.shape[0]
    M = lw.max()
    uniform = not M > -np.inf
    w = np.ones(n, np.float32) if uniform else np.exp(lw - M).astype(np.float32)
    if segment is None:
        return _put(_segment_positions(w, threads, x0, x1))
    G = min(threads, -(-n // segment))
    L = -(-n // G)
    segs = [(min(g * L, n), min(g * L + L, n)) for g in range(G)]
    t = []
    for lo, hi in segs:
        if uniform:
            t.append(float(hi - lo))
            continue
        mg = lw[lo:hi].max() if hi > lo else np.float32(-np.inf)
        if not mg > -np.inf:  # an empty or all −inf segment has no mass
            t.append(0.0)
            continue
        sg = np.float32(np.exp(lw[lo:hi] - mg, dtype=np.float32).sum(dtype=np.float32))
        t.append(float(sg) * float(np.exp(np.float64(mg) - np.float64(M))))
    excl = np.concatenate([[0.0], np.cumsum(t)[:-1]])
    total = float(np.sum(t))
    excl = np.minimum(np.maximum.accumulate(excl), total)
    scale = (x1 - x0) / total if total > 0 else 0.0
    off = np.minimum(x0 + excl * scale, x1)
    off[0] = x0
    oi, of = _put(np.concatenate([off, [x1]]))
    off = oi.astype(np.float64) + of.astype(np.float64)  # as the kernel stores and re-reads them
    out = np.empty(n, np.float64)
    for g, (lo, hi) in enumerate(segs):
        if hi > lo:
            out[lo:hi] = _segment_positions(w[lo:hi], threads, off[g], off[g + 1])
    return _put(out)


def search_positions(pos_i: np.ndarray, pos_f: np.ndarray, U: np.ndarray, count: int, first: int = 0,
                     block: int | None = None) -> np.ndarray:
    """The CUDA search: for slots j = first … first + count − 1, a_j = first i ≤ n−2 with
    "j + U_j ≤ X_i", i.e. I_i > j, or I_i = j and U_j ≤ F_i (else n − 1). ``block``: as
    the kernel, each block of that many slots first finds its first and last slot's
    ancestors and searches only between them."""
    pos_i, pos_f = np.asarray(pos_i, np.int64), np.asarray(pos_f, np.float32)
    U = np.broadcast_to(np.asarray(U, np.float32), (count,))
    n = pos_i.shape[0]

    def first_hit(j: int, lo: int, hi: int) -> int:
        jg = first + j
        while lo < hi:
            mid = (lo + hi) // 2
            hit = pos_i[mid] > jg or (pos_i[mid] == jg and U[j] <= pos_f[mid])
            lo, hi = (lo, mid) if hit else (mid + 1, hi)
        return lo

    out = np.empty(count, np.int32)
    step = block or count
    for j0 in range(0, count, step):
        j1 = min(j0 + step, count) - 1
        lo, hi = (first_hit(j0, 0, n - 1), first_hit(j1, 0, n - 1)) if block else (0, n - 1)
        for j in range(j0, j1 + 1):
            out[j] = first_hit(j, lo, hi)
    return out
