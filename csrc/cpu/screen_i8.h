// The int8 screen of the exact fp32 search (AVX-512 VNNI): csrc/cpu/nearest_code.cpp includes this
// inside its anonymous namespace, after ScreenCtx / rescore_rows / kPanel. Not a standalone header.
//
// Rows and codes are quantized to 8 bits with a scale each (q = round(v / a), a = max|v| / 127), so
// one vpdpbusd does 64 multiply-adds: 4x the fp32 FMA rate and 2x vdpbf16ps on Zen 4 (measured:
// 232 / 116 / 58 GMAC/s per core). The integer dot q_x . q_c is exact (|q| <= 127, D <= kI8MaxD:
// |q_x . q_c| < 2^24, also exact once converted to fp32). The estimate a_x a_c (q_x . q_c) differs from
// <x, c> by at most ||e_x|| ||c|| + (||x|| + ||e_x||) ||e_c||, where e = v - a q is the quantization
// error, whose norm is computed per row and per code (quantize_i8: a rigorous upper bound). With
// rho = ||e_x|| / ||x|| (the max over a group of rows), that is at most
//   ||x|| * (rho (||c|| + ||e_c||) + ||e_c||),
// so the lower bound of the exact fp32 score of code c for row x is
//   lb = alpha a_x a_c (q_x . q_c) + lbias_c - ||x|| * (rho P_c + Q_c)
// with P_c = F |alpha| (||c|| + ||e_c||), Q_c = F |alpha| ||e_c|| + kfp ||c|| and
// lbias_c = bias_c - kappa2 ||c||^2 - slack: F covers the fp32 rounding of the norms, kfp the rounding
// of the estimate's few fp32 operations and of the exact fp32 score (one fp32 dot of D terms),
// kappa2 and slack the bias (i8_constants). Codes whose bound is strictly below the row's best exact
// score so far are rescored exactly (rescore_rows): the answer is the exact argmin, not an estimate.
//
// vpdpbusd multiplies unsigned bytes by signed bytes: rows are stored as q_x + 128 (1..255) and the
// accumulators start at -128 * sum(q_c), so they end at q_x . q_c exactly (no overflow: int32).
// Panels: 32 codes, [Dq / 4][32 codes][4 bytes], Dq = D rounded up to 4 (zero padding).

#define VQK_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni")))

constexpr int64_t kI8MaxD = 1024;       // 127^2 * 1024 < 2^24
constexpr float kI8MinMax = 0x1p-60f;  // a vector with 0 < max|v| below this is not quantized

// acc += u8 x s8 dot products (vpdpbusd). As inline asm: GCC 12 copies every accumulator of the
// _mm512_dpbusd_epi32 builtin once per use in the register-tiled loop (98 moves and spills measured
// for 8 x 2 accumulators; none with this).
VQK_AVX512VNNI inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

struct I8Consts {
  float F, kfp, kappa2, slack;
};

inline I8Consts i8_constants(int64_t D) {
  const double u = std::ldexp(1.0, -24);
  const double n = double(D) + 8.0;
  const double g = n * u / (1.0 - n * u);  // gamma_{D+8}: an fp32 sum of D terms, any order
  return {float(1.0 + 4.0 * g + std::ldexp(1.0, -20)), float(16.0 * g + 32.0 * u), float(8.0 * g + 8.0 * u),
          std::ldexp(1.0f, -120)};
}

// A vector quantized to int8: its scale a, an upper bound of ||v - a q|| (the real product a q),
// sum(q); ok = false when it cannot be quantized here (0 < max|v| < kI8MinMax, or not finite).
struct I8Vec {
  float scale, err;
  int32_t sum;
  bool ok;
};

// q[0..D) = round(v / a) in [-127, 127] (as int8), a = max|v| / 127 (1 for a zero vector), and err.
// With y = fl(v * fl(1/a)): |y - v/a| <= 2.01 u |v/a| <= 256 u; e = y - q is exact (q = 0, or Sterbenz);
// so ||v/a - q|| <= ||e|| + 256 u sqrt(D), and the fp32 sum of the e^2 is within gamma_{D+8} of theirs.
VQK_AVX512VNNI inline I8Vec quantize_i8(const float* v, int64_t D, int8_t* q) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 mx = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_maskz_loadu_ps(m, v + d), absmask));  // NaN: see below
  }
  const float m = _mm512_reduce_max_ps(mx);
  I8Vec r{1.f, 0.f, 0, true};
  if (m == 0.f) {
    // max_ps drops NaN operands: check the vector is really zero (finite) before calling it so.
    for (int64_t d = 0; d < D; ++d)
      if (v[d] != 0.f) return {1.f, 0.f, 0, false};
    std::memset(q, 0, (size_t)D);
    return r;
  }
  if (!(m >= kI8MinMax) || !(m <= 0x1p100f)) return {1.f, 0.f, 0, false};
  const float a = m / 127.f, inv = 1.f / a;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512 e2 = _mm512_setzero_ps();
  __m512i s = _mm512_setzero_si512();
  bool finite = true;
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m16 = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m16, v + d), vinv);
    finite = finite && _mm512_cmp_ps_mask(y, y, _CMP_ORD_Q) == (__mmask16)0xFFFF;
    __m512i qi = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    qi = _mm512_min_epi32(_mm512_max_epi32(qi, lo), hi);
    const __m512 e = _mm512_sub_ps(y, _mm512_cvtepi32_ps(qi));
    e2 = _mm512_fmadd_ps(e, e, e2);
    s = _mm512_add_epi32(s, qi);
    _mm512_mask_cvtepi32_storeu_epi8(q + d, m16, qi);
  }
  if (!finite) return {1.f, 0.f, 0, false};
  const double u = std::ldexp(1.0, -24), n = double(D) + 8.0, g = n * u / (1.0 - n * u);
  const double en = std::sqrt((double)_mm512_reduce_add_ps(e2) * (1.0 + 2.0 * g)) + 256.0 * u * std::sqrt((double)D);
  r.scale = a;
  r.err = (float)(en * (double)a * (1.0 + 4.0 * u));
  r.sum = _mm512_reduce_add_epi32(s);
  return r;
}

