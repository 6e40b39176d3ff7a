// What the CUDA launchers of the quantizer ops share (vq_loss.cpp: vq_loss_fwd / vq_loss_bwd; code_stats.cpp:
// code_stats / code_usage): the declarations of the launch functions of vq_loss_kernels.cu, the argument checks,
// the (B, T, D) strides the kernels take, stream and launch-error handling, output poisoning, and the index-range
// check.
//
// INDEX RANGE, WITHOUT A HOST SYNC. Indices outside [0, K) are never dereferenced (the kernels skip such
// rows), and an index min/max reduction runs on the device. By default a one-thread kernel queued after
// the op's work checks it and stops with a device-side assert (the way torch's embedding reports a bad
// index on CUDA): the host never waits, so the ops overlap with other work and can be captured in a CUDA
// graph. VQKERNELS_SYNC_INDEX_CHECK=1 instead copies the two 8-byte results back (waiting for the
// stream) and raises IndexError as the cpu kernels and the reference do: for debugging.
#pragma once
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h (that one pulls in cusparse/cublas headers).
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

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

inline void check_common(const at::Tensor& z, const at::Tensor& indices, const char* op) {
  vqkernels::check_vq_rows(z, indices, op, "cuda");
}

inline void check_codebook(const at::Tensor& z, const at::Tensor& codebook, const char* op) {
  vqkernels::check_vq_codebook(z, codebook, op, "cuda");
}

inline int dtype_id(at::ScalarType st) { return st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2; }

// T of the (B, T, D) row numbering (n = b * T + t); 2-D tensors are (1, N, D). At least 1.
inline int64_t t_of(const at::Tensor& z) { return std::max<int64_t>(z.dim() == 3 ? z.size(1) : z.size(0), 1); }

// {sb, st, sd} of a (B, T, D) or (N, D) tensor, as the kernels take them (from the shared StridedRows view).
struct Strides {
  int64_t s[3];
};
inline Strides strides_of(const at::Tensor& x) {
  const vqkernels::StridedRows r = vqkernels::StridedRows::of(x);
  return {{r.sb, r.st, r.sd}};
}

inline cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

inline void check_launch(cudaError_t err, const char* op, int64_t N, int64_t K, int64_t D, at::ScalarType st) {
  TORCH_CHECK(err == cudaSuccess, "cuda ", op, ": launch failed for N=", N, " K=", K, " D=", D, " ", st, ": ",
              cudaGetErrorString(err));
}

inline bool sync_index_check() {
  const char* v = std::getenv("VQKERNELS_SYNC_INDEX_CHECK");  // read per call: cheap, and tests toggle it
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// Checks the indices' device min/max (see INDEX RANGE above). op: 0 fwd, 1 bwd, 2 code_stats, 3 code_usage.
inline void check_range(const at::Tensor& range, int64_t N, int64_t K, int op, cudaStream_t stream) {
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

inline void poison(at::Tensor& t) {
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

}  // namespace cuda
}  // namespace vqkernels
