// residual_vq on the CPU (spec: vqkernels/ops/residual_vq/reference.py). For every row of x (N, D) and
// the stages q of codebooks (Q, K, D): the nearest code (l2 score ||c||^2 - 2 <r, c>, lowest index among
// equal scores, a NaN score never wins) to the residual r_q, which then loses that code.
//
// Design: the rows are cut into fixed blocks of kBlockRows (results do not depend on the thread count).
// A worker copies its block's rows into a residual buffer that stays in L1/L2 for all Q stages, and per
// stage runs the block against the codebook in chunks of kChunkCodes codes: a GEMM (at::mm_out: torch's
// BLAS, MKL here, single-threaded inside our parallel region) writes a cache-sized tile of dot products
// (kBlockRows x kChunkCodes floats), and an AVX2 row-min (8 lanes, strict compare + blend of values and
// indices: each lane keeps its lowest index) turns the tile into a running per-row minimum. The chosen
// code is then subtracted from the residual, added to the block's quantized rows, and (on request) to
// the per-stage statistics. So x is read once, quantized written once, and no N x K (nor N x Q x D)
// buffer exists: the extra memory is the tile and the residual per worker, plus the statistics (one
// (Q, K, D) accumulator per worker, only when asked for).
//  - The score is fmadd(-2, dot, ||c||^2): -2 * dot is exact, so it rounds once exactly as the
//    reference's ||c||^2 - 2 dot does. Which dot product a BLAS computes for a row can differ in the last
//    bits from another BLAS call's (different blocking), so near-ties may resolve differently from the
//    reference; on exactly representable inputs (tests) the results are identical.
//  - sq_err sums each row's float32 squared error in float64, per block in a fixed order: deterministic.
//    The statistics are float32 sums per worker, added together at the end (their last bits may depend on
//    the thread count; the indices, quantized and sq_err do not).
//  - Without AVX2 (__builtin_cpu_supports) a scalar row-min does the same.
// Screened search (AVX-512 CPUs, the same screen as nearest_code: csrc/cpu/search.h): per stage, the
// stage's codebook is prepared once per call by a cpu::Fp32Search (the int8 screen on avx512_vnni, else
// the bf16 one on avx512_bf16: codes quantized with per-panel scales, norms, error bounds), and each
// block's residual rows are quantized per stage and screened; only codes whose rigorous lower bound can
// beat the row's best are rescored exactly in fp32, so the result is the exact argmin of
// fma(-2, <r, c>, ||c||^2) with the lowest index among equal scores (NaN never wins), like the GEMM path
// (whose dots may differ from these in the last bits: near-ties may resolve differently between the
// two paths, exactly representable inputs never do). No centring (centre = false): the scores are those
// of the residual and the codes as given. A stage whose codebook the screen cannot bound (non-finite or
// huge codes, D outside the screens' range) runs the GEMM path; so do CPUs without AVX-512 and
// VQKERNELS_CPU_NO_SCREEN=1. Measured (a training step, fp32, 2 threads, Zen 4; benchmarks/run.py):
// (16384, 256, 8 x 1024) 560-615 ms -> 217-233 ms (int8; bf16 screen: 305 ms), (16384, 128, 32 x 1024)
// 1.14-1.24 s -> 554-561 ms; ~2.2 exact rescores per row and stage on random data.
// Backward (residual_vq_bwd): one pass over the rows, the residual rebuilt stage by stage in a row buffer:
//   grad_x = sum_q J_q^T g + 2 grad_sq_err[q] (r_q - c_q)   (J_q: identity, or the rotation trick's rotation).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_RVQ_X86 1
#else
#define VQK_RVQ_X86 0
#endif

#include "common.h"
#include "cpu/runtime.h"
#include "cpu/search.h"

