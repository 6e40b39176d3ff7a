"""The llama family of the GPT (GPTConfig(arch='llama'), LlamaGen's class-conditional GPT).

- Against LlamaGen itself, through facts recorded by running its code: tests/fixtures/llamagen_gpt.safetensors,
  made by scripts/llamagen_fixtures_gpt.py (LlamaGen is not a package; the tests cannot import it). Its weights
  are redrawn here from the script's seeded_weights.
- Against a float64 reference of the same math written here (complex-number RoPE, explicit softmax attention):
  every config option, forward and gradients.
- Cached generation with CFG against the cache-free sampler; checkpoints; training-time behaviour; bad input.
"""
import dataclasses
import importlib.util
import json
import math
import pathlib
import pickle

import pytest
import torch
import torch.nn.functional as F

from vqkernels._config import ConfigError
from vqkernels.models._checkpoint import CheckpointError
from vqkernels.models.gpt import GPT, LLAMAGEN_MODELS, GPTConfig, generate_reference, llamagen_config, sample_next
from vqkernels.nn.attention import KVCache, inference_weights
from vqkernels.nn.rope import rope_table_1d, rope_table_2d

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "llamagen_gpt.safetensors"


def _script():
    spec = importlib.util.spec_from_file_location("llamagen_fixtures_gpt", ROOT / "scripts" / "llamagen_fixtures_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FX = _script()


@pytest.fixture(scope="module")
def fixture():
    from safetensors import safe_open

    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _case_weights(case: str, model: GPT) -> dict:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return FX.seeded_weights(shapes, FX.case_seed(case))


def _case_config(case: str) -> GPTConfig:
    cfg = llamagen_config(FX.CASES[case]["args"])
    return dataclasses.replace(cfg, rope=FX.CASES[case].get("rope", "2d"))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------------------------------------
# A float64 reference of the same math, written independently of the model: RoPE as complex rotations, attention
# as an explicit masked softmax, grouped heads by repetition.

def _rope_complex(cfg: GPTConfig, n: int, dtype) -> torch.Tensor:
    """(n, hs / 2) complex: zero rows for the cls_token_num condition positions, then e^{i angle}."""
    hs, base = cfg.head_dim, cfg.rope_base
    rows = []
    if cfg.rope == "2d":
        g = math.isqrt(cfg.block_size)
        f = [base ** (-(2 * i) / (hs // 2)) for i in range(hs // 4)]
        for p in range(g * g):
            r, c = divmod(p, g)
            rows.append([r * fi for fi in f] + [c * fi for fi in f])
    else:
        f = [base ** (-(2 * i) / hs) for i in range(hs // 2)]
        rows = [[t * fi for fi in f] for t in range(cfg.block_size)]
    ang = torch.tensor(rows, dtype=torch.float64)
    z = torch.polar(torch.ones_like(ang), ang)
    z = torch.cat((torch.zeros(cfg.cls_token_num, hs // 2, dtype=z.dtype), z))[:n]
    return z.to(torch.complex128 if dtype == torch.float64 else torch.complex64)


def reference_logits(w: dict, cfg: GPTConfig, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LlamaGen's eval-mode forward from the weights w (all in one dtype) -> (B, 1 + T, V)."""
    dtype = w["tok_embeddings.weight"].dtype
    B, T = idx.shape
    n = 1 + T
    H, Hkv, hs = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim
    z = _rope_complex(cfg, n, dtype)

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    def rot(x):  # (B, n, heads, hs)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hs // 2, 2).contiguous())
        return torch.view_as_real(xc * z[None, :, None, :]).flatten(3)

    x = torch.cat((w["cls_embedding.embedding_table.weight"][labels][:, None], w["tok_embeddings.weight"][idx]), 1)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        qkv = h @ w[p + "attention.wqkv.weight"].T
        q, k, v = qkv.split((H * hs, Hkv * hs, Hkv * hs), -1)
        q = rot(q.reshape(B, n, H, hs)).transpose(1, 2)
        k = rot(k.reshape(B, n, Hkv, hs)).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        v = v.reshape(B, n, Hkv, hs).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, n, H * hs)
        x = x + y @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        a = h @ w[p + "feed_forward.w1.weight"].T
        x = x + (a * torch.sigmoid(a) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


def _ours_with(w64: dict, cfg: GPTConfig, dtype=torch.float32) -> GPT:
    model = GPT(cfg).eval()
    model.load_state_dict({k: v.float() for k, v in w64.items()}, strict=True)
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# LlamaGen's facts

@pytest.mark.parametrize("name", list(LLAMAGEN_MODELS))
def test_named_models_have_llamagens_keys_and_shapes(fixture, name):
    _, meta = fixture
    theirs = json.loads(meta["named_shapes"])[name]
    with torch.device("meta"):
        model = GPT(llamagen_config(name))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(theirs)  # the same order, too
    assert ours == theirs


def test_fixture_weights_are_redrawn_exactly(fixture):
    tensors, _ = fixture
    for case in FX.CASES:
        w = _case_weights(case, GPT(_case_config(case)))
        sums = torch.stack([w[k].sum() for k in sorted(w)])
        torch.testing.assert_close(sums, tensors[f"{case}.weight_sums"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(FX.CASES))
def test_same_seed_same_initialisation_as_llamagen(fixture, case):
    tensors, _ = fixture
    torch.manual_seed(FX.case_seed(case))
    sd = GPT(_case_config(case)).state_dict()
    sums = torch.stack([sd[k].double().sum() for k in sorted(sd)])
    torch.testing.assert_close(sums, tensors[f"{case}.init_sums"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", list(FX.CASES))
def test_llamagen_checkpoint_gives_llamagens_logits(fixture, tmp_path, case):
    tensors, _ = fixture
    cfg = _case_config(case)
    w64 = _case_weights(case, GPT(cfg))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {k: v.float() for k, v in w64.items()}}, path)  # as LlamaGen's train_c2i.py saves
    if case == "rope1d":  # not a ModelArgs option (LlamaGen's Transformer always builds the 2-D table)
        model = _ours_with(w64, cfg)
    else:
        model = GPT.from_llamagen(path, FX.CASES[case]["args"])
    assert model.config == cfg and not model.training
    idx, labels = tensors[f"{case}.idx"], tensors[f"{case}.labels"]
    theirs = tensors[f"{case}.logits"]
    with torch.no_grad():
        ours, loss = model(idx, class_labels=labels)
        truth = _ours_with(w64, cfg, torch.float64)(idx, class_labels=labels)[0]
    assert loss is None and ours.dtype == torch.float32 and ours.shape == theirs.shape == (len(labels), 1 + idx.shape[1],
                                                                                            cfg.vocab_size)
    scale = float(truth.abs().max())
    e_theirs, e_ours = _max_err(theirs, truth), _max_err(ours, truth)
    assert e_theirs <= 1e-4 * scale, (e_theirs, scale)  # our float64 model computes LlamaGen's function
    assert e_ours <= 2 * e_theirs + 1e-6 * scale, (e_ours, e_theirs, scale)  # as accurate as LlamaGen's float32


def _runs():
    return [(case, r) for case, spec in FX.CASES.items() for r in range(len(spec["runs"]))]


@pytest.mark.parametrize("case,run", _runs(), ids=[f"{c}-run{r}" for c, r in _runs()])
@pytest.mark.parametrize("cuda_graph_loop", [False, True], ids=["host-positions", "device-positions"])
def test_cfg_tokens_equal_llamagens_generate_top_k_1(fixture, case, run, cuda_graph_loop):
    tensors, meta = fixture
    cfg_scale, cfg_interval, n = FX.CASES[case]["runs"][run]
    recorded = json.loads(meta[f"{case}.runs"])[run]
    assert recorded["min_gap"] > 1e-3  # LlamaGen's best two logits far apart: equality cannot hang on rounding
    cfg = _case_config(case)
    model = _ours_with(_case_weights(case, GPT(cfg)), cfg)
    labels = tensors[f"{case}.labels"]
    want = tensors[f"{case}.run{run}.tokens"]
    if not cuda_graph_loop:
        got = model.generate(None, n, class_labels=labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, top_k=1)
    else:
        got = _device_position_generate(model, labels, n, cfg_scale, cfg_interval, dict(top_k=1))
    assert got.shape == want.shape == (len(labels), n)
    assert torch.equal(got, want)


def _device_position_generate(model, labels, n, cfg_scale, cfg_interval, sampling, generator=None, prompt=None):
    """generate's loop as generate(cuda_graph=True) replays it, run eagerly (the same step, positions on the
    device): what the CPU can check of the graphed path."""
    cfg = model.config
    B = labels.shape[0]
    T0 = 0 if prompt is None else prompt.shape[1]
    guided = cfg_scale > 1
    R = 2 * B if guided else B
    caches = [KVCache(R, cfg.n_kv_head or cfg.n_head, T0 + n, cfg.head_dim) for _ in model.layers]
    out = torch.empty((B, T0 + n), dtype=torch.int64)
    if prompt is not None:
        out[:, :T0] = prompt

    def rows(t):
        return torch.cat((t, t)) if guided else t

    def pick(logits, k):
        if guided:
            cond, uncond = logits.split(B)
            logits = uncond + (cond - uncond) * cfg_scale if cfg_interval == -1 or k - 1 <= cfg_interval else cond
        return sample_next(logits, generator=generator, **sampling)

    lab = torch.cat((labels, torch.full_like(labels, cfg.num_classes))) if guided else labels
    with torch.inference_mode(), inference_weights(model):
        out[:, T0] = pick(model._forward_cached(rows(out[:, :T0]), 0, caches, lab), 0)
        model._decode_graphed(out, T0, n, caches, 1.0, None, None, None, capture=False, pick=pick, rows=rows,
                              offset=1)
    assert all(c.lengths == [T0 + n] * R for c in caches)
    return out if prompt is not None else out[:, T0:]


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "bare"])
def test_from_llamagen_checkpoint_layouts(tmp_path, layout):
    args = dict(dim=32, n_layer=1, n_head=4, vocab_size=40, block_size=9, num_classes=3, multiple_of=32)
    src = GPT(llamagen_config(args))
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    sd["freqs_cis"] = torch.zeros(10, 4, 2)  # older LlamaGen checkpoints kept the RoPE table: dropped
    ckpt = sd if layout == "bare" else {layout: sd, "steps": 7}
    for source in (ckpt, tmp_path / "c.pt"):
        if not isinstance(source, dict):
            torch.save(ckpt, source)
        model = GPT.from_llamagen(source, dict(args, model_type="c2i", initializer_range=0.01, max_seq_len=99))
        got = model.state_dict()
        assert set(got) == set(sd) - {"freqs_cis"} and all(torch.equal(got[k], sd[k]) for k in got)


def test_from_llamagen_named_model_with_overrides(tmp_path):
    cfg = llamagen_config("GPT-B", vocab_size=48, block_size=16, num_classes=5, cls_token_num=1)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.num_classes) == \
        (12, 12, 768, 48, 16, 5)
    assert cfg.ffn_hidden == 2048 and cfg.has_null_class and cfg.arch == "llama"
    assert (cfg.embd_pdrop, cfg.resid_pdrop, cfg.ffn_pdrop, cfg.attn_pdrop) == (0.1, 0.1, 0.1, 0.0)  # ModelArgs'
    assert llamagen_config("GPT-XXL").ffn_hidden == 4096 and llamagen_config("GPT-XXXL").ffn_hidden == 6912


def test_from_llamagen_refuses(tmp_path):
    args = dict(dim=16, n_layer=1, n_head=2, vocab_size=20, block_size=4, num_classes=3, multiple_of=16)
    sd = GPT(llamagen_config(args)).state_dict()
    for name in ("GPT-1B", "GPT-3B", "GPT-7B"):
        with pytest.raises(NotImplementedError, match="text-conditional"):
            GPT.from_llamagen(sd, name)
    with pytest.raises(NotImplementedError, match="model_type 't2i'"):
        GPT.from_llamagen(sd, dict(args, model_type="t2i"))
    with pytest.raises(NotImplementedError, match="cap_proj"):
        GPT.from_llamagen({**sd, "cls_embedding.cap_proj.fc1.weight": torch.zeros(1)}, args)
    with pytest.raises(ValueError, match="unknown LlamaGen model 'GPT-Q'"):
        GPT.from_llamagen(sd, "GPT-Q")
    with pytest.raises(ValueError, match="unknown LlamaGen model ModelArgs field.*n_embd"):
        GPT.from_llamagen(sd, args, n_embd=16)
    with pytest.raises(ConfigError, match="num_classes must be"):
        GPT.from_llamagen(sd, dict(args, num_classes="ten"))
    with pytest.raises(CheckpointError, match=r"cls_embedding.embedding_table.weight: \(4, 16\) in the LlamaGen "
                                              r"checkpoint, \(3, 16\)"):
        GPT.from_llamagen(sd, args, class_dropout_prob=0.0)  # the checkpoint has the null-class row
    with pytest.raises(CheckpointError, match="missing.*layers.1"):
        GPT.from_llamagen(sd, args, n_layer=2)
    with pytest.raises(CheckpointError, match="non-tensor"):
        GPT.from_llamagen({"model": {**sd, "step": 3}}, args)
    with pytest.raises(FileNotFoundError):
        GPT.from_llamagen(tmp_path / "nope.pt", args)
    with pytest.raises(TypeError, match="path or a dict"):
        GPT.from_llamagen(3, args)


def test_from_llamagen_training_checkpoint_needs_trust(tmp_path):
    import argparse

    args = dict(dim=16, n_layer=1, n_head=2, vocab_size=20, block_size=4, num_classes=3, multiple_of=16)
    sd = GPT(llamagen_config(args)).state_dict()
    path = tmp_path / "0010000.pt"
    torch.save({"model": sd, "optimizer": {}, "steps": 10000, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        GPT.from_llamagen(path, args)
    model = GPT.from_llamagen(path, args, trust_checkpoint=True)
    assert torch.equal(model.output.weight, sd["output.weight"])


# ---------------------------------------------------------------------------------------------------------
# Every option against the float64 reference

OPTIONS = [
    dict(),
    dict(n_kv_head=2, ffn_dim_multiplier=1.3, multiple_of=16, rope_base=100.0, norm_eps=1e-6),
    dict(n_kv_head=1, rope="1d", cls_token_num=3, class_dropout_prob=0.0, block_size=12),
    dict(cls_token_num=2, n_head=2, multiple_of=64),
]
BASE = dict(vocab_size=41, block_size=16, n_layer=2, n_head=4, n_embd=32, arch="llama", num_classes=6,
            multiple_of=32)


def _opt_model(opts: dict, seed: int = 0) -> tuple[GPT, dict]:
    cfg = GPTConfig(**{**BASE, **opts})
    shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    w64 = {k: v.float().double() for k, v in FX.seeded_weights(shapes, seed).items()}  # the model's float32 values
    return _ours_with(w64, cfg), w64


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "default")
def test_forward_against_float64_reference(opts):
    model, w64 = _opt_model(opts, 3)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, cfg.num_classes + int(cfg.has_null_class), (3,), generator=g)
    w32 = {k: v.float() for k, v in w64.items()}
    for T in (0, 5, cfg.n_positions - 1):
        idx = torch.randint(0, cfg.vocab_size, (3, T), generator=g)
        truth = reference_logits(w64, cfg, idx, labels)
        ref32 = reference_logits(w32, cfg, idx, labels)
        with torch.no_grad():
            ours32 = model(idx, class_labels=labels)[0]
            ours64 = model.double()(idx, class_labels=labels)[0]
            model.float()
        scale = float(truth.abs().max())
        assert ours32.shape == (3, 1 + T, cfg.vocab_size) and ours64.dtype == torch.float64
        assert _max_err(ours64, truth) <= 1e-12 * scale
        assert _max_err(ours32, truth) <= 2 * _max_err(ref32, truth) + 1e-6 * scale


@pytest.mark.parametrize("opts", OPTIONS[:3], ids=["default", "gqa-ffn", "kv1-rope1d-cls3"])
def test_gradients_against_float64_reference(opts):
    model, w64 = _opt_model(opts, 4)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, cfg.num_classes, (2,), generator=g)
    idx = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)
    targets[0, 3] = -100  # ignored, as F.cross_entropy

    def ref_grads(dtype):
        w = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in w64.items()}
        logits = reference_logits(w, cfg, idx, labels)
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1)).backward()
        return {k: v.grad for k, v in w.items()}

    truth, ref32 = ref_grads(torch.float64), ref_grads(torch.float32)
    _, loss = model(idx, class_labels=labels, targets=targets)  # eval mode: no dropout, no label drop
    loss.backward()
    for k, p in model.named_parameters():
        scale = float(truth[k].abs().max()) + 1e-12
        assert _max_err(p.grad, truth[k]) <= 2 * _max_err(ref32[k], truth[k]) + 1e-6 * scale, k


def test_rope_tables_are_llamagens_layout():
    t2 = rope_table_2d(3, 8, 10000.0, cls_token_num=2)  # (2 + 9, 4, 2)
    assert t2.shape == (11, 4, 2) and torch.equal(t2[:2], torch.zeros(2, 4, 2))
    f = torch.tensor([1.0, 10000.0 ** -0.5], dtype=torch.float64)
    r, c = divmod(7, 3)  # token 7 sits at row 2, column 1
    ang = torch.cat((r * f, c * f))
    torch.testing.assert_close(t2[2 + 7], torch.stack((ang.cos(), ang.sin()), -1), rtol=0, atol=1e-15)
    t1 = rope_table_1d(5, 6, 100.0, cls_token_num=1)
    ang = 4 * 100.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    torch.testing.assert_close(t1[1 + 4], torch.stack((ang.cos(), ang.sin()), -1), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_table_2d(3, 6)


# ---------------------------------------------------------------------------------------------------------
# Generation

SAMPLINGS = [dict(temperature=0.0), dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(top_k=10, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (2.5, 4)])
def test_cached_generation_equals_cache_free(sampling, cfg_scale, cfg_interval):
    model, _ = _opt_model(OPTIONS[1], 5)
    labels = torch.tensor([0, 5, 6])  # 6: the null class, allowed as a label
    n = model.config.block_size  # fills the table exactly (the last token is never fed back)
    kw = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, **sampling)
    out = model.generate(None, n, class_labels=labels, generator=torch.Generator().manual_seed(7), **kw)
    ref = generate_reference(model, None, n, class_labels=labels, generator=torch.Generator().manual_seed(7), **kw)
    assert out.shape == (3, n) and out.dtype == torch.int64
    assert torch.equal(out, ref)
    stats = model.last_generate_stats
    assert stats.batch == 3 and stats.tokens == 3 * n and stats.tokens_per_s > 0


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[2]], ids=["default", "kv1-rope1d-cls3"])
def test_generation_with_a_prompt_and_device_positions(opts):
    model, _ = _opt_model(opts, 6)
    cfg = model.config
    labels = torch.tensor([1, 2])
    prompt = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    n = cfg.n_positions - 1 - 4
    cfg_scale = 2.0 if cfg.has_null_class else 1.0
    out = model.generate(prompt, n, class_labels=labels, cfg_scale=cfg_scale, top_k=6,
                         generator=torch.Generator().manual_seed(3))
    ref = generate_reference(model, prompt, n, class_labels=labels, cfg_scale=cfg_scale, top_k=6,
                             generator=torch.Generator().manual_seed(3))
    dev = _device_position_generate(model, labels, n, cfg_scale, -1, dict(top_k=6),
                                    generator=torch.Generator().manual_seed(3), prompt=prompt)
    assert out.shape == (2, 4 + n) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, ref) and torch.equal(out, dev)


