"""Systematic and stratified resampling ancestors by two small kernels.

Given log-weights lw [n] and strata uniforms U (one shared U: systematic; U_j per stratum:
stratified), slot j < m takes ancestor a_j = min{i : u_j ≤ C_i} (a_j = n − 1 if none),
with u_j = (j + U_j)/m and C the normalised CDF, C_i = Σ_{k≤i} w_k / Σ_k w_k.

1. ``cdf`` kernel (one block of 1024 threads): block max M of lw (all −inf → uniform
   weights, as the reference's ``_safe_logits``); thread t serially sums
   w_k = exp(lw_k − M) over its contiguous chunk of ⌈n/1024⌉ entries; a block exclusive
   scan (warp shuffles + one shared round) of the chunk sums gives each chunk's prefix;
   thread t re-walks its chunk writing C_k = min(prefix_k / total, 1); C_{n−1} = 1. The
   chunk starts are made monotone (a max-scan; float scans of nonnegative terms need not
   be) and each chunk is capped at the next chunk's start, so C is nondecreasing.
   For n > ``SPLIT_N`` (CUDA) the row is cut into G ≤ 1024 contiguous segments, one block
   each: segment (max, Σ exp) triples, one block scanning the rescaled segment masses into
   offsets, then each block scanning its segment from its offset as above (the prefix
   capped at the next offset, keeping C monotone across segment edges).
2. ``search`` kernel: thread j binary-searches C[0 .. n−2] for the first i with
   "u_j ≤ C_i", decided exactly as the reference ``_from_strata`` decides it in float32:
   x = m·C_i, f = ⌊x⌋; true iff f > j, or f = j and U_j ≤ x − f. It can also fill a run
   of strata j0 … j0 + k − 1 alone (a process's segment in sharded SMC). The decision is
   monotone in j (u_j grows with j), so a_j is nondecreasing: on CUDA two threads of each
   block of 256 slots search the whole CDF for the block's first and last slot and every
   thread then searches only between those two ancestors (the same first hit; a few
   cached loads instead of ⌈log₂ n⌉ dependent global ones).
   So, given the same CDF, the ancestors equal the reference's bit for bit (the reference
   counts #{j : u_j ≤ C_i}; the search inverts that count). CDFs from the kernel scan and
   from ``mx.cumsum`` differ by float32 rounding only, which can move an ancestor by one
   where a u_j falls within rounding of a C_i. Exact for m < 2^24.

The kernels equal ``genmlx.inference.resampling._from_strata(_cdf(lw), U, m)`` (the float32
decision rule on a float32 CDF). The generic path (no kernel, or m ≥ 2^24) is
``resampling._from_slots``: the same rule on int + fraction slot positions, valid for any m.
"""

from __future__ import annotations

import functools
import operator

import mlx.core as mx

from genmlx.kernels import _backend as B

MAX_M = 1 << 24  # beyond this float32 slot numbers are inexact: generic path
_SCAN_THREADS = 1024

_CUDA_CDF = r"""
  const int n = lw_shape[0];
  const int tid = threadIdx.x, T = blockDim.x;
  // 1. block max (all -inf: uniform weights)
  float m = GMX_NEG_INF_S;
  for (int i = tid; i < n; i += T) m = fmaxf(m, lw[i]);
  const float M = gmx_block_max(m);
  const bool uniform = !(M > GMX_NEG_INF_S);
  // 2. serial sum over this thread's contiguous chunk
  const int chunk = (n + T - 1) / T;
  const int lo = gmx_min(tid * chunk, n), hi = gmx_min(lo + chunk, n);
  float s = 0.f;
  for (int i = lo; i < hi; ++i) s += uniform ? 1.f : expf(lw[i] - M);
  // 3. block exclusive scan of the chunk sums; monotone chunk starts
  float total, next;
  float acc = gmx_monotone_starts(gmx_block_exscan(s, total), total, next);
  // 4. this chunk's normalised prefix sums (capped at the next chunk's start)
  for (int i = lo; i < hi; ++i) {
    acc += uniform ? 1.f : expf(lw[i] - M);
    cdf[i] = (i == n - 1) ? 1.f : fminf(fminf(acc, next) / total, 1.f);
  }
"""

