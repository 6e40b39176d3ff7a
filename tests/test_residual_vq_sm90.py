"""Compile every shipped Triton configuration of residual_vq (``vqkernels.ops.residual_vq.triton.shipped_configs``)
for sm_90 (H100) without a GPU, and fail on any register spill (the style and machinery of test_triton_sm90.py:
triton.compile for GPUTarget("cuda", 90, 32) in 2 subprocesses without TRITON_INTERPRET, the bundled cuobjdump
for registers / stack / local bytes)."""
from __future__ import annotations

import textwrap

from test_triton_sm90 import _CHILD_COMPILE, _CHILD_SETUP, _compile_report

import pytest

_CHILD = _CHILD_SETUP + textwrap.dedent(r'''
    from vqkernels.ops.residual_vq import triton as T

    FNS = {"fwd": T._residual_vq_fwd_kernel, "bwd": T._residual_vq_bwd_kernel}
    jobs = []
    for cfg in T.shipped_configs():
        cfg = dict(cfg)
        kname, warps = cfg.pop("kernel"), cfg.pop("num_warps")
        fn = FNS[kname]
        for D in (cfg["BLOCK_D"],):  # one D per block width (masks compile alike; compiles are slow on 2 cores)
            consts = dict(cfg, D=D)
            if kname == "fwd":
                consts["NEED_STATS"] = True
            else:
                consts["ROTATION"] = True
            sig, attrs = {}, {}
            for i, a in enumerate(fn.arg_names):
                if a in consts:
                    sig[a] = "constexpr"
                elif a == "idx_ptr":
                    sig[a] = "*i64"
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif a.endswith("_ptr"):
                    sig[a] = "*fp32"
                    attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    sig[a] = "i32"
            name = f"{kname} D={D:<4d} " + " ".join(f"{k}={v}" for k, v in sorted(cfg.items())) + f" warps={warps}"
            jobs.append((name, fn, sig, consts, attrs, {"num_warps": warps, "num_stages": 2}))
''') + _CHILD_COMPILE


@pytest.fixture(scope="module")
def sm90_report():
    return _compile_report(_CHILD, "the residual_vq Triton kernels", 70)


def test_every_shipped_config_compiles_for_sm90(sm90_report):
    from vqkernels.ops.residual_vq import triton as T

    assert len(sm90_report) >= len(T.shipped_configs())
    for r in sm90_report:
        assert r["reg"] is not None, f"no resource usage read for {r['name']}"


def test_no_register_spills_at_sm90(sm90_report):
    spilled = [r for r in sm90_report if r["stack"] or r["local"]]
    assert not spilled, "register spills (stack/local bytes per thread) at sm_90:\n" + "\n".join(
        f"  {r['name']}: reg={r['reg']} stack={r['stack']} local={r['local']}" for r in spilled)
