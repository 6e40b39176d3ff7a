// The schemas of every C++ op (TORCH_LIBRARY) and the _C module's own small pybind11 surface.
// Device implementations live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cpp (TORCH_LIBRARY_IMPL).
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include <string>

#include "cpu/search.h"

TORCH_LIBRARY(vqkernels_C, m) {
  // x (N, D), codebook (K, D), both contiguous and of one dtype (float32, float16, bfloat16).
  // Returns (indices int64 (N,), distance float32 (N,)); see csrc/common.h for the metric ids.
  m.def("nearest_code(Tensor x, Tensor codebook, int metric, bool allow_tf32) -> (Tensor, Tensor)");
  // vq_loss (csrc/cpu/vq_loss.cpp). z (N, D) or (B, T, D) with any strides and codebook (K, D) of one
  // dtype (float32, float16, bfloat16), indices int64 of z's leading shape, in [0, K) (else IndexError).
  // Sums run in float32 (float64 for float64). z_q and grad_z come back in z's layout (empty_like(z)).
  // Forward: (z_q = codebook[indices] in z's dtype, loss = scale * sum (z_q - z)^2, 0-d).
  m.def("vq_loss_fwd(Tensor z, Tensor codebook, Tensor indices, float scale) -> (Tensor, Tensor)");
  // Backward: grad_z = grad_zq + 2 w_commit grad_loss / (N D) * (z - z_q)            ((N, D) or (0,) if not needed)
  //           grad_codebook[k] = 2 w_codebook grad_loss / (N D) * sum_{idx[n]=k} (z_q[n] - z[n])   ((K, D) or (0,))
  m.def("vq_loss_bwd(Tensor grad_zq, Tensor grad_loss, Tensor z, Tensor codebook, Tensor indices, float w_commit, "
        "float w_codebook, bool need_grad_z, bool need_grad_codebook) -> (Tensor, Tensor)");
  // The fused forward of vector_quantize (csrc/cpu/vq_fused.cpp, CPU only): z (N, D) or (B, T, D) float32, any
  // strides; codebook (K, D) float32. (z_q = codebook[indices] in z's layout, loss = scale * sum (z_q - z)^2 0-d,
  // indices int64 of z's leading shape: nearest_code's with this metric id). The backward is vq_loss_bwd.
  m.def("vector_quantize_fwd(Tensor z, Tensor codebook, int metric, float scale) -> (Tensor, Tensor, Tensor)");
  // Per-code statistics of the assigned vectors: (counts float32 (K,), sums float32 (K, D)).
  m.def("code_stats(Tensor z, Tensor indices, int num_codes) -> (Tensor, Tensor)");
  // Histogram of indices and taming's perplexity: (counts int64 (K,), perplexity float32 0-d).
  m.def("code_usage(Tensor indices, int num_codes) -> (Tensor, Tensor)");

  // Attention (csrc/cpu/attention.cpp, csrc/cuda/attention.cpp). q (B, H, Tq, Dh); k, v (B, Hkv, Tk, Dh) with
  // H % Hkv == 0; any strides with a unit last-dim stride; one dtype (float32, float16, bfloat16). causal masks
  // bottom-right aligned (query i sees keys j <= i + Tk - Tq). Forward: (out (B, H, Tq, Dh) in q's dtype,
  // lse float32 (B, H, Tq): the row log-sum-exp of the scaled scores, natural log).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  // Backward: (dq like q, dk like k, dv like v; dk/dv summed over the H / Hkv query heads of each kv head).
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  // Cached decoding: q (B, H, Tq, Dh) the last Tq positions of each sequence; k_cache, v_cache (B, Hkv, Tmax, Dh);
  // cache_seqlens int32 (B,) valid length of each sequence (new tokens included, Tq <= len <= Tmax). Query t of
  // sequence b sits at position len_b - Tq + t and attends to cache positions [0, len_b - Tq + t].
  // Returns out (B, H, Tq, Dh) in q's dtype. Reads nothing at or past len_b.
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale) -> Tensor");

  // Inference linear for a few rows (csrc/cpu/linear.cpp, CPU only): x (M, K) float32 contiguous, w_packed
  // (ceil(N / 32), K, 32) the weight (N, K) packed by vqkernels.ops.linear.pack_weight, bias (N,) or None.
  // Returns y (M, N) = x @ W^T + bias.
  m.def("linear_packed(Tensor x, Tensor w_packed, Tensor? bias, int out_features) -> Tensor");
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
  m.def("cpu_features", [] {
    pybind11::dict d;
    d["avx512"] = vqkernels::cpu::has_avx512();
    d["avx512_bf16"] = vqkernels::cpu::has_avx512_bf16();
    d["avx512_vnni"] = vqkernels::cpu::has_avx512_vnni();
    d["amx_bf16"] = vqkernels::cpu::has_amx_bf16();
    d["mkl_bf16_gemm"] = vqkernels::cpu::mkl_bf16_gemm() != nullptr;
    return d;
  }, "The CPU features the C++ CPU kernels use here (after the VQKERNELS_CPU_NO_* overrides)");
  m.def("search_stats", [] {
    const auto s = vqkernels::cpu::search_stats();
    pybind11::dict d;
    d["screened_rows"] = s.screened_rows;
    d["rescored"] = s.rescored;
    d["plain_rows"] = s.plain_rows;
    d["int8_rows"] = s.int8_rows;
    return d;
  }, "Counters of the CPU fp32 search since the process started: rows through a screen (int8_rows of "
     "them through the int8 one, the rest bf16), codes rescored exactly there, rows through the plain fp32 kernel");
}

// residual_vq (csrc/cpu/residual_vq.cpp, csrc/cuda/residual_vq.cpp). x (N, D) float32, codebooks (Q, K, D) float32.
// Forward: (indices int64 (N, Q), quantized float32 (N, D) = the chosen codes summed, sq_err float32 (Q,),
// counts float32 (Q, K), sums float32 (Q, K, D) of each stage's residuals per code; (0,) unless need_stats).
// Backward: grad_x (N, D) = sum_q J_q^T grad_quantized + 2 grad_sq_err[q] (r_q - c_q), J_q the identity or
// (rotation) the rotation trick's; indices outside [0, K) raise IndexError.
TORCH_LIBRARY_FRAGMENT(vqkernels_C, m) {
  m.def("residual_vq_fwd(Tensor x, Tensor codebooks, bool need_stats) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_vq_bwd(Tensor grad_quantized, Tensor grad_sq_err, Tensor x, Tensor codebooks, Tensor indices, "
        "bool rotation) -> Tensor");
}

// lfq_entropy (csrc/cpu/lfq_entropy.cpp, csrc/cuda/lfq_entropy.cpp; math in vqkernels/ops/lfq_entropy). x (N, C, d)
// float32 (float64 on the CPU; float16/bfloat16 on CUDA), C codebooks of d bits (1 <= d <= 30); bit logits scale * x. Forward: (per_sample 0-d,
// codebook 0-d, pbar (C, 2^d): each codebook's batch-mean code distribution), the codebook entropy with VQP's
// clamp -sum pbar log max(pbar, eps). Backward: grad_x (N, C, d) from the two scalars' upstream gradients and pbar.
TORCH_LIBRARY_FRAGMENT(vqkernels_C, m) {
  m.def("lfq_entropy_fwd(Tensor x, float scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("lfq_entropy_bwd(Tensor grad_per_sample, Tensor grad_codebook, Tensor x, Tensor pbar, float scale, "
        "float eps) -> Tensor");
}
