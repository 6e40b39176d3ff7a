// The CUDA launchers of the VQ loss ops (vq_loss_fwd, vq_loss_bwd): argument checks (csrc/common.h, shared with
// the CPU launchers), output allocation in z's layout (empty_like), stream and device guard, the index-range check
// (without a host sync: see vq_launch.h), and the TORCH_LIBRARY_IMPL registration. The kernels are in
// vq_loss_kernels.cu (light includes); see its header comment for the work mapping and what is and is not
// deterministic. grad_loss is read by the kernels from device memory (never .item()). (code_stats and code_usage
// launch from code_stats.cpp; what both launchers share is in vq_launch.h.)
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

// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> vq_loss_fwd_cuda(const at::Tensor& z, const at::Tensor& codebook_in,
                                                     const at::Tensor& indices_in, double scale) {
  check_common(z, indices_in, "vq_loss_fwd");
  check_codebook(z, codebook_in, "vq_loss_fwd");
  c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor codebook = codebook_in.contiguous(), indices = indices_in.contiguous();
  const int64_t N = rows_of(z), D = z.size(-1), K = codebook.size(0);
  at::Tensor zq = at::empty_like(z);  // z's layout (strides preserved for a dense z)
  at::Tensor loss = at::empty({}, z.options().dtype(at::kFloat));
  poison(zq);
  poison(loss);
  at::Tensor range = at::empty({2}, z.options().dtype(at::kLong));
  at::Tensor work = at::empty({vqkernels::cuda::vq_loss_fwd_workspace(N)}, z.options().dtype(at::kDouble));
  const Strides zs = strides_of(z), qs = strides_of(zq);
  const cudaError_t err = vqkernels::cuda::launch_vq_loss_fwd(
      z.const_data_ptr(), zs.s, codebook.const_data_ptr(), indices.const_data_ptr<int64_t>(), zq.data_ptr(), qs.s,
      dtype_id(z.scalar_type()), N, t_of(z), K, D, scale, work.data_ptr<double>(), loss.data_ptr<float>(),
      reinterpret_cast<unsigned long long*>(range.data_ptr<int64_t>()), stream_of(z));
  check_launch(err, "vq_loss_fwd", N, K, D, z.scalar_type());
  check_range(range, N, K, 0, stream_of(z));
  return {zq, loss};
}

std::tuple<at::Tensor, at::Tensor> vq_loss_bwd_cuda(const at::Tensor& gzq, const at::Tensor& grad_loss,
                                                     const at::Tensor& z, const at::Tensor& codebook_in,
                                                     const at::Tensor& indices_in, double w_commit,
                                                     double w_codebook, bool need_grad_z, bool need_grad_codebook) {
  check_common(z, indices_in, "vq_loss_bwd");
  check_codebook(z, codebook_in, "vq_loss_bwd");
  TORCH_CHECK(gzq.sizes() == z.sizes(), "cuda vq_loss_bwd: grad_zq must have the shape of z ", z.sizes(), ", got ",
              gzq.sizes());
  TORCH_CHECK(gzq.scalar_type() == z.scalar_type() && gzq.device() == z.device(),
              "cuda vq_loss_bwd: grad_zq must be a CUDA tensor of z's dtype on z's device");
  TORCH_CHECK(grad_loss.numel() == 1, "cuda vq_loss_bwd: grad_loss must hold one value, got ", grad_loss.numel());
  c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor codebook = codebook_in.contiguous(), indices = indices_in.contiguous();
  const int64_t N = rows_of(z), D = z.size(-1), K = codebook.size(0);
  const double numel = double(N) * double(D);
  const double mul_z = numel > 0 ? 2.0 * w_commit / numel : 0.0;
  const double mul_cb = numel > 0 ? 2.0 * w_codebook / numel : 0.0;
  // One float32 on z's device, read by the kernels (a device tensor stays there: no sync).
  const at::Tensor g = grad_loss.reshape({1}).to(z.device(), at::kFloat).contiguous();

  at::Tensor gz = need_grad_z ? at::empty_like(z) : at::empty({0}, z.options());
  at::Tensor gcb = need_grad_codebook ? at::empty({K, D}, codebook.options()) : at::empty({0}, codebook.options());
  poison(gz);
  poison(gcb);
  at::Tensor range = at::empty({2}, z.options().dtype(at::kLong));
  // float32 codebooks accumulate in the output itself; others in a float32 (K, D) scratch.
  at::Tensor acc;
  if (need_grad_codebook) acc = z.scalar_type() == at::kFloat ? gcb : at::empty({K, D}, z.options().dtype(at::kFloat));
  if (need_grad_codebook && numel == 0) gcb.zero_();  // no kernel reads grad_loss then: c_cb = 0 exactly

  const Strides zs = strides_of(z), gs = strides_of(gzq);
  const Strides os = need_grad_z ? strides_of(gz) : zs;
  const bool run_gcb = need_grad_codebook && numel > 0;
  const cudaError_t err = vqkernels::cuda::launch_vq_loss_bwd(
      gzq.const_data_ptr(), gs.s, z.const_data_ptr(), zs.s, codebook.const_data_ptr(),
      indices.const_data_ptr<int64_t>(), need_grad_z ? gz.data_ptr() : nullptr, os.s,
      run_gcb ? acc.data_ptr<float>() : nullptr, run_gcb ? gcb.data_ptr() : nullptr, g.const_data_ptr<float>(),
      mul_z, mul_cb, dtype_id(z.scalar_type()), N, t_of(z), K, D, need_grad_z, run_gcb,
      reinterpret_cast<unsigned long long*>(range.data_ptr<int64_t>()), stream_of(z));
  check_launch(err, "vq_loss_bwd", N, K, D, z.scalar_type());
  check_range(range, N, K, 1, stream_of(z));
  return {gz, gcb};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CUDA, m) {
  m.impl("vq_loss_fwd", &vq_loss_fwd_cuda);
  m.impl("vq_loss_bwd", &vq_loss_bwd_cuda);
}
