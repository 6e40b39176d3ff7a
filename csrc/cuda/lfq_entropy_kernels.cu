// lfq_entropy on CUDA (spec: vqkernels/ops/lfq_entropy/reference.py; the math in its __init__.py). Light includes
// only (no torch headers); launched from csrc/cuda/lfq_entropy.cpp. x (N, C, d) float32, float16 or bfloat16 (read
// as it is, arithmetic in float32), bit logits L = scale * x; the top h = ceil(d/2) bits index a (table A), the low
// l = d - h bits index b (table B), k = a 2^l + b; pbar[c, k] = 1/N sum_n A[n, a] B[n, b].
//
// Forward:
//   * lfq_pbar_kernel: pbar = 1/N A^T B, one GEMM whose reduction runs over the rows, its operands built on the fly.
//     Grid (64 x 64 tiles of pbar, C, row splits); 64 threads, each an 8 x 8 register tile (exact fp32 FMAs). Rows
//     stream in chunks of 32: the chunk's 2 d sigmoids per row go to shared memory, then each thread builds 32
//     entries of one row of the A and of the B tile (the tile's fixed high bits as one prefix product, the 5 varying
//     bits by doubling: ~2 multiplies an entry, against the 64 multiply-adds each entry feeds). Entries past 2^h or
//     2^l and rows past N are exactly 0. Small problems (few tiles) split the rows so the GPU fills up: each split
//     writes its partial A^T B to a workspace, summed in split order by the next kernel (deterministic).
//   * lfq_pbar_finish_kernel: pbar = 1/N (sum of the splits), and per block the sum of -p log max(p, eps) (double).
//   * lfq_per_sample_kernel: per block the sum of h(sigmoid(L)) = softplus(-|L|) + |L| sigmoid(-|L|) (double).
//   * lfq_fwd_scalars_kernel: one block sums the partials in a fixed order: per_sample, codebook.
// Backward (grad_ps, grad_cb read from device memory: no host sync):
//   * lfq_grad_weight_kernel: G = grad_cb / (C N) d codebook / d pbar, written as G (C, 2^h, 2^l) and transposed,
//     GT (C, 2^l, 2^h), through a shared-memory tile, so both GEMMs below read their right operand row-major.
//   * lfq_bwd_kernel: grid (64-row blocks, C, Z). A block keeps its rows' sigmoids in shared memory and walks its
//     share (every Z-th) of the output tiles of the two GEMMs gA = B G^T (64 columns of a at a time, reduced over
//     b) and gB = A G (columns of b, reduced over a), each a 64 x 64 tile in 8 x 8 register tiles with the left
//     operand (the other table, transposed) built on the fly. Its epilogue weighs the tile by the table itself
//     (W = gA * A) and reduces each row's W over the tile to the bit sums sum_a W[a] bit_j(a) (the tile's 3 lowest
//     bits within a thread, 3 more across the 8 threads of a row by shuffles, the tile's fixed bits from the tile
//     index) and sum_a W[a]: d + 2 numbers per row, accumulated in shared memory and written per (z, row).
//     Z > 1 where there are few row blocks (the GPU would idle otherwise). Skipped when grad_cb == 0.
//   * lfq_bwd_finish_kernel: grad_x = scale (grad_ps/(N C) (-L q (1 - q)) + S_j - q_j tot), the partials summed in
//     z order; every element written, in x's dtype.
// Memory: pbar (C 2^d) forward (+ splits x C 2^d partials when split, at most ~16 K floats a block of the grid);
// G and GT (2 C 2^d) and Z N C (d + 2) partials backward. Nothing is N x 2^d. Deterministic: fixed grids, sums in
// fixed orders, no atomics.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "ptx.cuh"

