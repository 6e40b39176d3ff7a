// nearest_code on the CPU: for every row of x (N, D), the index of the code of codebook (K, D) with
// the lowest score, and that code's distance (see csrc/common.h and ops/nearest_code/reference.py):
//   metric 0 (l2): score = ||c||^2 - 2 <x, c>,  distance = max(||x||^2 + best score, 0)
//   metric 1 (ip): score = -<x, c>,             distance = 1 + best score
// Lowest index among equal scores; a NaN score never wins (if no score is below +inf: index 0).
//
// Design (FAISS-like, but fused for every D: no N x K buffer, no GEMM output tile). One kernel
// serves all D: on this CPU (Zen 4) it runs at ~105 GFLOP/s per core at D >= 32, above MKL's fp32
// GEMM on cache-sized tiles alone (~95-98), so a GEMM + row-min path would only be slower.
//  * The codebook is packed once per call into panels of 32 codes, transposed: panel p holds
//    [d][32] values (fp32) or [d/2][32][2] (bf16 pairs for vdpbf16ps), zero-padded to a multiple of
//    32 codes; a per-code bias holds ||c||^2 (l2), 0 (ip) or +inf (padding: never wins).
//  * A register-tiled AVX-512 micro-kernel (nearest_code_kernels.h) takes R = kRows rows of x
//    against one panel: R x 2 zmm accumulators (R rows x 32 codes); the D loop broadcasts x[r][d]
//    and FMAs it with two code vectors (D = 4, 8, 16: compile-time, fully unrolled). The epilogue
//    turns the dots into scores (fmadd: alpha * dot + bias, the reference's single rounding) and
//    folds the panel's two score vectors into a per-row running min of 16 lanes (min, min, one cmp
//    mask, one mask_mov of the panel index). No score is ever written to memory.
//  * Which of a panel's two codes won a lane, and the lowest index among equal minima, are
//    resolved once per row at the end (resolve_row) by recomputing that panel's scores with the
//    same instruction sequence (bit-identical).
//  * Cache blocking: a task owns kBlockRows rows (fixed blocks, so results do not depend on the
//    thread count) and walks the codebook in L2-sized chunks (kChunkBytes); each chunk is swept by
//    every group of R rows of the block while it sits in L2.
//  * Screened exact search for float32 (D >= 8 int8, D >= 32 bf16): a cheap low-precision pass gives for every
//    code a *lower bound* of its exact fp32 score, and only codes whose bound can beat the row's best
//    are scored exactly in fp32 (dot_exact). The result is the exact argmin of the fp32 scores with the
//    lowest index among equal scores, not an approximation. l2 rows and codes are centred on the
//    codebook mean first (distances unchanged; the bounds, which grow with ||x|| ||c||, shrink for data
//    far from the origin). Rows/codes outside the bounds' premises (tame_norm2) are handled exactly.
//    VQKERNELS_CPU_NO_SCREEN=1 turns the screens off (plain fp32 kernel).
//    - int8 screen (D <= 1024, avx512_vnni; screen_i8.h): rows and codes quantized to int8 (a scale
//      per group of 8 rows and per panel of 32 codes, the codes sorted by scale), exact integer dots by
//      vpdpbusd (4x the fp32 FMA rate), a bound from the measured quantization errors. The kernel keeps per row a threshold, the least *upper* bound seen, and
//      collects the codes whose lower bound is <= it; at the end the candidates are rescored in
//      increasing bound order until the bound exceeds the best exact score (~2 rescores per row on
//      random data). VQKERNELS_CPU_NO_VNNI=1 falls back to the bf16 screen.
//    - bf16 screen (avx512_bf16): the same register tiles as the plain kernel on bf16 copies
//      (vdpbf16ps: 2x the fp32 rate); bound kappa * ||x|| * ||c|| + kappa2 * ||c||^2 + slack (bf16
//      rounding of both operands is at most 2^-8 relative per element, so |<x~,c~> - <x,c>| <=
//      (2^-7 + 2^-16) sum |x_i c_i|; kappa also covers the fp32 accumulation of both the estimate and
//      the exact score; see screen_constants). Codes whose bound is strictly below the row's best
//      exact score so far are rescored at once (rescore_rows), in index order (~8 per row).
//  * bfloat16: the same kernel with vdpbf16ps (avx512_bf16): exact bf16 products summed in fp32,
//    ~2x the fp32 rate. Without avx512_bf16 (or AVX-512) the portable path widens to fp32.
//  * float16: converted to float32 up front (one (N, D) + (K, D) fp32 copy), then the fp32 path.
//  * Extra memory: the packed codebook (about K x D elements, like the codebook itself) plus a few
//    KB per thread. Parallel over row blocks on torch.get_num_threads() threads (parallel_blocks).
//  * AVX-512 is chosen at run time (__builtin_cpu_supports); the build needs no -march flag.
//  * Portable fallback (no AVX-512, or VQKERNELS_CPU_NO_AVX512=1 for tests): tiles of 512 rows x
//    2048 codes through at::mm_out (torch's threads) and a scalar row-min; correct, not fast.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_X86 1
#else
#define VQK_X86 0
#endif

#include "common.h"
#include "cpu/runtime.h"
#include "search.h"
#include "simd_avx512.h"

