// The AVX-512 micro-kernels of nearest_code (csrc/cpu/nearest_code.cpp). Included twice, inside a
// namespace per ISA: VQK_TARGET is the function target attribute, VQK_KERNELS_BF16 says whether the
// bf16 (vdpbf16ps) kernels are compiled in. Not a standalone header.
// NOLINTBEGIN
// The dots of R rows against one packed panel (32 codes): acc0 = codes 0..15, acc1 = codes 16..31.
// Each lane is one FMA chain over d in increasing order, the same sequence for every R, so the
// fix-up (R = 1) recomputes bit-identical scores.
template <int R, int DT>
VQK_TARGET inline __attribute__((always_inline)) void panel_dots(const float* __restrict x, int64_t ldx,
                                                                 int64_t Drt, const float* __restrict P,
                                                                 __m512* acc0, __m512* acc1) {
  const int64_t D = DT > 0 ? DT : Drt;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int64_t d = 0; d < D; ++d) {
    const __m512 c0 = _mm512_loadu_ps(P + d * kPanel);
    const __m512 c1 = _mm512_loadu_ps(P + d * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + d]);
      acc0[r] = _mm512_fmadd_ps(xv, c0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(xv, c1, acc1[r]);
    }
  }
}

#if VQK_KERNELS_BF16
// bf16: x rows (stride ldx, even D = Dp: pairs), panels packed [Dp/2][32 codes][2].
// vdpbf16ps: acc += x[2i]*c[2i] + x[2i+1]*c[2i+1], exact products, fp32 sums.
template <int R, int DT>
VQK_TARGET inline __attribute__((always_inline)) void panel_dots(
    const c10::BFloat16* __restrict x, int64_t ldx, int64_t Drt, const c10::BFloat16* __restrict P,
    __m512* acc0, __m512* acc1) {
  const int64_t npairs = (DT > 0 ? DT : Drt) / 2;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < npairs; ++i) {
    const __m512bh c0 = (__m512bh)_mm512_loadu_si512(P + i * 2 * kPanel);
    const __m512bh c1 = (__m512bh)_mm512_loadu_si512(P + i * 2 * kPanel + 32);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * i, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, c0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, c1);
    }
  }
}

// Screened exact fp32 search (see "bf16 screen" in nearest_code.cpp). R rows against np bf16 panels:
// per code a lower bound of the exact fp32 score, lb = alpha * dot_bf16 + lbias - nx * amar, and the
// codes whose bound is strictly below the row's best exact score so far are rescored exactly
// (rescore_rows, nearest_code.cpp).
template <int R, int DT>
VQK_TARGET void micro_screen(const c10::BFloat16* __restrict x, int64_t ldx, int64_t Dp,
                             const c10::BFloat16* __restrict panels, const float* __restrict lbias,
                             const float* __restrict amar, int64_t np, int64_t kbase, const float* nx,
                             const ScreenCtx& ctx, float* best, int64_t* bidx, int64_t* nrescored) {
  __m512 bv[R], nxv[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    bv[r] = _mm512_set1_ps(best[r]);
    nxv[r] = _mm512_set1_ps(nx[r]);
  }
  const __m512 va = _mm512_set1_ps(ctx.alpha);
  const int64_t pstride = (DT > 0 ? DT : Dp) * kPanel;
  for (int64_t p = 0; p < np; ++p) {
    __m512 acc0[R], acc1[R];
    panel_dots<R, DT>(x, ldx, Dp, panels + p * pstride, acc0, acc1);
    const __m512 b0 = _mm512_loadu_ps(lbias + p * kPanel);
    const __m512 b1 = _mm512_loadu_ps(lbias + p * kPanel + 16);
    const __m512 a0 = _mm512_loadu_ps(amar + p * kPanel);
    const __m512 a1 = _mm512_loadu_ps(amar + p * kPanel + 16);
    uint32_t mk[R];
    uint32_t any = 0;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_fnmadd_ps(nxv[r], a0, _mm512_fmadd_ps(va, acc0[r], b0));  // lower bounds
      acc1[r] = _mm512_fnmadd_ps(nxv[r], a1, _mm512_fmadd_ps(va, acc1[r], b1));
      mk[r] = (uint32_t)_mm512_cmp_ps_mask(acc0[r], bv[r], _CMP_LT_OQ) |
              ((uint32_t)_mm512_cmp_ps_mask(acc1[r], bv[r], _CMP_LT_OQ) << 16);
      any |= mk[r];
    }
    if (__builtin_expect(any != 0, 0)) {
      alignas(64) float lbuf[R * 32];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        _mm512_store_ps(lbuf + r * 32, acc0[r]);
        _mm512_store_ps(lbuf + r * 32 + 16, acc1[r]);
      }
      rescore_rows(ctx, R, mk, lbuf, kbase + p * kPanel, best, bidx, nrescored);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) bv[r] = _mm512_set1_ps(best[r]);
    }
  }
}

