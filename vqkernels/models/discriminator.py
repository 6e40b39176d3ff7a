"""The PatchGAN discriminator of pix2pix as taming-transformers uses it (``NLayerDiscriminator``), with
its ``ActNorm`` option and its ``weights_init``; state_dict keys are taming's (``main.N.*``)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["NLayerDiscriminator", "ActNorm", "weights_init"]


def weights_init(m: nn.Module) -> None:
    """taming's init: convs N(0, 0.02); BatchNorm scales N(1, 0.02), shifts 0 (use with ``module.apply``)."""
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)``, initialised from the first training batch so that the output
    has zero mean and unit variance per channel (Glow's data-dependent init). Keys: loc, scale, initialized."""

    def __init__(self, num_features: int, logdet: bool = False, affine: bool = True, allow_reverse_init: bool = False):
        if not affine:
            raise ValueError("ActNorm: affine=False is not supported (as taming)")
        super().__init__()
        self.logdet = logdet
        self.allow_reverse_init = allow_reverse_init
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x):  # x (B, C, H, W)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        self.loc.data.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.data.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))

    def forward(self, x, reverse: bool = False):
        if reverse:
            return self.reverse(x)
        squeeze = x.dim() == 2
        if squeeze:
            x = x[:, :, None, None]
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        h = self.scale * (x + self.loc)
        if squeeze:
            h = h.squeeze(-1).squeeze(-1)
        if self.logdet:
            logdet = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
            return h, logdet * torch.ones(x.shape[0]).to(x)
        return h

    def reverse(self, y):
        if self.training and self.initialized.item() == 0:
            if not self.allow_reverse_init:
                raise RuntimeError("ActNorm: initializing in the reverse direction is disabled "
                                   "(pass allow_reverse_init=True to allow it)")
            self.initialize(y)
            self.initialized.fill_(1)
        squeeze = y.dim() == 2
        if squeeze:
            y = y[:, :, None, None]
        h = y / self.scale - self.loc
        return h.squeeze(-1).squeeze(-1) if squeeze else h


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, stride 2 for the first ``n_layers``, then two stride-1 convs; one logit per patch.

    (B, input_nc, H, W) -> (B, 1, H', W') (64x64 with n_layers=3: 6x6). Widths ndf * min(2^n, 8);
    BatchNorm (convs without bias) or ActNorm (convs with bias); LeakyReLU(0.2).
    Construct, then ``.apply(weights_init)`` as taming does (VQGANLoss does it for you).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        self.input_nc = input_nc
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        bias = use_actnorm  # BatchNorm's shift makes a conv bias redundant
        kw, pad = 4, 1
        layers = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=pad, bias=bias),
                       norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad))  # one logit per patch
        self.main = nn.Sequential(*layers)

    def forward(self, input):  # (B, input_nc, H, W) -> (B, 1, H', W')
        if input.dim() != 4 or input.shape[1] != self.input_nc:
            raise ValueError(f"NLayerDiscriminator: expected input (B, {self.input_nc}, H, W), got {tuple(input.shape)}")
        return self.main(input)
