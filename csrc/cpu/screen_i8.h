// The int8 screen of the exact fp32 search (AVX-512 VNNI): csrc/cpu/nearest_code.cpp includes this
// inside its anonymous namespace, after ScreenCtx / rescore_rows / kPanel. Not a standalone header.
//
// Rows and codes are quantized to 8 bits, q = round(v / a): a group of R rows shares one scale a_g
// and a panel of 32 codes one scale a_p (a = the largest max|v| among them / 127; the codes are
// sorted by max|v| before they are cut into panels, so a panel's codes have nearly the same scale).
// One vpdpbusd does 64 multiply-adds: 4x the fp32 FMA rate and 2x vdpbf16ps on Zen 4 (measured:
// 232 / 116 / 58 GMAC/s per core). The integer dot I = q_x . q_c is exact (|q| <= 127, D <= kI8MaxD).
// The estimate a_g a_p I differs from <x, c> by at most ||e_x|| (||c|| + ||e_c||) + ||x|| ||e_c||,
// where e = v - a q is the quantization error, whose norm is computed per row and per code
// (quantize_i8_at: a rigorous upper bound). So with E = max ||e_x|| and n = max ||x|| over the group,
// the exact fp32 score of code c for any row of the group is at least
//   L = S I + lbias_c - E P_c - n Q_c,   S = fl(fl(alpha a_g) a_p)
// with P_c = F |alpha| (||c|| + ||e_c||), Q_c = F |alpha| ||e_c|| + kfp ||c|| and
// lbias_c = bias_c - kappa2 ||c||^2 - slack: F covers the fp32 rounding of the norms, kfp the rounding
// of S and of the exact fp32 score (one fp32 dot of D terms), kappa2 and slack the bias (i8_constants).
//
// Why shared scales: the per-pair epilogue is then two instructions. S is one number per (group,
// panel), and the per-code part beta_c = lbias_c - E P_c - n Q_c is computed once per panel for the
// whole group. For D <= kI8MagicMaxD (|I| < 2^22) the accumulators start at the bits of M = 1.5 * 2^23
// (kI8Magic), so at the end they *are* the fp32 numbers M + I (no conversion), and
//   y = fma(M + I, S, beta'),   beta' = fl(beta + fl(-M S - margin))
// is the bound, compared with the row's threshold. Every rounding in beta' and y is at most
// u (4 G + 2 M |S| + |I S| + 3 margin) (G >= |lbias_c| + E P_c + n Q_c over the panel), so
// margin = 4.2 u G + 1.9 |S| keeps y <= L (i8_margin; for larger D, y = fma(float(I), S, beta'),
// M = 0, |I| < 2^24: the same margin holds). Against per-vector scales (5 instructions per 16 pairs):
// measured 7-8% faster at D = 8 and 64, 3% at 256 (one thread, Zen 4), for 22% / 6% / 5% more rescores.
//
// The kernel keeps per row a threshold, the least *upper* bound of the codes seen: the exact score is
// at most S I + lbias + U0 + E_r P + n_r Q (U0 = 2 (bias - lbias); E_r, n_r: the row's own), so from
// y >= S I + beta - 2 margin, ub = y + (E + E_r) P + (n + n_r) Q + U0 + 2 margin (note_candidates,
// with rounding margins). Codes whose y is <= the threshold are the row's candidates, rescored
// exactly at the end (search_i8): the answer is the exact argmin, not an estimate.
//
// vpdpbusd multiplies unsigned bytes by signed bytes: rows are stored as q_x + 128 (1..255) and the
// accumulators start at -128 * sum(q_c) (+ M), so they end at q_x . q_c exactly (+ M; no int32 overflow).
// Panels: 32 codes, [Dq / 4][32 codes][4 bytes], Dq = D rounded up to 4 (zero padding).

#define VQK_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512vnni")))

constexpr int64_t kI8MaxD = 1024;       // 127^2 * 1024 < 2^24: I is exact in fp32
constexpr int64_t kI8MagicMaxD = 260;   // 127^2 * 260 < 2^22: M + I is an fp32 number with ulp 1
constexpr int32_t kI8Magic = 0x4B400000;  // the bits of M = 1.5 * 2^23
constexpr float kI8MagicF = 12582912.f;
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

// A vector quantized to int8 with a given scale a: a, an upper bound of ||v - a q|| (the real
// product a q), sum(q); ok = false when v is not finite.
struct I8Vec {
  float scale, err;
  int32_t sum;
  bool ok;
};

// max |v_d| (the callers pass finite vectors: tame_norm2 / all_tame).
VQK_AVX512VNNI inline float max_abs_f32(const float* v, int64_t D) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 mx = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_maskz_loadu_ps(m, v + d), absmask));
  }
  return _mm512_reduce_max_ps(mx);
}