_CUDA_SEARCH = r"""
  const int count = U_shape[0];
  const int n = cdf_shape[0];
  // slot j is stratum meta[0] + j of meta[1]
  const float mf = (float)meta[1];
  // first i in [lo, hi) with "u_j <= C_i" (hi if none); x = m C_i rounded before its use
  // in x - f (no contraction into an FMA, which would decide a tie differently)
  auto first_hit = [&](int j, int lo, int hi) -> int {
    const float Uj = U[(long long)j * U_strides[0]];
    const float jf = (float)(meta[0] + j);
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      const float x = __fmul_rn(mf, cdf[mid]);
      const float f = floorf(x);
      const bool hit = (f > jf) || (f == jf && Uj <= x - f);
      if (hit) hi = mid; else lo = mid + 1;
    }
    return lo;
  };
  // ancestors are nondecreasing in the slot: the block's slots j0 .. j1 have theirs in
  // [a(j0), a(j1)], so two full searches per block bound every thread's search
  __shared__ int bounds[2];
  const int j0 = blockIdx.x * blockDim.x;
  if (threadIdx.x < 2) {
    const int js = threadIdx.x == 0 ? j0 : min(j0 + (int)blockDim.x, count) - 1;
    bounds[threadIdx.x] = first_hit(js, 0, n - 1);
  }
  __syncthreads();
  const int j = j0 + threadIdx.x;
  if (j >= count) return;
  anc[j] = first_hit(j, bounds[0], bounds[1]);
"""

# Long rows (n > SPLIT_N): stage 1 is the weight-summary partial kernel (segment triples
# over G contiguous segments of L = ceil(n / G) entries); then:
_SCAN_HEADER = r"""
#define GMX_NEG_INF_S (-__int_as_float(0x7f800000))
#ifndef GMX_MIN_DEFINED
#define GMX_MIN_DEFINED
__device__ __forceinline__ long long gmx_min(long long a, long long b) { return a < b ? a : b; }
#endif
// block max (any blockDim.x multiple of 32); every thread gets the result
__device__ __forceinline__ float gmx_block_max(float v) {
  __shared__ float sh[32];
  __shared__ float res;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = (lane < nwarps) ? sh[lane] : GMX_NEG_INF_S;
    for (int off = 16; off > 0; off >>= 1) w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, off));
    if (lane == 0) res = w;
  }
  __syncthreads();
  return res;
}
// block exclusive scan of s (thread order); `total` gets the block sum in every thread
__device__ __forceinline__ float gmx_block_exscan(float s, float& total) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float incl = s;
  for (int off = 1; off < 32; off <<= 1) {
    float t = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += t;
  }
  float excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.f;
  __syncthreads();
  if (lane == 31) sh[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    float v = (lane < nwarps) ? sh[lane] : 0.f;
    for (int off = 1; off < 32; off <<= 1) {
      float t = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += t;
    }
    if (lane < nwarps) sh[lane] = v;
  }
  __syncthreads();
  total = sh[nwarps - 1];
  return excl + (warp > 0 ? sh[warp - 1] : 0.f);
}
// per-thread chunk starts made monotone (inclusive max-scan in thread order, capped at
// `limit`: float scans of nonnegative terms need not be monotone); `cap` gets the next
// thread's start (`limit` for the last thread), so chunk values min(acc, cap) are monotone
__device__ __forceinline__ float gmx_monotone_starts(float st, float limit, float& cap) {
  __shared__ float sh[32];
  __shared__ float starts[1024];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 1; off < 32; off <<= 1) {
    float t = __shfl_up_sync(0xffffffffu, st, off);
    if (lane >= off) st = fmaxf(st, t);
  }
  __syncthreads();
  if (lane == 31) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    float v = (lane < nwarps) ? sh[lane] : GMX_NEG_INF_S;
    for (int off = 1; off < 32; off <<= 1) {
      float t = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v = fmaxf(v, t);
    }
    if (lane < nwarps) sh[lane] = v;
  }
  __syncthreads();
  if (warp > 0) st = fmaxf(st, sh[warp - 1]);
  st = fminf(st, limit);
  starts[threadIdx.x] = st;
  __syncthreads();
  cap = (threadIdx.x + 1 < blockDim.x) ? starts[threadIdx.x + 1] : limit;
  return st;
}
"""