namespace vqkernels {
namespace {

#ifndef VQK_RVQ_ROWS  // tuning hooks (-DVQK_RVQ_ROWS=...); the defaults are the measured best on Zen 3
#define VQK_RVQ_ROWS 128
#endif
#ifndef VQK_RVQ_CODES
#define VQK_RVQ_CODES 512
#endif
constexpr int64_t kBlockRows = VQK_RVQ_ROWS;
constexpr int64_t kChunkCodes = VQK_RVQ_CODES;

inline float inf_f() { return std::numeric_limits<float>::infinity(); }

// Per-row running minimum over a tile: 8 lanes (value, index) and one scalar candidate for the tail.
struct RowBest {
  float v[8];
  int32_t i[8];
  float tv;
  int32_t ti;
  void reset() {
    for (int l = 0; l < 8; ++l) {
      v[l] = inf_f();
      i[l] = 0;
    }
    tv = inf_f();
    ti = 0;
  }
  // the lowest (value, index) pair; a row whose scores are all +inf/NaN keeps index 0
  int32_t finish() const {
    float bv = tv;
    int32_t bi = ti;
    for (int l = 0; l < 8; ++l) {
      if (v[l] < bv || (v[l] == bv && i[l] < bi)) {
        bv = v[l];
        bi = i[l];
      }
    }
    return bi;
  }
};

void rowmin_scalar(const float* dots, const float* cn, int64_t kc, int32_t k0, RowBest& b) {
  // the lanes are not used: the scalar candidate alone (strict <: the earlier index keeps a tie, NaN never wins)
  float bv = b.tv;
  int32_t bi = b.ti;
  for (int64_t j = 0; j < kc; ++j) {
    const float s = std::fma(-2.f, dots[j], cn[j]);
    if (s < bv) {
      bv = s;
      bi = k0 + (int32_t)j;
    }
  }
  b.tv = bv;
  b.ti = bi;
}

#if VQK_RVQ_X86 && defined(__GNUC__)
#define VQK_AVX2 __attribute__((target("avx2,fma")))

VQK_AVX2 void rowmin_avx2(const float* dots, const float* cn, int64_t kc, int32_t k0, RowBest& b) {
  __m256 bv = _mm256_loadu_ps(b.v);
  __m256i bi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.i));
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(k0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 m2 = _mm256_set1_ps(-2.f);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t j = 0;
  // two independent 8-wide steps per iteration hide part of the compare/blend latency
  for (; j + 16 <= kc; j += 16) {
    const __m256 s0 = _mm256_fmadd_ps(m2, _mm256_loadu_ps(dots + j), _mm256_loadu_ps(cn + j));
    const __m256 s1 = _mm256_fmadd_ps(m2, _mm256_loadu_ps(dots + j + 8), _mm256_loadu_ps(cn + j + 8));
    const __m256 lt0 = _mm256_cmp_ps(s0, bv, _CMP_LT_OQ);  // ordered: NaN never wins
    bv = _mm256_blendv_ps(bv, s0, lt0);
    bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), lt0));
    idx = _mm256_add_epi32(idx, step);
    const __m256 lt1 = _mm256_cmp_ps(s1, bv, _CMP_LT_OQ);
    bv = _mm256_blendv_ps(bv, s1, lt1);
    bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), lt1));
    idx = _mm256_add_epi32(idx, step);
  }
  for (; j + 8 <= kc; j += 8) {
    const __m256 s0 = _mm256_fmadd_ps(m2, _mm256_loadu_ps(dots + j), _mm256_loadu_ps(cn + j));
    const __m256 lt0 = _mm256_cmp_ps(s0, bv, _CMP_LT_OQ);
    bv = _mm256_blendv_ps(bv, s0, lt0);
    bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), lt0));
    idx = _mm256_add_epi32(idx, step);
  }
  _mm256_storeu_ps(b.v, bv);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(b.i), bi);
  if (j < kc) rowmin_scalar(dots + j, cn + j, kc - j, k0 + (int32_t)j, b);
}

bool cpu_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !cpu::env_flag("VQKERNELS_CPU_NO_AVX2");
  return ok;
}
#else
void rowmin_avx2(const float* dots, const float* cn, int64_t kc, int32_t k0, RowBest& b) {
  rowmin_scalar(dots, cn, kc, k0, b);
}
bool cpu_avx2() { return false; }
#endif

void check_fwd_args(const at::Tensor& x, const at::Tensor& codebooks) {
  TORCH_CHECK(x.device().is_cpu() && codebooks.device().is_cpu(),
              "cpu residual_vq: x and codebooks must be CPU tensors, got ", x.device(), " and ", codebooks.device());
  TORCH_CHECK(x.dim() == 2, "cpu residual_vq: x must be 2-D (N, D), got ", x.dim(), "-D");
  TORCH_CHECK(codebooks.dim() == 3, "cpu residual_vq: codebooks must be 3-D (Q, K, D), got ", codebooks.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && codebooks.scalar_type() == at::kFloat,
              "cpu residual_vq: x and codebooks must be float32, got ", x.scalar_type(), " and ",
              codebooks.scalar_type());
  TORCH_CHECK(x.size(1) == codebooks.size(2), "cpu residual_vq: x has D=", x.size(1), " but codebooks have D=",
              codebooks.size(2));
  TORCH_CHECK(codebooks.size(0) >= 1 && codebooks.size(1) >= 1,
              "cpu residual_vq: codebooks must hold at least one stage of at least one code, got shape ",
              codebooks.sizes());
  TORCH_CHECK(codebooks.size(1) <= std::numeric_limits<int32_t>::max(),
              "cpu residual_vq: at most 2^31 - 1 codes per stage");
}

