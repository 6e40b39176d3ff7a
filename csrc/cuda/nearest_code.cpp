// The CUDA launcher of nearest_code: argument checks, output allocation, stream and device guard,
// and the TORCH_LIBRARY_IMPL registration. The kernels are in nearest_code_kernels.cu (light includes);
// see its header comment for which kernel serves which dtype.
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls in cusparse.h and
// cublas headers, which a bare CUDA toolkit (like /usr/local/cuda on the build machines) may lack.
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream forwards to.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"

namespace vqkernels {
namespace cuda {
// Defined in nearest_code_kernels.cu.
int64_t nearest_code_workspace_floats(int64_t K);
cudaError_t launch_nearest_code(const void* x, const void* codebook, int dtype, int64_t N, int64_t K, int64_t D,
                                int64_t metric, bool allow_tf32, int64_t* out_idx, float* out_dist,
                                float* workspace, cudaStream_t stream);
}  // namespace cuda
}  // namespace vqkernels

namespace {

// x (N, D), codebook (K, D): float32, float16 or bfloat16, one CUDA device.
// Returns (indices int64 (N,), distance float32 (N,)).
std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x_, const at::Tensor& codebook_,
                                                     int64_t metric, bool allow_tf32) {
  vqkernels::check_nearest_code_args(x_, codebook_, metric, "cuda");
  TORCH_CHECK(x_.is_cuda(), "cuda nearest_code: x must be a CUDA tensor, got one on ", x_.device());
  TORCH_CHECK(codebook_.is_cuda(), "cuda nearest_code: codebook must be a CUDA tensor, got one on ",
              codebook_.device());
  const auto st = x_.scalar_type();
  int dtype = -1;
  if (st == at::kFloat) dtype = 0;
  else if (st == at::kHalf) dtype = 1;
  else if (st == at::kBFloat16) dtype = 2;
  TORCH_CHECK(dtype >= 0, "cuda nearest_code: dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(codebook_.size(0) <= std::numeric_limits<int32_t>::max(),
              "cuda nearest_code: at most 2^31 - 1 codes (indices are kept in int32), got K=", codebook_.size(0));

  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor codebook = codebook_.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = codebook.size(0);

  at::Tensor idx = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, x.options().dtype(at::kFloat));
  if (vqkernels::poison_outputs()) {  // an element the kernel forgets to write then fails a test
    idx.fill_(-0x7EADBEEF);
    dist.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  if (N == 0) return {idx, dist};

  at::Tensor workspace =
      at::empty({vqkernels::cuda::nearest_code_workspace_floats(K)}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t err = vqkernels::cuda::launch_nearest_code(
      x.data_ptr(), codebook.data_ptr(), dtype, N, K, D, metric, allow_tf32, idx.data_ptr<int64_t>(),
      dist.data_ptr<float>(), workspace.data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "cuda nearest_code: launch failed for N=", N, " K=", K, " D=", D, " ", st,
              ": ", cudaGetErrorString(err));
  return {idx, dist};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CUDA, m) { m.impl("nearest_code", &nearest_code_cuda); }
