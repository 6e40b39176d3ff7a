"""The `vqkernels` command.

    vqkernels demo [--out DIR] [--minutes M]      train a small VQGAN, then a small GPT, on scikit-image's
                                                  photographs, then a class-conditional LLaMA GPT on
                                                  scikit-learn's digits; pictures and metrics.json in DIR
    vqkernels train-vqgan [--config YAML] [flags] the first stage on a folder of images (or "embedded")
    vqkernels train-gpt --vqgan DIR [flags]       the second stage over a trained VQGAN's codes
    vqkernels reconstruct --checkpoint DIR --out DIR [--tile N] [--overlap N] [--no-tile] IMAGE...
                                                  (an image larger than the training size: overlapping tiles)
    vqkernels encode --checkpoint DIR --out DIR IMAGE...      images -> code indices (.npy, (h, w) int64)
    vqkernels decode --checkpoint DIR --out DIR CODES.npy...  code indices -> images (.png)
    vqkernels sample --checkpoint DIR [--n 16] [--class-label C] [--cfg-scale S] [--cfg-interval I] --out DIR
    vqkernels eval --checkpoint DIR [--data DIR|embedded] [--json]   a tokenizer's reconstruction quality
    vqkernels selftest [--device cpu|cuda|all] [--op NAME...] [--json]   every runnable kernel vs the reference
    vqkernels info                 versions, device, what _C was built with, the backend each op picks

The benchmarks run as `python benchmarks/run.py` (not a subcommand: they ship beside the package).

A mistake in the input (a missing folder, a bad flag or YAML key, a checkpoint of the wrong kind, ...)
ends with one line on stderr and exit status 2, and writes nothing. Ctrl-C during training saves a
checkpoint first (exit status 130); `--resume` continues it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _ShowDefaults(argparse.HelpFormatter):
    """--help gives each option's default (argparse's ArgumentDefaultsHelpFormatter, less 'None' and 'False')."""

    def _get_help_string(self, action):
        help = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not hidden and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


class UsageError(Exception):
    """Bad input found after parsing: printed as one line, exit status 2."""


def _number(tp: type, rule: str | None = None):
    """An argparse type: an ``int`` or ``float`` within ``rule`` (a vqkernels.runs.RANGES key: "positive",
    "nonneg", "fraction"), the same rule and words as the training configs' own check."""
    from .runs import RANGES, range_problem

    what = RANGES[rule][1 if tp is int else 2] if rule else ("an integer" if tp is int else "a number")

    def parse(s: str):
        try:
            v = tp(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        problem = range_problem(rule, v, tp is int)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return v

    return parse


# ---------------------------------------------------------------------------------------------
# info (owned elsewhere; kept as it was)

def _cmd_info(args) -> int:
    import vqkernels

    if args.json:
        print(json.dumps(vqkernels.info(), indent=2, default=str))
    else:
        print(vqkernels.info(as_text=True))
    return 0


# ---------------------------------------------------------------------------------------------
# training

def _add_train_flags(p: argparse.ArgumentParser, cls) -> None:
    """--config, one flag per scalar field of the training config ``cls`` (its help, range and default from the
    field), --resume / --overwrite, --quiet. A flag left out is None: it does not override the YAML or the
    checkpoint's config."""
    from .runs import RESUMABLE, flag_fields

    p.add_argument("--config", metavar="YAML", help="a YAML file of config keys (flags given here win over it; "
                   "lists and mappings such as model, loss, betas are set there)")
    for f, tp, choices in flag_fields(cls):
        meta = f.metadata
        help = meta.get("help", "").replace("%", "%%")
        if f.default is False:
            help += " (default: off)"
        elif f.default not in (None, ""):
            help += f" (default: {f.default})"
        kw = dict(dest=f.name, default=None, help=help)
        if tp is bool:  # (a default of None means 'decided by the run': both --x and --no-x)
            kw["action"] = argparse.BooleanOptionalAction if f.default is None else "store_true"
        elif choices:
            kw["choices"] = choices
        else:
            kw["type"] = _number(tp, meta.get("check")) if tp in (int, float) else str
            kw["metavar"] = meta.get("metavar")
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                   f"(of its config, only {', '.join(sorted(RESUMABLE))} may change)")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _read_yaml(path) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"--config {path}: not valid YAML{at}: {problem}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UsageError(f"--config {path}: expected a mapping of config keys at the top, got a {type(d).__name__}")
    return d