def test_cfg_scale_default_comes_from_the_config():
    model, _ = _opt_model(dict(cfg_scale=3.0), 7)
    labels = torch.tensor([2, 3])
    a = model.generate(None, 6, class_labels=labels, top_k=1)
    b = model.generate(None, 6, class_labels=labels, top_k=1, cfg_scale=3.0)
    c = generate_reference(model, None, 6, class_labels=labels, top_k=1, cfg_scale=3.0)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_generate_limits_and_bad_input():
    model, _ = _opt_model({}, 8)
    labels = torch.tensor([1, 2])
    assert model.generate(None, 16, class_labels=labels, top_k=1).shape == (2, 16)  # 1 + 15 positions fed
    assert model.generate(None, 0, class_labels=labels).shape == (2, 0)
    with pytest.raises(ValueError, match="cls_token_num \\+ block_size = 17"):
        model.generate(None, 18, class_labels=labels)
    with pytest.raises(ValueError, match="cls_token_num \\+ block_size = 17"):
        model(torch.zeros(2, 17, dtype=torch.long), class_labels=labels)
    with pytest.raises(ValueError, match="class_labels is required"):
        model.generate(None, 3)
    with pytest.raises(ValueError, match="class_labels is required"):
        model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside \\[0, 6\\) or the null class 6"):
        model.generate(None, 3, class_labels=torch.tensor([7, 0]))
    with pytest.raises(ValueError, match="class -1"):
        model(torch.zeros(1, 2, dtype=torch.long), class_labels=torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer class ids"):
        model.generate(None, 3, class_labels=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="\\(B,\\) tensor"):
        model.generate(None, 3, class_labels=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        model.generate(torch.zeros(2, 1, dtype=torch.long), 3, class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cfg_scale must be a finite number >= 1"):
        model.generate(None, 3, class_labels=labels, cfg_scale=0.5)
    with pytest.raises(ValueError, match="cfg_interval must be an int >= -1"):
        model.generate(None, 3, class_labels=labels, cfg_scale=2.0, cfg_interval=-2)
    with pytest.raises(ValueError, match="embeddings"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 1, 32), class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="targets must be \\(B, 1 \\+ T\\)"):
        model(torch.zeros(1, 2, dtype=torch.long), class_labels=torch.tensor([1]), targets=torch.zeros(1, 2).long())
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        model.generate(None, 3, class_labels=labels, cuda_graph=True)
    no_null, _ = _opt_model(dict(class_dropout_prob=0.0), 8)
    with pytest.raises(ValueError, match="cfg_scale > 1 needs the null class"):
        no_null.generate(None, 3, class_labels=labels, cfg_scale=2.0)
    with pytest.raises(ValueError, match="outside \\[0, 6\\)$"):
        no_null.generate(None, 3, class_labels=torch.tensor([6]))
    mingpt = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="class_labels: a minGPT model"):
        mingpt(torch.zeros(1, 2, dtype=torch.long), class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="are for arch='llama'"):
        mingpt.generate(torch.zeros(1, 1, dtype=torch.long), 2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="idx is required"):
        mingpt.generate(None, 2)


# ---------------------------------------------------------------------------------------------------------
# Config

def test_config_checks_and_round_trip():
    cfg = GPTConfig(**{**BASE, **OPTIONS[1]}, drop_path_rate=0.1, ffn_pdrop=0.2, cfg_scale=4.0)
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="rope, rope_base belong to the llama family"):
        GPTConfig(vocab_size=5, block_size=4, n_head=2, n_embd=8, rope="1d", rope_base=3.0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        GPTConfig(**{**BASE, "num_classes": None})
    with pytest.raises(ValueError, match="block_size = 15 is not a square"):
        GPTConfig(**{**BASE, "block_size": 15})
    GPTConfig(**{**BASE, "block_size": 15, "rope": "1d"})
    with pytest.raises(ValueError, match="divisible by 4"):
        GPTConfig(**{**BASE, "n_embd": 24, "n_head": 4})
    with pytest.raises(ValueError, match="cfg_scale > 1 needs the null class"):
        GPTConfig(**{**BASE, "cfg_scale": 2.0, "class_dropout_prob": 0.0})
    with pytest.raises(ValueError, match="n_unmasked is minGPT's"):
        GPTConfig(**{**BASE, "n_unmasked": 2})
    with pytest.raises(ConfigError, match="arch must be one of 'mingpt', 'llama'"):
        GPTConfig.from_dict({**BASE, "arch": "gpt2"})
    with pytest.raises(ConfigError, match="unknown key"):
        GPTConfig.from_dict({**BASE, "dim": 3})
    assert GPTConfig(**BASE).n_positions == 17 and GPTConfig(**{**BASE, "cls_token_num": 3}).n_positions == 19


# ---------------------------------------------------------------------------------------------------------
# Training-time behaviour

def test_class_dropout_in_training_only():
    model, _ = _opt_model(dict(class_dropout_prob=0.4), 9)
    emb = model.cls_embedding
    table = emb.embedding_table.weight
    labels = torch.randint(0, 6, (4000,), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = emb(labels)[:, 0]
    null = (out == table[6]).all(-1)
    kept = (out == table[labels]).all(-1)
    assert bool((null | kept).all()) and 0.36 < float(null.float().mean()) < 0.44
    model.eval()
    with torch.no_grad():
        assert torch.equal(emb(labels)[:, 0], table[labels])
    no_null, _ = _opt_model(dict(class_dropout_prob=0.0), 9)
    no_null.train()
    assert no_null.cls_embedding.embedding_table.weight.shape[0] == 6
    with torch.no_grad():
        assert torch.equal(no_null.cls_embedding(labels)[:, 0], no_null.cls_embedding.embedding_table.weight[labels])


def test_drop_path_and_token_dropout():
    model, _ = _opt_model(dict(drop_path_rate=0.3, embd_pdrop=0.5), 10)
    rates = [layer.drop_path.p for layer in model.layers]
    assert rates == torch.linspace(0, 0.3, 2).tolist()  # LlamaGen's: from 0 at the first layer
    dp = model.layers[1].drop_path
    x = torch.randn(400, 3, 5)
    model.train()
    torch.manual_seed(1)
    y = dp(x)
    zero = (y == 0).flatten(1).all(1)
    scaled = torch.isclose(y, x / 0.7).flatten(1).all(1)
    assert bool((zero | scaled).all()) and 0.2 < float(zero.float().mean()) < 0.4
    model.eval()
    assert dp(x) is x
    idx, labels = torch.randint(0, 41, (2, 6)), torch.tensor([1, 2])
    with torch.no_grad():
        ev = model(idx, class_labels=labels)[0]
        model.train()
        torch.manual_seed(2)
        tr = model(idx, class_labels=labels)[0]
    plain, _ = _opt_model({}, 10)
    with torch.no_grad():
        assert torch.equal(ev, plain(idx, class_labels=labels)[0])  # eval: the dropouts do nothing
    assert not torch.allclose(tr, ev)


def test_training_fits_class_conditional_sequences():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=12, block_size=9, n_layer=2, n_head=2, n_embd=32, arch="llama", num_classes=3,
                    multiple_of=16, class_dropout_prob=0.0)
    model = GPT(cfg)
    seqs = torch.randint(0, 12, (3, 9))  # one sequence per class
    labels = torch.arange(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        _, loss = model(seqs[:, :-1], class_labels=labels, targets=seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert torch.equal(model.generate(None, 9, class_labels=labels, temperature=0.0), seqs)


def test_pickle_and_state_dict_round_trip():
    model, _ = _opt_model(OPTIONS[1], 11)
    clone = pickle.loads(pickle.dumps(model))
    idx, labels = torch.randint(0, 41, (2, 5)), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(clone(idx, class_labels=labels)[0], model(idx, class_labels=labels)[0])
    again = GPT(model.config)
    again.load_state_dict(model.state_dict(), strict=True)
    assert "freqs_cis" not in model.state_dict()
