"""Drop-in for vector-quantize-pytorch's ``ResidualVQ`` on the fused residual search (``vqkernels.ops.residual_vq``).

vector-quantize-pytorch runs its Q stages one after the other, each through a full VectorQuantize: an N x K
distance matrix, a one-hot N x K matrix for the codes and another for the EMA sums, per stage. Here one op
call searches all Q stages for a block of rows while its residual stays in cache, returns the per-stage
statistics the EMA needs from the same pass, and its backward (straight-through or rotation trick, plus the
commitment terms) is one fused pass too. The stages keep vector-quantize-pytorch's modules and state_dict
keys (``layers.{q}._codebook.{initted, cluster_size, embed_avg, embed}``, ``project_in.*``, ``project_out.*``):
each stage is a :class:`vqkernels.VectorQuantize`, whose core does the EMA, k-means and dead-code restarts.
"""
from __future__ import annotations

import random
from math import ceil

import torch
import torch.distributed as dist
import torch.nn as nn

from ..ops.residual_vq import residual_vq
from ..ops.code_stats import ema_update_from_stats_
from . import _distributed as dist_sync
from .quantizer import _UNSUPPORTED_VQ_OPTIONS, VectorQuantize, _refuse_unsupported

__all__ = ["ResidualVQ"]

# ResidualVQ's own options that are not implemented here, with vector-quantize-pytorch's defaults (the default
# is accepted: it changes nothing); and the per-stage VectorQuantize options likewise.
_UNSUPPORTED_RVQ_OPTIONS = {
    "heads": 1,
    "diveq": False,
    "implicit_neural_codebook": False,
    "mlp_kwargs": {},
    "beam_size": None,
    "eval_beam_size": None,
    "beam_score_quantizer_weights": None,
    "quant_grad_frac": 0.0,
    "use_cosine_sim": False,
    "learnable_codebook": False,
    "channel_last": True,
    **_UNSUPPORTED_VQ_OPTIONS,
}