# stage 2 (one block of 1024 >= G threads): global max M over the segment maxima, segment
# masses t_g = S1_g exp(m_g - M) (segment lengths when every weight is -inf), their
# exclusive scan off[0..G-1], off[G] = total, gmax[0] = M.
_CUDA_OFFSETS = r"""
  const long long n = lw_shape[0];
  const int G = pm_shape[1];
  const long long L = (n + G - 1) / G;
  const int g = threadIdx.x;
  const float mg = (g < G) ? pm[g] : GMX_NEG_INF_S;
  const float M = gmx_block_max(mg);
  const bool uniform = !(M > GMX_NEG_INF_S);
  float t = 0.f;
  if (g < G) {
    if (uniform) {
      const long long lo = gmx_min((long long)g * L, n), hi = gmx_min(lo + L, n);
      t = (float)(hi - lo);
    } else if (mg > GMX_NEG_INF_S) {
      t = ps1[g] * expf(mg - M);
    }
  }
  float total, unused;
  const float excl = gmx_monotone_starts(gmx_block_exscan(t, total), total, unused);
  if (g < G) off[g] = excl;
  if (g == 0) { off[G] = total; gmax[0] = M; }
"""

# stage 3 (G blocks of 1024): block g scans its segment as the one-block kernel scans the
# whole row (contiguous per-thread chunks, block scan), starting at off[g]; the prefix is
# capped at off[g + 1] so that C stays monotone across segment edges despite rounding.
_CUDA_SEGMENTS = r"""
  const long long n = lw_shape[0];
  const int G = off_shape[0] - 1;
  const int g = blockIdx.x;
  const long long L = (n + G - 1) / G;
  const long long slo = gmx_min((long long)g * L, n), shi = gmx_min(slo + L, n);
  const float M = gmax[0];
  const bool uniform = !(M > GMX_NEG_INF_S);
  const float total = off[G], cap = off[g + 1];
  const long long T = blockDim.x;
  const long long chunk = (shi - slo + T - 1) / T;
  const long long lo = gmx_min(slo + (long long)threadIdx.x * chunk, shi), hi = gmx_min(lo + chunk, shi);
  float s = 0.f;
  for (long long i = lo; i < hi; ++i) s += uniform ? 1.f : expf(lw[i] - M);
  float seg_total, next;
  float acc = gmx_monotone_starts(off[g] + gmx_block_exscan(s, seg_total), cap, next);
  for (long long i = lo; i < hi; ++i) {
    acc += uniform ? 1.f : expf(lw[i] - M);
    cdf[i] = (i == n - 1) ? 1.f : fminf(fminf(acc, next) / total, 1.f);
  }
"""

