"""Providers and sizes for benchmarking the VQGAN: a full training step, encoding and decoding.

A size is (config, batch, resolution): a named model configuration, the batch and the image side. Modes:

    train    one full training step, as taming trains: the generator step (reconstruction + LPIPS + codebook
             loss + the adversarial term with its adaptive weight, the discriminator active: disc_start 0), its
             backward and Adam step, then the discriminator step (hinge loss) and its Adam step. Adam
             lr 4.5e-6, betas (0.5, 0.9) as taming; the other optimizer's parameters are frozen during each step,
             as Lightning's toggle_optimizer does for taming.
    encode   images -> code indices (eval, no grad)
    decode   code indices -> images (eval, no grad)

bf16 runs the forward and the losses under ``torch.autocast(dtype=torch.bfloat16)`` (the weights stay fp32).

Providers:
    vqkernels      ours: vqkernels.models.VQModel + VQGANLoss; the discriminator step reuses the generator step's
                   reconstruction (detached), as a plain PyTorch training loop does
    taming         taming.models.vqgan.VQModel + VQLPIPSWithDiscriminator, stepped as its training_step runs under
                   Lightning: training_step is called once per optimizer, so the forward runs twice
    taming-reuse   taming's modules in our loop (one forward, the reconstruction reused): what taming's modules
                   cost without Lightning's second forward

Both sides get the same weights: the VQModel, the discriminator and LPIPS (random, for timing: no download) are
built by ours and loaded into taming's (the state_dict keys are the same). taming needs stand-in modules to
import (:mod:`benchmarks.peers`): its providers run in their own process.

Metric: images/s (batch / time). No correctness column (both sides train the same model; the model tests
compare the numbers).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .. import peers
from ..harness.common import device_reasons, importable_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite

OP = "vqgan"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("train", "encode", "decode")


class Size(NamedTuple):
    config: str
    batch: int
    resolution: int


# The named model configurations: fields of VQGANConfig over taming's f16 ImageNet model (1024 codes of 256).
# These are benchmark sizes, not models anyone trains: they live here, not on the model's config.
CONFIGS = {
    "cpu": dict(ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,), z_channels=64, n_embed=512,
                embed_dim=64),  # the CPU size: 512 codes of 64, attention at 8 (64 px images)
    "f16": {},  # taming's f16 ImageNet model itself
    "tiny": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=32, n_embed=64,
                 embed_dim=32),  # smoke runs
}


def model_config(name: str, resolution: int):
    """The VQGANConfig of a named configuration (:data:`CONFIGS`) at ``resolution``."""
    from vqkernels.models import VQGANConfig

    if name not in CONFIGS:
        raise ValueError(f"unknown VQGAN configuration {name!r}; expected one of {tuple(CONFIGS)}")
    return dataclasses.replace(VQGANConfig.f16_1024(), **CONFIGS[name], resolution=resolution)


SIZES = {
    "cpu": NamedSize(Size("cpu", 8, 64), "CPU: ch 64, ch_mult [1,2,2,4], 512 codes of 64, attention at 8, 64x64"),
    "f16": NamedSize(Size("f16", 8, 256), "GPU: taming's f16 ImageNet config (ch 128, [1,1,2,2,4], 1024 codes of "
                                          "256), 256x256"),
    "quick": NamedSize(Size("tiny", 2, 32), "smoke"),
}
PROVIDER_NAMES = ("vqkernels", "taming", "taming-reuse")
# taming's discriminator/LPIPS loss parameters of its f16 config (disc_start 0: active from the first step)
LOSS = dict(disc_conditional=False, disc_in_channels=3, disc_start=0, disc_weight=0.8, codebook_weight=1.0)
ADAM = dict(lr=4.5e-6, betas=(0.5, 0.9))


def default_cases(device: str, quick: bool = False, large: bool = False) -> list[Case]:
    S = {n: s.size for n, s in SIZES.items()}
    if quick:
        return [Case(S["quick"], "fp32", PROVIDER_NAMES, m) for m in MODES]
    size = S["f16"] if device == "cuda" else S["cpu"]
    cases = [Case(size, d, PROVIDER_NAMES, "train") for d in DTYPES]
    cases += [Case(size, d, ("vqkernels", "taming"), m) for m in ("encode", "decode") for d in DTYPES]
    if device == "cpu" and large:
        cases += [Case(S["f16"], "fp32", PROVIDER_NAMES, m) for m in MODES]
    return cases


# ---------------------------------------------------------------------------------------------
# Inputs and the models

class Inputs(NamedTuple):
    x: torch.Tensor  # (B, 3, R, R) images in [-1, 1]
    seed: int


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    B, R = case.size.batch, case.size.resolution
    g = torch.Generator().manual_seed(seed)
    return Inputs((torch.rand(B, 3, R, R, generator=g) * 2 - 1).to(device), seed)


def _ours(case: Case, device: str):
    """Our VQModel and VQGANLoss, seeded: the weights every provider starts from."""
    from vqkernels.models import VQGANLoss, VQModel

    torch.manual_seed(1234)
    model = VQModel(model_config(case.size.config, case.size.resolution))
    loss = VQGANLoss(lpips_weights="random", **LOSS)
    return model.to(device), loss.to(device)


def _taming(case: Case, device: str):
    """taming's VQModel + VQLPIPSWithDiscriminator with our weights (stand-ins installed, LPIPS offline)."""
    peers.install()  # taming's stand-ins (this provider has a process of its own)
    from taming.models.vqgan import VQModel as TamingVQModel

    ours, our_loss = _ours(case, "cpu")
    cfg = ours.config
    ddconfig = dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
                    out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout)
    lossconfig = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": LOSS}
    with peers.offline_lpips():
        model = TamingVQModel(ddconfig, lossconfig, n_embed=cfg.n_embed, embed_dim=cfg.embed_dim)
    missing, unexpected = model.load_state_dict({**ours.state_dict(),
                                                 **{f"loss.{k}": v for k, v in our_loss.state_dict().items()}},
                                                strict=False)
    if unexpected or [k for k in missing if not k.startswith("loss.perceptual_loss.net")]:
        raise RuntimeError(f"taming's VQModel did not take our weights: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    return model.to(device), model.loss


def _autocast(case: Case, device: str):
    import contextlib

    if case.dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _set_requires_grad(params, flag: bool):
    for p in params:
        p.requires_grad_(flag)


class _TrainStep:
    """One full step (see the module doc). ``second_forward``: taming under Lightning (the forward again for the
    discriminator step); otherwise the generator step's reconstruction is reused, detached."""

    def __init__(self, model, loss, x, case, device, second_forward: bool):
        self.model, self.loss, self.x, self.case, self.device = model, loss, x, case, device
        self.second_forward = second_forward
        self.ae_params = [p for n, p in model.named_parameters() if not n.startswith("loss.")]
        self.d_params = list(loss.discriminator.parameters())
        self.opt_ae = torch.optim.Adam(self.ae_params, **ADAM)
        self.opt_d = torch.optim.Adam(self.d_params, **ADAM)
        self.global_step = 0
        model.train()
        loss.train()

    def __call__(self):
        x, model, loss = self.x, self.model, self.loss
        # generator step (optimizer_idx 0): the discriminator's parameters frozen
        _set_requires_grad(self.d_params, False)
        _set_requires_grad(self.ae_params, True)
        with _autocast(self.case, self.device):
            xrec, qloss = model(x)
            aeloss, _ = loss(qloss, x, xrec, 0, self.global_step, last_layer=model.get_last_layer(), split="train")
        self.opt_ae.zero_grad(set_to_none=True)
        aeloss.backward()
        self.opt_ae.step()
        # discriminator step (optimizer_idx 1): the autoencoder's parameters frozen
        _set_requires_grad(self.ae_params, False)
        _set_requires_grad(self.d_params, True)
        with _autocast(self.case, self.device):
            if self.second_forward:
                xrec, qloss = model(x)
            discloss, _ = loss(qloss, x, xrec.detach(), 1, self.global_step, last_layer=model.get_last_layer(),
                               split="train")
        self.opt_d.zero_grad(set_to_none=True)
        discloss.backward()
        self.opt_d.step()
        self.global_step += 1
        return aeloss.detach(), discloss.detach()


def _encode_decode(model, case: Case, device: str, taming: bool, x):
    model.eval()
    if case.mode == "encode":
        def call():
            with torch.no_grad(), _autocast(case, device):
                if taming:
                    return model.encode(x)[2][2]
                return model.tokenize(x)

        return call
    with torch.no_grad():
        quant, _, (_, _, idx) = model.encode(x)
    B, C, h, w = quant.shape
    idx = idx.reshape(B, h, w)

    def call():
        with torch.no_grad(), _autocast(case, device):
            if taming:
                return model.decode(model.quantize.get_codebook_entry(idx.reshape(-1), (B, h, w, C)))
            return model.decode_code(idx)

    return call


def _build(which: str):
    def build(inp: Inputs, case: Case):
        device = inp.x.device.type
        taming = which != "vqkernels"
        model, loss = (_taming if taming else _ours)(case, device)
        if case.mode == "train":
            return _TrainStep(model, loss, inp.x, case, device, second_forward=which == "taming")
        return _encode_decode(model, case, device, taming, inp.x)

    return build


def _ours_reasons(case: Case, device: str):
    return device_reasons(device) or importable_reasons("vqkernels.models")


def taming_reasons(case: Case, device: str) -> list[str]:
    return peers.taming_reasons() or device_reasons(device)


def _taming_reasons(mode_ok=MODES):
    def reasons(case: Case, device: str):
        if case.mode not in mode_ok:
            return [f"times the training step only (mode {case.mode}: see 'taming')"]
        return taming_reasons(case, device)

    return reasons


PROVIDERS = {
    "vqkernels": Provider("vqkernels", "ours", "vqkernels.models.VQModel + VQGANLoss (reconstruction reused for the "
                          "discriminator step)", _build("vqkernels"), _ours_reasons),
    "taming": Provider("taming", "peer", "taming VQModel + VQLPIPSWithDiscriminator, stepped as under Lightning "
                       "(a forward per optimizer)", _build("taming"), _taming_reasons(), isolated=True),
    "taming-reuse": Provider("taming-reuse", "peer", "taming's modules in our loop (one forward, reconstruction "
                             "reused)", _build("taming-reuse"), _taming_reasons(("train",)), isolated=True),
}


class VQGANSuite(Suite):
    op = OP
    title = "VQGAN (train: generator + discriminator step with LPIPS; encode, decode)"
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    modes = MODES
    metrics = (Metric("images_per_s", "images/s", lambda c: float(c.size.batch)),)
    providers = PROVIDERS
    cpu_providers = PROVIDER_NAMES
    cuda_providers = PROVIDER_NAMES

    def label(self, size):
        return f"{size.config} b{size.batch} {size.resolution}px"

    def parse_size(self, token):
        """A named size, or ``CONFIGxBATCHxRESOLUTION`` (``cpux8x64``, ``f16x4x256``)."""
        if token in self.sizes:
            return self.sizes[token].size
        parts = token.split("x")
        if len(parts) == 3 and parts[0] in CONFIGS and parts[1].isdigit() and parts[2].isdigit():
            return Size(parts[0], int(parts[1]), int(parts[2]))
        raise SystemExit(f"bad vqgan size {token!r}: expected CONFIGxBATCHxRESOLUTION (CONFIG one of {tuple(CONFIGS)}) "
                         f"or one of {', '.join(self.sizes)}")

    def default_cases(self, device, quick=False, large=False):
        return default_cases(device, quick, large)

    def warmup_case(self, case):
        return self.with_size(case, batch=min(case.size.batch, 2))  # BatchNorm in training takes 2 or more

    def make_inputs(self, case, device, seed=0):
        return make_inputs(case, device, seed)


SUITE = VQGANSuite()
