// The VQ loss on CUDA: fused gather + loss, fused backward, per-code statistics, code usage.
// Light includes only (no torch headers): the launchers, argument checks and the op registration
// live in vq_loss.cpp.
//
// Functions computed (the spec is vqkernels/ops/vq_loss/reference.py; csrc/cpu/vq_loss.cpp computes
// the same), z (N, D) or (B, T, D) with any strides (row n = b * T + t), codebook (K, D) contiguous,
// idx int64 (N,) contiguous, in [0, K):
//   vq_loss_fwd: z_q[n] = codebook[idx[n]] (a bit copy);  loss = scale * sum_{n,d} (z_q - z)^2
//   vq_loss_bwd: grad_z[n]  = grad_zq[n] + c_z (z[n] - z_q[n]),                  c_z  = 2 w_commit g / (N D)
//                grad_cb[k] = c_cb sum_{n: idx[n]=k} (z_q[n] - z[n]),            c_cb = 2 w_codebook g / (N D)
//                (g = grad_loss, read from device memory by the kernels: no host sync)
//   code_stats:  counts[k] = #{n: idx[n]=k} (exact int64 histogram, converted once), sums[k] = sum z[n]
//   code_usage:  counts[k] (int64), perplexity = exp(-sum_k p_k log(p_k + 1e-10)), p = counts / max(N, 1)
// float16/bfloat16 values are widened to float32; every difference, square and sum is float32 and
// rounded to the output dtype once (the loss partials and the perplexity are summed in double).
//
// Work mapping of the row kernels (fwd, bwd, stats): a CTA of 256 threads as (TX, TY), TX * TY = 256.
// A CTA owns a fixed range of rows_per_block rows; thread (tx, ty) takes rows r0 + ty, r0 + ty + TY, ...
// and, within a row, units j = tx, tx + TX, ... of VEC elements (a 16-byte pack when every tensor
// involved has unit-stride, 16-byte aligned rows and D % VEC == 0; else VEC = 1). When some tensor's
// rows are strided (sd != 1: a channel-first map viewed as (B, H*W, C)), TX = 1: a warp then holds 32
// consecutive rows and walks d, so its loads of one d are neighbours in memory (st == 1). Row n is split
// into (b, t) once per row (a 32-bit division when n and T fit), all offsets are int64.
//
// DETERMINISM.
//  - The loss is bit-reproducible: the rows of a CTA, the elements of a thread, the CTA's tree
//    reduction (in double) and the final pass over the per-CTA partials (one CTA, fixed stride
//    order, double) all follow from the shape only.
//  - counts (code_stats, code_usage) and the perplexity are exact/deterministic (integer atomics,
//    then one fixed-order reduction).
//  - The codebook gradient and the per-code sums add rows into a float32 (K, D) buffer with atomicAdd
//    (float4 atomics on sm_90), in whatever order the CTAs run: their last bits may differ from run to
//    run, as on the Triton path. Use the cpu backend where bit-reproducibility matters.
// Index range: every kernel skips (never dereferences) a row whose index lies outside [0, K);
// index_scan_kernel reduces min and max of the indices on the device; index_range_assert_kernel then
// traps on the device if one is out of range (no host sync), or, under VQKERNELS_SYNC_INDEX_CHECK=1, the
// launcher reads them back and raises IndexError (one host sync per op; for debugging).
#include <cuda_runtime.h>
#include <cstdio>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "ptx.cuh"

