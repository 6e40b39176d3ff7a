"""pytest plugin (``-p hide_peers``, with tests/plugins on PYTHONPATH): run as if the peer packages were absent.

The GPU image has none of the packages the tests and benchmarks compare against (taming-transformers,
vector-quantize-pytorch, FAISS, Hugging Face transformers, lpips) and cannot download them. A test that
needs a peer must skip there, not fail, and must not stop the files after it. `scripts/gpu_check.sh
--rehearse STAGE` runs a stage's selection with this plugin so CI catches such a test on the CPU.

A ``None`` entry in sys.modules makes ``import name`` raise ModuleNotFoundError and
``importlib.util.find_spec(name)`` return None, exactly as for a package that is not installed.

With ``VQK_PEERS=broken`` the peers are there but broken instead: found (``find_spec`` gives a spec) and their
import raises a plain ImportError, as a wheel built for another numpy or a missing shared library does. The
comparisons must then skip (tests/conftest.py), never error.
"""
import importlib.abc
import importlib.machinery
import os
import sys


class _BrokenLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"{module.__name__}: simulated broken install (hide_peers with VQK_PEERS=broken)")


class _BrokenPeers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in PEERS:
            return importlib.machinery.ModuleSpec(fullname, _BrokenLoader(), is_package=True)
        return None

PEERS = ("taming", "vector_quantize_pytorch", "faiss", "transformers", "lpips", "lpips_jax")


def pytest_configure(config):
    broken = os.environ.get("VQK_PEERS") == "broken"
    for name in PEERS:
        if name in sys.modules and sys.modules[name] is not None:
            raise RuntimeError(f"hide_peers: {name} was imported before the plugin loaded")
        if not broken:
            sys.modules[name] = None
    if broken:
        sys.meta_path.insert(0, _BrokenPeers())
