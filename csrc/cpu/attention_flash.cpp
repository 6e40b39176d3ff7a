// Flash attention on the CPU: attention_fwd and attention_bwd (schemas in csrc/registration.cpp; the spec is
// attention_fwd_reference / attention_bwd_reference in vqkernels/ops/attention/reference.py).
//
// q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh), H % Hkv == 0 (query head h reads kv head h / (H / Hkv), never
// expanded); any strides with a unit last-dim stride (read in place: a (B, T, H, Dh) view of a fused projection
// costs nothing). Causal masks are bottom-right aligned: query i sees keys j <= i + Tk - Tq; a query that sees
// no key outputs 0, has lse -inf and gets zero gradients.
//
// Why this beats PyTorch's own CPU flash kernel (and an explicit masked softmax):
//  * the GEMMs are big: a block of BM = 64 queries against all its visible keys at once (up to kKeyChunk keys
//    per step: the score tile stays in L2), so MKL's sgemm runs near peak, where small (qSplit x kvSplit)
//    tiles lose to call overhead and packing;
//  * a causal block only touches keys up to its last row's diagonal (nothing past it is computed);
//  * the softmax passes are AVX-512 (a polynomial exp, ~2 ulp) over rows that sit in cache;
//  * the backward (FlashAttention-2: P recomputed from lse, delta = rowsum(dO * O)) runs one task per
//    (b, query head) that holds dk/dv of its whole head in fp32 (L2-resident at these sizes) and dq of one
//    query block: no atomics, no Tq x Tk matrix, and no reduction across threads. Grouped heads write per-head
//    dk/dv that a fixed-order loop sums afterwards, so results are bit-identical for any thread count.
// GEMMs: MKL's sgemm_ (found at run time in the process: torch's x86 builds link MKL) on one thread per task;
// without it, at::mm on the same tiles (correct, slower).
// bfloat16: where MKL's cblas_gemm_bf16bf16f32 is in the process, the GEMMs take bfloat16 operands (AMX tiles on
// Sapphire Rapids, 2-4x sgemm's rate on these tiles) and accumulate in float32: q, k, v, dO are read as they
// are; P and dS are rounded to bfloat16 for the GEMMs they feed (as PyTorch's explicit bfloat16 attention
// rounds them), while the softmax, its statistics, delta and the dq/dk/dv accumulators stay float32.
// Otherwise (and for float16) the inputs are widened to float32 once (a T x Dh pass, cheap next to the
// T^2 x Dh work) and run the float32 kernel.
// The elementwise passes are AVX-512 where the CPU has it (cpu::has_avx512()); else portable loops.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define VQK_FLASH_DLSYM 1
#else
#define VQK_FLASH_DLSYM 0
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_FLASH_X86 1
#else
#define VQK_FLASH_X86 0
#endif

#include "runtime.h"
#include "simd_avx512.h"

namespace vqkernels {
namespace {

constexpr int64_t kQueryBlock = 64;   // query rows per task (forward) / per step (backward)
constexpr int64_t kKeyChunk = 512;    // keys per GEMM step: a 64 x 512 fp32 score tile is 128 KiB (L2)
// (Measured at (4, 16, 1024, 64) fp32, one thread: 128, 256, 512 and 1024 keys per step within the noise.)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------
// GEMM on row-major tiles: C (m x n, ldc) = alpha op(A) op(B) + beta C, A/B row-major with row strides lda/ldb.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using mkl_threads_fn = int (*)(int);

struct Blas {
  sgemm_fn sgemm = nullptr;
  mkl_threads_fn set_threads_local = nullptr;
};

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
#if VQK_FLASH_DLSYM
    // LP64 sgemm_ (32-bit ints). Only MKL's is taken: its name tells us the ABI (an ILP64 OpenBLAS also
    // exports sgemm_ with 64-bit ints; with MKL present, its C entry MKL_Set_Num_Threads_Local exists too).
    // VQKERNELS_CPU_NO_MKL=1 (read once per process) takes the at::mm path: for tests.
    if (cpu::env_flag("VQKERNELS_CPU_NO_MKL")) return r;
    r.set_threads_local = reinterpret_cast<mkl_threads_fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    if (r.set_threads_local) r.sgemm = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
#endif
    return r;
  }();
  return b;
}

