// The body of the CPU cached-decoding kernel (csrc/cpu/attention.cpp), included twice: once inside
// `#pragma GCC target("avx512...")` in namespace avx512 (VQK_ATTN_AVX512 = 1: explicit AVX-512 math), once
// in namespace portable (VQK_ATTN_AVX512 = 0: scalar loops, for CPUs without AVX-512). No include guard
// on purpose; attention.cpp includes everything this needs first.
//
// One task = one (sequence b, kv head, key range) and all R = G * Tq query rows that read that kv head
// (G = H / Hkv grouped heads): every key and value row is loaded once for the R rows, never expanded per
// head. Keys are walked in blocks of kKeyBlock with an online softmax (running max m, sum l, fp32 acc).

// ---- fp32 primitives ------------------------------------------------------------------------------
// dot, row_max, exp_sub_sum, scale_row (and exp_ps, tail_mask) are the shared ones of simd_avx512.h.
#if VQK_ATTN_AVX512
using ::vqkernels::cpu::avx512::dot;
using ::vqkernels::cpu::avx512::exp_ps;
using ::vqkernels::cpu::avx512::exp_sub_sum;
using ::vqkernels::cpu::avx512::row_max;
using ::vqkernels::cpu::avx512::scale_row;
using ::vqkernels::cpu::avx512::tail_mask;

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a x
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    _mm512_mask_storeu_ps(y + d, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + d), _mm512_maskz_loadu_ps(m, y + d)));
  }
}

// Widen n elements to fp32.
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    const __m256i h = _mm256_maskz_loadu_epi16(m, src + d);
    _mm512_mask_storeu_ps(dst + d, m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
}
inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = tail_mask(n - d);
    _mm512_mask_storeu_ps(dst + d, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + d)));
  }
}
#else
using ::vqkernels::cpu::portable::dot;
using ::vqkernels::cpu::portable::exp_sub_sum;
using ::vqkernels::cpu::portable::row_max;
using ::vqkernels::cpu::portable::scale_row;

inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}
#endif

