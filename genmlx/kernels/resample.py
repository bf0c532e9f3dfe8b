"""Systematic and stratified resampling ancestors by two small kernels.

Given log-weights lw [n] and strata uniforms U (one shared U: systematic; U_j per stratum:
stratified), slot j < m takes ancestor a_j = min{i : j + U_j ≤ X_i} (a_j = n − 1 if none),
where X_i = m · Σ_{k≤i} w_k / Σ_k w_k is particle i's CDF value in units of slots (its
*slot position*), written as an int32 part and a float32 fraction in [0, 1).

CUDA (any m < 2^31):

1. ``positions`` kernel (one block of 1024 threads): block max M of lw (all −inf →
   uniform weights, as the reference's ``_safe_logits``); thread t serially sums
   w_k = expf(lw_k − M) in double over its contiguous chunk of ⌈n/1024⌉ entries; a block
   exclusive scan (double; warp shuffles + one shared round) of the chunk sums gives each
   chunk's prefix; thread t re-walks its chunk writing X_k = x₀ + (x₁ − x₀)·prefix_k/total
   (x₀ = 0, x₁ = m for one process; a process's global slot range in sharded SMC), the
   last one exactly x₁. The chunk starts are made monotone (a max-scan) and each chunk is
   capped at the next chunk's start, so X is nondecreasing. Double accumulation keeps X
   within ~10⁻⁹ slots of the exact positions at any n and m; a float32 CDF resolves only
   2^−24 of the total (0.6 slots at m = 10⁷; at m ≥ 2^24 its m·C is an even integer and
   every decision "U ≤ frac(m·C)" fails, so every count came out even).
   For n > ``SPLIT_N`` the row is cut into G ≤ 1024 contiguous segments, one block each:
   segment (max, Σ exp) triples (the weight-summary partial kernel), one block scanning
   the segment masses (double) into segment offsets (positions), then each block
   scanning its segment from its offset to the next one as above.
2. ``search`` kernel: thread j binary-searches X[0 .. n−2] for the first i with
   "j + U_j ≤ X_i", i.e. I_i > j, or I_i = j and U_j ≤ F_i — the reference's decision
   (``resampling._points_below``) on the same positions, so the ancestors equal the
   reference's bit for bit given the same positions. It can also fill a run of slots
   j0 … j0 + k − 1 alone (a process's segment in sharded SMC, positions in global slots).
   The decision is monotone in j, so a_j is nondecreasing: two threads of each block of
   256 slots search the whole row for the block's first and last slot and every thread
   then searches only between those two ancestors.

The generic path (no kernel) is ``resampling._from_slots``: the same rule on slot
positions from float32 int + fraction prefix sums (~10⁻³ slots), valid for any m.

Metal (opt-in, untested): a float32 CDF C and the decision x = m·C, f = ⌊x⌋, "f > j or
f = j and U_j ≤ x − f" — exact only for m < 2^24 (``MAX_M``; beyond, the generic path).
"""

from __future__ import annotations

import functools
import operator

import mlx.core as mx

from genmlx.kernels import _backend as B

MAX_M = 1 << 24  # Metal's float32 slot numbers are inexact beyond this: generic path
_SCAN_THREADS = 1024

