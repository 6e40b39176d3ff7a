"""A tokenizer's reconstruction quality on a set of images (``vqkernels eval``).

:func:`evaluate_tokenizer` runs a VQGAN (:class:`~vqkernels.models.vqgan.VQModel`) over images of any sizes and
reports:

- ``psnr``: on [0, 1], per image, averaged; ``psnr_pooled``: over all pixels at once (flat, easy images weigh
  less than in the mean);
- ``ssim``: scikit-image's SSIM (torchmetrics' where scikit-image is absent) with Wang et al.'s setting (Gaussian
  window 11, sigma 1.5), per image, averaged;
  images with a side under 11 pixels are left out of it (``ssim_images`` counts those in it);
- ``lpips``: :class:`vqkernels.models.lpips.LPIPS` with its real VGG16 weights, per image, averaged (sides of at
  least 16 pixels); when the weights are not on this machine it is ``None`` and ``unavailable["lpips"]`` says how
  to get them (random weights would give a number that means nothing);
- ``codebook_usage`` (fraction of the codebook used), ``codes_used``, ``codebook_size`` and ``perplexity``
  (exp of the entropy of code use: the number of equally used codes with the same entropy);
- ``rfid``: torchmetrics' FrechetInceptionDistance (2048 features) between the images and their reconstructions,
  only where its Inception weights are already on this machine (torch-fidelity installed, and its weight file in
  torch hub's cache); this module never downloads them. Otherwise ``None``, and ``unavailable["rfid"]`` says how
  to get them. FID needs at least two images, and many (thousands) to mean much.

A side that is not a multiple of the downsampling factor is padded by reflection and the reconstruction cropped
back; ``tiled=True`` reconstructs through overlapping tiles at the training size (:mod:`vqkernels.tiling`).

The command: :func:`add_arguments` / :func:`main` (``vqkernels eval --checkpoint DIR --data DIR|embedded``).
Data sets by name are the :data:`DATASETS` registry: name -> ``fn(resolution) -> iterable of (3, H, W) images in
[-1, 1]``, ``resolution`` being the model's training size.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

__all__ = ["EvalError", "evaluate_tokenizer", "lpips_status", "fid_status", "DATASETS", "open_images",
           "add_arguments", "main", "format_report"]

# torch-fidelity's Inception (the TF FID network, as pytorch-fid's pt_inception-2015-12-05), which
# torchmetrics' FrechetInceptionDistance loads from torch hub's cache (torch_fidelity's URL_INCEPTION_V3)
FID_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
SSIM_MIN_SIDE = 11  # the Gaussian window
LPIPS_MIN_SIDE = 16  # VGG16's four poolings before relu5_3
_BATCH_PIXELS = 1 << 22  # a batch of images holds at most this many pixels (besides batch_size): bounded memory


class EvalError(ValueError):
    """Input ``vqkernels eval`` cannot use; the message is one line naming the argument and what was expected."""


# ---------------------------------------------------------------------------------------------
# which metrics can run here

def lpips_status() -> tuple[bool, str]:
    """(available, message): whether LPIPS' real weights are on this machine (never downloads)."""
    from .models.lpips import find_weights

    try:
        found = find_weights()
    except (OSError, ValueError) as e:  # $VQKERNELS_LPIPS_WEIGHTS naming no file
        return False, f"not available ({e})"
    if found is None:
        return False, "not available (run scripts/fetch_lpips_weights.py)"
    return True, os.fspath(found[0])