void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const Blas& bl = blas();
  const int64_t big = std::max({m, n, k, lda, ldb, ldc});
  if (bl.sgemm && k > 0 && big <= (int64_t)std::numeric_limits<int>::max()) {  // (LP64: 32-bit sizes)
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
    const int M = (int)n, N = (int)m, K = (int)k, LDA = (int)ldb, LDB = (int)lda, LDC = (int)ldc;
    const char TA = tb ? 'T' : 'N', TB = ta ? 'T' : 'N';
    bl.sgemm(&TA, &TB, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
    return;
  }
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = ta ? at::from_blob(const_cast<float*>(A), {k, m}, {lda, 1}, opt).t()
                    : at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, opt);
  at::Tensor b = tb ? at::from_blob(const_cast<float*>(B), {n, k}, {ldb, 1}, opt).t()
                    : at::from_blob(const_cast<float*>(B), {k, n}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  if (beta == 0.f) {
    at::mm_out(c, a, b);
    if (alpha != 1.f) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// One thread for MKL inside a task (the tasks are the parallelism); restored when the worker ends.
struct BlasOneThread {
  int prev = -1;
  BlasOneThread() {
    if (blas().set_threads_local) prev = blas().set_threads_local(1);
  }
  ~BlasOneThread() {
    if (blas().set_threads_local) blas().set_threads_local(prev);
  }
};

using bf16 = c10::BFloat16;

// The same GEMM on bfloat16 operands, float32 C (MKL's cblas_gemm_bf16bf16f32, row-major; the caller has
// checked that it exists and that every size fits its 32-bit ints).
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const bf16* A, int64_t lda,
             const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cpu::mkl_bf16_gemm()(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, (int)m, (int)n, (int)k, alpha,
                       reinterpret_cast<const uint16_t*>(A), (int)lda, reinterpret_cast<const uint16_t*>(B),
                       (int)ldb, beta, C, (int)ldc);
}

// ------------------------------------------------------------------------------------------------
// Row passes. Each has an AVX-512 version and a portable one of the same arithmetic order where it matters.

namespace portable {
using cpu::portable::dot;
using cpu::portable::exp_sub_sum;  // x[i] = exp(x[i] - c); returns the sum
using cpu::portable::row_max;
using cpu::portable::scale_row;
// d[i] = p[i] * (d[i] - delta)
inline void ds_row(const float* p, float* d, float delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = p[i] * (d[i] - delta);
}
// y[i] = x[i] rounded to bfloat16 (to nearest even)
inline void to_bf16(const float* x, c10::BFloat16* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = c10::BFloat16(x[i]);
}
}  // namespace portable

#if VQK_FLASH_X86 && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
using cpu::avx512::dot;
using cpu::avx512::exp_sub_sum;
using cpu::avx512::row_max;
using cpu::avx512::scale_row;
using cpu::avx512::tail_mask;

inline void ds_row(const float* p, float* d, float delta, int64_t n) {
  const __m512 vd = _mm512_set1_ps(delta);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(d + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + i),
                                                  _mm512_sub_ps(_mm512_maskz_loadu_ps(k, d + i), vd)));
  }
}
inline void to_bf16(const float* x, c10::BFloat16* y, int64_t n) {
  // round to nearest even on the bits (P and dS are finite), keep the high half
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(k, x + i));
    const __m512i r = _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(b, 16), one));
    const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(b, r), 16));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(y + i), k, h);
  }
}
}  // namespace avx512
#pragma GCC pop_options
#define VQK_ROW(avx, f, ...) ((avx) ? avx512::f(__VA_ARGS__) : portable::f(__VA_ARGS__))
#else
#define VQK_ROW(avx, f, ...) portable::f(__VA_ARGS__)
#endif

// ------------------------------------------------------------------------------------------------

