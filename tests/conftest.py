"""Test setup: run the Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before vqkernels' Triton
modules are imported, so it is set here at collection time. VQKERNELS_SELFCHECK=never keeps the
self-check gate out of the kernel tests (test_selftest.py tests it). VQKERNELS_POISON_OUTPUTS makes every
backend fill its outputs with poison before the kernel writes them, so a kernel that leaves an
element unwritten fails instead of returning a stale (correct-looking) buffer.
"""
import os

import torch


def _has_cuda() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VQKERNELS_POISON_OUTPUTS", "1")
os.environ.pop("VQKERNELS_BACKEND", None)
# The self-check gate stays out of the kernel tests (they test each kernel themselves, and a gate's
# BackendNotSupported would hide a kernel's own failure); tests/test_selftest.py turns it on where it tests it.
# Nothing a test runs writes the user's ~/.cache.
os.environ["VQKERNELS_SELFCHECK"] = "never"
if "VQKERNELS_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["VQKERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="vqkernels-test-cache-")
