"""Images for training: any folder of images, and an embedded default that needs no download.

- :class:`ImageFolder`: every ``.jpg/.jpeg/.png/.webp/.bmp`` under a folder (recursive), decoded by PIL
  and converted to RGB (grayscale is replicated, RGBA/LA lose their alpha, palettes are expanded).
  Each item is one random crop of one image: optionally the short side is resized to ``resize`` first;
  an image whose short side is smaller than the crop is **resized up** so that its short side equals the
  crop (never skipped); then a random ``crop_size`` square and a random horizontal flip; optionally
  (``color_augment``) a random colour change (:func:`color_jitter`: channel order, saturation, hue); optionally
  (``tint_grey``) a random tint of a grey crop (:func:`tint`: a hue and saturation, its brightness kept).
  Unreadable or corrupt files are skipped with one warning that counts them; a folder with no readable
  image is an error (:class:`DataError`).
- :func:`load_image` / :func:`save_image` / :func:`save_grid`: one image file in, one out (atomically), a grid.
- :func:`embedded_dataset`: the real photographs that scikit-image ships inside its package (astronaut,
  chelsea, coffee, rocket, the Hubble deep field, ...; not its synthetic, binary or text images), at their
  own size (a short side above 512 reduced to 512), with a held-out split by image: the held-out images are never trained
  on. Training items are random crops (as above); held-out items are a fixed grid of crops.

Randomness never comes from a global generator: the sampler hands each item an integer seed derived
from (run seed, epoch, index), and the crop/flip (and colour) are drawn from a ``torch.Generator`` seeded with it.
So the data a step sees depends only on the seed and the step, whatever the number of workers or
processes, which is what makes ``--resume`` exact and DistributedDataParallel ranks disjoint.
Tensors are float32 (3, H, W) in [-1, 1] (taming's convention).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._io import atomic_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# scikit-image's bundled real photographs that need no download (scikit-image 0.2x): name -> loader
# attribute of skimage.data. Left out on purpose: synthetic (checkerboard, colorwheel, logo, phantom,
# binary_blobs), binary (horse), text (page, text), tiny (lfw_subset 25x25, microaneurysms 102x102), and
# duplicates (cat == chelsea, motorcycle right ~ left).
EMBEDDED_IMAGES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket",
)
# held out by image, never trained on: the three everyday photographs (a cat, a cameraman, a cup of coffee);
# training keeps the other photographs, the textures and the scientific images
EMBEDDED_HELD_OUT = ("chelsea", "camera", "coffee")
EMBEDDED_SHORT_SIDE = 512


class DataError(ValueError):
    """A data source that cannot be used; the message says which and why (one line)."""


def to_image(t: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL RGB image (rounded to uint8)."""
    from PIL import Image

    a = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def save_image(t: torch.Tensor, path) -> None:
    """(3, H, W) in [-1, 1] -> a PNG file, written atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        to_image(t).save(tmp, format="PNG")


def save_grid(path, rows: list[torch.Tensor], nrow: int) -> None:
    """A PNG grid of (N, 3, H, W) tensors in [-1, 1] (``nrow`` images a row), written atomically."""
    from torchvision.utils import save_image as save_tensor_image

    x = torch.cat([r.detach().float().cpu() for r in rows]).clamp(-1, 1) * 0.5 + 0.5
    with atomic_path(path, suffix=".png") as tmp:  # (save_image picks the format from the extension)
        save_tensor_image(x, tmp, nrow=nrow, padding=2, pad_value=1.0)


def from_image(img) -> torch.Tensor:
    """PIL image (any mode) -> float32 (3, H, W) in [-1, 1]."""
    from torchvision.transforms import functional as TF

    return TF.to_tensor(img.convert("RGB")) * 2 - 1


def load_image(path) -> torch.Tensor:
    """Decode one image file to float32 (3, H, W) in [-1, 1]; raises DataError naming the file if it cannot."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return from_image(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def list_images(root) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted); DataError if the folder is missing or has none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"data folder {root} holds no image ({', '.join(IMAGE_EXTENSIONS)}), searched recursively")
    return files


