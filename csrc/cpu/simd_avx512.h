// The row helpers the CPU kernels share, in AVX-512 and in portable scalar form: a dot product in one fixed order,
// exp without denormals, and the softmax reductions over a row (max; exp(x - c) and its sum; a scale).
// Used by the decoding kernel (attention_kernel.h via attention.cpp), the flash kernels (attention_flash.cpp) and
// nearest_code's exact rescoring (nearest_code.cpp).
//  * cpu::portable: plain loops (any CPU; what runs without AVX-512 or under VQKERNELS_CPU_NO_AVX512=1).
//  * cpu::avx512 (x86 with GCC/Clang only): compiled for avx512f/bw/vl/dq + fma by the pragma below. Call them only
//    from code compiled for at least that set (a `#pragma GCC target` or `__attribute__((target(...)))` region of
//    the same or more features, where they inline), and only after checking the CPU (cpu::has_avx512()).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace vqkernels {
namespace cpu {
namespace portable {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
// x[i] = exp(x[i] - c); returns the sum.
inline float exp_sub_sum(float* x, float c, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - c));
  return s;
}
inline void scale_row(float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

}  // namespace portable
}  // namespace cpu
}  // namespace vqkernels

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace vqkernels {
namespace cpu {
namespace avx512 {

// The lanes [0, min(n, 16)) of a 16-float vector.
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

// sum_i a[i] b[i] in float32, one fixed order: two 16-lane FMA chains over blocks of 32, a masked tail on the
// first chain, then the two chains added and reduced (_mm512_reduce_add_ps's tree). The same bits wherever it is
// called (nearest_code's screens rely on that: a rescored code must score exactly as every other rescoring).
inline float dot(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= n; d += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), s1);
  }
  for (; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// exp(x) for x <= ~0 (x = -inf gives exactly 0): Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial on
// |r| <= ln2 / 2 (relative error ~2 ulp), 2^n by vscalefps.
// Below -87 (exp < 1.6e-38, under FLT_MIN: nothing next to a softmax's largest term, exp(0) = 1) the result is
// 0, never a denormal: on Intel cores each denormal result costs a microcode assist, and masked scores (-inf)
// and far-off keys made the causal softmax passes ~2x slower than the GEMMs around them (measured: the flash
// forward at (8, 8, 256, 64) bf16 9.2 -> 5.3 ms with denormals flushed).
inline __m512 exp_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);  // (NaN: not live)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// max_i x[i] (-inf for n = 0).
inline float row_max(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = ninf;
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(ninf, tail_mask(n - i), x + i));
  return _mm512_reduce_max_ps(m);
}

// x[i] = exp(x[i] - c) for i < n; returns their sum (two accumulators over blocks of 32, the tail on the first).
inline float exp_sub_sum(float* x, float c, int64_t n) {
  const __m512 vc = _mm512_set1_ps(c);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vc));
    const __m512 e1 = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vc));
    _mm512_storeu_ps(x + i, e0);
    _mm512_storeu_ps(x + i + 16, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vc));
    _mm512_mask_storeu_ps(x + i, k, e);
    s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// x[i] *= a for i < n.
inline void scale_row(float* x, float a, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), va));
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace vqkernels
#pragma GCC pop_options
#endif
