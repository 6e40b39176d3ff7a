// The interface between the attention launchers (attention.cpp, torch headers) and the kernels
// (attention_kernels.cu, light includes): plain structs of pointers, sizes and element strides.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace vqkernels {
namespace cuda {

// A (B, H, T, Dh) tensor: its data and its element strides over B, H and T (the last dim is unit-stride).
struct AttnIn {
  const void* ptr;
  int64_t sb, sh, st;
};
struct AttnOut {
  void* ptr;
  int64_t sb, sh, st;
};

// dtype ids: 0 float32, 1 float16, 2 bfloat16.
struct AttnFwdArgs {
  AttnIn q, k, v;  // q (B, H, Tq, Dh), k and v (B, Hkv, Tk, Dh)
  AttnOut o;       // (B, H, Tq, Dh), q's dtype, 16-byte aligned rows
  float* lse;      // (B, H, Tq) contiguous, natural log
  int64_t B, H, Hkv, Tq, Tk, Dh;
  float scale;
  bool causal;
  int dtype;
};

struct AttnBwdArgs {
  AttnIn dout, q, k, v, o;
  const float* lse;  // (B, H, Tq) contiguous
  float* delta;      // workspace (B, H, Tq) contiguous: rowsum(dout * o)
  AttnOut dq, dk, dv;
  int64_t B, H, Hkv, Tq, Tk, Dh;
  float scale;
  bool causal;
  int dtype;
  bool force_simt;  // the SIMT kernels even where the tensor-core ones apply (16-bit, Dh <= 128)
};

struct AttnDecodeArgs {
  AttnIn q, k, v;          // q (B, H, Tq, Dh); k, v caches (B, Hkv, Tmax, Dh)
  AttnOut o;               // (B, H, Tq, Dh), q's dtype
  const int32_t* seqlens;  // (B,) on the device
  float* ws_out;           // (splits, B, H, Tq, Dh) fp32 partial outputs (unused when splits == 1)
  float* ws_lse;           // (splits, B, H, Tq) fp32 partial log-sum-exps (unused when splits == 1)
  int64_t B, H, Hkv, Tq, Tmax, Dh;
  int64_t splits, split_len;  // split s covers cache positions [s * split_len, (s + 1) * split_len)
  float scale;
  int dtype;
};

// Defined in attention_kernels.cu. Each launches on `stream` and returns the first CUDA error.
cudaError_t launch_attention_fwd(const AttnFwdArgs& a, cudaStream_t stream);
cudaError_t launch_attention_bwd(const AttnBwdArgs& a, cudaStream_t stream);
// The split of the cache for attention_decode, from shapes only (never from cache_seqlens' values):
// returns the number of splits and sets *split_len (a multiple of the kernel's key tile).
int64_t attention_decode_splits(int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tmax, int num_sms,
                                int64_t* split_len);
cudaError_t launch_attention_decode(const AttnDecodeArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace vqkernels