struct Problem {
  int64_t B, H, Hkv, G, Tq, Tk, Dh;
  bool causal;
  float scale;
  int64_t r0;  // first query row that sees a key (causal with Tq > Tk: the rows before see none)
  // Strides (elements) of q, k, v over (b, h, t); the last dimension is unit-stride.
  int64_t sq[3], sk[3], sv[3];
  // Number of keys visible to rows [i0, i1): all keys, or (causal) those up to the last row's diagonal.
  int64_t kend(int64_t i1) const { return causal ? std::min(Tk, i1 - 1 + Tk - Tq + 1) : Tk; }
  // Causal: mask S (m x n at keys j0..) rows i0.. where j > i + Tk - Tq, when the chunk crosses a diagonal.
  void mask(float* S, int64_t lds, int64_t i0, int64_t m, int64_t j0, int64_t n) const {
    if (!causal) return;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t first_hidden = i0 + r + Tk - Tq + 1 - j0;  // columns >= this are masked
      for (int64_t c = std::max<int64_t>(first_hidden, 0); c < n; ++c) S[r * lds + c] = kNegInf;
    }
  }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  Problem p;
  p.B = q.size(0), p.H = q.size(1), p.Tq = q.size(2), p.Dh = q.size(3);
  p.Hkv = k.size(1), p.Tk = k.size(2);
  p.G = p.H / p.Hkv;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.r0 = causal ? std::max<int64_t>(0, p.Tq - p.Tk) : 0;
  for (int i = 0; i < 3; ++i) p.sq[i] = q.stride(i), p.sk[i] = k.stride(i), p.sv[i] = v.stride(i);
  return p;
}

// A tensor of element type T (float or bfloat16) the kernels can read in place: unit last-dim stride and row
// stride >= Dh (BLAS's rule).
template <typename T>
at::Tensor readable(const at::Tensor& t) {
  constexpr auto st = std::is_same_v<T, float> ? at::kFloat : at::kBFloat16;
  at::Tensor f = t.scalar_type() == st ? t : t.to(st);
  if ((f.stride(3) != 1 && f.size(3) > 1) || (f.stride(2) < f.size(3) && f.size(2) > 1)) f = f.contiguous();
  return f;
}

// The (B, T, H, Dh) buffer viewed (B, H, T, Dh): the layout the cpu backend's gradients promise (see __init__.py).
at::Tensor bthd(int64_t B, int64_t H, int64_t T, int64_t D, at::ScalarType dt, const at::Device& dev) {
  return at::empty({B, T, H, D}, at::TensorOptions().dtype(dt).device(dev)).transpose(1, 2);
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, T, Dh)");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q and k must share B and Dh");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": float32, float16 or bfloat16 expected, got ", dt);
}

// Whether bfloat16 inputs run on bfloat16 GEMMs: MKL's bf16 GEMM is in the process and every size and row
// stride fits its 32-bit ints.
bool native_bf16(std::initializer_list<const at::Tensor*> ts) {
  if ((*ts.begin())->scalar_type() != at::kBFloat16 || !cpu::mkl_bf16_gemm()) return false;
  const int64_t lim = std::numeric_limits<int>::max();
  for (const at::Tensor* t : ts)
    if (t->size(2) > lim || t->size(3) > lim || t->stride(2) > lim) return false;
  return true;
}

// GEMM operand of element type T from a float32 tile: the tile itself, or (bfloat16) its rounding in scratch.
template <typename T>
const T* operand(const float* x, int64_t count, std::vector<T>& scratch, bool avx) {
  if constexpr (std::is_same_v<T, float>) {
    (void)count, (void)scratch, (void)avx;
    return x;
  } else {
    VQK_ROW(avx, to_bf16, x, scratch.data(), count);
    return scratch.data();
  }
}

// sum_i a[i] b[i] in float32 (bfloat16 rows are widened into tmp, 2 n floats).
template <typename T>
float row_dot(const T* a, const T* b, int64_t n, bool avx, float* tmp) {
  if constexpr (std::is_same_v<T, float>) {
    (void)tmp;
    return VQK_ROW(avx, dot, a, b, n);
  } else {
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(a[i]), tmp[n + i] = static_cast<float>(b[i]);
    return VQK_ROW(avx, dot, tmp, tmp + n, n);
  }
}