at::Tensor new_out(at::IntArrayRef shape, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(shape, opt);
  if (poison_outputs()) {
    if (t.is_floating_point())
      t.fill_(std::numeric_limits<float>::quiet_NaN());
    else
      t.fill_(-0x7EADBEEF);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_vq_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& codebooks_in, bool need_stats) {
  check_fwd_args(x_in, codebooks_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cbs = codebooks_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), Q = cbs.size(0), K = cbs.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out_idx = new_out({N, Q}, x.options().dtype(at::kLong));
  at::Tensor out_q = new_out({N, D}, f32);
  at::Tensor out_err = new_out({Q}, f32);
  at::Tensor counts = need_stats ? at::zeros({Q, K}, f32) : at::empty({0}, f32);
  at::Tensor sums = need_stats ? at::zeros({Q, K, D}, f32) : at::empty({0}, f32);

  const float* xp = x.data_ptr<float>();
  const float* cp = cbs.data_ptr<float>();
  int64_t* ip = out_idx.data_ptr<int64_t>();
  float* qp = out_q.data_ptr<float>();
  // ||c||^2 of every code, in the reference's float32 order is not needed: any float32 rounding of the
  // norm is shared by every row, and rows compare scores of the same code set
  std::vector<float> cnorm((size_t)(Q * K));
  at::parallel_for(0, Q * K, 256, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const float* c = cp + k * D;
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += c[d] * c[d];
      cnorm[(size_t)k] = s;
    }
  });

  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;
  std::vector<double> block_err((size_t)(nblocks * Q), 0.0);
  std::mutex stats_mutex;
  float* counts_p = need_stats ? counts.data_ptr<float>() : nullptr;
  float* sums_p = need_stats ? sums.data_ptr<float>() : nullptr;
  const bool avx2 = cpu_avx2();
  const int64_t KC = std::min<int64_t>(K, kChunkCodes);

  // The screened search per stage (see the header), where the CPU and the stage's codebook allow it.
  std::vector<std::unique_ptr<cpu::Fp32Search>> screens((size_t)Q);
  if (N > 0 && cpu::has_avx512() && !cpu::env_flag("VQKERNELS_CPU_NO_SCREEN")) {
    for (int64_t q = 0; q < Q; ++q) {
      auto s = std::make_unique<cpu::Fp32Search>(cbs.select(0, q), kL2, /*centre=*/false);
      if (s->screened()) screens[(size_t)q] = std::move(s);
    }
  }
  constexpr int64_t kSB = cpu::kSearchBlockRows;

  cpu::parallel_blocks(nblocks, (double)N * (double)K * (double)D * (double)Q, [&](const std::function<int64_t()>& next) {
    std::vector<float> resid((size_t)(kBlockRows * D));
    std::vector<float> quant((size_t)(kBlockRows * D));
    std::vector<float> tile((size_t)(kBlockRows * KC));
    std::vector<RowBest> best((size_t)kBlockRows);
    std::vector<int32_t> chosen((size_t)kBlockRows);
    std::vector<int64_t> sidx((size_t)kBlockRows);
    std::vector<float> sdist((size_t)kBlockRows);
    using ScratchPtr = std::unique_ptr<cpu::Fp32Search::Scratch, void (*)(cpu::Fp32Search::Scratch*)>;
    std::vector<ScratchPtr> scratch;
    scratch.reserve((size_t)Q);
    for (int64_t q = 0; q < Q; ++q)
      scratch.emplace_back(screens[(size_t)q] ? screens[(size_t)q]->scratch() : ScratchPtr(nullptr, nullptr));
    std::vector<float> my_counts, my_sums;
    if (need_stats) {
      my_counts.assign((size_t)(Q * K), 0.f);
      my_sums.assign((size_t)(Q * K * D), 0.f);
    }
    bool touched = false;
    for (int64_t blk = next(); blk >= 0; blk = next()) {
      touched = true;
      const int64_t n0 = blk * kBlockRows;
      const int64_t nr = std::min(kBlockRows, N - n0);
      std::memcpy(resid.data(), xp + n0 * D, sizeof(float) * (size_t)(nr * D));
      std::fill(quant.begin(), quant.begin() + nr * D, 0.f);
      for (int64_t q = 0; q < Q; ++q) {
        const float* cq = cp + q * K * D;
        const float* cnq = cnorm.data() + q * K;
        if (screens[(size_t)q]) {  // the screen, kSearchBlockRows rows at a time
          for (int64_t h = 0; h < nr; h += kSB)
            screens[(size_t)q]->search(resid.data() + h * D, D, std::min(kSB, nr - h), sidx.data() + h,
                                       sdist.data() + h, *scratch[(size_t)q]);
          for (int64_t r = 0; r < nr; ++r) chosen[(size_t)r] = (int32_t)sidx[(size_t)r];
        } else {
          for (int64_t r = 0; r < nr; ++r) best[(size_t)r].reset();
          for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = std::min(KC, K - k0);
            // tile (nr x kc, row-major) = resid (nr x D) . cq[k0 : k0 + kc]^T, through torch's BLAS (inside
            // our parallel region it runs on this thread only)
            at::Tensor t_out = at::from_blob(tile.data(), {nr, kc}, f32);
            at::mm_out(t_out, at::from_blob(resid.data(), {nr, D}, f32),
                       at::from_blob(const_cast<float*>(cq + k0 * D), {kc, D}, f32).t());
            for (int64_t r = 0; r < nr; ++r) {
              if (avx2)
                rowmin_avx2(tile.data() + r * kc, cnq + k0, kc, (int32_t)k0, best[(size_t)r]);
              else
                rowmin_scalar(tile.data() + r * kc, cnq + k0, kc, (int32_t)k0, best[(size_t)r]);
            }
          }
          for (int64_t r = 0; r < nr; ++r) chosen[(size_t)r] = best[(size_t)r].finish();
        }
        double err = 0.0;
        for (int64_t r = 0; r < nr; ++r) {
          const int32_t k = chosen[(size_t)r];
          ip[(n0 + r) * Q + q] = k;
          const float* c = cq + (int64_t)k * D;
          float* rr = resid.data() + r * D;
          float* qq = quant.data() + r * D;
          float e = 0.f;
          if (need_stats) {
            float* s = my_sums.data() + (q * K + k) * D;
            for (int64_t d = 0; d < D; ++d) s[d] += rr[d];
            my_counts[(size_t)(q * K + k)] += 1.f;
          }
          for (int64_t d = 0; d < D; ++d) {
            const float diff = rr[d] - c[d];
            e += diff * diff;
            qq[d] += c[d];
            rr[d] = diff;
          }
          err += (double)e;
        }
        block_err[(size_t)(blk * Q + q)] = err;
      }
      std::memcpy(qp + n0 * D, quant.data(), sizeof(float) * (size_t)(nr * D));
    }
    if (need_stats && touched) {
      std::lock_guard<std::mutex> lock(stats_mutex);
      for (size_t i = 0; i < my_counts.size(); ++i) counts_p[i] += my_counts[i];
      for (size_t i = 0; i < my_sums.size(); ++i) sums_p[i] += my_sums[i];
    }
  });

  float* ep = out_err.data_ptr<float>();
  for (int64_t q = 0; q < Q; ++q) {
    double s = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) s += block_err[(size_t)(b * Q + q)];
    ep[q] = (float)s;
  }
  return {out_idx, out_q, out_err, counts, sums};
}

