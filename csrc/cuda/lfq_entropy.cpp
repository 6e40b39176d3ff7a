// The CUDA launchers of lfq_entropy_fwd / lfq_entropy_bwd: argument checks, outputs (poisoned under
// VQKERNELS_POISON_OUTPUTS), workspaces, stream and device guard, and the TORCH_LIBRARY_IMPL registration. The
// kernels are in lfq_entropy_kernels.cu (light includes; its header comment has the work mapping). The contract is
// the CPU kernel's (csrc/cpu/lfq_entropy.cpp) except for dtypes: x is float32, float16 or bfloat16 here (read as it
// is; the arithmetic is float32), per_sample, codebook and pbar are float32, grad_x comes back in x's dtype. The
// upstream gradients are read on the device (no host sync: the backward can be captured in a CUDA graph).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"
#include "vq_launch.h"

namespace vqkernels {
namespace cuda {
// Defined in lfq_entropy_kernels.cu.
void lfq_entropy_fwd_plan(int64_t N, int64_t C, int d, int64_t* splits, int64_t* rows_per_split,
                          int64_t* ws_floats, int64_t* part_doubles);
int64_t lfq_entropy_bwd_plan(int64_t N, int64_t C, int d, int64_t* part_floats);
cudaError_t launch_lfq_entropy_fwd(const void* x, int dtype, int64_t N, int64_t C, int d, double scale, double eps,
                                   float* pbar, float* ws, int64_t splits, int64_t rows_per_split, double* part,
                                   float* ps, float* cb, cudaStream_t stream);
cudaError_t launch_lfq_entropy_bwd(const void* x, int dtype, const float* pbar, const float* grad_ps,
                                   const float* grad_cb, float* G, float* GT, float* part, int64_t Z, void* out,
                                   int64_t N, int64_t C, int d, double scale, double eps, cudaStream_t stream);
}  // namespace cuda
}  // namespace vqkernels

namespace {

using vqkernels::cuda::dtype_id;
using vqkernels::cuda::poison;
using vqkernels::cuda::stream_of;

void check_args(const at::Tensor& x, double scale, double eps, const char* op) {
  TORCH_CHECK(x.is_cuda(), "cuda ", op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 3, "cuda ", op, ": x must be 3-D (N, C, d), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "cuda ", op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= 65535, "cuda ", op, ": x must hold 1 to 65535 codebooks, got ",
              x.size(1));
  TORCH_CHECK(x.size(2) >= 1 && x.size(2) <= 30, "cuda ", op, ": d must be in [1, 30], got ", x.size(2));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "cuda ", op, ": scale must be finite and > 0, got ", scale);
  TORCH_CHECK(eps >= 0 && eps <= 1, "cuda ", op, ": eps must be in [0, 1], got ", eps);
}

void check_scalar(const at::Tensor& g, const at::Tensor& x, const char* name) {
  TORCH_CHECK(g.numel() == 1 && g.scalar_type() == at::kFloat && g.device() == x.device(),
              "cuda lfq_entropy_bwd: ", name, " must be a float32 scalar on x's device (", x.device(), "), got ",
              g.scalar_type(), " of shape ", g.sizes(), " on ", g.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lfq_entropy_fwd_cuda(const at::Tensor& x_in, double scale,
                                                                    double eps) {
  check_args(x_in, scale, eps, "lfq_entropy_fwd");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int d = (int)x.size(2);
  const int64_t K = int64_t(1) << d;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor pbar = at::empty({C, K}, f32), ps = at::empty({}, f32), cb = at::empty({}, f32);
  poison(pbar);
  poison(ps);
  poison(cb);
  if (N == 0) {  // the mean of nothing, as torch's mean (and the CPU kernel)
    const double nan = std::numeric_limits<double>::quiet_NaN();
    pbar.fill_(nan);
    ps.fill_(nan);
    cb.fill_(nan);
    return {ps, cb, pbar};
  }
  int64_t splits = 1, rows_per_split = N, ws_floats = 0, part_doubles = 0;
  vqkernels::cuda::lfq_entropy_fwd_plan(N, C, d, &splits, &rows_per_split, &ws_floats, &part_doubles);
  at::Tensor ws = at::empty({ws_floats}, f32);
  at::Tensor part = at::empty({part_doubles}, x.options().dtype(at::kDouble));
  const cudaError_t e = vqkernels::cuda::launch_lfq_entropy_fwd(
      x.const_data_ptr(), dtype_id(x.scalar_type()), N, C, d, scale, eps, pbar.data_ptr<float>(),
      ws_floats > 0 ? ws.data_ptr<float>() : nullptr, splits, rows_per_split, part.data_ptr<double>(),
      ps.data_ptr<float>(), cb.data_ptr<float>(), stream_of(x));
  TORCH_CHECK(e == cudaSuccess, "cuda lfq_entropy_fwd: launch failed for N=", N, " C=", C, " d=", d, ": ",
              cudaGetErrorString(e));
  return {ps, cb, pbar};
}

at::Tensor lfq_entropy_bwd_cuda(const at::Tensor& grad_ps_in, const at::Tensor& grad_cb_in, const at::Tensor& x_in,
                                const at::Tensor& pbar_in, double scale, double eps) {
  check_args(x_in, scale, eps, "lfq_entropy_bwd");
  check_scalar(grad_ps_in, x_in, "grad_per_sample");
  check_scalar(grad_cb_in, x_in, "grad_codebook");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int d = (int)x_in.size(2);
  const int64_t K = int64_t(1) << d;
  TORCH_CHECK(pbar_in.dim() == 2 && pbar_in.size(0) == C && pbar_in.size(1) == K, "cuda lfq_entropy_bwd: pbar must be (",
              C, ", ", K, "), got ", pbar_in.sizes());
  TORCH_CHECK(pbar_in.scalar_type() == at::kFloat && pbar_in.device() == x_in.device(),
              "cuda lfq_entropy_bwd: pbar must be float32 on x's device, got ", pbar_in.scalar_type(), " on ",
              pbar_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), pbar = pbar_in.contiguous();
  const at::Tensor gps = grad_ps_in.reshape({1}).contiguous(), gcb = grad_cb_in.reshape({1}).contiguous();
  at::Tensor out = at::empty({N, C, (int64_t)d}, x.options());
  poison(out);
  if (N == 0) return out;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor G = at::empty({C * K}, f32), GT = at::empty({C * K}, f32);
  int64_t part_floats = 0;
  const int64_t Z = vqkernels::cuda::lfq_entropy_bwd_plan(N, C, d, &part_floats);
  at::Tensor part = at::empty({part_floats}, f32);
  const cudaError_t e = vqkernels::cuda::launch_lfq_entropy_bwd(
      x.const_data_ptr(), dtype_id(x.scalar_type()), pbar.const_data_ptr<float>(), gps.const_data_ptr<float>(),
      gcb.const_data_ptr<float>(), G.data_ptr<float>(), GT.data_ptr<float>(), part.data_ptr<float>(), Z,
      out.data_ptr(), N, C, d, scale, eps, stream_of(x));
  TORCH_CHECK(e == cudaSuccess, "cuda lfq_entropy_bwd: launch failed for N=", N, " C=", C, " d=", d, ": ",
              cudaGetErrorString(e));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CUDA, m) {
  m.impl("lfq_entropy_fwd", &lfq_entropy_fwd_cuda);
  m.impl("lfq_entropy_bwd", &lfq_entropy_bwd_cuda);
}