def fid_weights_path() -> Path:
    """Where torchmetrics/torch-fidelity look for the Inception weights (torch hub's checkpoint cache)."""
    name = FID_WEIGHTS_FILENAME
    if importlib.util.find_spec("torch_fidelity") is not None:
        try:  # the file name torch-fidelity itself would download, should a release change it
            from torch_fidelity import feature_extractor_inceptionv3 as fe

            name = os.path.basename(getattr(fe, "URL_INCEPTION_V3", name)) or name
        except Exception:  # noqa: BLE001 - a broken install: keep the known name, the check below decides
            pass
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def fid_status() -> tuple[bool, str]:
    """(available, message): whether rFID can run without a download (torch-fidelity installed, weights cached)."""
    path = fid_weights_path()
    how = (f"not available: pip install torch-fidelity and fetch its Inception weights (FID's pt_inception-2015-12-05 "
           f"network, {path.name}) into {path.parent}")
    if importlib.util.find_spec("torchmetrics") is None:
        return False, "not available: pip install torchmetrics torch-fidelity, then fetch the Inception weights " \
                      f"({path.name}) into {path.parent}"
    if importlib.util.find_spec("torch_fidelity") is None or not path.is_file():
        return False, how
    return True, os.fspath(path)


# ---------------------------------------------------------------------------------------------
# the evaluation

def _check_model(model):
    cfg = getattr(model, "config", None)
    if not (hasattr(model, "encode") and hasattr(model, "decode") and hasattr(cfg, "n_embed")):
        raise EvalError(f"model: expected a VQGAN tokenizer (VQModel), got {type(model).__name__}")