at::Tensor residual_vq_bwd_cpu(const at::Tensor& grad_q_in, const at::Tensor& grad_err_in, const at::Tensor& x_in,
                               const at::Tensor& codebooks_in, const at::Tensor& indices_in, bool rotation) {
  check_fwd_args(x_in, codebooks_in);
  const int64_t N = x_in.size(0), D = x_in.size(1), Q = codebooks_in.size(0), K = codebooks_in.size(1);
  TORCH_CHECK(grad_q_in.dim() == 2 && grad_q_in.size(0) == N && grad_q_in.size(1) == D &&
                  grad_q_in.scalar_type() == at::kFloat && grad_q_in.device().is_cpu(),
              "cpu residual_vq_bwd: grad_quantized must be a float32 CPU tensor of x's shape ", x_in.sizes(),
              ", got ", grad_q_in.sizes(), " ", grad_q_in.scalar_type());
  TORCH_CHECK(grad_err_in.dim() == 1 && grad_err_in.size(0) == Q && grad_err_in.scalar_type() == at::kFloat &&
                  grad_err_in.device().is_cpu(),
              "cpu residual_vq_bwd: grad_sq_err must be a float32 CPU tensor of shape (Q,) = (", Q, ",), got ",
              grad_err_in.sizes(), " ", grad_err_in.scalar_type());
  TORCH_CHECK(indices_in.dim() == 2 && indices_in.size(0) == N && indices_in.size(1) == Q &&
                  indices_in.scalar_type() == at::kLong && indices_in.device().is_cpu(),
              "cpu residual_vq_bwd: indices must be an int64 CPU tensor of shape (N, Q) = (", N, ", ", Q,
              "), got ", indices_in.sizes(), " ", indices_in.scalar_type());
  const at::Tensor g = grad_q_in.contiguous(), ge = grad_err_in.contiguous(), x = x_in.contiguous();
  const at::Tensor cbs = codebooks_in.contiguous(), idx = indices_in.contiguous();
  at::Tensor out = new_out({N, D}, x.options());
  const float* gp = g.data_ptr<float>();
  const float* gep = ge.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* cp = cbs.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kRows = 64;
  const int64_t nblocks = (N + kRows - 1) / kRows;
  cpu::parallel_blocks(nblocks, (double)N * (double)D * (double)Q * 8.0, [&](const std::function<int64_t()>& next) {
    std::vector<float> r((size_t)D), acc((size_t)D);
    for (int64_t blk = next(); blk >= 0; blk = next()) {
      const int64_t n1 = std::min(N, (blk + 1) * kRows);
      for (int64_t n = blk * kRows; n < n1; ++n) {
        const float* gn = gp + n * D;
        std::memcpy(r.data(), xp + n * D, sizeof(float) * (size_t)D);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t k = ip[n * Q + q];
          TORCH_CHECK_INDEX(k >= 0 && k < K, "cpu residual_vq_bwd: index ", k, " of row ", n, ", stage ", q,
                            " is outside [0, ", K, ")");
          const float* c = cp + (q * K + k) * D;
          const float two_ge = 2.f * gep[q];
          if (rotation) {
            // vector-quantize-pytorch's rotate_to at fixed (r, c): u = r/|r|, qh = c/|c|, w = (u + qh)/|u + qh|,
            // s = |c|/|r| (norms clamped at 1e-6); J^T g = s (g - 2 <g, w> w + 2 <g, qh> u)
            float rr = 0.f, cc = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              rr += r[(size_t)d] * r[(size_t)d];
              cc += c[d] * c[d];
            }
            const float nr = std::max(std::sqrt(rr), 1e-6f), nc_raw = std::sqrt(cc);
            const float nc = std::max(nc_raw, 1e-6f);
            float ww = 0.f, gu = 0.f, gq = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              const float u = r[(size_t)d] / nr, qh = c[d] / nc;
              const float w = u + qh;
              ww += w * w;
              gu += gn[d] * u;
              gq += gn[d] * qh;
            }
            const float nw = std::max(std::sqrt(ww), 1e-6f);
            float gw = 0.f;
            for (int64_t d = 0; d < D; ++d) {
              const float w = (r[(size_t)d] / nr + c[d] / nc) / nw;
              gw += gn[d] * w;
            }
            const float s = nc_raw / nr;
            for (int64_t d = 0; d < D; ++d) {
              const float u = r[(size_t)d] / nr, qh = c[d] / nc;
              const float w = (u + qh) / nw;
              const float diff = r[(size_t)d] - c[d];
              acc[(size_t)d] += s * (gn[d] - 2.f * gw * w + 2.f * gq * u) + two_ge * diff;
              r[(size_t)d] = diff;
            }
            (void)gu;
          } else {
            for (int64_t d = 0; d < D; ++d) {
              const float diff = r[(size_t)d] - c[d];
              acc[(size_t)d] += gn[d] + two_ge * diff;
              r[(size_t)d] = diff;
            }
          }
        }
        std::memcpy(op + n * D, acc.data(), sizeof(float) * (size_t)D);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) {
  m.impl("residual_vq_fwd", &vqkernels::residual_vq_fwd_cpu);
  m.impl("residual_vq_bwd", &vqkernels::residual_vq_bwd_cpu);
}