// The scale of vectors whose largest max|v| is m: m / 127 (1 when m = 0).
inline float i8_scale(float m) { return m > 0.f ? m / 127.f : 1.f; }

// q[0..D) = round(v / a) clamped to [-127, 127] (as int8) and the error bound, for a scale a >= max|v| / 127
// (up to rounding; not ok if some |v/a| > 254). With y = fl(v * fl(1/a)): |y - v/a| <= 2.01 u |v/a|
// <= 512 u; e = y - q is exact (q = 0, or Sterbenz: q/2 <= y <= 2q, clamped or not); so
// ||v/a - q|| <= ||e|| + 512 u sqrt(D), and the fp32 sum of the e^2 is within gamma_{D+8} of theirs.
VQK_AVX512VNNI inline I8Vec quantize_i8_at(const float* v, int64_t D, float a, int8_t* q) {
  const float inv = 1.f / a;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512 e2 = _mm512_setzero_ps();
  __m512i s = _mm512_setzero_si512();
  bool finite = true;
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m16 = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    const __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(m16, v + d), vinv);
    finite = finite && _mm512_cmp_ps_mask(y, y, _CMP_ORD_Q) == (__mmask16)0xFFFF &&
             _mm512_cmp_ps_mask(_mm512_abs_ps(y), _mm512_set1_ps(254.f), _CMP_LE_OQ) == (__mmask16)0xFFFF;
    __m512i qi = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    qi = _mm512_min_epi32(_mm512_max_epi32(qi, lo), hi);
    const __m512 e = _mm512_sub_ps(y, _mm512_cvtepi32_ps(qi));
    e2 = _mm512_fmadd_ps(e, e, e2);
    s = _mm512_add_epi32(s, qi);
    _mm512_mask_cvtepi32_storeu_epi8(q + d, m16, qi);
  }
  if (!finite) return {1.f, 0.f, 0, false};
  const double u = std::ldexp(1.0, -24), n = double(D) + 8.0, g = n * u / (1.0 - n * u);
  const double en = std::sqrt((double)_mm512_reduce_add_ps(e2) * (1.0 + 2.0 * g)) + 512.0 * u * std::sqrt((double)D);
  return {a, (float)(en * (double)a * (1.0 + 4.0 * u)), _mm512_reduce_add_epi32(s), true};
}

// A row's candidates: codes that may be its nearest, with their lower bounds (n of them). k is the
// code's position in the sorted panels (Impl::perm maps it back).
struct I8List {
  std::vector<float> lb;
  std::vector<int32_t> k;
  size_t n = 0;
};

// Per panel: the codes' scale a_p, and the largest |lbias| (finite ones), P and Q among its codes.
struct I8Panel {
  float scale, maxL, maxP, maxQ;
};

// The margin that keeps the computed bound y below L (see the header), for the panel bound G and S.
inline float i8_margin(float G, float S) {
  return (4.2f * 0x1p-24f * G + 1.9f * std::fabs(S)) * (1.f + 0x1p-20f);
}

// What the rare path of micro_screen_i8 needs: per code (sorted order) P, Q, U = U0 + margin, per
// row of the group E_r and n_r, the group's E and n, the number of codes, the rows' candidate lists.
struct I8Ctx {
  const float* P;
  const float* Q;
  const float* U;
  const float* E;
  const float* nx;
  float Eg, ng;
  int64_t K;
  I8List* cands;
};

