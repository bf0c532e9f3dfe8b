"""NumPy emulations of the kernels' algorithms, thread by thread (float32 throughout).

They validate the algorithms on any machine: chunked scan + binary search must agree
with the MLX reference (``genmlx.inference.resampling``) in their tie handling, and the
online (max, S1, S2) merge with ``logsumexp``. The block scan here adds chunk sums left to
right, so the emulated CDF equals the GPU's only up to float32 rounding order.
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


def _block_scan(lw: np.ndarray, M, uniform: bool, threads: int, start,
                limit=None) -> tuple[np.ndarray, np.float32]:
    """One block's chunked scan of exp(lw − M) from ``start``: (prefix sums, block total).
    Threads own contiguous chunks of ⌈len/threads⌉ entries; chunk starts are made monotone
    (running max, capped at ``limit``, the block total when None) and each chunk is capped
    at the next chunk's start, as in the kernels."""
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
    lim = total if limit is None else np.float32(limit)
    starts = np.minimum(np.maximum.accumulate(
        np.array([np.float32(start + p) for p in prefix], np.float32)), lim)
    out = np.empty(n, np.float32)
    for t, (lo, hi) in enumerate(bounds):
        acc, cap = starts[t], starts[t + 1] if t + 1 < threads else lim
        for i in range(lo, hi):
            acc = np.float32(acc + w[i])
            out[i] = min(acc, cap)
    return out, total


def cdf(lw: np.ndarray, threads: int = THREADS, segment: int | None = None) -> np.ndarray:
    """Normalised CDF by the chunked scan: max; per-thread serial chunk sums; exclusive
    scan of the chunk sums; each chunk re-walked from its (monotone) start, capped at the
    next one; C_{n−1} = 1.

    With ``segment``: the multi-block variant — G = min(threads, ⌈n/segment⌉) contiguous
    segments; segment triples (max m_g, Σ exp(lw − m_g)); masses t_g = S_g exp(m_g − M)
    scanned into offsets; each segment scanned from its offset, capped at the next one."""
    lw = np.asarray(lw, np.float32)
    n = lw.shape[0]
    M = lw.max()
    uniform = not M > -np.inf
    if segment is None:
        pre, total = _block_scan(lw, M, uniform, threads, np.float32(0))
    else:
        G = min(threads, -(-n // segment))
        L = -(-n // G)
        segs = [(min(g * L, n), min(g * L + L, n)) for g in range(G)]
        t = []
        for lo, hi in segs:
            if uniform:
                t.append(np.float32(hi - lo))
                continue
            mg = lw[lo:hi].max() if hi > lo else np.float32(-np.inf)
            if not mg > -np.inf:  # an empty or all −inf segment has no mass
                t.append(np.float32(0))
                continue
            sg = np.float32(np.exp(lw[lo:hi] - mg, dtype=np.float32).sum(dtype=np.float32))
            t.append(np.float32(sg * np.exp(mg - M)))
        off = np.concatenate([[0], np.cumsum(np.array(t, np.float32), dtype=np.float32)]).astype(np.float32)
        off[:G] = np.minimum(np.maximum.accumulate(off[:G]), off[G])
        total = off[G]
        pre = np.empty(n, np.float32)
        for g, (lo, hi) in enumerate(segs):
            if hi > lo:
                pre[lo:hi] = _block_scan(lw[lo:hi], M, uniform, threads, off[g], off[g + 1])[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.minimum((pre / total).astype(np.float32), np.float32(1))
    out[n - 1] = 1
    return out


def search(cdf: np.ndarray, U: np.ndarray, m: int, block: int | None = None) -> np.ndarray:
    """Ancestors a_j = first i ≤ n−2 with "u_j ≤ C_i" (else n − 1), decided in float32 as
    x = m·C_i, f = ⌊x⌋: f > j, or f = j and U_j ≤ x − f. ``block``: as the CUDA kernel,
    each block of that many slots first finds its first and last slot's ancestors and
    searches only between them."""
    cdf = np.asarray(cdf, np.float32)
    U = np.broadcast_to(np.asarray(U, np.float32), (m,))
    n, mf = cdf.shape[0], np.float32(m)

    def first_hit(j: int, lo: int, hi: int) -> int:
        while lo < hi:
            mid = (lo + hi) // 2
            x = np.float32(mf * cdf[mid])
            f = np.floor(x)
            hit = f > j or (f == j and U[j] <= np.float32(x - f))
            lo, hi = (lo, mid) if hit else (mid + 1, hi)
        return lo

    out = np.empty(m, np.int32)
    step = block or m
    for j0 in range(0, m, step):
        j1 = min(j0 + step, m) - 1
        lo, hi = (first_hit(j0, 0, n - 1), first_hit(j1, 0, n - 1)) if block else (0, n - 1)
        for j in range(j0, j1 + 1):
            out[j] = first_hit(j, lo, hi)
    return out