namespace vqkernels {
namespace {

constexpr int64_t kPanel = 32;       // codes per packed panel (two zmm of fp32 lanes)
#ifndef VQK_ROWS  // tuning hooks for benchmarks (-DVQK_ROWS=...); the defaults are the measured best
#define VQK_ROWS 4
#endif
#ifndef VQK_CHUNK_KB
#define VQK_CHUNK_KB 256
#endif
constexpr int kRows = VQK_ROWS;      // rows per micro-kernel call (R): 2R accumulators
constexpr int64_t kBlockRows = 16 * kRows;  // rows per task; fixed => results independent of threads
constexpr int64_t kChunkBytes = VQK_CHUNK_KB * 1024;  // packed codes per L2 chunk

inline float inf_f() { return std::numeric_limits<float>::infinity(); }

// The CPU features and switches (VQKERNELS_CPU_NO_AVX512 / _NO_VNNI / _NO_BF16DP) live in runtime.h, one
// place each; these short names keep the kernels readable.
using cpu::env_flag;
using cpu::parallel_blocks;
inline bool cpu_avx512() { return cpu::has_avx512(); }
inline bool cpu_avx512_vnni() { return cpu::has_avx512_vnni(); }
inline bool cpu_avx512_bf16() { return cpu::has_avx512_bf16(); }

// Final distance from the best score (mirrors the reference; NaN passes through the clamp).
inline float finish_distance(int64_t metric, float xnorm, float best) {
  if (metric == kL2) {
    const float v = xnorm + best;
    return v < 0.f ? 0.f : v;
  }
  return 1.f + best;
}

// ---------------------------------------------------------------------------------------------
// Portable path: GEMM tiles + scalar row-min. Used without AVX-512 and for bf16 without avx512_bf16.

void nearest_code_portable(const at::Tensor& x32, const at::Tensor& cb32, int64_t metric,
                           int64_t* out_idx, float* out_dist) {
  // x32 (N, D) and cb32 (K, D) are contiguous float32 (bf16 is widened by the caller). One tile of
  // TR x TC scores (4 MB) at a time; at::mm_out itself runs on torch's threads, the row-min is serial.
  const int64_t N = x32.size(0), K = cb32.size(0), D = x32.size(1);
  constexpr int64_t TR = 512, TC = 2048;
  const float* cbp = cb32.data_ptr<float>();
  const float* xp = x32.data_ptr<float>();
  std::vector<float> cnorm(K);
  for (int64_t k = 0; k < K; ++k) {
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += cbp[k * D + d] * cbp[k * D + d];
    cnorm[k] = metric == kL2 ? s : 0.f;
  }
  const float alpha = metric == kL2 ? -2.f : -1.f;
  at::Tensor tile = at::empty({std::min(TR, N), std::min(TC, K)}, x32.options());
  std::vector<float> best(TR);
  std::vector<int64_t> bidx(TR);
  for (int64_t n0 = 0; n0 < N; n0 += TR) {
    const int64_t nr = std::min(TR, N - n0);
    std::fill(best.begin(), best.end(), inf_f());
    std::fill(bidx.begin(), bidx.end(), 0);
    const at::Tensor xt = x32.narrow(0, n0, nr);
    for (int64_t k0 = 0; k0 < K; k0 += TC) {
      const int64_t kc = std::min(TC, K - k0);
      at::Tensor t = tile.narrow(0, 0, nr).narrow(1, 0, kc);
      at::mm_out(t, xt, cb32.narrow(0, k0, kc).t());
      const float* tp = t.data_ptr<float>();
      const int64_t ld = t.stride(0);
      for (int64_t r = 0; r < nr; ++r) {
        float bv = best[r];
        int64_t bi = bidx[r];
        for (int64_t j = 0; j < kc; ++j) {
          const float s = alpha * tp[r * ld + j] + cnorm[k0 + j];
          if (s < bv) {  // strict, and false for NaN: NaN never wins, the earlier index keeps ties
            bv = s;
            bi = k0 + j;
          }
        }
        best[r] = bv;
        bidx[r] = bi;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      float xn = 0.f;
      for (int64_t d = 0; d < D; ++d) xn += xp[(n0 + r) * D + d] * xp[(n0 + r) * D + d];
      out_idx[n0 + r] = bidx[r];
      out_dist[n0 + r] = finish_distance(metric, xn, best[r]);
    }
  }
}

#if VQK_X86 && defined(__GNUC__)
// ---------------------------------------------------------------------------------------------
// AVX-512 path.
#define VQK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define VQK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

VQK_AVX512 inline float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

VQK_AVX512 float sqnorm_f32(const float* p, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m512 v0 = _mm512_loadu_ps(p + d), v1 = _mm512_loadu_ps(p + d + 16);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
  }
  for (; d < D; d += 16) {
    const __mmask16 m = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, p + d);
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  return hsum16(_mm512_add_ps(a0, a1));
}

VQK_AVX512 inline __m512 bf16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

VQK_AVX512 float sqnorm_bf16(const c10::BFloat16* p, int64_t D) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  __m512 a0 = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    __m512 v = bf16_to_f32(_mm256_maskz_loadu_epi16(m, q + d));
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  return hsum16(a0);
}

// <x, c> in fp32, one fixed order (simd_avx512.h's dot: two 16-lane FMA chains, a masked tail, a tree reduction):
// the exact score of the screened path (rescore_rows), the same bits wherever it is called.
VQK_AVX512 float dot_exact(const float* x, const float* c, int64_t D) { return cpu::avx512::dot(x, c, D); }

// A code's exact fp32 score, as every screen's rescoring computes it.
VQK_AVX512 float exact_score(const float* x, const float* c, int64_t D, float alpha, float bias) {
  return std::fmaf(alpha, dot_exact(x, c, D), bias);
}

// Every code, exactly (a row the screens cannot bound): its least score, the lowest index on ties.
VQK_AVX512 void scan_exact(const float* x, const float* cb, const float* bias, int64_t K, int64_t D, float alpha,
                           float* best, int64_t* bidx) {
  float b = inf_f();
  int64_t bi = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float sc = exact_score(x, cb + k * D, D, alpha, bias[k]);
    if (sc < b) {
      b = sc;
      bi = k;
    }
  }
  *best = b;
  *bidx = bi;
}

// The screens' exact rescoring (bf16: nearest_code_kernels.h, int8: screen_i8.h). A screen computes,
// per code, a lower bound of its exact fp32 score; the codes of a panel (32 codes from k0) whose bound
// (lbuf) is strictly below the row's best exact score so far (masks) are scored exactly here, in
// index order, so the lowest index keeps ties. Out of line: it is the rare path.
struct ScreenCtx {
  const float* const* xrow;  // fp32 rows of the R-row group (exact rescoring)
  const float* cb;           // fp32 codebook (K, D), contiguous
  const float* bias;         // exact per-code bias (||c||^2 or 0)
  int64_t K, D;
  float alpha;
};

VQK_AVX512 __attribute__((noinline)) void rescore_rows(const ScreenCtx& c, int R, const uint32_t* masks,
                                                       const float* lbuf, int64_t k0, float* best,
                                                       int64_t* bidx, int64_t* nrescored) {
  for (int r = 0; r < R; ++r) {
    uint32_t m = masks[r];
    if (!m) continue;
    float b = best[r];
    int64_t bi = bidx[r];
    const float* x = c.xrow[r];
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      const int64_t k = k0 + j;
      if (k >= c.K) break;
      if (!(lbuf[r * 32 + j] < b)) continue;  // the best dropped since the mask was taken
      const float s = exact_score(x, c.cb + k * c.D, c.D, c.alpha, c.bias[k]);
      ++*nrescored;
      if (s < b) {  // strict: NaN never wins, the earlier index keeps ties
        b = s;
        bi = k;
      }
    }
    best[r] = b;
    bidx[r] = bi;
  }
}

