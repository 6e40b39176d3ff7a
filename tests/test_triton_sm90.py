"""Compile every shipped Triton configuration of nearest_code and attention for sm_90 (H100) without a
GPU, and fail on any register spill.

What ships is what ``vqkernels.ops.nearest_code.triton.shipped_configs()`` lists: every (dtype, dot
precision, config) the launcher or its autotuner can launch, each at code dimensions D that select it
(D is a compile-time constant of the kernel). Each is compiled as the runtime would specialise it:
16-byte aligned pointers; N and K divisible by 16 when D is (the common case), not when D is odd.
Registers, stack (where spills go) and shared memory come from the cuobjdump bundled with Triton,
run on the cubin Triton produced (the exact ptxas flags Triton uses); a table is printed (``-s``).

The compiles run in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for the
interpreter-backed tests; this file must not depend on whether it is set), two at a time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_tools():
    """(cuobjdump path, None) or (None, reason to skip)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return None, f"triton is not importable ({e})"
    base = Path(triton.__file__).parent / "backends" / "nvidia"
    if not base.is_dir():
        return None, "triton has no nvidia backend here"
    cuobjdump = base / "bin" / "cuobjdump"
    ptxas = base / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        return None, f"triton's bundled ptxas is missing ({ptxas})"
    if not cuobjdump.exists():
        return None, f"triton's bundled cuobjdump is missing ({cuobjdump})"
    return str(cuobjdump), None


# What both children share: the set-up before their job lists, and the loop that compiles this worker's share of
# the jobs (name, fn, signature, constexprs, attrs, options), printing one JSON line of resource usage for each.
_CHILD_SETUP = textwrap.dedent(r'''
    import json, os, re, subprocess, sys, tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget

    cuobjdump, worker, nworkers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    target = GPUTarget("cuda", 90, 32)
''')
_CHILD_COMPILE = r'''
for j, (name, fn, sig, consts, attrs, options) in enumerate(jobs):
    if j % nworkers != worker:
        continue
    k = triton.compile(triton.compiler.ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=target, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    usage = {}
    for line in out.splitlines():
        if "REG:" in line:
            usage = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            break
    print(json.dumps({"name": name, "reg": usage.get("REG"), "stack": usage.get("STACK"),
                      "local": usage.get("LOCAL"), "shared": k.metadata.shared,
                      "wgmma": "wgmma" in k.asm["ptx"]}), flush=True)
'''


_CHILD = _CHILD_SETUP + textwrap.dedent(r'''
    from vqkernels.ops.nearest_code import triton as T

    def div16(idxs):
        return {(i,): [["tt.divisibility", 16]] for i in idxs}

    def fwd_job(dtype, prec, D, cfg, metric=0, use_split=False):
        t = PTR[dtype]
        sig = {"x_ptr": t, "c_ptr": t, "cnorm_ptr": "*fp32", "idx_ptr": "*i64", "dist_ptr": "*fp32",
               "part_best_ptr": "*fp32", "part_idx_ptr": "*i32", "N": "i32", "K": "i32",
               "tiles_per_split": "i32"}
        consts = dict(D=D, METRIC=metric, USE_SPLIT=use_split, PRECISION=prec, WIDEN=False, **cfg.meta())
        for k in consts:
            sig[k] = "constexpr"
        aligned = D % 16 == 0
        attrs = div16(range(9) if aligned else range(7))  # pointers always; N, K with an aligned D
        name = (f"fwd {str(dtype)[6:]:8s} {prec:4s} D={D:<4d} N,K%16={'0' if aligned else '?'} "
                f"metric={metric} split={int(use_split)} "
                f"blocks=({cfg.block_n},{cfg.block_k},{cfg.block_d}) warps={cfg.num_warps} "
                f"stages={cfg.num_stages}")
        if cfg.maxnreg is not None:
            name += f" maxnreg={cfg.maxnreg}"
        return name, T._nearest_code_fwd_kernel, sig, consts, attrs, cfg.options()

    jobs = []
    for dtype, prec, D, cfg in T.shipped_configs():
        jobs.append(fwd_job(dtype, prec, D, cfg))
    # The other epilogues (inner product; split-K partial stores) do a subset of the l2 epilogue's
    # work; compile them once each at the largest shipped tile to be sure.
    dtype, prec, D, cfg = max(T.shipped_configs(), key=lambda e: (e[3].block_d, e[2]))
    jobs.append(fwd_job(dtype, prec, D, cfg, metric=1))
    jobs.append(fwd_job(dtype, prec, D, cfg, metric=0, use_split=True))
    for kname, consts, warps, stages in T.aux_configs():
        fn = getattr(T, kname)
        sig = {}
        for a in fn.arg_names:
            if a in consts:
                sig[a] = "constexpr"
            elif a.endswith("idx_ptr"):
                sig[a] = "*i64" if a == "idx_ptr" else "*i32"
            elif a.endswith("_ptr"):
                sig[a] = "*fp32" if a in ("out_ptr", "dist_ptr", "part_best_ptr") else "*bf16"
            else:
                sig[a] = "i32"
        jobs.append((f"{kname} {consts} warps={warps} stages={stages}", fn, sig, consts, div16(
            i for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")), {"num_warps": warps, "num_stages": stages}))

''') + _CHILD_COMPILE