// n float32 values into a row of float32, or of bfloat16 (rounded to nearest even).
inline void store_row(char* dst, bool bf, const float* src, int64_t n, bool avx) {
  if (bf)
    VQK_ROW(avx, to_bf16, src, reinterpret_cast<bf16*>(dst), n);
  else
    std::memcpy(dst, src, sizeof(float) * n);
}

double task_work(const Problem& p) {  // multiply-adds of the whole problem (for the threading threshold)
  const double pairs = (double)p.Tq * p.Tk * (p.causal ? 0.5 : 1.0);
  return (double)p.B * p.H * pairs * p.Dh * 2.0;
}

// ------------------------------------------------------------------------------------------------
// Forward: task = (b, h, block of kQueryBlock queries); online softmax over chunks of kKeyChunk keys.

template <typename T>
std::tuple<at::Tensor, at::Tensor> flash_fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, bool causal, double scale) {
  const at::Tensor q = readable<T>(q_in), k = readable<T>(k_in), v = readable<T>(v_in);
  const Problem p = make_problem(q, k, v, causal, scale);
  const bool wide = q_in.scalar_type() != at::kFloat;
  at::Tensor out = at::empty_like(q_in, q_in.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.B, p.H, p.Tq}, q_in.options().dtype(at::kFloat));
  const int64_t so[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const int64_t Dh = p.Dh;
  const int64_t live = p.Tq - p.r0;
  const int64_t nqb = (live + kQueryBlock - 1) / kQueryBlock;
  const int64_t ntasks = p.B * p.H * nqb;
  const bool avx = cpu::has_avx512();

  // Rows that see no key: 0 and -inf.
  if (p.r0 > 0)
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.H; ++h)
        for (int64_t i = 0; i < p.r0; ++i) {
          std::fill_n(O + b * so[0] + h * so[1] + i * so[2], Dh, 0.f);
          L[(b * p.H + h) * p.Tq + i] = kNegInf;
        }

  cpu::parallel_blocks(ntasks, task_work(p) / 3.0, [&](const std::function<int64_t()>& next) {
    BlasOneThread one;
    std::vector<float> S((size_t)(kQueryBlock * kKeyChunk)), acc((size_t)(kQueryBlock * Dh));
    std::vector<T> Pb(std::is_same_v<T, float> ? 0 : (size_t)(kQueryBlock * kKeyChunk));
    float mrow[kQueryBlock], lrow[kQueryBlock];
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t qb = task % nqb, bh = task / nqb, h = bh % p.H, b = bh / p.H, hk = h / p.G;
      const int64_t i0 = p.r0 + qb * kQueryBlock, i1 = std::min(p.Tq, i0 + kQueryBlock), m = i1 - i0;
      const T* Qb = Q + b * p.sq[0] + h * p.sq[1] + i0 * p.sq[2];
      const T* Kb = K + b * p.sk[0] + hk * p.sk[1];
      const T* Vb = V + b * p.sv[0] + hk * p.sv[1];
      const int64_t ke = p.kend(i1);
      std::fill_n(mrow, m, kNegInf);
      std::fill_n(lrow, m, 0.f);
      for (int64_t j0 = 0; j0 < ke; j0 += kKeyChunk) {
        const int64_t n = std::min(kKeyChunk, ke - j0);
        gemm_rm(false, true, m, n, Dh, p.scale, Qb, p.sq[2], Kb + j0 * p.sk[2], p.sk[2], 0.f, S.data(), n);
        if (p.causal && j0 + n - 1 > i0 + p.Tk - p.Tq) p.mask(S.data(), n, i0, m, j0, n);
        for (int64_t r = 0; r < m; ++r) {
          float* Sr = S.data() + r * n;
          const float mnew = std::max(mrow[r], VQK_ROW(avx, row_max, Sr, n));
          const float c = mnew == kNegInf ? 0.f : mnew;  // a row with nothing visible yet: exp(-inf) = 0
          const float s = VQK_ROW(avx, exp_sub_sum, Sr, c, n);
          if (j0 > 0) {
            const float corr = mrow[r] == kNegInf ? 0.f : std::exp(mrow[r] - c);
            lrow[r] *= corr;
            VQK_ROW(avx, scale_row, acc.data() + r * Dh, corr, Dh);
          }
          lrow[r] += s;
          mrow[r] = mnew;
        }
        gemm_rm(false, false, m, Dh, n, 1.f, operand<T>(S.data(), m * n, Pb, avx), n, Vb + j0 * p.sv[2], p.sv[2],
                j0 > 0 ? 1.f : 0.f, acc.data(), Dh);
      }
      for (int64_t r = 0; r < m; ++r) {
        float* Or = O + b * so[0] + h * so[1] + (i0 + r) * so[2];
        const float l = lrow[r];
        if (l > 0.f) {
          const float inv = 1.f / l;
          for (int64_t d = 0; d < Dh; ++d) Or[d] = acc[r * Dh + d] * inv;
          L[(b * p.H + h) * p.Tq + i0 + r] = mrow[r] + std::log(l);
        } else {
          std::fill_n(Or, Dh, 0.f);
          L[(b * p.H + h) * p.Tq + i0 + r] = kNegInf;
        }
      }
    }
  });
  if (wide) {
    at::Tensor o = at::empty_like(q_in);
    o.copy_(out);
    out = o;
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             bool causal, double scale) {
  check_inputs("attention_fwd", q, k, v);
  if (native_bf16({&q, &k, &v})) return flash_fwd_impl<bf16>(q, k, v, causal, scale);
  return flash_fwd_impl<float>(q, k, v, causal, scale);
}

