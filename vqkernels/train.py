"""Training: one loop, :func:`fit`, and a step function per stage.

Read it top to bottom: :func:`fit` is the loop every stage runs (the step count and the time budget, the
stop agreed across processes, logs, picture grids and checkpoints at their cadence, resume); a stage is a
:class:`Stage`: its data, its modules and optimizers, and ``step(net, x, labels, s)``, one optimisation step.
:func:`train_vqgan` builds the first stage (generator + discriminator step), :func:`train_gpt` the second
(next-token step over a frozen VQGAN's codes, given the class labels when the run is conditional). The run's
config and folder are :mod:`vqkernels.runs`; the demo is :mod:`vqkernels.demo`.

``--resume`` restores weights, optimizer and scheduler states, the RNG states of torch, numpy and Python, and
the position in the data (the batch of step s is a function of the seed and s, see :mod:`vqkernels.data`), so
on the CPU N steps + resume + N steps equal 2N steps bit for bit. Ctrl-C (SIGINT) finishes the current step,
saves a checkpoint and stops; a second Ctrl-C stops at once.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model trains with DistributedDataParallel (nccl on GPUs, gloo on
CPUs), each rank reading its own part of every batch (``DistributedSampler``); rank 0 writes everything.
The quantizer synchronises its codebook statistics across ranks by itself.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .data import DataError, SeededBatches, default_workers, open_dataset, save_grid
from .runs import (GPTTrainConfig, RunFolder, TrainConfig, TrainError, VQGANTrainConfig, config_from_dict,
                   first_line, load_model, resolve_config, resolve_device)

__all__ = [
    "TrainError", "VQGANTrainConfig", "GPTTrainConfig", "Stage", "fit", "train_vqgan", "train_gpt",
    "build_vqgan", "build_gpt", "evaluate_vqgan", "evaluate_gpt", "resolve_config", "config_from_dict",
]

# the demo's first stage, and the default of train-vqgan: small enough for a CPU (f=4, 512 codes of 32, an
# EMA codebook with dead-code restarts, which keeps most of the codebook in use)
SMALL_VQGAN = dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=64, resolution=64,
                   n_embed=512, embed_dim=32, decay=0.99, threshold_ema_dead_code=1.0)
SMALL_GPT = dict(n_layer=4, n_head=4, n_embd=256)
VQGAN_LOSS_DEFAULTS = dict(disc_start=10_000, disc_weight=0.8, codebook_weight=1.0, perceptual_weight=1.0)


# ---------------------------------------------------------------------------------------------
# the loop

@dataclass
class Stage:
    """One training stage, as :func:`fit` runs it."""

    name: str                    # the progress bar's label
    train_set: Any               # a vqkernels.data dataset: items are images, or (image, label) with labels
    # step(net, x, labels, s) -> logs: one optimisation step on the batch of step s (x and labels on the device;
    # labels None when the data has none); net is modules["model"] as called in training (DDP, compiled);
    # logs: name -> tensor or number (read on the steps that log, so that other steps never wait for the GPU)
    step: Callable[..., dict]
    modules: dict                # what a checkpoint holds: "model" (its save_pretrained) and others by name
    optimizers: dict             # "optimizer[_x]" -> optimizer: fit gives each a learning-rate schedule "scheduler[_x]"
    pictures: Callable[[], tuple] | None = None  # () -> (rows of (N, 3, H, W) images, images a row): the grids
    evaluate: Callable[[], dict | None] | None = None  # () -> {metric: value} after the last step (rank 0)
    postfix: dict = field(default_factory=dict)  # the progress bar's numbers: short name -> log key
    files: dict = field(default_factory=dict)    # text files written into the run folder at its start


def fit(cfg: TrainConfig, stage: Stage, d: _Dist, device: torch.device, *, resume: bool = False,
        overwrite: bool = False, progress: bool = True) -> dict:
    """Train ``stage`` until ``cfg.steps`` (or ``cfg.minutes``, or Ctrl-C), writing the run folder ``cfg.out``.
    Returns a summary: steps done, whether interrupted, wall time, images/s, the last logged values, the run's
    ``latest`` file, the model, and what ``stage.evaluate`` gave."""
    # the run folder, touched only now that the data and the config are known to be usable; a resumed run's
    # weights and its trainer state (step, optimizers, schedulers, random streams)
    run = RunFolder(cfg.out, writer=d.main)
    run.check(resume=resume, overwrite=overwrite)
    state = run.restore(stage.modules) if resume else None
    start = int(state["step"]) if state is not None else 0
    run.prepare(cfg, resume=resume, overwrite=overwrite, step=start)
    for name, text in stage.files.items():
        run.write_text(name, text)

    clock = _Clock(cfg)
    schedulers = {name.replace("optimizer", "scheduler", 1):
                  torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, clock))
                  for name, opt in stage.optimizers.items()}
    stateful = {**stage.optimizers, **schedulers}  # (what trainer.pt holds beside the step and the RNG states)
    if state is not None:
        if state.get("world", 1) != d.world:
            warnings.warn(f"resuming a run of {state.get('world')} process(es) on {d.world}: the data order changes")
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
    net = _start_rngs_and_wrap(stage.modules["model"], state, cfg, d, device)
    first_opt = next(iter(stage.optimizers.values()))  # (whose lr the log shows)

    loader = _loader(stage.train_set, cfg, start, d, device)
    bar = _progress_bar(cfg, start, progress and d.main, stage.name)
    step, seen, logs, interrupted = start, 0, {}, False
    t_start = t_log = clock.start = time.perf_counter()
    n_log = 0
    with _StopFlag() as stop:
        for batch in loader:
            x, labels = batch if isinstance(batch, (list, tuple)) else (batch, None)
            x = x.to(device, non_blocking=True)
            labels = None if labels is None else labels.to(device, non_blocking=True)
            out = stage.step(net, x, labels, step)
            # (torch warns of a scheduler stepped before its optimizer: a step may skip an optimizer on purpose, as
            # the VQGAN's discriminator before disc_start)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                for sch in schedulers.values():
                    sch.step()
            step += 1
            seen += x.shape[0] * d.world
            n_log += x.shape[0] * d.world
            stopping = _agree(stop.stop or clock.out_of_time(), d, device)  # every rank stops at the same step
            last = step == cfg.steps or stopping
            if step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                logs = {k: _scalar(v) for k, v in out.items()}
                rec = {"step": step, "time": round(now - t_start, 3), "lr": first_opt.param_groups[0]["lr"],
                       "images_per_s": round(n_log / max(now - t_log, 1e-9), 2), **logs}
                run.log(rec)
                t_log, n_log = now, 0
                bar.set_postfix({**{k: f"{logs[v]:.4f}" for k, v in stage.postfix.items()},
                                 "img/s": f"{rec['images_per_s']:.1f}"}, refresh=False)
            bar.update(1)
            if d.main and stage.pictures is not None and (step % cfg.image_every == 0 or last):
                rows, nrow = stage.pictures()
                save_grid(run.image_path(step), rows, nrow)
            if step % cfg.checkpoint_every == 0 or last:
                trainer = {"step": step, "world": d.world, **{k: v.state_dict() for k, v in stateful.items()},
                           "rng": _gather_rng(d)}
                run.save(step, cfg, stage.modules, trainer)
            if stopping:
                interrupted = stop.stop
                break
    bar.close()
    wall = time.perf_counter() - t_start
    summary = {"steps": step, "interrupted": interrupted, "wall_s": wall, "images_per_s": seen / max(wall, 1e-9),
               "last": logs, "checkpoint": str(run.out / "latest"), "model": stage.modules["model"]}
    results = stage.evaluate() if d.main and stage.evaluate is not None else None
    if results:
        run.log({"step": step, **results})
        summary.update(results)
    return summary


# ---------------------------------------------------------------------------------------------
# stage 1: the VQGAN

def train_vqgan(cfg: VQGANTrainConfig, *, resume: bool = False, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Train the first stage: a VQGAN's generator (encoder, codebook, decoder) and its discriminator, one step
    each per batch. Returns :func:`fit`'s summary and the held-out crops (``held_out``, None for a folder)."""
    with _processes(cfg) as (d, device):
        train_set, held = _open_data(cfg)
        _seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
        model, loss_fn = build_vqgan(cfg)
        disc = loss_fn.discriminator
        channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        mf = torch.channels_last if channels_last else torch.contiguous_format
        model.to(device, memory_format=mf).train()
        loss_fn.to(device, memory_format=mf).train()
        adam = dict(betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        opt_g = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, **adam)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, **adam)

        def step(net, x, labels, s: int) -> dict:
            x = x.contiguous(memory_format=mf)
            # generator step (optimizer_idx 0); the discriminator's weights are frozen for it (as Lightning does)
            disc.requires_grad_(False)
            with _autocast(device, cfg.precision):
                xrec, qloss = net(x)
                gloss, glog = loss_fn(qloss, x, xrec, 0, s, last_layer=model.get_last_layer(), split="train")
            opt_g.zero_grad(set_to_none=True)
            gloss.backward()
            opt_g.step()
            disc.requires_grad_(True)
            # discriminator step (optimizer_idx 1): before disc_start its loss is 0 * d_loss, which leaves
            # AdamW's state at zero; skipping it saves the time and changes nothing but the step counter
            dlog = {}
            if s >= loss_fn.discriminator_iter_start:
                with _autocast(device, cfg.precision):
                    dloss, dlog = loss_fn(qloss, x, xrec.detach(), 1, s, last_layer=model.get_last_layer(),
                                          split="train")
                opt_d.zero_grad(set_to_none=True)
                dloss.backward()
                # the discriminator is called inside the loss module, outside DDP: average its gradients here
                _allreduce_mean_grads(disc.parameters(), d)
                opt_d.step()
            logs = {k.split("/", 1)[-1]: v for k, v in {**glog, **dlog}.items()}
            return {k: logs[k] for k in ("rec_loss", "quant_loss", "total_loss") if k in logs} | logs

        # a fixed batch for the periodic pictures: held-out crops when there are, else the first training items
        show = (torch.stack([held[i] for i in range(min(8, len(held)))]) if held is not None and len(held)
                else torch.stack([train_set[(i, i)] for i in range(min(8, len(train_set)))]))

        def pictures():  # the originals above their reconstructions
            with torch.no_grad():
                was = model.training
                model.eval()
                rec = model(show.to(device))[0]
                model.train(was)
            return [show, rec.cpu()], show.shape[0]

        stage = Stage("vqgan", train_set, step, modules={"model": model, "discriminator": disc},
                      optimizers={"optimizer_g": opt_g, "optimizer_d": opt_d}, pictures=pictures,
                      postfix={"rec": "rec_loss", "q": "quant_loss"})
        return {**fit(cfg, stage, d, device, resume=resume, overwrite=overwrite, progress=progress), "held_out": held}


