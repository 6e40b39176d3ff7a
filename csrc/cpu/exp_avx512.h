// exp over 16 floats with AVX-512, shared by the attention kernels (csrc/cpu/attention_kernel.h for decoding,
// csrc/cpu/attention_flash.cpp). Include at file scope; call it from code compiled for AVX-512.
#pragma once
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace vqkernels {
namespace cpu {

// exp(x) for x <= ~0 (x = -inf gives exactly 0): Cody-Waite reduction x = n ln2 + r, a degree-6 polynomial on
// |r| <= ln2 / 2 (relative error ~2 ulp), 2^n by vscalefps.
// Below -87 (exp < 1.6e-38, under FLT_MIN: nothing next to a softmax's largest term, exp(0) = 1) the result is
// 0, never a denormal: on Intel cores each denormal result costs a microcode assist, and masked scores (-inf)
// and far-off keys made the causal softmax passes ~2x slower than the GEMMs around them (measured: the flash
// forward at (8, 8, 256, 64) bf16 9.2 -> 5.3 ms with denormals flushed).
inline __m512 exp_ps_avx512(__m512 x) {
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

}  // namespace cpu
}  // namespace vqkernels
#pragma GCC pop_options
#endif