def _overrides(args, cls) -> dict:
    """The YAML's keys, and over them the flags given."""
    from .runs import flag_fields

    d = _read_yaml(args.config) if args.config else {}
    for f, _, _ in flag_fields(cls):
        v = getattr(args, f.name)
        if v is not None:
            d[f.name] = v
    return d


def _train(args, kind: str) -> int:
    from . import train
    from .runs import GPTTrainConfig, VQGANTrainConfig, checkpoint_dir, resolve_config

    cls = VQGANTrainConfig if kind == "vqgan" else GPTTrainConfig
    overrides = _overrides(args, cls)
    where = f"--config {args.config}" if args.config else "flags"
    cfg = resolve_config(cls, overrides, overrides.get("out", cls.out), resume=args.resume, where=where)
    fn = train.train_vqgan if kind == "vqgan" else train.train_gpt
    summary = fn(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if not _is_main_rank():
        return 0
    ck = checkpoint_dir(cfg.out)
    msg = (f"{summary['steps']} steps, {summary['wall_s']:.1f} s of training ({summary['images_per_s']:.1f} images/s); "
           f"checkpoint {ck}")
    if summary.get("val_loss") is not None:
        msg += f"; held-out loss {summary['val_loss']:.4f}"
    print(msg)
    if summary["interrupted"]:
        print(f"interrupted: continue with --resume --out {cfg.out}", file=sys.stderr)
        return 130
    return 0


def _is_main_rank() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0  # torchrun's rank (the group is gone once training returns)


def _cmd_train_vqgan(args) -> int:
    return _train(args, "vqgan")


def _cmd_train_gpt(args) -> int:
    return _train(args, "gpt")


# ---------------------------------------------------------------------------------------------
# using checkpoints

def _device(args):
    from .runs import resolve_device

    return resolve_device(getattr(args, "device", None) or "auto")


def _out_dir(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vqkernels-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def _outputs(inputs: list[Path], out: Path, suffix: str) -> list[Path]:
    """One output per input, under its stem; refuses name clashes and writing over an input."""
    outs = [out / (p.stem + suffix) for p in inputs]
    seen = {}
    for i, o in zip(inputs, outs):
        if o in seen:
            raise UsageError(f"{seen[o]} and {i} would both be written to {o}; give them different names")
        seen[o] = i
        if o.resolve() in {p.resolve() for p in inputs}:
            raise UsageError(f"writing {o} would replace an input; choose another --out")
    return outs


def _load_images(paths) -> list:
    from .data import DataError, load_image

    if not paths:
        raise UsageError("no input images given")
    imgs = []
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"{p}: no such file")
        try:
            imgs.append(load_image(p))
        except DataError as e:
            raise UsageError(str(e)) from None
    return imgs


def _pad_to(x, f: int):
    """(1, 3, H, W) -> padded (reflect, or replicate when too small) to multiples of f, and (H, W)."""
    import torch.nn.functional as F

    H, W = x.shape[-2:]
    ph, pw = (-H) % f, (-W) % f
    if ph or pw:
        mode = "reflect" if ph < H and pw < W else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (H, W)


def _vqgan_job(args, ext: str, check=None):
    """What reconstruct and encode share: the images (read first, so a bad one fails before any work), the VQGAN
    checkpoint, the output folder and one output path per image, the downsampling factor and the model's device.
    ``check(model)``: the command's own checks against the model, before anything is written."""
    from .runs import load_model

    imgs = _load_images(args.images)
    paths = [Path(p) for p in args.images]
    model = load_model(args.checkpoint, "vqgan", _device(args))
    if check is not None:
        check(model)
    outs = _outputs(paths, _out_dir(args.out), ext)
    return paths, imgs, model, outs, model.config.downsample_factor, next(model.parameters()).device


def _tiling(args, model) -> tuple[int, int] | None:
    """reconstruct's (tile, overlap) from --tile / --overlap / --no-tile (None: whole images), checked against the
    model: the tile a multiple of its downsampling factor, the overlap below the tile. The names and defaults are
    those of `vqkernels eval --tiled` (the training size, half the tile)."""
    if args.no_tile:
        given = [n for n, v in (("--tile", args.tile), ("--overlap", args.overlap)) if v is not None]
        if given:
            raise UsageError(f"--no-tile: cannot be combined with {' and '.join(given)} (they set the tiles)")
        return None
    f = int(model.config.downsample_factor)
    tile = int(model.config.resolution) if args.tile is None else args.tile
    if tile % f:
        raise UsageError(f"--tile {tile}: must be a multiple of the model's downsampling factor {f} "
                         f"(its training size is {model.config.resolution})")
    from .tiling import default_overlap

    overlap = default_overlap(tile) if args.overlap is None else args.overlap
    if overlap >= tile:
        raise UsageError(f"--overlap {overlap}: must be smaller than the tile ({tile})")
    return tile, overlap


def _cmd_reconstruct(args) -> int:
    import math

    import torch

    from .data import save_image
    from .tiling import reconstruct_tiled, tile_starts

    plan = {}
    paths, imgs, model, outs, f, device = _vqgan_job(args, ".png", check=lambda m: plan.update(t=_tiling(args, m)))
    tiling = plan["t"]
    psnrs = []
    with torch.no_grad():
        for p, o, img in zip(paths, outs, imgs):
            H, W = img.shape[-2:]
            if tiling is not None and max(H, W) > tiling[0]:
                # larger than a tile: overlapping tiles at the training size (vqkernels.tiling), as it trained
                tile, overlap = tiling
                rec = reconstruct_tiled(model, img.to(device), tile=tile, overlap=overlap).float().clamp(-1, 1).cpu()
                n = len(tile_starts(max(H, tile), tile, overlap)) * len(tile_starts(max(W, tile), tile, overlap))
                how = f"{n} tiles of {tile}x{tile}, overlap >= {overlap}"
            else:
                x, _ = _pad_to(img[None].to(device), f)
                rec = model(x)[0][0, :, :H, :W].float().clamp(-1, 1).cpu()
                how = "whole image"
            mse = float(((rec - img) * 0.5).pow(2).mean())
            psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
            psnrs.append(psnr)
            save_image(rec, o)
            print(f"{p}: PSNR {psnr:.2f} dB ({W}x{H}, {how}) -> {o}")
    if len(psnrs) > 1:
        print(f"mean PSNR {sum(psnrs) / len(psnrs):.2f} dB over {len(psnrs)} images")
    return 0


def _cmd_encode(args) -> int:
    import numpy as np
    import torch

    from ._io import atomic_path

    paths, imgs, model, outs, f, device = _vqgan_job(args, ".npy")
    with torch.no_grad():
        for p, o, img in zip(paths, outs, imgs):
            H, W = img.shape[-2:]
            if H % f or W % f:
                # codes are a grid over the whole image: crop to the factor (decode gives back this size)
                img = img[:, : H - H % f, : W - W % f]
                if min(img.shape[-2:]) == 0:
                    raise UsageError(f"{p}: {H}x{W} is smaller than the downsampling factor {f}")
            idx = model.tokenize(img[None].to(device))[0].cpu().numpy().astype(np.int64)  # (h, w)
            with atomic_path(o, suffix=".npy") as tmp:  # (np.save adds .npy to a name without it)
                np.save(tmp, idx)
            print(f"{p}: {idx.shape[0]}x{idx.shape[1]} codes -> {o}")
    return 0


def _cmd_decode(args) -> int:
    import numpy as np
    import torch

    from .data import save_image
    from .runs import load_model

    if not args.codes:
        raise UsageError("no code files given")
    paths = [Path(p) for p in args.codes]
    grids = []
    for p in paths:
        try:
            a = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            raise UsageError(f"{p}: no such file") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{p}: not a .npy array of codes ({str(e).splitlines()[0]})") from None
        if a.ndim != 2 or a.dtype.kind not in "iu":
            raise UsageError(f"{p}: expected a 2-D integer array (h, w) of code indices, got {a.dtype} {a.shape}")
        grids.append(torch.from_numpy(a.astype(np.int64)))
    model = load_model(args.checkpoint, "vqgan", _device(args))
    n = model.config.n_embed
    for p, g in zip(paths, grids):
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n):
            raise UsageError(f"{p}: code indices must lie in [0, {n}), got [{int(g.min())}, {int(g.max())}]")
    out = _out_dir(args.out)
    outs = _outputs(paths, out, ".png")
    device = next(model.parameters()).device
    with torch.no_grad():
        for p, o, g in zip(paths, outs, grids):
            img = model.decode_code(g[None].to(device))[0].float().clamp(-1, 1).cpu()
            save_image(img, o)
            print(f"{p} -> {o}")
    return 0


