"""Stand-in modules that taming-transformers 0.0.6 needs to import on today's libraries (benchmarks only).

They live here, in the checkout's benchmarks/ folder, never in the vqkernels package: the benchmark suites of
vqkernels.bench put this folder on the path of the (isolated) process that measures a taming provider and call
:func:`install`. What each stands in for:

- ``pytorch_lightning.utilities.distributed`` (gone from Lightning 2): taming.models.vqgan imports
  ``rank_zero_only`` from it; Lightning still has it in ``pytorch_lightning.utilities``.
- ``requests`` (not a dependency pip brings): taming.util imports it for its downloader, which the benchmark
  never calls (no weights are downloaded: LPIPS gets random weights, see :func:`offline_lpips`).
- ``transformers`` with ``top_k_top_p_filtering`` (gone from today's transformers): taming's minGPT imports it.
  Its sampler calls it only with top_p set; this one implements the filter (the transformers 4.x semantics),
  so a sampler given top_p works too. A process that holds this stand-in cannot import the real transformers:
  the Hugging Face provider runs in its own process.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types


def top_k_top_p_filtering(logits, top_k=0, top_p=1.0, filter_value=-float("Inf"), min_tokens_to_keep=1):
    import torch

    top_k = top_k or 0
    top_p = 1.0 if top_p is None else top_p
    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        if min_tokens_to_keep > 1:
            remove[..., :min_tokens_to_keep] = False
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), filter_value)
    return logits


def install(transformers: bool = False) -> None:
    """Put the stand-ins in ``sys.modules`` (idempotent); ``transformers=True`` adds the transformers one."""
    if "pytorch_lightning.utilities.distributed" not in sys.modules:
        plu = importlib.import_module("pytorch_lightning.utilities")
        dist = types.ModuleType("pytorch_lightning.utilities.distributed")
        dist.rank_zero_only = plu.rank_zero_only
        sys.modules[dist.__name__] = dist
    try:
        importlib.import_module("requests")
    except ImportError:
        sys.modules["requests"] = types.ModuleType("requests")
    if transformers and not hasattr(sys.modules.get("transformers"), "top_k_top_p_filtering"):
        stub = types.ModuleType("transformers")
        stub.top_k_top_p_filtering = top_k_top_p_filtering
        sys.modules["transformers"] = stub


@contextlib.contextmanager
def offline_lpips():
    """Build taming's LPIPS without its downloads: torchvision's vgg16 without pretrained weights, and no
    ``load_from_pretrained`` (the benchmark copies the same random weights into both sides)."""
    import torchvision.models as tvm

    from taming.modules.losses import lpips

    orig_vgg, orig_load = tvm.vgg16, lpips.LPIPS.load_from_pretrained

    def vgg16(pretrained=False, **kw):
        # taming's LPIPS keeps only .features: skip the 120M-parameter classifier torchvision would initialise
        return types.SimpleNamespace(features=tvm.vgg.make_layers(tvm.vgg.cfgs["D"]))

    tvm.vgg16 = vgg16
    lpips.models.vgg16 = vgg16
    lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    try:
        yield
    finally:
        tvm.vgg16 = orig_vgg
        lpips.models.vgg16 = orig_vgg
        lpips.LPIPS.load_from_pretrained = orig_load