def build_vqgan(cfg: VQGANTrainConfig):
    """The VQModel and its loss (with the discriminator) of a config: SMALL_VQGAN, VQGAN_LOSS_DEFAULTS under it."""
    from .models.losses import VQGANLoss
    from .models.vqgan import VQGANConfig, VQModel

    try:
        mcfg = VQGANConfig.from_dict({**SMALL_VQGAN, "resolution": cfg.crop_size, **cfg.model})
    except (ValueError, TypeError) as e:
        raise TrainError(f"model config: {first_line(e)}") from None
    f = mcfg.downsample_factor
    if cfg.crop_size % f:
        raise TrainError(f"crop_size {cfg.crop_size} must be a multiple of the model's downsampling factor {f}")
    model = VQModel(mcfg)
    try:
        loss = VQGANLoss(**{**VQGAN_LOSS_DEFAULTS, **cfg.loss})
    except (TypeError, ValueError) as e:
        raise TrainError(f"loss config: {first_line(e)}") from None
    return model, loss


@torch.no_grad()
def evaluate_vqgan(model, images: torch.Tensor, batch_size: int = 32, device=None) -> tuple[dict, torch.Tensor]:
    """Held-out metrics of a VQModel on (N, 3, H, W) images in [-1, 1] -> (metrics, reconstructions): PSNR and
    SSIM (on [0, 1], averaged over images), the fraction of codes used and the perplexity of their use."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    recs, idx = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        quant, _, (_, _, ind) = model.encode(x)
        recs.append(model.decode(quant).float().clamp(-1, 1).cpu())
        idx.append(ind.reshape(-1).cpu())
    model.train(was)
    rec = torch.cat(recs)
    a, b = images.float() * 0.5 + 0.5, rec * 0.5 + 0.5
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    psnr = float((10 * torch.log10(1.0 / mse)).mean())
    # over all pixels at once: flat crops (sky, walls), easy to reconstruct, weigh less than in the mean above
    psnr_pooled = float(10 * torch.log10(1.0 / mse.mean()))
    counts = torch.bincount(torch.cat(idx), minlength=model.config.n_embed).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"psnr": psnr, "psnr_pooled": psnr_pooled, "ssim": _ssim(a, b), "codebook_usage": float((counts > 0).double().mean()),
            "codes_used": int((counts > 0).sum()), "perplexity": perplexity, "images": int(images.shape[0])}, rec


def _ssim(a: torch.Tensor, b: torch.Tensor):
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    vals = [structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), channel_axis=2,
                                  data_range=1.0) for x, y in zip(a, b)]
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------
# stage 2: the GPT over the VQGAN's codes

def train_gpt(cfg: GPTTrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Train the second stage: a GPT over the codes of a frozen VQGAN (``cfg.vqgan``) of the data's crops, one
    next-token step per batch. Returns :func:`fit`'s summary, with the held-out loss (``val_loss``) when the data
    has a held-out split and the run is unconditional (else None)."""
    if not cfg.vqgan:
        raise TrainError("train-gpt needs the first stage: --vqgan DIR (a train-vqgan run or a VQModel folder)")
    with _processes(cfg) as (d, device):
        vqgan = load_model(cfg.vqgan, "vqgan", "cpu")
        train_set, held = _open_data(cfg)
        n_classes, files = None, {}
        if cfg.conditional:
            if not train_set.classes:
                raise TrainError(f"--conditional: {cfg.data} has no classes (put the images in one subfolder per "
                                 f"class)")
            n_classes = len(train_set.classes)
            train_set.with_labels = True  # (the step gets each image's label)
            files["classes.json"] = json.dumps(list(train_set.classes)) + "\n"
        _seed_everything(cfg.seed)
        model = build_gpt(cfg, vqgan, n_classes)
        model.to(device).train()
        opt = torch.optim.AdamW(_gpt_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        # a data set without augmentation (the digits) has the same codes every epoch: encode it once, and train
        # on the codes (the frozen encoder was half the cost of a step)
        coded = getattr(train_set, "fixed_items", False)
        if coded:
            train_set = _CodesOf(train_set, model, device)

        def step(net, x, labels, s: int) -> dict:
            with _autocast(device, cfg.precision):
                # the codes of x (and the class token) in, the next codes out
                logits, target = net(None, labels, codes=x) if coded else net(x, labels)
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                         target.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.transformer.parameters(), 1.0)
            opt.step()
            return {"loss": loss.detach()}

        def pictures():  # 8 samples from the same seed each time (conditional: classes 0, 1, ...)
            g = torch.Generator(device=device).manual_seed(cfg.seed)
            labels = None if n_classes is None else torch.arange(8, device=device) % n_classes
            return [model.sample(8, class_label=labels, top_k=100, generator=g).cpu()], 8

        evaluate = None
        if held is not None and len(held) and n_classes is None:
            held_images = torch.stack([held[i] for i in range(len(held))])
            evaluate = lambda: {"val_loss": evaluate_gpt(model, held_images)}  # noqa: E731

        stage = Stage("gpt", train_set, step, modules={"model": model}, optimizers={"optimizer": opt},
                      pictures=pictures, evaluate=evaluate, postfix={"loss": "loss"}, files=files)
        return {"val_loss": None, **fit(cfg, stage, d, device, resume=resume, overwrite=overwrite, progress=progress)}


