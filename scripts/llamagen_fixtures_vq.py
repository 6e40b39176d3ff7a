"""Make tests/fixtures/llamagen_vq.safetensors: what LlamaGen's image tokenizer does, recorded as facts.

    python scripts/llamagen_fixtures_vq.py /path/to/LlamaGen [--out tests/fixtures/llamagen_vq.safetensors]

LlamaGen (FoundationVision/LlamaGen) is not a package, so the tests cannot import it: this script imports its
``tokenizer/tokenizer_image/vq_model.py`` from the given checkout at run time and records, on fixed seeds:

- the state_dict keys and shapes of its named tokenizers ('VQ-16', 'VQ-8') and of each small case;
- for each case, random weights drawn by :func:`seeded_weights` (uniform draws: bit-exact on every CPU, so the
  tests draw the same weights instead of reading megabytes from the fixture; a float64 sum per tensor is recorded
  to prove it), an input, and LlamaGen's outputs in float32 and in float64: code indices, the distance gap
  between the best and second-best code (near-ties are told apart from errors), ``decode_code`` of its float32
  indices, ``forward``; for training cases its loss terms, ``codebook_used`` window and loss gradients.

The tests (tests/test_models_llamagen_vq.py) import :func:`seeded_weights` and :data:`CASES` from this file, which
therefore imports nothing from LlamaGen at module level.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch

SEED = 24
# the small cases: LlamaGen ModelArgs (every field set somewhere), the input shape, whether training is recorded
CASES = {
    "l2": dict(args=dict(codebook_size=512, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                         commit_loss_beta=0.25, entropy_loss_ratio=0.1, encoder_ch_mult=[1, 2],
                         decoder_ch_mult=[1, 2], z_channels=64, dropout_p=0.0),
               x=(2, 3, 16, 16), train=True),
    "plain": dict(args=dict(codebook_size=256, codebook_embed_dim=4, codebook_l2_norm=False, codebook_show_usage=False,
                            commit_loss_beta=0.5, entropy_loss_ratio=0.05, encoder_ch_mult=[1, 2, 2],
                            decoder_ch_mult=[2, 1, 2], z_channels=32, dropout_p=0.0),
                  x=(2, 3, 16, 16), train=True),
    # dropout changes nothing in eval mode: recorded in eval only (its masks are not the same draws on every CPU)
    "dropout": dict(args=dict(codebook_size=128, codebook_embed_dim=16, codebook_l2_norm=True,
                              codebook_show_usage=True, encoder_ch_mult=[2, 1], decoder_ch_mult=[2, 1],
                              z_channels=128, dropout_p=0.3),
                    x=(1, 3, 8, 8), train=False),
    "VQ-8": dict(args=None, x=(1, 3, 16, 16), train=False),
    "VQ-16": dict(args=None, x=(1, 3, 32, 32), train=False),
}


def case_seed(case: str) -> int:
    return SEED + 1000 * list(CASES).index(case)


def seeded_weights(shapes: dict, seed: int, n_codes: int) -> dict:
    """Random weights for a tokenizer with these {key: shape}, float64, the same on every machine.

    Keys are visited sorted, each tensor drawn uniformly from one generator (``torch.rand`` maps random bits to
    floats exactly), then scaled: convolutions to variance 1/fan_in, biases 0.1, GroupNorm around (1, 0), the
    codebook in [-1, 1], ``codebook_used`` to code indices.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        u = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0 - 1.0
        if name.endswith("codebook_used"):
            w = torch.floor((u + 1.0) * 0.5 * n_codes).clamp_(max=n_codes - 1)
        elif name.endswith("embedding.weight"):
            w = u
        elif ".norm" in name:  # GroupNorm (norm1, norm2, norm, norm_out)
            w = (1.0 + 0.2 * u) if name.endswith(".weight") else 0.2 * u
        elif name.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            w = u * math.sqrt(3.0 / fan_in)
        else:
            w = 0.1 * u
        out[name] = w
    return out


def case_input(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2.0 - 1.0).float()


