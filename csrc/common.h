// Shared argument checks and dispatch helpers for the C++ kernels (CPU and CUDA launchers).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cstdlib>

namespace vqkernels {

// Metric ids shared by every backend (Python: vqkernels.ops.nearest_code.METRIC_IDS).
//   0 = l2:   score = ||c||^2 - 2 x.c,  distance = max(||x||^2 + score, 0)
//   1 = ip:   score = -x.c,             distance = 1 + score   (cosine on l2-normalised inputs)
// A NaN score counts as +inf: it never wins. Among equal scores the lowest code index wins.
enum Metric : int64_t { kL2 = 0, kInnerProduct = 1 };

// Tests set VQKERNELS_POISON_OUTPUTS=1: every launcher then fills its outputs with poison before the
// kernel runs, so an element a kernel forgets to write fails a test instead of passing with stale data.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("VQKERNELS_POISON_OUTPUTS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

inline void check_nearest_code_args(const at::Tensor& x, const at::Tensor& codebook, int64_t metric,
                                    const char* backend) {
  TORCH_CHECK(x.dim() == 2, backend, " nearest_code: x must be 2-D (N, D), got ", x.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2, backend, " nearest_code: codebook must be 2-D (K, D), got ",
              codebook.dim(), "-D");
  TORCH_CHECK(x.size(1) == codebook.size(1), backend, " nearest_code: x has D=", x.size(1),
              " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, backend, " nearest_code: codebook must hold at least one code");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), backend,
              " nearest_code: x and codebook must share a dtype, got ", x.scalar_type(), " and ",
              codebook.scalar_type());
  TORCH_CHECK(x.device() == codebook.device(), backend,
              " nearest_code: x and codebook must be on one device, got ", x.device(), " and ",
              codebook.device());
  TORCH_CHECK(metric == kL2 || metric == kInnerProduct, backend,
              " nearest_code: metric id must be 0 (l2) or 1 (inner product), got ", metric);
}

}  // namespace vqkernels
