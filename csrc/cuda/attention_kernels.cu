// Attention on CUDA: forward, backward and cached decoding. Light includes only (no torch headers):
// the launchers and the op registration live in attention.cpp; the argument structs in
// attention_params.h.
//
// The function (csrc/registration.cpp, vqkernels/ops/attention/reference):
//   q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh); query head h reads kv head h / (H / Hkv).
//   s[i, j] = scale * <q_i, k_j>; causal masks key j > i + (Tk - Tq) (bottom-right aligned);
//   out_i = sum_j softmax_j(s[i, :]) v_j, lse_i = log sum_j exp(s[i, j]) (natural log, float32).
//   A row that sees no key (causal with Tq > Tk, or Tk = 0) gives out 0, lse -inf, zero gradients.
// Softmax runs in base 2: scores are multiplied by scale * log2(e) once, exp2f everywhere, and the
// lse is converted back to natural log on output (lse = m ln2 + ln l).
//
// Kernels:
//   * attn_fwd_tc_kernel<T, D, ...> (float16 / bfloat16): FlashAttention-2 forward. A CTA owns BM
//     query rows (16 per warp), streams K/V tiles of BN keys through shared memory with a cp.async
//     double buffer, S = Q K^T and O += P V on mma.sync m16n8k16 with fp32 accumulators, the online
//     softmax in registers (each row lives in the 4 lanes of a quad). D is the head dim rounded up
//     to an instantiated size (32, 64, 128, 256): columns past Dh are zero-filled on load (they add
//     nothing to Q K^T) and never stored. Key tiles past the causal diagonal are never loaded.
//   * attn_fwd_simt_kernel (float32): the same algorithm in exact fp32 FFMA (no TF32), 32 x 32 tiles.
//   * Backward, FlashAttention-2 style, deterministic (no atomics), no Tq x Tk matrix in memory:
//     attn_bwd_delta_kernel<T> (delta = rowsum(dO * O)), then one CTA per key block computes dK, dV
//     in registers, looping over the query blocks of every query head of the group (so dK/dV are
//     summed over the group), and a second pass per query block computes dQ (recomputing S and dP).
//       - attn_bwd_dkdv_tc_kernel<T, D>, attn_bwd_dq_tc_kernel<T, D>: float16 / bfloat16 with
//         Dh <= 128 (D = 32, 64, 128), mma.sync as in the forward;
//       - attn_bwd_dkdv_kernel<T>, attn_bwd_dq_kernel<T>: SIMT fp32 math for float32 (exact), for
//         Dh > 128, and for every dtype when the launcher sets force_simt (VQKERNELS_ATTN_BWD_SIMT=1).
//   * attn_decode_kernel<T> + attn_decode_combine_kernel<T>: flash-decoding. The cache length is
//     split over CTAs (the number of splits comes from shapes only); one CTA serves all grouped query
//     heads of a kv head (up to 8 query rows at once) over one split, reading only positions below
//     cache_seqlens[b] (read on the device: no host synchronisation, graph-capturable), and writes a
//     partial (out, lse) in fp32; the combine kernel merges the splits. With one split the decode
//     kernel writes the output itself.
//
// All global offsets are int64 (b * sb + h * sh + t * st may pass 2^31).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "attention_params.h"
#include "ptx.cuh"

