"""Fused weight summary: log Σ exp(lw) and the effective sample size in one pass.

For a row of log-weights lw_1..lw_n (every importance-sampling result and every SMC step
needs both):

    M = max_i lw_i,  S1 = Σ_i exp(lw_i − M),  S2 = Σ_i exp(2 (lw_i − M)),
    logsumexp = M + log S1,          ESS = (Σ w)² / Σ w² = S1² / S2.

The kernel computes (M, S1, S2) online (a running max; a new max rescales the sums by
exp(M_old − M_new)), merges the per-thread triples by warp shuffles and one shared-memory
round: one read of the row, one block per row. Rows longer than ``SPLIT_N`` are cut into
contiguous segments of ``SEGMENT`` entries, one block each (so the whole GPU reads the
row), and a second small launch merges the segment triples. The generic path is the MLX-ops reference
(``mx.logsumexp`` twice), ~5 kernels. All −inf rows give (−inf, NaN) on both paths.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from genmlx.kernels import _backend as B

_HEADER = r"""
#define GMX_NEG_INF (-__int_as_float(0x7f800000))
#ifndef GMX_MIN_DEFINED
#define GMX_MIN_DEFINED
__device__ __forceinline__ long long gmx_min(long long a, long long b) { return a < b ? a : b; }
#endif
// merge triple (mo, o1, o2) into (m, s1, s2): sums rescaled to the larger max
__device__ __forceinline__ void gmx_merge(float& m, float& s1, float& s2,
                                          float mo, float o1, float o2) {
  float M = fmaxf(m, mo);
  if (M == GMX_NEG_INF) { s1 += o1; s2 += o2; return; }  // both empty (or NaN sums)
  float a = (m == M) ? 1.f : expf(m - M);
  float b = (mo == M) ? 1.f : expf(mo - M);
  s1 = s1 * a + o1 * b;
  s2 = s2 * a * a + o2 * b * b;
  m = M;
}
// add one log-weight v to the running triple (online max)
__device__ __forceinline__ void gmx_push(float& m, float& s1, float& s2, float v) {
  if (v > m) {
    float r = (m == GMX_NEG_INF) ? 0.f : expf(m - v);
    s1 = s1 * r + 1.f;
    s2 = s2 * r * r + 1.f;
    m = v;
  } else if (v != GMX_NEG_INF) {  // NaN propagates through the sums
    float e = expf(v - m);
    s1 += e;
    s2 += e * e;
  }
}
// block-wide merge (blockDim.x a multiple of 32, <= 1024); the result is in thread 0
__device__ __forceinline__ void gmx_block_merge(float& m, float& s1, float& s2) {
  __shared__ float sm[32], ss1[32], ss2[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    float mo = __shfl_xor_sync(0xffffffffu, m, off);
    float o1 = __shfl_xor_sync(0xffffffffu, s1, off);
    float o2 = __shfl_xor_sync(0xffffffffu, s2, off);
    gmx_merge(m, s1, s2, mo, o1, o2);
  }
  if (lane == 0) { sm[warp] = m; ss1[warp] = s1; ss2[warp] = s2; }
  __syncthreads();
  if (warp == 0) {
    m = (lane < nwarps) ? sm[lane] : GMX_NEG_INF;
    s1 = (lane < nwarps) ? ss1[lane] : 0.f;
    s2 = (lane < nwarps) ? ss2[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      float mo = __shfl_xor_sync(0xffffffffu, m, off);
      float o1 = __shfl_xor_sync(0xffffffffu, s1, off);
      float o2 = __shfl_xor_sync(0xffffffffu, s2, off);
      gmx_merge(m, s1, s2, mo, o1, o2);
    }
  }
}
"""

# one block per row: lw [b, n] -> lse [b], ess [b]
_CUDA = r"""
  const int n = lw_shape[1];
  const int row = blockIdx.x;
  const float* x = lw + (size_t)row * (size_t)n;
  float m = GMX_NEG_INF, s1 = 0.f, s2 = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) gmx_push(m, s1, s2, x[i]);
  gmx_block_merge(m, s1, s2);
  if (threadIdx.x == 0) {
    lse[row] = m + logf(s1);
    ess[row] = (s1 * s1) / s2;
  }
