"""Compile every lfq_entropy Triton launch (``vqkernels.ops.lfq_entropy.triton.shipped_configs()``) for sm_90 (H100)
without a GPU, and fail on any register spill or on shared memory past an H100's. The machinery (the compile
children, the resource report) is tests/test_triton_sm90.py's."""
from __future__ import annotations

import textwrap

import pytest

from test_triton_sm90 import _CHILD_COMPILE, _CHILD_SETUP, _compile_report

_LFQ_CHILD = _CHILD_SETUP + textwrap.dedent(r'''
    from vqkernels.ops.lfq_entropy import triton as T
    FLOATS = ("scale", "eps", "inv_n", "gps", "neg_log_eps", "w")
    jobs = []
    for kname, consts, warps, stages in T.shipped_configs():
        fn = getattr(T, kname)
        sig, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif a in FLOATS:
                sig[a] = "fp32"
            else:
                sig[a] = "i32"
        jobs.append((f"{kname} {consts}", fn, sig, consts, attrs, {"num_warps": warps, "num_stages": stages}))

''') + _CHILD_COMPILE


@pytest.fixture(scope="module")
def lfq_sm90_report():
    return _compile_report(_LFQ_CHILD, "the lfq_entropy Triton kernels", 150)


def test_lfq_every_config_compiles_for_sm90(lfq_sm90_report):
    from vqkernels.ops.lfq_entropy import triton as T

    assert len(lfq_sm90_report) == len(T.shipped_configs())
    for r in lfq_sm90_report:
        assert r["reg"] is not None, f"no resource usage read for {r['name']}"


def test_lfq_no_register_spills_at_sm90(lfq_sm90_report):
    spilled = [r for r in lfq_sm90_report if r["stack"] or r["local"]]
    assert not spilled, "register spills at sm_90:\n" + "\n".join(
        f"  {r['name']}: reg={r['reg']} stack={r['stack']} local={r['local']}" for r in spilled)


def test_lfq_shared_memory_fits_h100(lfq_sm90_report):
    over = [r for r in lfq_sm90_report if r["shared"] > 227 * 1024]
    assert not over, "\n".join(f"  {r['name']}: shared={r['shared']}" for r in over)