def _llamagen_distances(model, h: torch.Tensor) -> torch.Tensor:
    """LlamaGen's own d (its VectorQuantizer.forward formula) for the quant_conv output h (B, D, h, w)."""
    q = model.quantize
    z = torch.einsum("b c h w -> b h w c", h).reshape(-1, q.e_dim)
    e = q.embedding.weight
    if q.l2_norm:
        z, e = torch.nn.functional.normalize(z, p=2, dim=-1), torch.nn.functional.normalize(e, p=2, dim=-1)
    return torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * torch.einsum("bd,dn->bn", z, e.T)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("llamagen", help="path of a LlamaGen checkout (FoundationVision/LlamaGen)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                 "llamagen_vq.safetensors"))
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.llamagen))
    from tokenizer.tokenizer_image.vq_model import ModelArgs, VQ_models, VQModel  # noqa: E402  (LlamaGen's)
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    tensors, meta = {}, {}
    try:
        commit = subprocess.run(["git", "-C", a.llamagen, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta.update(script="scripts/llamagen_fixtures_vq.py", llamagen_commit=commit, torch=torch.__version__,
                seed=str(SEED), cases=json.dumps({k: {**v, "x": list(v["x"])} for k, v in CASES.items()}))

    def build(case):
        args = CASES[case]["args"]
        return VQ_models[case]() if args is None else VQModel(ModelArgs(**args))

    for case in CASES:
        spec = CASES[case]
        with torch.device("meta"):
            shapes = {k: list(v.shape) for k, v in build(case).state_dict().items()}
        meta[f"keys.{case}"] = json.dumps(list(shapes.items()))
        seed = case_seed(case)
        model32 = build(case).eval()
        n_codes = model32.quantize.n_e
        w = seeded_weights(shapes, seed, n_codes)
        tensors[f"{case}.weight_sums"] = torch.stack([w[k].sum() for k in sorted(w)])
        model32.load_state_dict({k: v.float() for k, v in w.items()})
        model64 = build(case).double().eval()
        model64.load_state_dict(w)
        del w
        x = case_input(spec["x"], seed)
        tensors[f"{case}.x"] = x
        with torch.no_grad():
            for name, model, xx in (("32", model32, x), ("64", model64, x.double())):
                h = model.quant_conv(model.encoder(xx))
                _, _, (_, _, idx) = model.quantize(h)
                grid = (xx.shape[0], h.shape[2], h.shape[3])
                tensors[f"{case}.idx{name}"] = idx.reshape(grid)
                if name == "64":
                    d = _llamagen_distances(model, h)
                    two = d.topk(2, dim=1, largest=False).values
                    tensors[f"{case}.gap64"] = (two[:, 1] - two[:, 0]).reshape(grid)
                tensors[f"{case}.fwd{name}"] = model(xx)[0]
            idx32 = tensors[f"{case}.idx32"]
            shape = [idx32.shape[0], model32.config.codebook_embed_dim, idx32.shape[1], idx32.shape[2]]
            tensors[f"{case}.rec32"] = model32.decode_code(idx32.reshape(-1), shape)
            tensors[f"{case}.rec64"] = model64.decode_code(idx32.reshape(-1), shape)
        if spec["train"]:
            for name, model, xx in (("32", model32, x), ("64", model64, x.double())):
                model.train()
                if model.quantize.show_usage:
                    # LlamaGen registers the window as a Parameter (requires grad); on a GPU, .to(device) makes it a
                    # non-leaf its in-place update may write, on the CPU it stays a leaf that refuses: a plain copy
                    model.quantize.codebook_used = model.quantize.codebook_used.detach().clone()
                _, loss, _ = model.encode(xx)
                vq, commit_l, entropy, usage = loss
                total = vq + commit_l + entropy
                total.backward()
                tensors[f"{case}.train_loss{name}"] = torch.stack([vq, commit_l, entropy]).detach()
                tensors[f"{case}.grad_codebook{name}"] = model.quantize.embedding.weight.grad
                tensors[f"{case}.grad_quant_conv{name}"] = model.quant_conv.weight.grad
                if model.quantize.show_usage:
                    # the window shifted by this batch's codes, appended at its end: only that end is new
                    n = x.shape[0] * tensors[f"{case}.idx32"][0].numel()
                    tensors[f"{case}.codebook_used_tail{name}"] = model.quantize.codebook_used[-n:].detach().long()
                    tensors[f"{case}.usage{name}"] = torch.tensor(float(usage), dtype=torch.float64)
        gap = tensors[f"{case}.gap64"]
        print(f"{case}: {len(shapes)} keys, {sum(math.prod(s) for s in shapes.values()):,} parameters, codes "
              f"{tuple(tensors[f'{case}.idx32'].shape)}, f32/f64 indices differ at "
              f"{int((tensors[f'{case}.idx32'] != tensors[f'{case}.idx64']).sum())}, smallest gap {float(gap.min()):.3g}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file(tensors, a.out, metadata=meta)
    print(f"wrote {a.out}: {os.path.getsize(a.out):,} bytes, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
