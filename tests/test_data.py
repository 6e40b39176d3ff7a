"""vqkernels.data: image folders, the embedded photographs, and the seeded batch order."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from vqkernels.data import (COLOR_HUE, COLOR_SATURATION, TINT_P, TINT_SATURATION, CropsOfImages, DataError,
                            ImageFolder, SeededBatches, color_jitter, embedded_dataset, from_image, grid_crops, is_grey,
                            list_images, open_dataset, random_color, random_crop, tint, to_image)

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


# -- colour augmentation ------------------------------------------------------------------------------

def _colourful(h=24, w=28, seed=0):
    """A smooth colourful image in [-1, 1] (three different low-frequency channels)."""
    from torchvision.transforms import functional as TF

    low = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(seed))
    return (TF.resize(low, [h, w], antialias=True).clamp(0, 1) * 2 - 1).contiguous()


def test_color_jitter_channel_order_is_a_permutation():
    img = _colourful()
    for order in [(0, 1, 2), (2, 0, 1), (1, 0, 2), (2, 1, 0)]:
        out = color_jitter(img, 0.0, 1.0, order)
        assert torch.equal(out, img[list(order)])
        # the same set of values at every pixel, only in another channel
        assert torch.equal(out.sort(0).values, img.sort(0).values)


def test_color_jitter_keeps_structure_changes_colour():
    img = _colourful(seed=1)
    # a hue rotation keeps HSV's value (the largest channel) and saturation (max - min) of every pixel
    for hue in (-0.5, -0.2, 0.1, 0.37):
        out = color_jitter(img, hue, 1.0, (1, 2, 0))
        torch.testing.assert_close(out.amax(0), img.amax(0), rtol=0, atol=2e-6)
        torch.testing.assert_close(out.amax(0) - out.amin(0), img.amax(0) - img.amin(0), rtol=0, atol=4e-6)
        assert (out - img).abs().amax() > 0.05  # the colours did change
    # saturation blends with the grey image, which it keeps: 0 gives the grey image itself
    grey = color_jitter(img, 0.0, 0.0)
    assert torch.allclose(grey[0], grey[1], atol=1e-6) and torch.allclose(grey[1], grey[2], atol=1e-6)
    lum = lambda t: 0.2989 * t[0] + 0.587 * t[1] + 0.114 * t[2]  # noqa: E731 - torchvision's grey
    torch.testing.assert_close(lum(color_jitter(img, 0.0, 0.6)), lum(img), rtol=0, atol=1e-3)  # (no clipping)
    # a grey image has no colour to change: it passes unchanged (to float rounding)
    g = img.mean(0, keepdim=True).expand(3, -1, -1).contiguous()
    torch.testing.assert_close(color_jitter(g, 0.3, 1.5, (2, 1, 0)), g, rtol=0, atol=2e-4)
    assert float(color_jitter(img, 0.5, 1.5).min()) >= -1 and float(color_jitter(img, 0.5, 1.5).max()) <= 1


def test_color_jitter_bad_arguments():
    img = _colourful()
    with pytest.raises(ValueError, match="order"):
        color_jitter(img, 0.0, 1.0, (0, 0, 1))
    with pytest.raises(ValueError, match="hue"):
        color_jitter(img, 0.7)
    with pytest.raises(ValueError, match="saturation"):
        color_jitter(img, 0.0, -1.0)


def test_random_color_draws_cover_the_ranges():
    draws = [random_color(torch.Generator().manual_seed(s)) for s in range(300)]
    assert {d[2] for d in draws} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    hues, sats = [d[0] for d in draws], [d[1] for d in draws]
    assert -COLOR_HUE <= min(hues) < -0.8 * COLOR_HUE and 0.8 * COLOR_HUE < max(hues) <= COLOR_HUE
    assert COLOR_SATURATION[0] <= min(sats) < 0.6 and 1.4 < max(sats) <= COLOR_SATURATION[1]
    assert sum(s < 1 for s in sats) > 100 and sum(s > 1 for s in sats) > 100  # log-uniform: as often below as above


def test_color_augment_is_seeded_and_keeps_the_crop():
    img = _colourful(40, 44, seed=2)
    a = random_crop(img, 16, seed=11, color_augment=True)
    assert torch.equal(a, random_crop(img, 16, seed=11, color_augment=True))  # a function of the seed
    plain = random_crop(img, 16, seed=11)
    assert not torch.equal(a, plain)
    # the same square and flip as without colour (its draws come after them): the augmented crop is the colour
    # change of the plain crop, drawn from the same generator after the crop's own draws
    g = torch.Generator().manual_seed(11)
    torch.randint(0, 25, (1,), generator=g), torch.randint(0, 29, (1,), generator=g), torch.rand((), generator=g)
    hue, sat, order = random_color(g)
    torch.testing.assert_close(a, color_jitter(plain, hue, sat, order), rtol=0, atol=0)
    state = torch.get_rng_state()
    [random_crop(img, 16, seed=s, color_augment=True) for s in range(3)]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is neither used nor changed
    assert len({random_crop(img, 16, seed=s, color_augment=True).mean((1, 2)).round(decimals=3).tolist().__repr__()
                for s in range(8)}) == 8


def _luma(x):
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def test_tint_keeps_brightness_and_gives_the_hue():
    import colorsys

    g = torch.Generator().manual_seed(5)
    grey = (torch.rand(1, 12, 14, generator=g, dtype=torch.float64) * 1.2 - 1).expand(3, -1, -1).clone()  # darkish
    for hue, sat in [(0.0, 0.5), (0.33, 0.75), (0.5, 0.3), (0.9, 0.15)]:
        out = tint(grey, hue, sat)
        assert out.shape == grey.shape and out.dtype == grey.dtype and out.abs().max() <= 1
        assert not is_grey(out)
        unclipped = (out.abs() < 1).all(0)  # where no channel was clipped, the brightness is the grey's
        assert unclipped.float().mean() > 0.5
        torch.testing.assert_close(_luma((out + 1) / 2)[unclipped], ((grey[0] + 1) / 2)[unclipped], rtol=0, atol=1e-12)
        # the colour of the brightest unclipped pixel is (hue, sat)
        px = ((out + 1) / 2).reshape(3, -1)[:, unclipped.reshape(-1)]
        h, s_, _ = colorsys.rgb_to_hsv(*px[:, px.sum(0).argmax()].tolist())
        assert abs(h - hue) < 1e-9 or abs(abs(h - hue) - 1) < 1e-9
        assert abs(s_ - sat) < 1e-9
    torch.testing.assert_close(tint(grey, 0.2, 0.0), grey, rtol=0, atol=1e-12)  # no saturation: grey stays grey
    with pytest.raises(ValueError, match="hue"):
        tint(grey, 1.0, 0.5)
    with pytest.raises(ValueError, match="saturation"):
        tint(grey, 0.5, 1.5)


def test_tint_grey_tints_only_grey_crops_seeded():
    grey = _colourful(40, 44, seed=3).mean(0, keepdim=True).expand(3, -1, -1).contiguous()
    colour = _colourful(40, 44, seed=4)
    assert is_grey(grey) and not is_grey(colour)
    for s in range(20):  # a colour crop is never changed, and the crop and flip are those without tinting
        assert torch.equal(random_crop(colour, 16, s, tint_grey=True), random_crop(colour, 16, s))
        assert torch.equal(random_crop(colour, 16, s, color_augment=True, tint_grey=True),
                           random_crop(colour, 16, s, color_augment=True))
    crops = [random_crop(grey, 16, s, tint_grey=True) for s in range(400)]
    plain = [random_crop(grey, 16, s) for s in range(400)]
    tinted = [not is_grey(c) for c in crops]
    assert abs(sum(tinted) / 400 - TINT_P) < 0.07  # about TINT_P of the grey crops
    for c, p, t in zip(crops, plain, tinted):
        if not t:
            assert torch.equal(c, p)
        else:  # the same square, tinted: its brightness kept where not clipped
            ok = (c.abs() < 1).all(0)
            torch.testing.assert_close(_luma(c)[ok], p[0][ok], rtol=0, atol=1e-5)
    sats = []
    for c in [c for c, t in zip(crops, tinted) if t]:
        rgb = (c + 1) / 2
        mx, mn = rgb.amax(0), rgb.amin(0)
        ok = (c.abs() < 1).all(0) & (mx > 0.05)
        sats.append(((mx - mn) / mx)[ok].median().item())
    assert TINT_SATURATION[0] - 0.01 <= min(sats) < TINT_SATURATION[0] + 0.1
    assert TINT_SATURATION[1] - 0.1 < max(sats) <= TINT_SATURATION[1] + 0.01
    assert torch.equal(random_crop(grey, 16, 7, tint_grey=True), random_crop(grey, 16, 7, tint_grey=True))
    train = embedded_dataset(16, tint_grey=True).train
    assert train.tint_grey and not embedded_dataset(16).train.tint_grey
    names = list(train.names)
    i = train.owner.index(names.index("brick"))  # a grey photograph: some of its crops come out coloured
    assert any(not is_grey(train[(i, s)]) for s in range(10))


def test_color_augment_off_by_default_and_on_the_datasets(tmp_path):
    _write_images(tmp_path, np.random.default_rng(3))
    off, on = ImageFolder(tmp_path, crop_size=16), ImageFolder(tmp_path, crop_size=16, color_augment=True)
    i = [p.name for p in off.files].index("rgb.png")
    img = off._image(i)
    assert torch.equal(off[(i, 5)], random_crop(img, 16, 5))  # off: exactly the crops as before
    assert torch.equal(on[(i, 5)], random_crop(img, 16, 5, color_augment=True))
    assert not torch.equal(on[(i, 5)], off[(i, 5)])
    imgs = [_colourful(30, 30, seed=k) for k in range(2)]
    c_off, c_on = CropsOfImages(imgs, 16), CropsOfImages(imgs, 16, color_augment=True)
    assert torch.equal(c_off[(1, 9)], random_crop(imgs[c_off.owner[1]], 16, 9))
    assert torch.equal(c_on[(1, 9)], random_crop(imgs[c_on.owner[1]], 16, 9, color_augment=True))
    train, held = open_dataset(str(tmp_path), 16, color_augment=True)
    assert train.color_augment and held is None
    assert not open_dataset(str(tmp_path), 16)[0].color_augment


def test_color_augment_config_flag_and_demo():
    from vqkernels import cli
    from vqkernels.demo import DEMO_VQGAN
    from vqkernels.runs import GPTTrainConfig, VQGANTrainConfig

    assert VQGANTrainConfig().color_augment is False  # train-vqgan as before unless asked
    assert not hasattr(GPTTrainConfig(), "color_augment")  # the GPT trains on the codes of unaugmented crops
    assert not DEMO_VQGAN.get("color_augment", False)  # off in the demo: it cost 4 dB at its budget (data.py)
    args = cli.build_parser().parse_args(["train-vqgan", "--color-augment"])
    assert args.color_augment is True
    assert cli.build_parser().parse_args(["train-vqgan"]).color_augment is None  # (left to the YAML / default)
    assert VQGANTrainConfig().tint_grey is False and not hasattr(GPTTrainConfig(), "tint_grey")
    assert DEMO_VQGAN["tint_grey"] is True  # on in the demo (README: flower's greens)
    assert cli.build_parser().parse_args(["train-vqgan", "--tint-grey"]).tint_grey is True
