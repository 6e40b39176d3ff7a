"""Triton attention kernels (vqkernels/ops/attention/triton.py) called directly, against a float64
computation written here: block boundaries (small block overrides, so that short sequences cross
many blocks and both the unmasked and the masked key stages run), odd head dims (padded BLOCK_D),
grouped heads, Tq != Tk both ways (bottom-right causal, rows that see no key), strided inputs read
in place, the backward's per-kv-head sums, and flash-decoding's splits and length masks.

The op-level tests (tests/test_attention.py) run these kernels through the public op as well.
Under the interpreter (no GPU) the half dtypes go through the WIDEN path (tiles widened to fp32
before tl.dot: the same function); on a GPU they run on tensor cores.
"""
from __future__ import annotations

import pytest
import torch

from helpers import INTERPRETED, device_for

T = pytest.importorskip("vqkernels.ops.attention.triton")
Cfg = T.AttnConfig

DEV = None


def _dev():
    global DEV
    if DEV is None:
        DEV = device_for("triton")
    return DEV


# Error allowed beyond twice PyTorch's own error in the same precision (flash-attn's rule).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _visible(Tq, Tk, causal, device):
    if not causal:
        return torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return j <= i + (Tk - Tq)


def ref_attention(q, k, v, causal, scale, dtype=torch.float64):
    """(out, lse) computed in ``dtype`` (float64: the oracle; the input dtype: PyTorch's own error)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, 1)
    v = v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~_visible(q.shape[2], k.shape[2], causal, q.device), float("-inf"))
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see no key: p = 0
    return p @ v, lse


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check_close(name, ours, oracle, lowp, dtype):
    """|ours - oracle| <= 2 |lowp - oracle| + atol (lowp: PyTorch's computation in ``dtype``)."""
    err = _max_err(ours, oracle)
    bound = (2 * _max_err(lowp, oracle) if dtype != torch.float32 else 0.0) + ATOL[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _inputs(B, H, Hkv, Tq, Tk, Dh, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dev = _dev()
    return (_rand((B, H, Tq, Dh), dtype, dev, gen), _rand((B, Hkv, Tk, Dh), dtype, dev, gen),
            _rand((B, Hkv, Tk, Dh), dtype, dev, gen))


SMALL = Cfg(16, 16, 4, 1)  # many blocks at short T: every stage and boundary runs


# ---------------------------------------------------------------------------------------------
# Forward.

FWD_CASES = [
    # B, H, Hkv, Tq, Tk, Dh, causal, config (None: the launcher's; "gpu": the GPU's shipped tiles)
    (1, 2, 1, 1, 1, 16, True, None),
    (2, 4, 2, 7, 7, 8, True, SMALL),            # Dh 8 padded to 16
    (1, 2, 2, 45, 70, 24, True, SMALL),         # Tq < Tk: the diagonal starts mid-block
    (1, 2, 1, 70, 45, 40, True, SMALL),         # Tq > Tk: 25 rows see no key
    (2, 3, 1, 33, 50, 32, False, SMALL),        # multi-query
    (1, 2, 2, 129, 129, 64, True, "gpu"),       # shipped blocks, one row past a block
    (1, 2, 1, 130, 77, 128, True, "gpu"),
    (1, 4, 2, 100, 130, 48, False, None),
    (1, 1, 1, 16, 32, 16, True, Cfg(16, 16, 4, 1)),  # T exact multiples of the blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}"
                         + (f"-{c[7]}" if isinstance(c[7], str) else "-small" if c[7] else ""))
def test_forward_matches_float64(case, dtype):
    B, H, Hkv, Tq, Tk, Dh, causal, cfg = case
    if cfg == "gpu":
        cfg = T.family("fwd", dtype, Dh)
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, Dh, dtype, seed=Tq * 31 + Dh)
    scale = Dh ** -0.5
    out, lse = T.attention_fwd_triton(q, k, v, causal, scale, config=cfg)
    assert out.dtype == dtype and out.shape == (B, H, Tq, Dh)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Tq)
    ro, rl = ref_attention(q, k, v, causal, scale)
    lo, _ = ref_attention(q, k, v, causal, scale, dtype=dtype)
    _check_close("out", out, ro, lo, dtype)
    # lse: -inf exactly where a row sees no key, else close (fp32 statistics in every dtype).
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(rl).cpu())
    fin = torch.isfinite(rl)
    assert _max_err(lse[fin], rl[fin]) <= 1e-4 * max(1.0, rl[fin].abs().max().item() if fin.any() else 1.0)
    if causal and Tq > Tk:
        assert (out[:, :, : Tq - Tk] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_forward_reads_strided_views_in_place(causal):
    """q, k, v as (B, T, H, Dh) slices of one fused qkv projection, transposed: no copy, same result."""
    dtype, B, T_, H, Dh = torch.float32, 2, 37, 3, 24
    gen = torch.Generator().manual_seed(5)
    qkv = _rand((B, T_, 3, H, Dh), dtype, _dev(), gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, Dh), stride(2) = 3*H*Dh
    assert not q.is_contiguous() and q.stride(-1) == 1
    out, lse = T.attention_fwd_triton(q, k, v, causal, 0.3, config=SMALL)
    out_c, lse_c = T.attention_fwd_triton(q.contiguous(), k.contiguous(), v.contiguous(), causal, 0.3, config=SMALL)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    ro, _ = ref_attention(q, k, v, causal, 0.3)
    assert _max_err(out, ro) <= ATOL[dtype]


def test_forward_empty_keys_and_queries():
    q, k, v = _inputs(1, 2, 1, 5, 0, 16, torch.float32, seed=1)
    out, lse = T.attention_fwd_triton(q, k, v, False, 0.25)
    assert (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = _inputs(1, 2, 1, 0, 9, 16, torch.float32, seed=1)
    out, lse = T.attention_fwd_triton(q, k, v, True, 0.25)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


# ---------------------------------------------------------------------------------------------
# Backward.

BWD_CASES = [
    # B, H, Hkv, Tq, Tk, Dh, causal, (dkdv config, dq config)
    (1, 2, 1, 7, 7, 16, True, (None, None)),
    (1, 4, 2, 33, 70, 24, False, (SMALL, SMALL)),
    (1, 4, 2, 50, 37, 40, True, (SMALL, Cfg(32, 16, 4, 1))),   # Tq > Tk: empty rows add nothing
    (1, 2, 2, 37, 50, 8, True, (Cfg(16, 32, 4, 1), SMALL)),    # Tq < Tk
    (1, 4, 1, 129, 129, 32, True, ("gpu", "gpu")),            # shipped blocks, multi-query
    (1, 2, 2, 70, 100, 128, False, ("gpu", "gpu")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}")
def test_backward_matches_float64(case, dtype):
    B, H, Hkv, Tq, Tk, Dh, causal, (c_kv, c_q) = case
    if c_kv == "gpu":
        c_kv, c_q = T.family("bwd_dkdv", dtype, Dh), T.family("bwd_dq", dtype, Dh)
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, Dh, dtype, seed=Tk * 7 + Dh)
    scale = Dh ** -0.5
    out, lse = T.attention_fwd_triton(q, k, v, causal, scale)
    gen = torch.Generator().manual_seed(11)
    dout = _rand(out.shape, dtype, out.device, gen)
    dq, dk, dv = T.attention_bwd_triton(dout, q, k, v, out, lse, causal, scale, config_dkdv=c_kv, config_dq=c_q)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype

    def grads(cdtype):
        leaves = [t.detach().to(cdtype).requires_grad_() for t in (q, k, v)]
        o, _ = ref_attention(*leaves, causal, scale, dtype=cdtype)
        o.backward(dout.to(cdtype))
        return [t.grad for t in leaves]

    oracle = grads(torch.float64)
    lowp = grads(dtype)
    for name, ours, o64, olp in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle, lowp):
        _check_close(name, ours, o64, olp, dtype)
    if causal and Tq > Tk:
        assert (dq[:, :, : Tq - Tk] == 0).all()


def test_backward_takes_a_stride_zero_gradient():
    """out.sum().backward() hands an expanded (stride 0) gradient; the launcher copies it."""
    q, k, v = _inputs(1, 2, 1, 20, 20, 16, torch.float32, seed=3)
    out, lse = T.attention_fwd_triton(q, k, v, True, 0.25)
    dout = torch.ones((), device=out.device).expand_as(out)
    got = T.attention_bwd_triton(dout, q, k, v, out, lse, True, 0.25)
    want = T.attention_bwd_triton(dout.contiguous(), q, k, v, out, lse, True, 0.25)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_backward_is_deterministic():
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, torch.float32, seed=4)
    out, lse = T.attention_fwd_triton(q, k, v, True, 0.25)
    dout = torch.randn_like(out)
    a = T.attention_bwd_triton(dout, q, k, v, out, lse, True, 0.25)
    b = T.attention_bwd_triton(dout, q, k, v, out, lse, True, 0.25)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# Decoding.