def _resize_short(img: torch.Tensor, short: int) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if min(img.shape[-2:]) == short:
        return img
    return TF.resize(img, short, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp_(-1, 1)


# Colour augmentation (color_augment=True): what a model trained on a dozen photographs needs so as not to learn
# their palette (a model trained without it turned greens red and a teal background grey on photographs it never
# saw), at no cost to a CPU's time budget (three cheap operations on a small crop). Each crop gets a random channel
# order (the 6 permutations equally likely), then its saturation scaled by a factor log-uniform in
# COLOR_SATURATION, then its hue rotated by a uniform shift in [-COLOR_HUE, COLOR_HUE] turns of the colour circle.
# Grey pixels stay as they are: the brightness structure of a crop is kept, its colours change.
# Measured (issue 25, the demo's VQGAN config, 3,265 steps of 32x32 crops, 2-core CPU): as it stands it costs more
# than it gives at that budget: held-out crops 23.2 dB with it against 27.6 dB without, and unseen photographs
# lose colour (coffee 14.1 dB vs 23.8 tiled; their brightness is reconstructed as well as without): so it is off
# by default and off in the demo; a gentler setting (a probability, smaller shifts) or a longer run is untested.
COLOR_HUE = 0.5
COLOR_SATURATION = (0.5, 1.5)


def color_jitter(img: torch.Tensor, hue: float = 0.0, saturation: float = 1.0, order=(0, 1, 2)) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> its channels in ``order``, saturation scaled by ``saturation`` (torchvision's
    adjust_saturation: a blend with the grey image, clipped), hue rotated by ``hue`` turns (adjust_hue, in
    [-0.5, 0.5]); in [-1, 1]. The identity for (0.0, 1.0, (0, 1, 2))."""
    from torchvision.transforms import functional as TF

    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"order: expected a permutation of (0, 1, 2), got {order!r}")
    if not -0.5 <= hue <= 0.5:
        raise ValueError(f"hue: expected a shift in [-0.5, 0.5] turns, got {hue!r}")
    if not saturation >= 0:
        raise ValueError(f"saturation: expected a factor >= 0, got {saturation!r}")
    x = img[list(order)] if tuple(order) != (0, 1, 2) else img
    if saturation == 1.0 and hue == 0.0:
        return x.contiguous()
    x = (x + 1) * 0.5
    if saturation != 1.0:
        x = TF.adjust_saturation(x, float(saturation))
    if hue != 0.0:
        x = TF.adjust_hue(x, float(hue))
    return (x * 2 - 1).clamp_(-1, 1).contiguous()


# Tinting grey crops (tint_grey=True): half of the embedded training photographs are grey (brick, grass, gravel,
# the moon, ...), and the colour ones have almost no green, so a model trained on them turned a photograph's
# teal-green leaves blue. A grey crop is, with probability TINT_P, given one random hue (uniform on the colour
# circle) at a saturation uniform in TINT_SATURATION, its brightness (Rec. 601 luma) kept: textures in every colour,
# while the colour photographs keep their own colours (recolouring those instead, color_augment, cost more than it
# gave at the demo's budget: see above). Measured: the README's table of the demo's VQGAN.
TINT_P = 0.75
TINT_SATURATION = (0.15, 0.75)
_LUMA = (0.299, 0.587, 0.114)


def tint(img: torch.Tensor, hue: float, saturation: float) -> torch.Tensor:
    """(3, H, W) grey image in [-1, 1] -> the same brightness in one colour: each pixel of brightness y becomes
    ``y * c / luma(c)``, c the colour of ``hue`` (turns, in [0, 1)) and ``saturation`` (in [0, 1]) at full value,
    so that its luma stays y (clipped to [-1, 1] where the colour cannot be that bright). Saturation 0: the identity
    on a grey image."""
    import colorsys

    if not 0.0 <= hue < 1.0:
        raise ValueError(f"hue: expected turns in [0, 1), got {hue!r}")
    if not 0.0 <= saturation <= 1.0:
        raise ValueError(f"saturation: expected a value in [0, 1], got {saturation!r}")
    c = torch.tensor(colorsys.hsv_to_rgb(hue, saturation, 1.0), dtype=img.dtype, device=img.device)
    c = c / sum(w * v for w, v in zip(_LUMA, c))
    return (((img + 1) * 0.5) * c[:, None, None] * 2 - 1).clamp_(-1, 1).contiguous()


def is_grey(img: torch.Tensor, tol: float = 1e-3) -> bool:
    """Whether the three channels of (3, H, W) ``img`` agree to within ``tol`` everywhere (a grey image)."""
    return bool((img[0] - img[1]).abs().max() <= tol and (img[1] - img[2]).abs().max() <= tol)


def random_color(g: torch.Generator) -> tuple[float, float, tuple]:
    """(hue, saturation, order) of one crop's colour augmentation, drawn from ``g`` (always the same draws)."""
    order = tuple(torch.randperm(3, generator=g).tolist())
    u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    lo, hi = np.log(COLOR_SATURATION[0]), np.log(COLOR_SATURATION[1])
    return (2 * u[0] - 1) * COLOR_HUE, float(np.exp(lo + (hi - lo) * u[1])), order


def random_crop(img: torch.Tensor, crop_size: int, seed: int, flip: bool = True,
                color_augment: bool = False, tint_grey: bool = False) -> torch.Tensor:
    """A random ``crop_size`` square of (3, H, W) ``img`` and a random horizontal flip, drawn from ``seed``; with
    ``color_augment`` also a random colour change (:func:`random_color`, drawn after the crop and flip, so the
    crop and flip are those of ``color_augment=False``); with ``tint_grey``, a grey crop is tinted (:func:`tint`)
    with probability TINT_P (drawn last: the crop, flip and colour change are those without it).

    An image whose short side is below ``crop_size`` is resized up first (short side = crop_size)."""
    from torchvision.transforms import functional as TF

    if min(img.shape[-2:]) < crop_size:
        img = _resize_short(img, crop_size)
    g = torch.Generator().manual_seed(int(seed))
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - crop_size + 1, (1,), generator=g))
    left = int(torch.randint(0, w - crop_size + 1, (1,), generator=g))
    out = TF.crop(img, top, left, crop_size, crop_size)
    if flip and bool(torch.rand((), generator=g) < 0.5):
        out = TF.hflip(out)
    if color_augment:
        hue, sat, order = random_color(g)
        out = color_jitter(out, hue, sat, order)
    if tint_grey:
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        if u[0] < TINT_P and is_grey(out):
            lo, hi = TINT_SATURATION
            out = tint(out, u[1], lo + (hi - lo) * u[2])
    return out.contiguous()


