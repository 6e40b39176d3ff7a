"""vqkernels.FSQ against vector-quantize-pytorch 1.32's FSQ: same weights and inputs -> the same output, indices
(and their dtype), gradients, decoded codes and state_dict keys; bad arguments get one clear error."""
from __future__ import annotations

import pytest
import torch

from vqkernels import FSQ


def PeerFSQ(*args, **kw):
    return pytest.importorskip("vector_quantize_pytorch").FSQ(*args, **kw)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pair(levels, seed=0, **kw):
    torch.manual_seed(seed)
    ref = PeerFSQ(levels, **kw)
    torch.manual_seed(seed)
    ours = FSQ(levels, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(mod, z, seed=None):
    z = z.detach().clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    out, idx = mod(z)
    w = randn(*out.shape, seed=3, dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), [z] + list(mod.parameters()))
    return out.detach(), idx, grads


CONFIGS = [
    (dict(levels=[8, 5, 5, 5]), (2, 33, 4)),
    (dict(levels=(7, 5, 5, 5, 5), dim=9), (3, 11, 9)),  # projections
    (dict(levels=[8, 6, 5], num_codebooks=2), (2, 13, 6)),
    (dict(levels=[4, 3, 2], preserve_symmetry=True), (2, 19, 3)),
    (dict(levels=[8, 8, 8], bound_hard_clamp=True), (2, 25, 3)),
    (dict(levels=[5, 4, 3], preserve_symmetry=True, bound_hard_clamp=True), (2, 7, 3)),
    (dict(levels=[8, 5, 5, 5], dim=6), (2, 6, 4, 5)),  # channel-first image
    (dict(levels=[8, 5, 5], channel_first=True), (2, 3, 10)),
    (dict(levels=[8, 5, 5, 5], return_indices=False), (2, 9, 4)),
]


@pytest.mark.parametrize("cfg, shape", CONFIGS, ids=[str(c) for c, _ in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_vqp(cfg, shape, dtype):
    cfg = dict(cfg)
    levels = cfg.pop("levels")
    ref, ours = _pair(levels, **cfg)
    ref.to(dtype), ours.to(dtype)
    z = (randn(*shape, seed=len(shape)) * 2).to(dtype)
    r, o = _step(ref, z), _step(ours, z)
    # The same ops in the same order; only the projections' sums may run in another order (layouts differ).
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(o[0], r[0], **tol)
    if r[1] is None:
        assert o[1] is None
    else:
        assert torch.equal(o[1], r[1]) and o[1].dtype == r[1].dtype == torch.int32
    for a, b in zip(o[2], r[2]):
        gtol = dict(rtol=2e-2, atol=2e-2 * float(b.abs().max())) if tol else {}
        torch.testing.assert_close(a, b, **gtol)
    if r[1] is not None and dtype == torch.float32:  # (both decode to float32 codes)
        torch.testing.assert_close(ours.indices_to_codes(o[1]), ref.indices_to_codes(r[1]))
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_noise_dropout_same_draws():
    ref, ours = _pair([5, 4, 3], preserve_symmetry=True, noise_dropout=0.5)
    z = randn(2, 31, 3)
    r, o = _step(ref, z, seed=7), _step(ours, z, seed=7)
    torch.testing.assert_close(o[0], r[0], rtol=0, atol=0)
    ours.eval()
    assert torch.equal(ours(z)[0], ours(z)[0])


def test_implicit_codebook_on_request():
    ref, ours = _pair([8, 5, 5, 5])
    torch.testing.assert_close(ours.implicit_codebook, ref.implicit_codebook)
    assert ours.codebook_size == ref.codebook_size == 1000
    big = FSQ([16] * 10)  # 2^40 codes: VQP would allocate 2^40 x 10 floats (44 TB) at construction
    z = randn(2, 5, 10)
    out, idx = big(z)
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0
    torch.testing.assert_close(big.indices_to_codes(idx), out)


@pytest.mark.parametrize("kw, err, match", [
    (dict(levels=[8, 1, 5]), ValueError, r"every level must be >= 2, got levels=\[8, 1, 5\]"),
    (dict(levels=[8, 0]), ValueError, "every level must be >= 2"),
    (dict(levels=[8, 2, 5]), ValueError, "a level of 2 needs preserve_symmetry=True"),
    (dict(levels=[]), TypeError, "levels must be a non-empty list or tuple of ints"),
    (dict(levels=[8.0, 5]), TypeError, "levels must be a non-empty list or tuple of ints"),
    (dict(levels=8), TypeError, "levels must be a non-empty list or tuple of ints"),
    (dict(levels=[8, 5], num_codebooks=0), ValueError, "num_codebooks must be a positive int"),
    (dict(levels=[8, 5], noise_dropout=0.1), ValueError, "noise_dropout > 0 needs preserve_symmetry=True"),
    (dict(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
])
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        FSQ(**kw)


def test_wrong_input_dim():
    with pytest.raises(ValueError, match="expected the feature dimension 4"):
        FSQ([8, 5, 5, 5])(torch.zeros(2, 3, 5))
