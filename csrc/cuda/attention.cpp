// The CUDA launchers of the attention ops (attention_fwd, attention_bwd, attention_decode): argument
// checks (csrc/common.h, plus this backend's head-dim limits), output allocation, device guard and the
// current stream, and the TORCH_LIBRARY_IMPL registration. The kernels are in attention_kernels.cu
// (light includes); see its header comment for which kernel serves which dtype.
//
// Inputs are read in place with their strides (a view of a fused qkv projection, a transposed
// (B, T, H, Dh) tensor). A copy is made only where a kernel cannot read the layout: a last dim that is
// not unit-stride, or (forward and decoding, which move 16-byte units) a pointer or a B/H/T stride that
// is not 16-byte aligned. Outputs are contiguous (as the ops' fake implementations say).
//
// No host synchronisation anywhere: attention_decode reads cache_seqlens on the device, and its number
// of splits comes from shapes only, so every op can be captured in a CUDA graph.
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
#include "cuda/attention_params.h"

namespace {

namespace vc = vqkernels::cuda;

constexpr int64_t kMaxGridYZ = 65535;

// The head dims the kernels take: the tensor-core forward is instantiated for 32, 64, 128 and 256 with
// smaller dims padded up (masked), the other kernels take any Dh; 16-byte units need Dh % 8 == 0.
void check_head_dim(int64_t Dh, const char* op) {
  TORCH_CHECK(Dh >= 8 && Dh <= 256 && Dh % 8 == 0, "cuda ", op,
              ": head dim Dh must be a multiple of 8 in [8, 256], got ", Dh);
}

void check_grid(int64_t B, int64_t H, const char* op) {
  TORCH_CHECK(B <= kMaxGridYZ && H <= kMaxGridYZ, "cuda ", op, ": at most ", kMaxGridYZ,
              " sequences and heads (CUDA grid limits), got B=", B, " H=", H);
}

int dtype_id(at::ScalarType st) { return st == at::kFloat ? 0 : st == at::kHalf ? 1 : 2; }

// The stride of a size-1 dimension never moves a pointer; normalise it so it does not block a fast path.
int64_t stride_of(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// t itself when its layout is readable by the kernels (unit last-dim stride; with `aligned`, 16-byte
// aligned data and B/H/T strides), else a contiguous copy.
at::Tensor readable(const at::Tensor& t, bool aligned) {
  if (t.size(3) > 1 && t.stride(3) != 1) return t.contiguous();
  if (!aligned || t.numel() == 0) return t;
  const int64_t unit = 16 / static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && stride_of(t, d) % unit == 0;
  return ok ? t : t.contiguous();
}

vc::AttnIn in_of(const at::Tensor& t) { return {t.const_data_ptr(), stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)}; }
vc::AttnOut out_of(at::Tensor& t) { return {t.data_ptr(), stride_of(t, 0), stride_of(t, 1), stride_of(t, 2)}; }

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void poison(at::Tensor& t) {
  if (vqkernels::poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

// VQKERNELS_ATTN_BWD_SIMT=1: the backward runs its SIMT kernels even where the tensor-core ones apply
// (a switch to bisect a wrong gradient on a GPU; read once).
bool force_simt_backward() {
  static const bool on = [] {
    const char* v = std::getenv("VQKERNELS_ATTN_BWD_SIMT");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

void check_launch(cudaError_t err, const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(err == cudaSuccess, "cuda ", op, ": launch failed for q ", q.sizes(), " k ", k.sizes(), " ",
              q.scalar_type(), ": ", cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                      const at::Tensor& v_, bool causal, double scale) {
  vqkernels::check_attention_qkv(q_, k_, v_, "attention_fwd", "cuda");
  check_head_dim(q_.size(3), "attention_fwd");
  check_grid(q_.size(0), q_.size(1), "attention_fwd");
  c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = readable(q_, true), k = readable(k_, true), v = readable(v_, true);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);

  at::Tensor out = at::empty({B, H, Tq, Dh}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  poison(out);
  poison(lse);
  if (out.numel() == 0) return {out, lse};

  vc::AttnFwdArgs a{};
  a.q = in_of(q);
  a.k = in_of(k);
  a.v = in_of(v);
  a.o = out_of(out);
  a.lse = lse.data_ptr<float>();
  a.B = B, a.H = H, a.Hkv = Hkv, a.Tq = Tq, a.Tk = Tk, a.Dh = Dh;
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.dtype = dtype_id(q.scalar_type());
  check_launch(vc::launch_attention_fwd(a, stream_of(q)), "attention_fwd", q, k);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out_, const at::Tensor& q_,
                                                                  const at::Tensor& k_, const at::Tensor& v_,
                                                                  const at::Tensor& out_, const at::Tensor& lse_,
                                                                  bool causal, double scale) {
  vqkernels::check_attention_qkv(q_, k_, v_, "attention_bwd", "cuda");
  check_head_dim(q_.size(3), "attention_bwd");
  check_grid(q_.size(0), q_.size(1), "attention_bwd");
  TORCH_CHECK(grad_out_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(), "cuda attention_bwd: grad_out and out ",
              "must have q's shape ", q_.sizes(), ", got ", grad_out_.sizes(), " and ", out_.sizes());
  TORCH_CHECK(grad_out_.scalar_type() == q_.scalar_type() && out_.scalar_type() == q_.scalar_type(),
              "cuda attention_bwd: grad_out and out must have q's dtype ", q_.scalar_type(), ", got ",
              grad_out_.scalar_type(), " and ", out_.scalar_type());
  TORCH_CHECK(grad_out_.device() == q_.device() && out_.device() == q_.device() && lse_.device() == q_.device(),
              "cuda attention_bwd: grad_out, out and lse must be on q's device ", q_.device());
  TORCH_CHECK(lse_.scalar_type() == at::kFloat, "cuda attention_bwd: lse must be float32, got ", lse_.scalar_type());
  TORCH_CHECK(lse_.dim() == 3 && lse_.sizes() == q_.sizes().slice(0, 3), "cuda attention_bwd: lse must have shape ",
              "(B, H, Tq) = ", q_.sizes().slice(0, 3), ", got ", lse_.sizes());
  c10::cuda::CUDAGuard guard(q_.device());
  // The tensor-core kernels (16-bit) move 16-byte units of q, k, v and grad_out; the SIMT ones (float32)
  // and the delta pass (out) read elements.
  const bool units = q_.scalar_type() != at::kFloat;
  const at::Tensor q = readable(q_, units), k = readable(k_, units), v = readable(v_, units);
  const at::Tensor dout = readable(grad_out_, units), out = readable(out_, false);
  const at::Tensor lse = lse_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2);

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  poison(dq);
  poison(dk);
  poison(dv);
  if (B == 0 || H == 0 || Dh == 0) return {dq, dk, dv};
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));

  vc::AttnBwdArgs a{};
  a.dout = in_of(dout);
  a.q = in_of(q);
  a.k = in_of(k);
  a.v = in_of(v);
  a.o = in_of(out);
  a.lse = lse.const_data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = out_of(dq);
  a.dk = out_of(dk);
  a.dv = out_of(dv);
  a.B = B, a.H = H, a.Hkv = Hkv, a.Tq = Tq, a.Tk = Tk, a.Dh = Dh;
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.dtype = dtype_id(q.scalar_type());
  a.force_simt = force_simt_backward();
  check_launch(vc::launch_attention_bwd(a, stream_of(q)), "attention_bwd", q, k);
  return {dq, dk, dv};
}

int num_sms(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 132;
  }
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}

at::Tensor attention_decode_cuda(const at::Tensor& q_, const at::Tensor& k_cache_, const at::Tensor& v_cache_,
                                 const at::Tensor& cache_seqlens_, double scale) {
  vqkernels::check_attention_qkv(q_, k_cache_, v_cache_, "attention_decode", "cuda", "k_cache", "v_cache");
  check_head_dim(q_.size(3), "attention_decode");
  TORCH_CHECK(q_.size(0) <= kMaxGridYZ && k_cache_.size(1) <= kMaxGridYZ, "cuda attention_decode: at most ",
              kMaxGridYZ, " sequences and kv heads (CUDA grid limits), got B=", q_.size(0), " Hkv=", k_cache_.size(1));
  TORCH_CHECK(cache_seqlens_.device() == q_.device(), "cuda attention_decode: cache_seqlens must be on q's device (",
              q_.device(), "), got ", cache_seqlens_.device());
  TORCH_CHECK(cache_seqlens_.scalar_type() == at::kInt, "cuda attention_decode: cache_seqlens must be int32, got ",
              cache_seqlens_.scalar_type());
  TORCH_CHECK(cache_seqlens_.dim() == 1 && cache_seqlens_.size(0) == q_.size(0),
              "cuda attention_decode: cache_seqlens must have shape (B,) = (", q_.size(0), "), got ",
              cache_seqlens_.sizes());
  TORCH_CHECK(q_.size(2) <= k_cache_.size(2), "cuda attention_decode: q holds Tq=", q_.size(2),
              " queries but the caches hold at most Tmax=", k_cache_.size(2), " positions");
  c10::cuda::CUDAGuard guard(q_.device());
  // q is read element by element; the caches in 16-byte units.
  const at::Tensor q = readable(q_, false), k = readable(k_cache_, true), v = readable(v_cache_, true);
  const at::Tensor lens = cache_seqlens_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k.size(1), Tmax = k.size(2);

  at::Tensor out = at::empty({B, H, Tq, Dh}, q.options());
  poison(out);
  if (out.numel() == 0) return out;

  // Splits from shapes only (never from cache_seqlens' values): the op stays graph-capturable.
  int64_t split_len = 0;
  const int64_t splits = vc::attention_decode_splits(B, H, Hkv, Tq, Tmax, num_sms(q.get_device()), &split_len);
  at::Tensor ws_out, ws_lse;
  if (splits > 1) {
    ws_out = at::empty({splits, B, H, Tq, Dh}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({splits, B, H, Tq}, q.options().dtype(at::kFloat));
  }

  vc::AttnDecodeArgs a{};
  a.q = in_of(q);
  a.k = in_of(k);
  a.v = in_of(v);
  a.o = out_of(out);
  a.seqlens = lens.const_data_ptr<int32_t>();
  a.ws_out = splits > 1 ? ws_out.data_ptr<float>() : nullptr;
  a.ws_lse = splits > 1 ? ws_lse.data_ptr<float>() : nullptr;
  a.B = B, a.H = H, a.Hkv = Hkv, a.Tq = Tq, a.Tmax = Tmax, a.Dh = Dh;
  a.splits = splits;
  a.split_len = split_len;
  a.scale = static_cast<float>(scale);
  a.dtype = dtype_id(q.scalar_type());
  check_launch(vc::launch_attention_decode(a, stream_of(q)), "attention_decode", q, k);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqkernels_C, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("attention_decode", &attention_decode_cuda);
}