def grid_crops(img: torch.Tensor, crop_size: int) -> list[torch.Tensor]:
    """Non-overlapping ``crop_size`` squares covering (3, H, W) ``img`` (centred; the remainder is cut)."""
    if min(img.shape[-2:]) < crop_size:
        img = _resize_short(img, crop_size)
    h, w = img.shape[-2:]
    ny, nx = h // crop_size, w // crop_size
    y0, x0 = (h - ny * crop_size) // 2, (w - nx * crop_size) // 2
    return [img[:, y0 + i * crop_size: y0 + (i + 1) * crop_size, x0 + j * crop_size: x0 + (j + 1) * crop_size].contiguous()
            for i in range(ny) for j in range(nx)]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation: a function of (seed, epoch, index) only (a 63-bit mix)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1))


class _SeededItems(Dataset):
    """Items addressed as (index, seed): the sampler decides the randomness (see module doc).

    ``classes`` names the class of each label; with ``with_labels = True`` an item is (image, label)."""

    classes: list = []
    with_labels: bool = False

    def __len__(self):
        raise NotImplementedError

    def get(self, index: int, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_default_seed(key))
        img = self.get(int(index), int(seed))
        return (img, self.label(int(index))) if self.with_labels else img


def index_default_seed(index: int) -> int:
    return item_seed(0, 0, index)