namespace vqkernels {
namespace cuda {

namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Keys [0, kend) are visible to at least one of the query rows [m0, m0 + rows) (the causal bound);
// returns the number of key tiles of `bn` keys to visit (0 when no row sees a key).
__device__ __forceinline__ int key_tiles(int64_t m0, int rows, int64_t Tq, int64_t Tk, bool causal, int bn) {
  int64_t kend = Tk;
  if (causal) {
    const int64_t last = (m0 + rows < Tq ? m0 + rows : Tq) + (Tk - Tq);  // (last row + 1) + offset
    kend = last < Tk ? last : Tk;
  }
  return kend > 0 ? (int)((kend + bn - 1) / bn) : 0;
}

// =============================================================================================
// Forward, float16 / bfloat16: tensor cores.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16 x 16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16 x 8):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16 x 8):  c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// ldmatrix.x4: lanes 8i..8i+7 address the 8 rows of matrix i; register i holds, per lane, row g,
// columns 2t..2t+1 of matrix i (with .trans: rows 2t..2t+1 of column g).
//   Q (A of S = Q K^T), row-major [query][d]: matrix i = rows (i & 1) * 8, cols (i >> 1) * 8.
//   K (B of S), stored [key][d] = B^T: matrix i = keys (i >> 1) * 8, d (i & 1) * 8:
//     registers {0, 1} are b0, b1 of the n-tile of keys 0-7, {2, 3} of keys 8-15.
//   P (A of O += P V) is the S accumulator itself: n-tiles 2kk, 2kk+1 give a0..a3 of k-step kk.
//   V (B of O), stored [key][d]: .trans, matrix i = keys (i & 1) * 8, d (i >> 1) * 8:
//     registers {0, 1} are b0, b1 of the d-tile 0-7, {2, 3} of d-tile 8-15.
// Shared rows are padded by 16 bytes (D + 8 elements): the 8 row addresses of one ldmatrix fall in
// 8 distinct 16-byte bank groups for every D (multiple of 32 elements).
template <int D> struct FwdCfg;
// BM query rows (16 per warp: NW warps), BN keys per tile, MINB CTAs per SM (the register budget:
// 2 CTAs of 256 threads = 128 registers a thread), QREG: Q fragments held in registers.
template <> struct FwdCfg<32> { static constexpr int BM = 128, BN = 64, NW = 8, MINB = 2; static constexpr bool QREG = true; };
template <> struct FwdCfg<64> { static constexpr int BM = 128, BN = 64, NW = 8, MINB = 1; static constexpr bool QREG = true; };
template <> struct FwdCfg<128> { static constexpr int BM = 128, BN = 64, NW = 8, MINB = 1; static constexpr bool QREG = true; };
// D = 256: Q fragments are re-read from shared memory (128 fp32 output accumulators leave no room).
template <> struct FwdCfg<256> { static constexpr int BM = 64, BN = 32, NW = 4, MINB = 1; static constexpr bool QREG = false; };

template <int D>
constexpr int fwd_tc_smem_bytes() {
  return (FwdCfg<D>::BM + 4 * FwdCfg<D>::BN) * (D + 8) * 2;
}

// rows x D tile of a (T, Dh) row-major matrix (row stride st) into shared memory (row stride D + 8),
// zero-filling rows >= nrows and columns >= Dh. 16-byte units: Dh % 8 == 0, 16-byte aligned rows.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void tc_load_tile(T* s, const T* g, int64_t st, int64_t row0, int64_t nrows, int dch) {
  constexpr int CH = D / 8;
  constexpr int SROW = D + 8;
#pragma unroll
  for (int e = threadIdx.x; e < ROWS * CH; e += THREADS) {
    const int r = e / CH, c = e % CH;
    const int64_t gr = row0 + r;
    const bool ok = gr < nrows && c < dch;
    cp_async16(smem_u32(s + r * SROW + c * 8), ok ? (const void*)(g + gr * st + c * 8) : (const void*)g,
               ok ? 16 : 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::NW * 32, FwdCfg<D>::MINB) attn_fwd_tc_kernel(const AttnFwdArgs a) {
  constexpr int BM = FwdCfg<D>::BM, BN = FwdCfg<D>::BN, NW = FwdCfg<D>::NW;
  constexpr bool QREG = FwdCfg<D>::QREG;
  constexpr int THREADS = NW * 32, SROW = D + 8, KSTEPS = D / 16, NT_S = BN / 8, NT_O = D / 8;
  static_assert(BM == 16 * NW, "one warp per 16 query rows");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * SROW;      // 2 stages of BN x SROW
  T* sV = sK + 2 * BN * SROW;  // 2 stages of BN x SROW

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t Tq = a.Tq, Tk = a.Tk, off = Tk - Tq;
  const int64_t m0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * BM;  // heavy (late, causal) blocks first
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (a.H / a.Hkv);
  const int dch = (int)(a.Dh / 8);
  const bool causal = a.causal;
  const float sl2 = a.scale * kLog2e;

  const T* qg = static_cast<const T*>(a.q.ptr) + b * a.q.sb + h * a.q.sh;
  const T* kg = static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh;
  const int n_tiles = key_tiles(m0, BM, Tq, Tk, causal, BN);

  tc_load_tile<T, D, BM, THREADS>(sQ, qg, a.q.st, m0, Tq, dch);
  cp_async_commit();
  if (n_tiles > 0) {
    tc_load_tile<T, D, BN, THREADS>(sK, kg, a.k.st, 0, Tk, dch);
    tc_load_tile<T, D, BN, THREADS>(sV, vg, a.v.st, 0, Tk, dch);
  }
  cp_async_commit();

  const int wrow = warp * 16;                                  // the warp's first row in the tile
  const int64_t row_a = m0 + wrow + g, row_b = row_a + 8;      // this lane's two rows
  // Per-lane ldmatrix element offsets (see the layout notes above).
  const int q_lane = (wrow + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;
  const int k_lane = ((lane & 7) + (lane >> 4) * 8) * SROW + ((lane >> 3) & 1) * 8;
  const int v_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;

  uint32_t qf[QREG ? KSTEPS : 1][4];
  if (QREG) {
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < (QREG ? KSTEPS : 1); ++ks) ldmatrix_x4(qf[ks], sQ + q_lane + ks * 16);
  }

  float acc[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_a = -kInf, m_b = -kInf, l_a = 0.f, l_b = 0.f;

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) {
      const int st = (n + 1) & 1;
      tc_load_tile<T, D, BN, THREADS>(sK + st * BN * SROW, kg, a.k.st, (int64_t)(n + 1) * BN, Tk, dch);
      tc_load_tile<T, D, BN, THREADS>(sV + st * BN * SROW, vg, a.v.st, (int64_t)(n + 1) * BN, Tk, dch);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ks_ = sK + (n & 1) * BN * SROW;
    const T* vs_ = sV + (n & 1) * BN * SROW;

    // S = Q K^T (16 x BN per warp).
    float s[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t af[4];
      if (QREG) {
        af[0] = qf[QREG ? ks : 0][0];
        af[1] = qf[QREG ? ks : 0][1];
        af[2] = qf[QREG ? ks : 0][2];
        af[3] = qf[QREG ? ks : 0][3];
      } else {
        ldmatrix_x4(af, sQ + q_lane + ks * 16);
      }
#pragma unroll
      for (int jn = 0; jn < NT_S / 2; ++jn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, ks_ + k_lane + jn * 16 * SROW + ks * 16);
        Mma<T>::run(s[2 * jn], af, bf[0], bf[1]);
        Mma<T>::run(s[2 * jn + 1], af, bf[2], bf[3]);
      }
    }

    // Scale to base 2, mask (the key tail, the causal diagonal), online softmax.
    const int64_t key0 = (int64_t)n * BN;
    const bool need_mask = key0 + BN > Tk || (causal && key0 + BN - 1 > m0 + wrow + off);
    float mx_a = -kInf, mx_b = -kInf;
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * sl2;
        if (need_mask) {
          const int64_t key = key0 + j * 8 + 2 * t + (e & 1);
          const int64_t row = (e & 2) ? row_b : row_a;
          if (key >= Tk || (causal && key > row + off)) x = -kInf;
        }
        s[j][e] = x;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
    }
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    // A row with no visible key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN).
    const float ms_a = mn_a == -kInf ? 0.f : mn_a, ms_b = mn_b == -kInf ? 0.f : mn_b;
    const float al_a = exp2f(m_a - ms_a), al_b = exp2f(m_b - ms_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
      s[j][0] = exp2f(s[j][0] - ms_a);
      s[j][1] = exp2f(s[j][1] - ms_a);
      s[j][2] = exp2f(s[j][2] - ms_b);
      s[j][3] = exp2f(s[j][3] - ms_b);
      sum_a += s[j][0] + s[j][1];
      sum_b += s[j][2] + s[j][3];
    }
    l_a = l_a * al_a + sum_a;  // this lane's partial row sums (the quad is reduced at the end)
    l_b = l_b * al_b + sum_b;
#pragma unroll
    for (int j = 0; j < NT_O; ++j) {
      acc[j][0] *= al_a;
      acc[j][1] *= al_a;
      acc[j][2] *= al_b;
      acc[j][3] *= al_b;
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, vs_ + v_lane + kk * 16 * SROW + dn * 16);
        Mma<T>::run(acc[2 * dn], pa, bf[0], bf[1]);
        Mma<T>::run(acc[2 * dn + 1], pa, bf[2], bf[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // (n_tiles == 0: the Q group may still be in flight)
  __syncthreads();

  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;

  // Stage the warp's 16 output rows in its own rows of sQ (only this warp reads them), then store
  // 16-byte units.
  T* so = sQ + wrow * SROW;
#pragma unroll
  for (int j = 0; j < NT_O; ++j) {
    *reinterpret_cast<uint32_t*>(so + g * SROW + j * 8 + 2 * t) = pack2<T>(acc[j][0] * inv_a, acc[j][1] * inv_a);
    *reinterpret_cast<uint32_t*>(so + (g + 8) * SROW + j * 8 + 2 * t) =
        pack2<T>(acc[j][2] * inv_b, acc[j][3] * inv_b);
  }
  __syncwarp();
  T* og = static_cast<T*>(a.o.ptr) + b * a.o.sb + h * a.o.sh;
  for (int e = lane; e < 16 * NT_O; e += 32) {
    const int r = e / NT_O, c = e % NT_O;
    const int64_t row = m0 + wrow + r;
    if (row < Tq && c < dch)
      *reinterpret_cast<uint4*>(og + row * a.o.st + c * 8) = *reinterpret_cast<const uint4*>(so + r * SROW + c * 8);
  }
  if (t == 0) {
    float* lse = a.lse + (b * a.H + h) * Tq;
    if (row_a < Tq) lse[row_a] = l_a > 0.f ? m_a * kLn2 + __logf(l_a) : -kInf;
    if (row_b < Tq) lse[row_b] = l_b > 0.f ? m_b * kLn2 + __logf(l_b) : -kInf;
  }
}

// =============================================================================================
// SIMT kernels (fp32 math): 32 query rows x 32 keys per tile, 256 threads. Thread (r, c) =
// (tid / 8, tid % 8): the 8 lanes of a row are 8 consecutive lanes of one warp. A thread owns the
// output columns d = c + 8 i (i < Dh / 8 <= 32). Shared rows are padded to Dh + 1 floats (odd: the
// 8 rows read at once fall in distinct banks).
constexpr int SB = 32;
constexpr int S_THREADS = 256;
constexpr int MAXC = 32;  // Dh / 8 at Dh = 256

template <typename T>
__device__ __forceinline__ void load_rows_f32(float* s, int sstride, const T* g, int64_t gst, int64_t row0,
                                              int64_t nrows, int Dh) {
  for (int e = threadIdx.x; e < SB * Dh; e += S_THREADS) {
    const int r = e / Dh, d = e - r * Dh;
    const int64_t gr = row0 + r;
    s[r * sstride + d] = gr < nrows ? to_float<T>(g[gr * gst + d]) : 0.f;
  }
}

__device__ __forceinline__ float dot_smem(const float* x, const float* y, int Dh) {
  float acc0 = 0.f, acc1 = 0.f;
  int d = 0;
  for (; d + 1 < Dh; d += 2) {
    acc0 = fmaf(x[d], y[d], acc0);
    acc1 = fmaf(x[d + 1], y[d + 1], acc1);
  }
  return acc0 + acc1;  // Dh is even (a multiple of 8)
}

__device__ __forceinline__ float max8(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
}
__device__ __forceinline__ float sum8(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v + __shfl_xor_sync(0xffffffffu, v, 4);
}

size_t simt_fwd_smem_bytes(int64_t Dh) { return sizeof(float) * (3 * SB * (Dh + 1) + SB * (SB + 1)); }

template <typename T>
__global__ void __launch_bounds__(S_THREADS) attn_fwd_simt_kernel(const AttnFwdArgs a) {
  extern __shared__ float smf[];
  const int Dh = (int)a.Dh, SD = Dh + 1, nd = Dh / 8;
  float* sQ = smf;
  float* sK = sQ + SB * SD;
  float* sV = sK + SB * SD;
  float* sP = sV + SB * SD;  // [SB][SB + 1]
  const int tid = threadIdx.x, r = tid >> 3, c = tid & 7;
  const int64_t Tq = a.Tq, Tk = a.Tk, off = Tk - Tq;
  const int64_t m0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * SB;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (a.H / a.Hkv);
  const bool causal = a.causal;
  const float sl2 = a.scale * kLog2e;
  const T* qg = static_cast<const T*>(a.q.ptr) + b * a.q.sb + h * a.q.sh;
  const T* kg = static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh;
  const int64_t row = m0 + r;
  const int n_tiles = key_tiles(m0, SB, Tq, Tk, causal, SB);

  load_rows_f32<T>(sQ, SD, qg, a.q.st, m0, Tq, Dh);
  float acc[MAXC];
#pragma unroll
  for (int i = 0; i < MAXC; ++i) acc[i] = 0.f;
  float m = -kInf, l = 0.f;

  for (int n = 0; n < n_tiles; ++n) {
    const int64_t key0 = (int64_t)n * SB;
    __syncthreads();  // the previous tile's readers are done
    load_rows_f32<T>(sK, SD, kg, a.k.st, key0, Tk, Dh);
    load_rows_f32<T>(sV, SD, vg, a.v.st, key0, Tk, Dh);
    __syncthreads();
    float s[4];
    float mx = -kInf;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = c + 8 * jj;
      const int64_t key = key0 + j;
      float x = dot_smem(sQ + r * SD, sK + j * SD, Dh) * sl2;
      if (key >= Tk || (causal && key > row + off)) x = -kInf;
      s[jj] = x;
      mx = fmaxf(mx, x);
    }
    mx = max8(mx);
    const float mn = fmaxf(m, mx), ms = mn == -kInf ? 0.f : mn;
    const float alpha = exp2f(m - ms);
    m = mn;
    float ps = 0.f;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const float p = exp2f(s[jj] - ms);
      ps += p;
      sP[r * (SB + 1) + c + 8 * jj] = p;
    }
    l = l * alpha + sum8(ps);
    __syncwarp();  // row r of sP is written and read by the 8 lanes of row r only
#pragma unroll
    for (int i = 0; i < MAXC; ++i) acc[i] *= alpha;
    for (int j = 0; j < SB; ++j) {
      const float p = sP[r * (SB + 1) + j];
      const float* vr = sV + j * SD + c;
#pragma unroll
      for (int i = 0; i < MAXC; ++i)
        if (i < nd) acc[i] = fmaf(p, vr[8 * i], acc[i]);
    }
  }
  if (row < Tq) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* og = static_cast<T*>(a.o.ptr) + b * a.o.sb + h * a.o.sh + row * a.o.st;
#pragma unroll
    for (int i = 0; i < MAXC; ++i)
      if (i < nd) og[c + 8 * i] = from_float<T>(acc[i] * inv);
    if (c == 0) a.lse[(b * a.H + h) * Tq + row] = l > 0.f ? m * kLn2 + logf(l) : -kInf;
  }
}

// =============================================================================================
// Backward, SIMT (every dtype, fp32 math).

// delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d]: one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const AttnBwdArgs a) {
  const int64_t R = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t rows = a.B * a.H * a.Tq;
  if (R >= rows) return;
  const int64_t i = R % a.Tq, bh = R / a.Tq, h = bh % a.H, b = bh / a.H;
  const T* dog = static_cast<const T*>(a.dout.ptr) + b * a.dout.sb + h * a.dout.sh + i * a.dout.st;
  const T* og = static_cast<const T*>(a.o.ptr) + b * a.o.sb + h * a.o.sh + i * a.o.st;
  float acc = 0.f;
  for (int64_t d = lane; d < a.Dh; d += 32) acc = fmaf(to_float<T>(dog[d]), to_float<T>(og[d]), acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) a.delta[R] = acc;
}

