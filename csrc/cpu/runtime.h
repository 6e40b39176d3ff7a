// What the C++ CPU kernels share: CPU feature probes, the VQKERNELS_CPU_* switches, and the parallel loop.
// (csrc/cpu/runtime.cpp implements the probes; parallel_blocks is a template, here.)
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <thread>
#include <vector>

namespace vqkernels {
namespace cpu {

// An environment switch: set and not "0". Read at each call (getenv is cheap), so tests may toggle it.
bool env_flag(const char* name);

// What the hardware has (probed once): AVX-512 F/BW/VL/DQ + FMA; and on top of it avx512_vnni, avx512_bf16.
bool hw_avx512();
bool hw_avx512_vnni();
bool hw_avx512_bf16();

// What the kernels use: the hardware's features less the ones switched off by VQKERNELS_CPU_NO_AVX512,
// VQKERNELS_CPU_NO_VNNI, VQKERNELS_CPU_NO_BF16DP (read at each call: one place for each switch).
bool has_avx512();
bool has_avx512_vnni();
bool has_avx512_bf16();

// AMX-BF16 tiles (Sapphire Rapids and later), less VQKERNELS_CPU_NO_AMX; the kernels never issue AMX
// instructions themselves: MKL's bfloat16 GEMM does, and this says whether it will be fast.
bool hw_amx_bf16();
bool has_amx_bf16();

// MKL's cblas_gemm_bf16bf16f32 (row/column-major CBLAS enums, LP64 ints), or nullptr when the process has no MKL.
// C (m x n, float32) = alpha op(A) op(B) + beta C, A and B bfloat16 (as uint16_t).
using bf16_gemm_fn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                              const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
bf16_gemm_fn mkl_bf16_gemm();

// Runs worker(next) on up to torch.get_num_threads() threads; next() hands out the block indices
// 0..nblocks-1 once each (dynamic scheduling: the cores are shared, a static split would wait for
// the slowest thread), then -1. Block boundaries are fixed by the caller, so results do not depend
// on the thread count or on which thread ran which block. `work` (multiply-adds) below ~4e6 keeps it on
// the calling thread (~1 ms of work or less: threads cost more than they bring).
// Built with -fopenmp this runs on torch's OpenMP pool through at::parallel_for. Without it,
// at::parallel_for (a header template around `#pragma omp parallel`) would silently run serially,
// so the extra threads are std::threads (cost ~20 us each; small problems stay on one thread).
template <typename F>
void parallel_blocks(int64_t nblocks, double work, const F& worker) {
  std::atomic<int64_t> counter{0};
  const std::function<int64_t()> next = [&counter, nblocks]() -> int64_t {
    const int64_t b = counter.fetch_add(1, std::memory_order_relaxed);
    return b < nblocks ? b : -1;
  };
  int64_t nt = at::in_parallel_region() ? 1 : (int64_t)at::get_num_threads();
  nt = std::min<int64_t>(nt, nblocks);
  if (work < 4.0e6) nt = 1;
  if (nt <= 1) {
    worker(next);
    return;
  }
#ifdef _OPENMP
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { worker(next); });
#else
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors((size_t)nt);
  threads.reserve((size_t)(nt - 1));
  for (int64_t t = 1; t < nt; ++t) {
    threads.emplace_back([&, t]() {
      try {
        worker(next);
      } catch (...) {
        errors[(size_t)t] = std::current_exception();
      }
    });
  }
  try {
    worker(next);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : threads) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
#endif
}

}  // namespace cpu
}  // namespace vqkernels