"""

# long rows, stage 1: blocks (G, b); block g of row r reduces the contiguous segment
# [g L, (g + 1) L), L = ceil(n / G), to a triple pm/ps1/ps2 [b, G]
_CUDA_PARTIAL = r"""
  const int n = lw_shape[1];
  const int G = gridDim.x, g = blockIdx.x, row = blockIdx.y;
  const long long L = ((long long)n + G - 1) / G;
  const long long lo = (long long)g * L;
  const long long hi = gmx_min(lo + L, (long long)n);
  const float* x = lw + (size_t)row * (size_t)n;
  float m = GMX_NEG_INF, s1 = 0.f, s2 = 0.f;
  for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) gmx_push(m, s1, s2, x[i]);
  gmx_block_merge(m, s1, s2);
  if (threadIdx.x == 0) {
    const size_t k = (size_t)row * G + g;
    pm[k] = m; ps1[k] = s1; ps2[k] = s2;
  }
"""

# long rows, stage 2: one block per row merges its G triples
_CUDA_FINISH = r"""
  const int G = pm_shape[1];
  const int row = blockIdx.x;
  float m = GMX_NEG_INF, s1 = 0.f, s2 = 0.f;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    const size_t k = (size_t)row * G + g;
    gmx_merge(m, s1, s2, pm[k], ps1[k], ps2[k]);
  }
  gmx_block_merge(m, s1, s2);
  if (threadIdx.x == 0) {
    lse[row] = m + logf(s1);
    ess[row] = (s1 * s1) / s2;
  }
"""

_METAL_HEADER = r"""
inline void gmx_merge(thread float& m, thread float& s1, thread float& s2,
                      float mo, float o1, float o2) {
  float M = metal::max(m, mo);
  if (M == -INFINITY) { s1 += o1; s2 += o2; return; }
  float a = (m == M) ? 1.f : metal::exp(m - M);
  float b = (mo == M) ? 1.f : metal::exp(mo - M);
  s1 = s1 * a + o1 * b;
  s2 = s2 * a * a + o2 * b * b;
  m = M;
}
"""

# UNTESTED (no Apple GPU was available): same algorithm with simdgroup shuffles.
_METAL = r"""
  const int n = lw_shape[1];
  const uint row = threadgroup_position_in_grid.x;
  const uint tid = thread_position_in_threadgroup.x;
  const uint T = threads_per_threadgroup.x;
  const uint lane = tid & 31, warp = tid >> 5, nwarps = T >> 5;
  const device float* x = lw + (size_t)row * (size_t)n;
  float m = -INFINITY, s1 = 0.f, s2 = 0.f;
  for (uint i = tid; i < (uint)n; i += T) {
    float v = x[i];
    if (v > m) {
      float r = (m == -INFINITY) ? 0.f : metal::exp(m - v);
      s1 = s1 * r + 1.f; s2 = s2 * r * r + 1.f; m = v;
    } else if (v != -INFINITY) {
      float e = metal::exp(v - m); s1 += e; s2 += e * e;
    }
  }
  for (ushort off = 16; off > 0; off >>= 1) {
    gmx_merge(m, s1, s2, simd_shuffle_xor(m, off), simd_shuffle_xor(s1, off),
              simd_shuffle_xor(s2, off));
  }
  threadgroup float sm[32], ss1[32], ss2[32];
  if (lane == 0) { sm[warp] = m; ss1[warp] = s1; ss2[warp] = s2; }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (warp == 0) {
    m = (lane < nwarps) ? sm[lane] : -INFINITY;
    s1 = (lane < nwarps) ? ss1[lane] : 0.f;
    s2 = (lane < nwarps) ? ss2[lane] : 0.f;
    for (ushort off = 16; off > 0; off >>= 1) {
      gmx_merge(m, s1, s2, simd_shuffle_xor(m, off), simd_shuffle_xor(s1, off),
                simd_shuffle_xor(s2, off));
    }
    if (lane == 0) { lse[row] = m + metal::log(s1); ess[row] = (s1 * s1) / s2; }
  }
