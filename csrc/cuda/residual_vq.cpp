// The CUDA launchers of residual_vq_fwd / residual_vq_bwd: argument checks, outputs, stream and device guard,
// and the TORCH_LIBRARY_IMPL registration. The kernels are in residual_vq_kernels.cu (light includes; its header
// comment has the work mapping). Float32 only; D up to what a block's shared memory holds (4 rows x 2 x D floats).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"

namespace vqkernels {
namespace cuda {
// Defined in residual_vq_kernels.cu.
size_t residual_vq_smem_bytes(int64_t D);
cudaError_t launch_residual_vq_fwd(const float* x, const float* cbs, float* cnorm, int64_t* idx, float* quant,
                                   double* err, float* counts, float* sums, int64_t N, int64_t Q, int64_t K,
                                   int64_t D, bool need_stats, cudaStream_t stream);
cudaError_t launch_residual_vq_bwd(const float* g, const float* ge, const float* x, const float* cbs,
                                   const int64_t* idx, float* out, int64_t N, int64_t Q, int64_t K, int64_t D,
                                   bool rotation, int* bad_index, cudaStream_t stream);
}  // namespace cuda
}  // namespace vqkernels

namespace {

void check_args(const at::Tensor& x, const at::Tensor& cbs) {
  TORCH_CHECK(x.is_cuda() && cbs.is_cuda(), "cuda residual_vq: x and codebooks must be CUDA tensors, got ",
              x.device(), " and ", cbs.device());
  TORCH_CHECK(x.device() == cbs.device(), "cuda residual_vq: x and codebooks must be on one device");
  TORCH_CHECK(x.dim() == 2, "cuda residual_vq: x must be 2-D (N, D), got ", x.dim(), "-D");
  TORCH_CHECK(cbs.dim() == 3, "cuda residual_vq: codebooks must be 3-D (Q, K, D), got ", cbs.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && cbs.scalar_type() == at::kFloat,
              "cuda residual_vq: x and codebooks must be float32, got ", x.scalar_type(), " and ", cbs.scalar_type());
  TORCH_CHECK(x.size(1) == cbs.size(2), "cuda residual_vq: x has D=", x.size(1), " but codebooks have D=", cbs.size(2));
  TORCH_CHECK(cbs.size(0) >= 1 && cbs.size(1) >= 1 && cbs.size(1) <= std::numeric_limits<int32_t>::max(),
              "cuda residual_vq: codebooks must hold 1 or more stages of 1 to 2^31 - 1 codes, got ", cbs.sizes());
  TORCH_CHECK(vqkernels::cuda::residual_vq_smem_bytes(x.size(1)) <= 227 * 1024,
              "cuda residual_vq: D=", x.size(1), " is too large for the kernel's shared memory");
}

at::Tensor new_out(at::IntArrayRef shape, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(shape, opt);
  if (vqkernels::poison_outputs()) {
    if (t.is_floating_point())
      t.fill_(std::numeric_limits<float>::quiet_NaN());
    else
      t.fill_(-0x7EADBEEF);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_vq_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& cbs_in, bool need_stats) {
  check_args(x_in, cbs_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), cbs = cbs_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), Q = cbs.size(0), K = cbs.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor idx = new_out({N, Q}, x.options().dtype(at::kLong));
  at::Tensor quant = new_out({N, D}, f32);
  at::Tensor err = at::zeros({Q}, x.options().dtype(at::kDouble));
  at::Tensor counts = need_stats ? at::zeros({Q, K}, f32) : at::empty({0}, f32);
  at::Tensor sums = need_stats ? at::zeros({Q, K, D}, f32) : at::empty({0}, f32);
  at::Tensor cnorm = at::empty({Q * K}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t e = vqkernels::cuda::launch_residual_vq_fwd(
      x.data_ptr<float>(), cbs.data_ptr<float>(), cnorm.data_ptr<float>(), idx.data_ptr<int64_t>(),
      quant.data_ptr<float>(), err.data_ptr<double>(), need_stats ? counts.data_ptr<float>() : nullptr,
      need_stats ? sums.data_ptr<float>() : nullptr, N, Q, K, D, need_stats, stream);
  TORCH_CHECK(e == cudaSuccess, "cuda residual_vq_fwd: launch failed: ", cudaGetErrorString(e));
  return {idx, quant, err.to(at::kFloat), counts, sums};
}

at::Tensor residual_vq_bwd_cuda(const at::Tensor& g_in, const at::Tensor& ge_in, const at::Tensor& x_in,
                                const at::Tensor& cbs_in, const at::Tensor& idx_in, bool rotation) {
  check_args(x_in, cbs_in);
  const int64_t N = x_in.size(0), D = x_in.size(1), Q = cbs_in.size(0), K = cbs_in.size(1);
  TORCH_CHECK(g_in.device() == x_in.device() && g_in.scalar_type() == at::kFloat && g_in.dim() == 2 &&
                  g_in.size(0) == N && g_in.size(1) == D,
              "cuda residual_vq_bwd: grad_quantized must be float32 of x's shape on x's device");
  TORCH_CHECK(ge_in.device() == x_in.device() && ge_in.scalar_type() == at::kFloat && ge_in.dim() == 1 &&
                  ge_in.size(0) == Q,
              "cuda residual_vq_bwd: grad_sq_err must be float32 (Q,) on x's device");
  TORCH_CHECK(idx_in.device() == x_in.device() && idx_in.scalar_type() == at::kLong && idx_in.dim() == 2 &&
                  idx_in.size(0) == N && idx_in.size(1) == Q,
              "cuda residual_vq_bwd: indices must be int64 (N, Q) on x's device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = g_in.contiguous(), ge = ge_in.contiguous(), x = x_in.contiguous(), cbs = cbs_in.contiguous(),
                   idx = idx_in.contiguous();
  at::Tensor out = new_out({N, D}, x.options());
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const cudaError_t e = vqkernels::cuda::launch_residual_vq_bwd(
      g.data_ptr<float>(), ge.data_ptr<float>(), x.data_ptr<float>(), cbs.data_ptr<float>(), idx.data_ptr<int64_t>(),
      out.data_ptr<float>(), N, Q, K, D, rotation, bad.data_ptr<int>(), stream);
  TORCH_CHECK(e == cudaSuccess, "cuda residual_vq_bwd: launch failed: ", cudaGetErrorString(e));
  TORCH_CHECK_INDEX(bad.item<int>() == 0, "cuda residual_vq_bwd: an index lies outside [0, ", K, ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CUDA, m) {
  m.impl("residual_vq_fwd", &residual_vq_fwd_cuda);
  m.impl("residual_vq_bwd", &residual_vq_bwd_cuda);
}