DECODE_CASES = [
    # B, H, Hkv, Tq, Tmax, Dh, num_splits (None: the launcher's choice), config (None: the launcher's)
    (3, 4, 2, 1, 100, 16, None, None),
    (3, 4, 1, 5, 130, 32, None, None),
    (2, 8, 2, 3, 70, 64, 1, None),          # one split: the kernel writes the output directly
    (2, 2, 2, 1, 200, 24, 3, None),
    (2, 24, 2, 2, 50, 40, 2, None),         # 12 heads x 2 queries = 24 rows: the wide (64-row) config
    (1, 12, 2, 3, 40, 8, 2, SMALL),         # 18 rows in two row blocks of 16
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "x".join(map(str, c[:7])) + ("-small" if c[7] else ""))
def test_decode_matches_float64_and_reads_nothing_past_length(case, dtype):
    B, H, Hkv, Tq, Tmax, Dh, splits, cfg = case
    gen = torch.Generator().manual_seed(B * 100 + Tmax)
    dev = _dev()
    q = _rand((B, H, Tq, Dh), dtype, dev, gen)
    kc = _rand((B, Hkv, Tmax, Dh), dtype, dev, gen)
    vc = _rand((B, Hkv, Tmax, Dh), dtype, dev, gen)
    lens = torch.randint(Tq, Tmax + 1, (B,), generator=gen, dtype=torch.int32)
    lens[0], lens[-1] = Tq, Tmax  # the shortest possible and a full cache
    for b in range(B):  # poison: a read at or past a sequence's length turns its output into NaN
        kc[b, :, lens[b]:] = float("nan")
        vc[b, :, lens[b]:] = float("nan")
    scale = Dh ** -0.5
    out = T.attention_decode_triton(q, kc, vc, lens.to(dev), scale, num_splits=splits, config=cfg)
    assert out.shape == q.shape and out.dtype == dtype
    for b in range(B):
        L = int(lens[b])
        args = (q[b:b + 1], kc[b:b + 1, :, :L], vc[b:b + 1, :, :L], True, scale)
        _check_close(f"seq {b} (len {L})", out[b:b + 1], ref_attention(*args)[0],
                     ref_attention(*args, dtype=dtype)[0], dtype)


