"""Ancestral paths of a particle filter in ONE kernel: the descent rows and the gathered
per-step arrays of every final particle.

A filter that keeps, for each step t, its (pre-resampling) arrays x_t [n, …] and its
ancestor indices a_t [n] (the identity where it did not resample) rebuilds the paths at
the end: D_{T−1} = a_{T−1}, D_t = a_t[D_{t+1}], and path_t = x_t[D_t]. With MLX ops that
is a gather per composition plus one concatenation of the T vectors (a copy kernel per
input on a GPU) per array kind, hundreds of kernel launches for T = 100. The kernel
here takes the T·(J + 1) arrays as its inputs and writes D [T, n] and the J paths
[T, n, …] in one launch: thread i walks its ancestry backwards, t = T−1 … 0, copying row
D_t[i] of every x_t. The code is generated per (T, row types, row sizes): the steps are
unrolled, so each input is named in straight-line code.

:func:`ancestral_paths` dispatches: the kernel on a CUDA device for at most
:data:`MAX_INPUTS` arrays (the kernel parameters are one pointer each), otherwise
:func:`ancestral_paths_generic`, the MLX-ops reference. Integer compositions and copies:
both give the same values bit for bit (``tests/kernels/test_kernels.py``, passed on an
H200). It stays opt-in (``GENMLX_KERNELS=1`` or ``_backend.override("1")``) until it is
timed against the one-process path of row-gather kernels. :func:`halo_paths`, its sharded
twin (lineages through the neighbours' halo edges), is on by default on CUDA: on two H200s
it cut the end of a 3·10⁷-particle run from 49 to 23 ms.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from genmlx.kernels import _backend as B
from genmlx.kernels._rows import WORD as _WORD, prelude, row_copy

MAX_INPUTS = 480  # pointers in the kernel's parameter block (4 KiB with the outputs)
THREADS = 256


def ancestral_paths_generic(idxs: list, xs: list) -> tuple:
    """Reference: (D [T, n] int32, [path_j [T, n, …] for each kind j]) from the ancestor
    vectors ``idxs`` (T arrays [n], int32) and ``xs`` (J lists of T arrays [n, …])."""
    T = len(idxs)
    D, rows = idxs[T - 1], [None] * T
    rows[T - 1] = D
    for t in range(T - 2, -1, -1):
        D = mx.take(idxs[t], D, axis=0)
        rows[t] = D
    Dm = mx.stack(rows)
    paths = []
    for col in xs:
        block = mx.stack(col)
        paths.append(mx.take_along_axis(block, Dm.reshape(Dm.shape + (1,) * (block.ndim - 2)), axis=1))
    return Dm, paths


def _step_loop_head(T: int, words: list, ancestors: dict, k_var: bool) -> list:
    """The head of a kernel loop over the steps t = T − 1 … 0 whose ``switch`` on t points
    ``x{j}`` at step t's input ``x{j}_{t}`` (as words ``words[j]``) and ``a`` at its
    ancestor input ``ancestors[t]`` (``a{k}``; with ``k_var`` also setting ``k``, −1 for
    a step without one). The caller writes the loop's body and its closing brace."""
    lines = ["#pragma unroll 1",
             f"for (int t = {T - 1}; t >= 0; --t) {{",
             "  const int* a = nullptr;" + (" int k = -1;" if k_var else "")]
    lines += [f"  const {w}* x{j} = nullptr;" for j, w in enumerate(words)]
    lines.append("  switch (t) {")
    for t in range(T):
        picks = " ".join(f"x{j} = reinterpret_cast<const {w}*>(x{j}_{t});" for j, w in enumerate(words))
        if t in ancestors:
            k = ancestors[t]
            picks += f" a = a{k};" + (f" k = {k};" if k_var else "")
        lines.append(f"    case {t}: {picks} break;")
    return lines + ["  }"]


