"""vqkernels.data: image folders, the embedded photographs, and the seeded batch order."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from vqkernels.data import (DataError, ImageFolder, SeededBatches, embedded_dataset, from_image, grid_crops,
                            list_images, random_crop, to_image)

PIL = pytest.importorskip("PIL.Image")


def _write_images(root, rng):
    """A folder of small images in every supported format and mode, nested, plus files to ignore."""
    from PIL import Image

    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    rgb = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(root / "a" / "deep" / "gray.jpg")  # L
    Image.fromarray(np.dstack([rgb, np.full((40, 52), 128, np.uint8)])).save(root / "b" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "b" / "palette.bmp")
    Image.fromarray(rgb).save(root / "b" / "photo.webp")
    Image.fromarray(rgb[:20, :13]).save(root / "b" / "small.JPEG")  # smaller than a 32 crop, upper-case suffix
    (root / "b" / "notes.txt").write_text("not an image")


def test_folder_recursive_all_formats_and_modes(tmp_path):
    _write_images(tmp_path, np.random.default_rng(0))
    files = list_images(tmp_path)
    assert sorted(p.name for p in files) == sorted(
        ["rgb.png", "gray.jpg", "rgba.png", "palette.bmp", "photo.webp", "small.JPEG"])
    ds = ImageFolder(tmp_path, crop_size=32)
    assert len(ds) == 6 and ds.skipped == 0
    assert ds.classes == ["a", "b"]
    for i in range(len(ds)):
        x = ds[(i, 123 + i)]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    gray = ds[([p.name for p in ds.files].index("gray.jpg"), 5)]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale replicated into RGB


def test_smaller_than_crop_is_resized_up():
    img = torch.rand(3, 20, 13) * 2 - 1
    out = random_crop(img, 32, seed=1)
    assert out.shape == (3, 32, 32)


def test_crops_are_a_function_of_the_seed(tmp_path):
    _write_images(tmp_path, np.random.default_rng(1))
    ds = ImageFolder(tmp_path, crop_size=16)
    assert torch.equal(ds[(0, 7)], ds[(0, 7)])
    assert torch.equal(ImageFolder(tmp_path, crop_size=16)[(0, 7)], ds[(0, 7)])  # a fresh dataset: the same crop
    assert any(not torch.equal(ds[(0, 7)], ds[(0, s)]) for s in range(8, 16))
    # the global RNG is neither used nor changed
    state = torch.get_rng_state()
    ds[(1, 3)]
    assert torch.equal(state, torch.get_rng_state())


def test_flip_is_a_horizontal_mirror():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)[0] / 100 - 0.2
    seen = {random_crop(img, 4, seed=s, flip=True).flip(-1).equal(img) for s in range(20)}
    assert seen == {True, False}  # some seeds flip, some do not
    assert all(random_crop(img, 4, seed=s, flip=False).equal(img) for s in range(5))


def test_corrupt_files_skipped_with_one_counting_warning(tmp_path):
    _write_images(tmp_path, np.random.default_rng(2))
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageFolder(tmp_path, crop_size=16)
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "skipped 2 unreadable" in msgs[0], msgs
    assert len(ds) == 6 and ds.skipped == 2


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "only_corrupt", "a_file"])
def test_unusable_folders_are_errors(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "readme.txt").write_text("hello")
    if case == "only_corrupt":
        (root / "x.png").write_bytes(b"not a png")
    if case == "a_file":
        root.rmdir()
        root.write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError) as e:
            ImageFolder(root, crop_size=16)
    msg = str(e.value)
    assert str(root) in msg and "\n" not in msg
    expected = {"missing": "does not exist", "empty": "holds no image", "no_images": "holds no image",
                "only_corrupt": "no readable image", "a_file": "not a folder"}[case]
    assert expected in msg


def test_image_round_trip_uint8():
    a = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    from PIL import Image

    t = from_image(Image.fromarray(a))
    assert np.array_equal(np.asarray(to_image(t)), a)


def test_grid_crops_cover_without_overlap():
    img = torch.arange(3 * 70 * 50, dtype=torch.float32).reshape(3, 70, 50)
    crops = grid_crops(img, 16)
    assert len(crops) == (70 // 16) * (50 // 16)
    flat = torch.stack(crops)[:, 0].reshape(len(crops), -1)
    assert len(set(flat.flatten().tolist())) == flat.numel()  # no pixel twice


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,bs", [(23, 4), (7, 7), (50, 3)])
def test_batches_resume_mid_epoch(n, bs):
    full = list(SeededBatches(_Range(n), bs, seed=5, steps=13))
    for start in (0, 1, 6, 12):
        assert list(SeededBatches(_Range(n), bs, seed=5, start_step=start, steps=13)) == full[start:]
    assert len(full) == 13
    per_epoch = n // bs
    for e in range(len(full) // per_epoch):  # each epoch: distinct items
        items = [i for b in full[e * per_epoch:(e + 1) * per_epoch] for i, _ in b]
        assert len(set(items)) == len(items)
    assert list(SeededBatches(_Range(n), bs, seed=6, steps=13)) != full


def test_batches_of_two_ranks_make_the_single_process_batch():
    n, b = 37, 3
    single = list(SeededBatches(_Range(n), 2 * b, seed=9, steps=8))
    r0 = list(SeededBatches(_Range(n), b, seed=9, rank=0, world=2, steps=8))
    r1 = list(SeededBatches(_Range(n), b, seed=9, rank=1, world=2, steps=8))
    for s, a, c in zip(single, r0, r1):
        assert sorted(s) == sorted(a + c)
        assert not set(a) & set(c)


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        SeededBatches(_Range(5), 8, seed=0)


def test_embedded_split_by_image():
    pytest.importorskip("skimage")
    split = embedded_dataset(crop_size=32)
    assert not set(split.train_names) & set(split.held_out_names)
    assert len(split.train_names) >= 10 and len(split.held_out_names) >= 2
    assert len(split.train) > 100 and len(split.held_out) > 50
    # the held-out crops come from images the training set does not hold
    held = torch.stack([split.held_out[i] for i in range(len(split.held_out))])
    for img in split.train.images:
        for c in grid_crops(img, 32)[:5]:
            assert not (held - c).abs().flatten(1).amax(1).lt(1e-6).any()
    # deterministic
    again = embedded_dataset(crop_size=32)
    assert torch.equal(again.train[(17, 4)], split.train[(17, 4)])
    assert torch.equal(again.held_out[3], split.held_out[3])
    x = split.train[(0, 0)]
    assert x.shape == (3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