namespace vqkernels {
namespace cuda {

namespace {
constexpr int kThreads = 64;   // both GEMM kernels: 8 x 8 threads, each an 8 x 8 register tile of a 64 x 64 tile
constexpr int kTile = 64;      // output tile width (a or b columns), and the backward's rows per block
constexpr int kChunk = 32;     // reduction chunk: rows (forward), table entries (backward)
constexpr int kLd = kTile + 4; // shared-memory row stride of the operand tiles (float4-aligned, fewer conflicts)
constexpr int kMaxBits = 30;
constexpr int kReduceThreads = 256;
constexpr int kMaxPartials = 1024;  // blocks of the elementwise reductions (their partial sums)
constexpr float kTiny = 1.17549435e-38f;  // FLT_MIN

// e^x to ~2 ulp even under --use_fast_math (whose __expf loses |x| log2(e) 2^-24 relatively in the argument's
// rounding): 2^t with t = x log2(e) rounded, times 1 + (the rounding error, recovered by an fma) ln 2.
// NaN stays NaN, +-inf gives inf / 0.
__device__ __forceinline__ float exp_acc(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLog2eLo = 1.92596299112661746e-8f, kLn2 = 0.693147180559945309f;
  const float t = x * kLog2e;
  const float xc = fminf(fmaxf(x, -104.f), 104.f);  // keeps the correction finite where t is +-inf
  const float r = fmaf(xc, kLog2e, -xc * kLog2e) + xc * kLog2eLo;
  return exp2f(t) * fmaf(r, kLn2, 1.f);
}

// (sigmoid(-L), sigmoid(L)), each relatively accurate (no 1 - p where p rounds to 1).
__device__ __forceinline__ float2 sigmoid_pair(float L) {
  return make_float2(1.f / (1.f + exp_acc(L)), 1.f / (1.f + exp_acc(-L)));
}

// W consecutive entries k0 .. k0 + W - 1 (k0 a multiple of W, W = 2^w) of one row's half table: the product over the
// half's nb bits of sigmoid(+-L), + where the bit is set (bit i of k <-> logit index first + nb - 1 - i, i.e. bit 0
// of the code is the last dimension). sg: the row's (sigmoid(-L), sigmoid(L)) pairs. Entries k >= 2^nb are 0 (the
// padding of tables narrower than a tile): bits i >= nb take the factors (1, 0).
template <int W>
__device__ __forceinline__ void half_table(const float2* sg, int first, int nb, int64_t k0, float (&v)[W]) {
  constexpr int w = W == 8 ? 3 : W == 16 ? 4 : 5;
  static_assert((1 << w) == W, "W must be 8, 16 or 32");
  float pre = (k0 >> nb) != 0 ? 0.f : 1.f;
  for (int i = w; i < nb; ++i) {
    const float2 f = sg[first + nb - 1 - i];
    pre *= ((k0 >> i) & 1) ? f.y : f.x;
  }
  v[0] = pre;
#pragma unroll
  for (int s = 0; s < w; ++s) {  // level s doubles 2^s entries by bit i = w - 1 - s
    const int i = w - 1 - s;
    const float2 f = i < nb ? sg[first + nb - 1 - i] : make_float2(1.f, 0.f);
#pragma unroll
    for (int u = W / 2 - 1; u >= 0; --u) {
      if (u < (1 << s)) {
        const float t = v[u];
        v[2 * u + 1] = t * f.y;
        v[2 * u] = t * f.x;
      }
    }
  }
}

// acc[i][j] += sum_k Ls[k][ty 8 + i] Rs[k][tx 8 + j] over one chunk.
__device__ __forceinline__ void mma_chunk(float (&acc)[8][8], const float* Ls, const float* Rs, int ty, int tx) {
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    const float4 l0 = *reinterpret_cast<const float4*>(Ls + k * kLd + ty * 8);
    const float4 l1 = *reinterpret_cast<const float4*>(Ls + k * kLd + ty * 8 + 4);
    const float4 r0 = *reinterpret_cast<const float4*>(Rs + k * kLd + tx * 8);
    const float4 r1 = *reinterpret_cast<const float4*>(Rs + k * kLd + tx * 8 + 4);
    const float l[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
    const float r[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(l[i], r[j], acc[i][j]);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) lfq_pbar_kernel(const T* __restrict__ x, float* __restrict__ out,
                                                           int64_t N, int64_t C, int d, int h, float scale,
                                                           int64_t rows_per_split, int64_t tiles_b, float out_mul,
                                                           int64_t split_stride) {
  __shared__ __align__(16) float As[kChunk * kLd];
  __shared__ __align__(16) float Bs[kChunk * kLd];
  __shared__ float2 sg[kChunk * kMaxBits];
  const int tid = threadIdx.x, ty = tid >> 3, tx = tid & 7;
  const int l = d - h;
  const int64_t KA = int64_t(1) << h, KB = int64_t(1) << l, K = KA * KB;
  const int64_t ta = (int64_t)blockIdx.x / tiles_b, tb = (int64_t)blockIdx.x % tiles_b;
  const int64_t c = blockIdx.y, split = blockIdx.z;
  const int64_t n_begin = split * rows_per_split;
  const int64_t n_end = n_begin + rows_per_split < N ? n_begin + rows_per_split : N;
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  // The build: thread tid fills row tid / 2 of the chunk, columns (tid % 2) * 32 .. + 32 of both tiles.
  const int br = tid >> 1, bc = (tid & 1) * 32;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    for (int e = tid; e < kChunk * d; e += kThreads) {
      const int r = e / d, j = e - r * d;
      const int64_t n = n0 + r;
      sg[r * kMaxBits + j] = n < n_end ? sigmoid_pair(scale * to_float(x[(n * C + c) * d + j])) : make_float2(0.f, 0.f);
    }
    __syncthreads();
    {
      float v[32];
      half_table<32>(sg + br * kMaxBits, 0, h, ta * kTile + bc, v);
#pragma unroll
      for (int m = 0; m < 32; m += 4)
        *reinterpret_cast<float4*>(As + br * kLd + bc + m) = make_float4(v[m], v[m + 1], v[m + 2], v[m + 3]);
      half_table<32>(sg + br * kMaxBits, h, l, tb * kTile + bc, v);
#pragma unroll
      for (int m = 0; m < 32; m += 4)
        *reinterpret_cast<float4*>(Bs + br * kLd + bc + m) = make_float4(v[m], v[m + 1], v[m + 2], v[m + 3]);
    }
    __syncthreads();
    mma_chunk(acc, As, Bs, ty, tx);
    // (the next chunk's sigmoids overwrite sg only: the tiles are rewritten after its __syncthreads, which every
    // thread reaches after this GEMM)
  }
  float* o = out + split * split_stride + c * K;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t a = ta * kTile + ty * 8 + i;
    if (a >= KA) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t b = tb * kTile + tx * 8 + j;
      if (b < KB) o[a * KB + b] = acc[i][j] * out_mul;
    }
  }
}

__device__ __forceinline__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// pbar[k] = inv_n * sum over the splits of ws (when split; else pbar holds it already), and this block's share of
// sum -p log max(p, clamp) (grid-stride over C 2^d elements: the grid is fixed by the size, so the sums are too).
__global__ void __launch_bounds__(kReduceThreads) lfq_pbar_finish_kernel(float* __restrict__ pbar,
                                                                        const float* __restrict__ ws, int64_t total,
                                                                        int64_t splits, float inv_n, float clamp,
                                                                        double* __restrict__ part) {
  __shared__ double red[kReduceThreads];
  double e = 0.0;
  for (int64_t k = (int64_t)blockIdx.x * kReduceThreads + threadIdx.x; k < total;
       k += (int64_t)gridDim.x * kReduceThreads) {
    float p;
    if (splits > 1) {
      float s = 0.f;
      for (int64_t z = 0; z < splits; ++z) s += ws[z * total + k];
      p = s * inv_n;
      pbar[k] = p;
    } else {
      p = pbar[k];
    }
    e -= (double)(p * __logf(fmaxf(p, clamp)));
  }
  e = block_sum(e, red);
  if (threadIdx.x == 0) part[blockIdx.x] = e;
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) lfq_per_sample_kernel(const T* __restrict__ x, int64_t total,
                                                                       float scale, double* __restrict__ part) {
  __shared__ double red[kReduceThreads];
  double e = 0.0;
  for (int64_t k = (int64_t)blockIdx.x * kReduceThreads + threadIdx.x; k < total;
       k += (int64_t)gridDim.x * kReduceThreads) {
    const float a = fabsf(scale * to_float(x[k]));
    const float t = exp_acc(-a);
    e += (double)(log1pf(t) + a * t / (1.f + t));
  }
  e = block_sum(e, red);
  if (threadIdx.x == 0) part[blockIdx.x] = e;
}

__global__ void __launch_bounds__(kReduceThreads) lfq_fwd_scalars_kernel(const double* __restrict__ part_ps,
                                                                        int n_ps, const double* __restrict__ part_cb,
                                                                        int n_cb, double div_ps, double div_cb,
                                                                        float* __restrict__ ps,
                                                                        float* __restrict__ cb) {
  __shared__ double red[kReduceThreads];
  double s = 0.0;
  for (int i = threadIdx.x; i < n_ps; i += kReduceThreads) s += part_ps[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) ps[0] = (float)(s / div_ps);
  __syncthreads();
  s = 0.0;
  for (int i = threadIdx.x; i < n_cb; i += kReduceThreads) s += part_cb[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) cb[0] = (float)(s / div_cb);
}

// ---- backward ---------------------------------------------------------------------------------------

// G[c, a, b] = w g(pbar), GT[c, b, a] = the same, w = grad_cb / (C N); g = -(log p + 1) where p >= eps, else -log eps
// (eps > 0: the clamp passes no gradient). 32 x 32 tiles through shared memory: both writes coalesced.
__global__ void __launch_bounds__(256) lfq_grad_weight_kernel(const float* __restrict__ pbar,
                                                              const float* __restrict__ grad_cb,
                                                              float* __restrict__ G, float* __restrict__ GT,
                                                              int64_t KA, int64_t KB, double inv_cn, float eps,
                                                              float neg_log_eps) {
  __shared__ float tile[32][33];
  const int64_t c = blockIdx.z, a0 = (int64_t)blockIdx.y * 32, b0 = (int64_t)blockIdx.x * 32;
  const int64_t K = KA * KB;
  const float w = (float)((double)grad_cb[0] * inv_cn);
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  for (int r = ty; r < 32; r += 8) {
    const int64_t a = a0 + r, b = b0 + tx;
    if (a < KA && b < KB) {
      const float p = pbar[c * K + a * KB + b];
      const float g = (eps > 0.f && !(p >= eps)) ? neg_log_eps : -(__logf(fmaxf(p, kTiny)) + 1.f);
      const float v = w * g;
      G[c * K + a * KB + b] = v;
      tile[r][tx] = v;
    }
  }
  __syncthreads();
  for (int r = ty; r < 32; r += 8) {
    const int64_t b = b0 + r, a = a0 + tx;
    if (a < KA && b < KB) GT[c * K + b * KA + a] = tile[tx][r];
  }
}

// One output tile of one of the two backward GEMMs for the block's 64 rows, and its epilogue.
// out half: (first_o, nb_o) bits, tile t of its 2^nb_o columns; in half: (first_i, nb_i), reduced over.
// R: (2^nb_i, 2^nb_o) row-major (GT for gA, G for gB). Adds the bit sums and the total of W = acc * T_out to
// dacc[row][first_o + ...] and dacc[row][tot_slot].
__device__ __forceinline__ void bwd_tile(const float2* sg, float* Ls, float* Rs, float* dacc, int d, int first_o,
                                         int nb_o, int first_i, int nb_i, int64_t t, const float* __restrict__ R,
                                         int tot_slot) {
  const int tid = threadIdx.x, ty = tid >> 3, tx = tid & 7;
  const int64_t Ko = int64_t(1) << nb_o, Ki = int64_t(1) << nb_i;
  const int ldd = d + 2;
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  const int64_t col0 = t * kTile;
  for (int64_t k0 = 0; k0 < Ki; k0 += kChunk) {
    // Left operand: Ls[k][n] = T_in[n][k0 + k], row n = tid (stores across lanes: consecutive, no conflicts).
    {
      float v[32];
      half_table<32>(sg + tid * kMaxBits, first_i, nb_i, k0, v);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) Ls[k * kLd + tid] = v[k];
    }
    // Right operand: Rs[k][col] = R[k0 + k][col0 + col], zero outside.
    if (Ko >= kTile) {  // full, 16-byte aligned rows (Ko a multiple of 64)
      for (int e = tid; e < kChunk * (kTile / 4); e += kThreads) {
        const int k = e >> 4, c4 = (e & 15) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (k0 + k < Ki) v = *reinterpret_cast<const float4*>(R + (k0 + k) * Ko + col0 + c4);
        *reinterpret_cast<float4*>(Rs + k * kLd + c4) = v;
      }
    } else {
      for (int e = tid; e < kChunk * kTile; e += kThreads) {
        const int k = e >> 6, cc = e & 63;
        Rs[k * kLd + cc] = (k0 + k < Ki && cc < Ko) ? R[(k0 + k) * Ko + cc] : 0.f;
      }
    }
    __syncthreads();
    mma_chunk(acc, Ls, Rs, ty, tx);
    __syncthreads();
  }
  // Epilogue: W = acc * T_out; per row: sum W, and the bit sums over the tile's columns (unrolled: acc stays in
  // registers).
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int n = ty * 8 + i;
    float v[8];
    half_table<8>(sg + n * kMaxBits, first_o, nb_o, col0 + tx * 8, v);
    float wv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) wv[j] = acc[i][j] * v[j];
    // q[0]: total; q[1 + b] (b < 3): columns with bit b of j set; q[4 + b]: bit b of tx (bits 3..5 of the column).
    float q[7];
    q[0] = ((wv[0] + wv[1]) + (wv[2] + wv[3])) + ((wv[4] + wv[5]) + (wv[6] + wv[7]));
    q[1] = (wv[1] + wv[3]) + (wv[5] + wv[7]);
    q[2] = (wv[2] + wv[3]) + (wv[6] + wv[7]);
    q[3] = (wv[4] + wv[5]) + (wv[6] + wv[7]);
    q[4] = (tx & 1) ? q[0] : 0.f;
    q[5] = (tx & 2) ? q[0] : 0.f;
    q[6] = (tx & 4) ? q[0] : 0.f;
#pragma unroll
    for (int s = 0; s < 7; ++s) {
#pragma unroll
      for (int off = 1; off < 8; off <<= 1) q[s] += __shfl_xor_sync(0xffffffffu, q[s], off);
    }
    // every lane of the row's 8 now holds the row's 7 sums; lane tx adds sum tx (tx < 7), lane 7 the fixed bits
    float* drow = dacc + n * ldd;
    float mine = q[0];
#pragma unroll
    for (int s = 1; s < 7; ++s)
      if (tx == s) mine = q[s];
    if (tx == 0) {
      drow[tot_slot] += mine;
    } else if (tx < 7) {
      const int bit = tx - 1;  // bit of the column index within the tile
      if (bit < nb_o) drow[first_o + nb_o - 1 - bit] += mine;
    } else {
      for (int bit = 6; bit < nb_o; ++bit)
        if ((t >> (bit - 6)) & 1) drow[first_o + nb_o - 1 - bit] += q[0];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lfq_bwd_kernel(const T* __restrict__ x, const float* __restrict__ G,
                                                          const float* __restrict__ GT,
                                                          const float* __restrict__ grad_cb,
                                                          float* __restrict__ part, int64_t N, int64_t C, int d,
                                                          int h, float scale) {
  if (grad_cb[0] == 0.f) return;  // the finishing kernel then reads no partial
  __shared__ __align__(16) float Ls[kChunk * kLd];
  __shared__ __align__(16) float Rs[kChunk * kLd];
  __shared__ float2 sg[kTile * kMaxBits];
  __shared__ float dacc[kTile * (kMaxBits + 2)];
  const int tid = threadIdx.x;
  const int l = d - h, ldd = d + 2;
  const int64_t KA = int64_t(1) << h, KB = int64_t(1) << l, K = KA * KB;
  const int64_t n0 = (int64_t)blockIdx.x * kTile, c = blockIdx.y, z = blockIdx.z, Z = gridDim.z;
  for (int e = tid; e < kTile * d; e += kThreads) {
    const int r = e / d, j = e - r * d;
    const int64_t n = n0 + r;
    sg[r * kMaxBits + j] = n < N ? sigmoid_pair(scale * to_float(x[(n * C + c) * d + j])) : make_float2(0.f, 0.f);
  }
  for (int e = tid; e < kTile * ldd; e += kThreads) dacc[e] = 0.f;
  __syncthreads();
  const int64_t tiles_a = (KA + kTile - 1) / kTile, tiles_b = (KB + kTile - 1) / kTile;
  for (int64_t wk = z; wk < tiles_a + tiles_b; wk += Z) {
    if (wk < tiles_a)  // gA = B G^T, columns of a (the top bits), reduced over b
      bwd_tile(sg, Ls, Rs, dacc, d, 0, h, h, l, wk, GT + c * K, d);
    else               // gB = A G, columns of b (the low bits), reduced over a
      bwd_tile(sg, Ls, Rs, dacc, d, h, l, 0, h, wk - tiles_a, G + c * K, d + 1);
  }
  __syncthreads();
  for (int e = tid; e < kTile * ldd; e += kThreads) {
    const int r = e / ldd, j = e - r * ldd;
    const int64_t n = n0 + r;
    if (n < N) part[((z * N + n) * C + c) * ldd + j] = dacc[e];
  }
}

template <typename T>
__global__ void __launch_bounds__(256) lfq_bwd_finish_kernel(const T* __restrict__ x, const float* __restrict__ part,
                                                            const float* __restrict__ grad_ps,
                                                            const float* __restrict__ grad_cb, T* __restrict__ out,
                                                            int64_t N, int64_t C, int d, int h, int64_t Z,
                                                            float scale, double inv_nc) {
  const int64_t total = N * C * d;
  const float gps = (float)((double)grad_ps[0] * inv_nc);
  const bool cbk = grad_cb[0] != 0.f;
  const int ldd = d + 2;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = e / d;  // n C + c
    const int j = (int)(e - row * d);
    const float L = scale * to_float(x[e]);
    const float2 s = sigmoid_pair(L);
    float g = gps * (-L * s.y * s.x);
    if (cbk) {
      float S = 0.f, tot = 0.f;
      for (int64_t z = 0; z < Z; ++z) {
        const float* p = part + (z * N * C + row) * ldd;
        S += p[j];
        tot += p[j < h ? d : d + 1];
      }
      g += S - s.y * tot;
    }
    out[e] = from_float<T>(scale * g);
  }
}

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                 cudaSuccess || sms <= 0) {
    cudaGetLastError();  // (clear it: the launch that follows reports its own)
    return 132;
  }
  return sms;
}

