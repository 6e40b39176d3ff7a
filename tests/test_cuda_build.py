"""The CUDA kernels compile for sm_90 without register spills; runs on machines without a GPU.

Every csrc/cuda/*.cu is compiled by nvcc with the build's flags (setup.py's NVCC_FLAGS and
cpp_extension's common ones) for Hopper (sm_90) and `-Xptxas -v`.
The test fails when ptxas reports spill stores or loads for any kernel (local-memory traffic in a hot
loop), and prints registers, shared memory and stack per kernel (`pytest -s` shows the table).
It also checks that every expected kernel was compiled (nearest_code's, vq_loss's, attention's), and,
where vqkernels._C was built with CUDA, that the CUDA implementations of nearest_code, of the vq_loss
ops (vq_loss_fwd, vq_loss_bwd, code_stats, code_usage) and of the attention ops (attention_fwd,
attention_bwd, attention_decode) are registered and that their own argument checks answer a call with
CPU tensors.
"""
from __future__ import annotations

import ast
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read from its source (running setup.py would start a build)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no NVCC_FLAGS literal")


def nvcc_flags() -> list[str]:
    """The build's nvcc flags (setup.py's and cpp_extension's common ones), for sm_90 only, with -Xptxas -v.
    The C++ standard is left to nvcc's default: the .cu files include no torch headers."""
    from torch.utils import cpp_extension

    common = [f for f in getattr(cpp_extension, "COMMON_NVCC_FLAGS", []) if not f.startswith("-std")]
    flags = _setup_nvcc_flags() + [f for f in common if f not in _setup_nvcc_flags()]
    return flags + ["-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v", "-DVQKERNELS_WITH_CUDA"]


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in homes:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _skip_reason() -> str | None:
    if torch.version.cuda is None:
        return "this torch has no CUDA: the CUDA kernels are not built with it"
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME): the CUDA kernels cannot be compiled here"
    if not CUDA_SOURCES:
        return "no csrc/cuda/*.cu sources"
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:  # c++filt reads one name a line
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
        lines = out.splitlines()
        if len(lines) == len(names):
            return dict(zip(names, lines))
    except Exception:
        pass
    return {n: n for n in names}