// A row's candidates: codes that may be its nearest, with their lower bounds (n of them).
struct I8List {
  std::vector<float> lb;
  std::vector<int32_t> k;
  size_t n = 0;
};

// What the rare path of micro_screen_i8 needs: per code U (the upper bound's bias terms), the group's
// ||x||, the number of codes, the group's rows' candidate lists.
struct I8Ctx {
  const float* U;
  const float* nx;
  int64_t K;
  I8List* cands;
};

// The rare path: a panel where some codes' lower bounds are <= their row's threshold (masks). Lowers
// the threshold to the least *upper* bound of those codes (see the header), then appends the codes whose
// lower bound is still <= it to the row's candidates. Every code left out scores strictly above some
// other code, so the row's exact argmin (lowest index among equal scores) stays among the candidates.
VQK_AVX512 __attribute__((noinline)) void note_candidates(const I8Ctx& c, int R, const uint32_t* masks,
                                                          const float* lbuf, const float* tbuf, int64_t k0,
                                                          float* thr) {
  const __m512 U0 = _mm512_loadu_ps(c.U + k0), U1 = _mm512_loadu_ps(c.U + k0 + 16);
  const __m512 t0 = _mm512_loadu_ps(tbuf), t1 = _mm512_loadu_ps(tbuf + 16);
  const __m512 margin = _mm512_set1_ps(0x1p-17f), ninf = _mm512_set1_ps(-inf_f());
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i k0v = _mm512_add_epi32(_mm512_set1_epi32((int32_t)k0),
                                       _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i k1v = _mm512_add_epi32(k0v, _mm512_set1_epi32(16));
  const int64_t left = c.K - k0;
  const uint32_t valid = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1u);  // no padding codes
  for (int r = 0; r < R; ++r) {
    const uint32_t m = masks[r] & valid;
    if (!m) continue;
    const __m512 l0 = _mm512_loadu_ps(lbuf + r * 32), l1 = _mm512_loadu_ps(lbuf + r * 32 + 16);
    const __m512 n2 = _mm512_set1_ps(2.f * c.nx[r] * (1.f + 0x1p-16f));
    const __m512 ub0 = _mm512_add_ps(_mm512_add_ps(l0, _mm512_fmadd_ps(n2, t0, U0)),
                                     _mm512_mul_ps(margin, _mm512_and_ps(l0, absmask)));
    const __m512 ub1 = _mm512_add_ps(_mm512_add_ps(l1, _mm512_fmadd_ps(n2, t1, U1)),
                                     _mm512_mul_ps(margin, _mm512_and_ps(l1, absmask)));
    // codes with lb = -inf (not bounded) give no upper bound
    const __mmask16 b0 = _mm512_mask_cmp_ps_mask((__mmask16)m, l0, ninf, _CMP_NEQ_OQ);
    const __mmask16 b1 = _mm512_mask_cmp_ps_mask((__mmask16)(m >> 16), l1, ninf, _CMP_NEQ_OQ);
    const float th = std::min(thr[r], std::min(_mm512_mask_reduce_min_ps(b0, ub0), _mm512_mask_reduce_min_ps(b1, ub1)));
    thr[r] = th;
    const __m512 thv = _mm512_set1_ps(th);
    const __mmask16 c0 = _mm512_mask_cmp_ps_mask((__mmask16)m, l0, thv, _CMP_LE_OQ);
    const __mmask16 c1 = _mm512_mask_cmp_ps_mask((__mmask16)(m >> 16), l1, thv, _CMP_LE_OQ);
    I8List& L = c.cands[r];
    if (L.lb.size() < L.n + 32) {
      L.lb.resize(2 * L.n + 64);
      L.k.resize(2 * L.n + 64);
    }
    // compress in registers, then store whole vectors (room for 32 more was made above): a compress
    // with a memory destination is microcoded and ~100x slower on Zen 4
    _mm512_storeu_ps(L.lb.data() + L.n, _mm512_maskz_compress_ps(c0, l0));
    _mm512_storeu_si512(L.k.data() + L.n, _mm512_maskz_compress_epi32(c0, k0v));
    L.n += (size_t)__builtin_popcount(c0);
    _mm512_storeu_ps(L.lb.data() + L.n, _mm512_maskz_compress_ps(c1, l1));
    _mm512_storeu_si512(L.k.data() + L.n, _mm512_maskz_compress_epi32(c1, k1v));
    L.n += (size_t)__builtin_popcount(c1);
  }
}

