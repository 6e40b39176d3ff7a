"""The `vqkernels` command.

    vqkernels demo [--out DIR] [--minutes M]      train a small VQGAN, then a small GPT, on scikit-image's
                                                  photographs; pictures, loss curves and metrics.json in DIR
    vqkernels train-vqgan [--config YAML] [flags] the first stage on a folder of images (or "embedded")
    vqkernels train-gpt --vqgan DIR [flags]       the second stage over a trained VQGAN's codes
    vqkernels reconstruct --checkpoint DIR --out DIR IMAGE...
    vqkernels encode --checkpoint DIR --out DIR IMAGE...      images -> code indices (.npy, (h, w) int64)
    vqkernels decode --checkpoint DIR --out DIR CODES.npy...  code indices -> images (.png)
    vqkernels sample --checkpoint DIR [--n 16] [--class-label C] --out DIR
    vqkernels info                 versions, device, what _C was built with, the backend each op picks
    vqkernels bench [options]      the benchmark suite (defaults: this machine's sizes); see --help

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


class UsageError(Exception):
    """Bad input found after parsing: printed as one line, exit status 2."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


# ---------------------------------------------------------------------------------------------
# info and bench (owned elsewhere; kept as they were)

def _cmd_info(args) -> int:
    import vqkernels

    if args.json:
        print(json.dumps(vqkernels.info(), indent=2, default=str))
    else:
        print(vqkernels.info(as_text=True))
    return 0


def _cmd_bench(args) -> int:
    from .bench import runner

    return int(runner.run(args) or 0)


# ---------------------------------------------------------------------------------------------
# training

# flag name -> config key; flags left out (None) do not override the YAML or the defaults
_TRAIN_FLAGS = ("data", "out", "steps", "batch_size", "lr", "seed", "device", "precision", "compile", "crop_size",
                "minutes", "num_workers", "log_every", "image_every", "checkpoint_every")


def _add_train_flags(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--config", metavar="YAML", help="a YAML file of config keys (flags given here win over it)")
    p.add_argument("--data", metavar="DIR", help="a folder of images (searched recursively) or 'embedded' "
                   "(scikit-image's photographs, the default)")
    p.add_argument("--out", metavar="DIR", help=f"the run folder (default runs/{kind})")
    p.add_argument("--steps", type=_positive_int, help="total optimizer steps of the run")
    p.add_argument("--batch-size", dest="batch_size", type=_positive_int, help="images per step (per process)")
    p.add_argument("--lr", type=_positive_float, help="learning rate")
    p.add_argument("--seed", type=int, help="random seed (weights, data order, crops)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="fp32 (default) or bf16 autocast")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--crop-size", dest="crop_size", type=_positive_int, help="square crop size in pixels (default 64)")
    p.add_argument("--minutes", type=_positive_float, help="stop (with a checkpoint) after this much training time")
    p.add_argument("--num-workers", dest="num_workers", type=_nonneg_int, help="DataLoader worker processes")
    p.add_argument("--log-every", dest="log_every", type=_positive_int, help="steps between log lines")
    p.add_argument("--image-every", dest="image_every", type=_positive_int, help="steps between PNG grids")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=_positive_int, help="steps between checkpoints")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
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


def _overrides(args, extra=()) -> dict:
    d = _read_yaml(args.config) if args.config else {}
    for k in _TRAIN_FLAGS + tuple(extra):
        v = getattr(args, k, None)
        if v is not None:
            d[k] = v
    return d


