"""The one quantization core shared by :class:`vqkernels.VectorQuantizer` and :class:`vqkernels.VectorQuantize`.

The core owns no tensors: each front-end keeps its codebook and EMA buffers under the names its peer
uses in a state_dict (taming's ``embedding.weight``; vector-quantize-pytorch's ``_codebook.embed``
(1, K, D) ...) and hands the core (K, D)/(K,) views of them. The core only calls vqkernels ops for the
work: ``vector_quantize`` (search + gather + loss + straight-through), ``ema_update_`` /
``code_stats`` + ``ema_update_from_stats_`` (EMA), ``nearest_code`` + ``code_stats`` (k-means).

Precision: whatever the input dtype and whatever autocast is active, the search, the loss and the EMA
statistics run in float32 (autocast is switched off inside the core and the input is widened once);
the quantized output comes back in the input's dtype, the loss in float32.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.code_stats import code_stats, ema_update_, ema_update_from_stats_
from ..ops.nearest_code import nearest_code
from ..ops.vq_loss import vector_quantize
from . import _distributed as dist_sync


@dataclass
class CodebookTensors:
    """Views of a front-end's state, in the core's layout."""

    embed: torch.Tensor  # (K, D) the codebook: a Parameter (learnable) or a buffer, or a view of one
    cluster_size: torch.Tensor | None = None  # (K,) float32 EMA of per-code counts
    embed_sum: torch.Tensor | None = None  # (K, D) float32 EMA of per-code sums (vector-quantize-pytorch's embed_avg)
    initted: torch.Tensor | None = None  # 0-d bool: k-means initialisation done


def l2norm(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """vector-quantize-pytorch's l2norm (F.normalize with eps 1e-6)."""
    return F.normalize(t, p=2, dim=-1, eps=eps)


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, arXiv:2410.06424, section 4.2), as vector-quantize-pytorch writes it.

    src (N, D) the encoder output, tgt (N, D) the chosen codes (no gradient reaches them here). The
    forward value is tgt (up to rounding); the gradient reaching src is the output gradient rotated
    from tgt's direction to src's and scaled by |tgt| / |src| (the rotation and scale are constants).
    """
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = (src / norm_src.clamp(min=1e-6)).detach()
    q = (tgt / norm_tgt.clamp(min=1e-6)).detach()
    w = l2norm(u + q).detach()
    e = src
    out = e - 2.0 * (e * w).sum(-1, keepdim=True) * w + 2.0 * (e * u).sum(-1, keepdim=True) * q
    return out * (norm_tgt / norm_src.clamp(min=1e-6)).detach()


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


# torch._disable_dynamo imports dynamo on first use, not here (``import vqkernels`` stays cheap)
_clone_outside_graph = getattr(torch, "_disable_dynamo", None)
_clone_outside_graph = _clone_outside_graph(_clone) if _clone_outside_graph is not None else None


def _copy_for_backward(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (keeping its autograd history), made outside any compiled graph: inside one, the
    partitioner may save ``t`` itself for the backward instead of the copy (a clone is cheap to recompute),
    and ``t`` is then modified in place before the backward runs."""
    if "torch._dynamo" not in sys.modules:  # nothing is being compiled
        return t.clone()
    if _clone_outside_graph is None:
        return torch.compiler.disable(_clone)(t)
    return _clone_outside_graph(t)


