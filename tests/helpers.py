"""What every op's tests share: which device a backend's test runs on, and skipping with reasons."""
import pytest
import torch

from vqkernels import _backend

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = _backend.triton_interpreter()
BACKENDS = ["torch", "cpu", "triton", "cuda"]


def device_for(backend: str) -> str:
    """The device a test of ``backend`` runs on here (skips the cuda backend without a GPU)."""
    if backend == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU (the cuda backend runs on CUDA tensors only)")
        return "cuda"
    if backend == "cpu":
        return "cpu"
    if backend == "triton":
        return "cpu" if INTERPRETED or not HAS_CUDA else "cuda"
    return "cuda" if HAS_CUDA else "cpu"


def require(op: str, backend: str, **args):
    """Skip, with the dispatcher's reasons, when ``backend`` cannot run ``op`` on these (named) arguments here."""
    reasons = _backend.not_supported_reasons(op, backend, **args)
    if reasons:
        pytest.skip(f"{backend} cannot run {op} here: " + "; ".join(reasons))


def with_threads(fn, threads=(1, 2)):
    """[fn() under torch.set_num_threads(t) for t in threads], restoring the thread count after."""
    old = torch.get_num_threads()
    try:
        out = []
        for t in threads:
            torch.set_num_threads(t)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(old)
