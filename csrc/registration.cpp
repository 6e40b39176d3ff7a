// The schemas of every C++ op (TORCH_LIBRARY) and the _C module's own small pybind11 surface.
// Device implementations live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp (TORCH_LIBRARY_IMPL).
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include <string>

TORCH_LIBRARY(vqkernels_C, m) {
  // x (N, D), codebook (K, D), both contiguous and of one dtype (float32, float16, bfloat16).
  // Returns (indices int64 (N,), distance float32 (N,)); see csrc/common.h for the metric ids.
  m.def("nearest_code(Tensor x, Tensor codebook, int metric, bool allow_tf32) -> (Tensor, Tensor)");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu"] = true;
#ifdef VQKERNELS_WITH_CUDA
  d["cuda"] = true;
#ifdef VQKERNELS_CUDA_ARCHS
  d["cuda_archs"] = std::string(VQKERNELS_CUDA_ARCHS);
#endif
#else
  d["cuda"] = false;
#endif
#if defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vqkernels C++/CUDA kernels; the ops are registered under torch.ops.vqkernels_C";
  m.def("build_info", &build_info, "Which kernels this build of _C holds");
}