def _source(T: int, kinds: tuple) -> str:
    """The kernel body: ``kinds`` = ((bytes per element, elements per particle row), …)
    of the J arrays, copied row by row as unsigned words of the element's size. The
    steps are a loop whose ``switch`` on t picks that step's pointers, as in
    :func:`_halo_source` (here unrolled code needed 24 registers at T = 100, the loop 16)."""
    words = [_WORD[b] for b, _ in kinds]
    lines = ["const int n = a0_shape[0];",
             "const int i = blockIdx.x * blockDim.x + threadIdx.x;",
             "if (i >= n) return;",
             "int r = i;"]
    lines += _step_loop_head(T, words, {t: t for t in range(T)}, False)
    lines.append("  r = a[r]; D[(size_t)t * n + i] = r;")
    for j, (b, w) in enumerate(kinds):
        lines.append("  " + row_copy(words[j], b, w, f"x{j} + (size_t)r * {w}",
                                     f"reinterpret_cast<{words[j]}*>(p{j}) + ((size_t)t * n + i) * {w}"))
    lines.append("}")
    return "\n".join(prelude(kinds) + lines)


def names(T: int, J: int) -> tuple:
    """(input names, output names) of the kernel for T steps and J array kinds."""
    return (tuple(f"a{t}" for t in range(T)) + tuple(f"x{j}_{t}" for j in range(J) for t in range(T)),
            ("D",) + tuple(f"p{j}" for j in range(J)))


def kernel_name(T: int, kinds: tuple) -> str:
    return f"genmlx_paths_T{T}_" + "_".join(f"w{b}x{w}" for b, w in kinds)


@functools.lru_cache(maxsize=32)
def _kernel(backend: str, T: int, kinds: tuple):
    ins, outs = names(T, len(kinds))
    return B.build(backend, kernel_name(T, kinds), ins, outs, _source(T, kinds))


def _kind(x: mx.array) -> tuple | None:
    """(bytes per element, elements per particle row) to copy rows of ``x`` [n, …] by
    (words of the element's size: aligned wherever the array's elements are), or None
    for an empty row or an unknown element size."""
    row = 1
    for d in x.shape[1:]:
        row *= d
    b = x.dtype.size
    return (b, row) if row > 0 and b in _WORD else None


def usable(idxs: list, xs: list) -> str | None:
    """The backend to run the kernel on, or None (the generic path applies)."""
    backend = B.active_backend() if B.mode() == "1" else None  # opt-in (module docstring)
    if backend != "cuda" or not idxs or any(i is None or i.dtype != mx.int32 or i.ndim != 1 for i in idxs):
        return None
    T, n = len(idxs), idxs[0].shape[0]
    if T * (len(xs) + 1) > MAX_INPUTS or any(len(c) != T for c in xs):
        return None
    for col in xs:
        k = _kind(col[0])
        if k is None or any(x.shape != col[0].shape or x.dtype != col[0].dtype or x.shape[0] != n
                            for x in col):
            return None
    return backend