// ---- one task ---------------------------------------------------------------------------------------
// Query positions t in [t0, t1) of sequence b, every query head of kv head hk: rows r = g * nt + (t - t0)
// (query head hk * G + g; query t sits at position len - Tq + t and sees keys [0, len - Tq + t]).
// Keys [j0, j1) of this task; on return m[r], l[r], acc[r * Dh ...] hold the row's running max, sum and
// unnormalised output over those keys (m = -inf, l = 0, acc = 0 for a row that sees none of them).
template <typename T>
void decode_task(const DecodeArgs<T>& a, int64_t b, int64_t hk, int64_t t0, int64_t t1, int64_t j0, int64_t j1,
                 float* m, float* l, float* acc, Scratch& s) {
  const int64_t G = a.H / a.Hkv, Tq = a.Tq, Dh = a.Dh, nt = t1 - t0, R = G * nt;
  const int64_t len = a.lens[b];
  s.reserve(R, Dh);
  // q rows, widened and pre-multiplied by scale.
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = t0; t < t1; ++t) {
      float* qr = s.q.data() + (g * nt + t - t0) * Dh;
      to_float(a.q + b * a.sqb + (hk * G + g) * a.sqh + t * a.sqt, qr, Dh);
      scale_row(qr, a.scale, Dh);
    }
  for (int64_t r = 0; r < R; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  std::fill(acc, acc + R * Dh, 0.f);
  const T* kbase = a.k + b * a.skb + hk * a.skh;
  const T* vbase = a.v + b * a.svb + hk * a.svh;
  const float* krow[kKeyBlock];
  const float* vrow[kKeyBlock];
  int64_t* nvis = s.nvis.data();
  // Keys past the last row's last key are never read (nor anything at or past len).
  j1 = std::min(j1, len - Tq + t1);
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, j1 - jb);
    // How many of this block's keys row r sees (0..n).
    int64_t nmax = 0;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t last = len - Tq + t0 + (r % nt);
      nvis[r] = std::max<int64_t>(0, std::min<int64_t>(n, last - jb + 1));
      nmax = std::max(nmax, nvis[r]);
    }
    for (int64_t jj = 0; jj < nmax; ++jj) {
      const T* kp = kbase + (jb + jj) * a.skt;
      const T* vp = vbase + (jb + jj) * a.svt;
      if constexpr (std::is_same_v<T, float>) {
        krow[jj] = kp;
        vrow[jj] = vp;
      } else {
        float* kd = s.k.data() + jj * Dh;
        float* vd = s.v.data() + jj * Dh;
        to_float(kp, kd, Dh);
        to_float(vp, vd, Dh);
        krow[jj] = kd;
        vrow[jj] = vd;
      }
    }
    // Scores, key-major so that a key row is read once for all R query rows.
    float* sc = s.s.data();
    for (int64_t jj = 0; jj < nmax; ++jj)
      for (int64_t r = 0; r < R; ++r)
        if (jj < nvis[r]) sc[r * kKeyBlock + jj] = dot(s.q.data() + r * Dh, krow[jj], Dh);
    // Online softmax per row.
    for (int64_t r = 0; r < R; ++r) {
      if (nvis[r] == 0) continue;
      float* sr = sc + r * kKeyBlock;
      const float mnew = std::max(m[r], row_max(sr, nvis[r]));
      if (mnew != m[r] && l[r] > 0.f) {
        const float c = std::exp(m[r] - mnew);
        l[r] *= c;
        scale_row(acc + r * Dh, c, Dh);
      }
      m[r] = mnew;
      l[r] += exp_sub_sum(sr, mnew, nvis[r]);
    }
    for (int64_t jj = 0; jj < nmax; ++jj)
      for (int64_t r = 0; r < R; ++r)
        if (jj < nvis[r]) axpy(acc + r * Dh, sc[r * kKeyBlock + jj], vrow[jj], Dh);
  }
}