def _cmd_sample(args) -> int:
    import torch

    from .data import save_grid, save_image
    from .runs import checkpoint_dir, load_model

    model = load_model(args.checkpoint, "gpt", _device(args))
    n_classes = model.config.n_classes
    if args.class_label is not None:
        if n_classes is None:
            raise UsageError("--class-label: this GPT is unconditional (trained without --conditional)")
        if not 0 <= args.class_label < n_classes:
            raise UsageError(f"--class-label {args.class_label}: the model has classes 0..{n_classes - 1}")
    elif n_classes is not None:
        raise UsageError(f"--class-label: this GPT is class-conditional; give a class in 0..{n_classes - 1}")
    out = _out_dir(args.out)
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(args.seed)
    guidance = {}
    if args.cfg_scale is not None or args.cfg_interval is not None:
        if not model.transformer.is_llama or not model.transformer.config.has_null_class:
            raise UsageError("--cfg-scale/--cfg-interval: classifier-free guidance needs a llama GPT trained with "
                             "class dropout (train-gpt --arch llama --class-dropout P)")
        if args.cfg_scale is not None and args.cfg_scale < 1:
            raise UsageError(f"--cfg-scale must be >= 1 (1: no guidance), got {args.cfg_scale}")
        if args.cfg_interval is not None and args.cfg_interval < -1:
            raise UsageError(f"--cfg-interval must be >= -1 (-1: every token), got {args.cfg_interval}")
        guidance = dict(cfg_scale=args.cfg_scale,
                        cfg_interval=-1 if args.cfg_interval is None else args.cfg_interval)
    # (no --cfg-scale: the checkpoint's own default, GPTConfig.cfg_scale, which train-gpt --cfg-scale stored)
    imgs = model.sample(args.n, class_label=args.class_label, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, generator=g, **guidance).float().clamp(-1, 1).cpu()
    stats = getattr(model.transformer, "last_generate_stats", None)
    for i, img in enumerate(imgs):
        save_image(img, out / f"sample_{i:03d}.png")
    save_grid(out / "samples.png", [imgs], nrow=min(8, args.n))
    cls = ""
    if args.class_label is not None:
        names = checkpoint_dir(args.checkpoint).parent.parent / "classes.json"
        label = args.class_label
        if names.is_file():
            label = f"{args.class_label} ({json.loads(names.read_text())[args.class_label]})"
        cls = f" of class {label}"
    speed = f", {stats.tokens_per_s:.0f} tokens/s" if stats is not None else ""
    if model.transformer.is_llama:
        scale = args.cfg_scale if args.cfg_scale is not None else model.transformer.config.cfg_scale
        speed += f", guidance scale {scale:g}" + (" (the checkpoint's)" if args.cfg_scale is None else "")
    print(f"{args.n} samples{cls} -> {out}/samples.png and sample_*.png{speed}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, minutes=args.minutes, device=args.device, seed=args.seed,
                    overwrite=args.overwrite, progress=not args.quiet, digits_minutes=args.digits_minutes)


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vqkernels", description="Fused vector-quantization kernels, and the VQGAN + GPT stack on them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    shown = dict(formatter_class=_ShowDefaults)
    pd = sub.add_parser("demo", help="train a small VQGAN and GPT on scikit-image's photographs (~10 min on 2 cores)",
                        **shown)
    pd.add_argument("--out", default="vqkernels-demo", help="output folder")
    pd.add_argument("--minutes", type=_number(float, "positive"), default=10.0,
                    help="time budget of the photographs' part")
    pd.add_argument("--digits-minutes", dest="digits_minutes", type=_number(float, "nonneg"), default=4.0,
                    help="time budget of the digits' part (class-conditional generation; 0: skip it)")
    pd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pd.add_argument("--seed", type=_number(int), default=0, help="random seed")
    pd.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    pd.add_argument("--quiet", action="store_true", help="no progress bars")
    pd.set_defaults(func=_cmd_demo)

    from .runs import GPTTrainConfig, VQGANTrainConfig

    pv = sub.add_parser("train-vqgan", help="train the VQGAN (first stage)")
    _add_train_flags(pv, VQGANTrainConfig)
    pv.set_defaults(func=_cmd_train_vqgan)

    pg = sub.add_parser("train-gpt", help="train the GPT over a trained VQGAN's codes (second stage)")
    _add_train_flags(pg, GPTTrainConfig)
    pg.set_defaults(func=_cmd_train_gpt)

    def vqgan_files_command(name, help, func, inputs, metavar, checkpoint_help=None, out_help=None, **kw):
        """A VQGAN command over files: --checkpoint DIR, --out DIR, --device, then the input files."""
        pf = sub.add_parser(name, help=help, **shown, **kw)
        pf.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
        pf.add_argument("--out", required=True, metavar="DIR", help=out_help)
        pf.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        pf.add_argument(inputs, nargs="+", metavar=metavar)
        pf.set_defaults(func=func)
        return pf

    pr = vqgan_files_command(
        "reconstruct", "images of any size through the VQGAN; prints each image's PSNR", _cmd_reconstruct,
        "images", "IMAGE", checkpoint_help="a train-vqgan run folder or a VQModel folder",
        out_help="where the reconstructions go (same file names, .png)",
        description="Images of any size through the VQGAN. An image larger than a tile (by default the model's "
                    "training size) goes through overlapping tiles of that size, blended without seams "
                    "(vqkernels.tiling): the model then sees what it trained on; --no-tile gives it the whole "
                    "image at once.")
    pr.add_argument("--tile", type=_number(int, "positive"), default=None, metavar="N",
                    help="tile side in pixels, a multiple of the downsampling factor (default: the model's training "
                         "size; as vqkernels eval --tiled)")
    pr.add_argument("--overlap", type=_number(int, "nonneg"), default=None, metavar="N",
                    help="least overlap of neighbouring tiles in pixels (default: half the tile)")
    pr.add_argument("--no-tile", dest="no_tile", action="store_true",
                    help="reconstruct each image whole, in one pass, whatever its size")
    vqgan_files_command("encode", "images -> code indices (<name>.npy, an (h, w) int64 array)", _cmd_encode,
                        "images", "IMAGE")
    vqgan_files_command("decode", "code indices (.npy, (h, w)) -> images (<name>.png)", _cmd_decode,
                        "codes", "CODES.npy")

    ps = sub.add_parser("sample", help="images sampled from a trained GPT + VQGAN", **shown)
    ps.add_argument("--checkpoint", required=True, metavar="DIR", help="a train-gpt run folder (or the demo's gpt/)")
    ps.add_argument("--out", required=True, metavar="DIR")
    ps.add_argument("--n", type=_number(int, "positive"), default=16, help="how many images")
    ps.add_argument("--class-label", dest="class_label", type=_number(int),
                    help="the class of a class-conditional model")
    ps.add_argument("--temperature", type=_number(float, "positive"), default=1.0, help="softmax temperature")
    ps.add_argument("--top-k", dest="top_k", type=_number(int, "positive"), default=100, help="sample among the k "
                    "likeliest codes")
    ps.add_argument("--top-p", dest="top_p", type=_number(float, "fraction"), default=None,
                    help="sample among the likeliest codes of this much probability")
    ps.add_argument("--cfg-scale", dest="cfg_scale", type=_number(float, "positive"), default=None,
                    help="classifier-free guidance scale of a llama GPT (>= 1; 1: none; default: the one stored "
                         "in the checkpoint)")
    ps.add_argument("--cfg-interval", dest="cfg_interval", type=_number(int), default=None,
                    help="guide only the first I+1 tokens (LlamaGen's cfg_interval; default: every token)")
    ps.add_argument("--seed", type=_number(int), default=0, help="random seed")
    ps.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ps.set_defaults(func=_cmd_sample)

    pi = sub.add_parser("info", help="versions, device, build and backend choice")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(func=_cmd_info)

    from . import evaluate, selftest

    pst = sub.add_parser("selftest", help="every kernel this machine can run, checked against the reference "
                                          "(run it after installing on a GPU machine)", **shown)
    selftest.add_arguments(pst)
    pst.set_defaults(func=selftest.main)

    pe = sub.add_parser("eval", help="a tokenizer's reconstruction quality on images: PSNR, SSIM, LPIPS, codebook "
                                     "usage and perplexity, rFID where its weights are present", **shown)
    evaluate.add_arguments(pe)
    pe.set_defaults(func=evaluate.main)
    return p


_OURS = {"demo", "train-vqgan", "train-gpt", "reconstruct", "encode", "decode", "sample"}


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"vqkernels: warning: {str(message).splitlines()[0]}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in _OURS:
        return args.func(args)
    from .data import DataError
    from .models._checkpoint import CheckpointError
    from .runs import TrainError

    old = warnings.showwarning
    warnings.showwarning = _one_line_warnings
    try:
        return args.func(args)
    except (UsageError, TrainError, DataError, CheckpointError) as e:
        # one line: a multi-line message (e.g. a list of mismatched keys) is joined
        msg = "; ".join(s.strip() for s in str(e).strip().splitlines() if s.strip())
        print(f"vqkernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vqkernels {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = old


if __name__ == "__main__":
    sys.exit(main())
