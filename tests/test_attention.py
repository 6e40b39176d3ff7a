"""attention / causal_attention / attention_with_kv_cache against a float64 reference, on every backend here.

The accuracy rule is flash-attention's: a kernel's error against the float64 reference may be at most twice the
error of PyTorch's own computation in the same low precision (explicit softmax(q k^T) v in the input dtype),
plus a small atol. The reference itself (the ``torch`` backend) is checked against an independent explicit
implementation in float64, so the oracle is not only checked against itself.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import vqkernels  # noqa: F401
from vqkernels import _backend
from vqkernels.ops.attention import (
    OP,
    OP_DECODE,
    attention,
    attention_with_kv_cache,
    attention_with_lse,
    causal_attention,
)
from vqkernels.ops.attention.reference import (
    attention_bwd_reference,
    attention_decode_reference,
    attention_fwd_reference,
)

from helpers import BACKENDS, device_for, with_threads

ATOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def require(op, backend, **args):
    reasons = _backend.not_supported_reasons(op, backend, **args)
    if reasons:
        pytest.skip(f"{backend} cannot run {op} here: " + "; ".join(reasons))


def interpreted_triton(backend, device):
    return backend == "triton" and device == "cpu"


def make(shape, dtype, device, layout="contiguous", seed=0):
    """A random (B, H, T, Dh) tensor in one of three layouts: contiguous; 'bthd' ((B, T, H, Dh) transposed, as a
    fused projection gives: read in place); 'strided' (last-dim stride 2: must be copied before a kernel)."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, D = shape
    if layout == "bthd":
        t = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    elif layout == "strided":
        t = torch.randn(B, H, T, 2 * D, generator=g)[..., ::2]
    else:
        t = torch.randn(B, H, T, D, generator=g)
    return t.to(device=device, dtype=dtype)


