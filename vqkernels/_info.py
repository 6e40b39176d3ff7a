"""What vqkernels.info() and `vqkernels info` report."""
from __future__ import annotations

import os
import platform

import torch

from . import __version__, _backend


def _cpu_model() -> str:
    return _backend.cpu_model()


def _import_every_op() -> dict:
    """Import each op folder under vqkernels/ops, so every op, present and coming, has declared its
    backends; returns {folder: error} for those that do not import."""
    import importlib
    import pkgutil

    from . import ops

    errors = {}
    for m in pkgutil.iter_modules(ops.__path__):
        if not m.name.startswith("_"):
            try:
                importlib.import_module(f"{ops.__name__}.{m.name}")
            except Exception as e:  # noqa: BLE001 -- report, don't fail
                errors[m.name] = f"{type(e).__name__}: {e}"
    return errors


def backend_choices(devices, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """For every declared op and each (device, dtype) its probe covers: the backend ``auto`` picks here,
    and under ``key + " not chosen because"`` each other backend's reasons. Reporting runs no self-check: a
    backend that failed one in this process is passed over, one not checked yet is reported as if it passed."""
    with _backend.selfcheck_running("report"):
        return _backend_choices(devices, dtypes)


def _backend_choices(devices, dtypes) -> dict:
    picks = {f"ops/{name} (does not import)": err for name, err in _import_every_op().items()}
    for op in _backend.declared_ops():
        spec = _backend._SPECS[op]
        if spec.probe is None:
            picks[op] = "? (the op declares no probe: give declare(...) a probe to report its choice)"
            continue
        for dev in devices:
            for dtype in dtypes:
                args = spec.probe(dev, dtype)
                if args is None:  # the op's choice does not depend on this dtype
                    continue
                key = f"{op}[{dev},{str(dtype).replace('torch.', '')}]"
                try:
                    picks[key] = _backend.select(op, None, **args)
                except Exception as e:  # noqa: BLE001 -- report, don't fail
                    picks[key] = f"none ({e})"
                reasons = _backend.explain(op, **args)
                # (a backend the op does not declare at all, e.g. sdpa for all but attention, is not news)
                picks[key + " not chosen because"] = {b: r for b, r in reasons.items() if r and b in spec.backends}
    return picks


def collect() -> dict:
    d = {
        "vqkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception:
        d["triton"] = None
    cuda_ok = False
    try:
        cuda_ok = torch.cuda.is_available()
    except Exception:
        pass
    d["cuda_device"] = torch.cuda.get_device_name(0) if cuda_ok else None
    d["_C"] = _backend.build_info() if _backend.c_extension() is not None else None
    d["_C_error"] = _backend.c_extension_error()
    d["triton_interpreter"] = _backend.triton_interpreter()
    d["triton_can_run"] = {
        dev: not _backend.triton_device_reasons(torch.device(dev)) for dev in (["cpu", "cuda"] if cuda_ok else ["cpu"])
    }
    env = os.environ.get("VQKERNELS_BACKEND")
    d["override"] = env
    picks = backend_choices(["cpu"] + (["cuda"] if cuda_ok else []))
    d["backend_choice"] = picks
    try:
        mode = _backend.selfcheck_mode()
    except ValueError as e:
        mode = f"invalid ({e})"
    d["selfcheck"] = dict(mode=mode, cache=_backend.selfcheck_cache_path(), results=_backend.selfcheck_results(),
                          cached_passes=sorted(_backend._disk_passes()))
    return d


def format_info(d: dict) -> str:
    lines = [f"vqkernels {d['vqkernels']}  (python {d['python']}, torch {d['torch']}, "
             f"torch CUDA {d['torch_cuda']}, triton {d['triton']})",
             f"cpu: {d['cpu']}, {d['threads']} threads",
             f"cuda device: {d['cuda_device'] or 'none'}"]
    if d["_C"] is None:
        lines.append(f"_C: NOT BUILT -- every op runs on its PyTorch path ({d['_C_error']})")
    else:
        c = d["_C"]
        kinds = ["CPU kernels"] + (["CUDA kernels (" + str(c.get("cuda_archs", "?")) + ")"] if c.get("cuda") else [])
        lines.append("_C: built with " + " and ".join(kinds))
    lines.append(f"triton can run on: {', '.join(k for k, v in d['triton_can_run'].items() if v) or 'nothing here'}"
                 + ("  (interpreter)" if d["triton_interpreter"] else ""))
    if d["override"]:
        lines.append(f"VQKERNELS_BACKEND={d['override']}")
    lines.append("backend each op picks here:")
    for k, v in d["backend_choice"].items():
        if k.endswith("not chosen because"):
            for b, r in v.items():
                lines.append(f"    {b}: {'; '.join(r)}")
        else:
            lines.append(f"  {k} -> {v}")
    sc = d.get("selfcheck")
    if sc:
        lines.append(f"self-check (VQKERNELS_SELFCHECK={sc['mode']}; passes cached in {sc['cache']}; "
                     "`vqkernels selftest` checks every kernel):")
        lines.append(f"  {len(sc['cached_passes'])} passes cached for this build, torch, driver and device")
        if not sc["results"]:
            lines.append("  no kernel checked in this process")
        for k, r in sc["results"].items():
            status = {"failed": "FAILED"}.get(r["status"], r["status"])
            src = f" ({r['source']})" if r.get("source") else ""
            lines.append(f"  {k} [{r['device']}]: {status}{src}" + (f": {r['detail']}" if r["status"] != "passed"
                                                                   and r["detail"] else ""))
    return "\n".join(lines)
