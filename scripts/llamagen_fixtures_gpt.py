"""Make tests/fixtures/llamagen_gpt.safetensors: what LlamaGen's class-conditional GPT does, recorded as facts.

    python scripts/llamagen_fixtures_gpt.py /path/to/LlamaGen [--out tests/fixtures/llamagen_gpt.safetensors]

LlamaGen (FoundationVision/LlamaGen) is not a package, so the tests cannot import it: this script imports its
``autoregressive/models/gpt.py`` and ``generate.py`` from the given checkout at run time (nothing of it is copied)
and records, on fixed seeds:

- the state_dict keys and shapes of its named class-conditional models ('GPT-B' ... 'GPT-XXXL', ModelArgs
  defaults otherwise; built on the meta device), as JSON in the file's metadata;
- for each small case of :data:`CASES` (every ModelArgs field that changes the function set somewhere): the sum
  of each tensor of its initialisation after ``torch.manual_seed(case seed)`` (ours must draw the same); random
  weights drawn by :func:`seeded_weights` (uniform draws, bit-exact on every CPU, so the tests draw the same
  weights instead of reading them from the fixture; a float64 sum per tensor is recorded to prove it), class
  labels and tokens, the float32 logits of ``Transformer.forward(idx, cond_idx)`` in eval mode (which needs the
  whole ``cls_token_num + block_size`` positions), and the tokens of ``generate(model, cond, n, cfg_scale=...,
  cfg_interval=..., top_k=1)`` with the smallest gap between the best and second-best (CFG-mixed) logit over
  its steps (a test of token equality means something only when that gap is far above float32 error).

The tests (tests/test_models_llama.py) import :func:`seeded_weights`, :data:`CASES` and :func:`case_seed` from
this file, which therefore imports nothing from LlamaGen at module level.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch

SEED = 1024
NAMED = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL")
# The small cases: LlamaGen ModelArgs; `batch` labels; generate runs as (cfg_scale, cfg_interval, new tokens)
# (none for grouped heads: LlamaGen's KVCache is built with n_head heads, so its generate fails for
# n_kv_head < n_head; its naive forward is fine); rope1d swaps LlamaGen's 2-D table for its own 1-D one
# (precompute_freqs_cis, which its Transformer does not use by itself).
CASES = {
    "base": dict(args=dict(dim=32, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10,
                           class_dropout_prob=0.1, multiple_of=32, attn_dropout_p=0.1, drop_path_rate=0.1),
                 batch=3, runs=[(4.0, -1, 16), (4.0, 3, 16), (1.0, -1, 16), (1.5, -1, 7)]),
    "gqa": dict(args=dict(dim=48, n_layer=2, n_head=6, n_kv_head=2, vocab_size=80, block_size=36, num_classes=7,
                          class_dropout_prob=0.25, multiple_of=16, ffn_dim_multiplier=1.3, rope_base=100.0,
                          norm_eps=1e-6),
                batch=2, runs=[]),
    "cls3": dict(args=dict(dim=32, n_layer=3, n_head=2, vocab_size=48, block_size=16, num_classes=5,
                           class_dropout_prob=0.0, cls_token_num=3, multiple_of=64),
                 batch=2, runs=[(1.0, -1, 18)]),
    "rope1d": dict(args=dict(dim=32, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=4,
                             class_dropout_prob=0.1, multiple_of=32, rope_base=500.0),
                   batch=2, runs=[(3.0, -1, 16)], rope="1d"),
}


def case_seed(case: str) -> int:
    return SEED + 1000 * list(CASES).index(case)


def seeded_weights(shapes: dict, seed: int) -> dict:
    """Random weights for a model with these {key: shape}, float64, the same on every machine.

    Keys are visited sorted, each tensor drawn uniformly in [-1, 1) from one generator (``torch.rand`` maps random
    bits to floats exactly), then scaled: embeddings by 1, linear maps to variance 1 / fan_in (the output 3x that
    scale, so that the logits are far apart), RMSNorm weights around 1.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
        if key.endswith("norm.weight"):
            w = 1 + 0.2 * u
        elif "embedding" in key:
            w = u
        else:
            w = u * math.sqrt(3.0 / shape[1]) * (3.0 if key == "output.weight" else 1.0)
        out[key] = w
    return out


def _import_llamagen(src: str):
    src = os.path.abspath(src)
    if not os.path.isfile(os.path.join(src, "autoregressive", "models", "gpt.py")):
        raise SystemExit(f"{src} does not look like a LlamaGen checkout (no autoregressive/models/gpt.py)")
    sys.path.insert(0, src)
    from autoregressive.models import generate as lg_generate
    from autoregressive.models import gpt as lg_gpt

    return lg_gpt, lg_generate