class _CodesOf(torch.utils.data.Dataset):
    """The items of a data set without randomness (``fixed_items``), as the frozen first stage's codes (L,) int64
    (with their labels when the data set gives them), computed once."""

    def __init__(self, dataset, model, device, batch_size: int = 256):
        self.with_labels, self.classes = dataset.with_labels, dataset.classes
        self.labels = [dataset.label(i) for i in range(len(dataset))] if dataset.with_labels else None
        images = [dataset.get(i, 0) for i in range(len(dataset))]
        with torch.no_grad():
            self.codes = torch.cat([model.encode_to_z(torch.stack(images[i:i + batch_size]).to(device)).cpu()
                                    for i in range(0, len(images), batch_size)])

    def __len__(self):
        return self.codes.shape[0]

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return (self.codes[index], self.labels[index]) if self.with_labels else self.codes[index]


def build_gpt(cfg: GPTTrainConfig, vqgan, n_classes: int | None):
    """A VQGANTransformer over the frozen ``vqgan`` (its config and weights), codes of crop_size crops."""
    from .models.gpt import GPTConfig
    from .models.two_stage import VQGANTransformer, VQGANTransformerConfig

    f = vqgan.config.downsample_factor
    if cfg.crop_size % f:
        raise TrainError(f"crop_size {cfg.crop_size} must be a multiple of the VQGAN's downsampling factor {f}")
    h = cfg.crop_size // f
    model_section = dict(cfg.model)
    arch = cfg.arch if cfg.arch is not None else model_section.get("arch", "mingpt")
    if arch not in ("mingpt", "llama"):
        raise TrainError(f"arch must be 'mingpt' or 'llama', got {arch!r}")
    if cfg.arch is not None and model_section.get("arch", arch) != arch:
        raise TrainError(f"--arch {cfg.arch} disagrees with the model section's arch {model_section['arch']!r}")
    model_section["arch"] = arch
    if arch == "llama":
        # LlamaGen's c2i: the class is the GPT's own first token, dropped to the null class with probability
        # class_dropout_prob while training (ClassEmbedding), which gives classifier-free guidance its
        # unconditional model
        if n_classes is None:
            raise TrainError("--arch llama is class-conditional (LlamaGen's c2i): give --conditional and labelled "
                             "data (a folder of class subfolders, embedded or digits)")
        p = cfg.class_dropout if cfg.class_dropout is not None else model_section.get("class_dropout_prob", 0.1)
        if not 0 <= p < 1:
            raise TrainError(f"class_dropout must be in [0, 1), got {p}")
        model_section.update(num_classes=n_classes, class_dropout_prob=p)
        if cfg.cfg_scale is not None:
            model_section["cfg_scale"] = cfg.cfg_scale
    else:
        if cfg.class_dropout is not None or cfg.cfg_scale is not None:
            raise TrainError("class_dropout and cfg_scale (classifier-free guidance) are for --arch llama")
        if n_classes is not None and n_classes > vqgan.config.n_embed:
            raise TrainError(f"{n_classes} classes: a class token shares the vocabulary with the "
                             f"{vqgan.config.n_embed} codes (as taming's), so there can be at most "
                             f"{vqgan.config.n_embed} classes")
    try:
        gcfg = GPTConfig.from_dict({**SMALL_GPT, **model_section, "vocab_size": vqgan.config.n_embed,
                                    "block_size": h * h})
        tcfg = VQGANTransformerConfig(gpt=gcfg, vqgan=vqgan.config, n_classes=n_classes, pkeep=cfg.pkeep,
                                      latent_size=(h, h))
    except (TypeError, ValueError) as e:
        raise TrainError(f"model config: {first_line(e)}") from None
    model = VQGANTransformer(tcfg)
    model.first_stage_model.load_state_dict(vqgan.state_dict())
    return model