def explicit_attention(q, k, v, causal, scale):
    """softmax(scale q k^T + mask) v in q's dtype, grouped heads expanded: PyTorch's own computation, and (in
    float64) an oracle for the reference independent of its chunking and lse arithmetic."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        mask = torch.arange(Tk, device=q.device)[None, :] > torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees no key: 0
    return torch.matmul(p, v)


def explicit_lse(q, k, causal, scale):
    """PyTorch's own row log-sum-exp: scores in q's dtype, logsumexp in float32."""
    G = q.shape[1] // k.shape[1]
    s = (torch.matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) * scale).float()
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        mask = torch.arange(Tk, device=q.device)[None, :] > torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        s = s.masked_fill(mask, float("-inf"))
    return torch.logsumexp(s, dim=-1)


def grads(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    return out.detach(), dq, dk, dv


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# (B, H, Hkv, Tq, Tk, Dh, layout); the Triton interpreter takes only the first ones (it is slow).
CASES = [
    (1, 2, 2, 1, 1, 8, "contiguous"),
    (2, 4, 2, 7, 7, 32, "bthd"),
    (1, 4, 1, 7, 19, 16, "contiguous"),   # Tq < Tk, multi-query
    (1, 2, 1, 19, 7, 32, "strided"),      # Tq > Tk: causal rows that see no key
    (1, 2, 2, 129, 129, 64, "contiguous"),
    (1, 4, 2, 33, 129, 72, "bthd"),
    (1, 2, 2, 65, 65, 128, "contiguous"),
]
INTERPRETER_CASES = 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_matches_fp64(backend, dtype, causal, case):
    B, H, Hkv, Tq, Tk, Dh, layout = CASES[case]
    device = device_for(backend)
    if interpreted_triton(backend, device) and case >= INTERPRETER_CASES:
        pytest.skip("the Triton interpreter is slow: only the small cases run on CPU tensors")
    q = make((B, H, Tq, Dh), dtype, device, layout, seed=1)
    k = make((B, Hkv, Tk, Dh), dtype, device, layout, seed=2)
    v = make((B, Hkv, Tk, Dh), dtype, device, layout, seed=3)
    g = make((B, H, Tq, Dh), dtype, device, seed=4)
    scale = Dh ** -0.5
    require(OP, backend, q=q, k=k, v=v, causal=causal, scale=scale)

    ref = grads(lambda a, b, c: attention_fwd_reference(a, b, c, causal, scale)[0], *(t.double() for t in (q, k, v)),
                g.double())
    _, lse_ref = attention_fwd_reference(q.double(), k.double(), v.double(), causal, scale)
    ours = grads(lambda a, b, c: attention(a, b, c, causal=causal, backend=backend), q, k, v, g)
    pt = grads(lambda a, b, c: explicit_attention(a, b, c, causal, scale), q, k, v, g)
    atol = ATOL[dtype]
    for name, o, r, p in zip(("out", "dq", "dk", "dv"), ours, ref, pt):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name} holds non-finite values (an unwritten output?)"
        e, e_pt = err(o, r), err(p, r)
        assert e <= 2 * e_pt + atol, f"{name}: error {e:.3g} vs PyTorch's {e_pt:.3g} in {dtype}"

    _, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Tq)
    dead = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse) & (lse < 0), dead), "lse must be -inf exactly for rows that see no key"
    e, e_pt = err(lse[~dead], lse_ref[~dead]), err(explicit_lse(q, k, causal, scale)[~dead], lse_ref[~dead])
    assert e <= 2 * e_pt + 1e-5 * (1 + lse_ref[~dead].abs().max().item()), f"lse: error {e:.3g} vs PyTorch's {e_pt:.3g}"
    if dead.any():  # rows that see no key: zero output and zero gradient
        assert (ours[0][dead] == 0).all() and (ours[1][dead] == 0).all()


def test_reference_matches_explicit_fp64_and_chunks():
    # The oracle against an independent formula, with chunks small enough to split rows and grouped heads.
    for (B, H, Hkv, Tq, Tk, Dh) in [(2, 4, 2, 9, 9, 8), (1, 4, 1, 5, 11, 16), (1, 2, 2, 11, 4, 8)]:
        for causal in (False, True):
            q, k, v, g = (torch.randn(s, dtype=torch.float64) for s in
                          ((B, H, Tq, Dh), (B, Hkv, Tk, Dh), (B, Hkv, Tk, Dh), (B, H, Tq, Dh)))
            ex = grads(lambda a, b, c: explicit_attention(a, b, c, causal, 0.3), q, k, v, g)
            for tile in (1, 7, 1 << 22):
                o, lse = attention_fwd_reference(q, k, v, causal, 0.3, max_tile_elems=tile)
                d = attention_bwd_reference(g, q, k, v, o, lse, causal, 0.3, max_tile_elems=tile)
                for a, b in zip((o,) + d, ex):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence(backend):
    # T = 1000 (not a multiple of any block), causal, fp32.
    device = device_for(backend)
    if interpreted_triton(backend, device):
        pytest.skip("the Triton interpreter is slow: T = 1000 runs on a GPU only")
    q, k, v, g = (make((1, 2, 1000, 32), torch.float32, device, seed=s) for s in range(4))
    require(OP, backend, q=q, k=k, v=v, causal=True, scale=32 ** -0.5)
    ours = grads(lambda a, b, c: causal_attention(a, b, c, backend=backend), q, k, v, g)
    ref = grads(lambda a, b, c: causal_attention(a, b, c, backend="torch"), *(t.double() for t in (q, k, v)),
                g.double())
    for o, r in zip(ours, ref):
        assert err(o, r) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_head_dim_512_and_float64(backend):
    # The VQGAN's attention has one head of Dh = 512; torch and cpu take any Dh and float64.
    for dtype in (torch.float32, torch.float64):
        q, k, v, g = (make((2, 1, 17, 512), dtype, "cpu", seed=s) for s in range(4))
        ours = grads(lambda a, b, c: attention(a, b, c, backend=backend), q, k, v, g)
        ex = grads(lambda a, b, c: explicit_attention(a, b, c, False, 512 ** -0.5), *(t.double() for t in (q, k, v)),
                   g.double())
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for o, r in zip(ours, ex):
            assert o.dtype == dtype
            assert err(o, r) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale_and_empty_queries(backend):
    device = device_for(backend)
    q = make((1, 2, 5, 16), torch.float32, device, seed=0)
    k = make((1, 2, 6, 16), torch.float32, device, seed=1)
    require(OP, backend, q=q, k=k, v=k, causal=True, scale=0.7)
    out = attention(q, k, k, causal=True, scale=0.7, backend=backend)
    assert err(out, explicit_attention(q.double(), k.double(), k.double(), True, 0.7)) < 1e-5
    empty = attention(q[:, :, :0], k, k, causal=True, backend=backend)
    assert empty.shape == (1, 2, 0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_expanded_grad(backend):
    # out.sum().backward() hands the op a grad_out with all strides 0: the kernels must not read it as dense.
    device = device_for(backend)
    q = make((1, 4, 9, 16), torch.float32, device, seed=0).requires_grad_(True)
    k = make((1, 2, 5, 16), torch.float32, device, seed=1).requires_grad_(True)
    require(OP, backend, q=q, k=k, v=k, causal=True, scale=0.25)
    attention(q, k, k, causal=True, backend=backend).sum().backward()
    got = (q.grad.clone(), k.grad.clone())
    q.grad = k.grad = None
    attention(q, k, k, causal=True, backend="torch").backward(torch.ones(1, 4, 9, 16, device=device))
    assert err(got[0], q.grad) <= 1e-5 and err(got[1], k.grad) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Cached decoding.

def decode_ref(q, kc, vc, lens, scale):
    return attention_decode_reference(q.double(), kc.double(), vc.double(), lens, scale)


def decode_tol(dtype, q, kc, vc, lens, scale):
    """2x PyTorch's own low-precision error on the same problem (explicit attention on each sequence's prefix)."""
    ref = decode_ref(q, kc, vc, lens, scale)
    e = 0.0
    for b, n in enumerate(lens.tolist()):
        pt = explicit_attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], True, scale)
        e = max(e, err(pt, ref[b:b + 1]))
    return ref, 2 * e + ATOL[dtype]


def dtype_cases(backend, device):
    for dtype in DTYPES:
        if interpreted_triton(backend, device) and dtype == torch.bfloat16:
            continue
        yield dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_decode_token_by_token_equals_full_causal(backend, dtype):
    device = device_for(backend)
    B, H, Hkv, T, Tmax, Dh = 2, 4, 2, 13, 16, 32
    q = make((B, H, T, Dh), dtype, device, seed=0)
    k = make((B, Hkv, T, Dh), dtype, device, seed=1)
    v = make((B, Hkv, T, Dh), dtype, device, seed=2)
    scale = Dh ** -0.5
    lens = torch.full((B,), 5, dtype=torch.int32, device=device)
    kc = torch.full((B, Hkv, Tmax, Dh), float("nan"), dtype=dtype, device=device)
    vc = kc.clone()
    require(OP_DECODE, backend, q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, scale=scale)
    full = attention_fwd_reference(q.double(), k.double(), v.double(), True, scale)[0]
    pt = explicit_attention(q, k, v, True, scale)
    tol = 2 * err(pt, full) + ATOL[dtype]
    # Prefill a prompt of 5 tokens in one call, then one token per call.
    kc[:, :, :5], vc[:, :, :5] = k[:, :, :5], v[:, :, :5]
    outs = [attention_with_kv_cache(q[:, :, :5], kc, vc, lens, backend=backend)]
    for t in range(5, T):
        kc[:, :, t], vc[:, :, t] = k[:, :, t], v[:, :, t]
        lens = torch.full((B,), t + 1, dtype=torch.int32, device=device)
        outs.append(attention_with_kv_cache(q[:, :, t:t + 1], kc, vc, lens, backend=backend))
    got = torch.cat(outs, dim=2)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert err(got, full) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_ragged_batch_never_reads_past_length(backend, Tq):
    device = device_for(backend)
    B, H, Hkv, Tmax = 4, 4, 1, 40
    for dtype in dtype_cases(backend, device):
        for Dh in (24, 64):  # (the CPU kernel: 24 runs its generic loops, 64 its register-tiled path)
            q = make((B, H, Tq, Dh), dtype, device, seed=0)
            kc = make((B, Hkv, Tmax, Dh), dtype, device, "bthd", seed=1)  # a (B, Tmax, Hkv, Dh) cache, read in place
            vc = make((B, Hkv, Tmax, Dh), dtype, device, seed=2)
            lens = torch.tensor([Tq, 17, Tmax, 29], dtype=torch.int32, device=device)
            scale = Dh ** -0.5
            require(OP_DECODE, backend, q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, scale=scale)
            ref, tol = decode_tol(dtype, q, kc, vc, lens, scale)
            for b, n in enumerate(lens.tolist()):  # poison: the op must never read there
                kc[b, :, n:] = float("nan")
                vc[b, :, n:] = float("inf")
            out = attention_with_kv_cache(q, kc, vc, lens, backend=backend)
            assert torch.isfinite(out).all(), f"{dtype} Dh={Dh}: read past cache_seqlens"
            assert err(out, ref) <= tol, f"{dtype} Dh={Dh}"


@pytest.mark.parametrize("backend", ["cpu"])
def test_decode_long_cache_key_splits_and_threads(backend):
    # B * Hkv small and a long cache: the CPU kernel splits the keys (flash-decoding); bit-identical results
    # for 1 and 2 threads (the split depends on the shapes only).
    q = make((1, 8, 1, 64), torch.float32, "cpu", seed=0)
    kc = make((1, 2, 3000, 64), torch.float32, "cpu", seed=1)
    vc = make((1, 2, 3000, 64), torch.float32, "cpu", seed=2)
    lens = torch.tensor([2711], dtype=torch.int32)
    require(OP_DECODE, backend, q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens, scale=0.125)
    outs = with_threads(lambda: attention_with_kv_cache(q, kc, vc, lens, backend=backend))
    assert torch.equal(outs[0], outs[1])
    assert err(outs[0], decode_ref(q, kc, vc, lens, 0.125)) <= 1e-5
    # Splits wholly past a short sequence's length, several queries, both CPU code paths (Dh 64 and 24).
    for Dh in (64, 24):
        q = make((2, 2, 3, Dh), torch.float32, "cpu", seed=3)
        kc = make((2, 1, 2600, Dh), torch.float32, "cpu", seed=4)
        lens = torch.tensor([700, 3], dtype=torch.int32)
        out = attention_with_kv_cache(q, kc, kc, lens, backend=backend)
        assert err(out, decode_ref(q, kc, kc, lens, Dh ** -0.5)) <= 1e-5


def test_decode_cpu_portable_path():
    # The scalar loops CPUs without AVX-512 run (VQKERNELS_CPU_NO_AVX512=1 is read once per process: a child).
    if _backend.not_supported_reasons(OP_DECODE, "cpu", q=torch.zeros(1, 1, 1, 8), k_cache=torch.zeros(1, 1, 1, 8),
                                      v_cache=torch.zeros(1, 1, 1, 8), cache_seqlens=torch.ones(1, dtype=torch.int32),
                                      scale=1.0):
        pytest.skip("the C++ CPU decode kernel is not built")
    code = """
