"""``vqkernels demo``: both stages on scikit-image's photographs within a time budget, then the pictures, the loss
curves and the metrics.

    OUT/vqgan/, OUT/gpt/        the two training runs (vqkernels.runs folders: checkpoints, logs, grids)
    OUT/reconstructions.png     held-out crops beside their reconstructions
    OUT/samples.png             16 samples of the GPT
    OUT/loss_curves.png         both stages' training losses (and the GPT's held-out loss)
    OUT/digits-vqgan/, OUT/digits-gpt/   the digits part: a VQGAN and a class-conditional LLaMA GPT (class dropout)
    OUT/digits_samples.png      samples with classifier-free guidance, a row per digit
    OUT/metrics.json            held-out PSNR / SSIM / codebook use, the GPT's loss and sampling speed, timings; the
                                digits' held-out PSNR and how often an SVC recognises the asked digit (cfg 1 and S)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ._io import atomic_path, sweep_temporaries
from .data import EMBEDDED_HELD_OUT, save_grid
from .runs import (GPTTrainConfig, TrainError, VQGANTrainConfig, check_writable, config_from_dict, resolve_device,
                   write_text)
from .train import SMALL_VQGAN, evaluate_vqgan, train_gpt, train_vqgan

__all__ = ["run_demo", "run_digits", "digits_figures"]

# What fits ~10 minutes of a 2-core CPU (see the README for a run's numbers): 32x32 crops, f=4 (8x8 codes),
# no perceptual or adversarial term (they cost more CPU time than they give PSNR here; train-vqgan has them).
# GroupNorm in 8 groups, not taming's 32: at width 32 that is one channel a group, which normalises away each
# channel's mean over a tile, and the model then guesses colours from textures instead of coding them (3,000
# steps, same seed: 26.95 -> 28.93 dB held out, chelsea unseen 24.8 -> 30.3 dB). 2048 codes, not 512: +0.4 dB
# held out and on every unseen photograph for the same time (dead-code restarts below 0.1 of an EMA hit).
# Grey training crops tinted (tint_grey): half the training photographs are grey and the colour ones have almost
# no green, and the model turned flower's teal leaves blue; with grey crops in random colours (4 seeds of 3,000
# steps each way): flower 22.2 -> 25.2 dB (23+ in 3 of 4 seeds), held out 27.8 -> 28.3, coffee 24.0 -> 24.9,
# grace_hopper 23.0 -> 24.3, at a cost to the grey camera (27.6 -> 26.4: faint tints). Recolouring the colour
# photographs instead (color_augment, hue on every crop) lost their colours at this budget (coffee 13.7 dB).
DEMO_CROP = 32
DEMO_VQGAN = dict(batch_size=8, lr=1e-3, schedule="cosine", warmup_steps=50, log_every=10, image_every=500,
                  checkpoint_every=1000, tint_grey=True,
                  model=dict(SMALL_VQGAN, ch=32, ch_mult=(1, 1, 2), resolution=DEMO_CROP,
                             n_embed=2048, threshold_ema_dead_code=0.1, norm_groups=8),
                  loss=dict(perceptual_weight=0.0, disc_start=10 ** 9, disc_ndf=16, disc_num_layers=2))
DEMO_GPT = dict(batch_size=32, lr=1e-3, warmup_steps=50, schedule="cosine", log_every=10, image_every=500,
                checkpoint_every=1000, model=dict(n_layer=4, n_head=4, n_embd=192))
DEMO_SPLIT = (0.72, 0.2)  # of the time budget: VQGAN, GPT; the rest is evaluation and sampling

# The digits part (class-conditional generation judged by a classifier): scikit-learn's 8x8 digits enlarged to
# 16x16, a VQGAN with f=4 (a 4x4 grid of codes from 64 codes) and a small LLaMA-style GPT trained with
# LlamaGen's class dropout, sampled with classifier-free guidance at DIGITS_CFG_SCALE (stored in the checkpoint
# as the default of `vqkernels sample`). Sizes from a prototype on this 2-core machine (see the README).
DIGITS_SIZE = 16
DIGITS_VQGAN = dict(batch_size=16, lr=1e-3, schedule="cosine", warmup_steps=20, log_every=10, image_every=500,
                    checkpoint_every=1000,
                    model=dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                               resolution=DIGITS_SIZE, n_embed=64, embed_dim=16, decay=0.99,
                               threshold_ema_dead_code=1.0),
                    loss=dict(perceptual_weight=0.0, disc_start=10 ** 9, disc_ndf=16, disc_num_layers=2))
DIGITS_CFG_SCALE = 2.0
DIGITS_GPT = dict(batch_size=64, lr=1e-3, warmup_steps=50, schedule="cosine", log_every=10, image_every=500,
                  checkpoint_every=1000, conditional=True, arch="llama", class_dropout=0.1, cfg_scale=DIGITS_CFG_SCALE,
                  model=dict(n_layer=4, n_head=4, n_embd=128, multiple_of=32))
DIGITS_SPLIT = (0.3, 0.65)   # of the digits' budget: VQGAN, GPT; the rest is sampling and the classifier
DIGITS_PER_CLASS = 20        # samples per class the classifier judges


def run_demo(out="vqkernels-demo", minutes: float = 10.0, device="auto", seed: int = 0, overwrite: bool = False,
             progress: bool = True, echo=print, digits_minutes: float = 4.0) -> int:
    """Train both stages on the embedded photographs within ``minutes``, then the digits part
    (:func:`run_digits`) within ``digits_minutes`` (0: none); write the pictures, loss curves, metrics.json and the
    checkpoints into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    if not overwrite and any((out / n).exists() for n in ("vqgan", "gpt", "digits-vqgan", "digits-gpt",
                                                          "metrics.json")):
        raise TrainError(f"--out {out} already holds a demo; pass --overwrite to replace it")
    if minutes <= 0:
        raise TrainError(f"--minutes must be positive, got {minutes}")
    if digits_minutes < 0:
        raise TrainError(f"--digits-minutes must be >= 0, got {digits_minutes}")
    check_writable(out)
    _warn_if_loaded(echo)
    sweep_temporaries(out)  # (a killed demo's half-written pictures)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    # each stage trains for its share of the budget, its cosine schedule following the time (see train._Clock)
    vq_min, gpt_min = minutes * DEMO_SPLIT[0], minutes * DEMO_SPLIT[1]
    vcfg = config_from_dict(VQGANTrainConfig, dict(DEMO_VQGAN, data="embedded", out=str(out / "vqgan"), seed=seed,
                                                   device=str(dev), crop_size=DEMO_CROP, minutes=vq_min,
                                                   steps=_demo_steps(vq_min)), "demo")
    echo(f"stage 1/2: VQGAN on scikit-image's photographs ({vq_min:.1f} min)")
    s1 = train_vqgan(vcfg, overwrite=True, progress=progress)
    t1 = time.perf_counter()
    model, held = s1["model"], s1["held_out"]
    held_x = torch.stack([held[i] for i in range(len(held))])
    vmetrics, rec = evaluate_vqgan(model, held_x)
    pick = torch.linspace(0, len(held) - 1, 16).round().long()
    pairs = torch.stack([t for i in pick for t in (held_x[i], rec[i])])
    save_grid(out / "reconstructions.png", [_upscale(pairs)], nrow=8)
    t2 = time.perf_counter()
    echo(f"held-out: PSNR {vmetrics['psnr']:.2f} dB, SSIM {vmetrics['ssim']:.3f}, "
         f"{vmetrics['codes_used']}/{model.config.n_embed} codes used")

    gpt_min = max(0.2, min(gpt_min, minutes - (t2 - t0) / 60 - 0.5))
    gcfg = config_from_dict(GPTTrainConfig, dict(DEMO_GPT, vqgan=str(out / "vqgan"), data="embedded",
                                                 out=str(out / "gpt"), seed=seed, device=str(dev),
                                                 crop_size=DEMO_CROP, minutes=gpt_min, steps=_demo_steps(gpt_min)),
                            "demo")
    echo(f"stage 2/2: GPT over the VQGAN's codes ({gpt_min:.1f} min)")
    s2 = train_gpt(gcfg, overwrite=True, progress=progress)
    t3 = time.perf_counter()
    two = s2["model"].eval()
    g = torch.Generator(device=dev).manual_seed(seed)
    two.sample(2, top_k=100, generator=torch.Generator(device=dev).manual_seed(seed + 1))  # warm-up
    samples = two.sample(16, top_k=100, generator=g).float().clamp(-1, 1).cpu()
    stats = two.transformer.last_generate_stats
    save_grid(out / "samples.png", [_upscale(samples)], nrow=8)
    _plot_losses(out / "vqgan" / "log.jsonl", out / "gpt" / "log.jsonl", out / "loss_curves.png")
    t4 = time.perf_counter()
    metrics = {
        "held_out": {"psnr_db": round(vmetrics["psnr"], 3), "psnr_db_all_pixels": round(vmetrics["psnr_pooled"], 3),
                     "ssim": None if vmetrics["ssim"] is None else round(vmetrics["ssim"], 4),
                     "codebook_usage": round(vmetrics["codebook_usage"], 4), "codes_used": vmetrics["codes_used"],
                     "codebook_size": model.config.n_embed, "perplexity": round(vmetrics["perplexity"], 2),
                     "crops": vmetrics["images"], "images": list(EMBEDDED_HELD_OUT)},
        "gpt": {"val_loss": None if s2["val_loss"] is None else round(s2["val_loss"], 4),
                "sampling_tokens_per_s": round(stats.tokens_per_s, 1), "sampled_images": 16,
                "tokens_per_image": int(two.config.latent_size[0] * two.config.latent_size[1])},
        "training": {"vqgan_steps": s1["steps"], "vqgan_images_per_s": round(s1["images_per_s"], 1),
                     "gpt_steps": s2["steps"], "gpt_images_per_s": round(s2["images_per_s"], 1),
                     "crop_size": DEMO_CROP, "batch_size": [vcfg.batch_size, gcfg.batch_size]},
        "wall_s": {"vqgan_train": round(t1 - t0, 1), "vqgan_eval": round(t2 - t1, 1), "gpt_train": round(t3 - t2, 1),
                   "sampling_and_plots": round(t4 - t3, 1), "total": round(t4 - t0, 1)},
        "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if digits_minutes > 0:
        metrics["digits"] = run_digits(out, digits_minutes, dev, seed, progress, echo)
        metrics["wall_s"]["digits"] = metrics["digits"]["wall_s"]["total"]
        metrics["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    digits = ", digits_samples.png" if digits_minutes > 0 else ""
    digit_runs = f", {out}/digits-vqgan, {out}/digits-gpt" if digits_minutes > 0 else ""
    echo(f"wrote {out}/reconstructions.png, samples.png, loss_curves.png{digits}, metrics.json; checkpoints "
         f"{out}/vqgan, {out}/gpt{digit_runs} ({metrics['wall_s']['total']:.0f} s in all)")
    echo(json.dumps(metrics["held_out"]))
    return 0


def _warn_if_loaded(echo=print) -> None:
    """The demo trains for a fixed time: on a machine whose CPUs are busy with other work it does a fraction of
    the steps (a run that shared 2 cores with a test suite did 481 VQGAN steps instead of 3,265, and its
    reconstructions were grey). Say so before the time is spent."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # (no load average on Windows)
        return
    cpus = os.cpu_count() or 1
    if load > 1.5 * cpus:
        echo(f"warning: this machine is busy (load average {load:.1f} on {cpus} CPUs): the demo trains for a fixed "
             f"time, so it will do a fraction of its steps and learn much less; run it on a quiet machine "
             f"(or give it more --minutes)")


def _demo_steps(minutes: float) -> int:
    """An upper bound on the steps of a stage: the time budget stops it, and its cosine schedule follows
    the time, so this only needs to be more than any machine does in that time."""
    return max(100, int(200 * minutes * 60))


def _upscale(x: torch.Tensor, min_side: int = 96) -> torch.Tensor:
    """Nearest-neighbour enlargement of small crops, so that a grid is visible at a glance."""
    k = max(1, -(-min_side // x.shape[-1]))
    return x.repeat_interleave(k, dim=-1).repeat_interleave(k, dim=-2) if k > 1 else x


def _plot_losses(vq_log: Path, gpt_log: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(p):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if "val_loss" not in r], [r for r in rows if "val_loss" in r]

    (vq, _), (gp, gval) = read(vq_log), read(gpt_log)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot([r["step"] for r in vq], [r["rec_loss"] for r in vq], label="reconstruction (L1)")
    ax[0].plot([r["step"] for r in vq], [r["quant_loss"] for r in vq], label="commitment")
    ax[0].set_yscale("log")
    ax[0].set_title("VQGAN")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[1].plot([r["step"] for r in gp], [r["loss"] for r in gp], label="train")
    if gval:
        ax[1].scatter([r["step"] for r in gval], [r["val_loss"] for r in gval], color="C3", label="held-out", zorder=3)
    ax[1].set_title("GPT over the codes")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("cross-entropy (nats/code)")
    ax[1].legend()
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:  # (savefig picks the format from the extension)
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def run_digits(out: Path, minutes: float, dev: torch.device, seed: int = 0, progress: bool = True,
               echo=print) -> dict:
    """The demo's second part: a VQGAN and a class-conditional LLaMA GPT (class dropout) on scikit-learn's digits
    within ``minutes``, into ``out/digits-vqgan`` and ``out/digits-gpt``; then DIGITS_PER_CLASS samples per digit
    without guidance (cfg_scale 1) and with DIGITS_CFG_SCALE, judged by an SVC trained on the training digits.
    Writes ``out/digits_samples.png`` (a row per digit) and returns the figures for metrics.json."""
    from .digits import DigitClassifier, digits_split

    t0 = time.perf_counter()
    vq_min, gpt_min = minutes * DIGITS_SPLIT[0], minutes * DIGITS_SPLIT[1]
    vcfg = config_from_dict(VQGANTrainConfig, dict(DIGITS_VQGAN, data="digits", out=str(out / "digits-vqgan"),
                                                   seed=seed, device=str(dev), crop_size=DIGITS_SIZE, minutes=vq_min,
                                                   steps=_demo_steps(vq_min)), "demo")
    echo(f"digits 1/2: VQGAN on scikit-learn's handwritten digits ({vq_min:.1f} min)")
    s1 = train_vqgan(vcfg, overwrite=True, progress=progress)
    split = digits_split(DIGITS_SIZE)
    vmetrics, rec = evaluate_vqgan(s1["model"], split.held_out.images)
    t1 = time.perf_counter()
    echo(f"digits held-out: PSNR {vmetrics['psnr']:.2f} dB, {vmetrics['codes_used']}/"
         f"{s1['model'].config.n_embed} codes used")

    gpt_min = max(0.2, min(gpt_min, minutes - (t1 - t0) / 60 - 0.3))
    gcfg = config_from_dict(GPTTrainConfig, dict(DIGITS_GPT, vqgan=str(out / "digits-vqgan"), data="digits",
                                                 out=str(out / "digits-gpt"), seed=seed, device=str(dev),
                                                 crop_size=DIGITS_SIZE, minutes=gpt_min,
                                                 steps=_demo_steps(gpt_min)), "demo")
    echo(f"digits 2/2: LLaMA GPT over the digits' codes, class dropout {gcfg.class_dropout} ({gpt_min:.1f} min)")
    s2 = train_gpt(gcfg, overwrite=True, progress=progress)
    t2 = time.perf_counter()
    classifier = DigitClassifier(DIGITS_SIZE)
    figures = digits_figures(s2["model"].eval(), classifier, dev, seed, DIGITS_CFG_SCALE, DIGITS_PER_CLASS)
    # the ceiling of the samples' figure from the tokenizer's side: the classifier on the held-out digits' codes
    figures["classifier_on_reconstructions"] = round(classifier.accuracy(rec, split.held_out.labels), 4)
    grid = figures.pop("grid")
    save_grid(out / "digits_samples.png", [_upscale(grid, 48)], nrow=grid.shape[0] // 10)
    t3 = time.perf_counter()
    echo(f"digits: the classifier recognises {figures['agreement_guided']:.1%} of the samples as the digit asked "
         f"for with guidance (cfg_scale {DIGITS_CFG_SCALE:g}), {figures['agreement_unguided']:.1%} without; "
         f"its own held-out accuracy {figures['classifier_held_out_accuracy']:.1%} "
         f"({figures['classifier_on_reconstructions']:.1%} on their reconstructions through the VQGAN)")
    return {
        "held_out_psnr_db": round(vmetrics["psnr"], 3), "held_out_digits": vmetrics["images"],
        "codes_used": vmetrics["codes_used"], "codebook_size": s1["model"].config.n_embed,
        **figures,
        "training": {"vqgan_steps": s1["steps"], "gpt_steps": s2["steps"], "image_size": DIGITS_SIZE,
                     "class_dropout": gcfg.class_dropout},
        "wall_s": {"vqgan_train_and_eval": round(t1 - t0, 1), "gpt_train": round(t2 - t1, 1),
                   "sampling_and_classifier": round(t3 - t2, 1), "total": round(t3 - t0, 1)},
    }


@torch.no_grad()
def digits_figures(two, classifier, dev, seed: int, cfg_scale: float, per_class: int) -> dict:
    """``per_class`` samples of every digit from the class-conditional ``two`` (a VQGANTransformer with a llama
    GPT), without guidance and with ``cfg_scale``, judged by ``classifier`` (a digits.DigitClassifier): the
    agreement of each, per class and the distinct samples per class for the guided ones, the classifier's own
    held-out accuracy, and ``grid``: the guided samples, a row per digit (at most 10 a row)."""
    from .digits import class_agreement

    labels = torch.arange(10, device=dev).repeat_interleave(per_class)
    res = {}
    for name, scale in (("unguided", 1.0), ("guided", cfg_scale)):
        g = torch.Generator(device=dev).manual_seed(seed + 7)
        imgs = two.sample(labels.numel(), class_label=labels, top_k=None, generator=g,
                          cfg_scale=scale).float().clamp(-1, 1).cpu()
        res[name] = (class_agreement(classifier, imgs, labels.cpu()), imgs)
    guided, imgs = res["guided"]
    per_row = min(per_class, 10)
    grid = torch.cat([imgs[k * per_class:k * per_class + per_row] for k in range(10)])
    return {"classifier_held_out_accuracy": round(classifier.held_out_accuracy, 4), "cfg_scale": cfg_scale,
            "samples_per_class": per_class, "agreement_unguided": res["unguided"][0]["agreement"],
            "agreement_guided": guided["agreement"], "agreement_guided_per_class": guided["per_class"],
            "distinct_samples_per_class": guided["distinct_per_class"], "grid": grid}
