// nearest_code on CUDA: for each row of x (N, D), the index of the nearest code of codebook (K, D),
// fused: no N x K buffer is ever written. Light includes only (no torch headers): the launcher and
// the op registration live in nearest_code.cpp.
//
// The function (csrc/common.h, vqkernels/ops/nearest_code/reference.py):
//   score[n, k] = alpha * <x_n, c_k> + bias[k],   alpha = -2, bias = ||c_k||^2 (l2)
//                                                  alpha = -1, bias = 0         (inner product)
//   index[n] = argmin_k score (lowest k among equal scores; a NaN score never wins),
//   distance = max(||x_n||^2 + best, 0) (l2)  or  1 + best (inner product).
// fma(-2, dot, ||c||^2) rounds once, exactly as the reference's ||c||^2 - 2*dot (2*dot is exact).
//
// Kernels:
//   * row_sumsq_kernel<T>: ||c||^2 (the bias, padded to a multiple of 128 codes with +inf so the
//     tail codes of the last tile can never win) and, for l2, ||x||^2 written into the distance
//     output, which the main kernel reads back and overwrites. fp32 sums of the rounded inputs.
//   * nearest_code_tc_kernel<T>: float16 / bfloat16 (mma.sync m16n8k16, fp32 accumulation) and
//     float32 with allow_tf32 (mma.sync m16n8k8 tf32, inputs rounded with cvt.rna).
//     CTA = 128 rows x 128 codes per tile, 4 warps of 64 x 64, ldmatrix fragments, cp.async
//     pipeline of 4 stages over 64-byte slices of D (32 halves or 16 floats). When the CTA's x tile
//     (128 x D) fits in shared memory at 2 CTAs/SM it is loaded once and stays resident (16-bit
//     D <= 256, fp32 D <= 128), and only the codebook streams; otherwise both stream.
//     After the last D slice of a code tile the accumulators are reduced in registers into a
//     running (min, argmin) per row; at the end the quad lanes and the two column warps merge.
//   * nearest_code_simt_f32_kernel: exact fp32 (allow_tf32 false). 128 x 128 tiles, 256 threads,
//     8 x 8 outputs per thread, FFMA over BK = 8 slices of D, register-prefetched double buffer,
//     same fused running min.
//
// Ties and NaN: every thread visits its codes in increasing index order and updates on a strict
// `s < best`, so it keeps the lowest index among its equal scores; partial results are merged with
// a lexicographic (score, index) min. best starts at (+inf, 0): an IEEE ordered compare is false
// for a NaN score, so NaN behaves as +inf, and a row whose scores are all NaN/+inf gets index 0.
// (nvcc's --use_fast_math sets ftz/prec-div/prec-sqrt/fmad only; it does not make compares
// unordered. The final clamp uses an explicit bit-level NaN test so max(NaN, 0) stays NaN.)
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "ptx.cuh"