_CUDA_HEADER = r"""
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
// block exclusive scan of s (thread order, double); `total` gets the block sum everywhere
__device__ __forceinline__ double gmx_block_exscan(double s, double& total) {
  __shared__ double sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  double incl = s;
  for (int off = 1; off < 32; off <<= 1) {
    double t = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += t;
  }
  double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
  __syncthreads();
  if (lane == 31) sh[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double v = (lane < nwarps) ? sh[lane] : 0.0;
    for (int off = 1; off < 32; off <<= 1) {
      double t = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += t;
    }
    if (lane < nwarps) sh[lane] = v;
  }
  __syncthreads();
  total = sh[nwarps - 1];
  return excl + (warp > 0 ? sh[warp - 1] : 0.0);
}
// per-thread chunk starts made monotone (inclusive max-scan in thread order, capped at
// `limit`: scans of nonnegative terms in different orders need not be monotone); `cap`
// gets the next thread's start (`limit` for the last thread)
__device__ __forceinline__ double gmx_monotone_starts(double st, double limit, double& cap) {
  __shared__ double sh[32];
  __shared__ double starts[1024];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 1; off < 32; off <<= 1) {
    double t = __shfl_up_sync(0xffffffffu, st, off);
    if (lane >= off) st = fmax(st, t);
  }
  __syncthreads();
  if (lane == 31) sh[warp] = st;
  __syncthreads();
  if (warp == 0) {
    double v = (lane < nwarps) ? sh[lane] : -1.0;
    for (int off = 1; off < 32; off <<= 1) {
      double t = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v = fmax(v, t);
    }
    if (lane < nwarps) sh[lane] = v;
  }
  __syncthreads();
  if (warp > 0) st = fmax(st, sh[warp - 1]);
  st = fmin(st, limit);
  starts[threadIdx.x] = st;
  __syncthreads();
  cap = (threadIdx.x + 1 < blockDim.x) ? starts[threadIdx.x + 1] : limit;
  return st;
}
// a slot position x >= 0 as (int part, float fraction in [0, 1))
__device__ __forceinline__ void gmx_put_position(int32_t* pi, float* pf, long long i, double x) {
  const double fl = floor(x);
  int k = (int)fl;
  float f = (float)(x - fl);
  if (f >= 1.f) { k += 1; f = 0.f; }
  pi[i] = k;
  pf[i] = f;
}
__device__ __forceinline__ double gmx_get_position(const int32_t* pi, const float* pf, long long i) {
  return (double)pi[i] + (double)pf[i];
}
// positions of lw[slo .. shi) by one block: from x0 (before slo) to x1 (exactly, at
// shi - 1) in proportion to the running sums of expf(lw - M) (1 each when `uniform`):
// contiguous per-thread chunks summed in double, a block scan of the chunk sums,
// monotone chunk starts, each chunk capped at the next start
__device__ __forceinline__ void gmx_segment_positions(const float* lw, long long slo, long long shi,
                                                      float M, bool uniform, double x0, double x1,
                                                      int32_t* pi, float* pf) {
  const long long T = blockDim.x;
  const long long chunk = (shi - slo + T - 1) / T;
  const long long lo = gmx_min(slo + (long long)threadIdx.x * chunk, shi), hi = gmx_min(lo + chunk, shi);
  double s = 0.0;
  for (long long i = lo; i < hi; ++i) s += uniform ? 1.0 : (double)expf(lw[i] - M);
  double total, next;
  double acc = gmx_monotone_starts(gmx_block_exscan(s, total), total, next);
  const double scale = total > 0.0 ? (x1 - x0) / total : 0.0;
  for (long long i = lo; i < hi; ++i) {
    acc += uniform ? 1.0 : (double)expf(lw[i] - M);
    const double x = (i == shi - 1) ? x1 : fmin(x0 + fmin(acc, next) * scale, x1);
    gmx_put_position(pi, pf, i, x);
  }
}
"""

# one block (n <= SPLIT_N): the whole row from ends[0] to ends[1]
_CUDA_POSITIONS = r"""
  const long long n = lw_shape[0];
  float v = GMX_NEG_INF_S;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) v = fmaxf(v, lw[i]);
  const float M = gmx_block_max(v);
  gmx_segment_positions(lw, 0, n, M, !(M > GMX_NEG_INF_S), gmx_get_position(ends_i, ends_f, 0),
                        gmx_get_position(ends_i, ends_f, 1), pos_i, pos_f);
"""

# long rows (n > SPLIT_N): stage 1 is the weight-summary partial kernel (segment triples
# over G contiguous segments of L = ceil(n / G) entries); stage 2 (one block of 1024 >= G
# threads): global max M over the segment maxima, segment masses t_g = S1_g exp(m_g - M)
# (segment lengths when every weight is -inf), their exclusive scan (double) as positions
# off[g] from ends[0], off[G] = ends[1] exactly, gmax[0] = M.
_CUDA_OFFSETS = r"""
  const long long n = lw_shape[0];
  const int G = pm_shape[1];
  const long long L = (n + G - 1) / G;
  const int g = threadIdx.x;
  const float mg = (g < G) ? pm[g] : GMX_NEG_INF_S;
  const float M = gmx_block_max(mg);
  const bool uniform = !(M > GMX_NEG_INF_S);
  double t = 0.0;
  if (g < G) {
    if (uniform) {
      const long long lo = gmx_min((long long)g * L, n), hi = gmx_min(lo + L, n);
      t = (double)(hi - lo);
    } else if (mg > GMX_NEG_INF_S) {
      t = (double)ps1[g] * exp((double)mg - (double)M);
    }
  }
  double total, unused;
  const double excl = gmx_monotone_starts(gmx_block_exscan(t, total), total, unused);
  const double x0 = gmx_get_position(ends_i, ends_f, 0), x1 = gmx_get_position(ends_i, ends_f, 1);
  const double scale = total > 0.0 ? (x1 - x0) / total : 0.0;
  if (g < G) gmx_put_position(off_i, off_f, g, g == 0 ? x0 : fmin(x0 + excl * scale, x1));
  if (g == 0) {
    gmx_put_position(off_i, off_f, G, x1);
    gmax[0] = M;
  }
"""