class QuantizerCore:
    """Nearest-code quantization with a VQ loss, an optional EMA codebook, k-means init and dead-code restarts.

    Args:
        num_codes, dim: K and D of the code space.
        metric: ``"l2"`` or ``"cosine"`` (inputs and codes l2-normalised).
        learnable: whether the codebook receives gradients from the loss (else it is detached).
        ema: update the codebook by EMA (vector-quantize-pytorch's ``ema_update``).
        decay: the EMA decay of the statistics (and of the codebook with ``ema``).
        eps: Laplace smoothing of the EMA cluster sizes.
        track_stats: keep the EMA statistics even without an EMA codebook (dead-code restarts need them).
        kmeans_init, kmeans_iters: initialise the codebook by k-means on the first training batch.
        threshold_ema_dead_code: restart codes whose EMA cluster size falls below this (0: never);
            a restarted code gets a random vector of the batch and an EMA cluster size of the threshold.
        rotation_trick: the rotation trick instead of the straight-through estimator (training only).
        beta, legacy, loss_scale, loss_value_ratio: the loss has the gradient of
            ``loss_scale * vq_loss(beta, legacy)`` (see :func:`vqkernels.vq_loss`) and that value times
            ``loss_value_ratio`` (vector-quantize-pytorch's learnable loss ``mse(q, x)``, with its full
            gradient to both sides, has half the value of vq_loss(beta=1)); the front-ends map their
            own options to these.
        sync: synchronise statistics, k-means and restarts across ranks (None: whenever
            torch.distributed is initialised with more than one rank).
        backend: passed to every op.
    """

    def __init__(
        self, *, num_codes: int, dim: int, metric: str = "l2", learnable: bool = True,
        ema: bool = False, decay: float = 0.8, eps: float = 1e-5, track_stats: bool = False,
        kmeans_init: bool = False, kmeans_iters: int = 10, threshold_ema_dead_code: float = 0.0,
        rotation_trick: bool = False, beta: float = 0.25, legacy: bool = True, loss_scale: float = 1.0,
        loss_value_ratio: float = 1.0, sync: bool | None = None, backend: str | None = None,
    ):
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if int(kmeans_iters) < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        self.num_codes, self.dim, self.metric = int(num_codes), int(dim), metric
        self.learnable = bool(learnable)
        self.ema, self.decay, self.eps = bool(ema), float(decay), float(eps)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.track_stats = bool(track_stats) or self.ema or self.threshold_ema_dead_code > 0
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        self.rotation_trick = bool(rotation_trick)
        self.beta, self.legacy, self.loss_scale = float(beta), bool(legacy), float(loss_scale)
        self.loss_value_ratio = float(loss_value_ratio)
        self.sync, self.backend = sync, backend

    @property
    def cosine(self) -> bool:
        return self.metric == "cosine"

    def __repr__(self) -> str:
        keys = ("num_codes", "dim", "metric", "learnable", "ema", "decay", "eps", "kmeans_init", "kmeans_iters",
                "threshold_ema_dead_code", "rotation_trick", "beta", "legacy", "loss_scale", "loss_value_ratio", "sync",
                "backend")
        return "QuantizerCore(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"

    # -----------------------------------------------------------------------------------------
    def __call__(self, z: torch.Tensor, t: CodebookTensors, *, training: bool):
        """z (..., D) any float dtype and strides -> (z_q (..., D) in z's dtype, loss float32 0-d, indices (...)).

        z may be a strided view (e.g. a (B, C, H, W) map permuted to (B, H, W, C)): the ops read it in
        place and return z_q and its gradient in z's layout, so no layout copy is made here.
        """
        if z.dim() < 2 or z.shape[-1] != self.dim:
            raise ValueError(f"the quantizer expects vectors of size {self.dim}, got input of shape {tuple(z.shape)}")
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()  # search, loss and statistics in float32, whatever the input's dtype
            if self.cosine:
                z = l2norm(z)
            if training and self.kmeans_init and t.initted is not None and not bool(t.initted):
                self.kmeans_init_(z.detach().reshape(-1, self.dim), t)
            cb = t.embed if self.learnable else t.embed.detach()
            cb = cb.float()
            updates = training and self.track_stats
            if updates:
                # the update below rewrites the codebook in place, and the loss keeps this forward's codebook
                # for its backward: give it a copy (K x D, small next to the N x D batch)
                cb = _copy_for_backward(cb)
            z_q, loss, idx = vector_quantize(
                z, cb, beta=self.beta, legacy=self.legacy, metric=self.metric, backend=self.backend)
            if self.loss_value_ratio != 1.0:  # the value rescaled, the gradient kept
                loss = loss - (1.0 - self.loss_value_ratio) * loss.detach()
            if self.loss_scale != 1.0:
                loss = loss * self.loss_scale
            if self.rotation_trick and training and z.requires_grad:
                z_q = rotate_to(z, z_q.detach())
            if updates:
                self.update_(z.detach(), idx, t)
        return z_q.to(in_dtype), loss, idx

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, z: torch.Tensor, idx: torch.Tensor, t: CodebookTensors) -> None:
        """EMA statistics (and the EMA codebook with ``ema``), then dead-code restarts."""
        sync = dist_sync.sync_enabled(self.sync)
        embed = t.embed.detach()
        if self.ema and not sync:
            ema_update_(embed, t.cluster_size, t.embed_sum, z, idx, decay=self.decay, eps=self.eps,
                        backend=self.backend)
        else:
            counts, sums = code_stats(z, idx, self.num_codes, backend=self.backend)
            if sync:
                dist_sync.all_reduce_sum_(counts, sums)
            # without an EMA codebook only the statistics move: the op writes its codebook into a scratch copy
            target = embed if self.ema else embed.clone()
            ema_update_from_stats_(target, t.cluster_size, t.embed_sum, counts, sums, decay=self.decay, eps=self.eps)
        if self.ema and self.cosine:
            embed.copy_(l2norm(embed))
        if self.threshold_ema_dead_code > 0:
            self.restart_dead_codes_(z, t, sync)

    @torch.no_grad()
    def restart_dead_codes_(self, z: torch.Tensor, t: CodebookTensors, sync: bool) -> None:
        """Codes whose EMA cluster size is below the threshold get random batch vectors (vector-quantize-pytorch's
        ``expire_codes_``: with more dead codes than vectors, a random subset now and the rest later)."""
        dead = t.cluster_size < self.threshold_ema_dead_code
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        samples = (l2norm(z) if self.cosine else z).reshape(-1, self.dim)
        n = dist_sync.total_rows(samples.shape[0], samples.device, sync)
        if n == 0:
            return
        if num_dead > n:
            dead = dist_sync.random_subset_mask(dead, n, sync)
            num_dead = n
        new = dist_sync.sample_rows(samples, num_dead, sync)
        reset = self.threshold_ema_dead_code
        embed = t.embed.detach()
        embed[dead] = new.to(embed.dtype)
        t.cluster_size[dead] = reset
        t.embed_sum[dead] = (new * reset).to(t.embed_sum.dtype)

    @torch.no_grad()
    def kmeans_init_(self, z: torch.Tensor, t: CodebookTensors) -> None:
        """Lloyd's k-means from K random batch vectors, ``kmeans_iters`` steps (vector-quantize-pytorch's ``kmeans``):
        assignment by :func:`nearest_code`, update by :func:`code_stats`; an empty cluster keeps its mean. Then the
        EMA buffers take the last step's counts and sums and the codebook their Laplace-smoothed means."""
        sync = dist_sync.sync_enabled(self.sync)
        K = self.num_codes
        means = dist_sync.sample_rows(z, K, sync)
        counts = sums = None
        for it in range(max(self.kmeans_iters, 1)):
            idx = nearest_code(z, means, metric=self.metric, backend=self.backend)
            counts, sums = code_stats(z, idx, K, backend=self.backend)
            if sync:
                dist_sync.all_reduce_sum_(counts, sums)
            if it >= self.kmeans_iters:  # kmeans_iters == 0: only the statistics of the sampled means
                break
            new_means = sums / counts.clamp(min=1.0)[:, None]
            if self.cosine:
                new_means = l2norm(new_means)
            means = torch.where((counts == 0)[:, None], means, new_means)
        embed = t.embed.detach()
        cluster_size = t.cluster_size if t.cluster_size is not None else torch.empty_like(counts)
        embed_sum = t.embed_sum if t.embed_sum is not None else torch.empty_like(means)
        # decay 0: the buffers become (counts, means * counts) and the codebook their smoothed quotient
        ema_update_from_stats_(embed, cluster_size, embed_sum, counts, means * counts[:, None], decay=0.0,
                               eps=self.eps)
        if self.cosine:
            embed.copy_(l2norm(embed))
        t.initted.fill_(True)