class ImageFolder(_SeededItems):
    """Random crops of every image under ``root`` (see module doc). ``resize``: short side before cropping
    (None: keep the size; images smaller than the crop are always resized up). ``flip``: random
    horizontal flips. ``color_augment``: random colours, ``tint_grey``: random tints of grey crops
    (:func:`random_crop`). ``preload``: decode every image
    once and keep it in memory (small folders)."""

    def __init__(self, root, crop_size: int = 64, resize: int | None = None, flip: bool = True, preload: bool = False,
                 color_augment: bool = False, tint_grey: bool = False):
        from PIL import Image, UnidentifiedImageError

        if crop_size < 1:
            raise DataError(f"crop_size must be a positive integer, got {crop_size}")
        self.root, self.crop_size, self.resize, self.flip = Path(root), int(crop_size), resize, flip
        self.color_augment, self.tint_grey = bool(color_augment), bool(tint_grey)
        files, bad = [], []
        for p in list_images(root):
            try:  # header + structure check; decoding errors found later are handled in get()
                with Image.open(p) as im:
                    im.verify()
                files.append(p)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
                bad.append(p)
        if not files:
            raise DataError(f"data folder {root} holds no readable image ({len(bad)} file(s) could not be read, "
                            f"e.g. {bad[0].name})")
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) under {root} (first: {bad[0]})", stacklevel=2)
        self.files = files
        self.skipped = len(bad)
        # classes: the top-level subfolders (torchvision's ImageFolder convention); files directly under root
        # have none (a conditional model refuses such a folder)
        tops = [p.relative_to(self.root).parts[0] if len(p.relative_to(self.root).parts) > 1 else None for p in files]
        self.classes = sorted({t for t in tops if t is not None})
        self._labels = [self.classes.index(t) if t is not None else -1 for t in tops]
        self._cache: dict[int, torch.Tensor] = {}
        self._late_bad: set[int] = set()
        if preload:
            for i in range(len(files)):
                self._image(i)

    def __len__(self):
        return len(self.files)

    def label(self, index: int) -> int:
        return self._labels[index]

    def _image(self, i: int) -> torch.Tensor:
        img = self._cache.get(i)
        if img is None:
            img = load_image(self.files[i])
            if self.resize:
                img = _resize_short(img, int(self.resize))
            if len(self._cache) < 4096:
                self._cache[i] = img
        return img

    def get(self, index: int, seed: int) -> torch.Tensor:
        # a file that passed verify() but fails to decode: take the next readable one (deterministically)
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            if i in self._late_bad:
                continue
            try:
                img = self._image(i)
            except DataError as e:
                self._late_bad.add(i)
                warnings.warn(f"skipping an image that cannot be decoded: {e}", stacklevel=2)
                continue
            return random_crop(img, self.crop_size, seed, self.flip, self.color_augment, self.tint_grey)
        raise DataError(f"no image under {self.root} could be decoded")


class CropsOfImages(_SeededItems):
    """Random crops of in-memory images: image ``i`` appears ``max(1, area // crop^2)`` times an epoch, so
    an epoch covers each image about once. ``flip`` / ``color_augment`` / ``tint_grey``: as :func:`random_crop`."""

    def __init__(self, images: list[torch.Tensor], crop_size: int, flip: bool = True, names=None,
                 color_augment: bool = False, tint_grey: bool = False):
        self.images, self.crop_size, self.flip = images, int(crop_size), flip
        self.color_augment, self.tint_grey = bool(color_augment), bool(tint_grey)
        self.names = list(names) if names is not None else [str(i) for i in range(len(images))]
        self.classes = self.names  # the class of a crop is the image it comes from
        self.owner = []
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            self.owner += [i] * max(1, (max(h, crop_size) * max(w, crop_size)) // (crop_size * crop_size))

    def __len__(self):
        return len(self.owner)

    def get(self, index: int, seed: int) -> torch.Tensor:
        return random_crop(self.images[self.owner[index]], self.crop_size, seed, self.flip, self.color_augment,
                           self.tint_grey)

    def label(self, index: int) -> int:
        return self.owner[index]


class FixedCrops(Dataset):
    """A fixed list of (3, h, w) tensors (held-out crops): no randomness."""

    def __init__(self, crops: list[torch.Tensor]):
        self.crops = crops

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, key):
        return self.crops[key[0] if isinstance(key, tuple) else key]


@dataclass
class EmbeddedSplit:
    train: CropsOfImages
    held_out: FixedCrops
    train_names: tuple
    held_out_names: tuple


