// lfq_entropy on the CPU: LFQ's per-sample and codebook entropies (ops/lfq_entropy/__init__.py has the math,
// reference.py the spec). x (N, C, d), bit logits L = scale * x, q = sigmoid(L).
//   per_sample = 1/(N C) sum h(q)                       (O(N d): the per-sample entropy factorises over bits)
//   pbar[c]    = 1/N A_c^T B_c                          (A: products over the top h = ceil(d/2) bits, B: the low l)
//   codebook   = 1/C sum_c -sum_k pbar log max(pbar, eps)
//
// Design. The cost is the GEMMs: N 2^d multiply-adds forward (pbar), 2 N 2^d backward (gA = B G^T, gB = A G);
// everything else is O(N (2^h + 2^l)) per codebook. So the rows go in blocks of R: each block's bit tables are
// built in place (parallel over rows; each table by doubling, new bits as the high half so every pass is a
// contiguous, vectorisable multiply), then one at::addmm_ (torch's BLAS, its threads) adds A^T B into pbar, which
// stays in cache (2^d floats: 256 KB at d = 16). Backward: G from pbar (elementwise), then per block two
// at::mm_out and a fused per-row pass: W = gA * A, and for every top bit j, sum_a W[a] bit_j(a) by folding W in
// halves (the top bit's share is the upper half's sum; then fold the halves together: 2 2^h adds in all, not
// 2^h h). Memory: pbar (C 2^d) + the block's four tables (R (2^h + 2^l) each). Nothing is N x 2^d.
// Deterministic: fixed blocks and BLAS calls, for any thread count. float32 (float64: the same in double).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/runtime.h"

