"""vqkernels.tiling: overlapping tiles at the training size, blended without seams."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vqkernels.tiling import reconstruct_tiled, reflect_pad, tile_starts, tile_weights


class PointwiseStandIn(torch.nn.Module):
    """A 'tokenizer' whose reconstruction is a per-pixel function of its input (identity by default): tiling must
    then give exactly the function applied to the whole image, whatever the tiles, if the weights sum to one.
    It records the tile sizes it was given."""

    def __init__(self, resolution=16, f=4, fn=lambda t: t):
        super().__init__()
        self.config = SimpleNamespace(resolution=resolution, downsample_factor=f)
        self.downsample_factor = f
        self.fn, self.seen = fn, []
        self.p = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        f = self.downsample_factor
        codes = torch.zeros(x.shape[0] * (x.shape[2] // f) * (x.shape[3] // f), dtype=torch.long)
        return x, None, (None, None, codes)

    def decode(self, q):
        return self.fn(q)


@pytest.mark.parametrize("hw", [(16, 16), (17, 16), (16, 41), (37, 53), (64, 23), (100, 100)])
@pytest.mark.parametrize("overlap", [0, 3, 4, 8, 15])
def test_identity_stand_in_is_exact(hw, overlap):
    g = torch.Generator().manual_seed(hash(hw) % 1000 + overlap)
    img = torch.rand(3, *hw, generator=g) * 2 - 1
    m = PointwiseStandIn()
    out = reconstruct_tiled(m, img, overlap=overlap)
    assert out.shape == img.shape
    torch.testing.assert_close(out, img, rtol=0, atol=1.2e-7)  # one float32 rounding: the blend is float64
    assert set(m.seen) == {(16, 16)}  # every tile at the training size


def test_pointwise_nonlinear_stand_in_batched():
    img = torch.rand(2, 3, 45, 70, generator=torch.Generator().manual_seed(1)) * 2 - 1
    m = PointwiseStandIn(fn=lambda t: torch.tanh(3 * t) * 0.9 + 0.05)
    out = reconstruct_tiled(m, img, tile=16, overlap=5, batch_size=3)
    torch.testing.assert_close(out, m.fn(img), rtol=0, atol=1e-6)


def test_weights_sum_to_one_and_are_smooth():
    for length, tile, overlap in [(100, 16, 4), (17, 16, 0), (64, 16, 8), (1000, 64, 16), (65, 64, 63)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap at least as asked
        ws = tile_weights(starts, tile, dtype=torch.float64)
        total = torch.zeros(length, dtype=torch.float64)
        for s, w in zip(starts, ws):
            assert float(w.min()) > 0 and float(w.max()) <= 1
            total[s:s + tile] += w
        # complementary raised-cosine ramps: the weights already sum to one before normalisation (except where
        # three tiles meet, when the image is barely longer than a tile)
        if all(b - a >= tile / 2 for a, b in zip(starts, starts[1:])):
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
        # no jumps: neighbouring weights differ by at most the steepest step of a raised cosine over the overlap
        for w in ws:
            assert float((w[1:] - w[:-1]).abs().max()) <= 1.6 / max(1, overlap)


def test_tile_larger_than_image_and_tiny_images():
    m = PointwiseStandIn(resolution=32)
    for hw in [(5, 7), (1, 1), (1, 40), (31, 33), (2, 100)]:
        img = torch.rand(3, *hw, generator=torch.Generator().manual_seed(sum(hw))) * 2 - 1
        out = reconstruct_tiled(m, img)
        assert out.shape == img.shape
        torch.testing.assert_close(out, img, rtol=0, atol=1.2e-7)
    assert set(m.seen) == {(32, 32)}


def test_reflect_pad_repeats_reflection():
    x = torch.arange(3.0).reshape(1, 1, 3)
    assert reflect_pad(x, 0, 6).flatten().tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert reflect_pad(torch.ones(3, 1, 1), 2, 3).shape == (3, 3, 4)
    y = reflect_pad(torch.arange(12.0).reshape(3, 4), 2, 1)
    assert y.shape == (5, 5) and y[3].tolist() == y[1].tolist() and y[:, 4].tolist() == y[:, 2].tolist()


def test_bad_arguments():
    m = PointwiseStandIn()
    img = torch.zeros(3, 20, 20)
    with pytest.raises(ValueError, match="tile"):
        reconstruct_tiled(m, img, tile=18)  # not a multiple of 4
    with pytest.raises(ValueError, match="overlap"):
        reconstruct_tiled(m, img, overlap=16)
    with pytest.raises(ValueError, match="image"):
        reconstruct_tiled(m, torch.zeros(20, 20))
    with pytest.raises(ValueError, match="batch_size"):
        reconstruct_tiled(m, img, batch_size=0)


def _small_vqmodel():
    from vqkernels.models.vqgan import VQGANConfig, VQModel

    torch.manual_seed(0)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=32,
                      n_embed=64, embed_dim=16)
    return VQModel(cfg).eval()


def test_real_vqmodel_one_tile_equals_plain_model():
    model = _small_vqmodel()
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        plain = model(img)[0]
        codes = model.tokenize(img)
    tiled, ind = reconstruct_tiled(model, img, return_indices=True)
    torch.testing.assert_close(tiled, plain, rtol=0, atol=0)
    assert torch.equal(ind, codes)


def test_real_vqmodel_tiles_match_plain_model_per_tile():
    # two tiles without overlap side by side: each half is the plain model's reconstruction of that half
    model = _small_vqmodel()
    img = torch.rand(3, 16, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pair = torch.stack([img[:, :, :16], img[:, :, 16:]])  # the two tiles as one batch, as the tiler runs them
    with torch.no_grad():
        rec = model(pair)[0]
        codes = model.tokenize(pair)
    tiled, ind = reconstruct_tiled(model, img, overlap=0, return_indices=True)
    torch.testing.assert_close(tiled, torch.cat([rec[0], rec[1]], dim=-1), rtol=0, atol=0)
    assert torch.equal(ind, codes)
    # with overlap and an odd size, the output is finite, the right shape and in the model's range
    out = reconstruct_tiled(model, torch.rand(3, 27, 41) * 2 - 1, overlap=6)
    assert out.shape == (3, 27, 41) and torch.isfinite(out).all()


def test_real_vqmodel_overlapping_tiles_blend_only_at_the_seams():
    # three overlapping tiles along a 16x40 image (starts 0, 12, 24; overlaps of 4 pixels): where one tile alone
    # covers a pixel the output is that tile's plain reconstruction; in an overlap it is the raised-cosine blend
    # of the two tiles (weights summing to one), so no seam is left and nothing else is changed
    model = _small_vqmodel()
    img = torch.rand(3, 16, 40, generator=torch.Generator().manual_seed(5)) * 2 - 1
    starts = tile_starts(40, 16, 4)
    assert starts == [0, 12, 24]
    with torch.no_grad():
        recs = model(torch.stack([img[:, :, s:s + 16] for s in starts]))[0].double()
    out = reconstruct_tiled(model, img, overlap=4).double()
    ws = tile_weights(starts, 16, dtype=torch.float64)
    torch.testing.assert_close(out[..., 0:12], recs[0][..., 0:12], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 16:24], recs[1][..., 4:12], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 28:40], recs[2][..., 4:16], rtol=0, atol=1e-6)
    for a, b, s in ((0, 1, 12), (1, 2, 24)):  # the seams: columns s .. s+3
        wa, wb = ws[a][s - starts[a]:s - starts[a] + 4], ws[b][:4]
        torch.testing.assert_close(wa + wb, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
        blend = (recs[a][..., s - starts[a]:s - starts[a] + 4] * wa + recs[b][..., :4] * wb)
        torch.testing.assert_close(out[..., s:s + 4], blend, rtol=0, atol=1e-6)
        assert not torch.allclose(out[..., s:s + 4], recs[a][..., s - starts[a]:s - starts[a] + 4], atol=1e-4)