def _compile_report(child: str, what: str, width: int) -> list[dict]:
    """Run ``child`` on 2 worker processes (each compiles its share of the jobs for sm_90) and return their rows,
    sorted by name; skips without the NVIDIA tools, fails with the child's stderr when a compile fails."""
    cuobjdump, reason = _nvidia_tools()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    nworkers = 2
    procs = [subprocess.Popen([sys.executable, "-c", child, cuobjdump, str(w), str(nworkers)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(nworkers)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            pytest.fail(f"compiling {what} for sm_90 failed (exit {p.returncode}):\n{err[-4000:]}")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rows.sort(key=lambda r: r["name"])
    print(f"\n{what} at sm_90 (registers/thread, stack bytes, shared bytes):")
    for r in rows:
        print(f"  {r['name']:{width}s} reg={r['reg']:<4} stack={r['stack']:<4} local={r['local']:<4} "
              f"shared={r['shared']}")
    return rows


@pytest.fixture(scope="module")
def sm90_report():
    return _compile_report(_CHILD, "the nearest_code Triton kernels", 107)


def test_every_shipped_config_compiles_for_sm90(sm90_report):
    from vqkernels.ops.nearest_code import triton as T

    n_fwd = len(T.shipped_configs()) + 2
    assert len(sm90_report) == n_fwd + len(T.aux_configs())
    for r in sm90_report:
        assert r["reg"] is not None, f"no resource usage read for {r['name']}"


def test_no_register_spills_at_sm90(sm90_report):
    spilled = [r for r in sm90_report if r["stack"] or r["local"]]
    assert not spilled, "register spills (stack/local bytes per thread) at sm_90:\n" + "\n".join(
        f"  {r['name']}: reg={r['reg']} stack={r['stack']} local={r['local']}" for r in spilled)


def test_shared_memory_fits_h100(sm90_report):
    limit = 227 * 1024  # opt-in dynamic shared memory per block on H100
    over = [r for r in sm90_report if r["shared"] > limit]
    assert not over, "\n".join(f"  {r['name']}: shared={r['shared']} > {limit}" for r in over)


def test_half_precision_uses_tensor_cores(sm90_report):
    """fp16/bf16 and tf32 configs must lower tl.dot to wgmma (Hopper tensor cores)."""
    slow = [r["name"] for r in sm90_report if r["name"].startswith("fwd")
            and ("ieee" not in r["name"] or "float32" not in r["name"]) and not r["wgmma"]]
    assert not slow, "no wgmma in: " + ", ".join(slow)


# ---------------------------------------------------------------------------------------------
# Attention: every configuration ``vqkernels.ops.attention.triton.family`` can return, compiled as
# the runtime would specialise it (16-byte aligned pointers, strides divisible by 16: a contiguous or
# fused-qkv layout at the fast head dims; only the last dim is unit stride), plus the helper kernels.

_ATTN_CHILD = _CHILD_SETUP + textwrap.dedent(r'''
    from vqkernels.ops.attention import triton as A
    FP32_PTRS = ("lse_ptr", "delta_ptr", "part_o_ptr", "part_lse_ptr")
    KERNELS = {"fwd": A._attention_fwd_kernel, "bwd_dkdv": A._attention_bwd_dkdv_kernel,
               "bwd_dq": A._attention_bwd_dq_kernel, "decode": A._attention_decode_kernel,
               "decode_wide": A._attention_decode_kernel}

    def signature(fn, dtype, consts, head_dim):
        sig, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = ("*fp32" if a in FP32_PTRS else
                          "*i32" if a == "seqlens_ptr" else PTR[dtype])
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif a in ("scale", "qk_scale"):
                sig[a] = "fp32"
            else:
                sig[a] = "i32"
                if a.startswith("stride") and head_dim % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, attrs

    jobs = []
    for kern, dtype, hd, causal, cfg in A.shipped_configs():
        consts = dict(HEAD_DIM=hd, PRECISION="ieee", WIDEN=False, **cfg.meta(hd))
        if kern.startswith("decode"):
            consts["SPLIT"] = True  # the split epilogue; the direct one stores a subset
        else:
            consts["CAUSAL"] = causal
        fn = KERNELS[kern]
        sig, attrs = signature(fn, dtype, consts, hd)
        name = (f"{kern:11s} {str(dtype)[6:]:8s} Dh={hd:<3d} causal={int(causal)} "
                f"blocks=({cfg.block_m},{cfg.block_n}) warps={cfg.num_warps} stages={cfg.num_stages}")
        jobs.append((name, fn, sig, consts, attrs, cfg.options()))
    for kname, dtype, consts, warps, stages in A.aux_configs():
        fn = getattr(A, kname)
        sig, attrs = signature(fn, dtype, consts, consts["HEAD_DIM"])
        jobs.append((f"{kname} {str(dtype)[6:]} {consts} warps={warps}", fn, sig, consts, attrs,
                     {"num_warps": warps, "num_stages": stages}))

''') + _CHILD_COMPILE


@pytest.fixture(scope="module")
def attention_sm90_report():
    return _compile_report(_ATTN_CHILD, "the attention Triton kernels", 80)


def test_attention_every_config_compiles_for_sm90(attention_sm90_report):
    from vqkernels.ops.attention import triton as A

    assert len(attention_sm90_report) == len(A.shipped_configs()) + len(A.aux_configs())
    for r in attention_sm90_report:
        assert r["reg"] is not None, f"no resource usage read for {r['name']}"


def test_attention_shipped_configs_cover_family():
    """Every config the launcher can pick (for any dtype, any head dim) is one the test compiles."""
    import torch

    from vqkernels.ops.attention import triton as A

    def key(kern, dt, cfg):  # decode_wide is the decode kernel at other blocks
        return kern.replace("_wide", ""), dt in (torch.float16, torch.bfloat16), cfg

    compiled = {key(kern, dt, cfg) for kern, dt, _, _, cfg in A.shipped_configs()}
    missing = set()
    for kern in A.KERNELS:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for hd in range(A.MIN_HEAD_DIM, A.MAX_HEAD_DIM + 1):
                cfg = A.family(kern, dt, hd)
                if key(kern, dt, cfg) not in compiled:
                    missing.add((kern, str(dt), cfg))
    assert not missing, f"configs the launcher can run but the sm_90 test never compiles: {sorted(map(str, missing))}"


def test_attention_no_register_spills_at_sm90(attention_sm90_report):
    spilled = [r for r in attention_sm90_report if r["stack"] or r["local"]]
    assert not spilled, "register spills (stack/local bytes per thread) at sm_90:\n" + "\n".join(
        f"  {r['name']}: reg={r['reg']} stack={r['stack']} local={r['local']}" for r in spilled)


def test_attention_shared_memory_fits_h100(attention_sm90_report):
    limit = 227 * 1024
    over = [r for r in attention_sm90_report if r["shared"] > limit]
    assert not over, "\n".join(f"  {r['name']}: shared={r['shared']} > {limit}" for r in over)


def test_attention_half_precision_uses_wgmma(attention_sm90_report):
    """The half-precision forward and backward at the fast head dims (64, 128) run on Hopper's wgmma."""
    slow = [r["name"] for r in attention_sm90_report
            if r["name"].split()[0] in ("fwd", "bwd_dkdv", "bwd_dq") and "float32" not in r["name"]
            and ("Dh=64 " in r["name"] or "Dh=128" in r["name"]) and not r["wgmma"]]
    assert not slow, "no wgmma in: " + ", ".join(slow)


# ---------------------------------------------------------------------------------------------
# The index-range check of the Triton vq_loss / code_stats launchers on CUDA tensors (ops/_triton_index.py): a
# device-side assert, which Triton compiles in only in debug mode (the kernel is jitted with debug=True, which the
# runtime passes as this option). The interpreter never evaluates device_assert, so this is where it is checked.

_ASSERT_CHILD = _CHILD_SETUP + textwrap.dedent(r'''
    from vqkernels.ops import _triton_index as I
    fn = I._index_range_assert_kernel
    assert fn.debug, "the assert kernel must be jitted with debug=True, or its device_assert compiles to nothing"
    sig = {"idx_ptr": "*i64", "N": "i32", "K": "i32", "BLOCK": "constexpr"}
    for debug in (True, False):
        k = triton.compile(triton.compiler.ASTSource(fn, signature=sig, constexprs={"BLOCK": I.BLOCK},
                                                     attrs={(0,): [["tt.divisibility", 16]]}),
                           target=target, options={"num_warps": 4, "debug": debug})
        print(json.dumps({"debug": debug, "assert": "__assertfail" in k.asm["ptx"]}), flush=True)
''')


def test_index_range_assert_compiles_for_sm90_with_its_assert():
    cuobjdump, reason = _nvidia_tools()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", _ASSERT_CHILD, cuobjdump, "0", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = {row["debug"]: row["assert"] for row in map(json.loads, filter(None, r.stdout.splitlines()))}
    assert rows == {True: True, False: False}, rows  # the assert is there exactly when debug is on