namespace vqkernels {
namespace cuda {

namespace {

constexpr int kThreads = 256;  // every kernel of this file runs 256-thread CTAs (8 warps)
constexpr unsigned long long kSign = 0x8000000000000000ull;

// VEC elements moved as one load/store (16 bytes for VEC = 16 / sizeof(T); a scalar for VEC = 1).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Pack loads and stores as one 16-byte access.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  Pack<T, VEC> r;
  if constexpr (sizeof(T) * VEC == 16)
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  else
    r = *reinterpret_cast<const Pack<T, VEC>*>(p);
  return r;
}
// The 16-byte store is written in PTX: nvcc splits a uint4 store of a Pack whose elements were also
// used one by one into four 4-byte stores. (Global memory: its generic address is its global address.)
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  if constexpr (sizeof(T) * VEC == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(&v);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
                 : "memory");
  } else
    *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// A (B, T, D) tensor: element (b, t, d) at p[b * sb + t * st + d * sd]; a 2-D (N, D) one has sb = 0, T = N.
template <typename T>
struct Strided {
  T* p;
  int64_t sb, st, sd;
};

// Row n -> (b, t) for rows numbered b * T + t. 32-bit division when both fit (the usual case).
__device__ __forceinline__ void split_row(int64_t n, int64_t T, int64_t& b, int64_t& t) {
  if (((n | T) >> 32) == 0) {
    const uint32_t nn = (uint32_t)n, tt = (uint32_t)T;
    const uint32_t q = nn / tt;
    b = q;
    t = nn - q * tt;
  } else {
    b = n / T;
    t = n - b * T;
  }
}

template <typename T>
__device__ __forceinline__ T* row_ptr(const Strided<T>& s, int64_t b, int64_t t) {
  return s.p + b * s.sb + t * s.st;
}

// Sum over the CTA (256 threads, any (TX, TY) shape); the result is valid in thread 0.
// `red` holds kThreads / 32 values. Every thread of the CTA must call it.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? red[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// p[0..VEC) += v[0..VEC) (float32, global memory). float4 atomics on sm_90 where the pack allows.
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVec4 = VEC % 4 == 0;
#else
  constexpr bool kVec4 = false;
#endif
  if constexpr (kVec4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i)
      atomicAdd(reinterpret_cast<float4*>(p) + i, make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]));