def ancestral_paths(idxs: list, xs: list) -> tuple:
    """(D [T, n] int32, [path_j [T, n, …]]) as :func:`ancestral_paths_generic`, by ONE
    kernel launch where :func:`usable` allows (never under ``mx.vmap``: SMC's end of run
    only)."""
    backend = usable(idxs, xs)
    if backend is None:
        return ancestral_paths_generic(idxs, xs)
    T, n = len(idxs), idxs[0].shape[0]
    kinds = tuple(_kind(col[0]) for col in xs)
    k = _kernel(backend, T, kinds)
    outs = k(inputs=list(idxs) + [x for col in xs for x in col],
             output_shapes=[(T, n)] + [(T,) + tuple(col[0].shape) for col in xs],
             output_dtypes=[mx.int32] + [col[0].dtype for col in xs],
             grid=(THREADS * ((n + THREADS - 1) // THREADS), 1, 1), threadgroup=(THREADS, 1, 1))
    return outs[0], list(outs[1:])


# -- sharded particles: the paths from a process's blocks and its neighbours' edges ------
def halo_names(T: int, K: int, J: int) -> tuple:
    """(input names, output names) of the halo-paths kernel: the K own ancestor blocks,
    the T·J own kept arrays, the gathered ancestor edges, the J gathered kept edges."""
    return (tuple(f"a{k}" for k in range(K)) + tuple(f"x{j}_{t}" for j in range(J) for t in range(T))
            + ("EA",) + tuple(f"EX{j}" for j in range(J)),
            tuple(f"p{j}" for j in range(J)) + ("bad_out",))


def _halo_source(flags: tuple, kinds: tuple, r: int, R: int, H: int, m: int) -> str:
    """Kernel body of :func:`halo_paths` (constants baked in): thread i follows its slot's
    lineage backwards in global rows g (g = r·m + i at the end; a flagged step t maps g to
    a_t[g]) and copies row g of every kept x_t; a row g is read from the own block
    (column c = g − (r·m − H) in [H, H + m)), the lower neighbour's last H rows (c < H) or
    the upper neighbour's first H rows (c ≥ H + m). A row outside them (or past the first
    or last process) marks the slot in ``bad_out`` (the caller then takes the MLX path).

    The steps are a loop (not unrolled) whose ``switch`` on t picks that step's input
    pointers: unrolled straight-line code (session 14's timed version, 17.4 ms for
    1.5·10⁷ lineages of T = 100 steps on an H200) kept one pointer per step and array
    live — 75 registers per thread, 37.5 % occupancy, too few dependent read chains in
    flight; the loop needs 18–24 whatever T (``nvcc -Xptxas -v``). Not yet timed on a
    GPU; run as C++ on the CPU it equals the statement (tests/kernels/
    test_kernel_bodies_on_cpu.py), as the unrolled body did."""
    T, K = len(flags), sum(flags)
    lo_ok = "true" if r > 0 else "false"
    hi_ok = "true" if r + 1 < R else "false"
    words = [_WORD[b] for b, _ in kinds]
    k_of, k = {}, K
    for t in range(T - 1, -1, -1):
        if flags[t]:
            k -= 1
            k_of[t] = k
    lines = [f"const long long m = {m}, H = {H}, base = {r * m - H}LL;",
             "const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
             "if (i >= m) return;",
             f"long long g = {r * m}LL + i;",
             "int bad = 0;",
             "long long c;",
             # the column of g in [below, own, above], clamped; bad when outside the halos
             f"#define COL(G) (c = (G) - base, bad |= (c < 0 || c >= m + 2 * H || (c < H && !{lo_ok}) "
             f"|| (c >= H + m && !{hi_ok})), c = c < 0 ? 0 : (c >= m + 2 * H ? m + 2 * H - 1 : c))"]
    lines += _step_loop_head(T, words, k_of, True)
    lines += [f"  if (k >= 0) {{ COL(g); g = c < H ? (long long)EA[({max(r - 1, 0)}LL * {K} + k) * 2 * H + H + c] "
              f": (c < H + m ? (long long)a[c - H] : (long long)EA[({min(r + 1, R - 1)}LL * {K} + k) * 2 * H "
              f"+ (c - H - m)]); }}",
              "  COL(g);"]
    for j, (b, w) in enumerate(kinds):
        word = words[j]
        low = f"reinterpret_cast<const {word}*>(EX{j}) + (({max(r - 1, 0)}LL * {T} + t) * 2 * H + H + c) * {w}"
        high = f"reinterpret_cast<const {word}*>(EX{j}) + (({min(r + 1, R - 1)}LL * {T} + t) * 2 * H + (c - H - m)) * {w}"
        dst = f"reinterpret_cast<{word}*>(p{j}) + ((long long)t * m + i) * {w}"
        lines.append("  " + row_copy(word, b, w, f"c < H ? {low} : (c < H + m ? x{j} + (c - H) * {w} : {high})", dst))
    lines += ["}", "#undef COL", "bad_out[i] = (uint8_t)bad;"]
    return "\n".join(prelude(kinds) + lines)


def halo_kernel_name(flags: tuple, kinds: tuple, r: int, R: int, H: int, m: int) -> str:
    fl = "".join("1" if f else "0" for f in flags)
    return (f"genmlx_halo_paths_{int(fl, 2):x}_T{len(flags)}_r{r}of{R}_H{H}_m{m}_"
            + "_".join(f"w{b}x{w}" for b, w in kinds))


@functools.lru_cache(maxsize=16)
def _halo_kernel(backend: str, flags: tuple, kinds: tuple, r: int, R: int, H: int, m: int):
    ins, outs = halo_names(len(flags), sum(flags), len(kinds))
    return B.build(backend, halo_kernel_name(flags, kinds, r, R, H, m), ins, outs,
                   _halo_source(flags, kinds, r, R, H, m))


def halo_usable(idxs: list, flags: tuple, xs: list) -> str | None:
    """The backend for :func:`halo_paths` (on by default on CUDA: timed and tested on two
    H200s, unlike :func:`ancestral_paths`), or None."""
    backend = B.active_backend()
    if backend != "cuda" or not any(flags):
        return None
    T, K = len(flags), sum(flags)
    if K + T * len(xs) + 1 + 2 * len(xs) + 1 > MAX_INPUTS:
        return None
    if any(idxs[t] is None or idxs[t].dtype != mx.int32 for t in range(T) if flags[t]):
        return None
    for col in xs:
        if len(col) != T or _kind(col[0]) is None or any(x.shape != col[0].shape or x.dtype != col[0].dtype
                                                          for x in col):
            return None
    return backend


def halo_paths(idxs: list, flags: tuple, EA: mx.array, xs: list, EX: list, r: int, R: int, H: int) -> tuple:
    """Process r's paths [T, m, …] of the kept arrays ``xs`` (J lists of T own blocks
    [m, …]) along its slots' lineages, and a device flag ``miss`` (nonzero: some lineage
    left the neighbours' H-row halos; the paths are then wrong). ``idxs``:
    the T own ancestor blocks [m] (global rows; used where ``flags``), ``EA``: every
    process's first and last H entries of each flagged block ([R·K, 2H]), ``EX``: per
    kind every process's first and last H rows of each step ([R·T, 2H, …]). ONE kernel
    (:func:`_halo_source`); :func:`halo_paths_reference` is the NumPy statement of it."""
    backend = halo_usable(idxs, flags, xs)
    if backend is None:
        raise ValueError("halo_paths: the kernel is not usable here (see halo_usable)")
    m, T = int(xs[0][0].shape[0]), len(flags)
    kinds = tuple(_kind(col[0]) for col in xs)
    k = _halo_kernel(backend, tuple(bool(f) for f in flags), kinds, r, R, H, m)
    own = [idxs[t] for t in range(T) if flags[t]]
    outs = k(inputs=own + [x for col in xs for x in col] + [EA] + list(EX),
             output_shapes=[(T,) + tuple(col[0].shape) for col in xs] + [(m,)],
             output_dtypes=[col[0].dtype for col in xs] + [mx.uint8],
             grid=(THREADS * ((m + THREADS - 1) // THREADS), 1, 1), threadgroup=(THREADS, 1, 1))
    return list(outs[:-1]), mx.max(outs[-1])


def halo_paths_reference(idxs: list, flags: tuple, EA, xs: list, EX: list, r: int, R: int, H: int) -> tuple:
    """:func:`halo_paths` in NumPy, thread by thread vectorized over the slots (the
    kernel's statement; tests compare it with the MLX-ops sharded path)."""
    import numpy as np

    T, K = len(flags), sum(flags)
    m = int(np.asarray(xs[0][0]).shape[0])
    base = r * m - H
    EA = np.asarray(EA).reshape(R, K, 2 * H)
    g = r * m + np.arange(m, dtype=np.int64)
    bad = np.zeros(m, bool)

    def col(g):
        c = g - base
        b = (c < 0) | (c >= m + 2 * H) | ((c < H) & (r == 0)) | ((c >= H + m) & (r + 1 == R))
        return np.clip(c, 0, m + 2 * H - 1), b

    outs = [np.zeros((T,) + np.asarray(c[0]).shape, np.asarray(c[0]).dtype) for c in xs]
    k = K
    for t in range(T - 1, -1, -1):
        if flags[t]:
            k -= 1
            c, b = col(g)
            bad |= b
            ext = np.concatenate([EA[max(r - 1, 0), k, H:], np.asarray(idxs[t]), EA[min(r + 1, R - 1), k, :H]])
            g = ext[c].astype(np.int64)
        c, b = col(g)
        bad |= b
        for j, colj in enumerate(xs):
            e = np.asarray(EX[j]).reshape((R, T, 2 * H) + np.asarray(colj[t]).shape[1:])
            ext = np.concatenate([e[max(r - 1, 0), t, H:], np.asarray(colj[t]), e[min(r + 1, R - 1), t, :H]])
            outs[j][t] = ext[c]
    return outs, int(bad.any())