def embedded_images(short_side: int = EMBEDDED_SHORT_SIDE) -> dict[str, torch.Tensor]:
    """scikit-image's bundled photographs (EMBEDDED_IMAGES), RGB, at their own size except that a short side
    above ``short_side`` is reduced to it (never enlarged: that would add no detail)."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise DataError("the embedded images need scikit-image: pip install scikit-image "
                        "(or pip install 'vqkernels[demo]')") from None
    from PIL import Image

    out = {}
    for name in EMBEDDED_IMAGES:
        arr = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        img = from_image(Image.fromarray(np.ascontiguousarray(arr)))
        out[name] = _resize_short(img, short_side) if min(img.shape[-2:]) > short_side else img
    return out


def embedded_dataset(crop_size: int = 64, short_side: int = EMBEDDED_SHORT_SIDE, held_out=EMBEDDED_HELD_OUT,
                     flip: bool = True, color_augment: bool = False, tint_grey: bool = False) -> EmbeddedSplit:
    """The embedded default: training crops of the training images (``color_augment``: random colours,
    ``tint_grey``: random tints of the grey ones), a fixed grid of crops of the held-out ones (never augmented)."""
    imgs = embedded_images(short_side)
    unknown = [n for n in held_out if n not in imgs]
    if unknown:
        raise DataError(f"unknown held-out image(s) {unknown}; the embedded images are {list(imgs)}")
    train_names = tuple(n for n in imgs if n not in held_out)
    train = CropsOfImages([imgs[n] for n in train_names], crop_size, flip, names=train_names,
                          color_augment=color_augment, tint_grey=tint_grey)
    held = FixedCrops([c for n in held_out for c in grid_crops(imgs[n], crop_size)])
    return EmbeddedSplit(train, held, train_names, tuple(held_out))


def open_dataset(source: str, crop_size: int, resize: int | None = None, flip: bool = True,
                 color_augment: bool = False, tint_grey: bool = False):
    """``"embedded"`` -> (training crops, held-out crops); ``"digits"`` -> (training digits, held-out digits),
    scikit-learn's handwritten digits enlarged to crop_size (:mod:`vqkernels.digits`, labelled by digit);
    a folder -> (ImageFolder, None). ``color_augment``: random colours of the training crops of photographs (the
    grey digits have none to change: ignored there); ``tint_grey``: random tints of grey crops of photographs
    (not of the digits either)."""
    if str(source) == "digits":
        from .digits import digits_split

        split = digits_split(int(crop_size))
        return split.train, split.held_out
    if str(source) == "embedded":
        split = embedded_dataset(crop_size, flip=flip, color_augment=color_augment, tint_grey=tint_grey)
        return split.train, split.held_out
    return ImageFolder(source, crop_size, resize=resize, flip=flip, preload=False, color_augment=color_augment,
                       tint_grey=tint_grey), None


class SeededBatches:
    """The batch sampler of training: batch ``step`` of this rank, as lists of (index, seed).

    Built on ``DistributedSampler`` (``num_replicas``/``rank`` given, so it also works without
    torch.distributed): each epoch a permutation seeded with (seed, epoch), split across ranks; the
    last incomplete batch is dropped. Batch ``step`` is a pure function of (seed, step), so starting at
    ``start_step`` (a resume) gives exactly the batches an uninterrupted run would have seen."""

    def __init__(self, dataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 steps: int | None = None):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.seed, self.start_step, self.steps = int(batch_size), int(seed), int(start_step), steps
        self.per_epoch = len(self.sampler) // self.batch_size
        if self.per_epoch == 0:
            raise DataError(f"the data has {len(dataset)} item(s), fewer than one batch of {batch_size} per process "
                            f"({world} process(es)); lower --batch-size")

    def __len__(self):
        return (self.steps - self.start_step) if self.steps is not None else 1 << 62

    def __iter__(self):
        step = self.start_step
        while self.steps is None or step < self.steps:
            epoch, k = divmod(step, self.per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for b in range(k, self.per_epoch):
                if self.steps is not None and step >= self.steps:
                    return
                yield [(i, item_seed(self.seed, epoch, i)) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
                step += 1


def default_workers() -> int:
    """DataLoader workers: none on a small CPU (decoding in-process beats the worker overhead there)."""
    n = os.cpu_count() or 1
    return 0 if n <= 4 else min(8, n // 2)
