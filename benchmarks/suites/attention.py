"""Providers and sizes for benchmarking attention: forward, backward, both, and cached decoding.

A size is (B, H, T, Dh): batch, heads (key/value heads too: no grouping here), sequence length, head dim. A
mode says what one call does:

    fwd, fwd-causal            out = attention(q, k, v) (full, or causal with the mask aligned bottom-right)
    bwd, bwd-causal            the backward alone: dq, dk, dv from a fixed dout, the forward's graph kept
    fwdbwd, fwdbwd-causal      forward + backward, as a training step runs them
    decode                     one new token per sequence (B sequences) over a KV cache of T tokens: the cache
                               write of the new token, then attention of the (B, H, 1, Dh) query over the cache

Metrics: TFLOP/s with the usual count (forward 4*B*H*T*T*Dh, halved when causal; backward 2.5x the forward,
forward + backward 3.5x, as flash-attention counts); decoding in tokens/s (B per call) and GB/s of cache read
(2 * B * H * T * Dh * element size per call: what bounds decoding).

Providers (kinds as everywhere: ours, reference, peer):
    torch, cpu, triton, cuda   vqkernels.attention / causal_attention / attention_with_kv_cache(backend=...)
    sdpa                       torch SDPA's CPU kernel (sdpa_kernel(FLASH_ATTENTION): on CPU tensors, its CPU
                               flash kernel)
    sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                               torch SDPA restricted to one backend (GPU; sdpa-math runs on CPU too)
    flash-attn                 flash_attn_func / flash_attn_with_kvcache, when the package is installed (GPU)
    mingpt                     minGPT's explicit-mask attention, what taming-transformers runs: q @ k^T * scale,
                               masked_fill of a (block, block) tril buffer, softmax, @ v (without the mask for
                               the full modes: taming's AttnBlock is the same softmax over bmm)
    sdpa-mask (decode)         what a user writes over a preallocated cache: SDPA with a boolean mask built from
                               the sequence lengths, over the whole cache
    mingpt-past (decode)       taming's sample_with_past: torch.cat of the past keys/values and the new token's,
                               then the explicit attention

Correctness: each provider's forward output (decode: the new token's output) against a float32 explicit
computation of the same attention, as the largest absolute difference (``max_abs_err``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..harness.common import device_reasons, importable_reasons, interpreter_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite

OP = "attention"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd-causal", "bwd", "bwd-causal", "fwdbwd", "fwdbwd-causal", "decode")
# The largest |out - reference| an answer may have and still count as correct (inputs N(0, 1): outputs O(1)).
TOLERANCE = {"fp32": 1e-3, "bf16": 4e-2, "fp16": 5e-3}


class Size(NamedTuple):
    B: int
    H: int
    T: int
    Dh: int


SIZES = {
    "cpu-gpt": NamedSize(Size(8, 8, 256, 64), "CPU: a GPT over 16x16 codes (n_embd 512, 8 heads)"),
    "cpu-long": NamedSize(Size(4, 16, 1024, 64), "CPU: longer sequences, 16 heads"),
    "decode-256": NamedSize(Size(8, 8, 256, 64), "decoding: batch 8 over a 256-token cache"),
    "decode-1024": NamedSize(Size(8, 8, 1024, 64), "decoding: batch 8 over a 1024-token cache"),
    "quick": NamedSize(Size(2, 2, 37, 16), "smoke, odd length"),
}
for _T in (256, 512, 1024, 2048, 4096, 8192):
    for _Dh in (64, 128):
        # flash-attention's benchmark convention: 16k tokens a batch, model width 2048
        SIZES[f"gpu-t{_T}-d{_Dh}"] = NamedSize(Size(16384 // _T, 2048 // _Dh, _T, _Dh), "GPU, bf16")

CPU_PROVIDERS = ("torch", "cpu", "sdpa", "mingpt")
# (the torch reference is left out on the GPU: slow and no target; --providers torch adds it)
CUDA_PROVIDERS = ("cuda", "triton", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flash-attn", "mingpt")
CPU_DECODE_PROVIDERS = ("torch", "cpu", "sdpa-mask", "mingpt-past")
CUDA_DECODE_PROVIDERS = ("cuda", "triton", "sdpa-mask", "flash-attn", "mingpt-past")
DECODE_ONLY = ("sdpa-mask", "mingpt-past")


def is_causal(mode: str) -> bool:
    return mode.endswith("-causal")


def attention_flops(case: Case) -> float | None:
    if case.mode == "decode":
        return None
    B, H, T, Dh = case.size
    f = 4.0 * B * H * T * T * Dh * (0.5 if is_causal(case.mode) else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[case.mode.split("-")[0]]


def cache_bytes(case: Case) -> float | None:
    if case.mode != "decode":
        return None
    B, H, T, Dh = case.size
    return 2.0 * B * H * T * Dh * torch.empty((), dtype=DTYPES[case.dtype]).element_size()


def default_cases(device: str, quick: bool = False, large: bool = False) -> list[Case]:
    S = {n: s.size for n, s in SIZES.items()}
    if quick:
        provs = CUDA_PROVIDERS if device == "cuda" else CPU_PROVIDERS
        dprovs = CUDA_DECODE_PROVIDERS if device == "cuda" else CPU_DECODE_PROVIDERS
        return ([Case(S["quick"], "fp32", provs, m) for m in ("fwd", "fwdbwd-causal")]
                + [Case(S["quick"], "fp32", dprovs, "decode")])
    if device == "cuda":
        cases = []
        for Dh in (64, 128):
            for T in (256, 512, 1024, 2048, 4096, 8192):
                for m in ("fwd-causal", "fwdbwd-causal", "fwd"):  # the targets' modes, and the VQGAN's
                    cases.append(Case(S[f"gpu-t{T}-d{Dh}"], "bf16", CUDA_PROVIDERS, m))
            for T in (512, 2048, 8192):
                cases.append(Case(Size(8, 2048 // Dh, T, Dh), "bf16", CUDA_DECODE_PROVIDERS, "decode"))
        return cases
    cases = [Case(S[n], d, CPU_PROVIDERS, m) for n in ("cpu-gpt", "cpu-long") for d in ("fp32", "bf16")
             for m in ("fwd-causal", "bwd-causal", "fwdbwd-causal", "fwd")]
    cases += [Case(S[n], d, CPU_DECODE_PROVIDERS, "decode") for n in ("decode-256", "decode-1024")
              for d in ("fp32", "bf16")]
    return cases


# ---------------------------------------------------------------------------------------------
# Inputs

class Inputs(NamedTuple):
    q: torch.Tensor  # (B, H, T, Dh); decode: (B, H, 1, Dh), the new token's query
    k: torch.Tensor  # (B, H, T, Dh); decode: the cache (B, H, T, Dh), its last slot to be written
    v: torch.Tensor
    dout: torch.Tensor | None  # (B, H, T, Dh) upstream gradient (backward modes)
    k_new: torch.Tensor | None  # decode: the new token's key and value (B, H, 1, Dh)
    v_new: torch.Tensor | None
    seqlens: torch.Tensor | None  # decode: int32 (B,), the lengths with the new token (= T)


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    B, H, T, Dh = case.size
    dt = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    if case.mode == "decode":
        return Inputs(randn(B, H, 1, Dh), randn(B, H, T, Dh), randn(B, H, T, Dh), None, randn(B, H, 1, Dh),
                      randn(B, H, 1, Dh), torch.full((B,), T, dtype=torch.int32, device=device))
    grad = case.mode.startswith(("bwd", "fwdbwd"))
    q, k, v = (randn(B, H, T, Dh).requires_grad_(grad) for _ in range(3))
    return Inputs(q, k, v, randn(B, H, T, Dh) if grad else None, None, None, None)


# ---------------------------------------------------------------------------------------------
# The calls: every provider is an attention function f(q, k, v, causal) -> out, or a decode step

def _wrap(case: Case, inp: Inputs, f):
    """The timed call of mode ``case.mode`` over the attention function ``f``; ``.forward()`` gives the output."""
    causal = is_causal(case.mode)
    q, k, v, dout = inp.q, inp.k, inp.v, inp.dout
    kind = case.mode.split("-")[0]
    if kind == "fwd":
        def call():
            with torch.no_grad():
                return f(q, k, v, causal)
    elif kind == "bwd":
        out = f(q, k, v, causal)  # the graph is kept: each call runs the backward alone

        def call():
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(f(q, k, v, causal), (q, k, v), dout)

    def forward():
        with torch.no_grad():
            return f(q, k, v, causal)

    call.forward = forward
    return call


def _decode_wrap(inp: Inputs, step):
    """``step(q, k_cache, v_cache, k_new, v_new, seqlens) -> out (B, H, 1, Dh)``: one decoding step."""
    def call():
        with torch.no_grad():
            return step(inp.q, inp.k, inp.v, inp.k_new, inp.v_new, inp.seqlens)

    call.forward = call
    return call


def _write_last(k_cache, v_cache, k_new, v_new):
    # The KV cache's job before the attention call (every sequence here is T long: the new token is the last).
    k_cache[:, :, -1:] = k_new
    v_cache[:, :, -1:] = v_new


# --- ours ------------------------------------------------------------------------------------

def _ours_build(backend: str):
    def build(inp: Inputs, case: Case):
        from vqkernels.ops.attention import attention, attention_with_kv_cache

        if case.mode == "decode":
            def step(q, kc, vc, kn, vn, seqlens):
                _write_last(kc, vc, kn, vn)
                return attention_with_kv_cache(q, kc, vc, seqlens, backend=backend)

            return _decode_wrap(inp, step)
        return _wrap(case, inp, lambda q, k, v, causal: attention(q, k, v, causal=causal, backend=backend))

    return build


def _ours_reasons(backend: str):
    def reasons(case: Case, device: str):
        r = device_reasons(device) or _mode_reasons(case, decode_only=False)
        if r:
            return r
        r = interpreter_reasons(backend, device)
        if r:
            return r
        try:
            from vqkernels.ops import attention as ops
        except ImportError as e:
            return [f"vqkernels.ops.attention is not importable ({type(e).__name__}: {e})"]
        fn = ops.attention_with_kv_cache if case.mode == "decode" else ops.attention
        # Ask the op itself, on tiny inputs of the case's dtype, device and head dim: the public wrapper selects
        # the backend before it computes, and says why it cannot.
        from vqkernels._backend import BackendNotSupported

        B, H, T, Dh = case.size
        x = torch.zeros(1, 1, 2, Dh, dtype=DTYPES[case.dtype], device=device)
        try:
            if case.mode == "decode":
                fn(x[:, :, :1], x, x, torch.full((1,), 2, dtype=torch.int32, device=device), backend=backend)
            else:
                fn(x, x, x, causal=is_causal(case.mode), backend=backend)
        except BackendNotSupported as e:
            return [str(e)]
        except Exception:  # noqa: BLE001,S110 -- not a reason to skip: the measurement shows the error
            pass
        return []

    return reasons


# --- torch SDPA ------------------------------------------------------------------------------

SDPA_BACKENDS = {"sdpa": "FLASH_ATTENTION", "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _sdpa_build(name: str):
    def build(inp: Inputs, case: Case):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name])

        def f(q, k, v, causal):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return _wrap(case, inp, f)

    return build


def _sdpa_reasons(name: str):
    def reasons(case: Case, device: str):
        r = device_reasons(device) or _mode_reasons(case, decode_only=False)
        if r:
            return r
        if name == "sdpa" and device != "cpu":
            return ["'sdpa' is SDPA's CPU kernel; on a GPU, see sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math"]
        if name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn") and device != "cuda":
            return [f"{name} is one of SDPA's GPU backends (on CPU: 'sdpa', its CPU kernel)"]
        return []

    return reasons


# --- flash-attn ------------------------------------------------------------------------------

def _flash_reasons(case: Case, device: str):
    r = importable_reasons("flash_attn")
    if r:
        return r
    if device != "cuda":
        return ["flash-attn runs on CUDA only"]
    if case.dtype not in ("bf16", "fp16"):
        return [f"flash-attn takes bf16/fp16, not {case.dtype}"]
    return device_reasons(device)


def _flash_build(inp: Inputs, case: Case):
    from flash_attn import flash_attn_func, flash_attn_with_kvcache

    if case.mode == "decode":
        # flash-attn's layout is (B, T, H, Dh): the cache is made once in it, as a flash-attn user keeps it.
        kc, vc = inp.k.transpose(1, 2).contiguous(), inp.v.transpose(1, 2).contiguous()
        q, kn, vn = (t.transpose(1, 2).contiguous() for t in (inp.q, inp.k_new, inp.v_new))
        lens = inp.seqlens - 1  # flash-attn appends k/v at cache_seqlens and attends over the result

        def call():
            return flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True).transpose(1, 2)

        call.forward = call
        return call

    def f(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    return _wrap(case, inp, f)


# --- minGPT's explicit-mask attention (taming-transformers) ----------------------------------

def _mingpt_build(inp: Inputs, case: Case):
    # taming.modules.transformer.mingpt.CausalSelfAttention.forward, the attention part: a persistent (block,
    # block) lower-triangular buffer, sliced to T and compared with 0 on every call.
    T = inp.q.shape[2]
    mask = torch.tril(torch.ones(T, T, device=inp.q.device)).view(1, 1, T, T)

    def f(q, k, v, causal):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if causal:
            att = att.masked_fill(mask[:, :, :T, :T] == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        return att @ v

    return _wrap(case, inp, f)


def _mingpt_past_build(inp: Inputs, case: Case):
    # taming's mingpt sample_with_past: the layer's `present` is stacked, the past concatenated to the new key and
    # value (a copy of the whole cache every step), then the explicit attention (one query: no mask needed).
    past_k, past_v = inp.k[:, :, :-1].clone(), inp.v[:, :, :-1].clone()

    def step(q, kc, vc, kn, vn, seqlens):
        k = torch.cat((past_k, kn), dim=-2)
        v = torch.cat((past_v, vn), dim=-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = torch.softmax(att, dim=-1)
        return att @ v

    return _decode_wrap(inp, step)


def _sdpa_mask_build(inp: Inputs, case: Case):
    # What a user writes over a preallocated cache (gpt-fast's way): write the new token, build a boolean mask of
    # the valid positions from the lengths, SDPA over the whole cache.
    import torch.nn.functional as F

    Tmax = inp.k.shape[2]
    pos = torch.arange(Tmax, device=inp.k.device)

    def step(q, kc, vc, kn, vn, seqlens):
        _write_last(kc, vc, kn, vn)
        mask = (pos[None, :] < seqlens[:, None])[:, None, None, :]  # (B, 1, 1, Tmax)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)

    return _decode_wrap(inp, step)


def _mode_reasons(case: Case, decode_only: bool) -> list[str]:
    if decode_only and case.mode != "decode":
        return ["a decoding provider (mode decode only)"]
    return []


def _any_reasons(decode_only: bool, decode_ok: bool = True):
    def reasons(case: Case, device: str):
        if not decode_ok and case.mode == "decode":
            return ["no decoding path (see sdpa-mask, mingpt-past)"]
        return device_reasons(device) or _mode_reasons(case, decode_only)

    return reasons


def _sdpa_all_reasons(name):
    base = _sdpa_reasons(name)

    def reasons(case: Case, device: str):
        if case.mode == "decode":
            return ["no decoding path of its own (see sdpa-mask)"]
        return base(case, device)

    return reasons


PROVIDERS: dict[str, Provider] = {
    "torch": Provider("torch", "reference", "vqkernels attention, backend='torch' (chunked PyTorch reference)",
                      _ours_build("torch"), _ours_reasons("torch")),
    "cpu": Provider("cpu", "ours", "vqkernels attention, backend='cpu'", _ours_build("cpu"), _ours_reasons("cpu")),
    "triton": Provider("triton", "ours", "vqkernels attention, backend='triton'", _ours_build("triton"),
                       _ours_reasons("triton")),
    "cuda": Provider("cuda", "ours", "vqkernels attention, backend='cuda'", _ours_build("cuda"),
                     _ours_reasons("cuda")),
    **{n: Provider(n, "peer", f"torch SDPA, sdpa_kernel({b})" + (" on CPU tensors: its CPU kernel" if n == "sdpa"
                                                                  else ""),
                   _sdpa_build(n), _sdpa_all_reasons(n), extra={"nn_matrices": 3.0 if n == "sdpa-math" else 0.0})
       for n, b in SDPA_BACKENDS.items()},
    "flash-attn": Provider("flash-attn", "peer", "flash_attn_func / flash_attn_with_kvcache (GPU, when installed)",
                           _flash_build, _flash_reasons),
    "mingpt": Provider("mingpt", "peer", "minGPT's explicit-mask attention (taming): matmul, masked_fill, softmax, "
                       "matmul", _mingpt_build, _any_reasons(False, decode_ok=False), extra={"nn_matrices": 4.0}),
    "sdpa-mask": Provider("sdpa-mask", "peer", "decoding as a user writes it: SDPA over the preallocated cache with "
                          "a boolean length mask", _sdpa_mask_build, _any_reasons(True)),
    "mingpt-past": Provider("mingpt-past", "peer", "taming's sample_with_past step: torch.cat the cache, explicit "
                            "attention", _mingpt_past_build, _any_reasons(True)),
}


# ---------------------------------------------------------------------------------------------
# Correctness: a float32 explicit computation

def reference_output(inp: Inputs, case: Case) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) [+ causal mask]) v in float32, one batch element at a time."""
    if case.mode == "decode":
        k, v = inp.k.detach().float().clone(), inp.v.detach().float().clone()
        k[:, :, -1:] = inp.k_new.float()
        v[:, :, -1:] = inp.v_new.float()
        q, causal = inp.q.detach().float(), False
    else:
        q, k, v = (t.detach().float() for t in (inp.q, inp.k, inp.v))
        causal = is_causal(case.mode)
    out = torch.empty_like(q)
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq) if causal else None
    for b in range(q.shape[0]):
        s = q[b] @ k[b].transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        out[b] = torch.softmax(s, dim=-1) @ v[b]
    return out


