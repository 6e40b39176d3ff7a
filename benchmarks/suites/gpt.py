"""Providers and sizes for benchmarking the GPT over code indices: sampling and a training step.

A size is (batch, tokens, n_layer, n_head, n_embd, vocab): ``tokens`` is the number sampled per sequence (a
16x16 code grid: 256) or the training sequence length. Modes:

    sample   from a one-token prompt (a start-of-sequence token, as taming's SOSProvider), ``tokens`` new tokens
             per sequence, top-k 100 sampling; block_size = tokens
    train    forward + backward of the language-model loss on (batch, tokens) ids (no optimizer step)
    cfg      class-conditional sampling with classifier-free guidance, LlamaGen's way: a LlamaGen-architecture
             GPT (GPTConfig(arch='llama'): RMSNorm, SwiGLU, 2-D RoPE, block_size = tokens, 1000 classes),
             ``batch`` class labels, each run with its null class too (2 x batch rows), cfg_scale 4, top-k 1000,
             ``tokens`` new tokens per label

Providers:
    vqkernels     ours: vqkernels.models.GPT.generate (prefill, then one cached step per token through
                  attention_with_kv_cache); train: GPT forward + backward
    vqkernels-graph   (CUDA, sample) the same with generate(cuda_graph=True): the decoding step captured once as a
                  CUDA graph and replayed per token (gpt-fast's way past the launch overhead)
    taming        taming.modules.transformer.mingpt.sample (recomputes the whole prefix every step); train:
                  minGPT's GPT forward + backward (explicit-mask attention)
    taming-past   taming's mingpt.sample_with_past (its KV cache: torch.cat of the past every step)
    hf-gpt2       Hugging Face transformers' GPT2LMHeadModel.generate with its KV cache (do_sample, top_k 100), the
                  same size; train: its forward + backward. transformers runs in its own process (taming's
                  stand-in for it cannot share one), from where :func:`benchmarks.peers.hf_path` finds it
    llamagen      (cfg) LlamaGen's own ``autoregressive.models.generate.generate`` on its ``Transformer`` with our
                  weights (the state_dict keys are the same), from a LlamaGen checkout: ``$VQKERNELS_LLAMAGEN_SRC``,
                  else ``../ref/LlamaGen`` beside the repository. LlamaGen is not a package and cannot be a
                  dependency: where its source is absent the row is skipped with that reason.

Ours and taming's (LlamaGen's) get the same weights (ours built, loaded into minGPT's: the state_dict keys are the same);
GPT-2 is the same size with its own random init (its MLP uses the tanh GELU; otherwise the same blocks).
Metric: tokens/s (batch * tokens / time).
"""
from __future__ import annotations

from typing import NamedTuple

import math
import os
import warnings
from pathlib import Path

import torch

from .. import peers
from ..harness.common import device_reasons, importable_reasons
from ..harness.protocol import Case, Metric, NamedSize, Provider, Suite
from .vqgan import taming_reasons

OP = "gpt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("sample", "train", "cfg")
TOP_K = 100  # (at most the vocabulary)
CFG_SCALE, CFG_TOP_K, NUM_CLASSES = 4.0, 1000, 1000  # cfg mode: LlamaGen's sample_c2i.py values (its top-k 2000)


class Size(NamedTuple):
    batch: int
    tokens: int
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int


SIZES = {
    "cpu": NamedSize(Size(8, 256, 8, 8, 512, 1024), "16x16 codes, a GPT of 8 layers, 8 heads, width 512, 1024 codes"),
    "imagenet": NamedSize(Size(8, 256, 24, 16, 1536, 16384), "GPU: taming's ImageNet transformer size"),
    "quick": NamedSize(Size(2, 12, 2, 2, 32, 64), "smoke"),
    # cfg mode (LlamaGen's architecture; batch = class labels, 2x the rows with CFG)
    "llamagen-cpu": NamedSize(Size(4, 256, 6, 12, 768, 16384), "issue 24's CPU bar: GPT-B's shape cut to 6 layers, "
                              "4 labels, 16x16 tokens of a 16384-code tokenizer"),
    "gpt-b": NamedSize(Size(4, 256, 12, 12, 768, 16384), "LlamaGen GPT-B (111M), 4 labels"),
    "gpt-b-32": NamedSize(Size(32, 256, 12, 12, 768, 16384), "GPU: LlamaGen GPT-B, 32 labels (64 rows)"),
    "gpt-b-64": NamedSize(Size(64, 256, 12, 12, 768, 16384), "GPU: LlamaGen GPT-B, 64 labels (128 rows)"),
    "gpt-l-32": NamedSize(Size(32, 256, 24, 16, 1024, 16384), "GPU: LlamaGen GPT-L (343M), 32 labels"),
    "gpt-l-64": NamedSize(Size(64, 256, 24, 16, 1024, 16384), "GPU: LlamaGen GPT-L (343M), 64 labels"),
    "quick-cfg": NamedSize(Size(2, 4, 2, 2, 32, 64), "smoke (cfg)"),
}
SAMPLE_PROVIDERS = ("vqkernels", "taming", "taming-past", "hf-gpt2")
CUDA_SAMPLE_PROVIDERS = ("vqkernels", "vqkernels-graph", "taming", "taming-past", "hf-gpt2")
TRAIN_PROVIDERS = ("vqkernels", "taming", "hf-gpt2")
CFG_PROVIDERS = ("vqkernels", "llamagen")
CUDA_CFG_PROVIDERS = ("vqkernels", "vqkernels-graph", "llamagen")