# UNTESTED (no Apple GPU was available): Metal twins of the two kernels.
_METAL_CDF = r"""
  const int n = lw_shape[0];
  const int tid = (int)thread_position_in_threadgroup.x, T = (int)threads_per_threadgroup.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = T >> 5;
  threadgroup float sh[32];
  threadgroup float bcast;
  float m = -INFINITY;
  for (int i = tid; i < n; i += T) m = metal::max(m, lw[i]);
  m = simd_max(m);
  if (lane == 0) sh[warp] = m;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (warp == 0) {
    float v = (lane < nwarps) ? sh[lane] : -INFINITY;
    v = simd_max(v);
    if (lane == 0) bcast = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float M = bcast;
  const bool uniform = !(M > -INFINITY);
  const int chunk = (n + T - 1) / T;
  const int lo = metal::min(tid * chunk, n), hi = metal::min(lo + chunk, n);
  float s = 0.f;
  for (int i = lo; i < hi; ++i) s += uniform ? 1.f : metal::exp(lw[i] - M);
  float excl = simd_prefix_exclusive_sum(s);
  float incl = excl + s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 31) sh[warp] = incl;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (warp == 0) {
    float v = (lane < nwarps) ? sh[lane] : 0.f;
    v = simd_prefix_inclusive_sum(v);
    if (lane < nwarps) sh[lane] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float total = sh[nwarps - 1];
  // monotone chunk starts (running max, capped at total; one thread, T entries)
  threadgroup float starts[1024];
  starts[tid] = excl + (warp > 0 ? sh[warp - 1] : 0.f);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float r = -INFINITY;
    for (int t = 0; t < T; ++t) { r = metal::max(r, starts[t]); starts[t] = metal::min(r, total); }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float acc = starts[tid];
  const float next = (tid + 1 < T) ? starts[tid + 1] : total;
  for (int i = lo; i < hi; ++i) {
    acc += uniform ? 1.f : metal::exp(lw[i] - M);
    cdf[i] = (i == n - 1) ? 1.f : metal::min(metal::min(acc, next) / total, 1.f);
  }
"""

_METAL_SEARCH = r"""
  const int count = U_shape[0];
  const int j = (int)thread_position_in_grid.x;
  if (j >= count) return;
  const int n = cdf_shape[0];
  const float Uj = U[(long)j * U_strides[0]];
  const float mf = (float)meta[1], jf = (float)(meta[0] + j);
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const float x = mf * cdf[mid];
    const float f = metal::floor(x);
    const bool hit = (f > jf) || (f == jf && Uj <= x - f);
    if (hit) hi = mid; else lo = mid + 1;
  }
  anc[j] = lo;
"""


def _build(backend: str, which: str):
    if which == "cdf":
        src = _CUDA_CDF if backend == "cuda" else _METAL_CDF
        return B.build(backend, "genmlx_resample_cdf", ("lw",), ("cdf",), src,
                       _SCAN_HEADER if backend == "cuda" else "")
    src = _CUDA_SEARCH if backend == "cuda" else _METAL_SEARCH
    # U may be a stride-0 broadcast (systematic): it is read through its strides
    return B.build(backend, "genmlx_resample_search", ("cdf", "U", "meta"), ("anc",), src,
                   row_contiguous=False)


SPLIT_N = 1 << 17  # longer rows: the three-stage multi-block CDF (CUDA)


