"""Drop-in quantizer modules over the vqkernels ops.

- :class:`VectorQuantizer`: taming-transformers' ``VectorQuantizer2`` (same constructor, forward,
  index shapes, remapping, ``get_codebook_entry`` and state_dict key ``embedding.weight``), plus opt-in
  keyword options from vector-quantize-pytorch (EMA, k-means init, cosine codes, dead-code restarts,
  a lower-dimensional code space, the rotation trick).
- :class:`VectorQuantize`: vector-quantize-pytorch's ``VectorQuantize`` for its core options, with its
  state_dict keys (``_codebook.embed`` (1, K, D), ``_codebook.cluster_size``, ``_codebook.embed_avg``,
  ``_codebook.initted``, ``project_in.*``, ``project_out.*``).

Both are thin front-ends over one :class:`~vqkernels.nn._core.QuantizerCore`; they only reshape,
project, and map their peer's options onto it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..ops.nearest_code import normalize as _op_normalize
from ..ops.code_stats import code_usage
from ._core import CodebookTensors, QuantizerCore, l2norm

__all__ = ["VectorQuantizer", "VectorQuantize"]


class VectorQuantizer(nn.Module):
    """Drop-in for ``taming.modules.vqvae.quantize.VectorQuantizer2``, on fused kernels.

    Taming's arguments (positional, same meaning): ``n_e`` codes of size ``e_dim``, ``beta`` and
    ``legacy`` (where beta sits in the loss, see :func:`vqkernels.vq_loss`), ``remap`` (a .npy of the
    used code indices), ``unknown_index`` (``"random"``, ``"extra"`` or an int), ``sane_index_shape``.

    ``forward(z)``, z (B, C=e_dim, H, W) -> ``(z_q (B, C, H, W), loss, (perplexity, None, indices))``:
    indices are (B*H*W,) ((B*H*W, 1) with remap, (B, H, W) with ``sane_index_shape``). Unlike taming
    the perplexity is real (a float32 scalar) and the one-hot ``min_encodings`` is never built (None).

    Opt-in, keyword-only options (vector-quantize-pytorch's names and meaning):
        decay: EMA codebook with this decay instead of the codebook loss; the codebook stops being
            trained by gradients (``embedding.weight.requires_grad`` is False) and the EMA state lives
            in the buffers ``cluster_size`` (K,) and ``embed_sum`` (K, D). The loss is then the
            commitment term alone, ``beta * mean((sg[z_q] - z)^2)`` (``legacy`` has nothing left to
            place), as vector-quantize-pytorch with ``commitment_weight=beta`` and the VQ-VAE paper.
        eps: Laplace smoothing of the EMA cluster sizes (1e-5).
        kmeans_init, kmeans_iters: k-means initialisation of the codebook from the first training batch
            (buffer ``initted``); loading a state_dict without ``initted`` marks the codebook initialised.
        use_cosine_sim: l2-normalised inputs and codes (ViT-VQGAN, LlamaGen): the search, z_q and the
            loss are on unit vectors, and ``get_codebook_entry`` returns unit codes.
        threshold_ema_dead_code: codes whose EMA cluster size falls below this are restarted from random
            vectors of the batch (keeps the ``cluster_size``/``embed_sum`` buffers even without EMA, then
            with vector-quantize-pytorch's default decay of 0.8).
        codebook_dim: a lower-dimensional code space: ``project_in`` (e_dim -> codebook_dim) and
            ``project_out`` (codebook_dim -> e_dim) linear maps on the channel axis; ``embedding.weight``
            is (n_e, codebook_dim) and the loss is measured in the code space.
        rotation_trick: the rotation trick (Fifty et al. 2024) instead of the straight-through estimator.
        sync_codebook: synchronise EMA statistics, k-means and restarts across ranks (None: whenever
            torch.distributed is initialised with more than one rank).
        backend: the vqkernels backend for every op (None: the usual choice, see ``vqkernels.use_backend``).
    """

    def __init__(
        self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True, *,
        decay: float | None = None, eps: float = 1e-5, kmeans_init: bool = False, kmeans_iters: int = 10,
        use_cosine_sim: bool = False, threshold_ema_dead_code: float = 0, codebook_dim: int | None = None,
        rotation_trick: bool = False, sync_codebook: bool | None = None, backend: str | None = None,
    ):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy

        self.codebook_dim = e_dim if codebook_dim is None else int(codebook_dim)
        # as taming: nn.Embedding, then uniform(-1/n_e, 1/n_e) (same random calls, so the same seed gives the same codes)
        self.embedding = nn.Embedding(self.n_e, self.codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        if self.codebook_dim != e_dim:
            self.project_in = nn.Linear(e_dim, self.codebook_dim)
            self.project_out = nn.Linear(self.codebook_dim, e_dim)
        else:
            self.project_in = self.project_out = None

        self.remap = remap
        if self.remap is not None:
            self.register_buffer("used", torch.tensor(np.load(self.remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index  # "random" or "extra" or integer
            if self.unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed = self.re_embed + 1
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

        ema = decay is not None
        if ema:
            self.embedding.weight.requires_grad_(False)
        self._core = QuantizerCore(
            num_codes=n_e, dim=self.codebook_dim, metric="cosine" if use_cosine_sim else "l2",
            # without EMA, dead-code restarts still track EMA statistics, at vector-quantize-pytorch's default decay
            learnable=not ema, ema=ema, decay=decay if ema else 0.8, eps=eps,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code, rotation_trick=rotation_trick,
            # with EMA, only the commitment term, weighted by beta: beta' = 0 drops the codebook term
            beta=0.0 if ema else beta, legacy=True if ema else legacy, loss_scale=beta if ema else 1.0,
            sync=sync_codebook, backend=backend,
        )
        if self._core.track_stats:
            self.register_buffer("cluster_size", torch.ones(n_e))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        if kmeans_init:
            self.register_buffer("initted", torch.tensor(False))
        self._register_load_state_dict_pre_hook(_fill_missing_quantizer_state, with_module=True)

    # taming's options, read back
    @property
    def decay(self):
        return self._core.decay if self._core.ema else None

    @property
    def use_cosine_sim(self) -> bool:
        return self._core.cosine

    def _tensors(self) -> CodebookTensors:
        return CodebookTensors(self.embedding.weight, getattr(self, "cluster_size", None),
                               getattr(self, "embed_sum", None), getattr(self, "initted", None))

    # ---- taming's index remapping ----------------------------------------------------------
    def remap_to_used(self, inds):
        """Indices into the full codebook -> indices into ``used`` (unknown ones: random or ``unknown_index``)."""
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        # position of each code in `used` (its first occurrence), -1 if unused: a lookup, not taming's (B, N, U) match
        lut = torch.full((max(self.n_e, int(used.max()) + 1 if used.numel() else 1),), -1,
                         dtype=inds.dtype, device=inds.device)
        pos = torch.arange(used.shape[0], dtype=inds.dtype, device=inds.device)
        lut.scatter_reduce_(0, used, pos, reduce="amin", include_self=False)
        new = lut[inds]
        unknown = new < 0
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds):
        """Indices into ``used`` -> indices into the full codebook (the extra index maps to 0, as taming)."""
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # extra token
            inds = inds.masked_fill(inds >= self.used.shape[0], 0)
        back = used[inds]
        return back.reshape(ishape)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
        assert rescale_logits is False, "Only for interface compatible with Gumbel"
        assert return_logits is False, "Only for interface compatible with Gumbel"
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer expects z of shape (B, {self.e_dim}, H, W), got {tuple(z.shape)}")
        B, C, H, W = z.shape
        # (B, H, W, C) as a view: the ops read the channel-first map in place and return z_q (and, in
        # backward, the gradient of z) in the same layout, so neither direction copies the map
        zf = z.permute(0, 2, 3, 1)
        if self.project_in is not None:
            zf = self.project_in(zf)
        z_q, loss, min_encoding_indices = self._core(zf, self._tensors(), training=self.training)
        min_encoding_indices = min_encoding_indices.reshape(-1)  # (B*H*W,), as taming
        if self.project_out is not None:
            z_q = self.project_out(z_q)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # a no-op when z_q kept z's channel-first layout
        _, perplexity = code_usage(min_encoding_indices, self.n_e, backend=self._core.backend)

        if self.remap is not None:
            min_encoding_indices = min_encoding_indices.reshape(B, -1)  # add batch axis
            min_encoding_indices = self.remap_to_used(min_encoding_indices)
            min_encoding_indices = min_encoding_indices.reshape(-1, 1)  # flatten
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(B, H, W)
        return z_q, loss, (perplexity, None, min_encoding_indices)

    def get_codebook_entry(self, indices, shape):
        """Codes of ``indices``; with ``shape`` = (batch, height, width, channel), as (B, C, H, W)."""
        if self.remap is not None:
            indices = indices.reshape(shape[0], -1)  # add batch axis
            indices = self.unmap_to_all(indices)
            indices = indices.reshape(-1)  # flatten again
        z_q = self.embedding(indices)
        if self.use_cosine_sim:
            z_q = _op_normalize(z_q)  # what the forward's search and z_q see
        if self.project_out is not None:
            z_q = self.project_out(z_q)
        if shape is not None:
            z_q = z_q.view(shape)
            z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q

    def extra_repr(self) -> str:
        s = f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, legacy={self.legacy}"
        c = self._core
        if self.codebook_dim != self.e_dim:
            s += f", codebook_dim={self.codebook_dim}"
        for k, v, default in (("decay", self.decay, None), ("use_cosine_sim", c.cosine, False),
                              ("kmeans_init", c.kmeans_init, False), ("rotation_trick", c.rotation_trick, False),
                              ("threshold_ema_dead_code", c.threshold_ema_dead_code, 0.0),
                              ("backend", c.backend, None)):
            if v != default:
                s += f", {k}={v}"
        return s


def _fill_missing_quantizer_state(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
    """A plain taming checkpoint (only ``embedding.weight``) loads into a VectorQuantizer with EMA or k-means:
    the EMA buffers start as at construction (cluster sizes 1, sums = the loaded codes) and ``initted`` is True."""
    w = state_dict.get(prefix + "embedding.weight")
    if w is None:
        return
    if hasattr(module, "cluster_size") and prefix + "cluster_size" not in state_dict:
        state_dict[prefix + "cluster_size"] = torch.ones_like(module.cluster_size)
    if hasattr(module, "embed_sum") and prefix + "embed_sum" not in state_dict:
        state_dict[prefix + "embed_sum"] = w.detach().clone().to(module.embed_sum.dtype)
    if hasattr(module, "initted") and prefix + "initted" not in state_dict:
        state_dict[prefix + "initted"] = torch.tensor(True)


# ---------------------------------------------------------------------------------------------
# vector-quantize-pytorch

# Its constructor options that this module does not implement, with its defaults: passing one with a
# value other than its default raises (the default changes nothing, so it is accepted).
_UNSUPPORTED_VQ_OPTIONS = {
    "heads": 1,
    "separate_codebook_per_head": False,
    "freeze_codebook": False,
    "sync_kmeans": True,
    "layernorm_after_project_in": False,
    "accept_3d_fmap": False,
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "stochastic_sample_codes": False,
    "sample_codebook_temp": 1.0,
    "straight_through": False,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
    "return_zeros_for_masked_padding": True,
    "route_gradients_to_input": True,
}

SUPPORTED_VQ_OPTIONS = (
    "dim", "codebook_size", "codebook_dim", "decay", "eps", "kmeans_init", "kmeans_iters", "use_cosine_sim",
    "threshold_ema_dead_code", "commitment_weight", "accept_image_fmap", "channel_last", "learnable_codebook",
    "ema_update", "rotation_trick", "sync_codebook",
)


def _same(a, b) -> bool:
    try:
        return bool(a == b) if (a is None) == (b is None) else False
    except Exception:
        return False


def _refuse_unsupported(cls_name: str, unsupported: dict, defaults: dict, supported) -> None:
    """A drop-in's check of VQP's options it does not implement: an unknown keyword is a TypeError (as Python's
    own); a known option at anything but VQP's default (``defaults``) is a NotImplementedError naming it."""
    for name, value in unsupported.items():
        if name not in defaults:
            raise TypeError(f"{cls_name} got an unexpected keyword argument {name!r}")
        if not _same(value, defaults[name]):
            raise NotImplementedError(
                f"vqkernels.{cls_name} does not implement vector-quantize-pytorch's option {name}={value!r} "
                f"(only its default, {defaults[name]!r}); supported options: " + ", ".join(supported))


class _VQCodebook(nn.Module):
    """vector-quantize-pytorch's ``_codebook`` state, under its names: ``initted``, ``cluster_size`` (1, K),
    ``embed_avg`` (1, K, D), ``embed`` (1, K, D) (a Parameter when the codebook is learnable)."""

    def __init__(self, embed: torch.Tensor, kmeans_init: bool, learnable: bool):
        super().__init__()
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(embed.shape[:2]))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)

    def tensors(self) -> CodebookTensors:
        return CodebookTensors(self.embed[0], self.cluster_size[0], self.embed_avg[0], self.initted)


