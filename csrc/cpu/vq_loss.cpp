// The VQ loss on the CPU: fused gather + loss, fused backward. (The per-code statistics, code_stats and
// code_usage, are in code_stats.cpp; what both files share is in vq_rows.h.)
//
// Functions computed (the spec is vqkernels/ops/vq_loss/reference.py), z (N, D), codebook (K, D),
// idx int64 (N,) in [0, K):
//   vq_loss_fwd: z_q[n] = codebook[idx[n]];  loss = scale * sum_{n,d} (z_q - z)^2
//   vq_loss_bwd: grad_z[n] = grad_zq[n] + c_z (z[n] - z_q[n]),  c_z = 2 w_commit grad_loss / (N D)
//                grad_cb[k] = c_cb sum_{n: idx[n]=k} (z_q[n] - z[n]), c_cb = 2 w_codebook grad_loss / (N D)
// float16/bfloat16 values are widened to float32; every sum runs in float32 (float64 for float64
// input, which only the tests use) and is rounded to the output dtype once.
//
// DETERMINISM. Every result is bit-identical from run to run and for any thread count:
//  - the loss is summed per fixed block of kRowBlock rows (16 float lanes per row, combined in a fixed
//    order), the block partials in double, and the partials added in block order;
//  - the scatter-adds (codebook gradient; code_stats.cpp's per-code sums) are an OWNER-COMPUTES ordered reduction:
//    the codes are split into contiguous ranges (balanced by how many rows chose them), one task per
//    range; every task scans all rows in ascending order and adds only the rows whose code it owns.
//    So each code's rows are summed in ascending row order by exactly one task, whatever the number
//    of tasks or threads: the same result as a stable sort by code followed by a sequential sum per
//    code, without the sort's random walk over z. No atomics, no per-thread K x D partial buffers;
//    extra memory: K + T + 1 int64 (and a K x D float32 accumulator for float16/bfloat16 codebooks).
// When z, grad_zq and grad_z have contiguous rows, the same pass writes grad_z (each row belongs to
// exactly one task), so the backward reads z, codebook and grad_zq once, sequentially. Strided rows
// (z as (B, T, D) with any strides, e.g. a channel-first map viewed as (B, H*W, C), read in place)
// go through transposed tiles of kTile rows; grad_z is then a separate row-parallel pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "search.h"
#include "simd_tile.h"
#include "vq_rows.h"

namespace vqkernels {
namespace {

constexpr int64_t kRowBlock = 256;    // rows per loss partial: fixed, so the sum order is too
constexpr int64_t kLanes = 16;        // independent float accumulators per row (one AVX-512 register)

using namespace vq_rows;

void check_codebook(const at::Tensor& z, const at::Tensor& codebook, const char* op) {
  check_vq_codebook(z, codebook, op, "cpu");
}

// ------------------------------------------------------------------------------------------------
// Forward: z_q = codebook[idx], loss = scale * sum (z_q - z)^2.

// Sum of squares of (c - x) over one row: 16 float lanes (lane j takes d = j mod 16) combined in a
// fixed order, the same order for contiguous and strided rows.
template <typename T, typename acc_t>
inline acc_t row_sqerr(const T* __restrict__ c, const T* __restrict__ x, int64_t sd, int64_t D) {
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  if (sd == 1) {
    for (; d + kLanes <= D; d += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t t = to_f(c[d + j]) - to_f(x[d + j]);
        lane[j] += t * t;
      }
    }
  } else {
    for (; d + kLanes <= D; d += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t t = to_f(c[d + j]) - to_f(x[(d + j) * sd]);
        lane[j] += t * t;
      }
    }
  }
  acc_t s = 0;
  for (; d < D; ++d) {
    const acc_t t = to_f(c[d]) - to_f(x[d * sd]);
    s += t * t;
  }
  for (int64_t j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

template <typename T>
double fwd_block(const Rows<const T>& z, const T* cb, const int64_t* idx, const Rows<T>& zq, int64_t n0,
                 int64_t n1, int64_t K, int64_t D, TileIn<T>& zin, TileOut<T>& qout) {
  using acc_t = typename Acc<T>::type;
  double block = 0.0;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t nr = std::min(kTile, n1 - t0);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t k = idx[t0 + r];
      if (k < 0 || k >= K) index_error(k, K);
    }
    zin.read(z, t0, nr, D);
    qout.open(zq, t0, nr, D);
    for (int64_t r = 0; r < nr; ++r) {
      const T* __restrict__ c = cb + idx[t0 + r] * D;
      std::memcpy(qout.ptr[r], c, sizeof(T) * D);
      block += double(row_sqerr<T, acc_t>(c, zin.ptr[r], 1, D));
    }
    qout.flush(zq, nr, D);
  }
  return block;
}

