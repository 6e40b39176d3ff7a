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

// Hooks for tests and benchmarks: VQKERNELS_CPU_NO_AVX512=1 forces the portable path,
// VQKERNELS_CPU_NO_BF16DP=1 forces bf16 through the portable path even with avx512_bf16.
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

bool cpu_avx512() {
#if VQK_X86 && defined(__GNUC__)
  static const bool ok = !env_flag("VQKERNELS_CPU_NO_AVX512") && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool cpu_avx512_bf16() {
#if VQK_X86 && defined(__GNUC__)
  static const bool ok =
      cpu_avx512() && !env_flag("VQKERNELS_CPU_NO_BF16DP") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// Final distance from the best score (mirrors the reference; NaN passes through the clamp).
inline float finish_distance(int64_t metric, float xnorm, float best) {
  if (metric == kL2) {
    const float v = xnorm + best;
    return v < 0.f ? 0.f : v;
  }
  return 1.f + best;
}

// Runs worker(next) on up to torch.get_num_threads() threads; next() hands out the block indices
// 0..nblocks-1 once each (dynamic scheduling: the cores are shared, a static split would wait for
// the slowest thread), then -1. Block boundaries are fixed by the caller, so results do not depend
// on the thread count or on which thread ran which block.
// Built with -fopenmp this runs on torch's OpenMP pool through at::parallel_for. Without it,
// at::parallel_for (a header template around `#pragma omp parallel`) would silently run serially,
// so the extra threads are std::threads (cost ~20 us each; small problems stay on one thread).
template <typename F>
void parallel_blocks(int64_t nblocks, double work, const F& worker) {
  std::atomic<int64_t> counter{0};
  const std::function<int64_t()> next = [&counter, nblocks]() -> int64_t {
    const int64_t b = counter.fetch_add(1, std::memory_order_relaxed);
    return b < nblocks ? b : -1;
  };
  int64_t nt = at::in_parallel_region() ? 1 : (int64_t)at::get_num_threads();
  nt = std::min<int64_t>(nt, nblocks);
  if (work < 4.0e6) nt = 1;  // ~1 ms of work or less: threads cost more than they bring
  if (nt <= 1) {
    worker(next);
    return;
  }
#ifdef _OPENMP
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { worker(next); });
#else
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors((size_t)nt);
  threads.reserve((size_t)(nt - 1));
  for (int64_t t = 1; t < nt; ++t) {
    threads.emplace_back([&, t]() {
      try {
        worker(next);
      } catch (...) {
        errors[(size_t)t] = std::current_exception();
      }
    });
  }
  try {
    worker(next);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : threads) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
#endif
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

// Pack codes [k0, k0+32) of a bf16 codebook into one panel [Dp/2][32][2] (zero padding).
void pack_panel_bf16(const c10::BFloat16* cb, int64_t K, int64_t D, int64_t Dp, int64_t k0,
                     c10::BFloat16* out) {
  const int64_t nk = std::min(kPanel, K - k0);
  const c10::BFloat16 zero(0.f);
  for (int64_t i = 0; i < Dp / 2; ++i) {
    c10::BFloat16* o = out + i * 2 * kPanel;
    for (int64_t j = 0; j < kPanel; ++j) {
      const bool in = j < nk;
      const int64_t d0 = 2 * i, d1 = 2 * i + 1;
      o[2 * j] = (in && d0 < D) ? cb[(k0 + j) * D + d0] : zero;
      o[2 * j + 1] = (in && d1 < D) ? cb[(k0 + j) * D + d1] : zero;
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

template <typename T>
void nearest_code_avx512(const at::Tensor& x, const at::Tensor& cb, int64_t metric, int64_t* out_idx,
                         float* out_dist) {
  constexpr bool kBF16 = std::is_same<T, c10::BFloat16>::value;
  const int64_t N = x.size(0), K = cb.size(0), D = x.size(1);
  const int64_t Dp = kBF16 ? (D + 1) / 2 * 2 : D;  // bf16: pairs
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
      if constexpr (kBF16) {
        pack_panel_bf16(cbp, K, D, Dp, p * kPanel, packed + p * kPanel * Dp);
      } else {
        pack_panel_f32(cbp, K, D, p * kPanel, packed + p * kPanel * Dp);
      }
      for (int64_t j = p * kPanel; j < (p + 1) * kPanel; ++j) {
        if (j >= K) {
          bias[j] = inf_f();
        } else if (metric == kL2) {
          if constexpr (kBF16) bias[j] = sqnorm_bf16(cbp + j * D, D);
          else bias[j] = sqnorm_f32(cbp + j * D, D);
        } else {
          bias[j] = 0.f;
        }
      }
    }
  });

  const float alpha = metric == kL2 ? -2.f : -1.f;
  const int64_t elem = kBF16 ? 2 : 4;
  const int64_t chunk_panels = std::max<int64_t>(1, kChunkBytes / (kPanel * Dp * elem));
  const bool need_copy = kBF16 && (Dp != D);  // odd D in bf16: rows are copied with a zero pad
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;

  const double work = (double)N * (double)Kp * (double)Dp;
  parallel_blocks(nblocks, work, [&](const std::function<int64_t()>& next) {
    std::vector<float> best((size_t)(kBlockRows * 16));
    std::vector<int32_t> bpan((size_t)(kBlockRows * 16));
    std::vector<T> xpad((size_t)(kRows * Dp));  // padded copy of a row group (tail rows, odd D in bf16)
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
        float xn;
        if constexpr (kBF16) {
          isa_avx512bf16::resolve_row<T>(xrow, Dp, packed, bias.data(), alpha, best.data() + r * 16,
                                         bpan.data() + r * 16, &v, &i);
          xn = sqnorm_bf16(xrow, D);
        } else {
          isa_avx512::resolve_row<T>(xrow, Dp, packed, bias.data(), alpha, best.data() + r * 16,
                                     bpan.data() + r * 16, &v, &i);
          xn = sqnorm_f32(xrow, D);
        }
        out_idx[n0 + r] = i;
        out_dist[n0 + r] = finish_distance(metric, xn, v);
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
    nearest_code_avx512<float>(x, cb, metric, ip, dp);
    return {idx, dist};
  }
  if (x.scalar_type() == at::kBFloat16 && cpu_avx512_bf16()) {
    nearest_code_avx512<c10::BFloat16>(x, cb, metric, ip, dp);
    return {idx, dist};
  }
#endif
  // Portable: bf16 widened to fp32 (exact), then GEMM tiles + scalar min.
  nearest_code_portable(x.to(at::kFloat).contiguous(), cb.to(at::kFloat).contiguous(), metric, ip, dp);
  return {idx, dist};
}

}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) { m.impl("nearest_code", &vqkernels::nearest_code_cpu); }
