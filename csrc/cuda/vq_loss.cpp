// The CUDA launchers of the VQ loss ops (vq_loss_fwd, vq_loss_bwd, code_stats, code_usage): argument
// checks (csrc/common.h, shared with the CPU launchers), output allocation in z's
// layout (empty_like), stream and device guard, the index-range check, and the TORCH_LIBRARY_IMPL
// registration. The kernels are in vq_loss_kernels.cu (light includes); see its header comment for
// the work mapping and what is and is not deterministic.
//
// INDEX RANGE, WITHOUT A HOST SYNC. Indices outside [0, K) are never dereferenced (the kernels skip such
// rows), and an index min/max reduction runs on the device. By default a one-thread kernel queued after
// the op's work checks it and stops with a device-side assert (the way torch's embedding reports a bad
// index on CUDA): the host never waits, so the ops overlap with other work and can be captured in a CUDA
// graph. VQKERNELS_SYNC_INDEX_CHECK=1 instead copies the two 8-byte results back (waiting for the
// stream) and raises IndexError as the cpu kernels and the reference do: for debugging. grad_loss is
// read by the kernels from device memory (never .item()).
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (that one pulls in cusparse/cublas headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>

#include "common.h"

namespace vqkernels {
namespace cuda {
// Defined in vq_loss_kernels.cu.
int64_t vq_loss_fwd_workspace(int64_t N);
cudaError_t launch_vq_loss_fwd(const void* z, const int64_t* zs, const void* cb, const int64_t* idx, void* zq,
                               const int64_t* qs, int dtype, int64_t N, int64_t Tlen, int64_t K, int64_t D,
                               double scale, double* workspace, float* loss, unsigned long long* range,
                               cudaStream_t stream);
cudaError_t launch_vq_loss_bwd(const void* gzq, const int64_t* gs, const void* z, const int64_t* zs, const void* cb,
                               const int64_t* idx, void* gz, const int64_t* os, float* acc, void* gcb,
                               const float* grad_loss, double mul_z, double mul_cb, int dtype, int64_t N,
                               int64_t Tlen, int64_t K, int64_t D, bool need_gz, bool need_gcb,
                               unsigned long long* range, cudaStream_t stream);
cudaError_t launch_code_stats(const void* z, const int64_t* zs, const int64_t* idx, int dtype, int64_t N,
                              int64_t Tlen, int64_t K, int64_t D, unsigned long long* hist, float* counts,
                              float* sums, unsigned long long* range, cudaStream_t stream);
cudaError_t launch_code_usage(const int64_t* idx, int64_t N, int64_t K, unsigned long long* counts,
                              float* perplexity, unsigned long long* range, cudaStream_t stream);
void decode_index_range(unsigned long long r0, unsigned long long r1, int64_t* lo, int64_t* hi);
cudaError_t launch_index_range_assert(const unsigned long long* range, int64_t K, int op, cudaStream_t stream);
}  // namespace cuda
}  // namespace vqkernels

namespace {

using vqkernels::poison_outputs;

void check_common(const at::Tensor& z, const at::Tensor& indices, const char* op) {
  vqkernels::check_vq_rows(z, indices, op, "cuda");
}

void check_codebook(const at::Tensor& z, const at::Tensor& codebook, const char* op) {
  vqkernels::check_vq_codebook(z, codebook, op, "cuda");
}

int dtype_id(at::ScalarType st) { return st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2; }

using vqkernels::rows_of;

// T of the (B, T, D) row numbering (n = b * T + t); 2-D tensors are (1, N, D). At least 1.
int64_t t_of(const at::Tensor& z) { return std::max<int64_t>(z.dim() == 3 ? z.size(1) : z.size(0), 1); }

// {sb, st, sd} of a (B, T, D) or (N, D) tensor, as the kernels take them (from the shared StridedRows view).
struct Strides {
  int64_t s[3];
};
Strides strides_of(const at::Tensor& x) {
  const vqkernels::StridedRows r = vqkernels::StridedRows::of(x);
  return {{r.sb, r.st, r.sd}};
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check_launch(cudaError_t err, const char* op, int64_t N, int64_t K, int64_t D, at::ScalarType st) {
  TORCH_CHECK(err == cudaSuccess, "cuda ", op, ": launch failed for N=", N, " K=", K, " D=", D, " ", st, ": ",
              cudaGetErrorString(err));
}

bool sync_index_check() {
  const char* v = std::getenv("VQKERNELS_SYNC_INDEX_CHECK");  // read per call: cheap, and tests toggle it
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// Checks the indices' device min/max (see INDEX RANGE above). op: 0 fwd, 1 bwd, 2 code_stats, 3 code_usage.
void check_range(const at::Tensor& range, int64_t N, int64_t K, int op, cudaStream_t stream) {
  if (N <= 0) return;
  if (!sync_index_check()) {
    const cudaError_t err = vqkernels::cuda::launch_index_range_assert(
        reinterpret_cast<const unsigned long long*>(range.const_data_ptr<int64_t>()), K, op, stream);
    TORCH_CHECK(err == cudaSuccess, "cuda index range check: launch failed: ", cudaGetErrorString(err));
    return;
  }
  const at::Tensor host = range.to(at::kCPU);  // synchronises with the current stream
  const int64_t* r = host.const_data_ptr<int64_t>();
  int64_t lo = 0, hi = 0;
  vqkernels::cuda::decode_index_range(static_cast<unsigned long long>(r[0]), static_cast<unsigned long long>(r[1]),
                                      &lo, &hi);
  if (lo < 0 || hi >= K) {
    TORCH_CHECK_INDEX(false, "indices out of range: got index ", lo < 0 ? lo : hi, ", codes are numbered 0..", K - 1,
                      " (K=", K, ")");
  }
}

void poison(at::Tensor& t) {
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

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
  m.impl("vq_loss_fwd", &vq_loss_fwd_cuda);
  m.impl("vq_loss_bwd", &vq_loss_bwd_cuda);
  m.impl("code_stats", &code_stats_cuda);
  m.impl("code_usage", &code_usage_cuda);
}