SUPPORTED_RVQ_OPTIONS = (
    "dim", "num_quantizers", "codebook_size", "codebook_dim", "shared_codebook", "quantize_dropout",
    "quantize_dropout_cutoff_index", "quantize_dropout_multiple_of", "accept_image_fmap", "kmeans_init",
    "kmeans_iters", "decay", "eps", "threshold_ema_dead_code", "rotation_trick", "commitment_weight", "ema_update",
    "sync_codebook",
)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sync_seed(device) -> int:
    """vector-quantize-pytorch's get_maybe_sync_seed: one draw from torch's stream, summed over the ranks."""
    r = torch.randint(0, 10_000, (), device=device)
    if _is_distributed():
        dist.all_reduce(r)
    return int(r.item())


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class ResidualVQ(nn.Module):
    """Drop-in for ``vector_quantize_pytorch.ResidualVQ`` (its core options), on the fused residual search.

    Options, with vector-quantize-pytorch's meaning and defaults: ``dim``, ``num_quantizers`` (Q),
    ``codebook_size`` (K: an int, or a tuple of Q equal sizes), ``codebook_dim`` (projections ``project_in`` /
    ``project_out`` when it differs from ``dim``), ``shared_codebook`` (one codebook for every stage; its EMA
    statistics move once per stage and its codes once per step), ``quantize_dropout`` (in training, the stages
    after a random one are skipped: indices -1, losses 0), ``quantize_dropout_cutoff_index`` (the first stage
    that may be the last, 0), ``quantize_dropout_multiple_of`` (1), ``accept_image_fmap`` (x (B, C, H, W),
    indices (B, H, W, Q)); per stage ``kmeans_init``, ``kmeans_iters`` (10), ``decay`` (0.8), ``eps``,
    ``threshold_ema_dead_code`` (0), ``rotation_trick`` (default: True when the code dimension is > 1),
    ``commitment_weight`` (1.0), ``ema_update`` (True). Also ``sync_codebook`` (None: synchronise the EMA
    statistics, k-means and restarts across ranks whenever torch.distributed runs with several ranks) and
    ``backend`` (the vqkernels backend of the search). Any other vector-quantize-pytorch option given a value
    other than its default raises ``NotImplementedError`` naming it.

    ``forward(x) -> (quantized, indices (..., Q), commit_losses (Q,))``: x (..., dim) or (B, dim, H, W) with
    ``accept_image_fmap``; in training ``commit_losses[q] = commitment_weight * mean((sg[c_q] - r_q)^2)`` of
    stage q's residual r_q (0 in eval mode, as vector-quantize-pytorch), and ``quantized`` (the codes summed,
    projected out) carries every stage's straight-through (or rotation-trick) gradient. ``return_all_codes=True``
    adds the codes of every stage (Q, ..., codebook_dim).

    Differences: the search, losses and statistics run in float32 whatever the input dtype (as
    vector-quantize-pytorch's codebook); the residual passed to stage q+1 subtracts the exact code (with the
    rotation trick vector-quantize-pytorch subtracts the rotated code, equal up to rounding); ``mask``,
    ``indices`` (cross-entropy), ``beam_size`` of forward are not implemented; ``sample_codebook_temp`` has no
    effect (vector-quantize-pytorch's too, without stochastic sampling).
    """

    def __init__(
        self, *, dim, num_quantizers=None, codebook_size, codebook_dim=None, shared_codebook=False,
        quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
        accept_image_fmap=False, kmeans_init=False, kmeans_iters=10, decay=0.8, eps=1e-5,
        threshold_ema_dead_code=0, rotation_trick=None, commitment_weight=1.0, ema_update=None,
        sync_codebook=None, backend=None, **unsupported,
    ):
        super().__init__()
        _refuse_unsupported("ResidualVQ", unsupported, _UNSUPPORTED_RVQ_OPTIONS, SUPPORTED_RVQ_OPTIONS)
        dim = _positive_int(dim, "dim")
        if isinstance(codebook_size, (tuple, list)):
            sizes = tuple(codebook_size)
            if num_quantizers is None:
                num_quantizers = len(sizes)
            if len(sizes) != num_quantizers:
                raise ValueError(f"codebook_size has {len(sizes)} sizes for num_quantizers={num_quantizers}")
            for s in sizes:
                _positive_int(s, "codebook_size")
            if len(set(sizes)) != 1:
                raise NotImplementedError(f"vqkernels.ResidualVQ needs one codebook size for every stage, got {sizes}")
            codebook_size = sizes[0]
        if num_quantizers is None:
            raise ValueError("num_quantizers must be given (or codebook_size as a tuple of per-stage sizes)")
        num_quantizers = _positive_int(num_quantizers, "num_quantizers")
        codebook_size = _positive_int(codebook_size, "codebook_size")
        codebook_dim = dim if codebook_dim is None else _positive_int(codebook_dim, "codebook_dim")
        if isinstance(quantize_dropout_cutoff_index, bool) or not isinstance(quantize_dropout_cutoff_index, int) \
                or quantize_dropout_cutoff_index < 0:
            raise ValueError(f"quantize_dropout_cutoff_index must be an int >= 0, got {quantize_dropout_cutoff_index!r}")
        quantize_dropout_multiple_of = _positive_int(quantize_dropout_multiple_of, "quantize_dropout_multiple_of")
        if quantize_dropout and num_quantizers > 1 and quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index ({quantize_dropout_cutoff_index}) must be below "
                             f"num_quantizers ({num_quantizers})")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        if accept_image_fmap and codebook_dim != dim:
            raise ValueError("accept_image_fmap needs codebook_dim == dim (a projection would act on the image's "
                             f"width axis), got dim={dim}, codebook_dim={codebook_dim}")

        self.dim, self.codebook_dim = dim, codebook_dim
        self.num_quantizers = num_quantizers
        self.codebook_sizes = (codebook_size,) * num_quantizers
        self.uniform_codebook_size = True
        self.has_projections = codebook_dim != dim
        # vector-quantize-pytorch's order of construction (projections, then each stage's codebook): same seed,
        # same weights
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = bool(accept_image_fmap)
        self.layers = nn.ModuleList([
            VectorQuantize(codebook_dim, codebook_size, codebook_dim, decay=decay, eps=eps, kmeans_init=kmeans_init,
                           kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
                           accept_image_fmap=accept_image_fmap, commitment_weight=commitment_weight,
                           ema_update=ema_update, rotation_trick=rotation_trick, sync_codebook=sync_codebook,
                           backend=backend)
            for _ in range(num_quantizers)])
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.shared_codebook = bool(shared_codebook)
        self.commitment_weight = float(commitment_weight)
        self.rotation_trick = self.layers[0]._core.rotation_trick
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.sync_codebook, self.backend = sync_codebook, backend
        if self.shared_codebook:
            for vq in self.layers[1:]:
                vq._codebook = self.layers[0]._codebook

    # ---- vector-quantize-pytorch's accessors ------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.codebook_sizes[0]

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, codebook_dim): every stage's codes."""
        return torch.stack([vq.codebook for vq in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, ..., q) with q <= Q (-1: a dropped stage) -> codes (Q, B, ..., codebook_dim), dropped ones 0."""
        q = indices.shape[-1]
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError(f"indices hold {q} of {self.num_quantizers} stages: fewer stages need quantize_dropout")
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - q), -1)
            indices = torch.cat((indices, pad), dim=-1)
        mask = indices == -1
        indices = indices.masked_fill(mask, 0)
        cbs = self.codebooks  # (Q, K, D)
        codes = torch.stack([cbs[s][indices[..., s]] for s in range(self.num_quantizers)])  # (Q, ..., D)
        return codes.masked_fill(mask.movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    # ---- forward ----------------------------------------------------------------------------
    def _num_active(self, device, seed) -> int:
        """How many stages run: all, or (quantize dropout in training) 1 + vector-quantize-pytorch's random index."""
        Q = self.num_quantizers
        if not (self.training and self.quantize_dropout):
            return Q
        if seed is None:
            seed = _sync_seed(device)
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, Q)
        m = self.quantize_dropout_multiple_of
        if m != 1:
            last = ceil((last + 1) / m) * m - 1
        return min(last + 1, Q)

    def forward(self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        for name, v in (("mask", mask), ("indices", indices), ("beam_size", beam_size)):
            if v is not None:
                raise NotImplementedError(f"vqkernels.ResidualVQ.forward does not implement {name}=")
        if self.accept_image_fmap:
            if x.dim() != 4 or x.shape[1] != self.dim:
                raise ValueError(f"accept_image_fmap=True expects x of shape (B, {self.dim}, H, W), got {tuple(x.shape)}")
        elif x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"ResidualVQ expects x of shape (..., {self.dim}), got {tuple(x.shape)}")
        Q = self.num_quantizers
        n_active = self._num_active(x.device, rand_quantize_dropout_fixed_seed)

        x = self.project_in(x)
        if self.accept_image_fmap:
            B, C, H, W = x.shape
            z = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        else:
            z = x
        lead = z.shape[:-1]
        in_dtype = z.dtype
        D = self.codebook_dim
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.reshape(-1, D).float()  # (N, D): search, losses and statistics in float32
            if not self.training:
                zf = zf.detach()
            quant, idx, err = self._quantize(zf, n_active, freeze_codebook)
        N = zf.shape[0]

        if self.training and self.commitment_weight > 0:
            losses = err * (self.commitment_weight / (N * D))
        else:
            losses = err.new_zeros(n_active)
        if n_active < Q:  # dropped stages: index -1, loss 0
            idx = torch.cat((idx, idx.new_full((N, Q - n_active), -1)), dim=1)
            losses = torch.cat((losses, losses.new_zeros(Q - n_active)))
        quant = quant.to(in_dtype).reshape(*lead, D)
        idx = idx.reshape(*lead, Q)
        if self.accept_image_fmap:
            quant = quant.transpose(1, 2).reshape(B, C, H, W)
            idx = idx.reshape(B, H, W, Q)
        quant = self.project_out(quant)
        if not return_all_codes:
            return quant, idx, losses
        return quant, idx, losses, self.get_codes_from_indices(idx)

    # -----------------------------------------------------------------------------------------
    def _quantize(self, zf: torch.Tensor, n_active: int, freeze_codebook: bool):
        """zf (N, D) float32 -> (quantized (N, D), indices (N, n_active), sq_err (n_active,)); updates the codebooks."""
        layers = self.layers[:n_active]
        core0 = layers[0]._core
        sync = dist_sync.sync_enabled(self.sync_codebook)
        updates = self.training and not freeze_codebook and core0.track_stats
        grad = self.training and zf.requires_grad
        rotation = self.rotation_trick and grad
        restarts = updates and core0.threshold_ema_dead_code > 0
        kmeans_pending = core0.kmeans_init and any(not bool(vq._codebook.initted) for vq in layers)
        # Stage by stage only where a stage's search depends on the previous stage's update: a k-means
        # initialisation still to run (on the stage's own residual), or a shared codebook whose codes a
        # restart may change between stages. Else all stages at once (the codebooks are fixed during the search).
        if kmeans_pending or (self.shared_codebook and restarts):
            quant, r, idx, err, inputs = 0, zf, [], [], []
            for q, vq in enumerate(layers):
                t = vq._codebook.tensors()
                if not bool(t.initted):
                    vq._core.kmeans_init_(r.detach(), t)
                out = residual_vq(r, t.embed.detach().float()[None].clone(), rotation_trick=rotation,
                                  return_stats=updates, backend=self.backend)
                inputs.append(r.detach())
                if updates:
                    counts, sums = out[3][0], out[4][0]
                    if sync:
                        dist_sync.all_reduce_sum_(counts, sums)
                    self._update_stage(q, counts, sums, inputs[q], sync, restarts)
                idx.append(out[0])
                err.append(out[2])
                quant = quant + out[1]
                r = r - out[1].detach()
            idx, err = torch.cat(idx, dim=1), torch.cat(err)
            stage_input = inputs.__getitem__
        else:
            cbs = torch.stack([vq._codebook.embed.detach()[0] for vq in layers]).float()  # (Q, K, D), a copy
            out = residual_vq(zf, cbs, rotation_trick=rotation, return_stats=updates, backend=self.backend)
            idx, quant, err = out[:3]
            stage_input = _ResidualStream(zf.detach(), cbs, idx).at
            if updates:
                counts, sums = out[3], out[4]
                if sync:
                    dist_sync.all_reduce_sum_(counts, sums)  # once for every stage
                for q in range(n_active):
                    self._update_stage(q, counts[q], sums[q], stage_input, sync, restarts)
        if self.training and self.shared_codebook:
            self._finish_shared(stage_input, n_active, sync)
        return quant, idx, err

    @torch.no_grad()
    def _update_stage(self, q, counts, sums, stage_input, sync, restarts):
        """Stage q's EMA step from its (already all-reduced) counts and sums, then its dead-code restarts from
        its input residual (``stage_input(q)`` (N, D), or that tensor itself)."""
        vq = self.layers[q]
        core, t = vq._core, vq._codebook.tensors()
        if self.shared_codebook:
            # vector-quantize-pytorch's manual_ema_update: the statistics move per stage, the codes at the end
            t.cluster_size.lerp_(counts, 1.0 - core.decay)
            t.embed_sum.lerp_(sums, 1.0 - core.decay)
        else:
            target = t.embed.detach() if core.ema else t.embed.detach().clone()
            ema_update_from_stats_(target, t.cluster_size, t.embed_sum, counts, sums, decay=core.decay, eps=core.eps)
        if restarts and bool((t.cluster_size < core.threshold_ema_dead_code).any()):
            r = stage_input if isinstance(stage_input, torch.Tensor) else stage_input(q)
            core.restart_dead_codes_(r, t, sync)

    @torch.no_grad()
    def _finish_shared(self, stage_input, n_active, sync):
        """The shared codebook's end of step: its codes from the EMA statistics, then restarts from every stage's
        input residual (rows, then stages, as vector-quantize-pytorch's concatenation)."""
        vq = self.layers[0]
        core, t = vq._core, vq._codebook.tensors()
        if self.vq_is_ema_updating:
            n = t.cluster_size.sum()
            smoothed = (t.cluster_size + core.eps) / (n + self.codebook_size * core.eps) * n
            t.embed.detach().copy_(t.embed_sum / smoothed[:, None])
        if core.threshold_ema_dead_code > 0 and bool((t.cluster_size < core.threshold_ema_dead_code).any()):
            allr = torch.stack([stage_input(q) for q in range(n_active)], dim=1)  # (N, L, D)
            core.restart_dead_codes_(allr.reshape(-1, self.codebook_dim), t, sync)


class _ResidualStream:
    """Stage q's input residual r_q = x - c_0 - ... - c_{q-1}, built in stage order on first demand and kept
    (only dead-code restarts ask for them: the search itself never materialises a residual)."""

    def __init__(self, x, cbs, idx):
        self.rs, self.cbs, self.idx = [x], cbs, idx

    def at(self, q: int) -> torch.Tensor:
        while len(self.rs) <= q:
            s = len(self.rs) - 1
            self.rs.append(self.rs[-1] - self.cbs[s][self.idx[:, s]])
        return self.rs[q]