size_t bwd_dkdv_smem_bytes(int64_t Dh) { return sizeof(float) * (4 * SB * (Dh + 1) + 2 * SB * (SB + 1) + 2 * SB); }
size_t bwd_dq_smem_bytes(int64_t Dh) { return sizeof(float) * (4 * SB * (Dh + 1) + SB * (SB + 1)); }

// One CTA per block of 32 keys of one kv head: dV = sum P^T dO, dK = scale * sum dS^T Q over the query
// blocks of every query head of the group. Thread (jr, c) = (tid / 8, tid % 8) owns key jr of the block,
// columns c + 8 i; it computes P and dS for queries c + 8 ii (ii < 4) against its key.
template <typename T>
__global__ void __launch_bounds__(S_THREADS) attn_bwd_dkdv_kernel(const AttnBwdArgs a) {
  extern __shared__ float smf[];
  const int Dh = (int)a.Dh, SD = Dh + 1, nd = Dh / 8;
  float* sK = smf;
  float* sV = sK + SB * SD;
  float* sQ = sV + SB * SD;
  float* sdO = sQ + SB * SD;
  float* sP = sdO + SB * SD;     // [query][key], SB x (SB + 1)
  float* sdS = sP + SB * (SB + 1);
  float* sL = sdS + SB * (SB + 1);  // lse * log2(e) of the block's query rows
  float* sDl = sL + SB;             // delta of the block's query rows
  const int tid = threadIdx.x, jr = tid >> 3, c = tid & 7;
  const int64_t Tq = a.Tq, Tk = a.Tk, off = Tk - Tq;
  const int64_t n0 = (int64_t)blockIdx.x * SB, hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = a.H / a.Hkv;
  const bool causal = a.causal;
  const float sl2 = a.scale * kLog2e;
  const int64_t key = n0 + jr;

  load_rows_f32<T>(sK, SD, static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh, a.k.st, n0, Tk, Dh);
  load_rows_f32<T>(sV, SD, static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh, a.v.st, n0, Tk, Dh);

  float dk[MAXC], dv[MAXC];
#pragma unroll
  for (int i = 0; i < MAXC; ++i) dk[i] = dv[i] = 0.f;

  // Query rows that see key n0 or a later one: i + off >= n0.
  const int64_t first = causal ? (n0 - off > 0 ? n0 - off : 0) : 0;
  const int64_t mb_begin = first / SB, mb_end = (Tq + SB - 1) / SB;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = hk * G + gi;
    const T* qg = static_cast<const T*>(a.q.ptr) + b * a.q.sb + h * a.q.sh;
    const T* dog = static_cast<const T*>(a.dout.ptr) + b * a.dout.sb + h * a.dout.sh;
    const float* lse = a.lse + (b * a.H + h) * Tq;
    const float* delta = a.delta + (b * a.H + h) * Tq;
    for (int64_t mb = mb_begin; mb < mb_end; ++mb) {
      const int64_t m0 = mb * SB;
      __syncthreads();  // the previous block's readers are done
      load_rows_f32<T>(sQ, SD, qg, a.q.st, m0, Tq, Dh);
      load_rows_f32<T>(sdO, SD, dog, a.dout.st, m0, Tq, Dh);
      if (tid < SB) {
        const int64_t row = m0 + tid;
        sL[tid] = row < Tq ? lse[row] * kLog2e : -kInf;
        sDl[tid] = row < Tq ? delta[row] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const int qi = c + 8 * ii;
        const int64_t row = m0 + qi;
        const float lr = sL[qi];
        const bool vis = row < Tq && key < Tk && lr != -kInf && !(causal && key > row + off);
        float p = 0.f, ds = 0.f;
        if (vis) {
          const float sc = dot_smem(sQ + qi * SD, sK + jr * SD, Dh);
          const float dp = dot_smem(sdO + qi * SD, sV + jr * SD, Dh);
          p = exp2f(sc * sl2 - lr);
          ds = p * (dp - sDl[qi]);
        }
        sP[qi * (SB + 1) + jr] = p;
        sdS[qi * (SB + 1) + jr] = ds;
      }
      __syncwarp();  // column jr of sP / sdS is written and read by the 8 lanes of key jr only
      for (int qi = 0; qi < SB; ++qi) {
        const float p = sP[qi * (SB + 1) + jr], ds = sdS[qi * (SB + 1) + jr];
        const float* dor = sdO + qi * SD + c;
        const float* qr = sQ + qi * SD + c;
#pragma unroll
        for (int i = 0; i < MAXC; ++i)
          if (i < nd) {
            dv[i] = fmaf(p, dor[8 * i], dv[i]);
            dk[i] = fmaf(ds, qr[8 * i], dk[i]);
          }
      }
    }
  }
  if (key < Tk) {
    T* dkg = static_cast<T*>(a.dk.ptr) + b * a.dk.sb + hk * a.dk.sh + key * a.dk.st;
    T* dvg = static_cast<T*>(a.dv.ptr) + b * a.dv.sb + hk * a.dv.sh + key * a.dv.st;
#pragma unroll
    for (int i = 0; i < MAXC; ++i)
      if (i < nd) {
        dkg[c + 8 * i] = from_float<T>(dk[i] * a.scale);
        dvg[c + 8 * i] = from_float<T>(dv[i]);
      }
  }
}

