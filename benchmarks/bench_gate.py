"""What the self-check gate costs a call after its first one: backend selection with the gate on and off.

    pytest benchmarks/bench_gate.py --benchmark-only [--benchmark-json out.json]

Self-contained pytest-benchmark (no harness): each case times ``vqkernels._backend.select`` for one op on small
CPU tensors (the choice depends on shapes and devices, not on sizes), once with ``VQKERNELS_SELFCHECK=never``
(no gate) and once with ``always`` after the backend passed its check (the steady state: one dictionary lookup),
and the gate's lookup alone. Under ``auto`` on a GPU the steady state is the same lookup. The check itself (the
first call) is not timed here: ``vqkernels selftest`` prints its seconds per op, backend and dtype.
"""
import os

import pytest
import torch

import vqkernels  # noqa: F401  (declares every op)
from vqkernels import _backend
from vqkernels.ops import attention as att
from vqkernels.ops import nearest_code as nc

CASES = {
    "nearest_code": (nc.OP, lambda: dict(x=torch.randn(16, 64), codebook=torch.randn(32, 64), metric=0,
                                         allow_tf32=False)),
    "attention": (att.OP, lambda: dict(q=torch.randn(1, 2, 3, 64), k=torch.randn(1, 1, 3, 64),
                                       v=torch.randn(1, 1, 3, 64), causal=True, scale=0.125)),
}


@pytest.fixture
def mode(tmp_path):
    """Set VQKERNELS_SELFCHECK for one benchmark (a fresh gate, its cache in tmp_path)."""
    saved = {k: os.environ.get(k) for k in ("VQKERNELS_SELFCHECK", "VQKERNELS_CACHE_DIR")}
    os.environ["VQKERNELS_CACHE_DIR"] = str(tmp_path)

    def set_mode(m):
        os.environ["VQKERNELS_SELFCHECK"] = m
        _backend.reset_selfcheck()

    yield set_mode
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _backend.reset_selfcheck()


def _info(benchmark, op, backend, gate):
    benchmark.extra_info.update(op=op, backend=backend, gate=gate, threads=torch.get_num_threads(),
                                device=_backend.device_identity(torch.device("cpu")), torch=torch.__version__)


@pytest.mark.parametrize("gate", ["never", "always"])
@pytest.mark.parametrize("case", list(CASES))
def test_select(benchmark, mode, case, gate):
    op, make = CASES[case]
    args = make()
    mode(gate)
    backend = _backend.select(op, None, **args)  # the first call: the check runs here under "always"
    if gate == "always" and backend != "torch":
        assert _backend.selfcheck_results(), "the gate did not check the backend"
    benchmark.group = f"select {case}"
    _info(benchmark, op, backend, gate)
    assert benchmark(_backend.select, op, None, **args) == backend


@pytest.mark.parametrize("case", list(CASES))
def test_gate_lookup(benchmark, mode, case):
    """The gate alone, after its check: what ``auto`` adds to a call on a GPU backend."""
    op, make = CASES[case]
    args = make()
    mode("always")
    backend = _backend.select(op, None, **args)
    primary = args[_backend._SPECS[op].primary]
    benchmark.group = "gate lookup"
    _info(benchmark, op, backend, "always")
    assert benchmark(_backend._gate, op, backend, primary) == ""
