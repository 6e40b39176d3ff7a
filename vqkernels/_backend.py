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

The self-check gate (``VQKERNELS_SELFCHECK=auto|always|never``, default ``auto``): a kernel serves a call only
after it matched the reference on this device (:mod:`vqkernels.selftest`'s cases for the op, in that dtype).
Under ``auto`` the GPU kernels (``triton``, ``cuda``) on CUDA tensors are checked; ``always`` checks every
backend but ``torch`` (the reference itself), CPU ones too; ``never`` checks nothing. The check runs once per
(op, backend, device, dtype) on the first eager call that would use it, before it serves that call; a pass is
remembered in the process and in ``~/.cache/vqkernels/selfcheck.json`` (keyed by the package version, a hash
of the build and of the kernels' sources, torch, CUDA, the driver and the device's name and capability), so a
later process skips it. After that the gate costs a dictionary lookup. A backend that failed is skipped by
``auto`` (one warning naming op, backend, device, dtype and the error) and raises
:class:`BackendNotSupported` when named. No check runs while ``torch.compile`` traces or a CUDA graph is
captured: the remembered result is used, and a kernel never checked yet serves unverified with one warning
(a compiled graph keeps the backend it traced, so turning to a slower one there would last as long as the
graph); run ``vqkernels selftest`` or one eager call first to have it checked.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# ``sdpa``: PyTorch's own scaled_dot_product_attention made to compute our function (attention ops only).
BACKENDS = ("torch", "cpu", "triton", "cuda", "sdpa")
# The backends whose kernels are ours and run on a GPU: the ones the self-check gate checks under ``auto``.
GPU_BACKENDS = ("triton", "cuda")

# Fastest first, per device type. On CUDA the hand-written CUDA C++ kernel goes before Triton, then
# PyTorch's SDPA where an op declares it (attention), then the reference.
PRIORITY = {
    "cuda": ("cuda", "triton", "sdpa", "torch"),
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
    back instead of an error. A backend that failed its self-check is passed over by ``auto`` and raises
    when named (see the module's docstring)."""
    want = requested_backend(backend)
    spec = _spec(op)
    fallback = spec.fallback
    primary = args.get(spec.primary)
    if want != "auto":
        reasons = not_supported_reasons(op, want, **args)
        if reasons and fallback:
            return fallback
        if reasons:
            raise BackendNotSupported(
                f"backend {want!r} cannot run {op} on these inputs: " + "; ".join(reasons)
            )
        failed = _gate(op, want, primary)
        if failed:
            raise BackendNotSupported(f"backend {want!r} cannot run {op} on these inputs: {failed}")
        return want
    collected = []
    dev = primary.device.type if isinstance(primary, torch.Tensor) else "cpu"
    if callable(spec.priority):
        order = spec.priority(dev, **args)
    else:
        order = (spec.priority or {}).get(dev)
    for b in order or PRIORITY.get(dev, DEFAULT_PRIORITY):
        reasons = not_supported_reasons(op, b, **args)
        if not reasons:
            failed = _gate(op, b, primary)
            if not failed:
                return b
            reasons = [failed]
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


# --------------------------------------------------------------------------------------------
# The self-check gate (see the module's docstring). The first call that would use a gated
# (op, backend, device, dtype) runs vqkernels.selftest's cases for the op on that backend and device in that
# dtype; after that, select() pays one dictionary lookup (_VERDICTS; benchmarks/bench_gate.py measures it).

SELFCHECK_MODES = ("auto", "always", "never")
CACHE_FORMAT = 1
# (op, backend, torch.device, dtype) -> "" (may serve: passed, or not gated) or why it may not (it failed).
_VERDICTS: dict = {}
# The same keys -> what info() reports: {"status": "passed"|"failed"|"unchecked", "detail", "device", "source"}.
_RESULTS: dict = {}
_WARNED: set = set()
_STATE: dict = {}  # "mode", "fingerprint", "disk" (the cache file's passes): read once per process
# The keys whose check ran in this process, in order (tests and the benchmark read it).
CHECKS_RUN: list = []
# "check": a check is running (it names its backends; nothing gates); "report": info() asks what auto would pick
# (failed backends are passed over, no new check runs).
_CHECKING: contextvars.ContextVar[str] = contextvars.ContextVar("vqkernels_selfcheck_running", default="")


class SelfCheckCacheWarning(UserWarning):
    """The self-check cache file could not be read (it is then ignored) or written."""


class SelfCheckFailed(RuntimeWarning):
    """A kernel did not match the reference on this device: ``auto`` passes it over."""


def selfcheck_mode() -> str:
    """VQKERNELS_SELFCHECK, read once per process (``reset_selfcheck()`` reads it again)."""
    mode = _STATE.get("mode")
    if mode is None:
        mode = os.environ.get("VQKERNELS_SELFCHECK", "auto").strip().lower() or "auto"
        if mode not in SELFCHECK_MODES:
            raise ValueError(f"VQKERNELS_SELFCHECK must be one of {SELFCHECK_MODES}, got {mode!r}")
        _STATE["mode"] = mode
    return mode


def reset_selfcheck() -> None:
    """Forget every verdict, the mode and the cache file's contents read in this process (tests)."""
    _VERDICTS.clear()
    _RESULTS.clear()
    _WARNED.clear()
    _STATE.clear()


@contextlib.contextmanager
def selfcheck_running(what: str = "check") -> Iterator[None]:
    """``"check"``: the block runs checks itself (vqkernels.selftest), selection inside it does not gate.
    ``"report"``: the block only reports choices (info): failed backends are passed over, no check runs."""
    token = _CHECKING.set(what)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def gated(backend: str, device: torch.device, mode: str | None = None) -> bool:
    """Whether ``backend`` must pass its self-check before it serves on ``device`` under ``mode``."""
    mode = mode or selfcheck_mode()
    if backend == "torch" or mode == "never":
        return False
    return mode == "always" or (device.type == "cuda" and backend in GPU_BACKENDS)


def _gate(op: str, backend: str, primary) -> str:
    """"" when ``backend`` may serve ``op`` on the primary tensor's device and dtype; else why it may not."""
    if not isinstance(primary, torch.Tensor):
        return ""
    if torch.compiler.is_compiling():  # (Dynamo: _verdict is a constant it calls, never traces)
        return _verdict(op, backend, str(primary.device), primary.dtype)
    if _CHECKING.get() == "check":
        return ""
    v = _VERDICTS.get((op, backend, primary.device, primary.dtype))
    if v is not None:
        return v
    return _verdict(op, backend, str(primary.device), primary.dtype)


def _warn_once(key, message: str, category=RuntimeWarning) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        import warnings

        warnings.warn(message, category, stacklevel=4)


def _verdict(op: str, backend: str, device_str: str, dtype: torch.dtype) -> str:
    device = torch.device(device_str)
    key = (op, backend, device, dtype)
    if not gated(backend, device):
        _VERDICTS[key] = ""
        return ""
    if _CHECKING.get():  # a check names its backends itself; a report runs none
        return ""
    dname = str(dtype).replace("torch.", "")
    ident = device_identity(device)
    if cache_key(op, backend, ident, dtype) in _disk_passes():
        _remember(key, "passed", "", ident, "cache")
        return ""
    if torch.compiler.is_compiling() or _capturing(device):
        _RESULTS[key] = dict(status="unchecked", detail="first used under torch.compile / CUDA graph capture",
                             device=ident, source="")
        _warn_once(("unchecked",) + key,
                   f"vqkernels: the {backend} kernel of {op} on {device} ({ident}) in {dname} serves unverified: its "
                   "first call is under torch.compile tracing or CUDA graph capture, where no self-check runs. "
                   "Run `vqkernels selftest` (or one eager call) first to have it checked.")
        return ""
    from . import selftest

    with selfcheck_running():
        res = selftest.check(op, backend, device, dtype)
    CHECKS_RUN.append(key)
    if res.status == "passed":
        _remember(key, "passed", res.detail, ident, "check")
        _record_pass(op, backend, ident, dtype)
        return ""
    if res.status == "failed":
        why = f"its {dname} kernel failed the self-check on {device} ({ident}): {res.detail}"
        _remember(key, "failed", why, ident, "check")
        _VERDICTS[key] = why
        _warn_once(("failed",) + key,
                   f"vqkernels: the {backend} kernel of {op} failed its self-check on {device} ({ident}) in {dname}: "
                   f"{res.detail}; auto passes it over (`vqkernels selftest` checks every kernel; "
                   "VQKERNELS_SELFCHECK=never turns the check off)", SelfCheckFailed)
        return _VERDICTS[key]
    # No case of the op could run here (or it has none): it serves unverified, said once.
    _remember(key, "unchecked", res.detail, ident, "check")
    _warn_once(("unchecked",) + key, f"vqkernels: the {backend} kernel of {op} on {device} in {dname} serves "
                                     f"unverified: {res.detail}")
    return ""


_verdict._dynamo_marked_constant = True


def _remember(key, status: str, detail: str, ident: str, source: str) -> None:
    _RESULTS[key] = dict(status=status, detail=detail, device=ident, source=source)
    if status != "failed":
        _VERDICTS[key] = ""


def record_selfcheck(op: str, backend: str, device: torch.device, dtype: torch.dtype, passed: bool,
                     detail: str = "") -> None:
    """What ``vqkernels selftest`` found, for the gate of this process and (a pass) the cache file."""
    ident = device_identity(device)
    key = (op, backend, device, dtype)
    if passed:
        _remember(key, "passed", detail, ident, "selftest")
        _record_pass(op, backend, ident, dtype)
    else:
        dname = str(dtype).replace("torch.", "")
        why = f"its {dname} kernel failed the self-check on {device} ({ident}): {detail}"
        _remember(key, "failed", why, ident, "selftest")
        _VERDICTS[key] = why


def selfcheck_results() -> dict:
    """{"op/backend/device/dtype": {"status", "detail", "device", "source"}} for every check this process knows."""
    return {f"{op}/{b}/{dev}/{str(dt).replace('torch.', '')}": dict(r) for (op, b, dev, dt), r in _RESULTS.items()}


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001
        return False


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_identity(device: torch.device) -> str:
    """What a check's verdict holds for: the GPU's name and compute capability, or the CPU's model and ISA."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"{torch.cuda.get_device_name(idx)} sm_{major}{minor}"
    if device.type == "cpu":
        return f"{cpu_model()}{' avx512' if cpu_has_avx512() else ''}{' amx-bf16' if cpu_has_bf16_gemm() else ''}"
    return device.type


def cache_key(op: str, backend: str, ident: str, dtype: torch.dtype) -> str:
    return f"{op}|{backend}|{ident}|{str(dtype).replace('torch.', '')}"


def selfcheck_cache_path() -> str:
    """$VQKERNELS_CACHE_DIR, else $XDG_CACHE_HOME/vqkernels, else ~/.cache/vqkernels; the file selfcheck.json."""
    d = os.environ.get("VQKERNELS_CACHE_DIR")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "vqkernels")
    return os.path.join(d, "selfcheck.json")


def _hash_file(h, path: str) -> None:
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        h.update(b"<unreadable>")


def _driver_version() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return ""


def build_fingerprint() -> dict:
    """What a cached verdict depends on besides the device: the package version, the build (a hash of _C and of
    every kernel's and case's source), torch, CUDA, the driver, triton. Computed once per process."""
    fp = _STATE.get("fingerprint")
    if fp is None:
        import hashlib
        from importlib import metadata

        from . import __version__

        h = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        c = c_extension()
        _hash_file(h, c.__file__) if c is not None and getattr(c, "__file__", None) else h.update(b"no _C")
        for root, dirs, files in sorted(os.walk(os.path.join(here, "ops"))):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    h.update(name.encode())
                    _hash_file(h, os.path.join(root, name))
        _hash_file(h, os.path.join(here, "selftest.py"))
        try:
            triton_version = metadata.version("triton")
        except Exception:  # noqa: BLE001
            triton_version = None
        fp = dict(vqkernels=__version__, build=h.hexdigest()[:16], torch=torch.__version__,
                  cuda=torch.version.cuda, driver=_driver_version(), triton=triton_version)
        _STATE["fingerprint"] = fp
    return fp


def _fingerprint_id() -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(build_fingerprint(), sort_keys=True).encode()).hexdigest()[:24]


def _read_cache() -> dict:
    """The cache file's passes for this fingerprint ({} when absent, stale or unreadable: never an error)."""
    import json

    path = selfcheck_cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("passed", {}), dict):
            raise ValueError("not a vqkernels self-check cache")
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 -- a corrupt cache is ignored (and rewritten), never a crash
        _warn_once(("cache", path), f"vqkernels: ignoring the self-check cache {path} ({type(e).__name__}: {e}); "
                                    "the kernels are checked again", SelfCheckCacheWarning)
        return {}
    if data.get("format") != CACHE_FORMAT or data.get("fingerprint") != _fingerprint_id():
        return {}  # another version, build, torch, CUDA or driver: every verdict is stale
    return dict(data.get("passed", {}))


def _disk_passes() -> dict:
    if "disk" not in _STATE:
        _STATE["disk"] = _read_cache()
    return _STATE["disk"]


def _record_pass(op: str, backend: str, ident: str, dtype: torch.dtype) -> None:
    """Add a pass to the cache file (atomically; entries of another fingerprint are dropped)."""
    import datetime
    import json
    import tempfile

    passes = _disk_passes()
    passes.update(_read_cache())  # another process may have added some since
    passes[cache_key(op, backend, ident, dtype)] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    path = selfcheck_cache_path()
    data = dict(format=CACHE_FORMAT, fingerprint=_fingerprint_id(), about=build_fingerprint(), passed=passes)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".selfcheck-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:  # a read-only home: the verdict still holds for this process
        _warn_once(("cache-write", path), f"vqkernels: could not write the self-check cache {path} ({e})",
                   SelfCheckCacheWarning)


# The output buffers a kernel fills live with the shared argument checks (re-exported: every op and
# the attention ops call ``_backend.new_output``).
from .ops._checks import new_output, poison_outputs  # noqa: E402,F401