// One CTA per block of 32 query rows of one head: dQ = scale * sum_j dS K. Thread (r, c) owns row r,
// columns c + 8 i; it computes dS for keys c + 8 jj (jj < 4) of each key tile.
template <typename T>
__global__ void __launch_bounds__(S_THREADS) attn_bwd_dq_kernel(const AttnBwdArgs a) {
  extern __shared__ float smf[];
  const int Dh = (int)a.Dh, SD = Dh + 1, nd = Dh / 8;
  float* sQ = smf;
  float* sdO = sQ + SB * SD;
  float* sK = sdO + SB * SD;
  float* sV = sK + SB * SD;
  float* sdS = sV + SB * SD;  // [query][key], SB x (SB + 1)
  const int tid = threadIdx.x, r = tid >> 3, c = tid & 7;
  const int64_t Tq = a.Tq, Tk = a.Tk, off = Tk - Tq;
  const int64_t m0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * SB;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (a.H / a.Hkv);
  const bool causal = a.causal;
  const float sl2 = a.scale * kLog2e;
  const int64_t row = m0 + r;
  const T* kg = static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh;

  load_rows_f32<T>(sQ, SD, static_cast<const T*>(a.q.ptr) + b * a.q.sb + h * a.q.sh, a.q.st, m0, Tq, Dh);
  load_rows_f32<T>(sdO, SD, static_cast<const T*>(a.dout.ptr) + b * a.dout.sb + h * a.dout.sh, a.dout.st, m0,
                   Tq, Dh);
  const float lr = row < Tq ? a.lse[(b * a.H + h) * Tq + row] * kLog2e : -kInf;
  const float dl = row < Tq ? a.delta[(b * a.H + h) * Tq + row] : 0.f;
  float dq[MAXC];
#pragma unroll
  for (int i = 0; i < MAXC; ++i) dq[i] = 0.f;

  const int n_tiles = key_tiles(m0, SB, Tq, Tk, causal, SB);
  for (int n = 0; n < n_tiles; ++n) {
    const int64_t key0 = (int64_t)n * SB;
    __syncthreads();
    load_rows_f32<T>(sK, SD, kg, a.k.st, key0, Tk, Dh);
    load_rows_f32<T>(sV, SD, vg, a.v.st, key0, Tk, Dh);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = c + 8 * jj;
      const int64_t key = key0 + j;
      const bool vis = row < Tq && key < Tk && lr != -kInf && !(causal && key > row + off);
      float ds = 0.f;
      if (vis) {
        const float sc = dot_smem(sQ + r * SD, sK + j * SD, Dh);
        const float dp = dot_smem(sdO + r * SD, sV + j * SD, Dh);
        ds = exp2f(sc * sl2 - lr) * (dp - dl);
      }
      sdS[r * (SB + 1) + j] = ds;
    }
    __syncwarp();  // row r of sdS is written and read by the 8 lanes of row r only
    for (int j = 0; j < SB; ++j) {
      const float ds = sdS[r * (SB + 1) + j];
      const float* kr = sK + j * SD + c;
#pragma unroll
      for (int i = 0; i < MAXC; ++i)
        if (i < nd) dq[i] = fmaf(ds, kr[8 * i], dq[i]);
    }
  }
  if (row < Tq) {
    T* dqg = static_cast<T*>(a.dq.ptr) + b * a.dq.sb + h * a.dq.sh + row * a.dq.st;
#pragma unroll
    for (int i = 0; i < MAXC; ++i)
      if (i < nd) dqg[c + 8 * i] = from_float<T>(dq[i] * a.scale);
  }
}

// =============================================================================================
// Backward, float16 / bfloat16 with Dh <= 128: tensor cores (the same fragment layouts as the
// forward). Two kernels, no atomics, deterministic:
//   * attn_bwd_dkdv_tc_kernel: a CTA owns BN keys (16 per warp) of one kv head and loops over the
//     query blocks (BM rows, cp.async double buffer of Q, dO, lse, delta) of every query head of the
//     group. Per block each warp computes S^T = K Q^T and dP^T = V dO^T (16 keys x BM queries: K and
//     V rows are the A operands, Q and dO rows the B operands, as K in the forward), then
//     P^T = exp2(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - delta), and accumulates
//     dV += P^T dO and dK += dS^T Q in registers (P^T and dS^T are A fragments straight from the
//     accumulators, dO and Q the B operands through ldmatrix.trans, as V in the forward).
//   * attn_bwd_dq_tc_kernel: a CTA owns BM query rows (16 per warp) and loops over key tiles as the
//     forward does: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K (K through .trans).
//     It recomputes S and dP (two extra matmuls) instead of reducing dQ with atomics.
// dS is rounded to the input type for the mma, as FlashAttention-2 does.
template <int D> struct BwdCfg;
// dkdv: NW warps, BN = 16 NW keys per CTA, BM queries per block. dq: BMQ = 16 NWQ rows, BNQ keys per tile.
template <> struct BwdCfg<32> { static constexpr int NW = 8, BM = 64, NWQ = 8, BNQ = 64; };
template <> struct BwdCfg<64> { static constexpr int NW = 8, BM = 64, NWQ = 8, BNQ = 64; };
template <> struct BwdCfg<128> { static constexpr int NW = 8, BM = 32, NWQ = 8, BNQ = 64; };