// The micro-kernels, compiled twice: for AVX-512 (fp32) and AVX-512 + avx512_bf16 (bf16), so the
// fp32 path never carries bf16 instructions. See nearest_code_kernels.h.
#define VQK_TARGET VQK_AVX512
#define VQK_KERNELS_BF16 0
namespace isa_avx512 {
#include "nearest_code_kernels.h"
}  // namespace isa_avx512
#undef VQK_TARGET
#undef VQK_KERNELS_BF16
#define VQK_TARGET VQK_AVX512BF16
#define VQK_KERNELS_BF16 1
namespace isa_avx512bf16 {
#include "nearest_code_kernels.h"
}  // namespace isa_avx512bf16
#undef VQK_TARGET
#undef VQK_KERNELS_BF16

#include "screen_i8.h"

// Pack codes [k0, k0+32) of an fp32 codebook into one panel [D][32] (zero padding past K).
VQK_AVX512 void pack_panel_f32(const float* cb, int64_t K, int64_t D, int64_t k0, float* out) {
  const int64_t nk = std::min(kPanel, K - k0);
  for (int64_t j = 0; j < kPanel; ++j) {  // read codes contiguously; the panel (D x 128 B) stays in L1/L2
    const float* c = cb + (k0 + j) * D;
    if (j < nk) {
      for (int64_t d = 0; d < D; ++d) out[d * kPanel + j] = c[d];
    } else {
      for (int64_t d = 0; d < D; ++d) out[d * kPanel + j] = 0.f;
    }
  }
}

// Pack codes [k0, k0+32) of a bf16 or fp32 codebook into one bf16 panel [Dp/2][32][2] (zero
// padding; fp32 codes rounded to nearest even, bf16 codes copied exactly).
template <typename Src>
void pack_panel_bf16(const Src* cb, int64_t K, int64_t D, int64_t Dp, int64_t k0, c10::BFloat16* out) {
  const int64_t nk = std::min(kPanel, K - k0);
  const c10::BFloat16 zero(0.f);
  for (int64_t i = 0; i < Dp / 2; ++i) {
    c10::BFloat16* o = out + i * 2 * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const bool in = j < nk;
      const int64_t d0 = 2 * i, d1 = 2 * i + 1;
      o[2 * j] = (in && d0 < D) ? c10::BFloat16(static_cast<float>(cb[(k0 + j) * D + d0])) : zero;
      o[2 * j + 1] = (in && d1 < D) ? c10::BFloat16(static_cast<float>(cb[(k0 + j) * D + d1])) : zero;
    }
  }
}

// Runs the micro-kernel on R = kRows rows; small D get a compile-time D (fully unrolled loop).
template <typename T>
void run_micro(const T* x, int64_t ldx, int64_t D, const T* panels, const float* bias, int64_t np,
               int32_t pbase, float alpha, float* best, int32_t* bpan) {
  if constexpr (std::is_same<T, float>::value) {
    using namespace isa_avx512;
    switch (D) {
      case 4: return micro<kRows, 4, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
      case 8: return micro<kRows, 8, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
      case 16: return micro<kRows, 16, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
      default: return micro<kRows, 0, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
    }
  } else {
    using namespace isa_avx512bf16;
    switch (D) {
      case 8: return micro<kRows, 8, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
      case 16: return micro<kRows, 16, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
      default: return micro<kRows, 0, T>(x, ldx, D, panels, bias, np, pbase, alpha, best, bpan);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The fp32 search (search.h): plain fp32 register tiles, or the bf16 screen + exact rescoring.

constexpr int64_t kScreenMinD = 32;   // bf16: below, the screen's epilogue costs more than the dots save
constexpr int64_t kI8MinD = 8;        // int8: measured 13% faster than the plain kernel at D = 8, slower at 7
constexpr int64_t kScreenMaxD = 1 << 20;
constexpr int kScreenRows = 4;        // rows per screened micro-kernel call (bf16)
#ifndef VQK_I8_ROWS
#define VQK_I8_ROWS 8
#endif
constexpr int kScreenRowsI8 = VQK_I8_ROWS;  // ... (int8)
static_assert(cpu::kSearchBlockRows % kScreenRowsI8 == 0, "a block holds whole row groups");
// The screens' bounds hold for rows and codes whose squared norm is 0 or within [2^-80, 2^100]: no
// overflow, and whatever underflows (subnormal products, bf16 denormals flushed by vdpbf16ps: at most
// D 2^-126 in all) stays far below the relative error terms, which are >= 2^-8 2^-80 there. Other rows
// are scanned exactly; other codes are rescored for every row (tiny ones) or, if huge or not finite,
// send the codebook to the plain kernel.
constexpr float kTameNorm2 = 0x1p100f;
constexpr float kTameNorm2Lo = 0x1p-80f;
inline bool tame_norm2(float n2) { return n2 == 0.f || (n2 >= kTameNorm2Lo && n2 <= kTameNorm2); }
inline bool tiny_norm2(float n2) { return n2 > 0.f && n2 < kTameNorm2Lo; }

// The lower bound's constants for dimension D (see the header): u = 2^-8 (bf16 rounding),
// g = gamma_{D+8} (fp32 sums of D terms, either order, plus the reduction tree).
struct ScreenConsts {
  float kappa, kappa2, slack;
};
ScreenConsts screen_constants(int64_t D) {
  const double u = std::ldexp(1.0, -8), u32 = std::ldexp(1.0, -24);
  const double n = double(D) + 8.0;
  const double g = n * u32 / (1.0 - n * u32);
  return {float(1.02 * 2.0 * (2.0 * u + u * u) + 16.0 * g + 16.0 * u32), float(8.0 * g + 8.0 * u32),
          std::ldexp(1.0f, -120)};
}

std::atomic<int64_t> g_screened_rows{0}, g_rescored{0}, g_plain_rows{0}, g_i8_rows{0};

// Round-to-nearest-even fp32 -> bf16 of one row, zero-padded to Dp.
VQK_AVX512BF16 void row_to_bf16(const float* x, int64_t D, int64_t Dp, c10::BFloat16* out) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + d + 16), _mm512_loadu_ps(x + d));
    _mm512_storeu_si512(out + d, (__m512i)v);
  }
  for (; d < Dp; ++d) out[d] = d < D ? c10::BFloat16(x[d]) : c10::BFloat16(0.f);
}

#endif  // VQK_X86

}  // namespace

