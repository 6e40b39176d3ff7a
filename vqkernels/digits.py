"""scikit-learn's handwritten digits as a labelled image data set, and the classifier that judges samples.

The data (``sklearn.datasets.load_digits``): 1,797 greyscale images of 8x8 pixels, 16 grey levels, 10 classes,
shipped inside scikit-learn (no download). A VQGAN needs more than 8x8 pixels (its codes are f x f pixels), so
the images are enlarged (bilinear) to ``size`` x ``size`` and repeated over the 3 channels, in [-1, 1] as every
image of the package. The held-out split is fixed by index (every ``HELD_OUT_EVERY``-th image), never random:
training and evaluation agree on it whatever the seed.

The judge: a support vector classifier (scikit-learn's SVC, no download) trained on the training digits. It
sees an image as the 64 features of the original data set: the grey image averaged back down to 8x8, on the
0..16 scale. Its own accuracy on the held-out real digits is the ceiling of the figure it gives generated
samples (:func:`class_agreement`: how often a sample is recognised as the digit it was asked for).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, _SeededItems

__all__ = ["DIGITS_SIZE", "HELD_OUT_EVERY", "DIGIT_CLASSES", "digits_arrays", "digits_split", "DigitsDataset",
           "digit_features", "DigitClassifier", "class_agreement"]

DIGITS_SIZE = 16        # the demo's size: 8x8 digits enlarged twice, a 4x4 grid of codes at f=4
HELD_OUT_EVERY = 5      # image i is held out when i % 5 == 0: 360 held-out digits, 1,437 to train on
DIGIT_CLASSES = [str(k) for k in range(10)]


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn "
                        "(or pip install 'vqkernels[demo]')") from None
    d = load_digits()
    return np.asarray(d.images, dtype=np.float32), np.asarray(d.target, dtype=np.int64)


def digits_arrays(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits -> (images (N, 3, size, size) float32 in [-1, 1], labels (N,) int64)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise DataError(f"digits: the image size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    images, labels = _load_digits()
    x = torch.from_numpy(images)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)
    return x, torch.from_numpy(labels)


def held_out_mask(n: int) -> torch.Tensor:
    return torch.arange(n) % HELD_OUT_EVERY == 0


class DigitsDataset(_SeededItems):
    """The digits as items of the training loop: image ``index`` (no augmentation: a flipped or shifted digit
    is another digit, or none); ``label(index)`` its digit. ``classes`` are '0'..'9'. ``fixed_items``: an item
    does not depend on its seed (so a GPT's training may encode the data set once)."""

    fixed_items = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        self.classes = list(DIGIT_CLASSES)

    def __len__(self):
        return self.images.shape[0]

    def get(self, index: int, seed: int) -> torch.Tensor:
        return self.images[index]

    def label(self, index: int) -> int:
        return int(self.labels[index])


@dataclass
class DigitsSplit:
    train: DigitsDataset
    held_out: DigitsDataset
    size: int


def digits_split(size: int = DIGITS_SIZE) -> DigitsSplit:
    """The fixed split: every HELD_OUT_EVERY-th digit held out (360), the others (1,437) for training."""
    x, y = digits_arrays(size)
    held = held_out_mask(x.shape[0])
    return DigitsSplit(DigitsDataset(x[~held], y[~held]), DigitsDataset(x[held], y[held]), size)


def digit_features(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] (any size >= 8) -> (N, 64) features as load_digits gives them: the grey
    image averaged down to 8x8, on the 0..16 scale."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or min(images.shape[-2:]) < 8:
        raise ValueError(f"images: expected (N, C, H, W) with H, W >= 8, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    grey = (images.detach().float().cpu().mean(1, keepdim=True).clamp(-1, 1) + 1) / 2  # (N, 1, H, W) in [0, 1]
    return (F.adaptive_avg_pool2d(grey, 8) * 16).flatten(1).numpy().astype(np.float64)


class DigitClassifier:
    """An SVC (RBF kernel, scikit-learn's defaults) on :func:`digit_features` of the training digits at
    ``size``. ``held_out_accuracy``: its accuracy on the held-out real digits."""

    def __init__(self, size: int = DIGITS_SIZE):
        from sklearn.svm import SVC

        split = digits_split(size)
        self.size = size
        self.svc = SVC().fit(digit_features(split.train.images), split.train.labels.numpy())
        self.held_out_accuracy = self.accuracy(split.held_out.images, split.held_out.labels)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svc.predict(digit_features(images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        return float((self.predict(images) == labels).mean())


def class_agreement(classifier: DigitClassifier, images: torch.Tensor, labels) -> dict:
    """How often generated ``images`` (N, 3, H, W) are recognised as the digit they were asked for (``labels``
    (N,)): the overall fraction, per class, and how many of each class's samples are distinct images (a class
    that repeats one image is not generating)."""
    labels = torch.as_tensor(labels).cpu()
    pred = torch.from_numpy(classifier.predict(images))
    ok = pred == labels
    per_class, distinct = {}, {}
    flat = images.detach().float().cpu().flatten(1)
    for k in sorted(set(labels.tolist())):
        m = labels == k
        per_class[str(k)] = round(float(ok[m].float().mean()), 4)
        # distinct on the 0..255 grid the pictures are written with
        distinct[str(k)] = int(torch.unique(((flat[m].clamp(-1, 1) + 1) * 127.5).round(), dim=0).shape[0])
    return {"agreement": round(float(ok.float().mean()), 4), "per_class": per_class, "distinct_per_class": distinct,
            "samples": int(labels.numel())}