// ------------------------------------------------------------------------------------------------
// Backward: task = (b, h). dk/dv of the head accumulate in fp32 over the query blocks; dq per query block.

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_bwd_impl(const at::Tensor& go_in, const at::Tensor& q_in,
                                                              const at::Tensor& k_in, const at::Tensor& v_in,
                                                              const at::Tensor& out_in, const at::Tensor& lse_in,
                                                              bool causal, double scale) {
  const at::Tensor q = readable<T>(q_in), k = readable<T>(k_in), v = readable<T>(v_in);
  const at::Tensor go = readable<T>(go_in), o = readable<T>(out_in);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Problem p = make_problem(q, k, v, causal, scale);
  const int64_t B = p.B, H = p.H, Hkv = p.Hkv, G = p.G, Tq = p.Tq, Tk = p.Tk, Dh = p.Dh;
  const auto dt = q_in.scalar_type();
  const bool wide = dt != at::kFloat;
  // dk/dv: straight into the outputs when each kv head has one query head, else per query head (float32) and
  // summed afterwards. Native bfloat16 rounds rows straight into bfloat16 outputs (dq always, dk/dv when direct):
  // no float32 copies to allocate and narrow at the end. The accumulators stay float32 either way.
  const bool direct = G == 1;
  constexpr bool kRound = std::is_same_v<T, bf16>;
  const auto qt = kRound ? at::kBFloat16 : at::kFloat, kvt = kRound && direct ? at::kBFloat16 : at::kFloat;
  at::Tensor dq = bthd(B, H, Tq, Dh, qt, q_in.device());
  at::Tensor dk = bthd(B, Hkv, Tk, Dh, kvt, q_in.device());
  at::Tensor dv = bthd(B, Hkv, Tk, Dh, kvt, q_in.device());
  at::Tensor dkh = direct ? dk : at::empty({B, H, Tk, Dh}, q_in.options().dtype(at::kFloat));
  at::Tensor dvh = direct ? dv : at::empty({B, H, Tk, Dh}, q_in.options().dtype(at::kFloat));
  const int64_t sdq[3] = {dq.stride(0), dq.stride(1), dq.stride(2)};
  const int64_t sdk[3] = {dkh.stride(0), dkh.stride(1), dkh.stride(2)};
  const int64_t sdo[3] = {go.stride(0), go.stride(1), go.stride(2)};
  const int64_t soo[3] = {o.stride(0), o.stride(1), o.stride(2)};
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  const T *dO = go.data_ptr<T>(), *Ot = o.data_ptr<T>();
  const float* LS = lse.data_ptr<float>();
  // Output rows by byte address: float32, or bfloat16 (rounded to nearest even by to_bf16).
  char *dQ = static_cast<char*>(dq.data_ptr()), *dKh = static_cast<char*>(dkh.data_ptr());
  char* dVh = static_cast<char*>(dvh.data_ptr());
  const int64_t eq = dq.element_size(), ek = dkh.element_size();
  const bool q_bf = dq.scalar_type() == at::kBFloat16, kv_bf = dkh.scalar_type() == at::kBFloat16;
  const bool avx = cpu::has_avx512();
  const int64_t chunk = kKeyChunk;

  cpu::parallel_blocks(B * H, task_work(p), [&](const std::function<int64_t()>& next) {
    BlasOneThread one;
    std::vector<float> P((size_t)(kQueryBlock * chunk)), dP((size_t)(kQueryBlock * chunk));
    std::vector<float> dKa((size_t)(Tk * Dh)), dVa((size_t)(Tk * Dh)), dQa((size_t)(kQueryBlock * Dh));
    std::vector<float> tmp((size_t)(2 * Dh));
    const size_t nb = std::is_same_v<T, float> ? 0 : (size_t)(kQueryBlock * chunk);
    std::vector<T> Pb(nb), dSb(nb);
    float Lr[kQueryBlock], delta[kQueryBlock];
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t h = task % H, b = task / H, hk = h / G;
      const T* Qh = Q + b * p.sq[0] + h * p.sq[1];
      const T* Kh = K + b * p.sk[0] + hk * p.sk[1];
      const T* Vh = V + b * p.sv[0] + hk * p.sv[1];
      const T* dOh = dO + b * sdo[0] + h * sdo[1];
      const T* Oh = Ot + b * soo[0] + h * soo[1];
      char* dQh = dQ + eq * (b * sdq[0] + h * sdq[1]);
      std::fill(dKa.begin(), dKa.end(), 0.f);
      std::fill(dVa.begin(), dVa.end(), 0.f);
      for (int64_t i = 0; i < p.r0; ++i) std::memset(dQh + eq * i * sdq[2], 0, eq * Dh);  // (0 bits: 0.0 in both)
      for (int64_t i0 = p.r0; i0 < Tq; i0 += kQueryBlock) {
        const int64_t i1 = std::min(Tq, i0 + kQueryBlock), m = i1 - i0;
        const T* Qb = Qh + i0 * p.sq[2];
        const T* dOb = dOh + i0 * sdo[2];
        for (int64_t r = 0; r < m; ++r) {
          const float l = LS[(b * H + h) * Tq + i0 + r];
          Lr[r] = l == kNegInf ? std::numeric_limits<float>::infinity() : l;  // no key seen: P = exp(-inf) = 0
          delta[r] = row_dot<T>(dOb + r * sdo[2], Oh + (i0 + r) * soo[2], Dh, avx, tmp.data());
        }
        const int64_t ke = p.kend(i1);
        for (int64_t j0 = 0; j0 < ke; j0 += chunk) {
          const int64_t n = std::min(chunk, ke - j0);
          const T* Kc = Kh + j0 * p.sk[2];
          const T* Vc = Vh + j0 * p.sv[2];
          gemm_rm(false, true, m, n, Dh, p.scale, Qb, p.sq[2], Kc, p.sk[2], 0.f, P.data(), n);
          if (p.causal && j0 + n - 1 > i0 + Tk - Tq) p.mask(P.data(), n, i0, m, j0, n);
          for (int64_t r = 0; r < m; ++r) VQK_ROW(avx, exp_sub_sum, P.data() + r * n, Lr[r], n);
          gemm_rm(false, true, m, n, Dh, 1.f, dOb, sdo[2], Vc, p.sv[2], 0.f, dP.data(), n);
          for (int64_t r = 0; r < m; ++r) VQK_ROW(avx, ds_row, P.data() + r * n, dP.data() + r * n, delta[r], n);
          const T* Pop = operand<T>(P.data(), m * n, Pb, avx);
          const T* dSop = operand<T>(dP.data(), m * n, dSb, avx);
          gemm_rm(true, false, n, Dh, m, 1.f, Pop, n, dOb, sdo[2], 1.f, dVa.data() + j0 * Dh, Dh);
          gemm_rm(true, false, n, Dh, m, p.scale, dSop, n, Qb, p.sq[2], 1.f, dKa.data() + j0 * Dh, Dh);
          gemm_rm(false, false, m, Dh, n, p.scale, dSop, n, Kc, p.sk[2], j0 > 0 ? 1.f : 0.f, dQa.data(), Dh);
        }
        for (int64_t r = 0; r < m; ++r) {
          char* dst = dQh + eq * (i0 + r) * sdq[2];
          if (ke == 0) std::memset(dst, 0, eq * Dh);
          else store_row(dst, q_bf, dQa.data() + r * Dh, Dh, avx);
        }
      }
      for (int64_t j = 0; j < Tk; ++j) {
        const int64_t off = ek * (b * sdk[0] + h * sdk[1] + j * sdk[2]);
        store_row(dKh + off, kv_bf, dKa.data() + j * Dh, Dh, avx);
        store_row(dVh + off, kv_bf, dVa.data() + j * Dh, Dh, avx);
      }
    }
  });
  if (!direct) {
    // Sum the G query heads of each kv head in a fixed order (independent of the thread count).
    const int64_t sk[3] = {dk.stride(0), dk.stride(1), dk.stride(2)};
    float *dKo = dk.data_ptr<float>(), *dVo = dv.data_ptr<float>();
    cpu::parallel_blocks(B * Hkv, (double)G * Tk * Dh * B * Hkv, [&](const std::function<int64_t()>& next) {
      for (int64_t t; (t = next()) >= 0;) {
        const int64_t hk = t % Hkv, b = t / Hkv;
        for (int64_t j = 0; j < Tk; ++j) {
          float* ko = dKo + b * sk[0] + hk * sk[1] + j * sk[2];
          float* vo = dVo + b * sk[0] + hk * sk[1] + j * sk[2];
          for (int64_t g = 0; g < G; ++g) {
            const float* ki = reinterpret_cast<const float*>(dKh) + b * sdk[0] + (hk * G + g) * sdk[1] + j * sdk[2];
            const float* vi = reinterpret_cast<const float*>(dVh) + b * sdk[0] + (hk * G + g) * sdk[1] + j * sdk[2];
            if (g == 0) {
              std::memcpy(ko, ki, sizeof(float) * Dh);
              std::memcpy(vo, vi, sizeof(float) * Dh);
            } else {
              for (int64_t d = 0; d < Dh; ++d) ko[d] += ki[d], vo[d] += vi[d];
            }
          }
        }
      }
    });
  }
  if (wide) {
    auto narrow = [&](const at::Tensor& t) {
      if (t.scalar_type() == dt) return t;  // (written in dt already)
      at::Tensor r = bthd(t.size(0), t.size(1), t.size(2), t.size(3), dt, t.device());
      r.copy_(t);
      return r;
    };
    return {narrow(dq), narrow(dk), narrow(dv)};
  }
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_bwd(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& out,
                                                         const at::Tensor& lse, bool causal, double scale) {
  check_inputs("attention_bwd", q, k, v);
  TORCH_CHECK(go.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_bwd: grad_out and out must have q's shape");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "attention_bwd: lse must be (B, H, Tq)");
  if (native_bf16({&q, &k, &v, &go, &out})) return flash_bwd_impl<bf16>(go, q, k, v, out, lse, causal, scale);
  return flash_bwd_impl<float>(go, q, k, v, out, lse, causal, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) {
  m.impl("attention_fwd", &flash_fwd);
  m.impl("attention_bwd", &flash_bwd);
}

}  // namespace vqkernels