def parse_ptxas(text: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled name: {registers, smem, stack, spill_stores, spill_loads}}."""
    res: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = res.setdefault(m.group(1), {"registers": None, "smem": 0, "stack": 0,
                                                  "spill_stores": 0, "spill_loads": 0})
            continue
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = res.setdefault(m.group(1), {"registers": None, "smem": 0, "stack": 0,
                                                  "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"] = int(m.group(1))
            current["spill_stores"] = int(m.group(2))
            current["spill_loads"] = int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return res


@functools.lru_cache(maxsize=None)
def compile_for_sm90(src: str) -> tuple[dict[str, dict], str]:
    """Compile one .cu to an object in a temporary folder; (ptxas report per function, nvcc log)."""
    from torch.utils import cpp_extension

    out_dir = tempfile.mkdtemp(prefix="vqk_cuda_build_")

    includes = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths()
    cmd = [_nvcc(), *nvcc_flags(), *[f"-I{p}" for p in includes], "-c", src,
           "-o", os.path.join(out_dir, os.path.basename(src) + ".o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    shutil.rmtree(out_dir, ignore_errors=True)
    assert proc.returncode == 0, f"nvcc failed on {os.path.relpath(src, ROOT)}:\n{log[-6000:]}"
    return parse_ptxas(log), log


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=[os.path.basename(s) for s in CUDA_SOURCES])
def test_cuda_source_compiles_for_sm90_without_spills(src):
    kernels, log = compile_for_sm90(src)
    assert kernels, f"ptxas reported no functions for {src}:\n{log[-3000:]}"
    names = _demangle(list(kernels))
    short = {m: n.replace("(anonymous namespace)::", "").split("(")[0] for m, n in names.items()}
    rows = []
    for mangled, k in sorted(kernels.items(), key=lambda kv: names[kv[0]]):
        rows.append(f"  {short[mangled]:<64} regs {k['registers']!s:>4}  smem {k['smem']:>6} B  "
                    f"stack {k['stack']:>4} B  spills {k['spill_stores']}/{k['spill_loads']} B")
    table = f"{os.path.relpath(src, ROOT)} at sm_90 (static smem only; dynamic smem is set at launch):\n" + \
        "\n".join(rows)
    print("\n" + table)
    spilling = [names[m] for m, k in kernels.items() if k["spill_stores"] or k["spill_loads"]]
    assert not spilling, "kernels spill registers to local memory:\n" + table


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_nearest_code_kernels_are_all_there():
    src = os.path.join(ROOT, "csrc", "cuda", "nearest_code_kernels.cu")
    if not os.path.exists(src):
        pytest.skip("csrc/cuda/nearest_code_kernels.cu is absent")
    kernels, _ = compile_for_sm90(src)
    names = " ".join(_demangle(list(kernels)).values())
    for kernel in ("nearest_code_tc_kernel<__half>", "nearest_code_tc_kernel<__nv_bfloat16>",
                   "nearest_code_tc_kernel<float>", "nearest_code_simt_f32_kernel", "row_sumsq_kernel"):
        assert kernel in names or kernel.split("<")[0] in names, f"{kernel} missing from {names}"
    # The tensor-core kernel is written for 2 CTAs of 128 threads per SM (__launch_bounds__(128, 2)).
    for mangled, k in kernels.items():
        if "nearest_code_tc_kernel" in mangled:
            assert k["registers"] is not None and k["registers"] <= 255


def _cuda_extension_built() -> bool:
    try:
        from vqkernels import _backend

        return _backend.c_extension() is not None and _backend.has_cuda_kernels()
    except Exception:
        return False


@pytest.mark.skipif(not _cuda_extension_built(), reason="vqkernels._C was not built with CUDA kernels")
def test_cuda_nearest_code_is_registered_and_checks_its_device():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vqkernels_C::nearest_code", "CUDA")
    op = torch.ops.vqkernels_C.nearest_code.default
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x, cb = torch.randn(5, 8), torch.randn(7, 8)
    # Call the CUDA implementation itself with CPU tensors: its own check must answer, clearly.
    with pytest.raises(RuntimeError, match="cuda nearest_code: x must be a CUDA tensor"):
        op.redispatch(cuda_only, x, cb, 0, False)
    with pytest.raises(RuntimeError, match="cuda nearest_code: x has D=8 but codebook has D=4"):
        op.redispatch(cuda_only, x, cb[:, :4].contiguous(), 0, False)


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_vq_loss_kernels_are_all_there():
    src = os.path.join(ROOT, "csrc", "cuda", "vq_loss_kernels.cu")
    if not os.path.exists(src):
        pytest.skip("csrc/cuda/vq_loss_kernels.cu is absent")
    kernels, _ = compile_for_sm90(src)
    names = " ".join(_demangle(list(kernels)).values())
    for dtype, vec in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)):
        for kernel in ("vq_loss_fwd_kernel", "vq_loss_bwd_kernel", "code_stats_sums_kernel"):
            for v in (1, vec):  # the scalar (any strides) and the 16-byte pack instantiations
                assert f"{kernel}<{dtype}, {v}>" in names, f"{kernel}<{dtype}, {v}> missing from {names}"
        assert f"grad_codebook_final_kernel<{dtype}>" in names
    for kernel in ("index_scan_kernel", "loss_final_kernel", "counts_to_float_kernel", "perplexity_kernel"):
        assert kernel in names, f"{kernel} missing from {names}"
    # Memory-bound kernels: few registers, so 2048 threads (8 CTAs of 256) fit on an SM.
    for mangled, k in kernels.items():
        assert k["registers"] is not None and k["registers"] <= 64, f"{mangled}: {k['registers']} registers"


@pytest.mark.skipif(not _cuda_extension_built(), reason="vqkernels._C was not built with CUDA kernels")
def test_cuda_vq_loss_ops_are_registered_and_check_their_device():
    ops = ("vq_loss_fwd", "vq_loss_bwd", "code_stats", "code_usage")
    missing = [op for op in ops if not hasattr(torch.ops.vqkernels_C, op)
               or not torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_C::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing} (rebuild the package)"
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    c = torch.ops.vqkernels_C
    z, cb, idx = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long)
    # Call the CUDA implementations themselves with CPU tensors: their own checks must answer.
    with pytest.raises(RuntimeError, match="cuda vq_loss_fwd: z must be a CUDA tensor"):
        c.vq_loss_fwd.default.redispatch(cuda_only, z, cb, idx, 1.0)
    with pytest.raises(RuntimeError, match="cuda vq_loss_bwd: z must be a CUDA tensor"):
        c.vq_loss_bwd.default.redispatch(cuda_only, z, torch.tensor(1.0), z, cb, idx, 1.0, 0.25, True, True)
    with pytest.raises(RuntimeError, match="cuda code_stats: z must be a CUDA tensor"):
        c.code_stats.default.redispatch(cuda_only, z, idx, 5)
    with pytest.raises(RuntimeError, match="cuda code_usage: indices must be a CUDA tensor"):
        c.code_usage.default.redispatch(cuda_only, idx, 5)


def test_nvcc_flags_come_from_setup_py():
    flags = _setup_nvcc_flags()
    assert "-O3" in flags and "--use_fast_math" in flags, flags
    assert all(f in nvcc_flags() for f in flags)


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_attention_kernels_are_all_there():
    src = os.path.join(ROOT, "csrc", "cuda", "attention_kernels.cu")
    if not os.path.exists(src):
        pytest.skip("csrc/cuda/attention_kernels.cu is absent")
    kernels, _ = compile_for_sm90(src)
    names = _demangle(list(kernels))
    flat = " ".join(names.values())
    # The tensor-core forward: float16 and bfloat16 at each instantiated head dim (others pad up).
    for dtype in ("__half", "__nv_bfloat16"):
        for d in (32, 64, 128, 256):
            assert f"attn_fwd_tc_kernel<{dtype}, {d}>" in flat, f"attn_fwd_tc_kernel<{dtype}, {d}> missing from {flat}"
    assert "attn_fwd_simt_kernel<float>" in flat
    for dtype in ("float", "__half", "__nv_bfloat16"):
        for kernel in ("attn_bwd_delta_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_decode_kernel",
                       "attn_decode_combine_kernel"):
            assert f"{kernel}<{dtype}>" in flat, f"{kernel}<{dtype}> missing from {flat}"
    for mangled, k in kernels.items():
        assert k["registers"] is not None and k["registers"] <= 255, f"{names[mangled]}: {k['registers']} registers"
        # The decoding kernels are memory-bound: few enough registers for 4 CTAs of 128 threads per SM.
        if "attn_decode_kernel" in names[mangled]:
            assert k["registers"] <= 128, f"{names[mangled]}: {k['registers']} registers"


@pytest.mark.skipif(not _cuda_extension_built(), reason="vqkernels._C was not built with CUDA kernels")
def test_cuda_attention_ops_are_registered_and_check_their_device():
    ops = ("attention_fwd", "attention_bwd", "attention_decode")
    missing = [op for op in ops if not hasattr(torch.ops.vqkernels_C, op)
               or not torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_C::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing} (rebuild the package)"
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    c = torch.ops.vqkernels_C
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    lse = torch.zeros(1, 4, 3)
    lens = torch.full((1,), 5, dtype=torch.int32)
    # Call the CUDA implementations themselves with CPU tensors: their own checks must answer.
    with pytest.raises(RuntimeError, match="cuda attention_fwd: q must be a CUDA tensor"):
        c.attention_fwd.default.redispatch(cuda_only, q, k, k, True, 0.25)
    with pytest.raises(RuntimeError, match="cuda attention_bwd: q must be a CUDA tensor"):
        c.attention_bwd.default.redispatch(cuda_only, q, q, k, k, q, lse, False, 0.25)
    with pytest.raises(RuntimeError, match="cuda attention_decode: q must be a CUDA tensor"):
        c.attention_decode.default.redispatch(cuda_only, q, k, k, lens, 0.25)
    # Through the dispatcher, CPU tensors go to the CPU kernel (where one is registered) or fail clearly;
    # bad arguments name the op either way.
    with pytest.raises((RuntimeError, NotImplementedError), match="attention_fwd"):
        c.attention_fwd(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), False, 0.25)  # H=4, Hkv=3
    with pytest.raises((RuntimeError, NotImplementedError), match="attention_fwd"):
        c.attention_fwd(q, k.to(torch.float16), k.to(torch.float16), False, 0.25)  # mixed dtypes
