// Shared argument checks and dispatch helpers for the C++ kernels (CPU and CUDA launchers).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <algorithm>
#include <cstdint>
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

// ------------------------------------------------------------------------------------------------
// The one strided-rows view used by the CPU and CUDA kernels: a (N, D) or (B, T, D) tensor with any
// strides (a channel-first feature map permuted to (B, H*W, C) is read in place), rows numbered
// n = b * T + t, row n at offset(n), element d at offset(n) + d * sd. The stride of a size-1 dimension
// is never used to move, so it is normalised (0 for b and t, 1 for d): a single row or a single element
// then counts as dense, which keeps the vectorised paths open.
struct StridedRows {
  int64_t T, sb, st, sd;
  int64_t offset(int64_t n) const { return (n / T) * sb + (n % T) * st; }
  static StridedRows of(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "StridedRows: expected a 2-D or 3-D tensor, got ", x.dim(), "-D");
    const int64_t o = x.dim() == 3 ? 1 : 0;  // index of the T dimension
    StridedRows r;
    r.T = std::max<int64_t>(x.size(o), 1);
    r.sb = (o == 0 || x.size(0) == 1) ? 0 : x.stride(0);
    r.st = x.size(o) == 1 ? 0 : x.stride(o);
    r.sd = x.size(o + 1) == 1 ? 1 : x.stride(o + 1);
    return r;
  }
};

inline int64_t rows_of(const at::Tensor& z) { return z.dim() == 3 ? z.size(0) * z.size(1) : z.size(0); }

// ------------------------------------------------------------------------------------------------
// Argument checks of the VQ loss ops, for every device's launcher (backend: "cpu" or "cuda", which also
// names the device the tensors must be on). z is (N, D) or (B, T, D), any strides; indices int64 of z's
// leading shape, any strides. double z is taken by the CPU kernels only.
inline void check_vq_rows(const at::Tensor& z, const at::Tensor& indices, const char* op, const char* backend) {
  const bool cuda = backend[0] == 'c' && backend[1] == 'u';
  const char* devname = cuda ? "CUDA" : "CPU";
  TORCH_CHECK(cuda ? z.is_cuda() : z.device().is_cpu(), backend, " ", op, ": z must be a ", devname,
              " tensor, got one on ", z.device());
  TORCH_CHECK(indices.device() == z.device(), backend, " ", op, ": indices must be on z's device (", z.device(),
              "), got ", indices.device());
  TORCH_CHECK(z.dim() == 2 || z.dim() == 3, backend, " ", op, ": z must be 2-D (N, D) or 3-D (B, T, D), got ",
              z.dim(), "-D");
  TORCH_CHECK(indices.scalar_type() == at::kLong, backend, " ", op, ": indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.dim() == z.dim() - 1 && indices.sizes() == z.sizes().slice(0, z.dim() - 1), backend, " ", op,
              ": indices must have shape (N,) = (", z.sizes().slice(0, z.dim() - 1), "), got ", indices.sizes());
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (!cuda && st == at::kDouble), backend,
              " ", op, ": z must be float32, float16 or bfloat16", cuda ? "" : " (or float64)", ", got ", st);
}

inline void check_vq_codebook(const at::Tensor& z, const at::Tensor& codebook, const char* op, const char* backend) {
  TORCH_CHECK(codebook.device() == z.device(), backend, " ", op, ": codebook must be on z's device (", z.device(),
              "), got ", codebook.device());
  TORCH_CHECK(codebook.dim() == 2, backend, " ", op, ": codebook must be 2-D (K, D), got ", codebook.dim(), "-D");
  TORCH_CHECK(codebook.size(0) >= 1, backend, " ", op, ": codebook must hold at least one code");
  TORCH_CHECK(z.size(-1) == codebook.size(1), backend, " ", op, ": z has D=", z.size(-1), " but codebook has D=",
              codebook.size(1));
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), backend, " ", op,
              ": z and codebook must share a dtype, got ", z.scalar_type(), " and ", codebook.scalar_type());
}

inline void check_num_codes(int64_t num_codes, const char* op, const char* backend) {
  TORCH_CHECK(num_codes >= 1, backend, " ", op, ": num_codes must be >= 1, got ", num_codes);
}

// ------------------------------------------------------------------------------------------------
// Argument checks of the attention ops, for every device's launcher (backend "cpu" or "cuda" also names
// the device the tensors must be on). q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh) with H % Hkv == 0; one
// dtype among float32, float16, bfloat16; one device. Head-dim limits are the backend's own.
inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
                                const char* backend, const char* kname = "k", const char* vname = "v") {
  const bool cuda = backend[0] == 'c' && backend[1] == 'u';
  const char* devname = cuda ? "CUDA" : "CPU";
  TORCH_CHECK(cuda ? q.is_cuda() : q.device().is_cpu(), backend, " ", op, ": q must be a ", devname,
              " tensor, got one on ", q.device());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), backend, " ", op, ": ", kname, " and ", vname,
              " must be on q's device (", q.device(), "), got ", k.device(), " and ", v.device());
  TORCH_CHECK(q.dim() == 4, backend, " ", op, ": q must be 4-D (B, H, Tq, Dh), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, backend, " ", op, ": ", kname, " and ", vname,
              " must be 4-D (B, Hkv, T, Dh), got ", k.dim(), "-D and ", v.dim(), "-D");
  TORCH_CHECK(k.sizes() == v.sizes(), backend, " ", op, ": ", kname, " and ", vname, " must have one shape, got ",
              k.sizes(), " and ", v.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, backend, " ", op,
              ": q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, backend, " ", op, ": q, ", kname, " and ", vname,
              " must share a dtype, got ", st, ", ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0), backend, " ", op, ": ", kname, " has batch size ", k.size(0), " but q has ",
              q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), backend, " ", op, ": ", kname, " has head dim ", k.size(3), " but q has ",
              q.size(3));
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, backend, " ", op, ": q's head count H=", q.size(1),
              " must be a multiple of ", kname, "'s Hkv=", k.size(1));
}

}  // namespace vqkernels