# stage 3 (G blocks of 1024): block g scans its segment from off[g] to off[g + 1]
_CUDA_SEGMENTS = r"""
  const long long n = lw_shape[0];
  const int G = off_i_shape[0] - 1;
  const int g = blockIdx.x;
  const long long L = (n + G - 1) / G;
  const long long slo = gmx_min((long long)g * L, n), shi = gmx_min(slo + L, n);
  const float M = gmax[0];
  gmx_segment_positions(lw, slo, shi, M, !(M > GMX_NEG_INF_S), gmx_get_position(off_i, off_f, g),
                        gmx_get_position(off_i, off_f, g + 1), pos_i, pos_f);
"""

_CUDA_SEARCH = r"""
  const int count = U_shape[0];
  const int n = pos_i_shape[0];
  // slot j is global slot meta[0] + j; first i in [lo, hi) with j + U_j <= X_i (hi if none)
  auto first_hit = [&](int j, int lo, int hi) -> int {
    const float Uj = U[(long long)j * U_strides[0]];
    const int jg = meta[0] + j;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      const int k = pos_i[mid];
      const bool hit = (k > jg) || (k == jg && Uj <= pos_f[mid]);
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

# UNTESTED (no Apple GPU was available): the Metal pair, a float32 CDF and the float32
# decision on m·C (exact for m < MAX_M).
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
    if backend == "metal":
        if which == "cdf":
            return B.build(backend, "genmlx_resample_cdf", ("lw",), ("cdf",), _METAL_CDF)
        # U may be a stride-0 broadcast (systematic): it is read through its strides
        return B.build(backend, "genmlx_resample_search", ("cdf", "U", "meta"), ("anc",), _METAL_SEARCH,
                       row_contiguous=False)
    if which == "positions":
        return B.build(backend, "genmlx_resample_positions", ("lw", "ends_i", "ends_f"), ("pos_i", "pos_f"),
                       _CUDA_POSITIONS, _CUDA_HEADER)
    if which == "offsets":
        return B.build(backend, "genmlx_resample_offsets", ("lw", "pm", "ps1", "ends_i", "ends_f"),
                       ("off_i", "off_f", "gmax"), _CUDA_OFFSETS, _CUDA_HEADER)
    if which == "segments":
        return B.build(backend, "genmlx_resample_segments", ("lw", "off_i", "off_f", "gmax"),
                       ("pos_i", "pos_f"), _CUDA_SEGMENTS, _CUDA_HEADER)
    return B.build(backend, "genmlx_resample_search", ("pos_i", "pos_f", "U", "meta"), ("anc",), _CUDA_SEARCH,
                   _CUDA_HEADER, row_contiguous=False)


SPLIT_N = 1 << 17  # longer rows: the three-stage multi-block scan (CUDA)


def _ends(ends) -> tuple[mx.array, mx.array]:
    """Slot positions (x₀, x₁) as (int32 [2], float32 [2]) from an int m (x₀ = 0, x₁ = m)
    or from a pair (int parts [2], fractions [2]) of arrays."""
    if isinstance(ends, tuple):
        return ends[0].astype(mx.int32), ends[1].astype(mx.float32)
    # constants, not mx.zeros: no fill kernel in a compiled step
    return mx.array([0, operator.index(ends)], dtype=mx.int32), mx.array([0.0, 0.0], dtype=mx.float32)


def positions_kernel(log_weights: mx.array, ends) -> tuple[mx.array, mx.array]:
    """Slot positions X_i = x₀ + (x₁ − x₀)·Σ_{k≤i} w_k / Σ_k w_k of softmax(log_weights)
    (CUDA), as (int32 [n], float32 fractions [n]), nondecreasing, the last exactly x₁;
    ``ends`` = m (x₀ = 0, x₁ = m) or (int parts [2], fractions [2]) of (x₀, x₁). One block
    for n ≤ ``SPLIT_N``, else segment triples → segment offsets → segment scans."""
    n = log_weights.shape[0]
    f32, i32 = mx.float32, mx.int32
    ei, ef = _ends(ends)
    if n <= SPLIT_N:
        pi, pf = _build("cuda", "positions")(inputs=[log_weights, ei, ef], output_shapes=[(n,), (n,)],
                                             output_dtypes=[i32, f32], grid=(_SCAN_THREADS, 1, 1),
                                             threadgroup=(_SCAN_THREADS, 1, 1))
        return pi, pf
    from genmlx.kernels import weights as W

    G = min(_SCAN_THREADS, -(-n // W.SEGMENT))
    k1 = B.build("cuda", "genmlx_weight_partial", ("lw",), ("pm", "ps1", "ps2"), W._CUDA_PARTIAL, W._HEADER)
    pm, ps1, _ = k1(inputs=[log_weights.reshape(1, n)], output_shapes=[(1, G)] * 3,
                    output_dtypes=[f32] * 3, grid=(G * 1024, 1, 1), threadgroup=(1024, 1, 1))
    oi, of, gmax = _build("cuda", "offsets")(inputs=[log_weights, pm, ps1, ei, ef],
                                             output_shapes=[(G + 1,), (G + 1,), (1,)],
                                             output_dtypes=[i32, f32, f32], grid=(_SCAN_THREADS, 1, 1),
                                             threadgroup=(_SCAN_THREADS, 1, 1))
    pi, pf = _build("cuda", "segments")(inputs=[log_weights, oi, of, gmax], output_shapes=[(n,), (n,)],
                                        output_dtypes=[i32, f32], grid=(G * _SCAN_THREADS, 1, 1),
                                        threadgroup=(_SCAN_THREADS, 1, 1))
    return pi, pf


def search_kernel(pos: tuple[mx.array, mx.array], U: mx.array, first: int = 0) -> mx.array:
    """Ancestors [k] (int32) of the slots first … first + k − 1 for their uniforms ``U``
    [k] (a broadcast view is fine) on the slot positions ``pos`` = (int parts, fractions)
    (CUDA), by per-slot binary search with the reference's decision
    (``resampling._points_below``)."""
    k = U.shape[0]
    meta = mx.array([first], dtype=mx.int32)
    t = 256
    (a,) = _build("cuda", "search")(inputs=[mx.contiguous(pos[0]), mx.contiguous(pos[1]), U, meta],
                                    output_shapes=[(k,)], output_dtypes=[mx.int32],
                                    grid=(t * ((k + t - 1) // t), 1, 1), threadgroup=(t, 1, 1))
    return a


def metal_cdf_kernel(log_weights: mx.array) -> mx.array:
    """The normalised float32 CDF [n] of softmax(log_weights) by the Metal scan kernel."""
    n = log_weights.shape[0]
    (c,) = _build("metal", "cdf")(inputs=[log_weights], output_shapes=[(n,)], output_dtypes=[mx.float32],
                                  grid=(_SCAN_THREADS, 1, 1), threadgroup=(_SCAN_THREADS, 1, 1))
    return c


def metal_search_kernel(cdf: mx.array, U: mx.array, m: int) -> mx.array:
    """Ancestors [m] by the Metal search kernel (float32 decision on m·C, m < 2^24)."""
    meta = mx.array([0, m], dtype=mx.int32)
    t = 256
    (a,) = _build("metal", "search")(inputs=[mx.contiguous(cdf), U, meta], output_shapes=[(m,)],
                                     output_dtypes=[mx.int32], grid=(t * ((m + t - 1) // t), 1, 1),
                                     threadgroup=(t, 1, 1))
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
    if backend is None or U.dtype != mx.float32 or (backend == "metal" and m >= MAX_M):
        return _generic(U, log_weights, m)

    return _transformable(backend, m)(U, log_weights)[0]


@functools.lru_cache(maxsize=64)
def _transformable(backend: str, m: int):
    def kernel_fn(u, lw):
        uu = mx.broadcast_to(u, (m,)) if u.ndim == 0 else u
        if backend == "cuda":
            return (search_kernel(positions_kernel(lw, m), uu),)
        return (metal_search_kernel(metal_cdf_kernel(lw), uu, m),)

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
