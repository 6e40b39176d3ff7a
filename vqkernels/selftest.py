"""`vqkernels selftest`: every op's kernels, on this machine's devices, against the reference.

For every declared op (``vqkernels._backend.declared_ops()``), every backend this machine can run (``torch``,
``cpu``, ``triton`` on a GPU or under TRITON_INTERPRET=1, ``cuda``, ``sdpa``) and every dtype the backend declares,
the op's cases run on small shapes chosen to hit the edges (row and column tails, exact ties, NaN/inf rows,
grouped heads, causal with Tq != Tk, partly filled caches, strided views), forward and backward where the op has
one, and are compared with the float64 reference by the tests' rules: a kernel's error at most twice the error of
PyTorch's own computation in the same precision plus a small floor (:meth:`Checker.close`); argmin tie-aware
(:func:`vqkernels.testing.check_nearest`); counts exactly.

    python -m vqkernels.selftest [--device cpu|cuda|all] [--op NAME ...] [--json]

prints one line per (op, backend, device, dtype) -- passed, FAILED with the worst error, or skipped with the
reason -- and a summary; the exit status is 1 when anything failed (or it was interrupted), 2 when
``--device cuda`` finds no CUDA device. The self-check gate of the dispatcher
(``VQKERNELS_SELFCHECK``, see :mod:`vqkernels._backend`) runs the same cases through :func:`check` for one
(op, backend, device, dtype) before a kernel first serves a call.

Adding an op's cases (one place): a function here decorated ``@cases("op_name", dtypes=...)`` taking
``(chk, backend, device, dtype)``; each case is a ``with chk.case("what it hits"):`` block that builds fresh
inputs, calls ``chk.require(**select_args)`` (the op's named arguments, as it passes them to
``_backend.select``: a backend that cannot take them skips the case with its reasons), runs the public function
with ``backend=backend`` and compares with ``chk.close`` / ``chk.exact`` / plain asserts. An op declared without
cases is reported as "no selftest cases".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import _backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The floor of the 2x rule, relative to (1 + max |reference|): a few roundings of the output dtype.
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _short(message: str, limit: int = 240) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


class _Skip(Exception):
    pass


@dataclass
class Result:
    op: str
    backend: str
    device: str
    dtype: str
    status: str  # "passed", "failed", "skipped"
    detail: str = ""
    worst: float = 0.0  # the largest error / tolerance over every compared output (<= 1: passed)
    cases: int = 0
    seconds: float = 0.0


@dataclass
class Checker:
    """Collects a backend's results over an op's cases: comparisons, failures, skipped cases."""

    op: str
    backend: str
    device: torch.device
    dtype: torch.dtype
    ran: int = 0
    worst: float = 0.0
    worst_what: str = ""
    failures: list = field(default_factory=list)
    skips: list = field(default_factory=list)
    _case: str = ""

    @contextlib.contextmanager
    def case(self, name: str):
        """One case: BackendNotSupported (or :meth:`require`) skips it; any other exception fails it."""
        self._case = name
        try:
            yield
            self.ran += 1
        except _Skip as e:
            self.skips.append(f"{name}: {e}")
        except _backend.BackendNotSupported as e:
            self.skips.append(f"{name}: {e}")
        except AssertionError as e:
            self.ran += 1
            self.failures.append(f"{name}: {_short(str(e))}")
        except Exception as e:  # noqa: BLE001 -- a kernel that raises is a failing kernel
            self.ran += 1
            self.failures.append(f"{name}: raised {type(e).__name__}: {_short(str(e))}")

    def require(self, op: str | None = None, **args) -> None:
        reasons = _backend.not_supported_reasons(op or self.op, self.backend, **args)
        if reasons:
            raise _Skip("; ".join(reasons))

    def close(self, name: str, ours: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor | None = None,
              atol: float | None = None) -> None:
        """ours within 2 x |pt - ref| + atol x (1 + max |ref|) of the float64 ``ref`` (``pt``: PyTorch's own
        computation in ``ours``' precision; None: the floor alone). Non-finite values must match exactly."""
        what = f"{self._case}: {name}"
        if tuple(ours.shape) != tuple(ref.shape):
            raise AssertionError(f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
        o, r = ours.detach().double().cpu(), ref.detach().double().cpu()
        fin = torch.isfinite(r)
        if not torch.equal(torch.isfinite(o), fin) or not torch.equal(o[~fin].isnan(), r[~fin].isnan()) or \
                not torch.equal(o[~fin & ~r.isnan()], r[~fin & ~r.isnan()]):
            bad = int((torch.isfinite(o) != fin).sum())
            raise AssertionError(f"{name}: non-finite values where the reference has finite ones or the reverse "
                                 f"({bad} of {o.numel()} elements; an unwritten output, a NaN?)")
        e = (o - r)[fin].abs().max().item() if fin.any() else 0.0
        e_pt = (pt.detach().double().cpu() - r)[fin].abs().max().item() if pt is not None and fin.any() else 0.0
        if not math.isfinite(e_pt):
            e_pt = 0.0
        scale = 1.0 + (r[fin].abs().max().item() if fin.any() else 0.0)
        tol = 2.0 * e_pt + (ATOL[self.dtype] if atol is None else atol) * scale
        ratio = e / tol if tol > 0 else (0.0 if e == 0 else math.inf)
        if ratio > self.worst:
            self.worst, self.worst_what = ratio, f"{what}: error {e:.3g}, tolerance {tol:.3g}"
        if not ratio <= 1.0:
            raise AssertionError(f"{name}: error {e:.3g} > tolerance {tol:.3g} (PyTorch's own error {e_pt:.3g})")

    def exact(self, name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
        if tuple(ours.shape) != tuple(ref.shape) or not torch.equal(ours.detach().cpu(), ref.detach().cpu().to(ours.dtype)):
            diff = (ours.detach().cpu().double() - ref.detach().cpu().double()).abs()
            raise AssertionError(f"{name}: not equal to the reference (max difference {diff.max().item():.3g})"
                                 if ours.shape == ref.shape else f"{name}: shape {tuple(ours.shape)}, "
                                 f"expected {tuple(ref.shape)}")


@dataclass
class OpCases:
    run: Callable
    dtypes: tuple


CASES: dict[str, OpCases] = {}


def cases(op: str, dtypes: tuple = FLOAT_DTYPES):
    """Register ``fn(chk, backend, device, dtype)`` as op's selftest cases, in ``dtypes`` (each backend runs
    those of them it declares)."""
    def deco(fn):
        CASES[op] = OpCases(fn, tuple(dtypes))
        return fn
    return deco


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, device, seed, layout="contiguous"):
    """A random tensor; layout "strided": a view with last-dimension stride 2; "transposed": dims 1 and 2 of a
    (B, T, H, D) buffer swapped (what a fused projection gives)."""
    g = _gen(seed)
    if layout == "strided":
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    elif layout == "transposed":
        t = torch.randn(shape[0], shape[2], shape[1], *shape[3:], generator=g).transpose(1, 2)
    else:
        t = torch.randn(*shape, generator=g)
    return t.to(device=device, dtype=dtype)


def _grads(out: torch.Tensor, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# ---------------------------------------------------------------------------------------------------------
# attention, attention_with_kv_cache

def _explicit_attention(q, k, v, causal, scale):
    """PyTorch's own computation in q's dtype (softmax(scale q k^T + mask) v): what the 2x rule measures against."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        mask = torch.arange(Tk, device=q.device)[None, :] > torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0), v)


def _explicit_lse(q, k, causal, scale):
    """PyTorch's own row log-sum-exp: scores in q's dtype, logsumexp in float32."""
    G = q.shape[1] // k.shape[1]
    s = (torch.matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) * scale).float()
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        mask = torch.arange(Tk, device=q.device)[None, :] > torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        s = s.masked_fill(mask, float("-inf"))
    return torch.logsumexp(s, dim=-1)


# (B, H, Hkv, Tq, Tk, Dh, layout, causal): a single key; grouped heads with Tq < Tk; multi-query with Tq > Tk
# (rows that see no key) through a strided view; row tails past 32 with a transposed layout.
ATTENTION_CASES = [
    (1, 2, 2, 1, 1, 8, "contiguous", False),
    (1, 4, 2, 7, 19, 16, "transposed", True),
    (1, 2, 1, 19, 7, 32, "strided", True),
    (2, 2, 2, 33, 33, 64, "transposed", True),
    (1, 4, 2, 9, 35, 32, "contiguous", False),
]


@cases("attention")
def _attention(chk: Checker, backend, device, dtype):
    from .ops.attention import attention_with_lse
    from .ops.attention.reference import attention_bwd_reference, attention_fwd_reference

    for i, (B, H, Hkv, Tq, Tk, Dh, layout, causal) in enumerate(ATTENTION_CASES):
        with chk.case(f"B={B} H={H} Hkv={Hkv} Tq={Tq} Tk={Tk} Dh={Dh} {layout}{' causal' if causal else ''}"):
            q = _randn((B, H, Tq, Dh), dtype, device, 10 * i + 1, layout)
            k = _randn((B, Hkv, Tk, Dh), dtype, device, 10 * i + 2, layout)
            v = _randn((B, Hkv, Tk, Dh), dtype, device, 10 * i + 3, layout)
            g = _randn((B, H, Tq, Dh), dtype, device, 10 * i + 4)
            scale = Dh ** -0.5
            chk.require(q=q, k=k, v=v, causal=causal, scale=scale)
            q64, k64, v64, g64 = (t.double() for t in (q, k, v, g))
            out64, lse64 = attention_fwd_reference(q64, k64, v64, causal, scale)
            ref = (out64,) + tuple(attention_bwd_reference(g64, q64, k64, v64, out64, lse64, causal, scale))
            qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            out, lse = attention_with_lse(qr, kr, vr, causal=causal, scale=scale, backend=backend)
            ours = (out,) + tuple(_grads(out, (qr, kr, vr), g))
            qp, kp, vp = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            outp = _explicit_attention(qp, kp, vp, causal, scale)
            pt = (outp,) + tuple(_grads(outp, (qp, kp, vp), g))
            for name, o, r, p in zip(("out", "dq", "dk", "dv"), ours, ref, pt):
                assert o.dtype == dtype, f"{name} has dtype {o.dtype}, expected {dtype}"
                chk.close(name, o, r, p)
            dead = torch.isinf(lse64)
            assert torch.equal((torch.isinf(lse) & (lse < 0)).cpu(), dead.cpu()), \
                "lse must be -inf exactly on the rows that see no key"
            chk.close("lse", lse.masked_fill(dead, 0), lse64.masked_fill(dead, 0),
                      _explicit_lse(q, k, causal, scale).masked_fill(dead, 0), atol=1e-5)


# (B, H, Hkv, Tmax, Dh, Tq, lengths): ragged, partly filled caches (NaN past each length: never read), grouped
# heads, one or several new tokens, the cache a transposed (B, T, Hkv, Dh) view.
DECODE_CASES = [
    (3, 4, 2, 21, 32, 1, (5, 21, 12)),
    (2, 2, 1, 40, 16, 3, (3, 37)),
    (1, 2, 2, 9, 8, 1, (1,)),
]


@cases("attention_with_kv_cache")
def _attention_decode(chk: Checker, backend, device, dtype):
    from .ops.attention import attention_with_kv_cache
    from .ops.attention.reference import attention_decode_reference

    for i, (B, H, Hkv, Tmax, Dh, Tq, lens) in enumerate(DECODE_CASES):
        with chk.case(f"B={B} H={H} Hkv={Hkv} Tmax={Tmax} Dh={Dh} Tq={Tq} lengths={list(lens)}"):
            q = _randn((B, H, Tq, Dh), dtype, device, 10 * i + 1)
            kc = _randn((B, Hkv, Tmax, Dh), dtype, device, 10 * i + 2, "transposed")
            vc = _randn((B, Hkv, Tmax, Dh), dtype, device, 10 * i + 3, "transposed")
            for b, n in enumerate(lens):
                kc[b, :, n:] = float("nan")
                vc[b, :, n:] = float("nan")
            seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
            scale = Dh ** -0.5
            chk.require(q=q, k_cache=kc, v_cache=vc, cache_seqlens=seqlens, scale=scale)
            ref = attention_decode_reference(q.double(), kc.double(), vc.double(), seqlens, scale)
            pt = torch.cat([_explicit_attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], True, scale)
                            for b, n in enumerate(lens)])
            out = attention_with_kv_cache(q, kc, vc, seqlens, scale=scale, backend=backend)
            assert out.dtype == dtype, f"out has dtype {out.dtype}, expected {dtype}"
            chk.close("out", out, ref, pt)


# ---------------------------------------------------------------------------------------------------------
# nearest_code, vq_loss, vector_quantize, code_stats, code_usage

def _nearest_inputs(N, K, D, dtype, device, seed, strided=False):
    g = _gen(seed)
    cb = torch.randn(K, D, generator=g)
    x = torch.randn(N, 2 * D + 1, generator=g)[:, 1::2] if strided else torch.randn(N, D, generator=g)
    # exact ties: duplicated codes, rows that equal a code (distance 0 to two codes at once)
    cb[K - 1] = cb[1]
    x[0] = cb[1]
    x[min(2, N - 1)] = cb[K // 2]
    return x.to(device=device, dtype=dtype), cb.to(device=device, dtype=dtype)


@cases("nearest_code")
def _nearest_code(chk: Checker, backend, device, dtype):
    from .ops.nearest_code import METRICS, nearest_code, normalize
    from .testing import check_nearest

    for i, (N, K, D, metric, strided, nonfinite) in enumerate([
        (37, 67, 19, "l2", True, False),     # row and column tails, a strided view, exact ties
        (130, 300, 64, "l2", False, True),   # NaN and inf rows
        (33, 129, 24, "cosine", False, False),
    ]):
        with chk.case(f"N={N} K={K} D={D} {metric}{' strided' if strided else ''}{' NaN/inf rows' if nonfinite else ''}"):
            x, cb = _nearest_inputs(N, K, D, dtype, device, 100 + i, strided)
            if nonfinite:
                x[5] = float("nan")
                x[6, 3] = float("inf")
                x[7, 0] = float("-inf")
            xs, cs = (normalize(x), normalize(cb)) if metric == "cosine" else (x, cb)
            chk.require(x=xs, codebook=cs, metric=METRICS[metric], allow_tf32=False)
            idx, dist = nearest_code(x, cb, metric=metric, return_distance=True, backend=backend)
            assert idx.dtype == torch.int64 and tuple(idx.shape) == (N,), f"indices {idx.dtype} {tuple(idx.shape)}"
            assert bool(((idx >= 0) & (idx < K)).all()), "an index outside [0, K)"
            fin = torch.isfinite(x.float()).all(1).cpu()
            if not fin.all():
                assert not torch.isfinite(dist.cpu()[~fin]).any(), "a non-finite row got a finite distance"
            check_nearest(x.cpu()[fin], cb.cpu(), idx.cpu()[fin], dist.cpu()[fin], metric=metric)


def _vq_inputs(dtype, device, seed, B=2, T=9, D=19, K=13):
    g = _gen(seed)
    z = torch.randn(B, T, 2 * D, generator=g)[..., 1::2]  # a strided view
    cb = torch.randn(K, D, generator=g)
    idx = torch.randint(0, K - 2, (B, T), generator=g)  # the last two codes unused
    idx[0, 0] = idx[-1, -1] = 3
    return z.to(device=device, dtype=dtype), cb.to(device=device, dtype=dtype), idx.to(device)


def _vq_loss_run(z, cb, idx, g_zq, backend, legacy):
    from .ops.vq_loss import vq_loss

    zr, cr = z.detach().clone().requires_grad_(True), cb.detach().clone().requires_grad_(True)
    z_q, loss = vq_loss(zr, cr, idx, beta=0.25, legacy=legacy, backend=backend)
    dz, dcb = torch.autograd.grad((z_q * g_zq).sum() + 3.0 * loss, (zr, cr))
    return z_q.detach(), loss.detach(), dz, dcb


@cases("vq_loss")
def _vq_loss(chk: Checker, backend, device, dtype):
    for i, (shape, legacy) in enumerate([((2, 9, 19, 13), True), ((1, 130, 64, 40), False)]):
        B, T, D, K = shape
        with chk.case(f"B={B} T={T} D={D} K={K} strided{' legacy' if legacy else ''}"):
            z, cb, idx = _vq_inputs(dtype, device, 200 + i, B, T, D, K)
            chk.require(z=z, codebook=cb, indices=idx)
            g_zq = _randn(z.shape, dtype, device, 300 + i)
            ours = _vq_loss_run(z, cb, idx, g_zq, backend, legacy)
            ref = _vq_loss_run(z.double(), cb.double(), idx, g_zq.double(), "torch", legacy)
            pt = _vq_loss_run(z, cb, idx, g_zq, "torch", legacy)
            chk.exact("z_q", ours[0], cb[idx])
            for name, o, r, p in zip(("loss", "grad z", "grad codebook"), ours[1:], ref[1:], pt[1:]):
                chk.close(name, o, r, p)


@cases("vector_quantize")
def _vector_quantize(chk: Checker, backend, device, dtype):
    from .ops.vq_loss import vector_quantize
    from .testing import check_nearest

    for i, (B, T, D, K) in enumerate([(2, 9, 19, 13), (1, 70, 64, 129)]):
        with chk.case(f"B={B} T={T} D={D} K={K} strided"):
            z, cb, _ = _vq_inputs(dtype, device, 400 + i, B, T, D, K)
            chk.require(z=z, codebook=cb)
            g_zq = _randn(z.shape, dtype, device, 500 + i)
            zr, cr = z.detach().clone().requires_grad_(True), cb.detach().clone().requires_grad_(True)
            z_q, loss, idx = vector_quantize(zr, cr, backend=backend)
            dz, dcb = torch.autograd.grad((z_q * g_zq).sum() + 3.0 * loss, (zr, cr))
            check_nearest(z.cpu(), cb.cpu(), idx.cpu())
            chk.exact("z_q", z_q, cb[idx])
            ref = _vq_loss_run(z.double(), cb.double(), idx, g_zq.double(), "torch", True)
            pt = _vq_loss_run(z, cb, idx, g_zq, "torch", True)
            for name, o, r, p in zip(("loss", "grad z", "grad codebook"), (loss, dz, dcb), ref[1:], pt[1:]):
                chk.close(name, o, r, p)


@cases("code_stats")
def _code_stats(chk: Checker, backend, device, dtype):
    from .ops.code_stats import code_stats

    for i, (B, T, D, K) in enumerate([(2, 9, 19, 13), (1, 300, 64, 7)]):
        with chk.case(f"B={B} T={T} D={D} K={K} strided, unused codes"):
            z, _, idx = _vq_inputs(dtype, device, 600 + i, B, T, D, K)
            chk.require(z=z, indices=idx, num_codes=K)
            counts, sums = code_stats(z, idx, K, backend=backend)
            rc, rs = code_stats(z.double(), idx, K, backend="torch")
            pc, ps = code_stats(z, idx, K, backend="torch")
            chk.exact("counts", counts, rc)
            chk.close("sums", sums, rs, ps)


@cases("code_usage", dtypes=(torch.int64,))
def _code_usage(chk: Checker, backend, device, dtype):
    from .ops.code_stats import code_usage

    for i, (N, K) in enumerate([(101, 13), (1, 3), (5000, 1000)]):
        with chk.case(f"N={N} K={K}"):
            idx = torch.randint(0, max(1, K - 2), (N,), generator=_gen(700 + i)).to(device)
            chk.require(indices=idx, num_codes=K)
            counts, perplexity = code_usage(idx, K, backend=backend)
            ref = torch.bincount(idx.cpu(), minlength=K)
            chk.exact("counts", counts, ref)
            p = ref.double() / N
            chk.close("perplexity", perplexity.reshape(()), torch.exp(-(p * torch.log(p + 1e-10)).sum()), atol=2e-6)


@cases("residual_vq", dtypes=(torch.float32,))
def _residual_vq(chk: Checker, backend, device, dtype):
    from .ops.residual_vq import residual_vq

    # small integers: every distance and residual is exact in float32, so the stages' choices (ties included:
    # the lowest index) must equal the reference's exactly, whatever the summation order
    for i, (N, D, Q, K) in enumerate([(37, 19, 3, 13), (130, 64, 4, 40)]):
        with chk.case(f"N={N} D={D} Q={Q} K={K} integer-valued, ties"):
            g = _gen(900 + i)
            x = torch.randint(-4, 5, (N, D), generator=g).to(device=device, dtype=dtype)
            cbs = torch.randint(-3, 4, (Q, K, D), generator=g).to(device=device, dtype=dtype)
            chk.require(x=x, codebooks=cbs)
            g_q, g_e = _randn((N, D), dtype, device, 910 + i), _randn((Q,), dtype, device, 920 + i)
            outs = []
            for b, xx, gq, ge in ((backend, x, g_q, g_e), ("torch", x.double(), g_q.double(), g_e.double())):
                xr = xx.detach().clone().requires_grad_(True)
                idx, quant, err = residual_vq(xr, cbs.to(xx.dtype), backend=b)
                (dx,) = torch.autograd.grad((quant * gq).sum() + (err * ge).sum(), (xr,))
                outs.append((idx, quant, err, dx))
            (idx, quant, err, dx), (ridx, rquant, rerr, rdx) = outs
            chk.exact("indices", idx, ridx)
            chk.exact("quantized", quant, rquant)
            chk.exact("squared errors", err, rerr)
            chk.close("grad x", dx, rdx)


@cases("lfq_entropy")
def _lfq_entropy(chk: Checker, backend, device, dtype):
    from .ops.lfq_entropy import lfq_entropy

    for i, (N, C, d) in enumerate([(37, 2, 5), (64, 1, 11)]):
        with chk.case(f"N={N} C={C} d={d}: per-sample and codebook entropy, gradient"):
            x = _randn((N, C, d), dtype, device, 950 + i)
            chk.require(x=x)
            res = []
            for b, xx in ((backend, x), ("torch", x.double())) + ((("torch", x),) if dtype == torch.float32 else ()):
                xr = xx.detach().clone().requires_grad_(True)
                ps, cb = lfq_entropy(xr, scale=2.0, backend=b)
                (dx,) = torch.autograd.grad(0.7 * ps + 1.3 * cb, (xr,))
                res.append((ps, cb, dx))
            ours, ref = res[0], res[1]
            pt = res[2] if len(res) > 2 else (None, None, None)
            for name, o, r, p in zip(("per-sample entropy", "codebook entropy", "grad x"), ours, ref, pt):
                chk.close(name, o, r, p)


@cases("linear")
def _linear(chk: Checker, backend, device, dtype):
    import torch.nn.functional as F

    from .ops.linear import PackedLinear

    for rows in (1, 7, 33):
        with chk.case(f"{rows} rows, weight 40x24 (a partial column panel), bias"):
            w = _randn((40, 24), dtype, device, 800)
            bias = _randn((40,), dtype, device, 801)
            x = _randn((rows, 24), dtype, device, 802 + rows)
            chk.require(weight=w, bias=bias)
            lin = PackedLinear(w, bias, backend=backend)
            with torch.no_grad():
                y = lin(x)
            chk.close("y", y, F.linear(x.double(), w.double(), bias.double()), F.linear(x, w, bias))


# ---------------------------------------------------------------------------------------------------------
# Running them.

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def backend_dtypes(op: str, backend: str) -> list:
    """The dtypes op's cases run in on ``backend``: those the cases cover and the backend declares."""
    cap = _backend._SPECS[op].backends[backend]
    want = CASES[op].dtypes
    return [d for d in want if cap.dtypes is None or d in cap.dtypes]


def device_reasons(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> list:
    """Why ``backend`` cannot run ``op`` at all on ``device`` in ``dtype`` here (devices, build, Triton)."""
    spec = _backend._SPECS[op]
    cap = dataclasses.replace(spec.backends[backend], limit=None)
    probe = torch.empty(0, device="meta", dtype=dtype)
    probe = torch.empty(0, dtype=dtype, device=device) if device.type in ("cpu", "cuda") else probe
    fake = _backend.OpSpec(op, spec.primary, {backend: cap})
    return _backend._spec_reasons(fake, backend, {spec.primary: probe})


def check(op: str, backend: str, device, dtype: torch.dtype) -> Result:
    """Run op's cases on ``backend`` on ``device`` in ``dtype``: passed, failed (the first failures and the worst
    error) or skipped (no case could run, or the op has no cases)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    res = Result(op, backend, str(device), _dtype_name(dtype), "skipped")
    entry = CASES.get(op)
    if entry is None:
        res.detail = "no selftest cases"
        return res
    chk = Checker(op, backend, device, dtype)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_backend.selfcheck_running())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        stack.enter_context(warnings.catch_warnings())
        # (the Triton interpreter's numpy warns on the NaN rows the cases feed it on purpose)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        try:
            entry.run(chk, backend, device, dtype)
        except Exception as e:  # noqa: BLE001 -- outside a case: still this backend's failure, reported
            chk.failures.append(f"raised {type(e).__name__}: {e}")
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except Exception as e:  # noqa: BLE001 -- an illegal address surfaces here
                chk.failures.append(f"the device reported {type(e).__name__}: {e}")
    res.cases, res.worst, res.seconds = chk.ran, chk.worst, time.perf_counter() - t0
    if chk.failures:
        res.status = "failed"
        res.detail = "; ".join(chk.failures[:3]) + (f" (+{len(chk.failures) - 3} more)" if len(chk.failures) > 3 else "")
    elif chk.ran:
        res.status = "passed"
        res.detail = chk.worst_what
    else:
        res.detail = "; ".join(sorted(set(s.split(": ", 1)[1] for s in chk.skips))) or "no case ran"
    return res


def _devices(which: str) -> tuple[list, list]:
    """(devices to check, [(device name, why it is skipped)])."""
    have_cuda = False
    try:
        have_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pass
    devs, missing = [], []
    if which in ("cpu", "all"):
        devs.append(torch.device("cpu"))
    if which in ("cuda", "all"):
        if have_cuda:
            devs.append(torch.device("cuda", torch.cuda.current_device()))
        else:
            missing.append(("cuda", "no CUDA device here (torch.cuda.is_available() is False)"))
    return devs, missing


def run(ops=None, device: str = "all", on_result: Callable | None = None) -> list[Result]:
    """Every (op, backend, device, dtype) line of the selftest, in order."""
    from ._info import _import_every_op

    import_errors = _import_every_op()
    results = []

    def emit(r):
        results.append(r)
        if on_result:
            on_result(r)

    for name, err in import_errors.items():
        emit(Result(name, "-", "-", "-", "failed", f"vqkernels.ops.{name} does not import: {err}"))
    declared = _backend.declared_ops()
    unknown = [o for o in (ops or []) if o not in declared]
    if unknown:
        raise SystemExit(f"vqkernels selftest: unknown op(s) {unknown}; declared: {declared}")
    devs, missing = _devices(device)
    for op in ops or declared:
        spec = _backend._SPECS[op]
        if op not in CASES:
            emit(Result(op, "-", "-", "-", "skipped", "no selftest cases"))
            continue
        for backend in spec.backends:
            for dtype in backend_dtypes(op, backend):
                for dev in devs:
                    cap = spec.backends[backend]
                    if cap.devices is not None and dev.type not in cap.devices:
                        continue
                    why = device_reasons(op, backend, dev, dtype)
                    if why:
                        emit(Result(op, backend, str(dev), _dtype_name(dtype), "skipped", "; ".join(why)))
                        continue
                    r = check(op, backend, dev, dtype)
                    if r.status in ("passed", "failed"):
                        _backend.record_selfcheck(op, backend, dev, dtype, r.status == "passed", r.detail)
                    emit(r)
            for dev_name, why in missing:  # one line per backend, not per dtype
                cap = spec.backends[backend]
                if cap.devices is None or dev_name in cap.devices:
                    emit(Result(op, backend, dev_name, "*", "skipped", why))
    return results


def format_result(r: Result) -> str:
    head = f"{r.op:<24} {r.backend:<7} {r.device:<7} {r.dtype:<9}"
    if r.status == "passed":
        return f"{head} passed   ({r.cases} cases, worst {r.worst:.2f} of tolerance, {r.seconds:.2f} s)"
    if r.status == "failed":
        return f"{head} FAILED   {r.detail}"
    return f"{head} skipped  ({r.detail})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="which devices to check (default: all this machine has)")
    parser.add_argument("--op", nargs="+", default=None, metavar="NAME", help="only these ops (default: every op)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (results and summary)")


def main(args: argparse.Namespace) -> int:
    """Run, print, and return the exit status (1: something failed). Interrupted (SIGINT, e.g. ``timeout -s INT``
    at a stage's budget), it still prints what it found, marked ``interrupted``, and returns 1 if that is
    incomplete."""
    t0 = time.perf_counter()
    results: list = []

    def on_result(r):
        results.append(r)
        if not args.json:
            print(format_result(r), flush=True)

    interrupted = False
    try:
        run(args.op, args.device, on_result)
    except KeyboardInterrupt:
        interrupted = True
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    seconds = time.perf_counter() - t0
    from . import __version__

    if args.json:
        print(json.dumps(dict(vqkernels=__version__, torch=torch.__version__, seconds=round(seconds, 2),
                              interrupted=interrupted, summary=counts,
                              results=[dataclasses.asdict(r) for r in results]), indent=1))
    else:
        tail = " (INTERRUPTED: incomplete)" if interrupted else ""
        print(f"selftest: {counts['passed']} passed, {counts['failed']} FAILED, {counts['skipped']} skipped "
              f"in {seconds:.1f} s{tail}" if counts["failed"] else
              f"selftest: {counts['passed']} passed, {counts['skipped']} skipped, none failed in {seconds:.1f} s{tail}")
    if counts["failed"] or interrupted:
        return 1
    if args.device == "cuda" and _devices("cuda")[1]:
        print("selftest: --device cuda, but no CUDA device is visible: nothing was checked", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="vqkernels selftest", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
