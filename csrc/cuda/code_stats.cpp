// The CUDA launchers of the per-code statistics (code_stats: counts and sums of the vectors assigned to each code;
// code_usage: the histogram of the indices and its perplexity): argument checks, outputs, stream and device guard,
// the index-range check (without a host sync: see vq_launch.h), and the TORCH_LIBRARY_IMPL registration.
// The kernels are in vq_loss_kernels.cu (code_stats_sums_kernel shares the row mapping of the VQ loss kernels;
// see its header comment): the counts are exact int64 atomics converted once, the sums float32 atomics (their
// last bits may differ from run to run).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common.h"
#include "vq_launch.h"

namespace {

using namespace vqkernels::cuda;  // the launch functions and launcher helpers (vq_launch.h)
using vqkernels::rows_of;

std::tuple<at::Tensor, at::Tensor> code_stats_cuda(const at::Tensor& z, const at::Tensor& indices_in,
                                                    int64_t num_codes) {
  check_common(z, indices_in, "code_stats");
  vqkernels::check_num_codes(num_codes, "code_stats", "cuda");
  c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t N = rows_of(z), D = z.size(-1), K = num_codes;
  at::Tensor counts = at::empty({K}, z.options().dtype(at::kFloat));
  at::Tensor sums = at::empty({K, D}, z.options().dtype(at::kFloat));
  poison(counts);
  poison(sums);
  at::Tensor hist = at::empty({K}, z.options().dtype(at::kLong));
  at::Tensor range = at::empty({2}, z.options().dtype(at::kLong));
  const Strides zs = strides_of(z);
  const cudaError_t err = vqkernels::cuda::launch_code_stats(
      z.const_data_ptr(), zs.s, indices.const_data_ptr<int64_t>(), dtype_id(z.scalar_type()), N, t_of(z), K, D,
      reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), counts.data_ptr<float>(),
      sums.data_ptr<float>(), reinterpret_cast<unsigned long long*>(range.data_ptr<int64_t>()), stream_of(z));
  check_launch(err, "code_stats", N, K, D, z.scalar_type());
  check_range(range, N, K, 2, stream_of(z));
  return {counts, sums};
}

std::tuple<at::Tensor, at::Tensor> code_usage_cuda(const at::Tensor& indices_in, int64_t num_codes) {
  TORCH_CHECK(indices_in.is_cuda(), "cuda code_usage: indices must be a CUDA tensor, got one on ",
              indices_in.device());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong, "cuda code_usage: indices must be int64, got ",
              indices_in.scalar_type());
  vqkernels::check_num_codes(num_codes, "code_usage", "cuda");
  c10::cuda::CUDAGuard guard(indices_in.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t N = indices.numel(), K = num_codes;
  at::Tensor counts = at::empty({K}, indices.options());  // zeroed by the launcher
  at::Tensor perplexity = at::empty({}, indices.options().dtype(at::kFloat));
  poison(perplexity);
  at::Tensor range = at::empty({2}, indices.options());
  const cudaError_t err = vqkernels::cuda::launch_code_usage(
      indices.const_data_ptr<int64_t>(), N, K, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
      perplexity.data_ptr<float>(), reinterpret_cast<unsigned long long*>(range.data_ptr<int64_t>()),
      stream_of(indices));
  check_launch(err, "code_usage", N, K, 0, at::kLong);
  check_range(range, N, K, 3, stream_of(indices));
  return {counts, perplexity};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CUDA, m) {
  m.impl("code_stats", &code_stats_cuda);
  m.impl("code_usage", &code_usage_cuda);
}