namespace vqkernels {
namespace {

void poison(at::Tensor& t) {
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

void check_args(const at::Tensor& x, double scale, double eps, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "cpu ", op, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 3, "cpu ", op, ": x must be 3-D (N, C, d), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "cpu ", op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1, "cpu ", op, ": x must hold at least one codebook");
  TORCH_CHECK(x.size(2) >= 1 && x.size(2) <= 30, "cpu ", op, ": d must be in [1, 30], got ", x.size(2));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "cpu ", op, ": scale must be finite and > 0, got ", scale);
  TORCH_CHECK(eps >= 0 && eps <= 1, "cpu ", op, ": eps must be in [0, 1], got ", eps);
}

// Rows per block: the block's tables hold up to 2^21 elements each (8 MB of float32), 256..16384 rows. Big blocks:
// every block is a parallel region and a BLAS call, and on a busy machine each region's barrier can cost a
// scheduler slice (measured on 2 shared cores: 1024-row blocks took 0.35 s forward at d = 16, mostly waiting).
int64_t block_rows(int64_t width) { return std::max<int64_t>(256, std::min<int64_t>(16384, (1 << 21) / width)); }

// sigmoid(L) and sigmoid(-L), each relatively accurate (no 1 - p where p rounds to 1).
template <typename T>
inline void sigmoids(T L, T& plus, T& minus) {
  plus = T(1) / (T(1) + std::exp(-L));
  minus = T(1) / (T(1) + std::exp(L));
}

// T[0..2^m) = prod_j sigmoid(+-L[j]) over m bits, + where bit (m-1-j) of the index is set. Bits are taken from the
// last (least significant) to the first, each doubling the table with the new bit as its high half.
template <typename T>
inline void bit_table(const T* L, int m, T* out) {
  out[0] = T(1);
  int64_t len = 1;
  for (int j = m - 1; j >= 0; --j) {
    T p, q;
    sigmoids(L[j], p, q);
    for (int64_t a = 0; a < len; ++a) {
      const T v = out[a];
      out[a] = v * q;
      out[a + len] = v * p;
    }
    len <<= 1;
  }
}

// h(sigmoid(L)) = softplus(-|L|) + |L| sigmoid(-|L|).
template <typename T>
inline T binary_entropy(T L) {
  const T a = std::abs(L);
  const T e = std::exp(-a);
  return std::log1p(e) + a * e / (T(1) + e);
}

// W (2^m, overwritten): S[j] = sum_a W[a] bit_j(a) for the m bits (bit 0 = the most significant), returns sum W.
template <typename T>
inline T fold_bit_sums(T* W, int m, T* S) {
  int64_t len = int64_t(1) << m;
  for (int j = 0; j < m; ++j) {
    len >>= 1;
    T s = 0;
    for (int64_t a = 0; a < len; ++a) {
      s += W[a + len];
      W[a] += W[a + len];
    }
    S[j] = s;
  }
  return W[0];
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& x_, double scale, double eps) {
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int d = (int)x.size(2);
  const int h = (d + 1) / 2, l = d - h;
  const int64_t KA = int64_t(1) << h, KB = int64_t(1) << l;
  auto opts = x.options();
  at::Tensor pbar = at::zeros({C, KA, KB}, opts);
  at::Tensor ps = at::empty({}, opts), cb = at::empty({}, opts);
  poison(ps);
  poison(cb);
  if (N == 0) {
    ps.fill_(std::numeric_limits<double>::quiet_NaN());
    cb.fill_(std::numeric_limits<double>::quiet_NaN());
    pbar.fill_(std::numeric_limits<double>::quiet_NaN());
    return {ps, cb, pbar.view({C, KA * KB})};
  }
  const int64_t R = block_rows(KA);
  at::Tensor A = at::empty({R, KA}, opts), B = at::empty({R, KB}, opts);
  const T* xp = x.data_ptr<T>();
  const T s = T(scale);
  const int64_t nblocks = (N + R - 1) / R;
  double ps_sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t n0 = blk * R, r = std::min(R, N - n0);
      T* Ap = A.data_ptr<T>();
      T* Bp = B.data_ptr<T>();
      std::vector<double> part((size_t)r, 0.0);
      at::parallel_for(0, r, 64, [&](int64_t i0, int64_t i1) {
        T L[32];
        for (int64_t i = i0; i < i1; ++i) {
          const T* xr = xp + ((n0 + i) * C + c) * d;
          double e = 0;
          for (int j = 0; j < d; ++j) {
            L[j] = s * xr[j];
            e += (double)binary_entropy(L[j]);
          }
          part[(size_t)i] = e;
          bit_table(L, h, Ap + i * KA);
          bit_table(L + h, l, Bp + i * KB);
        }
      });
      for (int64_t i = 0; i < r; ++i) ps_sum += part[(size_t)i];  // in row order: thread-count independent
      at::Tensor pc = pbar[c];
      pc.addmm_(A.narrow(0, 0, r).t(), B.narrow(0, 0, r));
    }
  }
  // pbar /= N, and the codebook entropies (double sums over fixed chunks, in order).
  const int64_t K = KA * KB;
  T* pp = pbar.data_ptr<T>();
  const T invN = T(1) / T(N);
  const int64_t chunk = 4096, nch = (C * K + chunk - 1) / chunk;
  std::vector<double> ent((size_t)nch, 0.0);
  const T clamp = std::max(T(eps), std::numeric_limits<T>::min());
  at::parallel_for(0, nch, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      double e = 0;
      const int64_t k1 = std::min(C * K, (ch + 1) * chunk);
      for (int64_t k = ch * chunk; k < k1; ++k) {
        const T p = pp[k] * invN;
        pp[k] = p;
        e -= (double)(p * std::log(std::max(p, clamp)));
      }
      ent[(size_t)ch] = e;
    }
  });
  double cb_sum = 0;
  for (double e : ent) cb_sum += e;
  ps.fill_(ps_sum / double(N * C));
  cb.fill_(cb_sum / double(C));
  return {ps, cb, pbar.view({C, K})};
}