def default_cases(device: str, quick: bool = False, large: bool = False) -> list[Case]:
    S = {n: s.size for n, s in SIZES.items()}
    if quick:
        return [Case(S["quick"], "fp32", SAMPLE_PROVIDERS, "sample"), Case(S["quick"], "fp32", TRAIN_PROVIDERS, "train"),
                Case(S["quick-cfg"], "fp32", CFG_PROVIDERS, "cfg")]
    cases = [Case(S["cpu"], "fp32", SAMPLE_PROVIDERS, "sample"), Case(S["cpu"], "fp32", TRAIN_PROVIDERS, "train"),
             Case(S["llamagen-cpu"], "fp32", CFG_PROVIDERS, "cfg")]
    if large and device != "cuda":
        cases.append(Case(S["gpt-b"], "fp32", CFG_PROVIDERS, "cfg"))
    if device == "cuda":
        cases = [Case(S["cpu"], "fp32", CUDA_SAMPLE_PROVIDERS, "sample"), Case(S["cpu"], "fp32", TRAIN_PROVIDERS, "train")]
        cases += [Case(S["cpu"], "bf16", CUDA_SAMPLE_PROVIDERS, "sample"),
                  Case(S["cpu"], "bf16", TRAIN_PROVIDERS, "train")]
        cases += [Case(S["imagenet"], d, ("vqkernels", "vqkernels-graph", "taming-past", "hf-gpt2"), "sample")
                  for d in DTYPES]
        cases += [Case(S["imagenet"], d, TRAIN_PROVIDERS, "train") for d in DTYPES]
        cases += [Case(S[n], d, CUDA_CFG_PROVIDERS, "cfg") for n in ("gpt-b-32", "gpt-b-64", "gpt-l-32", "gpt-l-64")
                  for d in DTYPES]
    return cases


class Inputs(NamedTuple):
    idx: torch.Tensor | None  # sample: (B, 1) the start token; train: (B, T) ids; cfg: None
    targets: torch.Tensor | None  # train: (B, T)
    seed: int
    labels: torch.Tensor | None = None  # cfg: (B,) class labels


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    s = case.size
    g = torch.Generator().manual_seed(seed)
    if case.mode == "sample":
        return Inputs(torch.zeros(s.batch, 1, dtype=torch.int64, device=device), None, seed)
    if case.mode == "cfg":
        return Inputs(None, None, seed, torch.randint(0, NUM_CLASSES, (s.batch,), generator=g).to(device))
    ids = torch.randint(0, s.vocab, (s.batch, s.tokens + 1), generator=g).to(device)
    return Inputs(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), seed)


def _ours(case: Case, device: str):
    from vqkernels.models.gpt import GPT, GPTConfig

    s = case.size
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=s.vocab, block_size=s.tokens, n_layer=s.n_layer, n_head=s.n_head,
                         n_embd=s.n_embd)).to(device)


def _ours_llama(case: Case, device: str):
    """LlamaGen's architecture at this size, weights N(0, 0.02) (the output too: LlamaGen's init zeroes it, and
    all-equal logits would make top-k sampling a different workload)."""
    from vqkernels.models.gpt import GPT, GPTConfig

    s = case.size
    torch.manual_seed(1234)
    model = GPT(GPTConfig(vocab_size=s.vocab, block_size=s.tokens, n_layer=s.n_layer, n_head=s.n_head,
                          n_embd=s.n_embd, arch="llama", num_classes=NUM_CLASSES))
    with torch.no_grad():
        model.output.weight.normal_(0.0, 0.02)
    return model.to(device)


