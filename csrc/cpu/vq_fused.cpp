// The fused vector_quantize forward on the CPU: nearest-code search, gather, straight-through value
// and the VQ loss in one pass over z, block by block (the spec: vqkernels/ops/vq_loss/reference.py,
// nearest_code then vq_loss):
//   indices[n] = argmin_k score(z[n], c_k)   (csrc/cpu/nearest_code.cpp: exact fp32, lowest index on ties)
//   z_q[n]     = codebook[indices[n]]
//   loss       = scale * sum_{n,d} (z_q - z)^2
// z is (N, D) or (B, T, D) float32 with any strides: a channel-first (B, C, H, W) map viewed as
// (B, H*W, C) is read in place, 64 tokens at a time through AVX-512 16 x 16 transposes into a
// contiguous block (csrc/cpu/simd_tile.h), searched there, and z_q is written back in z's layout
// (empty_like(z)). So the step reads z once and writes z_q once; no (N, D) copy of z is made, and no
// N x K buffer. The loss is summed per block (16 lanes per row, the row sums in double, blocks of 64
// rows in order): bit-identical for any thread count. The backward is vq_loss's (vq_loss.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "common.h"
#include "search.h"
#include "simd_tile.h"

namespace vqkernels {
namespace {

// Rows [n0, n0 + nr) are one matrix with contiguous rows at x + offset(n0), row stride *ld.
bool rows_dense(const StridedRows& s, int64_t n0, int64_t nr, int64_t* ld) {
  if (s.sd != 1 || n0 % s.T + nr > s.T) return false;  // strided elements, or crosses a batch boundary
  *ld = s.st;
  return true;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#endif
double sqerr_row(const float* c, const float* x, int64_t D) {
#if defined(__x86_64__) && defined(__GNUC__)
  __m512 a = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = (D - d) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d)) - 1u);
    const __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, c + d), _mm512_maskz_loadu_ps(m, x + d));
    a = _mm512_fmadd_ps(t, t, a);
  }
  return (double)_mm512_reduce_add_ps(a);
#else
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += (c[d] - x[d]) * (c[d] - x[d]);
  return s;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize_fwd_cpu(const at::Tensor& z,
                                                                       const at::Tensor& codebook_in,
                                                                       int64_t metric, double scale) {
  TORCH_CHECK(z.device().is_cpu() && codebook_in.device().is_cpu(),
              "cpu vector_quantize_fwd: z and codebook must be CPU tensors");
  TORCH_CHECK(z.dim() == 2 || z.dim() == 3, "cpu vector_quantize_fwd: z must be 2-D (N, D) or 3-D (B, T, D), got ",
              z.dim(), "-D");
  TORCH_CHECK(z.scalar_type() == at::kFloat && codebook_in.scalar_type() == at::kFloat,
              "cpu vector_quantize_fwd: z and codebook must be float32, got ", z.scalar_type(), " and ",
              codebook_in.scalar_type());
  TORCH_CHECK(codebook_in.dim() == 2 && codebook_in.size(1) == z.size(-1) && codebook_in.size(0) >= 1,
              "cpu vector_quantize_fwd: codebook must be (K >= 1, D = ", z.size(-1), "), got ", codebook_in.sizes());
  TORCH_CHECK(metric == kL2 || metric == kInnerProduct, "cpu vector_quantize_fwd: metric id must be 0 or 1, got ",
              metric);
  TORCH_CHECK(cpu::has_avx512(), "cpu vector_quantize_fwd: needs a CPU with AVX-512 (elsewhere vector_quantize "
              "runs nearest_code + vq_loss)");
  const at::Tensor cb = codebook_in.contiguous();
  const int64_t D = z.size(-1);
  const int64_t N = z.dim() == 3 ? z.size(0) * z.size(1) : z.size(0);
  at::Tensor zq = at::empty_like(z);
  at::Tensor idx = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));
  if (poison_outputs()) {
    zq.fill_(std::numeric_limits<float>::quiet_NaN());
    idx.fill_(-7);
  }
  if (N == 0 || D == 0) {
    if (N > 0) idx.zero_();
    return {zq, at::zeros({}, z.options()), idx};
  }
  const cpu::Fp32Search search(cb, metric);
  const StridedRows zs = StridedRows::of(z), qs = StridedRows::of(zq);
  const float* zp = z.const_data_ptr<float>();
  float* qp = zq.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const float* cp = cb.const_data_ptr<float>();
  const int64_t B = cpu::kSearchBlockRows;
  const int64_t nblocks = (N + B - 1) / B;
  std::vector<double> partial((size_t)nblocks, 0.0);
  const double work = (double)N * (double)cb.size(0) * (double)D;
  cpu::parallel_blocks(nblocks, work, [&](const std::function<int64_t()>& next) {
    auto s = search.scratch();
    std::vector<float> xbuf((size_t)(B * D)), qbuf((size_t)(B * D));
    float dist[B];
    for (int64_t b = next(); b >= 0; b = next()) {
      const int64_t n0 = b * B, nr = std::min(B, N - n0);
      const float* xr;
      int64_t ldx;
      if (rows_dense(zs, n0, nr, &ldx)) {
        xr = zp + zs.offset(n0);
      } else {
        tile::gather_rows(zp, zs, n0, nr, D, xbuf.data(), D, true);
        xr = xbuf.data();
        ldx = D;
      }
      search.search(xr, ldx, nr, ip + n0, dist, *s);
      int64_t ldq;
      const bool qdense = rows_dense(qs, n0, nr, &ldq);
      float* qr = qdense ? qp + qs.offset(n0) : qbuf.data();
      if (!qdense) ldq = D;
      double acc = 0.0;
      for (int64_t r = 0; r < nr; ++r) {
        const float* c = cp + ip[n0 + r] * D;
        std::memcpy(qr + r * ldq, c, sizeof(float) * D);
        acc += sqerr_row(c, xr + r * ldx, D);
      }
      if (!qdense) tile::scatter_rows(qbuf.data(), D, qp, qs, n0, nr, D, true);
      partial[(size_t)b] = acc;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return {zq, at::scalar_tensor(scale * total, z.options()), idx};
}

}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) { m.impl("vector_quantize_fwd", &vqkernels::vector_quantize_fwd_cpu); }