@torch.no_grad()
def evaluate_gpt(model, images: torch.Tensor, batch_size: int = 32, labels=None) -> float:
    """Mean cross-entropy (nats per code) of the model on (N, 3, H, W) images (labels (N,) if conditional)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        c = None if labels is None else labels[i:i + batch_size].to(device)
        loss = model.training_loss(x, c)
        total += float(loss) * x.shape[0]
        n += x.shape[0]
    model.train(was)
    return total / max(n, 1)


def _gpt_param_groups(model, weight_decay: float):
    """Weight decay on matrices only (nanoGPT's rule): not on biases, norms, embeddings' positions."""
    decay, no_decay = [], []
    for p in model.transformer.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# what the loop uses: processes and devices, random streams, the schedule, the data, Ctrl-C

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def _processes(cfg: TrainConfig):
    """The run's device and process group (torchrun's, or one process); a group this opened is closed after."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    if dist.is_available() and dist.is_initialized():  # initialised by the caller (tests, notebooks)
        d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)
    else:
        d = None
    if d is not None and device.type == "cuda":  # one GPU a process: torchrun's LOCAL_RANK
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    d = d or _Dist()
    try:
        yield d, device
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         f"use --precision fp32")
    if device.type == "cpu" and not _cpu_bf16_autocast_ok():
        raise TrainError("--precision bf16: this torch build has no bfloat16 autocast on the CPU; use --precision fp32")