#endif
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) atomicAdd(p + e, v[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// Index scan: min and max of idx (order-preserving map of int64 to uint64, min as the max of the
// complement, so both start at 0 by a memset), and optionally the histogram of the in-range ones.
// range[0] = max(enc(k)), range[1] = max(~enc(k)), enc(k) = k ^ 2^63. Grid-stride over N.
__global__ void __launch_bounds__(kThreads)
index_scan_kernel(const int64_t* __restrict__ idx, int64_t N, int64_t K, unsigned long long* __restrict__ hist,
                  unsigned long long* __restrict__ range) {
  unsigned long long hi = 0, lo_inv = 0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride) {
    const int64_t k = idx[i];
    const unsigned long long u = (unsigned long long)k ^ kSign;
    hi = u > hi ? u : hi;
    lo_inv = ~u > lo_inv ? ~u : lo_inv;
    if (hist != nullptr) {
      // Lanes holding the same code add once (a collapsed codebook would serialise on one address).
      const unsigned active = __activemask();
      const unsigned peers = __match_any_sync(active, (unsigned long long)k);
      const int leader = __ffs(peers) - 1;
      if ((int)(threadIdx.x & 31) == leader && k >= 0 && k < K)
        atomicAdd(hist + k, (unsigned long long)__popc(peers));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long h = __shfl_xor_sync(0xffffffffu, hi, o);
    const unsigned long long l = __shfl_xor_sync(0xffffffffu, lo_inv, o);
    hi = h > hi ? h : hi;
    lo_inv = l > lo_inv ? l : lo_inv;
  }
  if ((threadIdx.x & 31) == 0) {
    atomicMax(range + 0, hi);
    atomicMax(range + 1, lo_inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: z_q = codebook[idx] (bit copy), one double partial of sum (z_q - z)^2 per CTA.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
vq_loss_fwd_kernel(Strided<const T> z, const T* __restrict__ cb, const int64_t* __restrict__ idx, Strided<T> zq,
                   int64_t N, int64_t Tlen, int64_t K, int64_t D, int64_t rows_per_block,
                   double* __restrict__ partials) {
  using P = Pack<T, VEC>;
  __shared__ double red[kThreads / 32];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t Dv = D / VEC;
  const int64_t r0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
  float acc = 0.0f;
  for (int64_t n = r0 + ty; n < r1; n += TY) {
    const int64_t k = idx[n];
    if (k < 0 || k >= K) continue;  // reported by the launcher
    int64_t b, t;
    split_row(n, Tlen, b, t);
    const T* zr = row_ptr(z, b, t);
    T* qr = row_ptr(zq, b, t);
    const T* cr = cb + k * D;
    for (int64_t j = tx; j < Dv; j += TX) {
      const int64_t d = j * VEC;
      const P c = load_pack<T, VEC>(cr + d);
      const P x = load_pack<T, VEC>(zr + d * z.sd);  // VEC > 1 only where sd == 1
      store_pack<T, VEC>(qr + d * zq.sd, c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float diff = to_float<T>(c.v[e]) - to_float<T>(x.v[e]);
        acc = fmaf(diff, diff, acc);
      }
    }
  }
  const double s = block_sum<double>((double)acc, red);
  if (tx == 0 && ty == 0) partials[blockIdx.x] = s;
}

// loss = scale * sum of the partials, in double, in a fixed order; one CTA.
__global__ void __launch_bounds__(kThreads)
loss_final_kernel(const double* __restrict__ partials, int64_t n, double scale, float* __restrict__ loss) {
  __shared__ double red[kThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partials[i];
  s = block_sum<double>(s, red);
  if (threadIdx.x == 0) *loss = (float)(s * scale);
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_z (if need_gz) and the float32 accumulator acc[k] += z[n] - z_q[n] (if need_gcb).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
vq_loss_bwd_kernel(Strided<const T> gzq, Strided<const T> z, const T* __restrict__ cb,
                   const int64_t* __restrict__ idx, Strided<T> gz, float* __restrict__ acc,
                   const float* __restrict__ grad_loss, double mul_z, int64_t N, int64_t Tlen, int64_t K,
                   int64_t D, int64_t rows_per_block, int need_gz, int need_gcb) {
  using P = Pack<T, VEC>;
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const float c_z = (float)((double)__ldg(grad_loss) * mul_z);
  const int64_t Dv = D / VEC;
  const int64_t r0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
  for (int64_t n = r0 + ty; n < r1; n += TY) {
    const int64_t k = idx[n];
    if (k < 0 || k >= K) continue;  // reported by the launcher
    int64_t b, t;
    split_row(n, Tlen, b, t);
    const T* zr = row_ptr(z, b, t);
    const T* cr = cb + k * D;
    for (int64_t j = tx; j < Dv; j += TX) {
      const int64_t d = j * VEC;
      const P c = load_pack<T, VEC>(cr + d);
      const P x = load_pack<T, VEC>(zr + d * z.sd);
      float diff[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) diff[e] = to_float<T>(x.v[e]) - to_float<T>(c.v[e]);  // z - z_q
      if (need_gz) {
        const P g = load_pack<T, VEC>(row_ptr(gzq, b, t) + d * gzq.sd);
        P o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(to_float<T>(g.v[e]) + c_z * diff[e]);
        store_pack<T, VEC>(row_ptr(gz, b, t) + d * gz.sd, o);
      }
      if (need_gcb) atomic_add_vec<VEC>(acc + k * D + d, diff);
    }
  }
}

// grad_codebook = (-c_cb) * acc, rounded to T once. out may alias acc (float32 codebooks).
template <typename T>
__global__ void __launch_bounds__(kThreads)
grad_codebook_final_kernel(const float* acc, T* out, int64_t n, const float* __restrict__ grad_loss,
                           double mul_cb) {
  const float scale = -(float)((double)__ldg(grad_loss) * mul_cb);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = from_float<T>(scale * acc[i]);
}

// ---------------------------------------------------------------------------------------------
// Per-code sums: sums[k] += z[n] (float32 atomics). The counts come from index_scan_kernel's histogram.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
code_stats_sums_kernel(Strided<const T> z, const int64_t* __restrict__ idx, float* __restrict__ sums, int64_t N,
                       int64_t Tlen, int64_t K, int64_t D, int64_t rows_per_block) {
  using P = Pack<T, VEC>;
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t Dv = D / VEC;
  const int64_t r0 = (int64_t)blockIdx.x * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
  for (int64_t n = r0 + ty; n < r1; n += TY) {
    const int64_t k = idx[n];
    if (k < 0 || k >= K) continue;  // reported by the launcher
    int64_t b, t;
    split_row(n, Tlen, b, t);
    const T* zr = row_ptr(z, b, t);
    for (int64_t j = tx; j < Dv; j += TX) {
      const int64_t d = j * VEC;
      const P x = load_pack<T, VEC>(zr + d * z.sd);
      float v[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = to_float<T>(x.v[e]);
      atomic_add_vec<VEC>(sums + k * D + d, v);
    }
  }
}

// counts (int64 histogram) -> float32, exactly rounded once.
__global__ void __launch_bounds__(kThreads)
counts_to_float_kernel(const unsigned long long* __restrict__ hist, float* __restrict__ out, int64_t K) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < K; i += stride)
    out[i] = (float)hist[i];
}

// perplexity = exp(-sum_k p_k log(p_k + 1e-10)), p_k = counts[k] / total, in double; one CTA.
__global__ void __launch_bounds__(kThreads)
perplexity_kernel(const unsigned long long* __restrict__ counts, int64_t K, double total, float* __restrict__ out) {
  __shared__ double red[kThreads / 32];
  double h = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const double p = (double)counts[k] / total;
    h += p * log(p + 1e-10);
  }
  h = block_sum<double>(h, red);
  if (threadIdx.x == 0) *out = (float)exp(-h);
}

// ---------------------------------------------------------------------------------------------
// Launch plans.

// The row-kernel shape for (N, D) and a pack of VEC elements (VEC = 1 when rows may be strided).
struct RowPlan {
  int tx, ty;
  int64_t rows_per_block, blocks;
};

RowPlan row_plan(int64_t N, int64_t D, int vec, bool strided) {
  RowPlan p;
  const int64_t Dv = D / vec;
  int tx = 1;
  if (!strided)
    while (tx < 32 && tx < Dv) tx <<= 1;
  p.tx = tx;
  p.ty = kThreads / tx;
  const int64_t units = (Dv + tx - 1) / tx;  // per thread and row
  const int64_t iters = units >= 8 ? 1 : 8 / units;  // rows per thread: about 8 units of work
  p.rows_per_block = p.ty * iters;
  p.blocks = (N + p.rows_per_block - 1) / p.rows_per_block;
  return p;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// A tensor can be read in packs of vec elements: unit-stride rows, 16-byte aligned rows.
bool packable(const void* p, const int64_t* s, int64_t D, int vec) {
  return s[2] == 1 && D % vec == 0 && s[0] % vec == 0 && s[1] % vec == 0 && aligned16(p);
}

template <typename T>
Strided<T> strided(T* p, const int64_t* s) {
  return Strided<T>{p, s[0], s[1], s[2]};
}

cudaError_t scan_indices(const int64_t* idx, int64_t N, int64_t K, unsigned long long* hist,
                         unsigned long long* range, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(range, 0, 2 * sizeof(unsigned long long), stream);
  if (err != cudaSuccess || N <= 0) return err;
  int64_t blocks = (N + 4 * kThreads - 1) / (4 * kThreads);  // about 4 indices per thread
  if (blocks > 65536) blocks = 65536;                          // grid-stride beyond
  index_scan_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(idx, N, K, hist, range);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const T* z, const int64_t* zs, const T* cb, const int64_t* idx, T* zq, const int64_t* qs,
                      int64_t N, int64_t Tlen, int64_t K, int64_t D, double scale, double* partials, float* loss,
                      cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  int64_t nblocks = 0;
  if (N > 0 && D > 0) {
    const bool vec = packable(z, zs, D, V) && packable(zq, qs, D, V) && aligned16(cb);
    const bool strided_rows = zs[2] != 1 || qs[2] != 1;
    const RowPlan p = row_plan(N, D, vec ? V : 1, strided_rows);
    if (p.blocks > INT32_MAX) return cudaErrorInvalidValue;
    nblocks = p.blocks;
    const dim3 block(p.tx, p.ty);
    if (vec)
      vq_loss_fwd_kernel<T, V><<<(unsigned)p.blocks, block, 0, stream>>>(
          strided(z, zs), cb, idx, strided(zq, qs), N, Tlen, K, D, p.rows_per_block, partials);
    else
      vq_loss_fwd_kernel<T, 1><<<(unsigned)p.blocks, block, 0, stream>>>(
          strided(z, zs), cb, idx, strided(zq, qs), N, Tlen, K, D, p.rows_per_block, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  loss_final_kernel<<<1, kThreads, 0, stream>>>(partials, nblocks, scale, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const T* gzq, const int64_t* gs, const T* z, const int64_t* zs, const T* cb,
                      const int64_t* idx, T* gz, const int64_t* os, float* acc, T* gcb, const float* grad_loss,
                      double mul_z, double mul_cb, int64_t N, int64_t Tlen, int64_t K, int64_t D, bool need_gz,
                      bool need_gcb, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  cudaError_t err;
  if (need_gcb && (err = cudaMemsetAsync(acc, 0, (size_t)(K * D) * sizeof(float), stream)) != cudaSuccess)
    return err;
  if (N > 0 && D > 0 && (need_gz || need_gcb)) {
    bool vec = packable(z, zs, D, V) && aligned16(cb) && (!need_gcb || aligned16(acc));
    bool strided_rows = zs[2] != 1;
    if (need_gz) {
      vec = vec && packable(gzq, gs, D, V) && packable(gz, os, D, V);
      strided_rows = strided_rows || gs[2] != 1 || os[2] != 1;
    }
    const RowPlan p = row_plan(N, D, vec ? V : 1, strided_rows);
    if (p.blocks > INT32_MAX) return cudaErrorInvalidValue;
    const dim3 block(p.tx, p.ty);
    // Unused tensors get z's view, so that no pointer in a Strided is null.
    const Strided<const T> g = need_gz ? strided(gzq, gs) : strided(z, zs);
    const Strided<T> o = need_gz ? strided(gz, os) : Strided<T>{nullptr, 0, 0, 1};
    if (vec)
      vq_loss_bwd_kernel<T, V><<<(unsigned)p.blocks, block, 0, stream>>>(
          g, strided(z, zs), cb, idx, o, acc, grad_loss, mul_z, N, Tlen, K, D, p.rows_per_block, need_gz ? 1 : 0,
          need_gcb ? 1 : 0);
    else
      vq_loss_bwd_kernel<T, 1><<<(unsigned)p.blocks, block, 0, stream>>>(
          g, strided(z, zs), cb, idx, o, acc, grad_loss, mul_z, N, Tlen, K, D, p.rows_per_block, need_gz ? 1 : 0,
          need_gcb ? 1 : 0);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (need_gcb && K * D > 0) {
    int64_t blocks = (K * D + kThreads - 1) / kThreads;
    if (blocks > 65536) blocks = 65536;
    grad_codebook_final_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(acc, gcb, K * D, grad_loss, mul_cb);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t stats_typed(const T* z, const int64_t* zs, const int64_t* idx, float* sums, int64_t N, int64_t Tlen,
                        int64_t K, int64_t D, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (N <= 0 || D <= 0) return cudaSuccess;
  const bool vec = packable(z, zs, D, V) && aligned16(sums);
  const RowPlan p = row_plan(N, D, vec ? V : 1, zs[2] != 1);
  if (p.blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 block(p.tx, p.ty);
  if (vec)
    code_stats_sums_kernel<T, V><<<(unsigned)p.blocks, block, 0, stream>>>(strided(z, zs), idx, sums, N, Tlen, K, D,
                                                                           p.rows_per_block);
  else
    code_stats_sums_kernel<T, 1><<<(unsigned)p.blocks, block, 0, stream>>>(strided(z, zs), idx, sums, N, Tlen, K, D,
                                                                           p.rows_per_block);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (declared in vq_loss.cpp). Strides are host arrays {sb, st, sd} of (B, T, D) views
// (2-D tensors: {0, stride(0), stride(1)} with T = N). idx contiguous int64 (N,), codebook contiguous.
// `range` is 2 uint64 of device memory (see index_scan_kernel); every call fills it (N = 0: zeros).
// dtype: 0 float32, 1 float16, 2 bfloat16. All work runs on `stream`; returns the first CUDA error.

// Doubles of workspace vq_loss_fwd needs for N rows: one partial per CTA, CTAs own >= 8 rows.
int64_t vq_loss_fwd_workspace(int64_t N) { return (N + 7) / 8 + 1; }

cudaError_t launch_vq_loss_fwd(const void* z, const int64_t* zs, const void* cb, const int64_t* idx, void* zq,
                               const int64_t* qs, int dtype, int64_t N, int64_t Tlen, int64_t K, int64_t D,
                               double scale, double* workspace, float* loss, unsigned long long* range,
                               cudaStream_t stream) {
  cudaError_t err = scan_indices(idx, N, K, nullptr, range, stream);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case 0:
      return fwd_typed<float>(static_cast<const float*>(z), zs, static_cast<const float*>(cb), idx,
                              static_cast<float*>(zq), qs, N, Tlen, K, D, scale, workspace, loss, stream);
    case 1:
      return fwd_typed<__half>(static_cast<const __half*>(z), zs, static_cast<const __half*>(cb), idx,
                               static_cast<__half*>(zq), qs, N, Tlen, K, D, scale, workspace, loss, stream);
    case 2:
      return fwd_typed<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(z), zs,
                                      static_cast<const __nv_bfloat16*>(cb), idx, static_cast<__nv_bfloat16*>(zq),
                                      qs, N, Tlen, K, D, scale, workspace, loss, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// acc: float32 (K, D) (zeroed here; may be gcb itself for float32). grad_loss: one float32 on the device.
// mul_z = 2 w_commit / (N D), mul_cb = 2 w_codebook / (N D).
cudaError_t launch_vq_loss_bwd(const void* gzq, const int64_t* gs, const void* z, const int64_t* zs, const void* cb,
                               const int64_t* idx, void* gz, const int64_t* os, float* acc, void* gcb,
                               const float* grad_loss, double mul_z, double mul_cb, int dtype, int64_t N,
                               int64_t Tlen, int64_t K, int64_t D, bool need_gz, bool need_gcb,
                               unsigned long long* range, cudaStream_t stream) {
  cudaError_t err = scan_indices(idx, N, K, nullptr, range, stream);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case 0:
      return bwd_typed<float>(static_cast<const float*>(gzq), gs, static_cast<const float*>(z), zs,
                              static_cast<const float*>(cb), idx, static_cast<float*>(gz), os, acc,
                              static_cast<float*>(gcb), grad_loss, mul_z, mul_cb, N, Tlen, K, D, need_gz, need_gcb,
                              stream);
    case 1:
      return bwd_typed<__half>(static_cast<const __half*>(gzq), gs, static_cast<const __half*>(z), zs,
                               static_cast<const __half*>(cb), idx, static_cast<__half*>(gz), os, acc,
                               static_cast<__half*>(gcb), grad_loss, mul_z, mul_cb, N, Tlen, K, D, need_gz, need_gcb,
                               stream);
    case 2:
      return bwd_typed<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(gzq), gs,
                                      static_cast<const __nv_bfloat16*>(z), zs,
                                      static_cast<const __nv_bfloat16*>(cb), idx, static_cast<__nv_bfloat16*>(gz), os,
                                      acc, static_cast<__nv_bfloat16*>(gcb), grad_loss, mul_z, mul_cb, N, Tlen, K, D,
                                      need_gz, need_gcb, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// hist: uint64 (K,) scratch; counts float32 (K,); sums float32 (K, D). All filled here.
cudaError_t launch_code_stats(const void* z, const int64_t* zs, const int64_t* idx, int dtype, int64_t N,
                              int64_t Tlen, int64_t K, int64_t D, unsigned long long* hist, float* counts,
                              float* sums, unsigned long long* range, cudaStream_t stream) {
  cudaError_t err;
  if ((err = cudaMemsetAsync(hist, 0, (size_t)K * sizeof(unsigned long long), stream)) != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(sums, 0, (size_t)(K * D) * sizeof(float), stream)) != cudaSuccess) return err;
  if ((err = scan_indices(idx, N, K, hist, range, stream)) != cudaSuccess) return err;
  switch (dtype) {
    case 0: err = stats_typed<float>(static_cast<const float*>(z), zs, idx, sums, N, Tlen, K, D, stream); break;
    case 1: err = stats_typed<__half>(static_cast<const __half*>(z), zs, idx, sums, N, Tlen, K, D, stream); break;
    case 2:
      err = stats_typed<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(z), zs, idx, sums, N, Tlen, K, D, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  int64_t blocks = (K + kThreads - 1) / kThreads;
  if (blocks > 65536) blocks = 65536;
  counts_to_float_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(hist, counts, K);
  return cudaGetLastError();
}

// counts: int64 (K,) output (as uint64; zeroed here), perplexity: one float32.
cudaError_t launch_code_usage(const int64_t* idx, int64_t N, int64_t K, unsigned long long* counts,
                              float* perplexity, unsigned long long* range, cudaStream_t stream) {
  cudaError_t err;
  if ((err = cudaMemsetAsync(counts, 0, (size_t)K * sizeof(unsigned long long), stream)) != cudaSuccess) return err;
  if ((err = scan_indices(idx, N, K, counts, range, stream)) != cudaSuccess) return err;
  perplexity_kernel<<<1, kThreads, 0, stream>>>(counts, K, (double)(N > 1 ? N : 1), perplexity);
  return cudaGetLastError();
}

namespace {
// The asynchronous range check: one thread reads what index_scan_kernel left in `range` and, if an index
// lies outside [0, K), prints which and stops the kernel with a device-side assert (as torch's own
// embedding and index ops do on CUDA). Queued after the op's kernels, it never makes the host wait, so
// the ops stay graph-capturable. The error surfaces at the next synchronisation.
__global__ void index_range_assert_kernel(const unsigned long long* __restrict__ range, int64_t K, int op) {
  const int64_t hi = (int64_t)(range[0] ^ kSign);
  const int64_t lo = (int64_t)((~range[1]) ^ kSign);
  if (lo < 0 || hi >= K) {
    const char* name = op == 0 ? "vq_loss_fwd" : op == 1 ? "vq_loss_bwd" : op == 2 ? "code_stats" : "code_usage";
    printf("vqkernels %s: indices out of range: got index %lld, codes are numbered 0..%lld (K=%lld)\n", name,
           (long long)(lo < 0 ? lo : hi), (long long)(K - 1), (long long)K);
    __trap();
  }
}
}  // namespace

cudaError_t launch_index_range_assert(const unsigned long long* range, int64_t K, int op, cudaStream_t stream) {
  index_range_assert_kernel<<<1, 1, 0, stream>>>(range, K, op);
  return cudaGetLastError();
}

// (lo, hi) of the indices from the two uint64 that index_scan_kernel left in `range`.
void decode_index_range(unsigned long long r0, unsigned long long r1, int64_t* lo, int64_t* hi) {
  *hi = (int64_t)(r0 ^ kSign);
  *lo = (int64_t)((~r1) ^ kSign);
}

}  // namespace cuda
}  // namespace vqkernels