class VectorQuantize(nn.Module):
    """Drop-in for ``vector_quantize_pytorch.VectorQuantize`` (single codebook), on fused kernels.

    Options, with vector-quantize-pytorch's meaning and defaults: ``dim``, ``codebook_size``,
    ``codebook_dim`` (projections ``project_in``/``project_out`` when it differs from ``dim``),
    ``decay`` (0.8), ``eps`` (1e-5), ``kmeans_init``, ``kmeans_iters`` (10), ``use_cosine_sim``,
    ``threshold_ema_dead_code`` (0), ``commitment_weight`` (1.0), ``accept_image_fmap``, ``channel_last``
    (True), ``learnable_codebook`` (False; needs ``ema_update=False``), ``ema_update`` (True),
    ``rotation_trick`` (default: True when dim > 1). Also ``sync_codebook`` (None: synchronise across
    ranks whenever torch.distributed is initialised) and ``backend`` (the vqkernels backend of every op).
    Any other vector-quantize-pytorch option given a value other than its default raises
    ``NotImplementedError`` naming it.

    ``forward(x) -> (quantize, indices, loss)``: x (B, N, D), (B, D, N) with ``channel_last=False``,
    (B, C, H, W) with ``accept_image_fmap``, or (B, D); indices (B, N), (B, H, W) or (B,). The loss is
    ``commitment_weight * mean((sg[q] - x)^2)`` in training (with a learnable codebook the codebook
    gets the same term's gradient), and 0 in eval mode, as vector-quantize-pytorch.

    Differences: k-means initialisation runs on the first *training* batch (vector-quantize-pytorch
    also runs it in eval mode); under autocast/low-precision input the search, loss and EMA run in
    float32 (the loss is float32); in eval mode the output carries the straight-through gradient.
    """

    def __init__(
        self, dim, codebook_size, codebook_dim=None, *, decay=0.8, eps=1e-5, kmeans_init=False, kmeans_iters=10,
        use_cosine_sim=False, threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False,
        commitment_weight=1.0, learnable_codebook=None, ema_update=None, rotation_trick=None,
        sync_codebook=None, backend=None, **unsupported,
    ):
        super().__init__()
        _refuse_unsupported("VectorQuantize", unsupported, _UNSUPPORTED_VQ_OPTIONS, SUPPORTED_VQ_OPTIONS)
        ema_update = True if ema_update is None else bool(ema_update)
        learnable_codebook = False if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        if ema_update and learnable_codebook:
            raise ValueError("learnable codebook not compatible with EMA update: pass ema_update=False "
                             "(as vector-quantize-pytorch requires)")

        self.dim = dim
        self.heads = 1
        self.separate_codebook_per_head = False
        self.codebook_size = codebook_size
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        # created in vector-quantize-pytorch's order (projections, then the codebook): same seed, same weights
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.learnable_codebook = learnable_codebook
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = channel_last
        self.use_cosine_sim = use_cosine_sim

        if kmeans_init:
            embed = torch.zeros(1, codebook_size, codebook_dim)
        else:
            embed = torch.empty(1, codebook_size, codebook_dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = l2norm(embed)
        self._codebook = _VQCodebook(embed, kmeans_init, learnable_codebook)

        cw = float(commitment_weight) if commitment_weight > 0 else 0.0
        self._core = QuantizerCore(
            num_codes=codebook_size, dim=codebook_dim, metric="cosine" if use_cosine_sim else "l2",
            learnable=learnable_codebook, ema=ema_update, decay=decay, eps=eps,
            track_stats=ema_update or threshold_ema_dead_code > 0,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
            rotation_trick=rotation_trick,
            # cw * mean((q - x)^2). Learnable: vq_loss(beta=1) has its gradient to both sides and twice its
            # value; else vq_loss(beta=0), the commitment term alone
            beta=1.0 if learnable_codebook else 0.0, legacy=True, loss_scale=cw,
            loss_value_ratio=0.5 if learnable_codebook else 1.0,
            sync=sync_codebook, backend=backend,
        )
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def ema_update(self) -> bool:
        return self._core.ema

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed[0]

    @codebook.setter
    def codebook(self, codes):
        self._codebook.embed.data.copy_(codes.reshape(self._codebook.embed.shape))

    def get_codes_from_indices(self, indices):
        codes = self.codebook[indices]
        if not self.channel_last or self.accept_image_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices):
        codes = self.codebook[indices]
        out = self.project_out(codes)
        if not self.channel_last or self.accept_image_fmap:
            out = out.movedim(-1, 1)
        return out

    def forward(self, x):
        only_one = x.ndim == 2
        if only_one:
            x = x.unsqueeze(1)  # (B, 1, D)
        if self.accept_image_fmap:
            if x.ndim != 4:
                raise ValueError(f"accept_image_fmap=True expects x of shape (B, C, H, W), got {tuple(x.shape)}")
            height, width = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        need_transpose = not self.channel_last and not self.accept_image_fmap and not only_one
        if need_transpose:
            x = x.transpose(1, 2)  # (B, D, N) -> (B, N, D)
        x = self.project_in(x)
        lead = x.shape[:-1]
        q, loss, idx = self._core(x.reshape(-1, self.codebook_dim), self._codebook.tensors(), training=self.training)
        q = self.project_out(q.reshape(*lead, self.codebook_dim))
        idx = idx.reshape(lead)
        if not self.training:
            loss = self.zero
        if self.accept_image_fmap:
            idx = idx.reshape(idx.shape[0], height, width)
            q = q.transpose(1, 2).reshape(q.shape[0], -1, height, width)
        if need_transpose:
            q = q.transpose(1, 2)
        if only_one:
            q, idx = q.squeeze(1), idx.squeeze(1)
        return q, idx, loss
