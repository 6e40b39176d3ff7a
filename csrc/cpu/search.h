// The fp32 nearest-code search of the CPU backend as a reusable piece: csrc/cpu/nearest_code.cpp
// implements it (and the nearest_code op on top), csrc/cpu/vq_fused.cpp runs it inside the fused
// vector_quantize forward. See nearest_code.cpp for the design.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "cpu/runtime.h"  // has_avx512*, parallel_blocks

namespace vqkernels {
namespace cpu {

// Rows per task. Fixed, so that no result depends on the thread count or on which thread ran what.
constexpr int64_t kSearchBlockRows = 64;

// Exact fp32 search: for each row the code with the lowest fp32 score (lowest index among equal
// scores; see csrc/common.h), and its distance. Needs has_avx512(). Construct once per call (packs
// the codebook, in parallel), then call search() from any number of threads, each with its own Scratch.
// centre (l2 only): the screens centre rows and codes on the codebook mean, and the exact scores are
// then those of the centred vectors (same distances in exact arithmetic, not always the same fp32
// bits). centre = false keeps the input vectors: the exact score is fma(-2, <x, c>, ||c||^2) of the
// vectors as given, so inputs whose scores are exact in fp32 (small integers) tie exactly as the
// reference's do (residual_vq wants that; the screens stay exact either way, only less tight far from
// the origin).
class Fp32Search {
 public:
  struct Scratch;
  Fp32Search(const at::Tensor& codebook, int64_t metric, bool centre = true);  // codebook (K, D) float32, contiguous
  ~Fp32Search();
  std::unique_ptr<Scratch, void (*)(Scratch*)> scratch() const;
  // nr <= kSearchBlockRows rows of D floats, row r at x + r * ldx. Writes idx[r] and dist[r].
  void search(const float* x, int64_t ldx, int64_t nr, int64_t* idx, float* dist, Scratch& s) const;
  bool screened() const;  // a screen (int8 or bf16) + exact rescoring (else the plain fp32 kernel)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  void search_i8(const float* x, int64_t ldx, int64_t nr, int64_t* idx, float* dist, Scratch& s) const;
};

// Counters of the screened path since the process started (benchmarks and tests read them through
// vqkernels._C.search_stats()): rows searched by a screen (of which int8_rows by the int8 one), codes
// rescored exactly, rows through the plain kernel.
struct SearchStats {
  int64_t screened_rows, rescored, plain_rows, int8_rows;
};
SearchStats search_stats();

}  // namespace cpu
}  // namespace vqkernels
