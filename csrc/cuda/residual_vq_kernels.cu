// residual_vq on CUDA (spec: vqkernels/ops/residual_vq/reference.py). Light includes only (no torch
// headers); launched from csrc/cuda/residual_vq.cpp.
//
// Work mapping: one warp per row, kWarps rows per block. A row's residual and its running sum of codes
// live in shared memory for all Q stages (x read once, quantized written once, no N x K buffer).
// Per stage each lane scores the codes k = lane, lane + 32, ... (exact fp32 FMAs, ||c||^2 - 2 <r, c>,
// computed as fmaf(-2, dot, ||c||^2): one rounding like the reference), keeping a strict running min (so its
// lowest index among equal scores; NaN never wins); a warp shuffle reduction then takes the lowest
// (score, index) pair. The chosen code is subtracted from the residual by the lanes (D split across
// lanes), its squared error summed by a warp reduction and added to sq_err (float64 atomics: the order
// of those sums, and of the statistics' float32 atomics, may vary from run to run; indices and quantized
// do not). This is the plain CUDA-core version: correct for every shape, not the tensor-core tiled search
// the GPU bar needs (see the op's docs).
// Backward: one warp per row, the residual rebuilt stage by stage, the gradient accumulated in shared memory.
#include <cuda_runtime.h>
#include <cstdint>

namespace vqkernels {
namespace cuda {

namespace {
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
#define VQK_RVQ_INF __int_as_float(0x7f800000)

__device__ __forceinline__ void warp_min_pair(float& v, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (ov < v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(256) residual_vq_cnorm_kernel(const float* __restrict__ c, float* __restrict__ out,
                                                                int64_t R, int64_t D) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const float* p = c + r * D;
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s = fmaf(p[d], p[d], s);
  out[r] = s;
}

__global__ void __launch_bounds__(kThreads) residual_vq_fwd_kernel(
    const float* __restrict__ x, const float* __restrict__ cbs, const float* __restrict__ cnorm,
    int64_t* __restrict__ idx, float* __restrict__ quant, double* __restrict__ err, float* __restrict__ counts,
    float* __restrict__ sums, int64_t N, int64_t Q, int64_t K, int64_t D, bool need_stats) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * kWarps + warp;
  if (n >= N) return;  // a whole warp leaves together: the shuffles below see full warps only
  float* r = smem + (int64_t)warp * 2 * D;
  float* acc = r + D;
  for (int64_t d = lane; d < D; d += 32) {
    r[d] = x[n * D + d];
    acc[d] = 0.f;
  }
  __syncwarp();
  for (int64_t q = 0; q < Q; ++q) {
    const float* cq = cbs + q * K * D;
    float best = VQK_RVQ_INF;
    int best_i = 0;
    for (int64_t k = lane; k < K; k += 32) {
      const float* c = cq + k * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot = fmaf(r[d], c[d], dot);
      const float s = fmaf(-2.f, dot, cnorm[q * K + k]);
      if (s < best) {  // strict, false for NaN
        best = s;
        best_i = (int)k;
      }
    }
    warp_min_pair(best, best_i);  // every lane now holds the row's (lowest score, lowest index)
    const float* c = cq + (int64_t)best_i * D;
    float e = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float ri = r[d], ci = c[d];
      const float diff = ri - ci;
      e = fmaf(diff, diff, e);
      if (need_stats) atomicAdd(sums + (q * K + best_i) * D + d, ri);
      acc[d] += ci;
      r[d] = diff;
    }
    e = warp_sum(e);
    if (lane == 0) {
      idx[n * Q + q] = best_i;
      atomicAdd(err + q, (double)e);
      if (need_stats) atomicAdd(counts + q * K + best_i, 1.f);
    }
    __syncwarp();
  }
  for (int64_t d = lane; d < D; d += 32) quant[n * D + d] = acc[d];
}

__global__ void __launch_bounds__(kThreads) residual_vq_bwd_kernel(
    const float* __restrict__ g, const float* __restrict__ ge, const float* __restrict__ x,
    const float* __restrict__ cbs, const int64_t* __restrict__ idx, float* __restrict__ out, int64_t N, int64_t Q,
    int64_t K, int64_t D, bool rotation, int* __restrict__ bad_index) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * kWarps + warp;
  if (n >= N) return;
  float* r = smem + (int64_t)warp * 2 * D;
  float* acc = r + D;
  const float* gn = g + n * D;
  for (int64_t d = lane; d < D; d += 32) {
    r[d] = x[n * D + d];
    acc[d] = 0.f;
  }
  __syncwarp();
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t k = idx[n * Q + q];
    if (k < 0 || k >= K) {  // never dereferenced: flagged, the launcher raises
      if (lane == 0) atomicExch(bad_index, 1);
      return;
    }
    const float* c = cbs + (q * K + k) * D;
    const float two_ge = 2.f * ge[q];
    if (rotation) {
      float rr = 0.f, cc = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        rr = fmaf(r[d], r[d], rr);
        cc = fmaf(c[d], c[d], cc);
      }
      rr = warp_sum(rr);
      cc = warp_sum(cc);
      const float nr = fmaxf(sqrtf(rr), 1e-6f), nc_raw = sqrtf(cc), nc = fmaxf(nc_raw, 1e-6f);
      float ww = 0.f, gq = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float u = r[d] / nr, qh = c[d] / nc, w = u + qh;
        ww = fmaf(w, w, ww);
        gq = fmaf(gn[d], qh, gq);
      }
      ww = warp_sum(ww);
      gq = warp_sum(gq);
      const float nw = fmaxf(sqrtf(ww), 1e-6f);
      float gw = 0.f;
      for (int64_t d = lane; d < D; d += 32) gw = fmaf(gn[d], (r[d] / nr + c[d] / nc) / nw, gw);
      gw = warp_sum(gw);
      const float s = nc_raw / nr;
      for (int64_t d = lane; d < D; d += 32) {
        const float u = r[d] / nr, qh = c[d] / nc, w = (u + qh) / nw;
        const float diff = r[d] - c[d];
        acc[d] += s * (gn[d] - 2.f * gw * w + 2.f * gq * u) + two_ge * diff;
        r[d] = diff;
      }
    } else {
      for (int64_t d = lane; d < D; d += 32) {
        const float diff = r[d] - c[d];
        acc[d] += gn[d] + two_ge * diff;
        r[d] = diff;
      }
    }
    __syncwarp();
  }
  for (int64_t d = lane; d < D; d += 32) out[n * D + d] = acc[d];
}
}  // namespace

