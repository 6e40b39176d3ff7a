// Per-code statistics on the CPU: code_stats (counts and sums of the vectors assigned to each code: the EMA
// codebook update) and code_usage (the histogram of the indices and its perplexity).
//
// Functions computed (the spec is vqkernels/ops/code_stats/reference.py), z (N, D) or (B, T, D) with any strides,
// idx int64 (N,) in [0, K):
//   code_stats:  counts[k] = #{n: idx[n]=k}, sums[k] = sum_{n: idx[n]=k} z[n]
//   code_usage:  counts[k] (int64), perplexity = exp(-sum_k p_k log(p_k + 1e-10)), p = counts / max(N, 1)
// float16/bfloat16 values are widened to float32; the sums run in float32 (float64 for float64 input, which only
// the tests use). An index outside [0, K) raises IndexError (the first one in row order).
//
// DETERMINISM. Bit-identical from run to run and for any thread count: the per-code sums are the owner-computes
// ordered reduction of vq_loss.cpp's codebook gradient (vq_rows.h's code_ranges: one task per contiguous code
// range, every task scanning all rows in ascending order and adding only its own codes' rows); the counts are
// exact integers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "vq_rows.h"

namespace vqkernels {
namespace {

using namespace vq_rows;

// ------------------------------------------------------------------------------------------------
// Per-code statistics (EMA): counts and sums of the assigned vectors, sorted reduction.

std::tuple<at::Tensor, at::Tensor> code_stats_cpu(const at::Tensor& z, const at::Tensor& indices_in,
                                                   int64_t num_codes) {
  check_common(z, indices_in, "code_stats");
  check_num_codes(num_codes, "code_stats", "cpu");
  const at::Tensor indices = indices_in.contiguous();
  const int64_t N = rows_of(z), D = z.size(-1), K = num_codes;
  const auto acc_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor counts = at::empty({K}, z.options().dtype(acc_dtype));
  at::Tensor sums = at::empty({K, D}, z.options().dtype(acc_dtype));
  poison(counts);
  poison(sums);
  const int64_t* ip = indices.const_data_ptr<int64_t>();
  const std::vector<int64_t> rows = count_rows(ip, N, K);
  const std::vector<int64_t> bounds = code_ranges(rows, N, D);
  const int64_t tasks = int64_t(bounds.size()) - 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "code_stats_cpu", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const Rows<const scalar_t> zr(z, z.const_data_ptr<scalar_t>());
    acc_t* cnt = counts.data_ptr<acc_t>();
    acc_t* sp = sums.data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) cnt[k] = acc_t(rows[k]);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      TileIn<scalar_t> zin;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = bounds[t], nk = bounds[t + 1] - bounds[t];
        auto owned = [&](int64_t k) { return static_cast<uint64_t>(k - k0) < static_cast<uint64_t>(nk); };
        std::fill(sp + k0 * D, sp + (k0 + nk) * D, acc_t(0));
        for (int64_t r0 = 0; r0 < N; r0 += kTile) {
          const int64_t nr = std::min(kTile, N - r0);
          bool any = false;
          for (int64_t r = 0; r < nr; ++r) any |= owned(ip[r0 + r]);
          if (!any) continue;
          zin.read(zr, r0, nr, D);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t k = ip[r0 + r];
            if (!owned(k)) continue;
            const scalar_t* __restrict__ x = zin.ptr[r];
            acc_t* __restrict__ o = sp + k * D;
            for (int64_t d = 0; d < D; ++d) o[d] += to_f(x[d]);
          }
        }
      }
    });
  });
  return {counts, sums};
}

// ------------------------------------------------------------------------------------------------
// Code usage: histogram (exact integers, so any summation order gives the same counts) + perplexity
// (summed in double over k in order).

std::tuple<at::Tensor, at::Tensor> code_usage_cpu(const at::Tensor& indices_in, int64_t num_codes) {
  TORCH_CHECK(indices_in.device().is_cpu(), "cpu code_usage: indices must be a CPU tensor, got ",
              indices_in.device());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "cpu code_usage: indices must be int64, got ",
              indices_in.scalar_type());
  check_num_codes(num_codes, "code_usage", "cpu");
  const at::Tensor indices = indices_in.contiguous();
  const int64_t N = indices.numel(), K = num_codes;
  at::Tensor counts = at::zeros({K}, indices.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = ip[n];
    if (k < 0 || k >= K) index_error(k, K);
    ++cnt[k];
  }
  const double total = double(std::max<int64_t>(N, 1));
  double h = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double p = double(cnt[k]) / total;
    h += p * std::log(p + 1e-10);
  }
  at::Tensor perplexity = at::scalar_tensor(std::exp(-h), indices.options().dtype(at::kFloat));
  return {counts, perplexity};
}

}  // namespace
}  // namespace vqkernels

TORCH_LIBRARY_IMPL(vqkernels_C, CPU, m) {
  m.impl("code_stats", &vqkernels::code_stats_cpu);
  m.impl("code_usage", &vqkernels::code_usage_cpu);
}
