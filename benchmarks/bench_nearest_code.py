"""pytest-benchmark module for ``nearest_code``: every provider x size, the same providers as the runner.

    pytest benchmarks/ --benchmark-only                     # small sizes: a minute or two on 2 CPU cores
    VQKERNELS_BENCH_SIZES=suite pytest benchmarks/ --benchmark-only    # the runner's default sizes
    VQKERNELS_BENCH_SIZES=65536x8192x64,taming VQKERNELS_BENCH_DTYPES=fp32,bf16 pytest benchmarks/ ...
    pytest benchmarks/ --benchmark-only --benchmark-save=mine   # then --benchmark-compare against it

Environment:
    VQKERNELS_BENCH_SIZES    small (default) | suite | a comma list of NxKxD or named sizes
    VQKERNELS_BENCH_DTYPES   fp32 (default) | a comma list of fp32, bf16, fp16
    VQKERNELS_BENCH_DEVICE   auto (default: cuda when present) | cpu | cuda
    VQKERNELS_BENCH_THREADS  CPU threads for torch and FAISS (default: every usable core)

Each benchmark stores in ``extra_info``: GFLOP/s and vectors/s (from the median), the peak extra
memory of one call (CUDA: max_memory_allocated above the inputs; CPU: VmHWM above VmRSS, in this
process -- for exact CPU peaks use the runner, which isolates every measurement in a subprocess),
and the fraction of rows answered correctly against the torch reference. CUDA calls synchronise
the device inside the timed function. Unavailable providers are skipped with their reason. For the
stamped CSV/JSON/plot of a full run, use ``vqkernels bench`` (``benchmarks/run.py``).
"""
from __future__ import annotations

import os

import pytest
import torch

from vqkernels.bench import nearest_code as nc
from vqkernels.bench.runner import _parse_size

from _common import bench_device, measured_call, rounds, set_bench_threads, skip_over_memory_cap, synchronized

# Small enough for 2 CPU cores, shaped like the real ones (taming's size is small already).
SMALL = [nc.SIZES["taming"], nc.Size(4096, 4096, 8, "LlamaGen-like, small"), nc.Size(8192, 2048, 64, "small D=64")]


def _cases():
    device = bench_device()
    sizes_env = os.environ.get("VQKERNELS_BENCH_SIZES", "small").strip()
    dtypes = [d for d in os.environ.get("VQKERNELS_BENCH_DTYPES", "fp32").split(",") if d]
    provs = nc.CUDA_PROVIDERS if device == "cuda" else nc.CPU_PROVIDERS
    if sizes_env == "suite":
        return [(c.size, c.dtype, p) for c in nc.default_cases(device) if c.dtype in dtypes for p in c.providers]
    sizes = SMALL if sizes_env == "small" else [_parse_size(nc, s) for s in sizes_env.split(",") if s]
    return [(s, d, p) for s in sizes for d in dtypes for p in provs]


DEVICE = bench_device()
CASES = _cases()
_REF = {}  # reference indices per input, shared by the providers of one size


@pytest.mark.parametrize(
    "size,dtype,provider", CASES, ids=[f"{p}-{s.label}-{d}" for s, d, p in CASES]
)
def test_nearest_code(benchmark, size, dtype, provider):
    prov = nc.PROVIDERS[provider]
    device = prov.data_device or DEVICE
    N, K, D = size.N, size.K, size.D
    reasons = prov.reasons(N, K, D, dtype, device)
    if reasons:
        pytest.skip("; ".join(reasons))
    skip_over_memory_cap(nc.nk_bytes(prov, N, K, dtype), device)
    set_bench_threads()
    benchmark.group = f"nearest_code {size.label} {dtype}"

    x, cb = nc.make_inputs(N, K, D, dtype, device, seed=0)
    fn = prov.build(x, cb)
    call = synchronized(fn, device)

    # One untimed call for the peak memory and the correctness check; it also warms the provider.
    out, peak, mem_method = measured_call(call, device)
    correct = None
    if prov.returns_indices:
        key = (N, K, D, dtype, device)
        if key not in _REF:
            _REF[key] = nc.reference_indices(x, cb)
        correct = nc.correct_fraction(x, cb, out, _REF[key])
    del out

    benchmark.pedantic(call, rounds=rounds(), warmup_rounds=1, iterations=1)

    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider=provider, kind=prov.kind, device=device, N=N, K=K, D=D, dtype=dtype,
        threads=torch.get_num_threads(), gflops=nc.flops(N, K, D) / median / 1e9, vectors_per_s=N / median,
        peak_mem_bytes=peak, mem_method=mem_method, correct_frac=correct,
    )
    if correct is not None:
        assert correct > 0.99 or dtype != "fp32", f"{provider} answered only {correct:.4f} of the rows correctly"