template <typename T>
at::Tensor bwd_impl(const at::Tensor& grad_ps, const at::Tensor& grad_cb, const at::Tensor& x_,
                    const at::Tensor& pbar_, double scale, double eps) {
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int d = (int)x.size(2);
  const int h = (d + 1) / 2, l = d - h;
  const int64_t KA = int64_t(1) << h, KB = int64_t(1) << l, K = KA * KB;
  TORCH_CHECK(pbar_.dim() == 2 && pbar_.size(0) == C && pbar_.size(1) == K, "cpu lfq_entropy_bwd: pbar must be (",
              C, ", ", K, "), got ", pbar_.sizes());
  TORCH_CHECK(pbar_.scalar_type() == x.scalar_type(), "cpu lfq_entropy_bwd: pbar must be ", x.scalar_type());
  at::Tensor grad = at::empty({N, C, (int64_t)d}, x.options());
  poison(grad);
  if (N == 0) return grad;
  const at::Tensor pbar = pbar_.contiguous();
  const double gps = grad_ps.item<double>() / double(N * C);
  const double gcb = grad_cb.item<double>() / double(C);
  // G = d codebook / d pbar (times the upstream gradient and 1/N: what multiplies the tables' products).
  at::Tensor G = at::empty({C, KA, KB}, x.options());
  {
    const T* pp = pbar.data_ptr<T>();
    T* gp = G.data_ptr<T>();
    const T tiny = std::numeric_limits<T>::min();
    const T neg_log_eps = eps > 0 ? T(-std::log(eps)) : T(0);
    const T w = T(gcb / double(N));
    at::parallel_for(0, C * K, 4096, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const T p = pp[k];
        const T g = (eps > 0 && !(p >= T(eps))) ? neg_log_eps : -(std::log(std::max(p, tiny)) + T(1));
        gp[k] = w * g;
      }
    });
  }
  const int64_t R = block_rows(KA);
  auto opts = x.options();
  at::Tensor A = at::empty({R, KA}, opts), B = at::empty({R, KB}, opts);
  at::Tensor gA = at::empty({R, KA}, opts), gB = at::empty({R, KB}, opts);
  const T* xp = x.data_ptr<T>();
  T* outp = grad.data_ptr<T>();
  const T s = T(scale);
  const bool need_cb = gcb != 0.0;
  const int64_t nblocks = (N + R - 1) / R;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t n0 = blk * R, r = std::min(R, N - n0);
      T* Ap = A.data_ptr<T>();
      T* Bp = B.data_ptr<T>();
      if (need_cb) {
        at::parallel_for(0, r, 64, [&](int64_t i0, int64_t i1) {
          T L[32];
          for (int64_t i = i0; i < i1; ++i) {
            const T* xr = xp + ((n0 + i) * C + c) * d;
            for (int j = 0; j < d; ++j) L[j] = s * xr[j];
            bit_table(L, h, Ap + i * KA);
            bit_table(L + h, l, Bp + i * KB);
          }
        });
        at::Tensor gAr = gA.narrow(0, 0, r), gBr = gB.narrow(0, 0, r);
        at::mm_out(gAr, B.narrow(0, 0, r), G[c].t());  // (r, KA) = B G^T
        at::mm_out(gBr, A.narrow(0, 0, r), G[c]);      // (r, KB) = A G
      }
      T* gAp = gA.data_ptr<T>();
      T* gBp = gB.data_ptr<T>();
      at::parallel_for(0, r, 64, [&](int64_t i0, int64_t i1) {
        T S[32];
        for (int64_t i = i0; i < i1; ++i) {
          const T* xr = xp + ((n0 + i) * C + c) * d;
          T* gr = outp + ((n0 + i) * C + c) * d;
          for (int j = 0; j < d; ++j) {
            const T L = s * xr[j];
            T p, q;
            sigmoids(L, p, q);
            gr[j] = T(gps) * (-L * p * q);
          }
          if (!need_cb) continue;
          T* wa = gAp + i * KA;
          const T* ta = Ap + i * KA;
          for (int64_t a = 0; a < KA; ++a) wa[a] *= ta[a];
          T tot = fold_bit_sums(wa, h, S);
          for (int j = 0; j < h; ++j) {
            T p, q;
            sigmoids(s * xr[j], p, q);
            gr[j] += S[j] - p * tot;
          }
          T* wb = gBp + i * KB;
          const T* tb = Bp + i * KB;
          for (int64_t b = 0; b < KB; ++b) wb[b] *= tb[b];
          tot = fold_bit_sums(wb, l, S);
          for (int j = 0; j < l; ++j) {
            T p, q;
            sigmoids(s * xr[h + j], p, q);
            gr[h + j] += S[j] - p * tot;
          }
        }
      });
    }
  }
  for (int64_t k = 0; k < N * C * d; ++k) outp[k] *= s;
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_entropy_fwd_cpu(const at::Tensor& x, double scale, double eps) {
  check_args(x, scale, eps, "lfq_entropy_fwd");
  if (x.scalar_type() == at::kDouble) return fwd_impl<double>(x, scale, eps);
  return fwd_impl<float>(x, scale, eps);
}

at::Tensor lfq_entropy_bwd_cpu(const at::Tensor& grad_ps, const at::Tensor& grad_cb, const at::Tensor& x,
                               const at::Tensor& pbar, double scale, double eps) {
  check_args(x, scale, eps, "lfq_entropy_bwd");
  TORCH_CHECK(grad_ps.numel() == 1 && grad_cb.numel() == 1, "cpu lfq_entropy_bwd: the upstream gradients must be "
              "scalars");
  if (x.scalar_type() == at::kDouble) return bwd_impl<double>(grad_ps, grad_cb, x, pbar, scale, eps);
  return bwd_impl<float>(grad_ps, grad_cb, x, pbar, scale, eps);
}

}  // namespace
}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) {
  m.impl("lfq_entropy_fwd", &vqkernels::lfq_entropy_fwd_cpu);
  m.impl("lfq_entropy_bwd", &vqkernels::lfq_entropy_bwd_cpu);
}