def cdf_kernel(backend: str, log_weights: mx.array) -> mx.array:
    """The normalised CDF [n] of softmax(log_weights): the one-block scan kernel, or for
    n > ``SPLIT_N`` (CUDA) segment triples → segment offsets → segment scans."""
    n = log_weights.shape[0]
    f32 = mx.float32
    if backend != "cuda" or n <= SPLIT_N:
        k = _build(backend, "cdf")
        (c,) = k(inputs=[log_weights], output_shapes=[(n,)], output_dtypes=[f32],
                 grid=(_SCAN_THREADS, 1, 1), threadgroup=(_SCAN_THREADS, 1, 1))
        return c
    from genmlx.kernels import weights as W

    G = min(_SCAN_THREADS, -(-n // W.SEGMENT))
    k1 = B.build(backend, "genmlx_weight_partial", ("lw",), ("pm", "ps1", "ps2"),
                 W._CUDA_PARTIAL, W._HEADER)
    pm, ps1, _ = k1(inputs=[log_weights.reshape(1, n)], output_shapes=[(1, G)] * 3,
                    output_dtypes=[f32] * 3, grid=(G * 1024, 1, 1), threadgroup=(1024, 1, 1))
    k2 = B.build(backend, "genmlx_resample_offsets", ("lw", "pm", "ps1"), ("off", "gmax"),
                 _CUDA_OFFSETS, _SCAN_HEADER)
    off, gmax = k2(inputs=[log_weights, pm, ps1], output_shapes=[(G + 1,), (1,)],
                   output_dtypes=[f32, f32], grid=(_SCAN_THREADS, 1, 1),
                   threadgroup=(_SCAN_THREADS, 1, 1))
    k3 = B.build(backend, "genmlx_resample_segments", ("lw", "off", "gmax"), ("cdf",),
                 _CUDA_SEGMENTS, _SCAN_HEADER)
    (c,) = k3(inputs=[log_weights, off, gmax], output_shapes=[(n,)], output_dtypes=[f32],
              grid=(G * _SCAN_THREADS, 1, 1), threadgroup=(_SCAN_THREADS, 1, 1))
    return c


def search_kernel(backend: str, cdf: mx.array, U: mx.array, first: int = 0,
                  strata: int | None = None) -> mx.array:
    """Ancestors [k] (int32) of the strata first … first + k − 1 of ``strata`` (default
    k: all of them) for their uniforms ``U`` [k] (a broadcast view is fine), by per-slot
    binary search of ``cdf`` with the reference's float32 decision rule."""
    k = U.shape[0]
    meta = mx.array([first, k if strata is None else strata], dtype=mx.int32)
    t = 256
    (a,) = _build(backend, "search")(inputs=[mx.contiguous(cdf), U, meta], output_shapes=[(k,)],
                                  output_dtypes=[mx.int32],
                                  grid=(t * ((k + t - 1) // t), 1, 1), threadgroup=(t, 1, 1))
    return a


def _generic(U: mx.array, log_weights: mx.array, m: int) -> mx.array:
    from genmlx.inference import resampling as R  # lazy: resampling imports this package

    return R._from_slots(log_weights, U, m)


def _check(name: str, U: mx.array, log_weights: mx.array, m, per_slot: bool) -> int:
    try:
        m = operator.index(m)
    except TypeError:
        raise ValueError(f"{name}: m must be a positive int, got {m!r}") from None
    if m < 1:
        raise ValueError(f"{name}: m must be a positive int, got {m!r}")
    if log_weights.ndim != 1 or log_weights.shape[0] < 1:
        raise ValueError(f"{name}: log_weights must have shape [n] with n ≥ 1, got {log_weights.shape}")
    u_shape = (m,) if per_slot else ()
    if tuple(U.shape) != u_shape:
        raise ValueError(f"{name}: uniforms must have shape {u_shape}, got {tuple(U.shape)}")
    return m


def _dispatch(U: mx.array, log_weights: mx.array, m: int) -> mx.array:
    backend = B.use_kernel(log_weights)
    if backend is None or m >= MAX_M or U.dtype != mx.float32:
        return _generic(U, log_weights, m)

    return _transformable(backend, m)(U, log_weights)[0]


@functools.lru_cache(maxsize=64)
def _transformable(backend: str, m: int):
    def kernel_fn(u, lw):
        uu = mx.broadcast_to(u, (m,)) if u.ndim == 0 else u
        return (search_kernel(backend, cdf_kernel(backend, lw), uu),)

    return B.with_generic_transforms(kernel_fn, lambda u, lw: (_generic(u, lw, m),),
                                     n_out=1, differentiable=False)


def resample_systematic(u: mx.array, log_weights: mx.array, m: int) -> mx.array:
    """Systematic ancestors [m] (int32, sorted): u_j = (j + u)/m for one u ~ U(0, 1)
    (a scalar array drawn by the caller from an explicit key)."""
    u = mx.array(u) if not isinstance(u, mx.array) else u
    m = _check("resample_systematic", u, log_weights, m, per_slot=False)
    return _dispatch(u, log_weights, m)


def resample_stratified(U: mx.array, log_weights: mx.array, m: int) -> mx.array:
    """Stratified ancestors [m] (int32, sorted): u_j = (j + U_j)/m, U [m] i.i.d. U(0, 1)
    drawn by the caller from an explicit key."""
    m = _check("resample_stratified", U, log_weights, m, per_slot=True)
    return _dispatch(U, log_weights, m)