#if VQK_ATTN_AVX512
// ---- the fast path: Dh a multiple of 16, at most 256 ---------------------------------------------------
// Same task and block structure as decode_task, but each row's q, running max/sum and output accumulator
// live in registers while it sweeps a key block, scores are computed 16 keys at a time (16 partial-sum
// vectors folded by one shuffle tree instead of 16 horizontal reductions), and float16/bfloat16 keys and
// values are widened in registers (no scratch copy).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// v[i] holds 16 partial sums of key i; returns the vector of the 16 keys' totals, in key order.
inline __m512 reduce16(__m512 v[16]) {
  __m512 w[8];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 key 2i, lanes 8-15 key 2i+1 (8 partials each)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  __m512 x[4];
  for (int i = 0; i < 4; ++i)  // 128-bit quarters: quarter j holds key 4i + j (4 partials)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  __m512 y[2];
  for (int i = 0; i < 2; ++i)  // quarter j: [key 8i + j (2 partials), key 8i + 4 + j (2 partials)]
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  // quarter j: [key j, key 4 + j, key 8 + j, key 12 + j]
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

template <typename T, int NV>
void decode_task_fast(const DecodeArgs<T>& a, int64_t b, int64_t hk, int64_t t0, int64_t t1, int64_t j0,
                      int64_t j1, float* m, float* l, float* acc, Scratch& s) {
  constexpr int64_t Dh = NV * 16;
  const int64_t G = a.H / a.Hkv, Tq = a.Tq, nt = t1 - t0, R = G * nt;
  const int64_t len = a.lens[b];
  s.reserve(R, Dh);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = t0; t < t1; ++t) {
      float* qr = s.q.data() + (g * nt + t - t0) * Dh;
      const T* src = a.q + b * a.sqb + (hk * G + g) * a.sqh + t * a.sqt;
      const __m512 sc = _mm512_set1_ps(a.scale);
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(qr + 16 * c, _mm512_mul_ps(load16(src + 16 * c), sc));
    }
  for (int64_t r = 0; r < R; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  std::fill(acc, acc + R * Dh, 0.f);
  const T* kbase = a.k + b * a.skb + hk * a.skh;
  const T* vbase = a.v + b * a.svb + hk * a.svh;
  j1 = std::min(j1, len - Tq + t1);
  alignas(64) float p[kKeyBlock];
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, j1 - jb);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t last = len - Tq + t0 + (r % nt);
      const int64_t nv = std::max<int64_t>(0, std::min<int64_t>(n, last - jb + 1));
      if (nv == 0) continue;
      const float* qr = s.q.data() + r * Dh;
      __m512 q[NV];
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) q[c] = _mm512_loadu_ps(qr + 16 * c);
      // Scores of the nv visible keys, 16 at a time (keys past nv: -inf).
      __m512 bmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < nv; j += 16) {
        const int64_t cnt = std::min<int64_t>(16, nv - j);
        __m512 part[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          part[i] = _mm512_setzero_ps();
          if (i < cnt) {
            const T* kp = kbase + (jb + j + i) * a.skt;
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) part[i] = _mm512_fmadd_ps(q[c], load16(kp + 16 * c), part[i]);
          }
        }
        const __mmask16 live = tail_mask(cnt);
        const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), live,
                                             reduce16(part));
        _mm512_store_ps(p + j, sv);
        bmax = _mm512_max_ps(bmax, sv);
      }
      const float mnew = std::max(m[r], _mm512_reduce_max_ps(bmax));
      const float c = l[r] > 0.f ? std::exp(m[r] - mnew) : 0.f;
      // p = exp(s - mnew), summed.
      const __m512 vm = _mm512_set1_ps(mnew);
      __m512 psum = _mm512_setzero_ps();
      for (int64_t j = 0; j < nv; j += 16) {
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_load_ps(p + j), vm));  // -inf scores give 0
        _mm512_store_ps(p + j, e);
        psum = _mm512_add_ps(psum, e);
      }
      l[r] = l[r] * c + _mm512_reduce_add_ps(psum);
      m[r] = mnew;
      float* ar = acc + r * Dh;
      __m512 o[NV];
      const __m512 vc = _mm512_set1_ps(c);
#pragma GCC unroll 16
      for (int cc = 0; cc < NV; ++cc) o[cc] = _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * cc), vc);
      for (int64_t j = 0; j < nv; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        const T* vp = vbase + (jb + j) * a.svt;
#pragma GCC unroll 16
        for (int cc = 0; cc < NV; ++cc) o[cc] = _mm512_fmadd_ps(pj, load16(vp + 16 * cc), o[cc]);
      }
#pragma GCC unroll 16
      for (int cc = 0; cc < NV; ++cc) _mm512_storeu_ps(ar + 16 * cc, o[cc]);
    }
  }
}

// The fast path for Dh in {16, 32, ..., 256}; false when Dh is not one of them.
template <typename T>
bool decode_task_dispatch(const DecodeArgs<T>& a, int64_t b, int64_t hk, int64_t t0, int64_t t1, int64_t j0,
                          int64_t j1, float* m, float* l, float* acc, Scratch& s) {
  switch (a.Dh) {
#define VQK_ATTN_CASE(NV) \
  case NV * 16: decode_task_fast<T, NV>(a, b, hk, t0, t1, j0, j1, m, l, acc, s); return true;
    VQK_ATTN_CASE(1) VQK_ATTN_CASE(2) VQK_ATTN_CASE(3) VQK_ATTN_CASE(4) VQK_ATTN_CASE(5) VQK_ATTN_CASE(6)
    VQK_ATTN_CASE(7) VQK_ATTN_CASE(8) VQK_ATTN_CASE(10) VQK_ATTN_CASE(12) VQK_ATTN_CASE(16)
#undef VQK_ATTN_CASE
    default: return false;
  }
}
#endif