class AttentionSuite(Suite):
    op = OP
    title = "attention (TFLOP/s: causal FLOPs halved; decode: tokens/s and GB/s of cache read)"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    modes = MODES
    metrics = (Metric("tflops", "TFLOP/s", attention_flops, 1e12),
               Metric("tokens_per_s", "tokens/s", lambda c: float(c.size.B) if c.mode == "decode" else None),
               Metric("gb_per_s", "GB/s", cache_bytes, 1e9))
    providers = PROVIDERS
    cpu_providers = CPU_PROVIDERS
    cuda_providers = CUDA_PROVIDERS
    check_columns = ("max_abs_err",)
    plot_metric = None

    def label(self, size):
        return f"B{size.B} H{size.H} T{size.T} Dh{size.Dh}"

    def default_cases(self, device, quick=False, large=False):
        return default_cases(device, quick, large)

    def cases_for(self, sizes, dtypes, device):
        """``--sizes``: the CPU suite's modes (or the GPU's) on each size, decoding included."""
        cuda = device == "cuda"
        modes = ("fwd-causal", "fwdbwd-causal", "fwd") if cuda else (
            "fwd-causal", "bwd-causal", "fwdbwd-causal", "fwd")
        provs = CUDA_PROVIDERS if cuda else CPU_PROVIDERS
        dprovs = CUDA_DECODE_PROVIDERS if cuda else CPU_DECODE_PROVIDERS
        return ([Case(s, d, provs, m) for s in sizes for d in dtypes for m in modes]
                + [Case(s, d, dprovs, "decode") for s in sizes for d in dtypes])

    def warmup_case(self, case):
        return self.with_size(case, B=1, H=1, T=min(case.size.T, 64))

    def make_inputs(self, case, device, seed=0):
        return make_inputs(case, device, seed)

    def estimate_bytes(self, provider, case):
        B, H, T, Dh = case.size
        n = provider.extra.get("nn_matrices", 0.0)
        if case.mode.startswith(("bwd", "fwdbwd")):
            n *= 1.5
        return int(n * B * H * T * (1 if case.mode == "decode" else T) * 4)

    def reference(self, inputs, case):
        return reference_output(inputs, case)

    def answer(self, provider, inputs, case, fn, out):
        return fn.forward(), {}

    def compare(self, inputs, case, answer, ref):
        return {"max_abs_err": float((answer.float() - ref.to(answer.device)).abs().max())}

    def is_correct(self, row):
        err = row.get("max_abs_err")
        return err is None or err <= TOLERANCE.get(row["dtype"], 1e-2)


SUITE = AttentionSuite()