template <int D>
constexpr int bwd_dkdv_tc_smem_bytes() {
  return (2 * 16 * BwdCfg<D>::NW + 4 * BwdCfg<D>::BM) * (D + 8) * 2 + 4 * BwdCfg<D>::BM * 4;
}
template <int D>
constexpr int bwd_dq_tc_smem_bytes() {
  return (2 * 16 * BwdCfg<D>::NWQ + 4 * BwdCfg<D>::BNQ) * (D + 8) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdCfg<D>::NW * 32, 1) attn_bwd_dkdv_tc_kernel(const AttnBwdArgs a) {
  constexpr int NW = BwdCfg<D>::NW, BM = BwdCfg<D>::BM, BN = 16 * NW;
  constexpr int THREADS = NW * 32, SROW = D + 8, KSTEPS = D / 16, NT_S = BM / 8, NT_O = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // BN x SROW
  T* sV = sK + BN * SROW;                  // BN x SROW
  T* sQ = sV + BN * SROW;                  // 2 stages of BM x SROW
  T* sdO = sQ + 2 * BM * SROW;             // 2 stages of BM x SROW
  float* sL = reinterpret_cast<float*>(sdO + 2 * BM * SROW);  // 2 stages of BM: lse * log2(e)
  float* sD = sL + 2 * BM;                                     // 2 stages of BM: delta

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t Tq = a.Tq, Tk = a.Tk, off = Tk - Tq;
  const int64_t n0 = (int64_t)blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = a.H / a.Hkv;
  const int dch = (int)(a.Dh / 8);
  const bool causal = a.causal;
  const float sl2 = a.scale * kLog2e;

  const T* kg = static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh;
  tc_load_tile<T, D, BN, THREADS>(sK, kg, a.k.st, n0, Tk, dch);
  tc_load_tile<T, D, BN, THREADS>(sV, vg, a.v.st, n0, Tk, dch);

  // Query rows that see key n0 or a later one: i + off >= n0.
  const int64_t first = causal ? (n0 - off > 0 ? n0 - off : 0) : 0;
  const int64_t mb_begin = first / BM, mb_end = (Tq + BM - 1) / BM;
  const int64_t nmb = mb_end > mb_begin ? mb_end - mb_begin : 0;
  const int64_t iters = G * nmb;

  // Block `it` (head hk * G + it / nmb, query block mb_begin + it % nmb) into stage st.
  auto load_block = [&](int st, int64_t it) {
    const int64_t h = hk * G + it / nmb, m0 = (mb_begin + it % nmb) * BM;
    const T* qg = static_cast<const T*>(a.q.ptr) + b * a.q.sb + h * a.q.sh;
    const T* dog = static_cast<const T*>(a.dout.ptr) + b * a.dout.sb + h * a.dout.sh;
    tc_load_tile<T, D, BM, THREADS>(sQ + st * BM * SROW, qg, a.q.st, m0, Tq, dch);
    tc_load_tile<T, D, BM, THREADS>(sdO + st * BM * SROW, dog, a.dout.st, m0, Tq, dch);
    for (int i = tid; i < BM; i += THREADS) {
      const int64_t row = m0 + i;
      sL[st * BM + i] = row < Tq ? a.lse[(b * a.H + h) * Tq + row] * kLog2e : -kInf;
      sD[st * BM + i] = row < Tq ? a.delta[(b * a.H + h) * Tq + row] : 0.f;
    }
  };
  if (iters > 0) load_block(0, 0);
  cp_async_commit();

  const int wrow = warp * 16;  // the warp's first key in the block
  const int64_t key_a = n0 + wrow + g, key_b = key_a + 8;
  const int a_lane = (wrow + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;  // K, V as A
  const int b_lane = ((lane & 7) + (lane >> 4) * 8) * SROW + ((lane >> 3) & 1) * 8;        // Q, dO as B
  const int t_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;        // Q, dO as B^T

  float dk[NT_O][4], dv[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;

  for (int64_t it = 0; it < iters; ++it) {
    const int st = (int)(it & 1);
    if (it + 1 < iters) {
      load_block(st ^ 1, it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* qs = sQ + st * BM * SROW;
    const T* dos = sdO + st * BM * SROW;
    const float* ls = sL + st * BM;
    const float* ds_ = sD + st * BM;
    const int64_t m0 = (mb_begin + it % nmb) * BM;

    float s[NT_S][4], dp[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, sK + a_lane + ks * 16);
      ldmatrix_x4(va, sV + a_lane + ks * 16);
#pragma unroll
      for (int jn = 0; jn < NT_S / 2; ++jn) {
        uint32_t qb[4], ob[4];
        ldmatrix_x4(qb, qs + b_lane + jn * 16 * SROW + ks * 16);
        Mma<T>::run(s[2 * jn], ka, qb[0], qb[1]);
        Mma<T>::run(s[2 * jn + 1], ka, qb[2], qb[3]);
        ldmatrix_x4(ob, dos + b_lane + jn * 16 * SROW + ks * 16);
        Mma<T>::run(dp[2 * jn], va, ob[0], ob[1]);
        Mma<T>::run(dp[2 * jn + 1], va, ob[2], ob[3]);
      }
    }
    // P^T and dS^T (rows: keys key_a / key_b; columns: queries).
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        const int64_t row = m0 + col, key = (e & 2) ? key_b : key_a;
        const float lr = ls[col];
        const bool vis = key < Tk && lr != -kInf && !(causal && key > row + off);
        const float p = vis ? exp2f(s[j][e] * sl2 - lr) : 0.f;
        s[j][e] = p;
        dp[j][e] = p * (dp[j][e] - ds_[col]);
      }
    }
    // dV += P^T dO, dK += dS^T Q.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[4], da[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, dos + t_lane + kk * 16 * SROW + dn * 16);
        Mma<T>::run(dv[2 * dn], pa, ob[0], ob[1]);
        Mma<T>::run(dv[2 * dn + 1], pa, ob[2], ob[3]);
        ldmatrix_x4_trans(qb, qs + t_lane + kk * 16 * SROW + dn * 16);
        Mma<T>::run(dk[2 * dn], da, qb[0], qb[1]);
        Mma<T>::run(dk[2 * dn + 1], da, qb[2], qb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // (no block: the K/V group may still be in flight)
  __syncthreads();

  // Stage the warp's 16 rows of dK (in its rows of sK) and dV (sV), then store 16-byte units.
  T* sk = sK + wrow * SROW;
  T* sv = sV + wrow * SROW;
#pragma unroll
  for (int j = 0; j < NT_O; ++j) {
    *reinterpret_cast<uint32_t*>(sk + g * SROW + j * 8 + 2 * t) = pack2<T>(dk[j][0] * a.scale, dk[j][1] * a.scale);
    *reinterpret_cast<uint32_t*>(sk + (g + 8) * SROW + j * 8 + 2 * t) =
        pack2<T>(dk[j][2] * a.scale, dk[j][3] * a.scale);
    *reinterpret_cast<uint32_t*>(sv + g * SROW + j * 8 + 2 * t) = pack2<T>(dv[j][0], dv[j][1]);
    *reinterpret_cast<uint32_t*>(sv + (g + 8) * SROW + j * 8 + 2 * t) = pack2<T>(dv[j][2], dv[j][3]);
  }
  __syncwarp();
  T* dkg = static_cast<T*>(a.dk.ptr) + b * a.dk.sb + hk * a.dk.sh;
  T* dvg = static_cast<T*>(a.dv.ptr) + b * a.dv.sb + hk * a.dv.sh;
  for (int e = lane; e < 16 * NT_O; e += 32) {
    const int r = e / NT_O, c = e % NT_O;
    const int64_t key = n0 + wrow + r;
    if (key < Tk && c < dch) {
      *reinterpret_cast<uint4*>(dkg + key * a.dk.st + c * 8) = *reinterpret_cast<const uint4*>(sk + r * SROW + c * 8);
      *reinterpret_cast<uint4*>(dvg + key * a.dv.st + c * 8) = *reinterpret_cast<const uint4*>(sv + r * SROW + c * 8);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdCfg<D>::NWQ * 32, 1) attn_bwd_dq_tc_kernel(const AttnBwdArgs a) {
  constexpr int NW = BwdCfg<D>::NWQ, BM = 16 * NW, BN = BwdCfg<D>::BNQ;
  constexpr int THREADS = NW * 32, SROW = D + 8, KSTEPS = D / 16, NT_S = BN / 8, NT_O = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM x SROW
  T* sdO = sQ + BM * SROW;                 // BM x SROW
  T* sK = sdO + BM * SROW;                 // 2 stages of BN x SROW
  T* sV = sK + 2 * BN * SROW;              // 2 stages of BN x SROW

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t Tq = a.Tq, Tk = a.Tk, off = Tk - Tq;
  const int64_t m0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / (a.H / a.Hkv);
  const int dch = (int)(a.Dh / 8);
  const bool causal = a.causal;
  const float sl2 = a.scale * kLog2e;

  const T* kg = static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh;
  const int n_tiles = key_tiles(m0, BM, Tq, Tk, causal, BN);

  tc_load_tile<T, D, BM, THREADS>(sQ, static_cast<const T*>(a.q.ptr) + b * a.q.sb + h * a.q.sh, a.q.st, m0, Tq, dch);
  tc_load_tile<T, D, BM, THREADS>(sdO, static_cast<const T*>(a.dout.ptr) + b * a.dout.sb + h * a.dout.sh, a.dout.st,
                                  m0, Tq, dch);
  if (n_tiles > 0) {
    tc_load_tile<T, D, BN, THREADS>(sK, kg, a.k.st, 0, Tk, dch);
    tc_load_tile<T, D, BN, THREADS>(sV, vg, a.v.st, 0, Tk, dch);
  }
  cp_async_commit();

  const int wrow = warp * 16;
  const int64_t row_a = m0 + wrow + g, row_b = row_a + 8;
  const float* lse = a.lse + (b * a.H + h) * Tq;
  const float* delta = a.delta + (b * a.H + h) * Tq;
  const float lr_a = row_a < Tq ? lse[row_a] * kLog2e : -kInf, lr_b = row_b < Tq ? lse[row_b] * kLog2e : -kInf;
  const float dl_a = row_a < Tq ? delta[row_a] : 0.f, dl_b = row_b < Tq ? delta[row_b] : 0.f;
  const int a_lane = (wrow + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;  // Q, dO as A
  const int b_lane = ((lane & 7) + (lane >> 4) * 8) * SROW + ((lane >> 3) & 1) * 8;        // K, V as B
  const int t_lane = ((lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8;        // K as B^T

  float dq[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) {
      const int st = (n + 1) & 1;
      tc_load_tile<T, D, BN, THREADS>(sK + st * BN * SROW, kg, a.k.st, (int64_t)(n + 1) * BN, Tk, dch);
      tc_load_tile<T, D, BN, THREADS>(sV + st * BN * SROW, vg, a.v.st, (int64_t)(n + 1) * BN, Tk, dch);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ks_ = sK + (n & 1) * BN * SROW;
    const T* vs_ = sV + (n & 1) * BN * SROW;

    float s[NT_S][4], dp[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t qa[4], oa[4];
      ldmatrix_x4(qa, sQ + a_lane + ks * 16);
      ldmatrix_x4(oa, sdO + a_lane + ks * 16);
#pragma unroll
      for (int jn = 0; jn < NT_S / 2; ++jn) {
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, ks_ + b_lane + jn * 16 * SROW + ks * 16);
        Mma<T>::run(s[2 * jn], qa, kb[0], kb[1]);
        Mma<T>::run(s[2 * jn + 1], qa, kb[2], kb[3]);
        ldmatrix_x4(vb, vs_ + b_lane + jn * 16 * SROW + ks * 16);
        Mma<T>::run(dp[2 * jn], oa, vb[0], vb[1]);
        Mma<T>::run(dp[2 * jn + 1], oa, vb[2], vb[3]);
      }
    }
    const int64_t key0 = (int64_t)n * BN;
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = key0 + j * 8 + 2 * t + (e & 1);
        const int64_t row = (e & 2) ? row_b : row_a;
        const float lr = (e & 2) ? lr_b : lr_a, dl = (e & 2) ? dl_b : dl_a;
        const bool vis = key < Tk && lr != -kInf && !(causal && key > row + off);
        const float p = vis ? exp2f(s[j][e] * sl2 - lr) : 0.f;
        dp[j][e] = p * (dp[j][e] - dl);
      }
    }
    // dQ += dS K.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t da[4];
      da[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, ks_ + t_lane + kk * 16 * SROW + dn * 16);
        Mma<T>::run(dq[2 * dn], da, kb[0], kb[1]);
        Mma<T>::run(dq[2 * dn + 1], da, kb[2], kb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  T* so = sQ + wrow * SROW;  // the warp's own rows of sQ
#pragma unroll
  for (int j = 0; j < NT_O; ++j) {
    *reinterpret_cast<uint32_t*>(so + g * SROW + j * 8 + 2 * t) = pack2<T>(dq[j][0] * a.scale, dq[j][1] * a.scale);
    *reinterpret_cast<uint32_t*>(so + (g + 8) * SROW + j * 8 + 2 * t) =
        pack2<T>(dq[j][2] * a.scale, dq[j][3] * a.scale);
  }
  __syncwarp();
  T* dqg = static_cast<T*>(a.dq.ptr) + b * a.dq.sb + h * a.dq.sh;
  for (int e = lane; e < 16 * NT_O; e += 32) {
    const int r = e / NT_O, c = e % NT_O;
    const int64_t row = m0 + wrow + r;
    if (row < Tq && c < dch)
      *reinterpret_cast<uint4*>(dqg + row * a.dq.st + c * 8) = *reinterpret_cast<const uint4*>(so + r * SROW + c * 8);
  }
}

// =============================================================================================
// Decoding (flash-decoding). CTA = 128 threads over (row chunk, split) x kv head x batch. A row chunk
// is up to DEC_RC query rows of the kv head's group (rows rr = g * Tq + t: query head hk * G + g,
// query t at position len - Tq + t). Keys stream in tiles of DEC_BN through a cp.async double buffer.
//   scores: thread (key tid / 2, half tid % 2) sums half of the 16-byte units of its key's row against
//           each row's query (fp32 in shared memory), the pair is combined with one shuffle;
//   softmax: warp w updates rows w and w + 4 (lane: keys lane, lane + 32), p and the rescale factor
//           go to shared memory;
//   P V:     thread (pair tid % (Dh / 2), group tid / (Dh / 2)) accumulates two output columns of
//           every row over the keys of its group; the groups are summed at the end of the split.
constexpr int DEC_THREADS = 128;
constexpr int DEC_BN = 64;
constexpr int DEC_RC = 8;
constexpr int DEC_RED = 2048;  // floats: groups * DEC_RC * Dh <= (256 / Dh) * 8 * Dh

// Two K/V stages unless a stage would be too large (float32 with Dh > 128: one stage, 135 KB).
__host__ __device__ __forceinline__ bool decode_two_stages(int64_t Dh, size_t elem) { return Dh * (int64_t)elem <= 512; }
size_t decode_smem_bytes(int64_t Dh, size_t elem) {
  const size_t stages = decode_two_stages(Dh, elem) ? 2 : 1;
  return stages * 2 * DEC_BN * (Dh + 8) * elem +
         sizeof(float) * (DEC_RC * Dh + DEC_RC * DEC_BN + 3 * DEC_RC + DEC_RED);
}

template <typename T> struct Raw16;  // a T as its bits, to move 16-byte units
template <> struct Raw16<float> {
  using type = uint32_t;
  static __device__ __forceinline__ float f(uint32_t v) { return __uint_as_float(v); }
};
template <> struct Raw16<__half> {
  using type = uint16_t;
  static __device__ __forceinline__ float f(uint16_t v) { return __half2float(__ushort_as_half(v)); }
};
template <> struct Raw16<__nv_bfloat16> {
  using type = uint16_t;
  static __device__ __forceinline__ float f(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);  // bf16 -> fp32 is exact
  }
};

template <typename T>
__global__ void __launch_bounds__(DEC_THREADS) attn_decode_kernel(const AttnDecodeArgs a) {
  using Raw = typename Raw16<T>::type;
  constexpr int EPU = 16 / (int)sizeof(T);  // elements per 16-byte unit
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int Dh = (int)a.Dh, SROW = Dh + 8, dch = Dh / EPU;
  const bool two = decode_two_stages(a.Dh, sizeof(T));
  const int stages = two ? 2 : 1;
  T* sK = reinterpret_cast<T*>(smem_raw);  // stages x DEC_BN x SROW
  T* sV = sK + stages * DEC_BN * SROW;
  float* sq = reinterpret_cast<float*>(sV + stages * DEC_BN * SROW);  // [DEC_RC][Dh]
  float* sS = sq + DEC_RC * Dh;                                       // [DEC_RC][DEC_BN]
  float* sAlpha = sS + DEC_RC * DEC_BN;
  float* sM = sAlpha + DEC_RC;
  float* sL = sM + DEC_RC;
  float* sRed = sL + DEC_RC;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t splits = a.splits;
  const int64_t chunk = blockIdx.x / splits, split = blockIdx.x % splits;
  const int64_t hk = blockIdx.y, b = blockIdx.z;
  const int64_t G = a.H / a.Hkv, Tq = a.Tq, R = G * Tq;
  const int64_t rr0 = chunk * DEC_RC;
  const int nr = (int)(R - rr0 < DEC_RC ? R - rr0 : DEC_RC);
  const float sl2 = a.scale * kLog2e;

  int64_t len = a.seqlens[b];  // read on the device: no host synchronisation
  len = len < 0 ? 0 : (len > a.Tmax ? a.Tmax : len);
  // Rows of the chunk: the position of each query (its last visible key).
  int64_t pos[DEC_RC];
  int64_t maxpos = -1;
#pragma unroll
  for (int r = 0; r < DEC_RC; ++r) {
    const int64_t rr = rr0 + (r < nr ? r : 0);
    pos[r] = len - Tq + rr % Tq;
    if (r < nr && pos[r] > maxpos) maxpos = pos[r];
  }
  const int64_t start = split * a.split_len;
  int64_t end = start + a.split_len;
  if (end > len) end = len;
  if (end > maxpos + 1) end = maxpos + 1;
  const int n_tiles = end > start ? (int)((end - start + DEC_BN - 1) / DEC_BN) : 0;

  const T* kg = static_cast<const T*>(a.k.ptr) + b * a.k.sb + hk * a.k.sh;
  const T* vg = static_cast<const T*>(a.v.ptr) + b * a.v.sb + hk * a.v.sh;
  // Keys [key0, key0 + DEC_BN) below `end` (never at or past len), zero-filled elsewhere.
  auto load_tile = [&](int st, int64_t key0) {
    T* sk = sK + st * DEC_BN * SROW;
    T* sv = sV + st * DEC_BN * SROW;
    for (int e = tid; e < DEC_BN * dch; e += DEC_THREADS) {
      const int r = e / dch, c = e - r * dch;
      const int64_t key = key0 + r;
      const bool ok = key < end;
      cp_async16(smem_u32(sk + r * SROW + c * EPU),
                 ok ? (const void*)(kg + key * a.k.st + c * EPU) : (const void*)kg, ok ? 16 : 0);
      cp_async16(smem_u32(sv + r * SROW + c * EPU),
                 ok ? (const void*)(vg + key * a.v.st + c * EPU) : (const void*)vg, ok ? 16 : 0);
    }
  };
  if (n_tiles > 0) load_tile(0, start);
  cp_async_commit();

  for (int e = tid; e < DEC_RC * Dh; e += DEC_THREADS) {
    const int r = e / Dh, d = e - r * Dh;
    float x = 0.f;
    if (r < nr) {
      const int64_t rr = rr0 + r, h = hk * G + rr / Tq, t = rr % Tq;
      x = to_float<T>(static_cast<const T*>(a.q.ptr)[b * a.q.sb + h * a.q.sh + t * a.q.st + d]);
    }
    sq[e] = x;
  }
  // Softmax state of rows warp and warp + 4, kept (identically) by every lane of the warp.
  float m_st[2] = {-kInf, -kInf}, l_st[2] = {0.f, 0.f};

  // P V mapping: two columns (2 pair, 2 pair + 1) of every row, keys grp, grp + ngroups, ...
  const int np = Dh / 2, ngroups = DEC_THREADS / np;
  const int pair = tid % np, grp = tid / np;
  const bool pv_on = grp < ngroups;
  float acc[DEC_RC][2];
#pragma unroll
  for (int r = 0; r < DEC_RC; ++r) acc[r][0] = acc[r][1] = 0.f;

  const int kj = tid >> 1, half = tid & 1;
  for (int n = 0; n < n_tiles; ++n) {
    const int64_t key0 = start + (int64_t)n * DEC_BN;
    if (two) {
      if (n + 1 < n_tiles) {
        load_tile((n + 1) & 1, key0 + DEC_BN);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      if (n > 0) {  // the previous tile's readers passed the closing barrier
        load_tile(0, key0);
        cp_async_commit();
      }
      cp_async_wait<0>();
    }
    __syncthreads();
    const int stage = two ? (n & 1) : 0;
    const T* sk = sK + stage * DEC_BN * SROW;
    const T* sv = sV + stage * DEC_BN * SROW;

    // Scores.
    float s[DEC_RC];
#pragma unroll
    for (int r = 0; r < DEC_RC; ++r) s[r] = 0.f;
    for (int c = half; c < dch; c += 2) {
      union {
        uint4 v;
        Raw e[EPU];
      } u;
      u.v = *reinterpret_cast<const uint4*>(sk + kj * SROW + c * EPU);
      float kf[EPU];
#pragma unroll
      for (int e = 0; e < EPU; ++e) kf[e] = Raw16<T>::f(u.e[e]);
#pragma unroll
      for (int r = 0; r < DEC_RC; ++r)
        if (r < nr) {
          float x = s[r];
#pragma unroll
          for (int e4 = 0; e4 < EPU / 4; ++e4) {
            const float4 q4 = *reinterpret_cast<const float4*>(sq + r * Dh + c * EPU + 4 * e4);
            x = fmaf(q4.x, kf[4 * e4], x);
            x = fmaf(q4.y, kf[4 * e4 + 1], x);
            x = fmaf(q4.z, kf[4 * e4 + 2], x);
            x = fmaf(q4.w, kf[4 * e4 + 3], x);
          }
          s[r] = x;
        }
    }
    const int64_t key = key0 + kj;
#pragma unroll
    for (int r = 0; r < DEC_RC; ++r) {
      const float x = s[r] + __shfl_xor_sync(0xffffffffu, s[r], 1);
      if (half == 0 && r < nr) sS[r * DEC_BN + kj] = (key < end && key <= pos[r]) ? x * sl2 : -kInf;
    }
    __syncthreads();

    // Online softmax, one warp per row.
#pragma unroll
    for (int w2 = 0; w2 < 2; ++w2) {
      const int r = warp + 4 * w2;
      if (r < nr) {
        const float x0 = sS[r * DEC_BN + lane], x1 = sS[r * DEC_BN + lane + 32];
        float mx = fmaxf(x0, x1);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float mn = fmaxf(m_st[w2], mx), ms = mn == -kInf ? 0.f : mn;
        const float alpha = exp2f(m_st[w2] - ms);
        m_st[w2] = mn;
        const float p0 = exp2f(x0 - ms), p1 = exp2f(x1 - ms);
        float ps = p0 + p1;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
        l_st[w2] = l_st[w2] * alpha + ps;
        sS[r * DEC_BN + lane] = p0;
        sS[r * DEC_BN + lane + 32] = p1;
        if (lane == 0) sAlpha[r] = alpha;
      }
    }
    __syncthreads();

    // O += P V.
    if (pv_on) {
#pragma unroll
      for (int r = 0; r < DEC_RC; ++r)
        if (r < nr) {
          const float al = sAlpha[r];
          acc[r][0] *= al;
          acc[r][1] *= al;
        }
      for (int j = grp; j < DEC_BN; j += ngroups) {
        const float v0 = to_float<T>(sv[j * SROW + 2 * pair]), v1 = to_float<T>(sv[j * SROW + 2 * pair + 1]);
#pragma unroll
        for (int r = 0; r < DEC_RC; ++r)
          if (r < nr) {
            const float p = sS[r * DEC_BN + j];
            acc[r][0] = fmaf(p, v0, acc[r][0]);
            acc[r][1] = fmaf(p, v1, acc[r][1]);
          }
      }
    }
    __syncthreads();  // the stage and sS are free for the next tile
  }
  cp_async_wait<0>();

  // Sum the key groups, normalise, write.
  if (lane == 0) {
#pragma unroll
    for (int w2 = 0; w2 < 2; ++w2) {
      sM[warp + 4 * w2] = m_st[w2];
      sL[warp + 4 * w2] = l_st[w2];
    }
  }
  if (pv_on) {
#pragma unroll
    for (int r = 0; r < DEC_RC; ++r) {
      sRed[(grp * DEC_RC + r) * Dh + 2 * pair] = acc[r][0];
      sRed[(grp * DEC_RC + r) * Dh + 2 * pair + 1] = acc[r][1];
    }
  }
  __syncthreads();
  const int64_t NR = a.B * a.H * Tq;
  for (int e = tid; e < nr * Dh; e += DEC_THREADS) {
    const int r = e / Dh, d = e - r * Dh;
    float o = 0.f;
    for (int gg = 0; gg < ngroups; ++gg) o += sRed[(gg * DEC_RC + r) * Dh + d];
    const float l = sL[r];
    o = l > 0.f ? o / l : 0.f;
    const int64_t rr = rr0 + r, h = hk * G + rr / Tq, t = rr % Tq;
    const int64_t row_id = (b * a.H + h) * Tq + t;
    if (splits == 1) {
      static_cast<T*>(a.o.ptr)[b * a.o.sb + h * a.o.sh + t * a.o.st + d] = from_float<T>(o);
    } else {
      a.ws_out[(split * NR + row_id) * a.Dh + d] = o;
      if (d == 0) a.ws_lse[split * NR + row_id] = l > 0.f ? sM[r] * kLn2 + logf(l) : -kInf;
    }
  }
}

// out[row] = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M); a row no split saw gives 0.
template <typename T>
__global__ void __launch_bounds__(128) attn_decode_combine_kernel(const AttnDecodeArgs a) {
  const int64_t row_id = blockIdx.x;  // (b * H + h) * Tq + t
  const int64_t NR = a.B * a.H * a.Tq, S = a.splits;
  const int64_t t = row_id % a.Tq, bh = row_id / a.Tq, h = bh % a.H, b = bh / a.H;
  float M = -kInf;
  for (int64_t s = 0; s < S; ++s) M = fmaxf(M, a.ws_lse[s * NR + row_id]);
  float wsum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float x = a.ws_lse[s * NR + row_id];
    wsum += x == -kInf ? 0.f : __expf(x - M);
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  T* og = static_cast<T*>(a.o.ptr) + b * a.o.sb + h * a.o.sh + t * a.o.st;
  for (int64_t d = threadIdx.x; d < a.Dh; d += blockDim.x) {
    float o = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const float x = a.ws_lse[s * NR + row_id];
      if (x != -kInf) o = fmaf(__expf(x - M), a.ws_out[(s * NR + row_id) * a.Dh + d], o);
    }
    og[d] = from_float<T>(o * inv);
  }
}

// =============================================================================================
// Launch helpers.

cudaError_t set_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <typename T, int D>
cudaError_t launch_fwd_tc(const AttnFwdArgs& a, cudaStream_t stream) {
  constexpr int BM = FwdCfg<D>::BM;
  constexpr size_t bytes = fwd_tc_smem_bytes<D>();
  cudaError_t err = set_smem((const void*)attn_fwd_tc_kernel<T, D>, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)((a.Tq + BM - 1) / BM), (unsigned)a.H, (unsigned)a.B);
  attn_fwd_tc_kernel<T, D><<<grid, FwdCfg<D>::NW * 32, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd_tc_dh(const AttnFwdArgs& a, cudaStream_t stream) {
  // The head dim rounded up to an instantiated size; the columns past Dh are masked.
  if (a.Dh <= 32) return launch_fwd_tc<T, 32>(a, stream);
  if (a.Dh <= 64) return launch_fwd_tc<T, 64>(a, stream);
  if (a.Dh <= 128) return launch_fwd_tc<T, 128>(a, stream);
  return launch_fwd_tc<T, 256>(a, stream);
}

template <typename T, int D>
cudaError_t launch_bwd_tc(const AttnBwdArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (a.Tk > 0) {  // also with Tq = 0: dk = dv = 0
    constexpr size_t bytes = bwd_dkdv_tc_smem_bytes<D>();
    constexpr int BN = 16 * BwdCfg<D>::NW;
    if ((err = set_smem((const void*)attn_bwd_dkdv_tc_kernel<T, D>, bytes)) != cudaSuccess) return err;
    const dim3 grid((unsigned)((a.Tk + BN - 1) / BN), (unsigned)a.Hkv, (unsigned)a.B);
    attn_bwd_dkdv_tc_kernel<T, D><<<grid, BwdCfg<D>::NW * 32, bytes, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.Tq > 0) {  // also with Tk = 0: dq = 0
    constexpr size_t bytes = bwd_dq_tc_smem_bytes<D>();
    constexpr int BM = 16 * BwdCfg<D>::NWQ;
    if ((err = set_smem((const void*)attn_bwd_dq_tc_kernel<T, D>, bytes)) != cudaSuccess) return err;
    const dim3 grid((unsigned)((a.Tq + BM - 1) / BM), (unsigned)a.H, (unsigned)a.B);
    attn_bwd_dq_tc_kernel<T, D><<<grid, BwdCfg<D>::NWQ * 32, bytes, stream>>>(a);
    err = cudaGetLastError();
  }
  return err;
}

template <typename T>
cudaError_t launch_bwd_simt(const AttnBwdArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  if (a.Tk > 0) {  // also with Tq = 0: dk = dv = 0
    const size_t bytes = bwd_dkdv_smem_bytes(a.Dh);
    if ((err = set_smem((const void*)attn_bwd_dkdv_kernel<T>, bytes)) != cudaSuccess) return err;
    const dim3 grid((unsigned)((a.Tk + SB - 1) / SB), (unsigned)a.Hkv, (unsigned)a.B);
    attn_bwd_dkdv_kernel<T><<<grid, S_THREADS, bytes, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.Tq > 0) {  // also with Tk = 0: dq = 0
    const size_t bytes = bwd_dq_smem_bytes(a.Dh);
    if ((err = set_smem((const void*)attn_bwd_dq_kernel<T>, bytes)) != cudaSuccess) return err;
    const dim3 grid((unsigned)((a.Tq + SB - 1) / SB), (unsigned)a.H, (unsigned)a.B);
    attn_bwd_dq_kernel<T><<<grid, S_THREADS, bytes, stream>>>(a);
    err = cudaGetLastError();
  }
  return err;
}

template <typename T>
cudaError_t launch_bwd_t(const AttnBwdArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const int64_t rows = a.B * a.H * a.Tq;
  if (rows > 0) {
    attn_bwd_delta_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  // Tensor cores for 16-bit inputs with Dh <= 128 (the head dim padded up to 32, 64 or 128), unless
  // the launcher asks for the SIMT kernels (VQKERNELS_ATTN_BWD_SIMT=1, to bisect on a GPU).
  if constexpr (sizeof(T) == 2) {
    if (a.Dh <= 128 && !a.force_simt) {
      if (a.Dh <= 32) return launch_bwd_tc<T, 32>(a, stream);
      if (a.Dh <= 64) return launch_bwd_tc<T, 64>(a, stream);
      return launch_bwd_tc<T, 128>(a, stream);
    }
  }
  return launch_bwd_simt<T>(a, stream);
}

template <typename T>
cudaError_t launch_decode_t(const AttnDecodeArgs& a, cudaStream_t stream) {
  const size_t bytes = decode_smem_bytes(a.Dh, sizeof(T));
  cudaError_t err = set_smem((const void*)attn_decode_kernel<T>, bytes);
  if (err != cudaSuccess) return err;
  const int64_t chunks = (a.H / a.Hkv * a.Tq + DEC_RC - 1) / DEC_RC;
  const dim3 grid((unsigned)(chunks * a.splits), (unsigned)a.Hkv, (unsigned)a.B);
  attn_decode_kernel<T><<<grid, DEC_THREADS, bytes, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess || a.splits == 1) return err;
  attn_decode_combine_kernel<T><<<(unsigned)(a.B * a.H * a.Tq), 128, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

// Sizes: B, H, Hkv <= 65535 (grid y/z), Tq >= 1 and B >= 1 (the launcher returns early otherwise),
// 8 <= Dh <= 256 with Dh % 8 == 0, 16-byte aligned rows (pointers and B/H/T strides).
cudaError_t launch_attention_fwd(const AttnFwdArgs& a, cudaStream_t stream) {
  if (a.B <= 0 || a.H <= 0 || a.Tq <= 0) return cudaSuccess;
  switch (a.dtype) {
    case 0: {
      const size_t bytes = simt_fwd_smem_bytes(a.Dh);
      cudaError_t err = set_smem((const void*)attn_fwd_simt_kernel<float>, bytes);
      if (err != cudaSuccess) return err;
      const dim3 grid((unsigned)((a.Tq + SB - 1) / SB), (unsigned)a.H, (unsigned)a.B);
      attn_fwd_simt_kernel<float><<<grid, S_THREADS, bytes, stream>>>(a);
      return cudaGetLastError();
    }
    case 1: return launch_fwd_tc_dh<__half>(a, stream);
    case 2: return launch_fwd_tc_dh<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_attention_bwd(const AttnBwdArgs& a, cudaStream_t stream) {
  if (a.B <= 0 || a.H <= 0) return cudaSuccess;
  switch (a.dtype) {
    case 0: return launch_bwd_t<float>(a, stream);
    case 1: return launch_bwd_t<__half>(a, stream);
    case 2: return launch_bwd_t<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t attention_decode_splits(int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tmax, int num_sms,
                                int64_t* split_len) {
  const int64_t tiles = Tmax > 0 ? (Tmax + DEC_BN - 1) / DEC_BN : 1;
  const int64_t chunks = (H / Hkv * Tq + DEC_RC - 1) / DEC_RC;
  const int64_t base = B * Hkv * chunks;  // CTAs without a split
  const int64_t target = 2 * (int64_t)(num_sms > 0 ? num_sms : 132);  // ~2 waves of CTAs fill the device
  int64_t splits = base >= target ? 1 : (target + base - 1) / base;
  if (splits > 128) splits = 128;
  if (splits > tiles) splits = tiles;
  const int64_t tiles_per = (tiles + splits - 1) / splits;
  *split_len = tiles_per * DEC_BN;
  return (tiles + tiles_per - 1) / tiles_per;  // no split past Tmax
}

cudaError_t launch_attention_decode(const AttnDecodeArgs& a, cudaStream_t stream) {
  if (a.B <= 0 || a.H <= 0 || a.Tq <= 0) return cudaSuccess;
  switch (a.dtype) {
    case 0: return launch_decode_t<float>(a, stream);
    case 1: return launch_decode_t<__half>(a, stream);
    case 2: return launch_decode_t<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace vqkernels
