"""pytest-benchmark module for a quantizer training step: every provider x size, the same providers as the runner.

    pytest benchmarks/bench_quantizer.py --benchmark-only                   # small sizes: about a minute on 2 cores
    VQKERNELS_BENCH_SIZES=suite pytest benchmarks/bench_quantizer.py --benchmark-only   # the runner's default sizes
    VQKERNELS_BENCH_SIZES=12288x1024x256 pytest benchmarks/ -k quantizer --benchmark-only

One call = forward + backward of the quantizer module (and its EMA update, inside the forward in training
mode), gradients cleared first; see :mod:`vqkernels.bench.quantizer`. Environment as for
``bench_nearest_code.py``: VQKERNELS_BENCH_SIZES (small | suite | NxKxD or named sizes, comma-separated),
VQKERNELS_BENCH_DEVICE, VQKERNELS_BENCH_THREADS, VQKERNELS_BENCH_ROUNDS (5).

``extra_info``: tokens/s (from the median), the peak extra memory of one step (CUDA: max_memory_allocated
above the inputs; CPU: VmHWM above VmRSS in this process -- use the runner, ``vqkernels bench --ops
quantizer``, for exact CPU peaks), the fraction of indices equal to taming's on the same codebook and
input, and the loss value.
"""
from __future__ import annotations

import os

import pytest
import torch

from vqkernels.bench import quantizer as q
from vqkernels.bench.runner import _parse_size

from _common import bench_device, measured_call, rounds, set_bench_threads, skip_over_memory_cap, synchronized

# Small enough for 2 CPU cores, shaped like the suite's (tokens on 16 x 16 grids).
SMALL = [q.Size(3072, 1024, 256, "taming-like, 12 images"), q.Size(4096, 4096, 8, "LlamaGen-like, small")]


def _cases():
    device = bench_device()
    sizes_env = os.environ.get("VQKERNELS_BENCH_SIZES", "small").strip()
    provs = q.CUDA_PROVIDERS if device == "cuda" else q.CPU_PROVIDERS
    if sizes_env == "suite":
        return [(c.size, p) for c in q.default_cases(device) for p in c.providers]
    sizes = SMALL if sizes_env == "small" else [_parse_size(q, s) for s in sizes_env.split(",") if s]
    return [(s, p) for s in sizes for p in provs]


DEVICE = bench_device()
CASES = _cases()
_REF = {}  # taming's indices per input, shared by the providers of one size


@pytest.mark.parametrize("size,provider", CASES, ids=[f"{p}-{s.label}" for s, p in CASES])
def test_quantizer_step(benchmark, size, provider):
    prov = q.PROVIDERS[provider]
    device = DEVICE
    N, K, D = size.N, size.K, size.D
    reasons = prov.reasons(N, K, D, "fp32", device)
    if reasons:
        pytest.skip("; ".join(reasons))
    skip_over_memory_cap(q.nk_bytes(prov, N, K, "fp32"), device)
    set_bench_threads()
    benchmark.group = f"quantizer step {size.label}"

    # A tiny step first (loads lazy libraries, starts the thread pools), so the memory reading sees the step alone.
    prov.build(*q.make_inputs(min(N, 64), min(K, 64), D, "fp32", device, seed=1))()
    x, cb = q.make_inputs(N, K, D, "fp32", device, seed=0)
    fn = prov.build(x, cb)
    call = synchronized(fn, device)

    # One untimed step for the peak memory; it also warms the provider.
    out, peak, mem_method = measured_call(call, device)
    del out

    benchmark.pedantic(call, rounds=rounds(), warmup_rounds=1, iterations=1)

    # Correctness on the initial codebook, by a fresh module (the EMA variants moved theirs while timed).
    idx, loss = prov.build(x, cb)()
    key = (N, K, D, device)
    if provider == q.REFERENCE_PROVIDER:
        _REF[key] = idx
    elif key not in _REF:
        _REF[key] = q.reference_indices(x, cb)
    match = q.correct_fraction(x, cb, idx, _REF[key])

    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        provider=provider, kind=prov.kind, device=device, N=N, K=K, D=D, dtype="fp32",
        threads=torch.get_num_threads(), tokens_per_s=N / median, peak_mem_bytes=peak, mem_method=mem_method,
        index_match_vs_taming=match, loss=float(loss),
    )
    assert match > 0.99, f"{provider} chose taming's code for only {match:.4f} of the tokens"