import torch, vqkernels
from vqkernels.ops.attention import attention_with_kv_cache
from vqkernels.ops.attention.reference import attention_decode_reference
assert not vqkernels._backend.c_extension().cpu_features()["avx512"]
g = torch.Generator().manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
    for Dh, Tq in ((64, 1), (24, 3)):
        q = torch.randn(3, 4, Tq, Dh, generator=g).to(dtype)
        kc, vc = (torch.randn(3, 2, 1100, Dh, generator=g).to(dtype) for _ in range(2))
        lens = torch.tensor([Tq, 700, 1100], dtype=torch.int32)
        for b, n in enumerate(lens.tolist()):
            kc[b, :, n:] = float("nan")
        out = attention_with_kv_cache(q, kc, vc, lens, backend="cpu")
        ref = attention_decode_reference(q.double(), kc.double(), vc.double(), lens, Dh ** -0.5)
        e = (out.double() - ref).abs().max().item()
        assert e <= tol, (dtype, Dh, Tq, e)
"""
    env = dict(os.environ, VQKERNELS_CPU_NO_AVX512="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile.

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    q = make((1, 4, 5, 16), torch.float32, device, "bthd", seed=0).requires_grad_(True)
    k = make((1, 2, 7, 16), torch.float32, device, seed=1).requires_grad_(True)
    v = make((1, 2, 7, 16), torch.float32, device, seed=2).requires_grad_(True)
    require(OP, backend, q=q, k=k, v=v, causal=True, scale=0.25)
    torch.library.opcheck(torch.ops.vqkernels.attention_fwd.default, (q, k, v, True, 0.25, backend))
    out, lse = torch.ops.vqkernels.attention_fwd(q, k, v, True, 0.25, backend)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vqkernels.attention_bwd.default,
                          (g, q.detach(), k.detach(), v.detach(), out.detach(), lse, True, 0.25, backend))
    kc = make((1, 2, 12, 16), torch.float32, device, seed=3)
    lens = torch.tensor([9], dtype=torch.int32, device=device)
    if not _backend.not_supported_reasons(OP_DECODE, backend, q=q, k_cache=kc, v_cache=kc, cache_seqlens=lens,
                                          scale=0.25):
        torch.library.opcheck(torch.ops.vqkernels.attention_with_kv_cache.default,
                              (q.detach(), kc, kc, lens, 0.25, backend))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v = (make((1, 2, 6, 16), torch.float32, "cpu", lay, seed=s).requires_grad_(True)
               for s, lay in enumerate(("bthd", "contiguous", "bthd")))

    def step(q, k, v):
        return causal_attention(q, k, v, backend=backend).square().sum()

    loss = torch.compile(step, fullgraph=True)(q, k, v)
    loss.backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    step(q, k, v).backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
    kc = make((1, 2, 8, 16), torch.float32, "cpu", seed=4)
    lens = torch.tensor([6], dtype=torch.int32)
    dec = torch.compile(lambda q, kc, lens: attention_with_kv_cache(q, kc, kc, lens, backend=backend), fullgraph=True)
    torch.testing.assert_close(dec(q.detach()[:, :, :1], kc, lens),
                               attention_with_kv_cache(q.detach()[:, :, :1], kc, kc, lens, backend=backend))


# ---------------------------------------------------------------------------------------------
# Dispatch and errors.

def test_auto_picks_cpu_and_reasons():
    q = torch.randn(1, 2, 3, 8)
    assert _backend.select(OP, None, q=q, k=q, v=q, causal=False, scale=1.0) in ("cpu", "torch")
    r = _backend.not_supported_reasons(OP, "cuda", q=q, k=q, v=q, causal=False, scale=1.0)
    assert r and any("CUDA" in x or "cuda" in x for x in r)
    q7 = torch.randn(1, 2, 3, 4)
    r = _backend.not_supported_reasons(OP, "triton", q=q7, k=q7, v=q7, causal=False, scale=1.0)
    assert r  # Dh = 4 is below Triton's range (or Triton is not usable here)
    with pytest.raises(_backend.BackendNotSupported):
        attention(q7.cuda() if torch.cuda.is_available() else q7, q7, q7, backend="cuda")


def test_errors_attention():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention(q[0], k, k)
    with pytest.raises(ValueError, match="k must be 4-D"):
        attention(q, k[0], k)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), k, k)
    with pytest.raises(ValueError, match="multiple of k's head count"):
        attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))
    with pytest.raises(ValueError, match="head dim"):
        attention(q, torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4))
    with pytest.raises(ValueError, match="k and v must have one shape"):
        attention(q, k, torch.randn(2, 2, 7, 8))
    with pytest.raises(ValueError, match="batch size"):
        attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.double(), k.double())
    with pytest.raises(TypeError, match="q must be a floating-point"):
        attention(q.long(), k.long(), k.long())
    with pytest.raises(ValueError, match="at least one key"):
        attention(q, k[:, :, :0], k[:, :, :0])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a positive finite"):
            attention(q, k, k, scale=bad)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention(q, k, k, causal=1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            attention(q, k.cuda(), k.cuda())


def test_errors_kv_cache():
    q = torch.randn(2, 4, 1, 8)
    kc = torch.randn(2, 2, 10, 8)
    lens = torch.tensor([3, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        attention_with_kv_cache(q, kc, kc, lens.long())
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(B,\)"):
        attention_with_kv_cache(q, kc, kc, lens[:1])
    with pytest.raises(TypeError, match="cache_seqlens must be a torch.Tensor"):
        attention_with_kv_cache(q, kc, kc, [3, 10])
    for backend in ("torch", "cpu"):
        if _backend.not_supported_reasons(OP_DECODE, backend, q=q, k_cache=kc, v_cache=kc, cache_seqlens=lens,
                                          scale=1.0):
            continue
        with pytest.raises(ValueError, match=r"cache_seqlens must be in \[Tq, Tmax\]"):
            attention_with_kv_cache(q, kc, kc, torch.tensor([3, 11], dtype=torch.int32), backend=backend)
        with pytest.raises(ValueError, match=r"cache_seqlens must be in \[Tq, Tmax\]"):
            attention_with_kv_cache(torch.randn(2, 4, 4, 8), kc, kc, torch.tensor([3, 5], dtype=torch.int32),
                                    backend=backend)
    with pytest.raises(ValueError, match="k_cache and v_cache must have one shape"):
        attention_with_kv_cache(q, kc, kc[:, :, :9], lens)
    with pytest.raises(ValueError, match="multiple of k_cache's head count"):
        attention_with_kv_cache(q, kc[:, :1].expand(2, 3, 10, 8), kc[:, :1].expand(2, 3, 10, 8), lens)
    with pytest.raises(ValueError, match="only Tmax"):
        attention_with_kv_cache(torch.randn(2, 4, 11, 8), kc, kc, lens)
    with pytest.raises(TypeError, match="q and k_cache must share a dtype"):
        attention_with_kv_cache(q, kc.half(), kc.half(), lens)
    with pytest.raises(TypeError, match="k_cache must be a floating-point"):
        attention_with_kv_cache(q, kc.int(), kc.int(), lens)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cache_seqlens must be on q's device"):
            attention_with_kv_cache(q, kc, kc, lens.cuda())
    q.requires_grad_(True)
    out = attention_with_kv_cache(q, kc, kc, lens)
    with pytest.raises(RuntimeError):
        out.sum().backward()  # decoding is inference only


def test_public_exports():
    assert math.isclose(attention(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4)).sum().item(),
                        4.0)


# ---------------------------------------------------------------------------------------------
# The C++ CPU flash attention (csrc/cpu/attention_flash.cpp), called directly so that every dtype it takes is
# checked, including those the cpu backend does not send it: block edges (64 queries, 512 keys per GEMM step),
# Tq != Tk both ways, grouped heads, head dims, strided inputs, and thread-count independence.

def flash_kernel_available() -> bool:
    return _backend.has_cpu_kernels() and hasattr(torch.ops.vqkernels_C, "attention_fwd") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("vqkernels_C::attention_fwd", "CPU")


def flash_run(q, k, v, g, causal, scale):
    out, lse = torch.ops.vqkernels_C.attention_fwd(q, k, v, causal, scale)
    return (out, lse) + tuple(torch.ops.vqkernels_C.attention_bwd(g, q, k, v, out, lse, causal, scale))


FLASH_CASES = [  # (B, H, Hkv, Tq, Tk, Dh, layout)
    (1, 1, 1, 1, 1, 8, "contiguous"),
    (1, 2, 1, 63, 63, 64, "contiguous"),
    (1, 2, 2, 64, 64, 64, "bthd"),
    (2, 2, 1, 65, 65, 72, "strided"),
    (1, 4, 2, 129, 129, 128, "bthd"),
    (1, 2, 2, 65, 130, 64, "contiguous"),   # Tq < Tk
    (1, 2, 1, 130, 65, 8, "contiguous"),    # Tq > Tk: causal rows that see no key
    (1, 1, 1, 70, 600, 64, "contiguous"),   # two key steps (online softmax across them)
    (1, 1, 1, 600, 530, 32, "bthd"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", range(len(FLASH_CASES)))
def test_cpu_flash_kernel_matches_fp64(dtype, causal, case):
    if not flash_kernel_available():
        pytest.skip("the C++ CPU flash-attention kernel is not built")
    B, H, Hkv, Tq, Tk, Dh, layout = FLASH_CASES[case]
    if dtype == torch.float16 and Tq * Tk > 20000:
        pytest.skip("the long cases run in float32 and bfloat16 only (float16 is widened to the float32 kernel)")
    q = make((B, H, Tq, Dh), dtype, "cpu", layout, seed=11)
    k = make((B, Hkv, Tk, Dh), dtype, "cpu", layout, seed=12)
    v = make((B, Hkv, Tk, Dh), dtype, "cpu", layout, seed=13)
    g = make((B, H, Tq, Dh), dtype, "cpu", layout, seed=14)
    scale = Dh ** -0.5
    out, lse, dq, dk, dv = flash_run(q, k, v, g, causal, scale)
    ref = grads(lambda a, b, c: attention_fwd_reference(a, b, c, causal, scale)[0], *(t.double() for t in (q, k, v)),
                g.double())
    pt = grads(lambda a, b, c: explicit_attention(a, b, c, causal, scale), q, k, v, g)
    for name, o, r, p in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, pt):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), f"{name} holds non-finite values (an unwritten output?)"
        e, e_pt = err(o, r), err(p, r)
        assert e <= 2 * e_pt + ATOL[dtype], f"{name}: error {e:.3g} vs PyTorch's {e_pt:.3g} in {dtype}"
    _, lse_ref = attention_fwd_reference(q.double(), k.double(), v.double(), causal, scale)
    dead = torch.isinf(lse_ref)
    assert lse.dtype == torch.float32 and torch.equal(torch.isinf(lse) & (lse < 0), dead)
    assert err(lse[~dead], lse_ref[~dead]) <= 1e-5 * (1 + lse_ref[~dead].abs().max().item())
    if dead.any():
        assert (out[dead] == 0).all() and (dq[dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_flash_kernel_threads_bit_identical(dtype):
    # Enough work for the kernel to go parallel; grouped heads (the dk/dv sum over heads runs in a fixed order).
    if not flash_kernel_available():
        pytest.skip("the C++ CPU flash-attention kernel is not built")
    q = make((2, 4, 200, 64), dtype, "cpu", seed=21)
    k = make((2, 2, 200, 64), dtype, "cpu", seed=22)
    v = make((2, 2, 200, 64), dtype, "cpu", seed=23)
    g = make((2, 4, 200, 64), dtype, "cpu", seed=24)
    for causal in (False, True):
        one, two = with_threads(lambda: flash_run(q, k, v, g, causal, 0.125))
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two):
            assert torch.equal(a, b), f"{name} differs between 1 and 2 threads (causal={causal})"


def test_cpu_backend_runs_flash_kernel_for_float32():
    # The dispatch rule (from the dtype and the build only): float32 with AVX-512 goes to our kernel, and then the
    # public op equals the kernel's result exactly; bfloat16 too where MKL's bfloat16 GEMM has AMX tiles; other
    # dtypes stay on PyTorch's kernel.
    from vqkernels.ops.attention import _cpu_flash
    if not (flash_kernel_available() and _backend.cpu_has_avx512()):
        pytest.skip("the C++ CPU flash-attention kernel or AVX-512 is missing here")
    q = make((1, 2, 65, 64), torch.float32, "cpu", seed=31)
    k = make((1, 1, 70, 64), torch.float32, "cpu", seed=32)
    assert _cpu_flash(q) and not _cpu_flash(q.half()) and not _cpu_flash(q.double())
    assert _cpu_flash(q.bfloat16()) == _backend.cpu_has_bf16_gemm()
    out = causal_attention(q, k, k, backend="cpu")
    assert torch.equal(out, torch.ops.vqkernels_C.attention_fwd(q, k, k, True, 0.125)[0])
    # the gradients are our kernel's backward of the op's forward (bfloat16: PyTorch's forward, ours backward)
    go = make((1, 2, 65, 64), torch.float32, "cpu", seed=33)
    for t, s, g in ((q, k, go), (q.bfloat16(), k.bfloat16(), go.bfloat16())):
        if not _cpu_flash(t):
            continue
        t, s = t.clone().requires_grad_(), s.clone().requires_grad_()
        out, lse = attention_with_lse(t, s, s, causal=True, backend="cpu")
        dq, dk = torch.autograd.grad(out, (t, s), g)
        want = torch.ops.vqkernels_C.attention_bwd(g, t.detach(), s.detach(), s.detach(), out.detach(), lse.detach(),
                                                   True, 0.125)
        assert torch.equal(dq, want[0]) and torch.equal(dk, want[1] + want[2])


@pytest.mark.parametrize("switch", ["VQKERNELS_CPU_NO_AVX512", "VQKERNELS_CPU_NO_MKL"])
def test_cpu_flash_kernel_portable_path(switch):
    # The loops CPUs without AVX-512 run, and the at::mm GEMMs of a torch without MKL (switches read by the C++
    # side: a child process).
    if not flash_kernel_available():
        pytest.skip("the C++ CPU flash-attention kernel is not built")
    code = """