// The rare path: a panel where some codes' lower bounds y are <= their row's threshold (masks). Lowers
// the threshold to the least *upper* bound of those codes (see the header), then appends the codes whose
// y is still <= it to the row's candidates. Every code left out scores strictly above some other code,
// so the row's exact argmin (lowest index among equal scores) stays among the candidates.
VQK_AVX512 __attribute__((noinline)) void note_candidates(const I8Ctx& c, int R, const uint32_t* masks,
                                                          const float* lbuf, int64_t k0, float marg,
                                                          float* thr) {
  const __m512 P0 = _mm512_loadu_ps(c.P + k0), P1 = _mm512_loadu_ps(c.P + k0 + 16);
  const __m512 Q0 = _mm512_loadu_ps(c.Q + k0), Q1 = _mm512_loadu_ps(c.Q + k0 + 16);
  const __m512 U0 = _mm512_add_ps(_mm512_loadu_ps(c.U + k0), _mm512_set1_ps(2.f * marg));
  const __m512 U1 = _mm512_add_ps(_mm512_loadu_ps(c.U + k0 + 16), _mm512_set1_ps(2.f * marg));
  const __m512 up = _mm512_set1_ps(1.f + 0x1p-16f), rel = _mm512_set1_ps(0x1p-17f), ninf = _mm512_set1_ps(-inf_f());
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
    const __m512 ee = _mm512_set1_ps(c.Eg + c.E[r]), nn = _mm512_set1_ps(c.ng + c.nx[r]);
    // w = (E + E_r) P + (n + n_r) Q + U0 + 2 margin (all >= 0), rounded up; ub = y + w + 2^-17 |y|
    const __m512 w0 = _mm512_mul_ps(_mm512_fmadd_ps(ee, P0, _mm512_fmadd_ps(nn, Q0, U0)), up);
    const __m512 w1 = _mm512_mul_ps(_mm512_fmadd_ps(ee, P1, _mm512_fmadd_ps(nn, Q1, U1)), up);
    const __m512 ub0 = _mm512_fmadd_ps(rel, _mm512_and_ps(l0, absmask), _mm512_add_ps(l0, w0));
    const __m512 ub1 = _mm512_fmadd_ps(rel, _mm512_and_ps(l1, absmask), _mm512_add_ps(l1, w1));
    // codes with y = -inf (not bounded) give no upper bound
    const __mmask16 b0 = _mm512_mask_cmp_ps_mask((__mmask16)m, l0, ninf, _CMP_NEQ_OQ);
    const __mmask16 b1 = _mm512_mask_cmp_ps_mask((__mmask16)(m >> 16), l1, ninf, _CMP_NEQ_OQ);
    const __m512 pinf = _mm512_set1_ps(inf_f());
    const __m512 ubm = _mm512_min_ps(_mm512_mask_mov_ps(pinf, b0, ub0), _mm512_mask_mov_ps(pinf, b1, ub1));
    const float th = std::min(thr[r], _mm512_reduce_min_ps(ubm));
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

// R rows (bytes q_x + 128 at the group's scale, stride Dq) against np int8 panels; see the header.
// corr/lbias/P/Q/pan start at the chunk (code kbase, sorted order); sg = fl(alpha a_g); thr[r] the
// row's threshold (an upper bound of its least exact score; +inf to start, NaN: not screened), lowered
// as panels go. kMagic: the accumulators start at M (corr holds it) and are read as floats.
template <int R, bool kMagic>
VQK_AVX512VNNI void micro_screen_i8(const uint8_t* __restrict x, int64_t Dq, const int8_t* __restrict panels,
                                    const int32_t* __restrict corr, const I8Panel* __restrict pan,
                                    const float* __restrict lbias, const float* __restrict P,
                                    const float* __restrict Q, int64_t np, int64_t kbase, float sg,
                                    const I8Ctx& ctx, float* thr) {
  __m512 bv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) bv[r] = _mm512_set1_ps(thr[r]);
  const __m512 Ev = _mm512_set1_ps(ctx.Eg), nv = _mm512_set1_ps(ctx.ng);
  const int64_t groups = Dq / 4;
  const int64_t pstride = Dq * kPanel;
  for (int64_t p = 0; p < np; ++p) {
    const int8_t* W = panels + p * pstride;
    const int64_t k = p * kPanel;
    __m512i acc0[R], acc1[R];
    {  // the first 4 dimensions start from the per-code correction -128 sum(q_c) (+ M)
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
    // the panel's S, margin and beta' (once for the R rows)
    const I8Panel pp = pan[p];
    const float S = sg * pp.scale;
    const float G = (pp.maxL + ctx.Eg * pp.maxP + ctx.ng * pp.maxQ) * (1.f + 0x1p-20f);
    const float marg = i8_margin(G, S);
    const __m512 Cv = _mm512_set1_ps(kMagic ? -kI8MagicF * S - marg : -marg);
    const __m512 Sv = _mm512_set1_ps(S);
    const __m512 be0 = _mm512_add_ps(
        _mm512_fnmadd_ps(nv, _mm512_loadu_ps(Q + k), _mm512_fnmadd_ps(Ev, _mm512_loadu_ps(P + k), _mm512_loadu_ps(lbias + k))), Cv);
    const __m512 be1 = _mm512_add_ps(
        _mm512_fnmadd_ps(nv, _mm512_loadu_ps(Q + k + 16),
                         _mm512_fnmadd_ps(Ev, _mm512_loadu_ps(P + k + 16), _mm512_loadu_ps(lbias + k + 16))), Cv);
    __m512 lb0[R], lb1[R];
    uint32_t mk[R];
    uint32_t any = 0;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if constexpr (kMagic) {
        lb0[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(acc0[r]), Sv, be0);
        lb1[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(acc1[r]), Sv, be1);
      } else {
        lb0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc0[r]), Sv, be0);
        lb1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc1[r]), Sv, be1);
      }
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
      note_candidates(ctx, R, mk, lbuf, kbase + k, marg, thr);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) bv[r] = _mm512_set1_ps(thr[r]);
    }
  }
}
