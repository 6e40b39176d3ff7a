"""lfq_entropy's CUDA kernels (csrc/cuda/lfq_entropy.cpp, lfq_entropy_kernels.cu).

Without a GPU: every kernel of lfq_entropy_kernels.cu compiles for sm_90 at each dtype with no spills and no stack
frame (an 8 x 8 accumulator indexed at run time lands in local memory without a spill being reported); where _C
was built with CUDA, both ops are registered for CUDA and their own checks answer CPU tensors and bad arguments;
the backend is declared so that ``auto`` picks it first on CUDA tensors, behind the self-check gate.
With a GPU (tests/test_lfq.py runs every backend, cuda included, against brute force): the sizes the small tests
do not reach (row splits of the forward, several tiles and Z of the backward, d = 16 and 18) against the float64
reference, run-to-run determinism, and the backward without a host sync (under CUDA graph capture).
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import HAS_CUDA
from test_cuda_build import ROOT, _cuda_extension_built, _demangle, _skip_reason, compile_for_sm90

import vqkernels
from vqkernels import _backend, lfq_entropy

SRC = os.path.join(ROOT, "csrc", "cuda", "lfq_entropy_kernels.cu")


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_lfq_entropy_kernels_are_all_there_without_local_memory():
    kernels, _ = compile_for_sm90(SRC)
    names = _demangle(list(kernels))
    flat = " ".join(names.values())
    for dtype in ("float", "__half", "__nv_bfloat16"):
        for kernel in ("lfq_pbar_kernel", "lfq_per_sample_kernel", "lfq_bwd_kernel", "lfq_bwd_finish_kernel"):
            assert f"{kernel}<{dtype}>" in flat, f"{kernel}<{dtype}> missing from {flat}"
    for kernel in ("lfq_pbar_finish_kernel", "lfq_fwd_scalars_kernel", "lfq_grad_weight_kernel"):
        assert kernel in flat, f"{kernel} missing from {flat}"
    for mangled, k in kernels.items():
        what = names[mangled]
        assert k["registers"] is not None and k["registers"] <= 255, f"{what}: {k['registers']} registers"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{what} spills"
        assert k["stack"] == 0, f"{what}: {k['stack']} bytes of stack (a register array in local memory)"
        # 64-thread GEMM blocks: at most 40 KB of static shared memory each, so 5 fit an H100 SM (228 KB)
        if "lfq_pbar_kernel" in what or "lfq_bwd_kernel" in what:
            assert k["smem"] <= 41 * 1024, f"{what}: {k['smem']} B of shared memory"


def test_cuda_backend_is_declared_first_on_cuda_and_gated():
    from vqkernels.ops import lfq_entropy as op
    from vqkernels.ops._checks import KERNEL_DTYPES

    cap = _backend._spec("lfq_entropy").backends["cuda"]
    assert cap.devices == ("cuda",) and cap.needs == "_C.cuda"
    assert set(cap.dtypes) == set(KERNEL_DTYPES)
    assert set(cap.kernels) == {"lfq_entropy_fwd", "lfq_entropy_bwd"}
    assert _backend.PRIORITY["cuda"][0] == "cuda" and _backend._spec("lfq_entropy").priority is None
    assert _backend.gated("cuda", torch.device("cuda"), "auto")  # auto checks it once per device and dtype
    # the cuda wrappers hand float16/bfloat16 to the kernel as they are (no widened copy)
    assert op._FWD["cuda"] is op._fwd_cuda and op._BWD["cuda"] is op._bwd_cuda


@pytest.mark.skipif(not _cuda_extension_built(), reason="vqkernels._C was not built with CUDA kernels")
def test_cuda_lfq_entropy_is_registered_and_checks_its_arguments():
    for name in ("lfq_entropy_fwd", "lfq_entropy_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_C::{name}", "CUDA"), name
    assert not _backend._build_reason("_C.cuda", ("lfq_entropy_fwd", "lfq_entropy_bwd"))
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    c = torch.ops.vqkernels_C
    x = torch.randn(5, 1, 4)
    pbar = torch.full((1, 16), 1 / 16)
    one = torch.ones(())
    # The CUDA implementations themselves, given CPU tensors: their own checks answer, naming the op.
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_fwd: x must be a CUDA tensor"):
        c.lfq_entropy_fwd.default.redispatch(cuda_only, x, 2.0, 1e-5)
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_bwd: x must be a CUDA tensor"):
        c.lfq_entropy_bwd.default.redispatch(cuda_only, one, one, x, pbar, 2.0, 1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_bad_arguments_name_the_argument():
    c = torch.ops.vqkernels_C
    x = torch.randn(5, 1, 4, device="cuda")
    pbar = torch.full((1, 16), 1 / 16, device="cuda")
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_fwd: d must be in"):
        c.lfq_entropy_fwd(torch.randn(5, 1, 31, device="cuda"), 2.0, 1e-5)
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_fwd: x must be float32, float16 or bfloat16"):
        c.lfq_entropy_fwd(x.double(), 2.0, 1e-5)
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_fwd: scale must be finite"):
        c.lfq_entropy_fwd(x, float("inf"), 1e-5)
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_fwd: eps must be in"):
        c.lfq_entropy_fwd(x, 2.0, 2.0)
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_bwd: pbar must be"):
        c.lfq_entropy_bwd(one, one, x, pbar[:, :8], 2.0, 1e-5)
    with pytest.raises(RuntimeError, match="cuda lfq_entropy_bwd: grad_codebook must be a float32 scalar"):
        c.lfq_entropy_bwd(one, one.cpu(), x, pbar, 2.0, 1e-5)


def _both(x, scale, eps, backend, w=(0.7, -1.3)):
    xr = x.detach().clone().requires_grad_()
    ps, cb, pbar = lfq_entropy(xr, scale=scale, eps=eps, backend=backend, return_probs=True)
    (g,) = torch.autograd.grad(w[0] * ps + w[1] * cb, xr)
    return ps.detach(), cb.detach(), pbar, g


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,eps", [((5000, 1, 10), 1e-5), ((3000, 2, 13), 0.0), ((700, 1, 16), 0.0),
                                       ((257, 1, 18), 0.0), ((40, 3, 21), 0.0)])
def test_cuda_large_against_float64_reference(shape, eps):
    """Row splits (few tiles, many rows), several tiles of both halves, Z > 1, fixed bits of the tile index.
    eps = 0 where pbar lies near VQP's 1e-5 clamp (d >= 13 here): the clamp's step in d codebook / d pbar would
    turn a float32 rounding of one pbar across it into a gradient difference no tolerance should hide."""
    if not vqkernels._backend.has_cuda_kernels():
        pytest.skip("vqkernels._C was built without CUDA kernels")
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.4).cuda()
    got = _both(x, 5.0, eps, "cuda")
    want = _both(x.double(), 5.0, eps, "torch")
    for name, a, b in zip(("per_sample", "codebook", "pbar", "grad"), got, want):
        err = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))
        assert err <= 5e-5, f"{name}: relative error {err:.3g}"
    again = _both(x, 5.0, eps, "cuda")
    for a, b in zip(got, again):  # fixed grids, sums in fixed orders, no atomics
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_backward_needs_no_host_sync():
    if not vqkernels._backend.has_cuda_kernels():
        pytest.skip("vqkernels._C was built without CUDA kernels")
    c = torch.ops.vqkernels_C
    x = torch.randn(300, 2, 9, device="cuda") * 0.5
    ps, cb, pbar = c.lfq_entropy_fwd(x, 4.0, 1e-5)
    gps, gcb = torch.tensor(0.5, device="cuda"), torch.tensor(-2.0, device="cuda")
    want = c.lfq_entropy_bwd(gps, gcb, x, pbar, 4.0, 1e-5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as torch's graph docs do
        c.lfq_entropy_fwd(x, 4.0, 1e-5)
        c.lfq_entropy_bwd(gps, gcb, x, pbar, 4.0, 1e-5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = c.lfq_entropy_fwd(x, 4.0, 1e-5)
        g = c.lfq_entropy_bwd(gps, gcb, x, out[2], 4.0, 1e-5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], ps) and torch.equal(out[1], cb) and torch.equal(g, want)
    gcb.zero_()  # grad_codebook read on the device: 0 skips the codebook part at replay
    graph.replay()
    only_ps = c.lfq_entropy_bwd(gps, torch.zeros((), device="cuda"), x, pbar, 4.0, 1e-5)
    torch.cuda.synchronize()
    assert torch.equal(g, only_ps)