namespace vqkernels {
namespace cuda {

namespace {

constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ bool is_nan_bits(float v) {
  return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}

// Lexicographic (score, index) min: take (ov, oi) when it is smaller.
__device__ __forceinline__ void merge_min(float& v, int& i, float ov, int oi) {
  if (ov < v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__device__ __forceinline__ float final_distance(int metric, float xnorm, float best) {
  if (metric == 0) {
    const float d = xnorm + best;
    return is_nan_bits(d) ? d : fmaxf(d, 0.0f);
  }
  return 1.0f + best;
}

// ---------------------------------------------------------------------------------------------
// Row sums of squares. One warp per output row: out[r] = compute ? sum_d a[r, d]^2 : 0 for
// r < rows, and +inf for rows <= r < out_rows (the padding codes of the last tile).
template <typename T>
__global__ void row_sumsq_kernel(const T* __restrict__ a, int64_t rows, int64_t D, int compute,
                                 float* __restrict__ out, int64_t out_rows) {
  const int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= out_rows) return;
  if (r >= rows) {
    if (lane == 0) out[r] = kInf;
    return;
  }
  float s = 0.0f;
  if (compute) {
    const T* p = a + r * D;
    for (int64_t k = lane; k < D; k += 32) {
      const float v = to_float<T>(p[k]);
      s = fmaf(v, v, s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  if (lane == 0) out[r] = s;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel.
constexpr int TC_BM = 128;       // rows of x per CTA
constexpr int TC_BN = 128;       // codes per tile
constexpr int TC_THREADS = 128;  // 4 warps: 2 (rows) x 2 (codes), 64 x 64 each
constexpr int TC_STAGES = 4;
constexpr int TC_CHUNK = 64;            // bytes of D per pipeline stage (32 halves / 16 floats)
constexpr int TC_KSTEP = 32;            // bytes of D per MMA (16 halves / 8 floats)
constexpr int TC_SROW = TC_CHUNK + 16;  // smem row stride of a streamed tile: 80 B (odd x 16 B:
                                        // the 8 rows of one ldmatrix hit 8 distinct 16 B groups)
constexpr int TC_RED_BYTES = 2 * TC_BM * (int)(sizeof(float) + sizeof(int));  // static smem

template <typename T> struct RawOf { using type = uint16_t; };
template <> struct RawOf<float> { using type = uint32_t; };

// Load one 64-byte slice (chunk c) of `rows` rows of a row-major (grows, D) matrix into shared
// memory at byte offset s_off (row stride s_stride, slice placed at byte column s_col).
// Rows past grows and columns past D are zero-filled. Only the 16-byte units that an executed
// k-step reads (byte column < Db_k) are written.
template <typename T>
__device__ __forceinline__ void tc_load_slice(unsigned char* smem, int s_off, int s_stride, int s_col,
                                              const T* __restrict__ g, int64_t grow0, int64_t grows,
                                              int rows, int64_t c, int64_t D, int64_t Db, int64_t Db_k,
                                              bool vec) {
  using Raw = typename RawOf<T>::type;
  constexpr int EPU = 16 / (int)sizeof(T);  // elements per 16-byte unit
  const int units = rows * 4;
  for (int u = threadIdx.x; u < units; u += TC_THREADS) {
    const int r = u >> 2, q = u & 3;
    const int64_t gcol = c * TC_CHUNK + q * 16;  // byte column in the global row
    if (gcol >= Db_k) continue;
    const int dst = s_off + r * s_stride + s_col + q * 16;
    const int64_t grow = grow0 + r;
    const bool row_ok = grow < grows;
    if (vec) {  // Db % 16 == 0 and 16-byte aligned base: a unit is wholly in or out
      const bool ok = row_ok && gcol < Db;
      const void* src = ok ? (const void*)(reinterpret_cast<const unsigned char*>(g) + grow * Db + gcol)
                           : (const void*)g;
      cp_async16(smem_u32(smem + dst), src, ok ? 16 : 0);
    } else {
      union {
        Raw e[EPU];
        uint4 v;
      } buf;
      const Raw* gr = reinterpret_cast<const Raw*>(g);
      const int64_t col0 = gcol / (int64_t)sizeof(T);
#pragma unroll
      for (int e = 0; e < EPU; ++e) {
        const int64_t col = col0 + e;
        buf.e[e] = (row_ok && col < D) ? __ldg(gr + grow * D + col) : (Raw)0;
      }
      *reinterpret_cast<uint4*>(smem + dst) = buf.v;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 2)
nearest_code_tc_kernel(const T* __restrict__ x, const T* __restrict__ cb, const float* __restrict__ bias,
                       int64_t N, int64_t K, int64_t D, float alpha, int metric, int resident, int vec,
                       int64_t* __restrict__ out_idx, float* __restrict__ out_dist) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float red_v[2][TC_BM];
  __shared__ int red_i[2][TC_BM];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;  // warp's rows: wm*64.., codes: wn*64..
  const int g = lane >> 2, t4 = lane & 3;   // mma fragment coordinates
  const int64_t row0 = (int64_t)blockIdx.x * TC_BM;
  const int64_t Db = D * (int64_t)sizeof(T);
  const int64_t Db_k = (Db + TC_KSTEP - 1) / TC_KSTEP * TC_KSTEP;
  const int nd = Db > 0 ? (int)((Db + TC_CHUNK - 1) / TC_CHUNK) : 1;  // D slices per code tile
  const int a_stride = resident ? nd * TC_CHUNK + 16 : TC_SROW;      // odd multiple of 16 bytes
  const int a_region = resident ? TC_BM * a_stride : TC_STAGES * TC_BM * TC_SROW;
  const int64_t ntiles = (K + TC_BN - 1) / TC_BN;
  const int64_t total = ntiles * nd;
  const bool vecb = vec != 0, res = resident != 0;

  // Per-lane ldmatrix offsets. A (x16 rows x 32 B): matrices (rows 0-7 | 8-15) x (bytes 0-15 | 16-31)
  // in the order a0..a3 of the mma A fragment. B (2 n-fragments of 8 codes x 32 B): matrices
  // (codes 0-7, bytes 0-15), (codes 0-7, bytes 16-31), (codes 8-15, ...), i.e. b0, b1 of two frags.
  const int a_lane = (wm * 64 + (lane & 7) + ((lane >> 3) & 1) * 8) * a_stride + (lane >> 4) * 16;
  const int b_lane = (wn * 64 + (lane & 7) + (lane >> 4) * 8) * TC_SROW + ((lane >> 3) & 1) * 16;
  const uint32_t s_base = smem_u32(smem);

  auto load_stage = [&](int64_t j) {
    const int slot = (int)(j % TC_STAGES);
    const int64_t tile = j / nd;
    const int64_t c = j - tile * nd;
    tc_load_slice<T>(smem, a_region + slot * TC_BN * TC_SROW, TC_SROW, 0, cb, tile * TC_BN, K, TC_BN, c, D,
                     Db, Db_k, vecb);
    if (!res)
      tc_load_slice<T>(smem, slot * TC_BM * TC_SROW, TC_SROW, 0, x, row0, N, TC_BM, c, D, Db, Db_k, vecb);
  };

  // Prologue: the resident x tile (in commit group 0), then stages 0..STAGES-2.
  if (res) {
    for (int c = 0; c < nd; ++c)
      tc_load_slice<T>(smem, 0, a_stride, c * TC_CHUNK, x, row0, N, TC_BM, c, D, Db, Db_k, vecb);
  }
#pragma unroll
  for (int s = 0; s < TC_STAGES - 1; ++s) {
    if (s < total) load_stage(s);
    cp_async_commit();
  }

  float acc[4][8][4];
  float best[4][2];
  int bidx[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best[i][h] = kInf;
      bidx[i][h] = 0;
    }
  }

  int c = 0;         // D slice of the current iteration
  int64_t tile = 0;  // code tile of the current iteration
  for (int64_t it = 0; it < total; ++it) {
    cp_async_wait<TC_STAGES - 2>();  // this thread's copies of slice `it` have landed
    __syncthreads();                 // everyone's have, and everyone is done with slot (it-1)%STAGES
    if (it + TC_STAGES - 1 < total) load_stage(it + TC_STAGES - 1);  // refills slot (it-1)%STAGES
    cp_async_commit();

    const int slot = (int)(it % TC_STAGES);
    const uint32_t a_tile = s_base + (res ? 0u : (uint32_t)(slot * TC_BM * TC_SROW)) + a_lane +
                            (res ? c * TC_CHUNK : 0);
    const uint32_t b_tile = s_base + a_region + slot * TC_BN * TC_SROW + b_lane;
#pragma unroll
    for (int ks = 0; ks < TC_CHUNK / TC_KSTEP; ++ks) {
      if ((int64_t)c * TC_CHUNK + ks * TC_KSTEP < Db) {  // block-uniform: skip k-steps past D
        uint32_t af[4][4], bf[8][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          ldmatrix_x4(af[i], a_tile + i * 16 * a_stride + ks * TC_KSTEP);
#pragma unroll
          for (int q = 0; q < 4; ++q) af[i][q] = Mma<T>::cvt(af[i][q]);
        }
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          uint32_t r[4];
          ldmatrix_x4(r, b_tile + jj * 16 * TC_SROW + ks * TC_KSTEP);
          bf[2 * jj][0] = Mma<T>::cvt(r[0]);
          bf[2 * jj][1] = Mma<T>::cvt(r[1]);
          bf[2 * jj + 1][0] = Mma<T>::cvt(r[2]);
          bf[2 * jj + 1][1] = Mma<T>::cvt(r[3]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) Mma<T>::run(acc[i][j], af[i], bf[j][0], bf[j][1]);
      }
    }

    if (c == nd - 1) {
      // Epilogue of a code tile: acc[i][j][2h+e] is (row wm*64 + i*16 + 8h + g,
      // code tile*128 + wn*64 + j*8 + 2*t4 + e). Codes visited in increasing order per row.
      const int64_t cbase = tile * TC_BN + wn * 64 + 2 * t4;
      float2 bv[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = __ldg(reinterpret_cast<const float2*>(bias + cbase + j * 8));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float lb = best[i][h];
          int lp = -1;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float s = fmaf(alpha, acc[i][j][2 * h + e], e ? bv[j].y : bv[j].x);
              if (s < lb) {
                lb = s;
                lp = j * 8 + e;
              }
            }
          }
          if (lp >= 0) {
            best[i][h] = lb;
            bidx[i][h] = (int)(cbase + lp);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
      c = 0;
      ++tile;
    } else {
      ++c;
    }
  }

  // Merge: the 4 lanes of a quad share a row; then the two code-warps (wn) of a row.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = best[i][h];
      int ix = bidx[i][h];
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, ix, o);
        merge_min(v, ix, ov, oi);
      }
      if (t4 == 0) {
        const int r = wm * 64 + i * 16 + h * 8 + g;
        red_v[wn][r] = v;
        red_i[wn][r] = ix;
      }
    }
  }
  __syncthreads();
  {
    const int r = tid;  // TC_THREADS == TC_BM: one row per thread
    float v = red_v[0][r];
    int ix = red_i[0][r];
    merge_min(v, ix, red_v[1][r], red_i[1][r]);
    const int64_t row = row0 + r;
    if (row < N) {
      const float xn = metric == 0 ? out_dist[row] : 0.0f;
      out_idx[row] = ix;
      out_dist[row] = final_distance(metric, xn, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Exact fp32 SIMT kernel.
constexpr int S_BM = 128, S_BN = 128, S_BK = 8, S_THREADS = 256, S_PAD = 4;

__global__ void __launch_bounds__(S_THREADS, 2)
nearest_code_simt_f32_kernel(const float* __restrict__ x, const float* __restrict__ cb,
                             const float* __restrict__ bias, int64_t N, int64_t K, int64_t D, float alpha,
                             int metric, int vec, int64_t* __restrict__ out_idx, float* __restrict__ out_dist) {
  // Transposed tiles, [k][row]: a thread reads 4 consecutive rows (codes) of one k as a float4.
  // Row length 132: the transposed stores of a warp (16 rows x 2 k-quads) are conflict-free.
  __shared__ __align__(16) float As[2][S_BK][S_BM + S_PAD];
  __shared__ __align__(16) float Bs[2][S_BK][S_BN + S_PAD];
  // The running (min, argmin) of this thread's 8 rows lives in shared memory, not registers: it is
  // touched once per code tile, and 16 fewer live registers keep 2 CTAs/SM without spills.
  __shared__ float best_s[8][S_THREADS];
  __shared__ int bidx_s[8][S_THREADS];

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;        // outputs: rows ty*4+{0..3}, 64+ty*4+{0..3}; codes by tx
  const int lr = tid >> 1, lk = (tid & 1) * 4;   // loader: row lr, k-quad lk of the slice
  const int64_t row0 = (int64_t)blockIdx.x * S_BM;
  const int nd = D > 0 ? (int)((D + S_BK - 1) / S_BK) : 1;
  const int64_t ntiles = (K + S_BN - 1) / S_BN;
  const int64_t total = ntiles * nd;

  auto gload = [&](const float* __restrict__ gm, int64_t grow0, int64_t grows, int64_t k0) -> float4 {
    const int64_t grow = grow0 + lr, k = k0 + lk;
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (grow < grows) {
      const float* p = gm + grow * D + k;
      if (vec) {  // D % 4 == 0 and 16-byte aligned: the quad is wholly in or out
        if (k < D) r = __ldg(reinterpret_cast<const float4*>(p));
      } else {
        if (k < D) r.x = __ldg(p);
        if (k + 1 < D) r.y = __ldg(p + 1);
        if (k + 2 < D) r.z = __ldg(p + 2);
        if (k + 3 < D) r.w = __ldg(p + 3);
      }
    }
    return r;
  };

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best_s[i][tid] = kInf;  // read and written only by this thread
    bidx_s[i][tid] = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  {
    const float4 ra = gload(x, row0, N, 0), rb = gload(cb, 0, K, 0);
    As[0][lk + 0][lr] = ra.x; As[0][lk + 1][lr] = ra.y; As[0][lk + 2][lr] = ra.z; As[0][lk + 3][lr] = ra.w;
    Bs[0][lk + 0][lr] = rb.x; Bs[0][lk + 1][lr] = rb.y; Bs[0][lk + 2][lr] = rb.z; Bs[0][lk + 3][lr] = rb.w;
  }
  __syncthreads();

  int c = 0;
  int64_t tile = 0;
  for (int64_t it = 0; it < total; ++it) {
    const int buf = (int)(it & 1);
    const bool has_next = it + 1 < total;
    float4 ra = make_float4(0.f, 0.f, 0.f, 0.f), rb = ra;
    if (has_next) {
      const int nc = (c + 1 < nd) ? c + 1 : 0;
      const int64_t ntile = (c + 1 < nd) ? tile : tile + 1;
      ra = gload(x, row0, N, (int64_t)nc * S_BK);
      rb = gload(cb, ntile * S_BN, K, (int64_t)nc * S_BK);
    }

#pragma unroll
    for (int k = 0; k < S_BK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][k][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][k][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][k][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][k][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }

    // Slot buf^1 was last read in iteration it-1, before that iteration's closing barrier; it is
    // read next in iteration it+1, after this iteration's. Storing before the epilogue frees ra/rb.
    if (has_next) {
      const int nb = buf ^ 1;
      As[nb][lk + 0][lr] = ra.x; As[nb][lk + 1][lr] = ra.y; As[nb][lk + 2][lr] = ra.z; As[nb][lk + 3][lr] = ra.w;
      Bs[nb][lk + 0][lr] = rb.x; Bs[nb][lk + 1][lr] = rb.y; Bs[nb][lk + 2][lr] = rb.z; Bs[nb][lk + 3][lr] = rb.w;
    }

    if (c == nd - 1) {
      // acc[i][j]: row (i<4 ? ty*4+i : 64+ty*4+i-4), code tile*128 + (j<4 ? tx*4+j : 64+tx*4+j-4).
      const int64_t cbase = tile * S_BN + tx * 4;
      const float4 bl = __ldg(reinterpret_cast<const float4*>(bias + cbase));
      const float4 bh = __ldg(reinterpret_cast<const float4*>(bias + cbase + 64));
      const float bb[8] = {bl.x, bl.y, bl.z, bl.w, bh.x, bh.y, bh.z, bh.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float lb = best_s[i][tid];
        int lp = -1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float s = fmaf(alpha, acc[i][j], bb[j]);
          if (s < lb) {
            lb = s;
            lp = j;
          }
          acc[i][j] = 0.0f;
        }
        if (lp >= 0) {
          best_s[i][tid] = lb;
          bidx_s[i][tid] = (int)(cbase + (lp < 4 ? lp : lp + 60));
        }
      }
      c = 0;
      ++tile;
    } else {
      ++c;
    }

    __syncthreads();
  }

  // The 16 lanes sharing ty (one half-warp) hold the codes of the same rows.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = best_s[i][tid];
    int ix = bidx_s[i][tid];
#pragma unroll
    for (int o = 1; o <= 8; o <<= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, o);
      const int oi = __shfl_xor_sync(0xffffffffu, ix, o);
      merge_min(v, ix, ov, oi);
    }
    const int64_t row = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
    if (tx == 0 && row < N) {
      const float xn = metric == 0 ? out_dist[row] : 0.0f;
      out_idx[row] = ix;
      out_dist[row] = final_distance(metric, xn, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
template <typename T>
cudaError_t launch_norms(const T* x, const T* cb, int64_t N, int64_t K, int64_t Kpad, int64_t D, int metric,
                         float* out_dist, float* bias, cudaStream_t stream) {
  constexpr int threads = 256, rows_per_block = threads / 32;
  row_sumsq_kernel<T><<<(unsigned)((Kpad + rows_per_block - 1) / rows_per_block), threads, 0, stream>>>(
      cb, K, D, metric == 0 ? 1 : 0, bias, Kpad);
  if (metric == 0)
    row_sumsq_kernel<T><<<(unsigned)((N + rows_per_block - 1) / rows_per_block), threads, 0, stream>>>(
        x, N, D, 1, out_dist, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tc(const T* x, const T* cb, const float* bias, int64_t N, int64_t K, int64_t D, int metric,
                      int64_t* out_idx, float* out_dist, cudaStream_t stream) {
  int dev = 0, smem_sm = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)) != cudaSuccess)
    return err;
  if ((err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
    return err;

  const int64_t Db = D * (int64_t)sizeof(T);
  const int64_t nd = Db > 0 ? (Db + TC_CHUNK - 1) / TC_CHUNK : 1;
  const int64_t streamed = (int64_t)TC_STAGES * (TC_BM + TC_BN) * TC_SROW;
  const int64_t resident_bytes = (int64_t)TC_BM * (nd * TC_CHUNK + 16) + (int64_t)TC_STAGES * TC_BN * TC_SROW;
  // Resident x only while two CTAs still fit on an SM (1 KB per CTA is reserved by the system).
  const bool resident = 2 * (resident_bytes + TC_RED_BYTES + 1024) <= smem_sm && resident_bytes <= smem_optin;
  const int64_t bytes = resident ? resident_bytes : streamed;
  if (bytes > smem_optin) return cudaErrorInvalidConfiguration;

  const bool vec = (Db % 16 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(cb) % 16 == 0);
  const float alpha = metric == 0 ? -2.0f : -1.0f;
  if ((err = cudaFuncSetAttribute(nearest_code_tc_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  (int)bytes)) != cudaSuccess)
    return err;
  // Ask for the largest shared-memory carveout, so that two CTAs fit on an SM.
  if ((err = cudaFuncSetAttribute(nearest_code_tc_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                  (int)cudaSharedmemCarveoutMaxShared)) != cudaSuccess)
    return err;
  const int64_t blocks = (N + TC_BM - 1) / TC_BM;
  nearest_code_tc_kernel<T><<<(unsigned)blocks, TC_THREADS, (size_t)bytes, stream>>>(
      x, cb, bias, N, K, D, alpha, metric, resident ? 1 : 0, vec ? 1 : 0, out_idx, out_dist);
  return cudaGetLastError();
}

}  // namespace

// Floats of workspace the launch needs: the per-code bias, padded to whole tiles of 128 codes.
int64_t nearest_code_workspace_floats(int64_t K) { return (K + 127) / 128 * 128; }

// dtype: 0 float32, 1 float16, 2 bfloat16. x (N, D) and codebook (K, D) contiguous on the current
// device; N >= 1, K >= 1. out_idx (N,) int64, out_dist (N,) float32, workspace as above.
// Everything runs on `stream`; returns the first CUDA error (launch errors included).
cudaError_t launch_nearest_code(const void* x, const void* codebook, int dtype, int64_t N, int64_t K, int64_t D,
                                int64_t metric, bool allow_tf32, int64_t* out_idx, float* out_dist,
                                float* workspace, cudaStream_t stream) {
  static_assert(TC_THREADS == TC_BM, "the final merge gives each thread one row");
  static_assert(S_THREADS == 2 * S_BM && S_BM == S_BN && S_BK == 8, "the SIMT loader maps 2 threads per row");
  if (N <= 0) return cudaSuccess;
  const int m = (int)metric;
  const int64_t Kpad = nearest_code_workspace_floats(K);
  // Grid x limit (2^31 - 1 blocks) of the norm kernels (8 rows per block), the largest grids here.
  if ((N + 7) / 8 > INT32_MAX || (Kpad + 7) / 8 > INT32_MAX) return cudaErrorInvalidValue;
  cudaError_t err;
  switch (dtype) {
    case 0: {
      const float* xf = static_cast<const float*>(x);
      const float* cf = static_cast<const float*>(codebook);
      if ((err = launch_norms<float>(xf, cf, N, K, Kpad, D, m, out_dist, workspace, stream)) != cudaSuccess)
        return err;
      if (allow_tf32) return launch_tc<float>(xf, cf, workspace, N, K, D, m, out_idx, out_dist, stream);
      const bool vec = (D % 4 == 0) && (reinterpret_cast<uintptr_t>(xf) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(cf) % 16 == 0);
      const float alpha = m == 0 ? -2.0f : -1.0f;
      const int64_t blocks = (N + S_BM - 1) / S_BM;
      nearest_code_simt_f32_kernel<<<(unsigned)blocks, S_THREADS, 0, stream>>>(
          xf, cf, workspace, N, K, D, alpha, m, vec ? 1 : 0, out_idx, out_dist);
      return cudaGetLastError();
    }
    case 1: {
      const __half* xh = static_cast<const __half*>(x);
      const __half* ch = static_cast<const __half*>(codebook);
      if ((err = launch_norms<__half>(xh, ch, N, K, Kpad, D, m, out_dist, workspace, stream)) != cudaSuccess)
        return err;
      return launch_tc<__half>(xh, ch, workspace, N, K, D, m, out_idx, out_dist, stream);
    }
    case 2: {
      const __nv_bfloat16* xb = static_cast<const __nv_bfloat16*>(x);
      const __nv_bfloat16* cbb = static_cast<const __nv_bfloat16*>(codebook);
      if ((err = launch_norms<__nv_bfloat16>(xb, cbb, N, K, Kpad, D, m, out_dist, workspace, stream)) !=
          cudaSuccess)
        return err;
      return launch_tc<__nv_bfloat16>(xb, cbb, workspace, N, K, D, m, out_idx, out_dist, stream);
    }
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace vqkernels
