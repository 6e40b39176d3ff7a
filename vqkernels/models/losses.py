"""The VQGAN training loss: taming-transformers' ``VQLPIPSWithDiscriminator`` (same arguments, defaults,
state_dict keys ``perceptual_loss.*`` / ``discriminator.*``, return values and log keys).

Generator step (``optimizer_idx=0``)::

    rec      = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)        (squared error with pixel_loss="l2")
    nll      = mean(rec)
    g        = -mean(D(x_rec))
    lambda   = clamp(||d nll / d W_L|| / (||d g / d W_L|| + 1e-4), 0, 1e4) * disc_weight   (W_L: the decoder's
               last layer; detached)
    loss     = nll + lambda * disc_factor * g + codebook_weight * mean(codebook_loss)

Discriminator step (``optimizer_idx=1``): ``disc_factor * d_loss(D(x), D(x_rec))``, hinge or vanilla.
``disc_factor`` is 0 before ``disc_start`` steps (lambda is still computed and logged, as taming).

How the generator step differs from taming's, in cost only: taming differentiates nll and g with respect to
W_L (two backward passes through LPIPS and the discriminator) and then ``loss.backward()`` runs both again.
Here nll and g are differentiated once, with respect to x_rec; their gradients at W_L follow through the last
layer alone, and the returned loss carries ``d nll/d x_rec + lambda * disc_factor * d g/d x_rec`` straight to
x_rec, so ``loss.backward()`` does not pass through LPIPS or the discriminator again. The value and the
gradients reaching x_rec (and the model behind it) and the codebook loss are taming's. The discriminator's
parameters get no gradient from the generator loss (taming under Lightning freezes them during the generator
step to the same effect).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .discriminator import NLayerDiscriminator, weights_init
from .lpips import LPIPS

__all__ = ["VQGANLoss", "adopt_weight", "hinge_d_loss", "vanilla_d_loss"]


def adopt_weight(weight, global_step, threshold=0, value=0.0):
    """``value`` before ``threshold`` steps, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


class _WithGradient(torch.autograd.Function):
    """Returns ``value`` (a detached scalar); its backward hands ``grad * upstream`` to ``x``."""

    @staticmethod
    def forward(ctx, x, grad, value):
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream, None, None


class VQGANLoss(nn.Module):
    """taming's ``VQLPIPSWithDiscriminator``: ``forward(codebook_loss, inputs, reconstructions, optimizer_idx,
    global_step, last_layer=None, cond=None, split="train") -> (loss, log)``.

    Arguments are taming's (``pixelloss_weight`` is accepted and unused, as there). Keyword-only additions:
    ``pixel_loss`` ("l1" as taming, or "l2") and ``lpips_weights`` (see :class:`~vqkernels.models.lpips.LPIPS`).
    """

    def __init__(self, disc_start, codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3, disc_in_channels=3,
                 disc_factor=1.0, disc_weight=1.0, perceptual_weight=1.0, use_actnorm=False, disc_conditional=False,
                 disc_ndf=64, disc_loss="hinge", *, pixel_loss="l1", lpips_weights=None):
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss: expected 'hinge' or 'vanilla', got {disc_loss!r}")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss: expected 'l1' or 'l2', got {pixel_loss!r}")
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.pixel_loss = pixel_loss
        # taming builds it with dropout and calls .eval(), which a parent's .train() undoes: the heads' dropout is
        # active while training (kept, so that training behaves as taming's)
        self.perceptual_loss = LPIPS(weights=lpips_weights).eval()
        self.perceptual_weight = perceptual_weight
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm, ndf=disc_ndf).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(self, nll_loss, g_loss, last_layer):
        """taming's lambda, by differentiating both losses to ``last_layer`` (kept for callers and tests; the
        forward gets the same number more cheaply)."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return self._lambda(nll_grads, g_grads)

    def _lambda(self, nll_grads, g_grads):
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _disc_input(self, x, cond):
        if cond is None:
            if self.disc_conditional:
                raise ValueError("cond: this loss has disc_conditional=True and needs the condition")
            return x
        if not self.disc_conditional:
            raise ValueError("cond: given, but this loss has disc_conditional=False")
        return torch.cat((x, cond), dim=1)

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
                cond=None, split="train"):
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} "
                             f"must have the same shape")
        if optimizer_idx == 0:
            return self._generator_step(codebook_loss, inputs, reconstructions, global_step, last_layer, cond, split)
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, global_step, cond, split)
        raise ValueError(f"optimizer_idx: expected 0 (generator) or 1 (discriminator), got {optimizer_idx!r}")

    def _generator_step(self, codebook_loss, inputs, reconstructions, global_step, last_layer, cond, split):
        x, xrec = inputs.contiguous(), reconstructions.contiguous()
        rec_loss = (x - xrec).abs() if self.pixel_loss == "l1" else (x - xrec) ** 2  # (B, C, H, W)
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(x, xrec)  # (B, 1, 1, 1)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.tensor([0.0])
        nll_loss = torch.mean(rec_loss)
        logits_fake = self.discriminator(self._disc_input(xrec, cond))
        g_loss = -torch.mean(logits_fake)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)

        # the fast path needs x_rec to be the only way into the graph (the usual case)
        differentiable = (torch.is_grad_enabled() and xrec.requires_grad and not inputs.requires_grad
                          and (cond is None or not cond.requires_grad))
        if differentiable:
            if last_layer is None:
                raise ValueError("last_layer: the adaptive weight needs the decoder's last layer "
                                 "(pass last_layer=model.get_last_layer())")
            # one backward through LPIPS and one through the discriminator, down to x_rec only (their
            # activations are freed as they go: nothing else needs them)
            g_nll = torch.autograd.grad(nll_loss, xrec)[0]
            g_gan = torch.autograd.grad(g_loss, xrec)[0]
            # ... then their gradients at the last layer through the layers between (the last conv alone)
            nll_grads = torch.autograd.grad(xrec, last_layer, g_nll, retain_graph=True)[0]
            g_grads = torch.autograd.grad(xrec, last_layer, g_gan, retain_graph=True)[0]
            d_weight = self._lambda(nll_grads, g_grads)
            value = (nll_loss + d_weight * disc_factor * g_loss).detach()
            adv = _WithGradient.apply(xrec, g_nll + (d_weight * disc_factor) * g_gan, value)
            loss = adv + self.codebook_weight * codebook_loss.mean()
        else:
            if self.training and xrec.requires_grad:
                # taming's path for this case (inputs that need gradients too): plain autograd
                if last_layer is None:
                    raise ValueError("last_layer: the adaptive weight needs the decoder's last layer")
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            else:
                d_weight = torch.tensor(0.0)  # evaluation: no gradients, no adaptive weight (as taming)
            loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()

        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log

    def _discriminator_step(self, inputs, reconstructions, global_step, cond, split):
        logits_real = self.discriminator(self._disc_input(inputs.contiguous().detach(), cond))
        logits_fake = self.discriminator(self._disc_input(reconstructions.contiguous().detach(), cond))
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log