#endif  // VQK_KERNELS_BF16

// R rows (stride ldx) against np packed panels starting at global panel index pbase.
// Per row, 16 lanes of running (min score, panel index): a panel updates a lane only when one of
// its two scores for that lane is strictly below the lane's best (NaN never is), so each lane keeps
// the first panel reaching its minimum; which of the panel's two codes it was is resolved later
// (resolve_row). That costs 2 fmadd + 2 min + 1 cmp + 1 mask_mov per row and 32 codes.
template <int R, int DT, typename T>
VQK_TARGET void micro(const T* __restrict x, int64_t ldx, int64_t D, const T* __restrict panels,
                          const float* __restrict bias, int64_t np, int32_t pbase, float alpha,
                          float* __restrict best, int32_t* __restrict bpan) {
  __m512 b[R];
  __m512i bp[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    b[r] = _mm512_loadu_ps(best + 16 * r);
    bp[r] = _mm512_loadu_si512(bpan + 16 * r);
  }
  const __m512 va = _mm512_set1_ps(alpha);
  __m512i pv = _mm512_set1_epi32(pbase);
  const __m512i one = _mm512_set1_epi32(1);
  const int64_t pstride = (DT > 0 ? DT : D) * kPanel;
  for (int64_t p = 0; p < np; ++p) {
    __m512 acc0[R], acc1[R];
    panel_dots<R, DT>(x, ldx, D, panels + p * pstride, acc0, acc1);
    const __m512 n0 = _mm512_loadu_ps(bias + p * kPanel);
    const __m512 n1 = _mm512_loadu_ps(bias + p * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 s0 = _mm512_fmadd_ps(va, acc0[r], n0);
      const __m512 s1 = _mm512_fmadd_ps(va, acc1[r], n1);
      const __m512 bn = _mm512_min_ps(s1, _mm512_min_ps(s0, b[r]));  // NaN s: keeps the 2nd operand
      const __mmask16 m = _mm512_cmp_ps_mask(bn, b[r], _CMP_LT_OQ);
      b[r] = bn;
      bp[r] = _mm512_mask_mov_epi32(bp[r], m, pv);
    }
    pv = _mm512_add_epi32(pv, one);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(best + 16 * r, b[r]);
    _mm512_storeu_si512(bpan + 16 * r, bp[r]);
  }
}

// One row's result from its 16 lanes of (best score, first panel reaching it): the min score, and
// the lowest code index holding it. The candidate panels are recomputed with the same instruction
// sequence as the kernel (bit-identical scores) to tell the panel's two codes of a lane apart.
template <typename T>
VQK_TARGET void resolve_row(const T* xrow, int64_t D, const T* packed, const float* bias,
                                float alpha, const float* best, const int32_t* bpan, float* v_out,
                                int64_t* i_out) {
  const __m512 b = _mm512_loadu_ps(best);
  const __m512i bp = _mm512_loadu_si512(bpan);
  const float m = _mm512_reduce_min_ps(b);
  *v_out = m;
  if (!(m < inf_f())) {  // no score below +inf anywhere: index 0 (as argmin over all-inf)
    *i_out = 0;
    return;
  }
  const __m512 vm = _mm512_set1_ps(m);
  __mmask16 cand = _mm512_cmp_ps_mask(b, vm, _CMP_EQ_OQ);
  alignas(64) int32_t pans[16];
  _mm512_store_si512(pans, bp);
  int64_t best_code = std::numeric_limits<int64_t>::max();
  const __m512 va = _mm512_set1_ps(alpha);
  while (cand) {
    const int l = __builtin_ctz(cand);
    const int64_t p = pans[l];
    // all candidate lanes of this panel at once
    const __mmask16 same = _mm512_mask_cmpeq_epi32_mask(cand, bp, _mm512_set1_epi32((int32_t)p));
    cand &= (__mmask16)~same;
    __m512 acc0[1], acc1[1];
    panel_dots<1, 0>(xrow, 0, D, packed + p * kPanel * D, acc0, acc1);
    const __m512 s0 = _mm512_fmadd_ps(va, acc0[0], _mm512_loadu_ps(bias + p * kPanel));
    const __m512 s1 = _mm512_fmadd_ps(va, acc1[0], _mm512_loadu_ps(bias + p * kPanel + 16));
    const __mmask16 e0 = _mm512_mask_cmp_ps_mask(same, s0, vm, _CMP_EQ_OQ);
    const __mmask16 e1 = _mm512_mask_cmp_ps_mask(same, s1, vm, _CMP_EQ_OQ);
    if (e0) best_code = std::min<int64_t>(best_code, p * kPanel + __builtin_ctz(e0));
    else if (e1) best_code = std::min<int64_t>(best_code, p * kPanel + 16 + __builtin_ctz(e1));
  }
  TORCH_CHECK(best_code != std::numeric_limits<int64_t>::max(),
              "cpu nearest_code: internal error resolving the argmin");
  *i_out = best_code;
}

// NOLINTEND
