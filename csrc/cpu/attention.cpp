// Cached decoding attention on the CPU: attention_decode (schema in csrc/registration.cpp; the spec is
// attention_decode_reference in vqkernels/ops/attention/reference.py).
//
// q (B, H, Tq, Dh), k_cache / v_cache (B, Hkv, Tmax, Dh) (any strides with a unit last-dim stride: read in
// place), cache_seqlens int32 (B,) with Tq <= len_b <= Tmax. Query t of sequence b sits at position
// len_b - Tq + t and attends to cache positions [0, len_b - Tq + t]; out (B, H, Tq, Dh) in q's dtype.
//
// Why our own kernel beats what a user writes with SDPA over a preallocated cache (mask (B, 1, Tq, Tmax)):
//  * no mask tensor and no copy of the cache: the cache is read in place through its strides;
//  * only [0, len_b) is read (SDPA reads all Tmax positions and masks): a short sequence in a long cache
//    costs its length, and nothing past len_b is ever touched (a NaN there cannot reach the output);
//  * grouped heads without expanding: one task reads each key/value row of a kv head once for all the
//    G = H / Hkv query heads that share it;
//  * Tq = 1 has no GEMM to amortise: the work is a stream over the cache, so the kernel is a plain
//    online-softmax loop (fp32 dot, exp, axpy), AVX-512 where the CPU has it.
// Work split: tasks over (b, kv head, chunk of query positions) and, when that gives fewer tasks than a
// few per core and the cache is long, over key ranges too (flash-decoding: each split keeps (max, sum,
// acc) and a second pass combines them). The split depends only on the shapes, never on the thread count,
// so the result is bit-identical for any number of threads.
// Arithmetic: fp32 accumulation for every input dtype (float16/bfloat16 rows are widened per block).
// AVX-512 is chosen at run time (has_avx512(), search.h); VQKERNELS_CPU_NO_AVX512=1 or a CPU without it
// runs the portable scalar loops of the same algorithm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "search.h"
#include "simd_avx512.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VQK_ATTN_X86 1
#else
#define VQK_ATTN_X86 0
#endif