size_t residual_vq_smem_bytes(int64_t D) { return (size_t)kWarps * 2 * (size_t)D * sizeof(float); }

cudaError_t launch_residual_vq_fwd(const float* x, const float* cbs, float* cnorm, int64_t* idx, float* quant,
                                   double* err, float* counts, float* sums, int64_t N, int64_t Q, int64_t K,
                                   int64_t D, bool need_stats, cudaStream_t stream) {
  const int64_t R = Q * K;
  residual_vq_cnorm_kernel<<<(unsigned)((R + 255) / 256), 256, 0, stream>>>(cbs, cnorm, R, D);
  if (N == 0) return cudaGetLastError();
  const size_t smem = residual_vq_smem_bytes(D);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(residual_vq_fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  residual_vq_fwd_kernel<<<(unsigned)((N + kWarps - 1) / kWarps), kThreads, smem, stream>>>(
      x, cbs, cnorm, idx, quant, err, counts, sums, N, Q, K, D, need_stats);
  return cudaGetLastError();
}

cudaError_t launch_residual_vq_bwd(const float* g, const float* ge, const float* x, const float* cbs,
                                   const int64_t* idx, float* out, int64_t N, int64_t Q, int64_t K, int64_t D,
                                   bool rotation, int* bad_index, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const size_t smem = residual_vq_smem_bytes(D);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(residual_vq_bwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  residual_vq_bwd_kernel<<<(unsigned)((N + kWarps - 1) / kWarps), kThreads, smem, stream>>>(
      g, ge, x, cbs, idx, out, N, Q, K, D, rotation, bad_index);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vqkernels