def _train(args, kind: str) -> int:
    from . import train as T

    cls = T.VQGANTrainConfig if kind == "vqgan" else T.GPTTrainConfig
    extra = ("vqgan", "conditional") if kind == "gpt" else ()
    overrides = _overrides(args, extra)
    where = f"--config {args.config}" if args.config else "flags"
    cfg = T.resolve_config(cls, overrides, overrides.get("out", cls.out), resume=args.resume, where=where)
    fn = T.train_vqgan if kind == "vqgan" else T.train_gpt
    summary = fn(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if not _is_main_rank():
        return 0
    ck = T.checkpoint_dir(cfg.out)
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
    from .train import resolve_device

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


def _vqgan_job(args, ext: str):
    """What reconstruct and encode share: the images (read first, so a bad one fails before any work), the VQGAN
    checkpoint, the output folder and one output path per image, the downsampling factor and the model's device."""
    from .train import load_model

    imgs = _load_images(args.images)
    paths = [Path(p) for p in args.images]
    model = load_model(args.checkpoint, "vqgan", _device(args))
    outs = _outputs(paths, _out_dir(args.out), ext)
    return paths, imgs, model, outs, model.config.downsample_factor, next(model.parameters()).device


def _cmd_reconstruct(args) -> int:
    import torch

    from .data import to_image

    paths, imgs, model, outs, f, device = _vqgan_job(args, ".png")
    psnrs = []
    with torch.no_grad():
        for p, o, img in zip(paths, outs, imgs):
            x, (H, W) = _pad_to(img[None].to(device), f)
            rec = model(x)[0][..., :H, :W].float().clamp(-1, 1).cpu()
            mse = float(((rec[0] - img) * 0.5).pow(2).mean())
            psnr = 10 * __import__("math").log10(1.0 / max(mse, 1e-12))
            psnrs.append(psnr)
            _save_png(to_image(rec[0]), o)
            print(f"{p}: PSNR {psnr:.2f} dB -> {o}")
    if len(psnrs) > 1:
        print(f"mean PSNR {sum(psnrs) / len(psnrs):.2f} dB over {len(psnrs)} images")
    return 0


def _save_png(img, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _cmd_encode(args) -> int:
    import numpy as np
    import torch

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
            tmp = o.with_name("." + o.name + ".tmp.npy")
            np.save(tmp, idx)
            os.replace(tmp, o)
            print(f"{p}: {idx.shape[0]}x{idx.shape[1]} codes -> {o}")
    return 0


def _cmd_decode(args) -> int:
    import numpy as np
    import torch

    from .data import to_image
    from .train import load_model

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
            _save_png(to_image(img), o)
            print(f"{p} -> {o}")
    return 0


def _cmd_sample(args) -> int:
    import torch

    from .data import to_image
    from .train import checkpoint_dir, load_model

    model = load_model(args.checkpoint, "gpt", _device(args))
    n_classes = model.config.n_classes
    if args.class_label is not None:
        if n_classes is None:
            raise UsageError("--class-label: this GPT is unconditional (trained without --conditional)")
        if not 0 <= args.class_label < n_classes:
            raise UsageError(f"--class-label {args.class_label}: the model has classes 0..{n_classes - 1}")
    elif n_classes is not None:
        raise UsageError(f"--class-label: this GPT is class-conditional; give a class in 0..{n_classes - 1}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    out = _out_dir(args.out)
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(args.seed)
    imgs = model.sample(args.n, class_label=args.class_label, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, generator=g).float().clamp(-1, 1).cpu()
    stats = getattr(model.transformer, "last_generate_stats", None)
    from .train import _save_grid

    for i, img in enumerate(imgs):
        _save_png(to_image(img), out / f"sample_{i:03d}.png")
    _save_grid(out / "samples.png", [imgs], nrow=min(8, args.n))
    cls = ""
    if args.class_label is not None:
        names = checkpoint_dir(args.checkpoint).parent.parent / "classes.json"
        label = args.class_label
        if names.is_file():
            label = f"{args.class_label} ({json.loads(names.read_text())[args.class_label]})"
        cls = f" of class {label}"
    speed = f", {stats.tokens_per_s:.0f} tokens/s" if stats is not None else ""
    print(f"{args.n} samples{cls} -> {out}/samples.png and sample_*.png{speed}")
    return 0


def _cmd_demo(args) -> int:
    from .train import run_demo

    return run_demo(out=args.out, minutes=args.minutes, device=args.device, seed=args.seed,
                    overwrite=args.overwrite, progress=not args.quiet)


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vqkernels", description="Fused vector-quantization kernels, and the VQGAN + GPT stack on them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pd = sub.add_parser("demo", help="train a small VQGAN and GPT on scikit-image's photographs (~10 min on 2 cores)")
    pd.add_argument("--out", default="vqkernels-demo", help="output folder (default ./vqkernels-demo)")
    pd.add_argument("--minutes", type=_positive_float, default=10.0, help="total time budget (default 10)")
    pd.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    pd.add_argument("--quiet", action="store_true", help="no progress bars")
    pd.set_defaults(func=_cmd_demo)

    pv = sub.add_parser("train-vqgan", help="train the VQGAN (first stage)")
    _add_train_flags(pv, "vqgan")
    pv.set_defaults(func=_cmd_train_vqgan)

    pg = sub.add_parser("train-gpt", help="train the GPT over a trained VQGAN's codes (second stage)")
    pg.add_argument("--vqgan", metavar="DIR", help="the first stage: a train-vqgan run folder or a VQModel folder")
    pg.add_argument("--conditional", action="store_true", default=None,
                    help="class-conditional on the top-level subfolder (embedded: on the photograph)")
    _add_train_flags(pg, "gpt")
    pg.set_defaults(func=_cmd_train_gpt)

    def vqgan_files_command(name, help, func, inputs, metavar, checkpoint_help=None, out_help=None):
        """A VQGAN command over files: --checkpoint DIR, --out DIR, --device, then the input files."""
        pf = sub.add_parser(name, help=help)
        pf.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
        pf.add_argument("--out", required=True, metavar="DIR", help=out_help)
        pf.add_argument("--device", default="auto")
        pf.add_argument(inputs, nargs="+", metavar=metavar)
        pf.set_defaults(func=func)

    vqgan_files_command("reconstruct", "images through the VQGAN; prints each image's PSNR", _cmd_reconstruct,
                        "images", "IMAGE", checkpoint_help="a train-vqgan run folder or a VQModel folder",
                        out_help="where the reconstructions go (same file names, .png)")
    vqgan_files_command("encode", "images -> code indices (<name>.npy, an (h, w) int64 array)", _cmd_encode,
                        "images", "IMAGE")
    vqgan_files_command("decode", "code indices (.npy, (h, w)) -> images (<name>.png)", _cmd_decode,
                        "codes", "CODES.npy")

    ps = sub.add_parser("sample", help="images sampled from a trained GPT + VQGAN")
    ps.add_argument("--checkpoint", required=True, metavar="DIR", help="a train-gpt run folder (or the demo's gpt/)")
    ps.add_argument("--out", required=True, metavar="DIR")
    ps.add_argument("--n", type=_positive_int, default=16, help="how many images (default 16)")
    ps.add_argument("--class-label", dest="class_label", type=int, help="the class of a class-conditional model")
    ps.add_argument("--temperature", type=_positive_float, default=1.0)
    ps.add_argument("--top-k", dest="top_k", type=_positive_int, default=100)
    ps.add_argument("--top-p", dest="top_p", type=float, default=None)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--device", default="auto")
    ps.set_defaults(func=_cmd_sample)

    pi = sub.add_parser("info", help="versions, device, build and backend choice")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(func=_cmd_info)
    pb = sub.add_parser("bench", help="run the benchmark suite and write stamped CSV/JSON/plot")
    try:
        from .bench import runner

        runner.add_arguments(pb)
    except ImportError as e:  # pragma: no cover -- the bench package ships with vqkernels
        pb.add_argument("--_unavailable", default=str(e))
    pb.set_defaults(func=_cmd_bench)
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
    from .train import TrainError

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
