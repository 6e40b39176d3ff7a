"""Which kernel runs: one module owns that choice.

Every op declares, as data, what each of its backends (``torch``, ``cpu``, ``triton``, ``cuda``) can
take (:func:`declare`, :class:`Capability`: devices, dtypes, what must be built, a limit over the op's
named arguments); the reasons a backend cannot take a given input (an empty list: it can) are derived
from that, in one place. The choice depends only on devices, dtypes, shapes, what was built and the
override -- never on tensor values, so a compiled graph stays valid.

The override, strongest first: the ``backend=`` argument of the functional API, the innermost
``use_backend(...)`` context, the ``VQKERNELS_BACKEND`` environment variable, else ``"auto"``.
``auto`` takes the first capable backend in the device's priority order. A named backend that cannot
take the input raises :class:`BackendNotSupported` listing its reasons: never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

# Fastest first, per device type. On CUDA the hand-written CUDA C++ kernel goes before Triton.
PRIORITY = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "triton", "torch"),  # triton only runs on CPU tensors under TRITON_INTERPRET=1
}
DEFAULT_PRIORITY = ("torch",)

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("vqkernels_backend", default=None)


class BackendNotSupported(RuntimeError):
    """A requested backend (or every backend, for ``auto``) cannot take the input."""


# --------------------------------------------------------------------------------------------
# Declarative capabilities: what a backend of an op can take, as data. The reasons a backend cannot
# run an input are derived from it (device, dtype, the build, Triton's state), plus an optional
# ``limit`` over the op's *named* arguments for what data alone cannot say (shape limits).

@dataclass(frozen=True)
class Capability:
    """What one backend of one op can take.

    devices: device types it runs on (``("cpu",)``, ``("cuda",)``), or ``None`` for any.
    dtypes: the dtypes of the op's primary tensor it takes, or ``None`` for any.
    needs: ``"_C.cpu"`` / ``"_C.cuda"`` (the built extension's CPU / CUDA kernels), ``"triton"``, or None.
    kernels: names of ``torch.ops.vqkernels_C`` ops that must exist in this build (an older build may lack them).
    limit: ``limit(**args) -> list[str]``: further reasons, over the op's named arguments.
    """

    devices: tuple | None = None
    dtypes: tuple | None = None
    needs: str | None = None
    kernels: tuple = ()
    limit: Callable[..., list] | None = None


@dataclass
class OpSpec:
    name: str
    primary: str  # the named argument whose device and dtype decide
    backends: dict  # backend name -> Capability
    probe: Callable | None = None  # probe(device: str, dtype) -> dict of small named example args (for `info`)
    # device type -> backends, fastest first, where the op differs from PRIORITY; or a function
    # priority(device_type, **args) -> such a tuple (or None: PRIORITY), for shape-dependent orders.
    # Shapes only, never values: a compiled graph's choice must stay valid.
    priority: dict | Callable | None = None
    # The implementation that runs where no declared backend can (e.g. "compose": an op built from
    # other ops, each of which selects its own backend); None: such input raises BackendNotSupported.
    fallback: str | None = None


_SPECS: dict[str, OpSpec] = {}


def declare(op: str, *, primary: str, probe: Callable | None = None, priority: dict | Callable | None = None,
            fallback: str | None = None, **backends: Capability) -> OpSpec:
    """Declare ``op``'s backends: ``declare("attention", primary="q", torch=Capability(...), cpu=...)``."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; expected one of {BACKENDS}")
    spec = OpSpec(op, primary, dict(backends), probe, priority, fallback)
    _SPECS[op] = spec
    return spec


def declared_ops() -> list[str]:
    """Every op with a declared backend table, in declaration order."""
    return list(_SPECS)


def _build_reason(needs: str | None, kernels: tuple) -> list[str]:
    """Why what ``needs`` names is missing from this build (the one place that says "_C not built")."""
    if needs not in ("_C.cpu", "_C.cuda"):
        return []
    err = c_extension_error()
    if err is not None:
        return [f"vqkernels._C was not built ({err})"]
    dispatch_key = "CPU" if needs == "_C.cpu" else "CUDA"
    if not (has_cpu_kernels() if needs == "_C.cpu" else has_cuda_kernels()):
        return [f"vqkernels._C was built without {dispatch_key} kernels"]
    missing = [k for k in kernels if not _has_c_kernel(k, dispatch_key)]
    if missing:
        return [f"this build of vqkernels._C has no {dispatch_key} kernel for {', '.join(missing)} "
                "(rebuild the package)"]
    return []


def _has_c_kernel(name: str, dispatch_key: str) -> bool:
    """Whether torch.ops.vqkernels_C.<name> exists and has a kernel for ``dispatch_key`` (cached; a constant
    under torch.compile, like the probes below, so selection traces without a graph break)."""
    key = ("c_kernel", name, dispatch_key)
    if key not in _PROBES:
        c_extension()
        try:
            _PROBES[key] = bool(hasattr(torch.ops.vqkernels_C, name)  # (an unknown op name raises in the query)
                                and torch._C._dispatch_has_kernel_for_dispatch_key(f"vqkernels_C::{name}",
                                                                                  dispatch_key))
        except Exception:
            _PROBES[key] = False
    return _PROBES[key]


_has_c_kernel._dynamo_marked_constant = True


def _spec_reasons(spec: OpSpec, backend: str, args: dict) -> list[str]:
    cap = spec.backends.get(backend)
    if cap is None:
        if spec.fallback:
            return [f"{spec.name} has no {backend} kernel of its own (it runs as {spec.fallback!r})"]
        return [f"{spec.name} has no {backend} implementation"]
    t = args.get(spec.primary)
    r: list[str] = []
    if isinstance(t, torch.Tensor):
        dev = t.device
        if cap.devices is not None and dev.type not in cap.devices:
            r.append(f"the {backend} kernel takes {'/'.join(d.upper() if d != 'cpu' else 'CPU' for d in cap.devices)} "
                     f"tensors, got {dev.type}")
        if cap.needs == "triton":
            r += triton_device_reasons(dev)
        if cap.dtypes is not None and t.dtype not in cap.dtypes:
            r.append(f"dtype {t.dtype} is not one of {', '.join(str(d) for d in cap.dtypes)}")
    r += _build_reason(cap.needs, cap.kernels)
    if cap.limit is not None and not r:
        r += list(cap.limit(**args))
    return r


def _check_name(name: str, what: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what} must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op in the block on ``name`` (or ``"auto"``), unless a call names its own ``backend=``."""
    token = _OVERRIDE.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for, by argument, context or environment; ``"auto"`` when none is."""
    if backend is not None:
        return _check_name(backend, "backend")
    ctx = _OVERRIDE.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("VQKERNELS_BACKEND")
    if env:
        return _check_name(env, "VQKERNELS_BACKEND")
    return "auto"


def _spec(op: str) -> OpSpec:
    spec = _SPECS.get(op)
    if spec is None:
        raise KeyError(f"no op named {op!r} is declared with the backend table (declared: {declared_ops()})")
    return spec


def not_supported_reasons(op: str, backend: str, **args) -> list[str]:
    """Why ``backend`` cannot run ``op`` on these inputs, passed by the names the op declares (empty: it can)."""
    return _spec_reasons(_spec(op), backend, args)


def select(op: str, backend: str | None, **args) -> str:
    """The backend that runs ``op`` on these (named) inputs, or :class:`BackendNotSupported` with reasons.

    Where the op declares a ``fallback`` (an implementation composed of other ops), that name comes
    back instead of an error."""
    want = requested_backend(backend)
    spec = _spec(op)
    fallback = spec.fallback
    if want != "auto":
        reasons = not_supported_reasons(op, want, **args)
        if reasons and fallback:
            return fallback
        if reasons:
            raise BackendNotSupported(
                f"backend {want!r} cannot run {op} on these inputs: " + "; ".join(reasons)
            )
        return want
    collected = []
    primary = args.get(spec.primary)
    dev = primary.device.type if isinstance(primary, torch.Tensor) else "cpu"
    if callable(spec.priority):
        order = spec.priority(dev, **args)
    else:
        order = (spec.priority or {}).get(dev)
    for b in order or PRIORITY.get(dev, DEFAULT_PRIORITY):
        reasons = not_supported_reasons(op, b, **args)
        if not reasons:
            return b
        collected.append(f"{b}: " + "; ".join(reasons))
    if fallback:
        return fallback
    raise BackendNotSupported(f"no backend can run {op} on these inputs -- " + " | ".join(collected))


def explain(op: str, **args) -> dict[str, list[str]]:
    """For every backend, the reasons it cannot run ``op`` on these inputs (empty list: it can)."""
    return {b: not_supported_reasons(op, b, **args) for b in BACKENDS}


# --------------------------------------------------------------------------------------------
# What this machine and this build have. Cached: none of it changes within a process, and none of
# it is queried at import time.

@functools.lru_cache(maxsize=None)
def c_extension():
    """The built ``vqkernels._C`` module, or None."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.vqkernels_C.*)
        return _C
    except Exception:
        return None


_PROBES: dict = {}


def _constant_under_compile(fn):
    """Cache a no-argument probe, and tell Dynamo its result is a constant not to trace into.

    Setting ``_dynamo_marked_constant`` is exactly what ``torch.compiler.assume_constant_result``
    does, without its import of torch._dynamo (which imports triton and costs a second), so
    ``import vqkernels`` stays cheap. (Not functools.lru_cache: Dynamo warns on it.)
    """

    @functools.wraps(fn)
    def probe():
        if fn.__name__ not in _PROBES:
            _PROBES[fn.__name__] = fn()
        return _PROBES[fn.__name__]

    probe._dynamo_marked_constant = True
    return probe


@_constant_under_compile
def c_extension_error() -> str | None:
    try:
        from . import _C  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    m = c_extension()
    if m is None:
        return {"cpu": False, "cuda": False}
    return dict(m.build_info())


@_constant_under_compile
def has_cpu_kernels() -> bool:
    return bool(build_info().get("cpu"))


@_constant_under_compile
def has_cuda_kernels() -> bool:
    return bool(build_info().get("cuda"))


@_constant_under_compile
def cpu_has_avx512() -> bool:
    """Whether the C++ CPU kernels run their AVX-512 paths on this processor (False without _C)."""
    m = c_extension()
    return m is not None and bool(getattr(m, "cpu_features", dict)().get("avx512", False))


@_constant_under_compile
def cpu_has_bf16_gemm() -> bool:
    """Whether bfloat16 GEMMs are fast here for the C++ kernels: MKL's bfloat16 GEMM is in the process and the
    processor has AMX-BF16 tiles (False without _C, or under VQKERNELS_CPU_NO_AMX=1 at first call)."""
    m = c_extension()
    f = getattr(m, "cpu_features", dict)() if m is not None else {}
    return bool(f.get("amx_bf16", False) and f.get("mkl_bf16_gemm", False))


def triton_interpreter() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET set and not "0"): the one place it is parsed."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_constant_under_compile
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def triton_device_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on ``device`` here (empty: it can).

    The device and TRITON_INTERPRET decide first: triton is imported (~65 ms and its own imports)
    only where it could run, never to turn down a CPU tensor outside the interpreter."""
    if device.type == "cuda":
        if triton_interpreter():
            return ["TRITON_INTERPRET=1 is set: Triton runs on CPU tensors only"]
    elif device.type == "cpu":
        if not triton_interpreter():
            return ["Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"]
    else:
        return [f"Triton does not run on {device.type} tensors"]
    err = triton_import_error()
    if err is not None:
        return [f"triton is not importable ({err})"]
    return []


# The output buffers a kernel fills live with the shared argument checks (re-exported: every op and
# the attention ops call ``_backend.new_output``).
from .ops._checks import new_output, poison_outputs  # noqa: E402,F401