def test_decode_equals_forward_on_the_prefix():
    """Tq = 1 decoding at every length equals the causal forward's row for that position."""
    B, H, Hkv, Tmax, Dh = 2, 4, 2, 40, 16
    q, kc, vc = _inputs(B, H, Hkv, Tmax, Tmax, Dh, torch.float32, seed=9)
    full, _ = T.attention_fwd_triton(q, kc, vc, True, 0.25)
    for L in (1, 17, 40):
        lens = torch.full((B,), L, dtype=torch.int32, device=q.device)
        out = T.attention_decode_triton(q[:, :, L - 1:L], kc, vc, lens, 0.25, num_splits=3)
        assert _max_err(out, full[:, :, L - 1:L]) <= 2e-6


def test_decode_split_count():
    # H100: 132 SMs. One sequence, 8 kv heads over a long cache: split to fill the device.
    assert T.decode_num_splits(8, 1, 4096, 64, 132) > 8
    # Enough (sequence, head) programs already: no split.
    assert T.decode_num_splits(64 * 8, 1, 4096, 64, 132) == 1
    # A short cache is never split into blocks shorter than _MIN_BLOCKS_PER_SPLIT key blocks.
    assert T.decode_num_splits(1, 1, 100, 64, 132) == 1
    assert T.decode_num_splits(1, 1, 10 ** 6, 64, 132) <= T._MAX_SPLITS


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_names_the_argument():
    q, k, v = _inputs(1, 4, 2, 8, 8, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        T.attention_fwd_triton(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16), False, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        T.attention_fwd_triton(q, k.half(), v.half(), False, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        T.attention_fwd_triton(q[..., :4], k[..., :4], v[..., :4], False, 1.0)
    with pytest.raises(ValueError, match="4-D"):
        T.attention_fwd_triton(q[0], k, v, False, 1.0)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        T.attention_fwd_triton(q.int(), k.int(), v.int(), False, 1.0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        T.attention_decode_triton(q[:, :, :1], k, v, torch.ones(1, dtype=torch.int64, device=q.device), 1.0)
    with pytest.raises(ValueError, match="lse"):
        T.attention_bwd_triton(q, q, k, v, q, torch.zeros(1, 4, 7, device=q.device), False, 1.0)


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter-only WIDEN flag")
def test_interpreter_widens_half_tiles():
    """Under the interpreter bf16 tl.dot is wrong unless widened: the bf16 cases above pass only
    through WIDEN; this guards that the launcher turns it on."""
    q, k, v = _inputs(1, 1, 1, 16, 16, 16, torch.bfloat16, seed=2)
    out, _ = T.attention_fwd_triton(q, k, v, False, 0.25)
    ro, _ = ref_attention(q, k, v, False, 0.25)
    assert _max_err(out, ro) < 0.05