namespace cpu {

SearchStats search_stats() {
#if VQK_X86 && defined(__GNUC__)
  return {g_screened_rows.load(), g_rescored.load(), g_plain_rows.load(), g_i8_rows.load()};
#else
  return {0, 0, 0, 0};
#endif
}

struct Fp32Search::Impl {
  int64_t K = 0, D = 0, metric = 0, NP = 0, Kp = 0, Dp = 0, chunk_panels = 1;
  float alpha = -2.f;
  bool screen = false, i8 = false;  // screened; by the int8 screen (else bf16)
  at::Tensor cb_keep;
  const float* cb = nullptr;
  std::vector<float> packed;              // plain: fp32 panels [NP][D][32]
  std::vector<c10::BFloat16> packed_b;    // screen: bf16 panels [NP][Dp/2][32][2]
  std::vector<float> bias, lbias, amar;   // per code (padded to Kp)
  // l2 screen: rows and codes are centred on the codebook mean mu (distances unchanged; the bound,
  // which grows with ||x|| ||c||, shrinks for data far from the origin); ecb = the codes the exact
  // scores use (centred for l2, the input codebook for ip, where centring would change the ranking).
  std::vector<float> mu, cbc;
  const float* ecb = nullptr;
  // int8 screen (screen_i8.h): the codes sorted by max|c| (perm: sorted position -> code), panels
  // [NP][Dq/4][32][4] of the sorted codes, per sorted code -128 sum(q) (+ M), P, Q, U and lbias
  // (ilbias), per panel its scale and maxima
  int64_t Dq = 0;
  bool magic = false;
  std::vector<int8_t> packed_q;
  std::vector<int32_t> corr, perm;
  std::vector<float> ilbias, P, Q, U;
  std::vector<I8Panel> pan;
};

struct Fp32Search::Scratch {
  std::vector<float> best, xpad;      // plain
  std::vector<int32_t> bpan;
  std::vector<c10::BFloat16> xb;      // bf16 screen
  std::vector<uint8_t> xq, exact;     // int8 screen: rows (q + 128), rows scanned exactly
  std::vector<float> ex, gs, gE, gn;  // ... per row ||e_x||; per group alpha a_g, E, n
  std::vector<I8List> cands;  // per row
  std::vector<float> nx, xn2, sbest, zero, xc;
  std::vector<int64_t> sidx;
  std::vector<const float*> xrow;
};

Fp32Search::~Fp32Search() = default;

std::unique_ptr<Fp32Search::Scratch, void (*)(Fp32Search::Scratch*)> Fp32Search::scratch() const {
  auto* s = new Scratch();
  const int64_t B = kSearchBlockRows;
  const Impl& m = *impl_;
  if (m.screen) {
    if (m.i8) {
      s->xq.resize((size_t)(B * m.Dq));
      s->ex.resize(B);
      s->gs.resize(B);
      s->gE.resize(B);
      s->gn.resize(B);
      s->cands.resize(B);
    } else {
      s->xb.resize((size_t)(B * m.Dp));
    }
    s->exact.resize(B);
    s->nx.resize(B);
    s->xn2.resize(B);
    s->sbest.resize(B);
    s->sidx.resize(B);
    s->xrow.resize(B);
    s->zero.assign((size_t)m.D, 0.f);
    if (!m.mu.empty()) s->xc.resize((size_t)(B * m.D));
  } else {
    s->best.resize((size_t)(B * 16));
    s->bpan.resize((size_t)(B * 16));
    s->xpad.resize((size_t)(kRows * m.D));
  }
  return {s, [](Scratch* p) { delete p; }};
}

bool Fp32Search::screened() const { return impl_->screen; }

#if VQK_X86 && defined(__GNUC__)
Fp32Search::Fp32Search(const at::Tensor& codebook, int64_t metric, bool centre) : impl_(new Impl()) {
  TORCH_CHECK(cpu_avx512(), "cpu nearest_code: the fp32 search kernel needs AVX-512");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.is_contiguous() && codebook.dim() == 2,
              "cpu nearest_code: internal error (codebook must be a contiguous float32 (K, D) tensor)");
  Impl& m = *impl_;
  m.cb_keep = codebook;
  m.cb = codebook.data_ptr<float>();
  m.K = codebook.size(0);
  m.D = codebook.size(1);
  m.metric = metric;
  m.alpha = metric == kL2 ? -2.f : -1.f;
  m.NP = (m.K + kPanel - 1) / kPanel;
  m.Kp = m.NP * kPanel;
  m.i8 = cpu_avx512_vnni() && m.D >= kI8MinD && m.D <= kI8MaxD;
  m.screen = !env_flag("VQKERNELS_CPU_NO_SCREEN") && m.D <= kScreenMaxD &&
             (m.i8 || (cpu_avx512_bf16() && m.D >= kScreenMinD));
  const int64_t K = m.K, D = m.D, NP = m.NP;
  const float* cb = m.cb;
  std::vector<float> cn2((size_t)m.Kp, 0.f);
  m.bias.assign((size_t)m.Kp, inf_f());
  constexpr int64_t kGroup = 16;  // panels per packing task
  const int64_t ngroups = (NP + kGroup - 1) / kGroup;
  parallel_blocks(ngroups, (double)m.Kp * (double)D, [&](const std::function<int64_t()>& next) {
    for (int64_t g = next(); g >= 0; g = next())
      for (int64_t j = g * kGroup * kPanel; j < std::min(K, (g + 1) * kGroup * kPanel); ++j) {
        cn2[j] = sqnorm_f32(cb + j * D, D);
        m.bias[j] = metric == kL2 ? cn2[j] : 0.f;
      }
  });
  // huge or non-finite codes: the bound's premises fail, the plain kernel takes the codebook
  const auto all_tame = [&]() {
    return std::all_of(cn2.begin(), cn2.begin() + K, [](float v) { return v <= kTameNorm2; });
  };
  m.screen = m.screen && all_tame();
  if (m.screen && metric == kL2 && centre) {  // centre: mu = the codebook mean, ecb = codes - mu
    std::vector<double> sum((size_t)D, 0.0);
    for (int64_t j = 0; j < K; ++j)
      for (int64_t d = 0; d < D; ++d) sum[d] += cb[j * D + d];
    m.mu.resize((size_t)D);
    for (int64_t d = 0; d < D; ++d) m.mu[d] = (float)(sum[d] / (double)K);
    m.cbc.resize((size_t)(K * D));
    parallel_blocks(ngroups, (double)m.Kp * (double)D, [&](const std::function<int64_t()>& next) {
      for (int64_t g = next(); g >= 0; g = next())
        for (int64_t j = g * kGroup * kPanel; j < std::min(K, (g + 1) * kGroup * kPanel); ++j) {
          for (int64_t d = 0; d < D; ++d) m.cbc[j * D + d] = cb[j * D + d] - m.mu[d];
          cn2[j] = sqnorm_f32(m.cbc.data() + j * D, D);
          m.bias[j] = cn2[j];
        }
    });
    m.screen = all_tame();
    if (!m.screen) {  // back to the input codes for the plain kernel
      m.mu.clear();
      m.cbc.clear();
      for (int64_t j = 0; j < K; ++j) m.bias[j] = sqnorm_f32(cb + j * D, D);
    }
  }
  m.ecb = m.cbc.empty() ? cb : m.cbc.data();
  m.i8 = m.i8 && m.screen;
  if (m.i8) {
    const float* ecb = m.ecb;
    TORCH_CHECK(K < (int64_t(1) << 31) - 64, "cpu nearest_code: at most 2^31 - 64 codes");
    m.Dq = (D + 3) / 4 * 4;
    m.magic = D <= kI8MagicMaxD;
    const int32_t corr0 = m.magic ? kI8Magic : 0;
    // sort the codes by max|c| (the panel's shared scale is then close to each code's own); codes that
    // get no bound (tiny, or not quantizable) come first, with key 0, and do not set their panel's scale
    std::vector<float> key((size_t)K, 0.f);
    std::vector<uint8_t> nob((size_t)K, 0);
    parallel_blocks(ngroups, (double)m.Kp * (double)D, [&](const std::function<int64_t()>& next) {
      for (int64_t g = next(); g >= 0; g = next())
        for (int64_t j = g * kGroup * kPanel; j < std::min(K, (g + 1) * kGroup * kPanel); ++j) {
          const float mx = max_abs_f32(ecb + j * D, D);
          nob[j] = tiny_norm2(cn2[j]) || !(mx == 0.f || mx >= kI8MinMax);
          key[j] = nob[j] ? 0.f : mx;
        }
    });
    m.perm.resize((size_t)K);
    for (int64_t j = 0; j < K; ++j) m.perm[j] = (int32_t)j;
    std::stable_sort(m.perm.begin(), m.perm.end(), [&](int32_t a, int32_t b) { return key[a] < key[b]; });
    m.packed_q.assign((size_t)(m.Kp * m.Dq), 0);
    m.corr.assign((size_t)m.Kp, corr0);
    m.P.assign((size_t)m.Kp, 0.f);
    m.Q.assign((size_t)m.Kp, 0.f);
    m.U.assign((size_t)m.Kp, inf_f());
    m.ilbias.assign((size_t)m.Kp, inf_f());  // padding: never a candidate
    m.pan.assign((size_t)NP, I8Panel{1.f, 0.f, 0.f, 0.f});
    const I8Consts ic = i8_constants(D);
    const float fa = ic.F * std::fabs(m.alpha);
    const int64_t Dq = m.Dq;
    parallel_blocks(ngroups, (double)m.Kp * (double)D, [&](const std::function<int64_t()>& next) {
      std::vector<int8_t> q((size_t)Dq, 0);
      for (int64_t g = next(); g >= 0; g = next())
        for (int64_t p = g * kGroup; p < std::min(NP, (g + 1) * kGroup); ++p) {
          int8_t* panel = m.packed_q.data() + p * kPanel * Dq;
          const int64_t j0 = p * kPanel, j1 = std::min(K, (p + 1) * kPanel);
          float mx = 0.f;
          for (int64_t i = j0; i < j1; ++i) mx = std::max(mx, key[m.perm[i]]);
          I8Panel pp{i8_scale(mx), 0.f, 0.f, 0.f};
          for (int64_t i = j0; i < j1; ++i) {
            const int64_t j = m.perm[i];
            const I8Vec v = nob[j] ? I8Vec{1.f, 0.f, 0, false} : quantize_i8_at(ecb + j * D, D, pp.scale, q.data());
            if (!v.ok) {  // no bound: rescored for every row (q = 0 here)
              m.ilbias[i] = -inf_f();
              continue;
            }
            for (int64_t t = 0; t < Dq / 4; ++t) std::memcpy(panel + t * 4 * kPanel + (i - j0) * 4, q.data() + 4 * t, 4);
            const float cn = std::sqrt(cn2[j]);
            m.corr[i] = corr0 - 128 * v.sum;
            m.P[i] = fa * (cn + v.err);
            m.Q[i] = fa * v.err + ic.kfp * cn;
            m.ilbias[i] = m.bias[j] - (ic.kappa2 * cn2[j] + ic.slack);
            // the upper bound's bias terms: 2 (bias - lbias) plus a margin for the rounding of lb
            m.U[i] = (float)((2.0 * ((double)m.bias[j] - m.ilbias[i]) + 0x1p-17 * std::fabs(m.bias[j])) * (1.0 + 0x1p-20));
            pp.maxL = std::max(pp.maxL, std::fabs(m.ilbias[i]));
            pp.maxP = std::max(pp.maxP, m.P[i]);
            pp.maxQ = std::max(pp.maxQ, m.Q[i]);
          }
          m.pan[p] = pp;
        }
    });
    m.chunk_panels = std::max<int64_t>(1, kChunkBytes / (kPanel * Dq));
  } else if (m.screen) {
    const float* ecb = m.ecb;
    m.Dp = (D + 1) / 2 * 2;
    m.packed_b.resize((size_t)(m.Kp * m.Dp));
    m.lbias.assign((size_t)m.Kp, inf_f());
    m.amar.assign((size_t)m.Kp, 0.f);
    const ScreenConsts sc = screen_constants(D);
    parallel_blocks(ngroups, (double)m.Kp * (double)D, [&](const std::function<int64_t()>& next) {
      for (int64_t g = next(); g >= 0; g = next())
        for (int64_t p = g * kGroup; p < std::min(NP, (g + 1) * kGroup); ++p) {
          pack_panel_bf16<float>(ecb, K, D, m.Dp, p * kPanel, m.packed_b.data() + p * kPanel * m.Dp);
          for (int64_t j = p * kPanel; j < std::min(K, (p + 1) * kPanel); ++j) {
            m.amar[j] = sc.kappa * std::sqrt(cn2[j]);
            m.lbias[j] = m.bias[j] - (sc.kappa2 * cn2[j] + sc.slack);
            if (tiny_norm2(cn2[j])) {  // no bound: rescored for every row
              m.amar[j] = 0.f;
              m.lbias[j] = -inf_f();
            }
          }
        }
    });
    m.chunk_panels = std::max<int64_t>(1, kChunkBytes / (kPanel * m.Dp * 2));
  } else {
    m.Dp = D;
    m.packed.resize((size_t)(m.Kp * D));
    parallel_blocks(ngroups, (double)m.Kp * (double)D, [&](const std::function<int64_t()>& next) {
      for (int64_t g = next(); g >= 0; g = next())
        for (int64_t p = g * kGroup; p < std::min(NP, (g + 1) * kGroup); ++p)
          pack_panel_f32(cb, K, D, p * kPanel, m.packed.data() + p * kPanel * D);
    });
    m.chunk_panels = std::max<int64_t>(1, kChunkBytes / (kPanel * D * 4));
  }
}