def _check_image(i: int, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3 or min(x.shape[1:]) < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise EvalError(f"images: item {i} is {got}, expected an RGB image (3, H, W)")
    if not x.is_floating_point():
        raise EvalError(f"images: item {i} has dtype {x.dtype}, expected floats in [-1, 1]")
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.001 or hi > 1.001:
        raise EvalError(f"images: item {i} has values in [{lo:.4g}, {hi:.4g}], expected [-1, 1]")
    return x


def _batches(images: Iterable[torch.Tensor], batch_size: int):
    """Consecutive images of one size, stacked: at most batch_size of them and about _BATCH_PIXELS pixels."""
    group, shape = [], None
    for i, x in enumerate(images):
        x = _check_image(i, x)
        if group and (x.shape != shape or len(group) >= batch_size
                      or (len(group) + 1) * x.shape[1] * x.shape[2] > _BATCH_PIXELS):
            yield torch.stack(group)
            group = []
        group.append(x.float())
        shape = x.shape
    if group:
        yield torch.stack(group)


def _reconstruct(model, x: torch.Tensor, tiled: bool, tile, overlap):
    """(B, 3, H, W) -> (reconstruction (B, 3, H, W), codes (any shape))."""
    from .tiling import reconstruct_tiled, reflect_pad

    if tiled:
        return reconstruct_tiled(model, x, tile=tile, overlap=overlap, return_indices=True)
    f = int(model.config.downsample_factor)
    H, W = x.shape[-2:]
    xp = reflect_pad(x, -H % f, -W % f)
    param = next(model.parameters(), None)
    quant, _, (_, _, ind) = model.encode(xp if param is None else xp.to(param.dtype))
    return model.decode(quant)[..., :H, :W], ind


def _ssim_function():
    """fn(b, a) -> list of per-image SSIMs of (B, 3, H, W) images in [0, 1], with Wang et al.'s setting (Gaussian
    window 11, sigma 1.5, population covariances): scikit-image's, else torchmetrics' (whose import takes seconds),
    else None."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        structural_similarity = None
    if structural_similarity is not None:
        def ssim_skimage(b, a):
            return [float(structural_similarity(
                y.permute(1, 2, 0).double().cpu().numpy(), x.permute(1, 2, 0).double().cpu().numpy(),
                channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
                for y, x in zip(b, a)]
        return ssim_skimage
    if importlib.util.find_spec("torchmetrics") is None:
        return None
    from torchmetrics.functional.image import structural_similarity_index_measure

    def ssim_torchmetrics(b, a):
        return structural_similarity_index_measure(b, a, data_range=1.0, reduction="none").reshape(-1).tolist()
    return ssim_torchmetrics


@torch.no_grad()
def evaluate_tokenizer(model, images: Iterable[torch.Tensor], *, batch_size: int = 8, device=None,
                       lpips: bool = True, fid: bool = True, tiled: bool = False, tile: int | None = None,
                       overlap: int | None = None, progress: bool = False) -> dict:
    """Reconstruction metrics of ``model`` (a VQModel) over ``images`` (an iterable of (3, H, W) float tensors in
    [-1, 1], any sizes; consecutive images of one size are batched). See the module doc for the metrics.

    device: where to run (default: the model's device; the model is moved there). lpips / fid: False skips them
    (reported in ``unavailable`` as "not asked"). tiled / tile / overlap: reconstruct through
    :func:`vqkernels.tiling.reconstruct_tiled`. progress: a tqdm bar over images.

    Returns a dict: images, pixels, psnr, psnr_pooled, ssim, ssim_images, lpips, lpips_images, codebook_size,
    codes_used, codebook_usage, perplexity, rfid, tiled, and unavailable (metric -> why it is None).
    Raises :class:`EvalError` for a model that is not a VQGAN, an image that is not (3, H, W) in [-1, 1], or no
    image at all.
    """
    _check_model(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if device is not None:
        model = model.to(device)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    unavailable: dict[str, str] = {}

    lpips_net = None
    if lpips:
        ok, msg = lpips_status()
        if ok:
            from .models.lpips import LPIPS

            try:
                # use_dropout=True keeps taming's key layout (lin*.model.1.weight) that the weight files use; in eval
                # mode (LPIPS is built in it) the dropout does nothing
                lpips_net = LPIPS(use_dropout=True).to(device).eval()
            except (OSError, ValueError) as e:  # a corrupt or foreign weight file: say so, report the rest
                unavailable["lpips"] = f"not available ({_first_line(e)})"
        else:
            unavailable["lpips"] = msg
    else:
        unavailable["lpips"] = "not asked"
    fid_metric = None
    if fid:
        ok, msg = fid_status()
        if ok:
            try:
                from torchmetrics.image.fid import FrechetInceptionDistance

                fid_metric = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
            except Exception as e:  # noqa: BLE001 - a broken install or weight file: say so, report the rest
                unavailable["rfid"] = f"not available: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            unavailable["rfid"] = msg
    else:
        unavailable["rfid"] = "not asked"
    ssim_fn = _ssim_function()
    if ssim_fn is None:
        unavailable["ssim"] = "not available: pip install scikit-image (or torchmetrics)"
    n_codes = int(getattr(getattr(model, "quantize", None), "re_embed", model.config.n_embed))
    counts = torch.zeros(n_codes, dtype=torch.float64)
    n_images = pixels = 0
    sq_err_total = 0.0
    psnrs, ssims, lpipss = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="eval", unit="img")
    try:
        for x in _batches(images, batch_size):
            x = x.to(device)
            rec, ind = _reconstruct(model, x, tiled, tile, overlap)
            a = (x.float() * 0.5 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
            b = (rec.float() * 0.5 + 0.5).clamp(0, 1)
            sq = ((a - b).double() ** 2).flatten(1)  # (B, 3HW)
            mse = sq.mean(1)
            psnrs += (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).tolist()
            sq_err_total += float(sq.sum())
            n_images += x.shape[0]
            pixels += x.shape[0] * x.shape[2] * x.shape[3]
            counts += torch.bincount(ind.reshape(-1).long().cpu(), minlength=n_codes).double()
            if ssim_fn is not None and min(x.shape[-2:]) >= SSIM_MIN_SIDE:
                ssims += ssim_fn(b, a)
            if lpips_net is not None and min(x.shape[-2:]) >= LPIPS_MIN_SIDE:
                lpipss += lpips_net(b * 2 - 1, a * 2 - 1).reshape(-1).tolist()
            if fid_metric is not None:
                fid_metric.update(a, real=True)
                fid_metric.update(b, real=False)
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if n_images == 0:
        raise EvalError("images: no image to evaluate")

    rfid = None
    if fid_metric is not None:
        if n_images < 2:
            unavailable["rfid"] = "not computed: FID needs at least 2 images"
        else:
            rfid = float(fid_metric.compute())
    if lpips_net is not None and not lpipss:
        unavailable["lpips"] = f"not computed: every image has a side under {LPIPS_MIN_SIDE} pixels"
    if ssim_fn is not None and not ssims:
        unavailable["ssim"] = f"not computed: every image has a side under {SSIM_MIN_SIDE} pixels"
    p = counts / counts.sum()
    p = p[p > 0]
    return {
        "images": n_images,
        "pixels": pixels,
        "psnr": sum(psnrs) / len(psnrs),
        "psnr_pooled": 10 * math.log10(1.0 / max(sq_err_total / (3 * pixels), 1e-10)),
        "ssim": sum(ssims) / len(ssims) if ssims else None,
        "ssim_images": len(ssims),
        "lpips": sum(lpipss) / len(lpipss) if lpipss else None,
        "lpips_images": len(lpipss),
        "codebook_size": n_codes,
        "codes_used": int((counts > 0).sum()),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
        "rfid": rfid,
        "tiled": bool(tiled),
        "unavailable": unavailable,
    }


# ---------------------------------------------------------------------------------------------
# data sets

def _embedded_held_out(resolution: int) -> list[torch.Tensor]:
    """The held-out photographs of the embedded data (never trained on), as the grid of crops at the model's
    training size that training reports its held-out metrics on."""
    from .data import EMBEDDED_HELD_OUT, embedded_images, grid_crops

    imgs = embedded_images()
    return [c for name in EMBEDDED_HELD_OUT for c in grid_crops(imgs[name], resolution)]


# name -> fn(resolution: the model's training size) -> iterable of (3, H, W) images in [-1, 1]
def _digits_held_out(resolution: int) -> list[torch.Tensor]:
    """The held-out digits of scikit-learn's data set (never trained on), enlarged to the model's size."""
    from .digits import digits_split

    return list(digits_split(int(resolution)).held_out.images)


DATASETS: dict[str, Callable[[int], Iterable[torch.Tensor]]] = {"embedded": _embedded_held_out,
                                                                "digits": _digits_held_out}


def _folder_images(files) -> Iterable[torch.Tensor]:
    from .data import DataError, load_image

    for f in files:
        try:
            yield load_image(f)
        except DataError as e:
            raise EvalError(f"--data: {e}") from None


def open_images(data: str, resolution: int) -> Iterable[torch.Tensor]:
    """``data``: a name in :data:`DATASETS` or a folder of images (every image at its own size, recursively)."""
    if data in DATASETS:
        return DATASETS[data](resolution)
    from .data import DataError, list_images

    try:
        files = list_images(data)
    except DataError as e:
        names = ", ".join(sorted(DATASETS))
        raise EvalError(f"--data: {e} (expected a folder of images or one of: {names})") from None
    return _folder_images(files)


# ---------------------------------------------------------------------------------------------
# the command

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``vqkernels eval``."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a VQGAN run folder (train-vqgan --out) or a save_pretrained folder")
    parser.add_argument("--data", default="embedded", metavar="DIR|NAME",
                        help=f"a folder of images (each at its own size), or one of: {', '.join(sorted(DATASETS))} "
                             f"(default: embedded, the held-out photographs as crops at the model's training size)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N", help="evaluate the first N images only")
    parser.add_argument("--tiled", action="store_true",
                        help="reconstruct through overlapping tiles at the model's training size")
    parser.add_argument("--tile", type=int, default=None, help="tile side (implies --tiled; default: the training size)")
    parser.add_argument("--overlap", type=int, default=None, help="least tile overlap (implies --tiled; default tile/2)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--no-fid", action="store_true", help="skip rFID")
    parser.add_argument("--progress", action="store_true", help="a progress bar on stderr")
    return parser


def _runs():
    """The run-folder helpers (load_model, resolve_device): in vqkernels.runs, or vqkernels.train before it."""
    try:
        from . import runs
        if hasattr(runs, "load_model") and hasattr(runs, "resolve_device"):
            return runs
    except ImportError:
        pass
    from . import train

    return train


def _first_line(e: BaseException) -> str:
    s = "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return s or type(e).__name__


def load_tokenizer(path, device="cpu"):
    """A VQModel from a run folder or a save_pretrained folder; EvalError (one line) for anything else."""
    runs = _runs()
    try:
        return runs.load_model(path, "vqgan", device=device)
    except Exception as e:  # noqa: BLE001 - load_model's errors are one-line messages; its class is moving
        raise EvalError(_first_line(e)) from None


def _resolve_device(name):
    try:
        return _runs().resolve_device(name)
    except Exception as e:  # noqa: BLE001 - as above
        raise EvalError(_first_line(e)) from None


def run(args) -> dict:
    """``vqkernels eval`` without the printing: the metrics dict plus checkpoint, data and device."""
    for name in ("batch_size", "max_images", "tile", "overlap"):
        v = getattr(args, name, None)
        if v is not None and (v < 1 if name != "overlap" else v < 0):
            kind = "non-negative" if name == "overlap" else "positive"
            raise EvalError(f"--{name.replace('_', '-')}: expected a {kind} integer, got {v}")
    device = _resolve_device(getattr(args, "device", "auto"))
    model = load_tokenizer(args.checkpoint, device)
    images = open_images(str(args.data), int(model.config.resolution))
    if args.max_images is not None:
        images = itertools.islice(images, args.max_images)
    try:
        result = evaluate_tokenizer(model, images, batch_size=args.batch_size, device=device,
                                    lpips=not getattr(args, "no_lpips", False), fid=not getattr(args, "no_fid", False),
                                    # --tile / --overlap imply --tiled (they were silently ignored without it)
                                    tiled=bool(getattr(args, "tiled", False) or getattr(args, "tile", None) is not None
                                               or getattr(args, "overlap", None) is not None),
                                    tile=getattr(args, "tile", None),
                                    overlap=getattr(args, "overlap", None), progress=getattr(args, "progress", False))
    except EvalError as e:
        if str(e).startswith("images: no image"):
            raise EvalError(f"--data {args.data}: no image to evaluate") from None
        raise
    except ValueError as e:  # tiling arguments (tile not a multiple of the downsampling factor, ...)
        raise EvalError(_first_line(e)) from None
    return {"checkpoint": os.fspath(args.checkpoint), "data": str(args.data), "device": str(device), **result}


def format_report(r: dict) -> str:
    """The human-readable lines of ``vqkernels eval``."""
    na = r.get("unavailable", {})

    def line(name, value):
        return f"{name:<10}{value}"

    out = [f"{r['images']} image(s) from {r.get('data', '?')}, checkpoint {r.get('checkpoint', '?')}, "
           f"device {r.get('device', '?')}{', tiled' if r.get('tiled') else ''}",
           line("psnr", f"{r['psnr']:.2f} dB (mean over images; {r['psnr_pooled']:.2f} dB pooled over all pixels)")]
    out.append(line("ssim", f"{r['ssim']:.4f}" if r["ssim"] is not None else na.get("ssim", "not computed")))
    out.append(line("lpips", f"{r['lpips']:.4f}" if r["lpips"] is not None else na.get("lpips", "not computed")))
    out.append(line("codebook", f"{r['codes_used']} of {r['codebook_size']} codes used "
                                f"({100 * r['codebook_usage']:.1f}%), perplexity {r['perplexity']:.1f}"))
    out.append(line("rfid", f"{r['rfid']:.2f}" if r["rfid"] is not None else na.get("rfid", "not computed")))
    return "\n".join(out)


def main(args) -> int:
    """``vqkernels eval``: 0 on success; 2 with one line ``vqkernels eval: <message>`` on stderr for bad input."""
    try:
        result = run(args)
    except EvalError as e:
        print(f"vqkernels eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_report(result))
    return 0


if __name__ == "__main__":  # python -m vqkernels.evaluate ... (until the CLI has the subcommand)
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="vqkernels eval")).parse_args()))