std::tuple<at::Tensor, at::Tensor> vq_loss_fwd_cpu(const at::Tensor& z, const at::Tensor& codebook_in,
                                                    const at::Tensor& indices_in, double scale) {
  check_common(z, indices_in, "vq_loss_fwd");
  check_codebook(z, codebook_in, "vq_loss_fwd");
  const at::Tensor codebook = codebook_in.contiguous(), indices = indices_in.contiguous();
  const int64_t N = rows_of(z), D = z.size(-1), K = codebook.size(0);
  at::Tensor zq = at::empty_like(z);  // z's layout (strides preserved for a dense z)
  poison(zq);
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  std::vector<double> partial(nblocks, 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, kRowBlock * D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vq_loss_fwd_cpu", [&] {
    const Rows<const scalar_t> zr(z, z.const_data_ptr<scalar_t>());
    const Rows<scalar_t> qr(zq, zq.data_ptr<scalar_t>());
    const scalar_t* cp = codebook.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
      TileIn<scalar_t> zin;
      TileOut<scalar_t> qout;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kRowBlock, n1 = std::min(N, n0 + kRowBlock);
        partial[b] = fwd_block<scalar_t>(zr, cp, ip, qr, n0, n1, K, D, zin, qout);
      }
    });
  });
  double total = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) total += partial[b];
  const auto loss_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::scalar_tensor(total * scale, z.options().dtype(loss_dtype));
  return {zq, loss};
}

// ------------------------------------------------------------------------------------------------
// Backward.

// One row of the backward: o = g + c_z (x - c) (if o), a += x - c. Contiguous rows vectorise.
template <typename T, typename acc_t>
inline void bwd_row(const T* __restrict__ g, int64_t sg, const T* __restrict__ x, int64_t sx,
                    const T* __restrict__ c, T* __restrict__ o, int64_t so, acc_t* __restrict__ a, acc_t c_z,
                    int64_t D) {
  if (sg == 1 && sx == 1 && so == 1) {
    if (o != nullptr && a != nullptr) {
      for (int64_t d = 0; d < D; ++d) {
        const acc_t diff = to_f(x[d]) - to_f(c[d]);
        o[d] = static_cast<T>(to_f(g[d]) + c_z * diff);
        a[d] += diff;
      }
    } else if (o != nullptr) {
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(to_f(g[d]) + c_z * (to_f(x[d]) - to_f(c[d])));
    } else {
      for (int64_t d = 0; d < D; ++d) a[d] += to_f(x[d]) - to_f(c[d]);
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    const acc_t diff = to_f(x[d * sx]) - to_f(c[d]);
    if (o != nullptr) o[d * so] = static_cast<T>(to_f(g[d * sg]) + c_z * diff);
    if (a != nullptr) a[d] += diff;
  }
}

// Owner-computes backward: task t owns codes [bounds[t], bounds[t+1]); it scans every row in order,
// and for its rows adds (z - z_q) to its codes' float accumulators, and (gz != nullptr: only when
// z, grad_zq and grad_z all have contiguous rows) writes grad_z in the same pass.
template <typename T>
void bwd_owned(const Rows<const T>& gzq, const Rows<const T>& z, const T* cb, const int64_t* idx,
               const std::vector<int64_t>& bounds, const Rows<T>* gz, typename Acc<T>::type* acc, int64_t N,
               int64_t D, typename Acc<T>::type c_z) {
  using acc_t = typename Acc<T>::type;
  const int64_t tasks = int64_t(bounds.size()) - 1;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    TileIn<T> zin;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = bounds[t], nk = bounds[t + 1] - bounds[t];
      auto owned = [&](int64_t k) { return static_cast<uint64_t>(k - k0) < static_cast<uint64_t>(nk); };
      std::fill(acc + k0 * D, acc + (k0 + nk) * D, acc_t(0));
      if (gz != nullptr) {  // contiguous rows: one fused pass
        for (int64_t n = 0; n < N; ++n) {
          const int64_t k = idx[n];
          if (!owned(k)) continue;
          bwd_row<T, acc_t>(gzq.row(n), 1, z.row(n), 1, cb + k * D, gz->row(n), 1, acc + k * D, c_z, D);
        }
        continue;
      }
      for (int64_t r0 = 0; r0 < N; r0 += kTile) {
        const int64_t nr = std::min(kTile, N - r0);
        bool any = false;
        for (int64_t r = 0; r < nr; ++r) any |= owned(idx[r0 + r]);
        if (!any) continue;
        zin.read(z, r0, nr, D);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t k = idx[r0 + r];
          if (!owned(k)) continue;
          bwd_row<T, acc_t>(nullptr, 1, zin.ptr[r], 1, cb + k * D, nullptr, 1, acc + k * D, c_z, D);
        }
      }
    }
  });
}