import torch, vqkernels
from vqkernels.ops.attention.reference import attention_fwd_reference, attention_bwd_reference
import os
features = vqkernels._backend.c_extension().cpu_features()  # (also loads _C, which registers the ops)
if os.environ.get("VQKERNELS_CPU_NO_AVX512"):
    assert not features["avx512"]
g = torch.Generator().manual_seed(0)
for causal in (False, True):
    for Tq, Tk in ((65, 65), (30, 77), (77, 30)):
        q = torch.randn(1, 2, Tq, 24, generator=g)
        k, v = (torch.randn(1, 1, Tk, 24, generator=g) for _ in range(2))
        go = torch.randn(1, 2, Tq, 24, generator=g)
        out, lse = torch.ops.vqkernels_C.attention_fwd(q, k, v, causal, 0.2)
        grads = torch.ops.vqkernels_C.attention_bwd(go, q, k, v, out, lse, causal, 0.2)
        ro, rl = attention_fwd_reference(q.double(), k.double(), v.double(), causal, 0.2)
        ref = attention_bwd_reference(go.double(), q.double(), k.double(), v.double(), ro, rl, causal, 0.2)
        for a, b in zip((out,) + tuple(grads), (ro,) + tuple(ref)):
            e = (a.double() - b).abs().max().item()
            assert e <= 1e-5, (causal, Tq, Tk, e)
        if os.environ.get("VQKERNELS_CPU_NO_MKL"):
            # bfloat16 without MKL's bfloat16 GEMM: widened to the float32 kernel, so exactly its result rounded
            qb, kb, vb, gb = (t.bfloat16() for t in (q, k, v, go))
            ob, lb = torch.ops.vqkernels_C.attention_fwd(qb, kb, vb, causal, 0.2)
            of, lf = torch.ops.vqkernels_C.attention_fwd(qb.float(), kb.float(), vb.float(), causal, 0.2)
            assert torch.equal(ob, of.bfloat16()) and torch.equal(lb, lf)
            gbs = torch.ops.vqkernels_C.attention_bwd(gb, qb, kb, vb, ob, lb, causal, 0.2)
            gfs = torch.ops.vqkernels_C.attention_bwd(gb.float(), qb.float(), kb.float(), vb.float(), ob.float(), lb,
                                                       causal, 0.2)
            assert all(torch.equal(a, b.bfloat16()) for a, b in zip(gbs, gfs))
"""
    env = dict(os.environ, **{switch: "1"})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