void Fp32Search::search(const float* x, int64_t ldx, int64_t nr, int64_t* idx, float* dist, Scratch& s) const {
  const Impl& m = *impl_;
  const int64_t D = m.D, NP = m.NP;
  if (nr <= 0) return;
  if (!m.screen) {
    const int64_t ngroups = (nr + kRows - 1) / kRows;
    std::fill(s.best.begin(), s.best.end(), inf_f());
    std::fill(s.bpan.begin(), s.bpan.end(), 0);
    for (int64_t c0 = 0; c0 < NP; c0 += m.chunk_panels) {
      const int64_t np = std::min(m.chunk_panels, NP - c0);
      for (int64_t g = 0; g < ngroups; ++g) {
        const int64_t rows = std::min<int64_t>(kRows, nr - g * kRows);
        const float* xr = x + g * kRows * ldx;
        int64_t ld = ldx;
        if (rows < kRows) {
          std::fill(s.xpad.begin(), s.xpad.end(), 0.f);
          for (int64_t r = 0; r < rows; ++r) std::memcpy(s.xpad.data() + r * D, xr + r * ldx, sizeof(float) * D);
          xr = s.xpad.data();
          ld = D;
        }
        run_micro<float>(xr, ld, D, m.packed.data() + c0 * kPanel * D, m.bias.data() + c0 * kPanel, np,
                         (int32_t)c0, m.alpha, s.best.data() + g * kRows * 16, s.bpan.data() + g * kRows * 16);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const float* xrow = x + r * ldx;
      float v;
      int64_t i;
      isa_avx512::resolve_row<float>(xrow, D, m.packed.data(), m.bias.data(), m.alpha, s.best.data() + r * 16,
                                     s.bpan.data() + r * 16, &v, &i);
      idx[r] = i;
      dist[r] = finish_distance(m.metric, sqnorm_f32(xrow, D), v);
    }
    g_plain_rows.fetch_add(nr, std::memory_order_relaxed);
    return;
  }

  if (m.i8) {
    search_i8(x, ldx, nr, idx, dist, s);
    return;
  }

  // The screen. Rows padded to a multiple of kScreenRows with zero rows whose bound is NaN (never
  // rescored); rows that are not tame get a NaN bound too and are scanned exactly below.
  constexpr int R = kScreenRows;
  const int64_t Dp = m.Dp;
  const int64_t ngroups = (nr + R - 1) / R;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < ngroups * R; ++r) {
    if (r < nr) {
      const float* xr = x + r * ldx;
      if (!m.mu.empty()) {  // centred copy (the exact scores use it too)
        float* o = s.xc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = xr[d] - m.mu[d];
        xr = o;
      }
      const float n2 = sqnorm_f32(xr, D);
      s.xn2[r] = n2;
      s.nx[r] = tame_norm2(n2) ? std::sqrt(n2) : nan;
      row_to_bf16(xr, D, Dp, s.xb.data() + r * Dp);
      s.xrow[r] = xr;
    } else {
      std::fill(s.xb.begin() + r * Dp, s.xb.begin() + (r + 1) * Dp, c10::BFloat16(0.f));
      s.nx[r] = nan;
      s.xrow[r] = s.zero.data();
    }
    s.sbest[r] = inf_f();
    s.sidx[r] = 0;
  }
  int64_t rescored = 0;
  ScreenCtx ctx{nullptr, m.ecb, m.bias.data(), m.K, D, m.alpha};
  for (int64_t c0 = 0; c0 < NP; c0 += m.chunk_panels) {
    const int64_t np = std::min(m.chunk_panels, NP - c0);
    for (int64_t g = 0; g < ngroups; ++g) {
      ctx.xrow = s.xrow.data() + g * R;
      isa_avx512bf16::micro_screen<R, 0>(s.xb.data() + g * R * Dp, Dp, Dp, m.packed_b.data() + c0 * kPanel * Dp,
                                         m.lbias.data() + c0 * kPanel, m.amar.data() + c0 * kPanel, np,
                                         c0 * kPanel, s.nx.data() + g * R, ctx, s.sbest.data() + g * R,
                                         s.sidx.data() + g * R, &rescored);
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    if (!tame_norm2(s.xn2[r]))  // not screened: every code, exactly
      scan_exact(s.xrow[r], m.ecb, m.bias.data(), m.K, D, m.alpha, &s.sbest[r], &s.sidx[r]);
    idx[r] = s.sidx[r];
    dist[r] = finish_distance(m.metric, s.xn2[r], s.sbest[r]);
  }
  g_screened_rows.fetch_add(nr, std::memory_order_relaxed);
  g_rescored.fetch_add(rescored, std::memory_order_relaxed);
}

// The int8 screen (screen_i8.h): rows centred (l2), quantized, screened in groups of kScreenRowsI8
// against L2-sized chunks of panels; rows that cannot be screened are scanned exactly at the end.
void Fp32Search::search_i8(const float* x, int64_t ldx, int64_t nr, int64_t* idx, float* dist, Scratch& s) const {
  const Impl& m = *impl_;
  constexpr int R = kScreenRowsI8;
  const int64_t D = m.D, Dq = m.Dq, NP = m.NP;
  const int64_t ngroups = (nr + R - 1) / R;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t g = 0; g < ngroups; ++g) {
    // the group's rows: centred (l2), their norms; those the bound covers share the scale a_g
    float gmax = 0.f;
    for (int64_t r = g * R; r < (g + 1) * R; ++r) {
      s.exact[r] = 1;  // until quantized below (padding rows: never candidates, never scanned)
      s.sbest[r] = nan;
      s.sidx[r] = 0;
      s.nx[r] = 0.f;
      s.ex[r] = 0.f;
      if (r >= nr) {
        s.xrow[r] = s.zero.data();
        continue;
      }
      const float* xr = x + r * ldx;
      if (!m.mu.empty()) {  // centred copy (the exact scores use it too)
        float* o = s.xc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = xr[d] - m.mu[d];
        xr = o;
      }
      s.xrow[r] = xr;
      const float n2 = sqnorm_f32(xr, D);
      s.xn2[r] = n2;
      if (tame_norm2(n2)) {
        s.exact[r] = 0;
        gmax = std::max(gmax, max_abs_f32(xr, D));
      }
    }
    const float ag = i8_scale(gmax);
    float Eg = 0.f, ng = 0.f;
    for (int64_t r = g * R; r < (g + 1) * R; ++r) {
      uint8_t* xq = s.xq.data() + r * Dq;
      const I8Vec v = (r < nr && !s.exact[r]) ? quantize_i8_at(s.xrow[r], D, ag, reinterpret_cast<int8_t*>(xq))
                                              : I8Vec{1.f, 0.f, 0, false};
      if (!v.ok) {  // q = 0: its bounds are compared with a NaN threshold, never candidates
        std::memset(xq, 0x80, (size_t)Dq);
        continue;
      }
      for (int64_t d = 0; d < D; ++d) xq[d] ^= 0x80;  // q + 128
      std::memset(xq + D, 0x80, (size_t)(Dq - D));
      s.sbest[r] = inf_f();
      s.nx[r] = std::sqrt(s.xn2[r]);
      s.ex[r] = v.err;
      Eg = std::max(Eg, v.err);
      ng = std::max(ng, s.nx[r]);
    }
    for (int64_t r = g * R; r < std::min(nr, (g + 1) * R); ++r)
      if (std::isnan(s.sbest[r])) s.exact[r] = 1;  // not quantized: scanned exactly below
    s.gs[g] = m.alpha * ag;
    s.gE[g] = Eg;
    s.gn[g] = ng;
  }
  for (int64_t r = 0; r < nr; ++r) s.cands[r].n = 0;
  I8Ctx ctx{m.P.data(), m.Q.data(), m.U.data(), nullptr, nullptr, 0.f, 0.f, m.K, s.cands.data()};
  for (int64_t c0 = 0; c0 < NP; c0 += m.chunk_panels) {
    const int64_t np = std::min(m.chunk_panels, NP - c0);
    const int64_t k0 = c0 * kPanel;
    for (int64_t g = 0; g < ngroups; ++g) {
      ctx.E = s.ex.data() + g * R;
      ctx.nx = s.nx.data() + g * R;
      ctx.Eg = s.gE[g];
      ctx.ng = s.gn[g];
      ctx.cands = s.cands.data() + g * R;
      const auto kernel = m.magic ? micro_screen_i8<R, true> : micro_screen_i8<R, false>;
      kernel(s.xq.data() + g * R * Dq, Dq, m.packed_q.data() + k0 * Dq, m.corr.data() + k0, m.pan.data() + c0,
             m.ilbias.data() + k0, m.P.data() + k0, m.Q.data() + k0, np, k0, s.gs[g], ctx, s.sbest.data() + g * R);
    }
  }
  // Each row's candidates whose bound is <= its final threshold, in increasing lower bound (a handful:
  // insertion sort), rescored exactly while their bound can still beat (or tie at a lower index) the
  // best exact score so far.
  int64_t rescored = 0;
  for (int64_t r = 0; r < nr; ++r) {
    float b = inf_f();
    int64_t bi = 0;
    if (s.exact[r]) scan_exact(s.xrow[r], m.ecb, m.bias.data(), m.K, D, m.alpha, &b, &bi);  // not screened
    I8List& cl = s.cands[r];
    const float th = s.sbest[r];
    size_t n = 0;
    for (size_t j = 0; j < cl.n; ++j) {
      const float lb = cl.lb[j];
      const int32_t k = m.perm[cl.k[j]];  // sorted position -> code
      if (!(lb <= th)) continue;
      size_t i = n++;  // in place: i <= j
      for (; i > 0 && (cl.lb[i - 1] > lb || (cl.lb[i - 1] == lb && cl.k[i - 1] > k)); --i) {
        cl.lb[i] = cl.lb[i - 1];
        cl.k[i] = cl.k[i - 1];
      }
      cl.lb[i] = lb;
      cl.k[i] = k;
    }
    for (size_t i = 0; i < n; ++i) {
      const float lb = cl.lb[i];
      const int64_t k = cl.k[i];
      if (lb > b) break;                  // and so are the rest
      if (lb == b && k > bi) continue;    // at best a tie, at a higher index
      const float sc = exact_score(s.xrow[r], m.ecb + k * D, D, m.alpha, m.bias[k]);
      ++rescored;
      if (sc < b || (sc == b && k < bi)) {  // NaN never wins; the lower index wins ties
        b = sc;
        bi = k;
      }
    }
    idx[r] = bi;
    dist[r] = finish_distance(m.metric, s.xn2[r], b);
  }
  g_screened_rows.fetch_add(nr, std::memory_order_relaxed);
  g_i8_rows.fetch_add(nr, std::memory_order_relaxed);
  g_rescored.fetch_add(rescored, std::memory_order_relaxed);
}
#else
Fp32Search::Fp32Search(const at::Tensor&, int64_t, bool) : impl_(new Impl()) {
  TORCH_CHECK(false, "cpu nearest_code: the fp32 search kernel needs an x86-64 CPU with AVX-512");
}
void Fp32Search::search(const float*, int64_t, int64_t, int64_t*, float*, Scratch&) const {}
void Fp32Search::search_i8(const float*, int64_t, int64_t, int64_t*, float*, Scratch&) const {}
#endif

}  // namespace cpu