// grad_z alone, row-parallel in tiles: grad_z = grad_zq + c_z (z - z_q).
template <typename T>
void bwd_rows(const Rows<const T>& gzq, const Rows<const T>& z, const T* cb, const int64_t* idx, const Rows<T>& gz,
              int64_t N, int64_t K, int64_t D, typename Acc<T>::type c_z) {
  using acc_t = typename Acc<T>::type;
  const int64_t ntiles = (N + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, kTile * D));
  at::parallel_for(0, ntiles, grain, [&](int64_t b0, int64_t b1) {
    TileIn<T> zin, gin;
    TileOut<T> gout;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kTile, nr = std::min(kTile, N - n0);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t k = idx[n0 + r];
        if (k < 0 || k >= K) index_error(k, K);
      }
      zin.read(z, n0, nr, D);
      gin.read(gzq, n0, nr, D);
      gout.open(gz, n0, nr, D);
      for (int64_t r = 0; r < nr; ++r)
        bwd_row<T, acc_t>(gin.ptr[r], 1, zin.ptr[r], 1, cb + idx[n0 + r] * D, gout.ptr[r], 1, nullptr, c_z, D);
      gout.flush(gz, nr, D);
    }
  });
}

// The backward of a float32 channel-first z (z, grad_zq and grad_z all (B, T, D) with token stride 1,
// e.g. a (B, C, H, W) map viewed as (B, H*W, C)): plane by plane. Task j owns the dimensions
// [d0, d1); for each of its d and each b it walks the T contiguous tokens of plane (b, d):
//   diff = z - cbT[d][idx],  grad_z = grad_zq + c_z * diff,  accT[d][idx] += diff (in token order)
// cbT / accT are (D, K) transposes of the codebook / its gradient accumulator, so a plane's gathers
// and scatter-adds stay in one K-float row (L1/L2). Each (k, d) is summed in ascending row order by
// exactly one task, as in the owner-computes pass: the same bits, for any thread count. z, grad_zq
// and grad_z are each streamed once (the row-tile path reads z twice through scalar transposes).
bool planes_ok(const at::Tensor& a) { return a.dim() == 3 && a.stride(1) == 1 && a.numel() > 0; }

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif
void bwd_plane(const float* __restrict__ z, const float* __restrict__ g, float* __restrict__ o,
               const int64_t* __restrict__ idx, const float* __restrict__ col, float* __restrict__ acc,
               float* __restrict__ diff, int64_t T, float c_z, bool avx512) {
  int64_t t = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx512) {
    const __m512 cz = _mm512_set1_ps(c_z);
    for (; t + 16 <= T; t += 16) {
      const __m256i i0 = _mm512_cvtepi64_epi32(_mm512_loadu_si512(idx + t));
      const __m256i i1 = _mm512_cvtepi64_epi32(_mm512_loadu_si512(idx + t + 8));
      const __m512i iv = _mm512_inserti64x4(_mm512_castsi256_si512(i0), i1, 1);
      const __m512 c = _mm512_i32gather_ps(iv, col, 4);
      const __m512 dv = _mm512_sub_ps(_mm512_loadu_ps(z + t), c);
      if (diff != nullptr) _mm512_storeu_ps(diff + t, dv);
      if (o != nullptr) _mm512_storeu_ps(o + t, _mm512_add_ps(_mm512_loadu_ps(g + t), _mm512_mul_ps(cz, dv)));
    }
  }
