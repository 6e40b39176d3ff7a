"""Where the suites' peers come from, and what they need to run here (benchmarks only, never in the package).

- taming-transformers 0.0.6 (from the environment) needs stand-in modules to import on today's libraries
  (:func:`install`, :func:`offline_lpips`); a process that installs them cannot import the real ``transformers``,
  so the taming providers run in processes of their own (``Provider.isolated``). What each stands in for:

  - ``pytorch_lightning.utilities.distributed`` (gone from Lightning 2): taming.models.vqgan imports
    ``rank_zero_only`` from it; Lightning still has it in ``pytorch_lightning.utilities``.
  - ``requests`` (not a dependency pip brings): taming.util imports it for its downloader, which the benchmark
    never calls (no weights are downloaded: LPIPS gets random weights, see :func:`offline_lpips`).
  - ``transformers`` with ``top_k_top_p_filtering`` (gone from today's transformers): taming's minGPT imports it.
    Its sampler calls it only with top_p set; this one implements the filter (the transformers 4.x semantics),
    so a sampler given top_p works too.

- Hugging Face transformers (the GPT suite's GPT-2): from the environment when it is importable there, else from a
  folder of its own (:func:`hf_path`: ``$VQKERNELS_BENCH_HF_PATH`` or ``<venv>/hf-packages``, which ``make bench``
  fills), put on the path of its provider's process only.

The other peers (vector-quantize-pytorch, FAISS, flash-attn) import as they are: their suites skip them with
:func:`benchmarks.harness.common.importable_reasons` when they do not.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path


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


def taming_reasons() -> list[str]:
    """Why taming's providers cannot run here: taming (its package; its modules need the stand-ins, which this
    process must not install) or Lightning (the stand-ins are made from it) is missing."""
    from .harness.common import importable_reasons

    return importable_reasons("taming") or ([] if _installed("pytorch_lightning") else
                                            ["pytorch_lightning is not installed (taming's modules import it)"])


def _installed(name: str) -> bool:
    """Whether ``name`` can be found, without importing it (Lightning takes seconds to import)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a None / stand-in in sys.modules
        return False


def hf_path() -> list[str]:
    """Where transformers comes from for the hf-gpt2 process: [] when this environment has it."""
    mod = sys.modules.get("transformers")
    if mod is not None and hasattr(mod, "__version__"):
        return []
    try:
        if mod is None and importlib.util.find_spec("transformers") is not None:
            return []
    except (ImportError, ValueError):  # a broken or stand-in module
        pass
    env = os.environ.get("VQKERNELS_BENCH_HF_PATH")
    return [env] if env else [str(Path(sys.prefix) / "hf-packages")]


def hf_reasons() -> list[str]:
    """Why Hugging Face transformers is not available to the hf-gpt2 process."""
    paths = hf_path()
    if paths and not (Path(paths[0]) / "transformers" / "__init__.py").is_file():
        return [f"transformers is not installed here nor in {paths[0]} (make bench installs it there; or set "
                f"VQKERNELS_BENCH_HF_PATH to a folder holding it)"]
    return []