// R rows (bytes q_x + 128, stride Dq) against np int8 panels; see the header for the bound.
// sx[r] = alpha a_x; ctx.nx[r] = ||x|| (NaN: the row is not screened, never a candidate); thr[r] the
// row's threshold (an upper bound of its least exact score; +inf to start), lowered as panels go.
template <int R>
VQK_AVX512VNNI void micro_screen_i8(const uint8_t* __restrict x, int64_t Dq, const int8_t* __restrict panels,
                                    const int32_t* __restrict corr, const float* __restrict ascale,
                                    const float* __restrict lbias, const float* __restrict P,
                                    const float* __restrict Q, int64_t np, int64_t kbase, const float* sx,
                                    float rho, const I8Ctx& ctx, float* thr) {
  const float* nx = ctx.nx;
  __m512 bv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) bv[r] = _mm512_set1_ps(thr[r]);
  const __m512 rv = _mm512_set1_ps(rho);
  const int64_t groups = Dq / 4;
  const int64_t pstride = Dq * kPanel;
  for (int64_t p = 0; p < np; ++p) {
    const int8_t* W = panels + p * pstride;
    const int64_t k = p * kPanel;
    __m512i acc0[R], acc1[R];
    {  // the first 4 dimensions start from the per-code correction -128 sum(q_c)
      const __m512i w0 = _mm512_loadu_si512(W), w1 = _mm512_loadu_si512(W + 64);
      const __m512i i0 = _mm512_loadu_si512(corr + k), i1 = _mm512_loadu_si512(corr + k + 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, x + r * Dq, 4);
        const __m512i xv = _mm512_set1_epi32(quad);
        acc0[r] = dpbusd(i0, xv, w0);
        acc1[r] = dpbusd(i1, xv, w1);
      }
    }
    for (int64_t i = 1; i < groups; ++i) {
      const __m512i w0 = _mm512_loadu_si512(W + i * 128), w1 = _mm512_loadu_si512(W + i * 128 + 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, x + r * Dq + 4 * i, 4);
        const __m512i xv = _mm512_set1_epi32(quad);
        acc0[r] = dpbusd(acc0[r], xv, w0);
        acc1[r] = dpbusd(acc1[r], xv, w1);
      }
    }
    const __m512 a0 = _mm512_loadu_ps(ascale + k), a1 = _mm512_loadu_ps(ascale + k + 16);
    const __m512 b0 = _mm512_loadu_ps(lbias + k), b1 = _mm512_loadu_ps(lbias + k + 16);
    const __m512 t0 = _mm512_fmadd_ps(rv, _mm512_loadu_ps(P + k), _mm512_loadu_ps(Q + k));
    const __m512 t1 = _mm512_fmadd_ps(rv, _mm512_loadu_ps(P + k + 16), _mm512_loadu_ps(Q + k + 16));
    __m512 lb0[R], lb1[R];
    uint32_t mk[R];
    uint32_t any = 0;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(sx[r]), n = _mm512_set1_ps(nx[r]);
      lb0[r] = _mm512_fnmadd_ps(n, t0, _mm512_fmadd_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(acc0[r]), a0), b0));
      lb1[r] = _mm512_fnmadd_ps(n, t1, _mm512_fmadd_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(acc1[r]), a1), b1));
      mk[r] = (uint32_t)_mm512_cmp_ps_mask(lb0[r], bv[r], _CMP_LE_OQ) |
              ((uint32_t)_mm512_cmp_ps_mask(lb1[r], bv[r], _CMP_LE_OQ) << 16);
      any |= mk[r];
    }
    if (__builtin_expect(any != 0, 0)) {
      alignas(64) float lbuf[R * 32];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        _mm512_store_ps(lbuf + r * 32, lb0[r]);
        _mm512_store_ps(lbuf + r * 32 + 16, lb1[r]);
      }
      alignas(64) float tbuf[32];
      _mm512_store_ps(tbuf, t0);
      _mm512_store_ps(tbuf + 16, t1);
      note_candidates(ctx, R, mk, lbuf, tbuf, kbase + k, thr);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) bv[r] = _mm512_set1_ps(thr[r]);
    }
  }
}