#endif
  for (; t < T; ++t) {
    const float dv = z[t] - col[idx[t]];
    if (diff != nullptr) diff[t] = dv;
    if (o != nullptr) o[t] = g[t] + c_z * dv;
  }
  if (acc != nullptr)
    for (t = 0; t < T; ++t) acc[idx[t]] += diff[t];
}

void bwd_planes(const at::Tensor& gzq, const at::Tensor& z, const at::Tensor& cb, const int64_t* idx,
                at::Tensor* gz, float* gcb_acc, double c_z) {
  const int64_t B = z.size(0), T = z.size(1), D = z.size(2), K = cb.size(0);
  const bool avx = cpu::has_avx512();
  const float* cp = cb.const_data_ptr<float>();
  std::vector<float> cbT((size_t)(K * D)), accT(gcb_acc != nullptr ? (size_t)(K * D) : 0);
  StridedRows cbrows{D, 0, 1, D};  // cbT[d][k] = cb[k][d]: "rows" d of K elements at stride D
  tile::gather_rows(cp, cbrows, 0, D, K, cbT.data(), K, avx);
  const float* zp = z.const_data_ptr<float>();
  const float* gp = gzq.const_data_ptr<float>();
  float* op = gz != nullptr ? gz->data_ptr<float>() : nullptr;
  const int64_t zb = z.stride(0), zd = z.stride(2), gb = gzq.stride(0), gd = gzq.stride(2);
  const int64_t ob = gz != nullptr ? gz->stride(0) : 0, od = gz != nullptr ? gz->stride(2) : 0;
  const float cz = (float)c_z;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, B * T));
  at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) {
    std::vector<float> diff(gcb_acc != nullptr ? (size_t)T : 0);
    for (int64_t d = d0; d < d1; ++d) {
      float* acc = gcb_acc != nullptr ? accT.data() + d * K : nullptr;
      if (acc != nullptr) std::fill(acc, acc + K, 0.f);
      for (int64_t b = 0; b < B; ++b)
        bwd_plane(zp + b * zb + d * zd, gp + b * gb + d * gd, op != nullptr ? op + b * ob + d * od : nullptr,
                  idx + b * T, cbT.data() + d * K, acc, acc != nullptr ? diff.data() : nullptr, T, cz, avx);
    }
  });
  if (gcb_acc != nullptr) {  // acc[k][d] = accT[d][k]
    StridedRows arows{K, 0, 1, K};
    tile::gather_rows(accT.data(), arows, 0, K, D, gcb_acc, D, avx);
  }
}