def _cpu_bf16_autocast_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _open_data(cfg: TrainConfig):
    """(training set, held-out set or None) of the config's data, as vqkernels.data opens it."""
    try:
        return open_dataset(cfg.data, cfg.crop_size, cfg.resize,
                            color_augment=bool(getattr(cfg, "color_augment", False)),  # (a VQGAN's only)
                            tint_grey=bool(getattr(cfg, "tint_grey", False)))
    except DataError as e:
        raise TrainError(str(e)) from None


def _loader(dataset, cfg: TrainConfig, start_step: int, d: _Dist, device: torch.device):
    from torch.utils.data import DataLoader

    sampler = SeededBatches(dataset, cfg.batch_size, cfg.seed, start_step=start_step, rank=d.rank, world=d.world,
                            steps=cfg.steps)
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    # its own generator: creating the iterator would otherwise draw from the global RNG, which a resumed run
    # does at another step than an uninterrupted one (the batches themselves never use it: see data.py)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng(d: _Dist) -> list:
    """Every rank's random streams (a collective: every rank calls it), for trainer.pt."""
    state = _rng_state()
    if d.world == 1:
        return [state]
    states = [None] * d.world
    dist.all_gather_object(states, state)
    return states


def _start_rngs_and_wrap(model, state, cfg, d, device):
    """The random streams from here on (a resumed run's, restored per rank; else seeded per rank), and the model as
    the loop calls it: under DDP when there are several processes, compiled under --compile."""
    if state is not None:
        rngs = state["rng"]
        _set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
    else:
        # each rank draws its own random numbers (dropout, restarts); rank 0's stream is a single process's, so
        # one process and rank 0 of several make the same draws
        torch.manual_seed(cfg.seed + d.rank)
    net = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _allreduce_mean_grads(params, d: _Dist) -> None:
    """Average gradients across ranks for a module outside DDP (the discriminator: see train_vqgan)."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(d.world)


def _agree(flag: bool, d: _Dist, device=None) -> bool:
    """Every rank stops at the same step when any rank wants to (SIGINT reaches them at different times)."""
    if d.world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _Clock:
    """Training time so far; with a time budget (``minutes``) the cosine schedule follows whichever of the
    steps or the time runs out first (a budgeted run is not reproducible step for step anyway)."""

    def __init__(self, cfg):
        self.budget = cfg.minutes * 60 if cfg.minutes else None
        self.start = time.perf_counter()

    def fraction(self) -> float:
        return 0.0 if self.budget is None else (time.perf_counter() - self.start) / self.budget

    def out_of_time(self) -> bool:
        return self.budget is not None and time.perf_counter() - self.start >= self.budget


def _lr_lambda(cfg, clock: _Clock | None = None):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            if clock is not None:
                t = max(t, clock.fraction())
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0
    return f


def _scalar(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


def _progress_bar(cfg, start: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # a time-budgeted run ends when its time is up: no step total (and no misleading ETA) then
    total = cfg.steps if cfg.minutes is None else None
    return tqdm(total=total, initial=start, disable=not enabled, desc=desc, dynamic_ncols=True, unit="step",
                smoothing=0.1)


class _StopFlag:
    """SIGINT sets a flag (the loop saves and stops after the current step); a second SIGINT raises."""

    def __init__(self):
        self.stop = False
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