def _named_shapes(lg_gpt) -> dict:
    # on the meta device: GPT-XXXL has 3.9 B parameters. LlamaGen's __init__ reads torch.linspace(...).item(),
    # which a meta tensor cannot give, so that one call is pointed at the CPU while the model is built.
    linspace = torch.linspace
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        out = {}
        for name in NAMED:
            with torch.device("meta"):
                model = lg_gpt.GPT_models[name]()
            out[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    finally:
        torch.linspace = linspace
    return out


def _recording(sample, gaps: list):
    """LlamaGen's ``sample``, also recording the gap between the best and second-best logit it picks from."""
    def recording(logits, *a, **k):
        top2 = torch.topk(logits[:, -1, :].float(), 2, dim=-1).values
        gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
        return sample(logits, *a, **k)

    return recording


def make(src: str, out_path: str) -> None:
    lg_gpt, lg_generate = _import_llamagen(src)
    torch.set_grad_enabled(False)
    tensors, meta = {}, {}
    meta["named_shapes"] = json.dumps(_named_shapes(lg_gpt))
    for case, spec in CASES.items():
        seed = case_seed(case)
        args = lg_gpt.ModelArgs(**spec["args"])
        two_d = lg_gpt.precompute_freqs_cis_2d
        if spec.get("rope") == "1d":  # LlamaGen's 1-D table in place of the 2-D one (init and setup_caches)
            lg_gpt.precompute_freqs_cis_2d = lambda grid, n, base, cls: lg_gpt.precompute_freqs_cis(grid * grid, n,
                                                                                                   base, cls)
        try:
            torch.manual_seed(seed)
            model = lg_gpt.Transformer(args).eval()
            init = model.state_dict()
            tensors[f"{case}.init_sums"] = torch.stack([init[k].double().sum() for k in sorted(init)])
            shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
            w64 = seeded_weights(shapes, seed)
            model.load_state_dict({k: v.float() for k, v in w64.items()}, strict=True)
            g = torch.Generator().manual_seed(seed + 1)
            B = spec["batch"]
            labels = torch.randint(0, args.num_classes, (B,), generator=g)
            T = args.block_size + args.cls_token_num - 1  # what the eval-mode naive forward needs
            idx = torch.randint(0, args.vocab_size, (B, T), generator=g)
            logits, _ = model(idx, labels)
            tensors[f"{case}.labels"] = labels
            tensors[f"{case}.idx"] = idx
            tensors[f"{case}.logits"] = logits.float().contiguous()
            tensors[f"{case}.weight_sums"] = torch.stack([w64[k].sum() for k in sorted(w64)])
            runs = []
            for r, (cfg_scale, cfg_interval, n) in enumerate(spec["runs"]):
                gaps = []
                sample = lg_generate.sample
                lg_generate.sample = _recording(sample, gaps)  # prefill and decode_one_token look it up here
                try:
                    tokens = lg_generate.generate(model, labels, n, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                                  top_k=1)
                finally:
                    lg_generate.sample = sample
                tensors[f"{case}.run{r}.tokens"] = tokens.long().contiguous()
                runs.append(dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, max_new_tokens=n,
                                 min_gap=min(gaps)))
                if min(gaps) < 1e-3:
                    raise SystemExit(f"{case} run {r}: the best two logits came within {min(gaps):.2e}: token "
                                     f"equality would hang on float32 rounding; change the seed or the scales")
            meta[f"{case}.args"] = json.dumps(spec["args"])
            meta[f"{case}.runs"] = json.dumps(runs)
        finally:
            lg_gpt.precompute_freqs_cis_2d = two_d
    try:
        rev = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    meta["llamagen_commit"] = rev
    meta["torch"] = torch.__version__
    meta["made_by"] = "scripts/llamagen_fixtures_gpt.py"
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(tensors, out_path, metadata=meta)
    size = os.path.getsize(out_path)
    print(f"wrote {out_path} ({size / 1024:.0f} KB, {len(tensors)} tensors) from LlamaGen {rev}")
    for case in CASES:
        print(case, meta[f"{case}.runs"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("llamagen", help="path of a LlamaGen checkout (FoundationVision/LlamaGen)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                 "llamagen_gpt.safetensors"))
    a = p.parse_args(argv)
    make(a.llamagen, a.out)


if __name__ == "__main__":
    main()