std::tuple<at::Tensor, at::Tensor> vq_loss_bwd_cpu(const at::Tensor& gzq, const at::Tensor& grad_loss,
                                                    const at::Tensor& z, const at::Tensor& codebook_in,
                                                    const at::Tensor& indices_in, double w_commit,
                                                    double w_codebook, bool need_grad_z, bool need_grad_codebook) {
  check_common(z, indices_in, "vq_loss_bwd");
  check_codebook(z, codebook_in, "vq_loss_bwd");
  TORCH_CHECK(gzq.sizes() == z.sizes(), "cpu vq_loss_bwd: grad_zq must have the shape of z ", z.sizes(), ", got ",
              gzq.sizes());
  TORCH_CHECK(gzq.scalar_type() == z.scalar_type() && gzq.device().is_cpu(),
              "cpu vq_loss_bwd: grad_zq must be a CPU tensor of z's dtype");
  TORCH_CHECK(grad_loss.numel() == 1, "cpu vq_loss_bwd: grad_loss must hold one value, got ", grad_loss.numel());
  const at::Tensor codebook = codebook_in.contiguous(), indices = indices_in.contiguous();
  const int64_t N = rows_of(z), D = z.size(-1), K = codebook.size(0);
  const double numel = double(N) * double(D);
  const double g = grad_loss.item<double>();
  const double c_z = numel > 0 ? 2.0 * w_commit * g / numel : 0.0;
  const double c_cb = numel > 0 ? 2.0 * w_codebook * g / numel : 0.0;

  at::Tensor gz = need_grad_z ? at::empty_like(z) : at::empty({0}, z.options());
  at::Tensor gcb = need_grad_codebook ? at::empty({K, D}, codebook.options()) : at::empty({0}, codebook.options());
  poison(gz);
  poison(gcb);
  const int64_t* ip = indices.const_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vq_loss_bwd_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const Rows<const scalar_t> zr(z, z.const_data_ptr<scalar_t>());
    const Rows<const scalar_t> gr(gzq, gzq.const_data_ptr<scalar_t>());
    const scalar_t* cp = codebook.const_data_ptr<scalar_t>();
    const bool planes = std::is_same<scalar_t, float>::value && planes_ok(z) && planes_ok(gzq) &&
                        (!need_grad_z || planes_ok(gz)) && z.size(2) > 1;
    if (planes) {  // float32 channel-first: plane by plane (see bwd_planes)
      for (int64_t n = 0; n < N; ++n)
        if (ip[n] < 0 || ip[n] >= K) index_error(ip[n], K);
      float* ap = need_grad_codebook ? reinterpret_cast<float*>(gcb.data_ptr<scalar_t>()) : nullptr;
      bwd_planes(gzq, z, codebook, ip, need_grad_z ? &gz : nullptr, ap, c_z);
      if (need_grad_codebook) {
        const float scale = -float(c_cb);
        at::parallel_for(0, K * D, kGrainElems, [&](int64_t e0, int64_t e1) {
          for (int64_t e = e0; e < e1; ++e) ap[e] = scale * ap[e];
        });
      }
    } else if (need_grad_codebook) {
      const std::vector<int64_t> counts = count_rows(ip, N, K);
      const std::vector<int64_t> bounds = code_ranges(counts, N, D);
      // float32 codebooks accumulate in the output itself; others in a float32 K x D scratch.
      at::Tensor acc = std::is_same<scalar_t, acc_t>::value ? gcb : at::empty({K, D}, z.options().dtype(
                           std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat));
      acc_t* ap = acc.data_ptr<acc_t>();
      if (need_grad_z) {
        const Rows<scalar_t> gzr(gz, gz.data_ptr<scalar_t>());
        if (zr.sd == 1 && gr.sd == 1 && gzr.sd == 1) {
          bwd_owned<scalar_t>(gr, zr, cp, ip, bounds, &gzr, ap, N, D, acc_t(c_z));  // fused, one pass
        } else {  // strided rows: grad_z row-parallel in transposed tiles, then the owned accumulation
          bwd_rows<scalar_t>(gr, zr, cp, ip, gzr, N, K, D, acc_t(c_z));
          bwd_owned<scalar_t>(gr, zr, cp, ip, bounds, nullptr, ap, N, D, acc_t(c_z));
        }
      } else {
        bwd_owned<scalar_t>(gr, zr, cp, ip, bounds, nullptr, ap, N, D, acc_t(c_z));
      }
      scalar_t* op = gcb.data_ptr<scalar_t>();
      const acc_t scale = -acc_t(c_cb);  // c_cb * sum (z_q - z)
      at::parallel_for(0, K * D, kGrainElems, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) op[e] = static_cast<scalar_t>(scale * ap[e]);
      });
    } else if (need_grad_z) {
      const Rows<scalar_t> gzr(gz, gz.data_ptr<scalar_t>());
      bwd_rows<scalar_t>(gr, zr, cp, ip, gzr, N, K, D, acc_t(c_z));
    }
  });
  return {gz, gcb};
}

}  // namespace
}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) {
  m.impl("vq_loss_fwd", &vqkernels::vq_loss_fwd_cpu);
  m.impl("vq_loss_bwd", &vqkernels::vq_loss_bwd_cpu);
}
