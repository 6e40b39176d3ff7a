// Inference linear for a few rows on the CPU: linear_packed (schema in csrc/registration.cpp; the spec is
// F.linear, see vqkernels/ops/linear/__init__.py, which also packs the weight).
//
// y (M, N) = x (M, K) @ W^T + bias, float32, with W (N, K) packed once into column panels:
// w_packed (P, K, 32), P = ceil(N / 32), w_packed[p, k, j] = W[32 p + j, k] (0 past N).
//
// Why: a decoding step multiplies a handful of rows (the batch) by every weight of the model, so it is a
// stream over the weights (100 MB for an 8-layer, width-512 GPT) with 2 M flops per weight read. MKL's
// sgemm at M = 8 reaches about half the machine's read bandwidth there (it packs the weight on every call,
// or reads (out, in) rows with strided stores). Here each panel is one sequential 128-byte-per-k stream,
// read once for all M rows: per k, 2 vector loads of W and M x 2 FMAs into 2 M accumulators, with x's
// column broadcast from a small transposed copy (K, 8) that stays in L1.
//
// Work split: one task per run of panels (output columns), so every output is summed by one thread in
// k order: bit-identical for any thread count. M > 8 loops over blocks of 8 rows inside a panel (the panel
// then comes from L1/L2, not from memory, for the second block).
// AVX-512 is chosen at run time (cpu::has_avx512()); VQKERNELS_CPU_NO_AVX512=1 or a CPU without it runs a
// portable loop of the same order (the compiler vectorises it for the base ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "runtime.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_LINEAR_X86 1
#else
#define VQK_LINEAR_X86 0
#endif

namespace vqkernels {
namespace {

constexpr int64_t kPanel = 32;  // output columns per packed panel (two 16-float vectors)
constexpr int kRows = 8;        // x rows per pass over a panel (2 x 8 accumulators)

// One panel x one block of MB rows: y[m, 0:nn] = sum_k xt[k, m] * wp[k, 0:nn] (+ bias[0:nn]).
// xt (K, kRows) the block's rows transposed; wp (K, kPanel); y row m at y + m * ldy.
template <int MB>
void panel_portable(const float* xt, const float* wp, int64_t K, const float* bias, float* y, int64_t ldy,
                    int64_t nn) {
  float acc[MB][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = wp + k * kPanel;
    const float* xk = xt + k * kRows;
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < kPanel; ++j) acc[m][j] += xk[m] * w[j];
  }
  for (int m = 0; m < MB; ++m)
    for (int64_t j = 0; j < nn; ++j) y[m * ldy + j] = acc[m][j] + (bias ? bias[j] : 0.f);
}

#if VQK_LINEAR_X86 && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
template <int MB>
void panel_avx512(const float* xt, const float* wp, int64_t K, const float* bias, float* y, int64_t ldy,
                  int64_t nn) {
  __m512 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) {
    a0[m] = _mm512_setzero_ps();
    a1[m] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    // ~2 KB ahead: the next panel's lines are on their way while this one is summed
    _mm_prefetch(reinterpret_cast<const char*>(wp + (k + 16) * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wp + (k + 16) * kPanel + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(wp + k * kPanel);
    const __m512 w1 = _mm512_loadu_ps(wp + k * kPanel + 16);
    const float* xk = xt + k * kRows;
    for (int m = 0; m < MB; ++m) {
      const __m512 b = _mm512_set1_ps(xk[m]);
      a0[m] = _mm512_fmadd_ps(b, w0, a0[m]);
      a1[m] = _mm512_fmadd_ps(b, w1, a1[m]);
    }
  }
  const __mmask16 m0 = nn >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nn) - 1);
  const __mmask16 m1 = nn >= 32 ? (__mmask16)0xFFFF : nn > 16 ? (__mmask16)((1u << (nn - 16)) - 1) : (__mmask16)0;
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int m = 0; m < MB; ++m) {
    _mm512_mask_storeu_ps(y + m * ldy, m0, _mm512_add_ps(a0[m], b0));
    _mm512_mask_storeu_ps(y + m * ldy + 16, m1, _mm512_add_ps(a1[m], b1));
  }
}
#pragma GCC pop_options
#endif

using PanelFn = void (*)(const float*, const float*, int64_t, const float*, float*, int64_t, int64_t);

template <int MB>
PanelFn pick(bool avx) {
#if VQK_LINEAR_X86 && defined(__GNUC__)
  if (avx) return &panel_avx512<MB>;
#endif
  (void)avx;
  return &panel_portable<MB>;
}

PanelFn panel_fn(int mb, bool avx) {
  switch (mb) {
    case 1: return pick<1>(avx);
    case 2: return pick<2>(avx);
    case 3: return pick<3>(avx);
    case 4: return pick<4>(avx);
    case 5: return pick<5>(avx);
    case 6: return pick<6>(avx);
    case 7: return pick<7>(avx);
    default: return pick<8>(avx);
  }
}

at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const std::optional<at::Tensor>& bias,
                             int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, "linear_packed: x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(w_packed.dim() == 3 && w_packed.size(2) == kPanel,
              "linear_packed: w_packed must be (P, K, ", kPanel, "), got ", w_packed.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_packed.scalar_type() == at::kFloat,
              "linear_packed: x and w_packed must be float32, got ", x.scalar_type(), " and ",
              w_packed.scalar_type());
  TORCH_CHECK(x.is_contiguous() && w_packed.is_contiguous(), "linear_packed: x and w_packed must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, P = w_packed.size(0);
  TORCH_CHECK(w_packed.size(1) == K, "linear_packed: x has K = ", K, " features but w_packed has ",
              w_packed.size(1));
  TORCH_CHECK(N >= 1 && (N + kPanel - 1) / kPanel == P, "linear_packed: out_features = ", N,
              " does not match w_packed's ", P, " panels of ", kPanel);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "linear_packed: bias must be float32 (", N, ",), got ", bias->scalar_type(), " ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "linear_packed: bias must be contiguous");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (poison_outputs()) y.fill_(std::numeric_limits<float>::quiet_NaN());
  if (M == 0) return y;

  // x's rows in blocks of kRows, each transposed to (K, kRows) (zeros past M), so that a k step reads one
  // contiguous group of row values.
  const int64_t nblk = (M + kRows - 1) / kRows;
  std::vector<float> xt((size_t)(nblk * K * kRows), 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < nblk; ++r)
    for (int64_t m = 0; m < std::min<int64_t>(kRows, M - r * kRows); ++m) {
      const float* row = xp + (r * kRows + m) * K;
      float* dst = xt.data() + r * K * kRows + m;
      for (int64_t k = 0; k < K; ++k) dst[k * kRows] = row[k];
    }

  const bool avx = cpu::has_avx512();
  const float* W = w_packed.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // A task streams at least ~256 KB of weights: below that a thread costs more than it brings.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (K * kPanel * (int64_t)sizeof(float)));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nn = std::min<int64_t>(kPanel, N - p * kPanel);
      const float* wp = W + p * K * kPanel;
      for (int64_t r = 0; r < nblk; ++r) {
        const int mb = (int)std::min<int64_t>(kRows, M - r * kRows);
        panel_fn(mb, avx)(xt.data() + r * K * kRows, wp, K, b ? b + p * kPanel : nullptr,
                          Y + r * kRows * N + p * kPanel, N, nn);
      }
    }
  });
  return y;
}

}  // namespace
}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) { m.impl("linear_packed", &vqkernels::linear_packed_cpu); }