"""


def weight_summary_generic(log_weights: mx.array) -> tuple[mx.array, mx.array]:
    """Reference: (logsumexp(lw), exp(2 logsumexp(lw) − logsumexp(2 lw))) over the last axis."""
    lse = mx.logsumexp(log_weights, axis=-1)
    return lse, mx.exp(2 * lse - mx.logsumexp(2 * log_weights, axis=-1))


def _threads(n: int) -> int:
    return int(min(1024, max(32, 32 * ((n + 31) // 32))))


SPLIT_N = 1 << 15  # rows longer than this are split over several blocks (two launches)
SEGMENT = 1 << 13  # elements per block in the split pass


def _weight_summary_kernel(backend: str, log_weights: mx.array) -> tuple[mx.array, mx.array]:
    lead, n = log_weights.shape[:-1], log_weights.shape[-1]
    rows = log_weights.reshape(-1, n)
    b = rows.shape[0]
    f32 = mx.float32
    if backend == "metal" or n <= SPLIT_N or b > 65535:
        src, hdr = (_CUDA, _HEADER) if backend == "cuda" else (_METAL, _METAL_HEADER)
        k = B.build(backend, "genmlx_weight_summary", ("lw",), ("lse", "ess"), src, hdr)
        t = _threads(n)
        lse, ess = k(inputs=[rows], output_shapes=[(b,), (b,)], output_dtypes=[f32, f32],
                     grid=(b * t, 1, 1), threadgroup=(t, 1, 1))
    else:
        G = min(1024, -(-n // SEGMENT))
        k1 = B.build(backend, "genmlx_weight_partial", ("lw",), ("pm", "ps1", "ps2"),
                     _CUDA_PARTIAL, _HEADER)
        pm, ps1, ps2 = k1(inputs=[rows], output_shapes=[(b, G)] * 3, output_dtypes=[f32] * 3,
                          grid=(G * 1024, b, 1), threadgroup=(1024, 1, 1))
        k2 = B.build(backend, "genmlx_weight_finish", ("pm", "ps1", "ps2"), ("lse", "ess"),
                     _CUDA_FINISH, _HEADER)
        t = _threads(G)
        lse, ess = k2(inputs=[pm, ps1, ps2], output_shapes=[(b,), (b,)],
                      output_dtypes=[f32, f32], grid=(b * t, 1, 1), threadgroup=(t, 1, 1))
    return lse.reshape(lead), ess.reshape(lead)


def weight_summary(log_weights: mx.array) -> tuple[mx.array, mx.array]:
    """(logsumexp, ESS) over the last axis of ``log_weights`` ([n] or [..., n]), by the
    fused kernel on a GPU (see the module docstring) or the generic MLX ops otherwise."""
    if not isinstance(log_weights, mx.array):
        raise TypeError(f"weight_summary: log_weights must be an mx.array, got {type(log_weights).__name__}")
    if log_weights.ndim == 0:
        raise ValueError("weight_summary: log_weights must have at least one axis (particles last)")
    backend = B.use_kernel(log_weights)
    if backend is None:
        return weight_summary_generic(log_weights)
    lse, ess = _transformable(backend)(log_weights)
    return lse, ess


@functools.lru_cache(maxsize=None)
def _transformable(backend: str):
    return B.with_generic_transforms(lambda x: _weight_summary_kernel(backend, x),
                                     weight_summary_generic, n_out=2, differentiable=True)
