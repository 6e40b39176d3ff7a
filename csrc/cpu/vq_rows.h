// What the CPU kernels of the quantizer ops share (vq_loss.cpp: vq_loss_fwd / vq_loss_bwd; code_stats.cpp:
// code_stats / code_usage): the typed strided-rows view, row tiles (a strided layout transposed through a small
// buffer), the index check in row order, the owner-computes split of the codes, and the output poisoning.
// See vq_loss.cpp's header comment for why the code ranges make every result independent of the thread count.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "common.h"

namespace vqkernels {
namespace vq_rows {

constexpr int64_t kGrainElems = 1 << 15;  // elements of work per parallel task, at least

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }
inline double to_f(double v) { return v; }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

inline void check_common(const at::Tensor& z, const at::Tensor& indices, const char* op) {
  check_vq_rows(z, indices, op, "cpu");
}

// Typed rows of a (N, D) or (B, T, D) tensor: a base pointer over the shared StridedRows view (common.h).
// (The element type is E: T is StridedRows' row count.)
template <typename E>
struct Rows : StridedRows {
  E* base;
  Rows(const at::Tensor& x, E* ptr) : StridedRows(StridedRows::of(x)), base(ptr) {}
  E* row(int64_t n) const { return base + offset(n); }
};

// Rows are processed in tiles of kTile. A strided layout (sd != 1, e.g. channel-first, where one
// row's elements lie H*W apart, 4 KiB for a 32x32 map: every element of a row in the same L1 set)
// is transposed tile by tile through a small buffer: for each d the kTile rows' elements are
// neighbours in memory. Contiguous rows are used in place.
constexpr int64_t kTile = 16;

template <typename T>
struct TileIn {
  std::vector<T> buf;
  const T* ptr[kTile];
  void read(const Rows<const T>& x, int64_t n0, int64_t nr, int64_t D) {
    if (x.sd == 1) {
      for (int64_t r = 0; r < nr; ++r) ptr[r] = x.row(n0 + r);
      return;
    }
    buf.resize(kTile * D);
    const T* src[kTile];
    for (int64_t r = 0; r < nr; ++r) src[r] = x.row(n0 + r);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < nr; ++r) buf[r * D + d] = src[r][d * x.sd];
    for (int64_t r = 0; r < nr; ++r) ptr[r] = buf.data() + r * D;
  }
};

template <typename T>
struct TileOut {
  std::vector<T> buf;
  T* ptr[kTile];
  T* dst[kTile];
  void open(const Rows<T>& y, int64_t n0, int64_t nr, int64_t D) {
    if (y.sd == 1) {
      for (int64_t r = 0; r < nr; ++r) ptr[r] = y.row(n0 + r);
      return;
    }
    buf.resize(kTile * D);
    for (int64_t r = 0; r < nr; ++r) {
      ptr[r] = buf.data() + r * D;
      dst[r] = y.row(n0 + r);
    }
  }
  void flush(const Rows<T>& y, int64_t nr, int64_t D) {
    if (y.sd == 1) return;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < nr; ++r) dst[r][d * y.sd] = ptr[r][d];
  }
};

[[noreturn]] inline void index_error(int64_t bad, int64_t K) {
  TORCH_CHECK_INDEX(false, "indices out of range: got index ", bad, ", codes are numbered 0..", K - 1,
                    " (K=", K, ")");
  std::abort();  // unreachable
}

// Counts rows per code and validates every index (IndexError on the first bad one, in row order).
inline std::vector<int64_t> count_rows(const int64_t* idx, int64_t N, int64_t K) {
  std::vector<int64_t> counts(K, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = idx[n];
    if (k < 0 || k >= K) index_error(k, K);
    ++counts[k];
  }
  return counts;
}

// Boundaries of `tasks` contiguous code ranges holding about equal numbers of rows (plus a little
// weight per code, for the per-code work). Results never depend on these boundaries: see the top.
inline std::vector<int64_t> code_ranges(const std::vector<int64_t>& counts, int64_t N, int64_t D) {
  const int64_t K = int64_t(counts.size());
  const double work = double(N) * double(std::max<int64_t>(D, 1));
  int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, int64_t(work / kGrainElems)));
  tasks = std::max<int64_t>(1, std::min<int64_t>(tasks, K));
  std::vector<int64_t> bounds(tasks + 1, K);
  bounds[0] = 0;
  const double total = double(N) + double(K);  // one unit per row and per code
  double acc = 0.0;
  int64_t t = 1;
  for (int64_t k = 0; k < K && t < tasks; ++k) {
    acc += double(counts[k]) + 1.0;
    if (acc >= total * double(t) / double(tasks)) bounds[t++] = k + 1;
  }
  for (; t < tasks; ++t) bounds[t] = K;
  return bounds;
}

inline void poison(at::Tensor& t) {
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}


}  // namespace vq_rows
}  // namespace vqkernels