def _llamagen(case: Case, device: str):
    # LlamaGen's root is first on this process's path (Provider.child_path)
    from autoregressive.models.gpt import ModelArgs, Transformer

    s = case.size
    model = Transformer(ModelArgs(dim=s.n_embd, n_layer=s.n_layer, n_head=s.n_head, vocab_size=s.vocab,
                                  block_size=s.tokens, num_classes=NUM_CLASSES))
    model.load_state_dict(_ours_llama(case, "cpu").state_dict(), strict=True)
    return model.to(device)


def llamagen_src() -> Path:
    """Where LlamaGen's source is read from: ``$VQKERNELS_LLAMAGEN_SRC``, else ``../ref/LlamaGen`` beside the
    repository."""
    env = os.environ.get("VQKERNELS_LLAMAGEN_SRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "ref" / "LlamaGen"


def _llamagen_path() -> list[str]:
    return [str(llamagen_src())]


def _taming(case: Case, device: str):
    peers.install(transformers=True)  # taming's stand-ins (this provider has a process of its own)
    from taming.modules.transformer.mingpt import GPT as MinGPT

    s = case.size
    ours = _ours(case, "cpu")
    model = MinGPT(vocab_size=s.vocab, block_size=s.tokens, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("attn.mask")]:
        raise RuntimeError(f"minGPT did not take our weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device)


def _hf(case: Case, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = case.size
    torch.manual_seed(1234)
    cfg = GPT2Config(vocab_size=s.vocab, n_positions=s.tokens + 1, n_embd=s.n_embd, n_layer=s.n_layer,
                     n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(cfg).to(device)


def _dtype_ctx(case: Case, device: str):
    import contextlib

    if case.dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _build(which: str):
    def build(inp: Inputs, case: Case):
        device = inp.idx.device.type if inp.idx is not None else inp.labels.device.type
        if case.mode == "cfg":
            return _build_cfg(which, inp, case, device)
        model = {"vqkernels": _ours, "vqkernels-graph": _ours, "taming": _taming, "taming-past": _taming,
                 "hf-gpt2": _hf}[which](case, device)
        T = case.size.tokens
        top_k = min(TOP_K, case.size.vocab)
        if case.mode == "train":
            model.train()

            def step():
                for p in model.parameters():
                    p.grad = None
                with _dtype_ctx(case, device):
                    if which == "hf-gpt2":
                        logits = model(input_ids=inp.idx).logits
                        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                                 inp.targets.reshape(-1))
                    else:
                        _, loss = model(inp.idx, targets=inp.targets)  # ours and minGPT: (logits, loss)
                loss.backward()
                return loss.detach()

            return step
        model.eval()
        if case.dtype == "bf16":
            model = model.to(torch.bfloat16)
        gen = torch.Generator(device=device).manual_seed(inp.seed)
        if which in ("vqkernels", "vqkernels-graph"):
            graphed = which == "vqkernels-graph"

            def call():
                with torch.no_grad():
                    return model.generate(inp.idx, T, top_k=top_k, generator=gen, cuda_graph=graphed)
        elif which == "taming":
            from taming.modules.transformer.mingpt import sample

            def call():
                with torch.no_grad():
                    return sample(model, inp.idx, T, sample=True, top_k=top_k)
        elif which == "taming-past":
            from taming.modules.transformer.mingpt import sample_with_past

            def call():
                with torch.no_grad():
                    return sample_with_past(inp.idx, model, T, sample_logits=True, top_k=top_k)
        else:
            from transformers import GenerationConfig

            gc = GenerationConfig(do_sample=True, top_k=top_k, max_new_tokens=T, min_new_tokens=T, use_cache=True,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=None)
            mask = torch.ones_like(inp.idx)

            def call():
                with torch.no_grad():
                    return model.generate(inp.idx, attention_mask=mask, generation_config=gc)
        return call

    return build


def _build_cfg(which: str, inp: Inputs, case: Case, device: str):
    """cfg mode: LlamaGen's class-conditional CFG sampling, by ours or by LlamaGen's generate."""
    T = case.size.tokens
    top_k = min(CFG_TOP_K, case.size.vocab)
    model = (_llamagen if which == "llamagen" else _ours_llama)(case, device).eval()
    if case.dtype == "bf16":
        model = model.to(torch.bfloat16)
    if which == "llamagen":
        from autoregressive.models.generate import generate

        warnings.filterwarnings("ignore", message=".*sdp_kernel.*", category=FutureWarning)  # its decode loop's

        def call():
            with torch.no_grad():
                return generate(model, inp.labels, T, cfg_scale=CFG_SCALE, top_k=top_k)
        return call
    gen = torch.Generator(device=device).manual_seed(inp.seed)
    graphed = which == "vqkernels-graph"

    def call():
        return model.generate(None, T, class_labels=inp.labels, cfg_scale=CFG_SCALE, top_k=top_k, generator=gen,
                              cuda_graph=graphed)
    return call


def _graph_reasons(case: Case, device: str):
    if device != "cuda":
        return ["CUDA graphs exist on CUDA devices only"]
    if case.mode not in ("sample", "cfg"):
        return [f"no {case.mode} mode (the graph is the decoding step)"]
    return _ours_reasons(case, device)


def _llamagen_reasons(case: Case, device: str):
    if case.mode != "cfg":
        return [f"no {case.mode} mode (LlamaGen's generate is class-conditional: see the cfg mode)"]
    src = llamagen_src()
    if not (src / "autoregressive" / "models" / "generate.py").is_file():
        return [f"LlamaGen's source is not at {src} (it is not a package and cannot be a dependency): set "
                f"VQKERNELS_LLAMAGEN_SRC to a checkout of FoundationVision/LlamaGen"]
    return device_reasons(device)


def _ours_reasons(case: Case, device: str):
    return device_reasons(device) or importable_reasons("vqkernels.models.gpt")


def _taming_reasons(modes):
    def reasons(case: Case, device: str):
        if case.mode == "cfg":
            return ["no cfg mode (minGPT has no class embedding or null class)"]
        if case.mode not in modes:
            return [f"no {case.mode} mode (see 'taming')"]
        return taming_reasons(case, device)

    return reasons


def _hf_reasons(case: Case, device: str):
    if case.mode == "cfg":
        return ["no cfg mode (GPT-2 has no class embedding or null class)"]
    return device_reasons(device) or peers.hf_reasons()


PROVIDERS = {
    "vqkernels": Provider("vqkernels", "ours", "vqkernels.models.GPT: generate (KV cache) / forward + backward",
                          _build("vqkernels"), _ours_reasons),
    "vqkernels-graph": Provider("vqkernels-graph", "ours", "vqkernels.models.GPT.generate(cuda_graph=True): the "
                                "decoding step replayed as a CUDA graph", _build("vqkernels-graph"), _graph_reasons),
    "taming": Provider("taming", "peer", "taming's minGPT: mingpt.sample (recomputes the prefix) / forward + backward",
                       _build("taming"), _taming_reasons(MODES), isolated=True),
    "taming-past": Provider("taming-past", "peer", "taming's mingpt.sample_with_past (torch.cat KV cache)",
                            _build("taming-past"), _taming_reasons(("sample",)), isolated=True),
    "hf-gpt2": Provider("hf-gpt2", "peer", "Hugging Face transformers GPT2LMHeadModel.generate (KV cache) / forward + "
                        "backward, the same size", _build("hf-gpt2"), _hf_reasons, isolated=True,
                        child_path=peers.hf_path, extra={"needs_real_module": "transformers"}),
    "llamagen": Provider("llamagen", "peer", "LlamaGen's own generate (autoregressive/models/generate.py; CFG rows in "
                         "one batch, its KV cache), our weights", _build("llamagen"), _llamagen_reasons, isolated=True,
                         child_path=_llamagen_path),
}


class GPTSuite(Suite):
    op = OP
    title = ("GPT over codes (sample: top-k 100 from one start token; train: forward + backward; cfg: LlamaGen's "
             "architecture, class labels with CFG 4, top-k 1000)")
    Size = Size
    sizes = SIZES
    dtypes = DTYPES
    modes = MODES
    metrics = (Metric("tokens_per_s", "tokens/s", lambda c: float(c.size.batch * c.size.tokens)),)
    providers = PROVIDERS
    cpu_providers = SAMPLE_PROVIDERS
    cuda_providers = CUDA_SAMPLE_PROVIDERS

    def label(self, size):
        return f"b{size.batch} T{size.tokens} L{size.n_layer} H{size.n_head} C{size.n_embd} V{size.vocab}"

    def default_cases(self, device, quick=False, large=False):
        return default_cases(device, quick, large)

    def cases_for(self, sizes, dtypes, device):
        sample = CUDA_SAMPLE_PROVIDERS if device == "cuda" else SAMPLE_PROVIDERS
        cfg = CUDA_CFG_PROVIDERS if device == "cuda" else CFG_PROVIDERS
        return ([Case(s, d, sample, "sample") for s in sizes for d in dtypes]
                + [Case(s, d, TRAIN_PROVIDERS, "train") for s in sizes for d in dtypes]
                + [Case(s, d, cfg, "cfg") for s in sizes for d in dtypes if math.isqrt(s.tokens) ** 2 == s.tokens])

    def warmup_case(self, case):
        return self.with_size(case, batch=1, tokens=min(case.size.tokens, 4))

    def make_inputs(self, case, device, seed=0):
        return make_inputs(case, device, seed)


SUITE = GPTSuite()