namespace vqkernels {
namespace {

constexpr int64_t kKeyBlock = 64;      // keys per online-softmax step (scores of a block stay in L1)
constexpr int64_t kMaxTaskRows = 64;   // query rows (G heads x query positions) per task
constexpr int64_t kSplitKeys = 512;    // a key split covers at least this many cache positions

template <typename T>
struct DecodeArgs {
  const T* q;
  const T* k;
  const T* v;
  const int32_t* lens;
  int64_t H, Hkv, Tq, Dh;
  int64_t sqb, sqh, sqt, skb, skh, skt, svb, svh, svt;
  float scale;
};

struct Scratch {
  std::vector<float> q, k, v, s;
  std::vector<int64_t> nvis;
  void reserve(int64_t R, int64_t Dh) {
    if ((int64_t)q.size() < R * Dh) q.resize(R * Dh);
    if ((int64_t)k.size() < kKeyBlock * Dh) {
      k.resize(kKeyBlock * Dh);
      v.resize(kKeyBlock * Dh);
    }
    if ((int64_t)s.size() < R * kKeyBlock) s.resize(R * kKeyBlock);
    if ((int64_t)nvis.size() < R) nvis.resize(R);
  }
};

#if VQK_ATTN_X86 && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace avx512 {
#define VQK_ATTN_AVX512 1
#include "attention_kernel.h"
#undef VQK_ATTN_AVX512
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace portable {
#define VQK_ATTN_AVX512 0
#include "attention_kernel.h"
#undef VQK_ATTN_AVX512
}  // namespace portable

template <typename T>
void run_task(bool avx, const DecodeArgs<T>& a, int64_t b, int64_t hk, int64_t t0, int64_t t1, int64_t j0,
              int64_t j1, float* m, float* l, float* acc, Scratch& s) {
#if VQK_ATTN_X86 && defined(__GNUC__)
  if (avx) {
    if (!avx512::decode_task_dispatch<T>(a, b, hk, t0, t1, j0, j1, m, l, acc, s))
      avx512::decode_task<T>(a, b, hk, t0, t1, j0, j1, m, l, acc, s);
    return;
  }
#endif
  (void)avx;
  portable::decode_task<T>(a, b, hk, t0, t1, j0, j1, m, l, acc, s);
}

template <typename T>
void store_row(T* dst, const float* acc, float inv, int64_t Dh) {
  for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<T>(acc[d] * inv);
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& lens_i32,
            double scale, at::Tensor& out) {
  DecodeArgs<T> a;
  a.q = q.data_ptr<T>();
  a.k = kc.data_ptr<T>();
  a.v = vc.data_ptr<T>();
  a.lens = lens_i32.data_ptr<int32_t>();
  a.H = q.size(1);
  a.Hkv = kc.size(1);
  a.Tq = q.size(2);
  a.Dh = q.size(3);
  a.sqb = q.stride(0), a.sqh = q.stride(1), a.sqt = q.stride(2);
  a.skb = kc.stride(0), a.skh = kc.stride(1), a.skt = kc.stride(2);
  a.svb = vc.stride(0), a.svh = vc.stride(1), a.svt = vc.stride(2);
  a.scale = static_cast<float>(scale);
  const int64_t B = q.size(0), G = a.H / a.Hkv, Tq = a.Tq, Dh = a.Dh, Tmax = kc.size(2);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(Tq, kMaxTaskRows / G));  // query positions per task
  const int64_t ntc = (Tq + nt - 1) / nt;
  const int64_t base_tasks = B * a.Hkv * ntc;
  // Key splits only when the (b, head, chunk) tasks cannot keep the cores busy; from the shapes alone.
  int64_t nsplit = 1;
  if (base_tasks < 16 && Tmax >= 2 * kSplitKeys)
    nsplit = std::min<int64_t>((16 + base_tasks - 1) / base_tasks, Tmax / kSplitKeys);
  const int64_t split_len = ((Tmax + nsplit - 1) / nsplit + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const int64_t rows_max = G * nt;
  const int64_t ntasks = base_tasks * nsplit;
  const bool avx = cpu::has_avx512();
  T* o = out.data_ptr<T>();  // contiguous (B, H, Tq, Dh)
  // Partial results of key splits: (task, row) m, l and (task, row, Dh) acc.
  std::vector<float> pm, pl, pacc;
  if (nsplit > 1) {
    pm.resize(ntasks * rows_max);
    pl.resize(ntasks * rows_max);
    pacc.resize(ntasks * rows_max * Dh);
  }
  const int64_t work_per_task = std::max<int64_t>(1, rows_max * std::min(Tmax, split_len) * Dh);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / work_per_task);
  at::parallel_for(0, ntasks, grain, [&](int64_t begin, int64_t end) {
    Scratch s;
    std::vector<float> m(rows_max), l(rows_max), acc(nsplit > 1 ? 0 : rows_max * Dh);
    for (int64_t task = begin; task < end; ++task) {
      int64_t rest = task;
      const int64_t sp = rest % nsplit;
      rest /= nsplit;
      const int64_t tc = rest % ntc;
      rest /= ntc;
      const int64_t hk = rest % a.Hkv;
      const int64_t b = rest / a.Hkv;
      const int64_t t0 = tc * nt, t1 = std::min(Tq, t0 + nt), ntt = t1 - t0;
      const int64_t j0 = sp * split_len, j1 = std::min(Tmax, j0 + split_len);
      float* pmr = nsplit > 1 ? pm.data() + task * rows_max : m.data();
      float* plr = nsplit > 1 ? pl.data() + task * rows_max : l.data();
      float* par = nsplit > 1 ? pacc.data() + task * rows_max * Dh : acc.data();
      run_task<T>(avx, a, b, hk, t0, t1, j0, j1, pmr, plr, par, s);
      if (nsplit > 1) continue;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r = g * ntt + (t - t0);
          // Every row sees at least key 0 (len >= Tq), so l > 0.
          store_row<T>(o + (((b * a.H) + hk * G + g) * Tq + t) * Dh, par + r * Dh, 1.f / plr[r], Dh);
        }
    }
  });
  if (nsplit == 1) return;
  // Combine the key splits of each (b, kv head, query chunk): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
  at::parallel_for(0, base_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> accum(Dh);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t tc = bt % ntc, hk = (bt / ntc) % a.Hkv, b = bt / (ntc * a.Hkv);
      const int64_t t0 = tc * nt, t1 = std::min(Tq, t0 + nt), ntt = t1 - t0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r = g * ntt + (t - t0);
          float M = -std::numeric_limits<float>::infinity();
          for (int64_t sp = 0; sp < nsplit; ++sp) M = std::max(M, pm[(bt * nsplit + sp) * rows_max + r]);
          float L = 0.f;
          std::fill(accum.begin(), accum.end(), 0.f);
          for (int64_t sp = 0; sp < nsplit; ++sp) {
            const int64_t idx = (bt * nsplit + sp) * rows_max + r;
            if (pl[idx] == 0.f) continue;  // this split holds none of the row's keys
            const float c = std::exp(pm[idx] - M);
            L += c * pl[idx];
            const float* src = pacc.data() + idx * Dh;
            for (int64_t d = 0; d < Dh; ++d) accum[d] += c * src[d];
          }
          store_row<T>(o + (((b * a.H) + hk * G + g) * Tq + t) * Dh, accum.data(), 1.f / L, Dh);
        }
    }
  });
}

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  cache_seqlens.device().is_cpu(),
              "cpu attention_decode: q, k_cache, v_cache and cache_seqlens must be CPU tensors");
  TORCH_CHECK(q.dim() == 4, "cpu attention_decode: q must be 4-D (B, H, Tq, Dh), got ", q.dim(), "-D");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "cpu attention_decode: k_cache and v_cache must be 4-D (B, Hkv, Tmax, Dh)");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "cpu attention_decode: k_cache and v_cache must have one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "cpu attention_decode: q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k_cache.scalar_type() == st && v_cache.scalar_type() == st,
              "cpu attention_decode: q, k_cache and v_cache must share a dtype");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k_cache.size(1), Tmax = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B, "cpu attention_decode: k_cache must have q's batch size ", B);
  TORCH_CHECK(k_cache.size(3) == Dh, "cpu attention_decode: k_cache must have q's head dim ", Dh);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "cpu attention_decode: q's head count ", H,
              " must be a multiple of the cache's head count ", Hkv);
  TORCH_CHECK(Tq >= 1 && Dh >= 1, "cpu attention_decode: q must hold at least one query of head dim >= 1");
  TORCH_CHECK(q.stride(3) == 1 || Dh == 1, "cpu attention_decode: q must have a unit last-dim stride");
  TORCH_CHECK(k_cache.stride(3) == 1 || Dh == 1, "cpu attention_decode: k_cache must have a unit last-dim stride");
  TORCH_CHECK(v_cache.stride(3) == 1 || Dh == 1, "cpu attention_decode: v_cache must have a unit last-dim stride");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cpu attention_decode: cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B,
              "cpu attention_decode: cache_seqlens must have shape (B,) = (", B, ",), got ", cache_seqlens.sizes());
  const at::Tensor lens = cache_seqlens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(lp[b] >= Tq && lp[b] <= Tmax, "cpu attention_decode: cache_seqlens must be in [Tq, Tmax] = [",
                      Tq, ", ", Tmax, "], got ", lp[b], " for sequence ", b);
  at::Tensor out = at::empty({B, H, Tq, Dh}, q.options());
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (out.numel() == 0) return out;
  switch (st) {
    case at::kFloat: decode<float>(q, k_cache, v_cache, lens, scale, out); break;
    case at::kHalf: decode<c10::Half>(q, k_cache, v_cache, lens, scale, out); break;
    default: decode<c10::BFloat16>(q, k_cache, v_cache, lens, scale, out); break;
  }
  return out;
}

}  // namespace
}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) {
  m.impl("attention_decode", &vqkernels::attention_decode_cpu);
}