namespace {
#if VQK_X86 && defined(__GNUC__)

// bfloat16 inputs: the plain register-tiled kernel on vdpbf16ps (exact bf16 products, fp32 sums).
// (float32 inputs go through cpu::Fp32Search above.)
void nearest_code_bf16_avx512(const at::Tensor& x, const at::Tensor& cb, int64_t metric, int64_t* out_idx,
                              float* out_dist) {
  using T = c10::BFloat16;
  const int64_t N = x.size(0), K = cb.size(0), D = x.size(1);
  const int64_t Dp = (D + 1) / 2 * 2;  // pairs
  const int64_t NP = (K + kPanel - 1) / kPanel;
  const int64_t Kp = NP * kPanel;
  const T* xp = x.data_ptr<T>();
  const T* cbp = cb.data_ptr<T>();

  // Pack the codebook and compute the per-code bias once per call.
  std::vector<T> packed_store((size_t)(Kp * Dp));
  std::vector<float> bias((size_t)Kp);
  T* packed = packed_store.data();
  constexpr int64_t kPackGroup = 16;  // panels per packing block
  parallel_blocks((NP + kPackGroup - 1) / kPackGroup, (double)Kp * (double)Dp,
                  [&](const std::function<int64_t()>& next) {
    for (int64_t g = next(); g >= 0; g = next())
    for (int64_t p = g * kPackGroup; p < std::min(NP, (g + 1) * kPackGroup); ++p) {
      pack_panel_bf16(cbp, K, D, Dp, p * kPanel, packed + p * kPanel * Dp);
      for (int64_t j = p * kPanel; j < (p + 1) * kPanel; ++j) {
        if (j >= K) {
          bias[j] = inf_f();
        } else if (metric == kL2) {
          bias[j] = sqnorm_bf16(cbp + j * D, D);
        } else {
          bias[j] = 0.f;
        }
      }
    }
  });

  const float alpha = metric == kL2 ? -2.f : -1.f;
  const int64_t chunk_panels = std::max<int64_t>(1, kChunkBytes / (kPanel * Dp * 2));
  const bool need_copy = Dp != D;  // odd D: rows are copied with a zero pad
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;

  const double work = (double)N * (double)Kp * (double)Dp;
  parallel_blocks(nblocks, work, [&](const std::function<int64_t()>& next) {
    std::vector<float> best((size_t)(kBlockRows * 16));
    std::vector<int32_t> bpan((size_t)(kBlockRows * 16));
    std::vector<T> xpad((size_t)(kRows * Dp));  // padded copy of a row group (tail rows, odd D)
    for (int64_t blk = next(); blk >= 0; blk = next()) {
      const int64_t n0 = blk * kBlockRows;
      const int64_t nr = std::min(kBlockRows, N - n0);
      const int64_t ngroups = (nr + kRows - 1) / kRows;
      std::fill(best.begin(), best.end(), inf_f());
      std::fill(bpan.begin(), bpan.end(), 0);
      for (int64_t c0 = 0; c0 < NP; c0 += chunk_panels) {
        const int64_t np = std::min(chunk_panels, NP - c0);
        for (int64_t g = 0; g < ngroups; ++g) {
          const int64_t r0 = n0 + g * kRows;
          const int64_t rows = std::min<int64_t>(kRows, N - r0);
          const T* xr = xp + r0 * D;
          int64_t ldx = D;
          if (rows < kRows || need_copy) {
            std::fill(xpad.begin(), xpad.end(), T(0.f));
            for (int64_t r = 0; r < rows; ++r)
              std::memcpy(xpad.data() + r * Dp, xp + (r0 + r) * D, (size_t)(D * sizeof(T)));
            xr = xpad.data();
            ldx = Dp;
          }
          run_micro<T>(xr, ldx, Dp, packed + c0 * kPanel * Dp, bias.data() + c0 * kPanel, np,
                       (int32_t)c0, alpha, best.data() + g * kRows * 16, bpan.data() + g * kRows * 16);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const T* xrow = xp + (n0 + r) * D;
        if (need_copy) {
          std::fill(xpad.begin(), xpad.begin() + Dp, T(0.f));
          std::memcpy(xpad.data(), xrow, (size_t)(D * sizeof(T)));
          xrow = xpad.data();
        }
        float v;
        int64_t i;
        isa_avx512bf16::resolve_row<T>(xrow, Dp, packed, bias.data(), alpha, best.data() + r * 16,
                                       bpan.data() + r * 16, &v, &i);
        out_idx[n0 + r] = i;
        out_dist[n0 + r] = finish_distance(metric, sqnorm_bf16(xrow, D), v);
      }
    }
  });
}
#endif  // VQK_X86

}  // namespace

// x (N, D), codebook (K, D): float32, bfloat16 or float16 (float16 is converted to float32 up
// front). Returns (indices int64 (N,), distance float32 (N,)). allow_tf32 is ignored: exact fp32.
std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x_in, const at::Tensor& cb_in,
                                                    int64_t metric, bool allow_tf32) {
  (void)allow_tf32;
  check_nearest_code_args(x_in, cb_in, metric, "cpu");
  TORCH_CHECK(x_in.device().is_cpu() && cb_in.device().is_cpu(),
              "cpu nearest_code: x and codebook must be CPU tensors");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "cpu nearest_code: dtype must be float32, bfloat16 or float16, got ", dt);
  at::Tensor x = x_in.contiguous();
  at::Tensor cb = cb_in.contiguous();
  if (dt == at::kHalf) {  // no fp16 kernel: widen once (fp16 -> fp32 is exact)
    x = x.to(at::kFloat);
    cb = cb.to(at::kFloat);
  }
  const int64_t N = x.size(0);
  at::Tensor idx = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, x.options().dtype(at::kFloat));
  if (poison_outputs()) {
    idx.fill_(-7);
    dist.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  if (N == 0) return {idx, dist};
  int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();
#if VQK_X86 && defined(__GNUC__)
  if (x.scalar_type() == at::kFloat && cpu_avx512()) {
    const cpu::Fp32Search search(cb, metric);
    const int64_t B = cpu::kSearchBlockRows, D = x.size(1);
    const float* xp = x.data_ptr<float>();
    const double work = (double)N * (double)cb.size(0) * (double)D;
    parallel_blocks((N + B - 1) / B, work, [&](const std::function<int64_t()>& next) {
      auto s = search.scratch();
      for (int64_t b = next(); b >= 0; b = next()) {
        const int64_t n0 = b * B;
        search.search(xp + n0 * D, D, std::min(B, N - n0), ip + n0, dp + n0, *s);
      }
    });
    return {idx, dist};
  }
  if (x.scalar_type() == at::kBFloat16 && cpu_avx512()) {
    // bf16 -> fp32 is exact, so the fp32 search's screens apply as they are: the codebook widened
    // once, rows widened a block at a time (64 x D floats per thread). Where no screen runs (small D,
    // or no screen on this CPU), the vdpbf16ps kernel reads bf16 directly and is faster.
    const at::Tensor cb32 = cb.to(at::kFloat).contiguous();
    const cpu::Fp32Search search(cb32, metric);
    if (search.screened()) {
      const int64_t B = cpu::kSearchBlockRows, D = x.size(1);
      const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
      const double work = (double)N * (double)cb.size(0) * (double)D;
      parallel_blocks((N + B - 1) / B, work, [&](const std::function<int64_t()>& next) {
        auto s = search.scratch();
        std::vector<float> rows((size_t)(B * D));
        for (int64_t b = next(); b >= 0; b = next()) {
          const int64_t n0 = b * B, nr = std::min(B, N - n0);
          for (int64_t i = 0; i < nr * D; ++i) rows[(size_t)i] = static_cast<float>(xp[n0 * D + i]);
          search.search(rows.data(), D, nr, ip + n0, dp + n0, *s);
        }
      });
      return {idx, dist};
    }
  }
  if (x.scalar_type() == at::kBFloat16 && cpu_avx512_bf16()) {
    nearest_code_bf16_avx512(x, cb, metric, ip, dp);
    return {idx, dist};
  }
#endif
  // Portable: bf16 widened to fp32 (exact), then GEMM tiles + scalar min.
  nearest_code_portable(x.to(at::kFloat).contiguous(), cb.to(at::kFloat).contiguous(), metric, ip, dp);
  return {idx, dist};
}

}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) { m.impl("nearest_code", &vqkernels::nearest_code_cpu); }
