"""Tolerance rules and input factories shared by the tests and the benchmarks.

The nearest-code check is tie-aware: an index is right when the float64 distance of the chosen code
equals the row minimum within a tolerance that follows the arithmetic the kernels do (float32
accumulation of exact products of the dtype-rounded inputs, or TF32 products), not when it equals
the reference's index (which, among near-ties, any correct kernel may legitimately differ on).
"""
from __future__ import annotations

import math

import torch

# Unit roundoff of the arithmetic that forms the scores (products and sums).
ACC_EPS = {
    "ieee": 2.0**-24,  # float32 accumulation of exact products (fp32, and fp16/bf16 widened)
    "tf32": 2.0**-11,  # TF32 products (10-bit mantissa), float32 sums
}


def make_inputs(
    N: int, K: int, D: int, dtype=torch.float32, device="cpu", *, seed: int = 0, noncontiguous: bool = False,
    lead: tuple = (),
):
    """Fresh random x (*lead, N, D) and codebook (K, D). ``noncontiguous`` makes x a strided view."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cb = torch.randn(K, D, generator=g)
    if noncontiguous:
        base = torch.randn(*lead, N, 2 * D + 1, generator=g)
        x = base[..., 1 : 2 * D + 1 : 2]
        assert not x.is_contiguous() or x.numel() <= 1
    else:
        x = torch.randn(*lead, N, D, generator=g)
    return x.to(device=device, dtype=dtype), cb.to(device=device, dtype=dtype)


def _prep(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    """The inputs as the kernels see them, widened exactly to float64 (cosine: normalised as the op does)."""
    from .ops.nearest_code import normalize

    x2 = x.reshape(-1, x.shape[-1])
    cb = codebook
    if metric == "cosine":
        x2, cb = normalize(x2), normalize(cb)
    return x2.double(), cb.double()


def exact_distances(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """(N, K) float64 distances of the dtype-rounded inputs (N x K memory: test sizes only)."""
    x64, c64 = _prep(x, codebook, metric)
    if metric == "l2":
        # float64 expansion: its rounding (~1e-16 relative) is far below any tolerance used here, and it
        # needs N x K memory, not the N x K x D of the direct difference
        d = (x64 * x64).sum(1)[:, None] + (c64 * c64).sum(1)[None, :] - 2.0 * (x64 @ c64.T)
        return d.clamp_min_(0)
    return 1.0 - x64 @ c64.T


def score_tolerance(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", precision: str = "ieee"):
    """Per-row absolute tolerance on a distance: a few roundoffs of the terms the kernels sum."""
    x64, c64 = _prep(x, codebook, metric)
    D = x64.shape[1]
    eps = ACC_EPS[precision]
    # Each dot product sums D terms: error <= ~sqrt(D)*eps*sum|x_i c_i| for the usual rounding, with
    # a generous constant; plus the norms' own rounding for l2.
    abs_dot = x64.abs() @ c64.abs().T  # (N, K) -- small test sizes only
    bound = abs_dot.max(dim=1).values
    if metric == "l2":
        bound = 2 * bound + (c64 * c64).sum(1).max() + (x64 * x64).sum(1)
    return 8.0 * eps * max(1.0, math.sqrt(D)) * bound + 1e-30


def check_nearest(
    x, codebook, idx, dist=None, *, metric: str = "l2", precision: str = "ieee", finite_rows_only: bool = True
) -> None:
    """Assert that ``idx`` (and ``dist``) are a correct nearest-code answer, tie-aware."""
    N = x.reshape(-1, x.shape[-1]).shape[0]
    K = codebook.shape[0]
    assert idx.dtype == torch.int64, f"indices must be int64, got {idx.dtype}"
    assert idx.shape == x.shape[:-1], f"indices shape {tuple(idx.shape)} != {tuple(x.shape[:-1])}"
    if N == 0:
        return
    i = idx.reshape(-1).cpu()
    assert int(i.min()) >= 0 and int(i.max()) < K, f"indices out of [0, {K}): min {int(i.min())} max {int(i.max())}"
    d = exact_distances(x.cpu(), codebook.cpu(), metric)
    tol = score_tolerance(x.cpu(), codebook.cpu(), metric, precision)
    rowmin = d.min(dim=1).values
    chosen = d.gather(1, i[:, None]).squeeze(1)
    bad = chosen - rowmin > tol
    if bad.any():
        r = int(bad.nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())}/{N} rows chose a code that is not nearest; row {r}: chose {int(i[r])} at "
            f"{chosen[r]:.9g}, the minimum is {rowmin[r]:.9g} at {int(d[r].argmin())} (tolerance {tol[r]:.3g})"
        )
    if dist is not None:
        assert dist.dtype == torch.float32, f"distance must be float32, got {dist.dtype}"
        assert dist.shape == x.shape[:-1]
        dv = dist.reshape(-1).cpu().double()
        err = (dv - chosen).abs()
        bad = ~(err <= tol + 1e-6 * chosen.abs())
        if bad.any():
            r = int(bad.nonzero()[0])
            raise AssertionError(
                f"{int(bad.sum())}/{N} distances are off; row {r}: returned {dv[r]:.9g}, exact {chosen[r]:.9g} "
                f"(tolerance {tol[r]:.3g})"
            )


# ---------------------------------------------------------------------------------------------
# Deep float32 pipelines (a VQGAN, LPIPS, a GPT) against a peer's port of the same math

def port_errors(ours: torch.Tensor, peer: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(ours' error, the peer's own error) against ``truth``: the peer's math run in float64."""
    t = truth.detach().double()
    return ((ours.detach().double() - t).abs().max().item(), (peer.detach().double() - t).abs().max().item())


def port_tolerance(peer_error: float, truth: torch.Tensor, dtype=torch.float32, *, factor: float = 2.0,
                   floor_eps: float = 8.0, scale: float | None = None) -> float:
    """What a faithful float32 port may be off by: ``factor`` times the peer's own float32 error against
    the float64 truth, plus a floor of ``floor_eps`` roundoffs of the output's magnitude.

    flash-attention's rule, applied to whole networks: both sides are float32 stacks whose summation order
    follows the CPU's BLAS/oneDNN kernels (Intel and AMD differ), so an absolute bound checks the machine, not
    the port. A port that computes other math (another GroupNorm eps, a missing residual) is off by far more
    than the peer's own roundoff, and fails. ``scale`` replaces the output's magnitude in the floor where the
    output is zero in exact arithmetic and only roundoff of larger terms (e.g. the whole gradient's) remains.
    """
    scale = truth.detach().abs().max().item() if scale is None else scale
    return factor * peer_error + floor_eps * torch.finfo(dtype).eps * max(scale, 1e-30)


def assert_port_close(ours: torch.Tensor, peer: torch.Tensor, truth: torch.Tensor, *, what: str = "output",
                      factor: float = 2.0, floor_eps: float = 8.0, scale: float | None = None) -> tuple[float, float]:
    """Assert :func:`port_tolerance`; returns (ours' error, the peer's error) for reports."""
    assert ours.shape == truth.shape == peer.shape, f"{what}: shapes {ours.shape}, {peer.shape}, {truth.shape}"
    e_ours, e_peer = port_errors(ours, peer, truth)
    tol = port_tolerance(e_peer, truth, ours.dtype, factor=factor, floor_eps=floor_eps, scale=scale)
    assert e_ours <= tol, (f"{what}: our error against the float64 truth is {e_ours:.3g}, above {tol:.3g} "
                           f"({factor}x the peer's own float32 error {e_peer:.3g} + {floor_eps} eps of the output)")
    return e_ours, e_peer
