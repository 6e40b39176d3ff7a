// Moving rows between a strided (B, T, D) tensor and a small buffer of contiguous fp32 rows, with
// AVX-512 16 x 16 transposes where the layout is channel-first (a (B, C, H, W) map read as
// (B, H*W, C): token stride 1, element stride H*W). Used by the fused vector_quantize forward
// (csrc/cpu/vq_fused.cpp) and the vq_loss kernels (csrc/cpu/vq_loss.cpp).
//
// Rows are numbered n = b * T + t. gather_rows / scatter_rows take any strides; the fast paths are
// sd == 1 (rows contiguous: memcpy) and st == 1 (channel-first: 16 x 16 tiles transposed in
// registers); anything else goes element by element. The caller checks the CPU for AVX-512 and
// passes `avx512`; without it the scalar loops run.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common.h"
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_TILE_X86 1
#else
#define VQK_TILE_X86 0
#endif

namespace vqkernels {
namespace tile {

using StridedRows = vqkernels::StridedRows;  // the one strided-rows view (common.h)

#if VQK_TILE_X86 && defined(__GNUC__)
#define VQK_TILE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// In-register transpose of 16 x 16 floats: on return r[j] holds what was column j.
VQK_TILE_TARGET inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // r[4i + j] now holds, in each 128-bit lane l, column j of rows 4i..4i+3 restricted to lane l.
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// dst[r * ldd + d] = src[r + d * sd] for r < nr, d < D (consecutive tokens, element stride sd).
VQK_TILE_TARGET inline void gather_tokens_t(const float* src, int64_t sd, int64_t nr, int64_t D, float* dst,
                                            int64_t ldd) {
  for (int64_t r0 = 0; r0 < nr; r0 += 16) {
    const int64_t rn = std::min<int64_t>(16, nr - r0);
    const __mmask16 rm = tail_mask(rn);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t dn = std::min<int64_t>(16, D - d0);
      __m512 v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        v[i] = i < dn ? _mm512_maskz_loadu_ps(rm, src + r0 + (d0 + i) * sd) : _mm512_setzero_ps();
      transpose16(v);
      const __mmask16 dm = tail_mask(dn);
      for (int64_t j = 0; j < rn; ++j) _mm512_mask_storeu_ps(dst + (r0 + j) * ldd + d0, dm, v[j]);
    }
  }
}

// dst[r + d * sd] = src[r * lds + d] for r < nr, d < D (the inverse of gather_tokens_t).
VQK_TILE_TARGET inline void scatter_tokens_t(const float* src, int64_t lds, int64_t nr, int64_t D, float* dst,
                                             int64_t sd) {
  for (int64_t r0 = 0; r0 < nr; r0 += 16) {
    const int64_t rn = std::min<int64_t>(16, nr - r0);
    const __mmask16 rm = tail_mask(rn);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t dn = std::min<int64_t>(16, D - d0);
      const __mmask16 dm = tail_mask(dn);
      __m512 v[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        v[j] = j < rn ? _mm512_maskz_loadu_ps(dm, src + (r0 + j) * lds + d0) : _mm512_setzero_ps();
      transpose16(v);
      for (int64_t i = 0; i < dn; ++i) _mm512_mask_storeu_ps(dst + r0 + (d0 + i) * sd, rm, v[i]);
    }
  }
}
#endif

// Rows [n0, n0 + nr) of x into dst (nr x D, row stride ldd).
inline void gather_rows(const float* x, const StridedRows& s, int64_t n0, int64_t nr, int64_t D, float* dst,
                        int64_t ldd, bool avx512) {
  int64_t r = 0;
  while (r < nr) {
    const int64_t n = n0 + r;
    const int64_t t = n % s.T;
    const int64_t run = std::min<int64_t>(nr - r, s.T - t);  // rows sharing b
    const float* base = x + s.offset(n);
    if (s.sd == 1) {
      for (int64_t i = 0; i < run; ++i) std::memcpy(dst + (r + i) * ldd, base + i * s.st, sizeof(float) * D);
#if VQK_TILE_X86 && defined(__GNUC__)
    } else if (s.st == 1 && avx512) {
      gather_tokens_t(base, s.sd, run, D, dst + r * ldd, ldd);
#endif
    } else {
      for (int64_t i = 0; i < run; ++i)
        for (int64_t d = 0; d < D; ++d) dst[(r + i) * ldd + d] = base[i * s.st + d * s.sd];
    }
    r += run;
  }
}

// src (nr x D, row stride lds) into rows [n0, n0 + nr) of y.
inline void scatter_rows(const float* src, int64_t lds, float* y, const StridedRows& s, int64_t n0, int64_t nr,
                         int64_t D, bool avx512) {
  int64_t r = 0;
  while (r < nr) {
    const int64_t n = n0 + r;
    const int64_t t = n % s.T;
    const int64_t run = std::min<int64_t>(nr - r, s.T - t);
    float* base = y + s.offset(n);
    if (s.sd == 1) {
      for (int64_t i = 0; i < run; ++i) std::memcpy(base + i * s.st, src + (r + i) * lds, sizeof(float) * D);
#if VQK_TILE_X86 && defined(__GNUC__)
    } else if (s.st == 1 && avx512) {
      scatter_tokens_t(src + r * lds, lds, run, D, base, s.sd);
#endif
    } else {
      for (int64_t i = 0; i < run; ++i)
        for (int64_t d = 0; d < D; ++d) base[i * s.st + d * s.sd] = src[(r + i) * lds + d];
    }
    r += run;
  }
}

}  // namespace tile
}  // namespace vqkernels