// Blocks of 64 threads to aim for: ~8 resident per SM (registers and shared memory), two waves.
int64_t target_blocks() { return (int64_t)sm_count() * 16; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t reduce_blocks(int64_t total) {
  const int64_t b = cdiv(total, int64_t(kReduceThreads) * 8);
  return b < 1 ? 1 : (b > kMaxPartials ? kMaxPartials : b);
}

template <typename T>
cudaError_t fwd_impl(const T* x, int64_t N, int64_t C, int d, float scale, float eps, float* pbar, float* ws,
                     int64_t splits, int64_t rows_per_split, double* part, float* ps, float* cb,
                     cudaStream_t stream) {
  const int h = (d + 1) / 2, l = d - h;
  const int64_t KA = int64_t(1) << h, KB = int64_t(1) << l, K = KA * KB;
  const int64_t tiles_a = cdiv(KA, kTile), tiles_b = cdiv(KB, kTile);
  const bool split = splits > 1;
  lfq_pbar_kernel<T><<<dim3((unsigned)(tiles_a * tiles_b), (unsigned)C, (unsigned)splits), kThreads, 0, stream>>>(
      x, split ? ws : pbar, N, C, d, h, scale, rows_per_split, tiles_b, split ? 1.f : (float)(1.0 / (double)N),
      C * K);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t n_cb = reduce_blocks(C * K), n_ps = reduce_blocks(N * C * d);
  const float clamp = eps > kTiny ? eps : kTiny;
  lfq_pbar_finish_kernel<<<(unsigned)n_cb, kReduceThreads, 0, stream>>>(pbar, ws, C * K, splits,
                                                                         (float)(1.0 / (double)N), clamp, part);
  lfq_per_sample_kernel<T><<<(unsigned)n_ps, kReduceThreads, 0, stream>>>(x, N * C * d, scale, part + kMaxPartials);
  lfq_fwd_scalars_kernel<<<1, kReduceThreads, 0, stream>>>(part + kMaxPartials, (int)n_ps, part, (int)n_cb,
                                                           (double)N * (double)C, (double)C, ps, cb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_impl(const T* x, const float* pbar, const float* grad_ps, const float* grad_cb, float* G, float* GT,
                     float* part, int64_t Z, T* out, int64_t N, int64_t C, int d, float scale, float eps,
                     cudaStream_t stream) {
  const int h = (d + 1) / 2, l = d - h;
  const int64_t KA = int64_t(1) << h, KB = int64_t(1) << l;
  const float neg_log_eps = eps > 0.f ? (float)(-log((double)eps)) : 0.f;
  lfq_grad_weight_kernel<<<dim3((unsigned)cdiv(KB, 32), (unsigned)cdiv(KA, 32), (unsigned)C), 256, 0, stream>>>(
      pbar, grad_cb, G, GT, KA, KB, 1.0 / ((double)C * (double)N), eps, neg_log_eps);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  lfq_bwd_kernel<T><<<dim3((unsigned)cdiv(N, kTile), (unsigned)C, (unsigned)Z), kThreads, 0, stream>>>(
      x, G, GT, grad_cb, part, N, C, d, h, scale);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const int64_t most = int64_t(sm_count()) * 32, blocks = cdiv(N * C * d, 256) < most ? cdiv(N * C * d, 256) : most;
  lfq_bwd_finish_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(x, part, grad_ps, grad_cb, out, N, C, d, h, Z,
                                                                  scale, 1.0 / ((double)N * (double)C));
  return cudaGetLastError();
}
}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16 (vq_launch.h's dtype_id).

void lfq_entropy_fwd_plan(int64_t N, int64_t C, int d, int64_t* splits, int64_t* rows_per_split,
                          int64_t* ws_floats, int64_t* part_doubles) {
  const int h = (d + 1) / 2, l = d - h;
  const int64_t K = int64_t(1) << d;
  const int64_t tiles = cdiv(int64_t(1) << h, kTile) * cdiv(int64_t(1) << l, kTile);
  constexpr int64_t kMinRows = 256;  // rows a split at least: its partial (K floats) then costs < 1/256 of its GEMM
  int64_t s = cdiv(target_blocks(), tiles * C);
  const int64_t most = cdiv(N, kMinRows);
  if (s > most) s = most;
  if (s > 65535) s = 65535;
  if (s < 1) s = 1;
  const int64_t rows = cdiv(cdiv(N, s), kChunk) * kChunk;
  *rows_per_split = rows < 1 ? kChunk : rows;
  *splits = N > 0 ? cdiv(N, *rows_per_split) : 1;
  *ws_floats = *splits > 1 ? *splits * C * K : 0;
  *part_doubles = 2 * kMaxPartials;
}

int64_t lfq_entropy_bwd_plan(int64_t N, int64_t C, int d, int64_t* part_floats) {
  const int h = (d + 1) / 2, l = d - h;
  const int64_t out_tiles = cdiv(int64_t(1) << h, kTile) + cdiv(int64_t(1) << l, kTile);
  int64_t Z = cdiv(target_blocks(), cdiv(N, kTile) * C);
  if (Z > out_tiles) Z = out_tiles;
  if (Z > 65535) Z = 65535;
  if (Z < 1) Z = 1;
  *part_floats = Z * N * C * (d + 2);
  return Z;
}

cudaError_t launch_lfq_entropy_fwd(const void* x, int dtype, int64_t N, int64_t C, int d, double scale, double eps,
                                   float* pbar, float* ws, int64_t splits, int64_t rows_per_split, double* part,
                                   float* ps, float* cb, cudaStream_t stream) {
  const float s = (float)scale, ep = (float)eps;
  switch (dtype) {
    case 0: return fwd_impl(static_cast<const float*>(x), N, C, d, s, ep, pbar, ws, splits, rows_per_split, part, ps, cb, stream);
    case 1: return fwd_impl(static_cast<const __half*>(x), N, C, d, s, ep, pbar, ws, splits, rows_per_split, part, ps, cb, stream);
    default: return fwd_impl(static_cast<const __nv_bfloat16*>(x), N, C, d, s, ep, pbar, ws, splits, rows_per_split, part, ps, cb, stream);
  }
}

cudaError_t launch_lfq_entropy_bwd(const void* x, int dtype, const float* pbar, const float* grad_ps,
                                   const float* grad_cb, float* G, float* GT, float* part, int64_t Z, void* out,
                                   int64_t N, int64_t C, int d, double scale, double eps, cudaStream_t stream) {
  const float s = (float)scale, ep = (float)eps;
  switch (dtype) {
    case 0: return bwd_impl(static_cast<const float*>(x), pbar, grad_ps, grad_cb, G, GT, part, Z, static_cast<float*>(out), N, C, d, s, ep, stream);
    case 1: return bwd_impl(static_cast<const __half*>(x), pbar, grad_ps, grad_cb, G, GT, part, Z, static_cast<__half*>(out), N, C, d, s, ep, stream);
    default: return bwd_impl(static_cast<const __nv_bfloat16*>(x), pbar, grad_ps, grad_cb, G, GT, part, Z, static_cast<__nv_bfloat16*>(out), N, C, d, s, ep, stream);
  }
}

}  // namespace cuda
}  // namespace vqkernels
