"""Where and with what a run was made: device, CPU model and ISA, cores, versions, git sha, date (UTC)."""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import re
import subprocess
from pathlib import Path

from vqkernels._info import _cpu_model  # one reader of the CPU model, shared with vqkernels.info

from .common import usable_cores

# The checkout this harness belongs to: its git sha stamps the results, which go to its benchmarks/results/.
CHECKOUT = Path(__file__).resolve().parents[2]

# Versions recorded in the metadata when the package is importable (the peers a suite compares with).
PEER_VERSIONS = ("triton", "faiss", "numpy", "taming", "vector_quantize_pytorch", "flash_attn", "pytorch_lightning",
                 "torchvision")


def cpu_isa() -> str:
    """The SIMD/matrix extensions that decide CPU kernel speed (from /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    want = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
                            "amx_tile"]
                    return " ".join(w for w in want if w in flags)
    except OSError:
        pass
    return ""


def git_sha() -> tuple[str, bool | None]:
    """The checkout's commit, and whether tracked files differ from it ("unknown", None: not a git checkout)."""
    cwd = CHECKOUT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return "unknown", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return sha, dirty
    except Exception:  # noqa: BLE001 -- no git, not a checkout
        return "unknown", None


def version(mod_name: str) -> str | None:
    """A package's version without importing it where its metadata says it (taming's import needs stand-ins)."""
    from importlib import metadata

    dist = {"faiss": "faiss-cpu", "taming": "taming-transformers-rom1504", "flash_attn": "flash-attn",
            "vector_quantize_pytorch": "vector-quantize-pytorch", "pytorch_lightning": "pytorch-lightning"}
    for name in (dist.get(mod_name), mod_name):
        if name:
            try:
                return metadata.version(name)
            except Exception:  # noqa: BLE001
                pass
    try:
        return importlib.import_module(mod_name).__version__
    except Exception:  # noqa: BLE001
        return None


def collect_meta(device: str, args, argv_repr: str) -> dict:
    import torch

    import vqkernels
    from vqkernels import _backend

    gpu = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory,
               "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    sha, dirty = git_sha()
    cpu = _cpu_model()
    versions = {m: version(m) for m in PEER_VERSIONS}
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "device_name": gpu["name"] if gpu else cpu,
        "cpu_model": cpu,
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        # other work on the machine when the run started (a shared machine's timings read with it)
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **versions,
        "vqkernels": vqkernels.__version__,
        "vqkernels_C": _backend.build_info() if _backend.c_extension() is not None else None,
        "vqkernels_C_error": _backend.c_extension_error(),
        "git_sha": sha,
        "git_dirty": dirty,
        "platform": platform.platform(),
        "command": argv_repr,
        "isolation": "subprocess" if args.isolate else "in-process",
        "repeats": args.repeats, "warmup": args.warmup, "min_time_s": args.min_time,
        "timeout_s": args.timeout, "mem_cap_bytes": args.mem_cap_bytes, "seed": args.seed,
    }


def device_slug(meta: dict) -> str:
    """'amd-epyc-2c' for a CPU run, 'nvidia-h100-80gb-hbm3' for a GPU run."""
    name = meta["device_name"]
    slug = re.sub(r"\((r|tm)\)|cpu|processor|@.*$", "", name, flags=re.I) if meta["device"] == "cpu" else name
    slug = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-") or "unknown"
    if meta["device"] == "cpu":
        slug += f"-{meta['usable_cores']}c"
    return slug


def default_out_dir(meta: dict) -> Path:
    return CHECKOUT / "benchmarks" / "results" / f"{meta['date_utc'][:10]}-{device_slug(meta)}"
