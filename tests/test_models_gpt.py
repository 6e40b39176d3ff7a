"""The GPT over code indices and the two-stage VQGANTransformer: against taming-transformers' minGPT and
Net2NetTransformer (the real package; stand-in modules for its stale imports, in the tests only), cached
generation against the cache-free sampler, training, and bad input."""
import copy
import sys
import types

import pytest
import torch
import yaml

from vqkernels.models.gpt import GPT, GPTConfig, filter_logits, generate_reference, sample_next
from vqkernels.models.two_stage import VQGANTransformer, VQGANTransformerConfig
from vqkernels.testing import assert_port_close

CFG = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def taming(monkeypatch):
    """taming's modules with the two stand-ins they need today, put in sys.modules for this test only:
    `transformers.top_k_top_p_filtering` (mingpt) and `pytorch_lightning.utilities.distributed` (models).
    Absent peers (the GPU image has none) skip the comparisons."""
    pytest.importorskip("taming")
    pytest.importorskip("pytorch_lightning")
    stub = types.ModuleType("transformers")

    def _unused(*a, **k):
        raise NotImplementedError("test stand-in for transformers.top_k_top_p_filtering")

    stub.top_k_top_p_filtering = _unused
    monkeypatch.setitem(sys.modules, "transformers", stub)
    import pytorch_lightning.utilities as plu

    dist = types.ModuleType("pytorch_lightning.utilities.distributed")
    dist.rank_zero_only = plu.rank_zero_only
    monkeypatch.setitem(sys.modules, "pytorch_lightning.utilities.distributed", dist)
    from taming.modules.transformer import mingpt

    return types.SimpleNamespace(mingpt=mingpt)


def _spread_weights(model, seed=0, std=0.3):
    """Random weights larger than the init's, so that logits are far from uniform (no near-ties in argmax)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _ours(seed=0, **kw):
    torch.manual_seed(seed)
    return _spread_weights(GPT(GPTConfig(**{**CFG, **kw})), seed).eval()


# ---------------------------------------------------------------------------------------------------------
# minGPT compatibility

def test_same_seed_same_weights_as_mingpt(taming):
    torch.manual_seed(0)
    ref = taming.mingpt.GPT(**CFG)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**CFG))
    sd = ref.state_dict()
    ours_sd = ours.state_dict()
    assert set(sd) - set(ours_sd) == {f"blocks.{i}.attn.mask" for i in range(CFG["n_layer"])}
    assert set(ours_sd) <= set(sd)
    for k, v in ours_sd.items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("n_unmasked", [0, 4])
def test_loads_mingpt_strictly_same_logits_and_loss(taming, n_unmasked):
    torch.manual_seed(1)
    ref = _spread_weights(taming.mingpt.GPT(**CFG, n_unmasked=n_unmasked), 1).eval()
    ours = GPT(GPTConfig(**CFG, n_unmasked=n_unmasked)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref64 = copy.deepcopy(ref).double()
    idx = torch.randint(0, CFG["vocab_size"], (3, 13))
    targets = torch.randint(0, CFG["vocab_size"], (3, 13))
    logits_ref, loss_ref = ref(idx, targets=targets)
    logits, loss = ours(idx, targets=targets)
    logits64, loss64 = ref64(idx, targets=targets)
    # the port rule: minGPT in float64 is the truth; ours' float32 error at most 2x minGPT's own
    assert_port_close(logits, logits_ref, logits64, what="logits")
    assert_port_close(loss, loss_ref, loss64, what="loss")
    # taming's conditioning path: embeddings prepended
    emb = torch.randn(3, 3, CFG["n_embd"])
    assert_port_close(ours(idx, embeddings=emb)[0], ref(idx, embeddings=emb)[0], ref64(idx, embeddings=emb.double())[0],
                      what="logits with embeddings")


def test_state_dict_both_directions(taming):
    ours = _ours(2)
    fresh = GPT(GPTConfig(**CFG))
    fresh.load_state_dict(ours.state_dict(), strict=True)  # ours has no mask keys and needs none
    ref = taming.mingpt.GPT(**CFG).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)  # taming rebuilds its masks
    assert sorted(missing) == sorted(f"blocks.{i}.attn.mask" for i in range(CFG["n_layer"])) and not unexpected
    idx = torch.randint(0, CFG["vocab_size"], (2, 16))
    assert_port_close(fresh(idx)[0], ref(idx)[0], copy.deepcopy(ref).double()(idx)[0], what="logits")


def test_gradients_equal_reference(taming):
    """Every parameter's gradient equals minGPT's (explicit-mask attention), through the fused attention op."""
    torch.manual_seed(3)
    ref = _spread_weights(taming.mingpt.GPT(**CFG), 3, std=0.1)
    ours = GPT(GPTConfig(**CFG))
    ours.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    idx = torch.randint(0, CFG["vocab_size"], (2, 11))
    targets = torch.randint(0, CFG["vocab_size"], (2, 11))
    ref(idx, targets=targets)[1].backward()
    ours(idx, targets=targets)[1].backward()
    ref64(idx, targets=targets)[1].backward()
    ref_params, ref64_params = dict(ref.named_parameters()), dict(ref64.named_parameters())
    # the floor's scale: the largest gradient (the key biases' gradients are exactly zero in exact arithmetic,
    # softmax ignoring a shift, so only roundoff of the other terms is left in them)
    scale = max(p.grad.abs().max().item() for p in ref64.parameters())
    for name, p in ours.named_parameters():
        assert_port_close(p.grad, ref_params[name].grad, ref64_params[name].grad, what=f"{name}.grad", scale=scale)


def test_training_fits_a_repeated_sequence():
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32))
    seq = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 2)[None].repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(60):
        _, loss = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    # every next token is determined by the position, so the loss can go to 0 (it starts near ln 11 = 2.4)
    assert first > 2.0 and loss.item() < 0.05, (first, loss.item())


# ---------------------------------------------------------------------------------------------------------
# generation

SAMPLINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, top_k=10, top_p=0.9),
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_generation_equals_cache_free(sampling, prompt_len):
    model = _ours(5)
    prompt = torch.randint(0, CFG["vocab_size"], (3, prompt_len))
    n = CFG["block_size"] - prompt_len + 1  # fills the block exactly
    out = model.generate(prompt, n, generator=torch.Generator().manual_seed(7), **sampling)
    ref = generate_reference(model, prompt, n, generator=torch.Generator().manual_seed(7), **sampling)
    assert out.shape == (3, prompt_len + n) and out.dtype == torch.int64
    assert torch.equal(out[:, :prompt_len], prompt)
    assert torch.equal(out, ref)
    stats = model.last_generate_stats
    assert stats.tokens == 3 * n and stats.tokens_per_s > 0 and stats.decode_s >= 0


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_cached_generation_grouped_heads(n_kv_head):
    model = _ours(6, n_kv_head=n_kv_head)
    prompt = torch.randint(0, CFG["vocab_size"], (2, 3))
    out = model.generate(prompt, 10, top_k=8, generator=torch.Generator().manual_seed(1))
    ref = generate_reference(model, prompt, 10, top_k=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, ref)


def test_cached_generation_with_unmasked_prefix():
    model = _ours(7, n_unmasked=3)
    prompt = torch.randint(0, CFG["vocab_size"], (2, 4))
    out = model.generate(prompt, 8, generator=torch.Generator().manual_seed(2))
    ref = generate_reference(model, prompt, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="n_unmasked = 3"):
        model.generate(prompt[:, :2], 4)


@pytest.mark.parametrize("n_kv_head,prompt_len,sampling", [(None, 1, dict(top_k=8)), (2, 4, dict(top_p=0.9)),
                                                           (1, 2, dict(temperature=0.0))])
def test_device_position_decoding_equals_generate(n_kv_head, prompt_len, sampling):
    # The loop that generate(cuda_graph=True) replays as a CUDA graph, run eagerly (the same step, positions
    # held on the device): the same tokens as the host-position loop, and caches left at the right lengths.
    from vqkernels.models.gpt import sample_next
    from vqkernels.nn.attention import KVCache, inference_weights

    model = _ours(10, n_kv_head=n_kv_head)
    prompt = torch.randint(0, CFG["vocab_size"], (3, prompt_len))
    n = CFG["block_size"] - prompt_len + 1
    want = model.generate(prompt, n, generator=torch.Generator().manual_seed(9), **sampling)
    B, T0 = prompt.shape
    out = torch.empty((B, T0 + n), dtype=torch.int64)
    out[:, :T0] = prompt
    hs = CFG["n_embd"] // CFG["n_head"]
    caches = [KVCache(B, n_kv_head or CFG["n_head"], T0 + n - 1, hs) for _ in model.blocks]
    g = torch.Generator().manual_seed(9)
    kw = dict(temperature=sampling.get("temperature", 1.0), top_k=sampling.get("top_k"), top_p=sampling.get("top_p"))
    with torch.inference_mode(), inference_weights(model):
        out[:, T0] = sample_next(model._forward_cached(out[:, :T0], 0, caches), generator=g, **kw)
        model._decode_graphed(out, T0, n, caches, kw["temperature"], kw["top_k"], kw["top_p"], g, capture=False)
    assert torch.equal(out, want)
    assert all(c.lengths == [T0 + n - 1] * B and c.seqlens.tolist() == [T0 + n - 1] * B for c in caches)


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        _ours(11).generate(torch.zeros(1, 1, dtype=torch.long), 3, cuda_graph=True)


def test_generation_deterministic_under_seed():
    model = _ours(8)
    prompt = torch.zeros(4, 1, dtype=torch.long)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3))
    c = model.generate(prompt, 12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training is False
    model.train()
    model.generate(prompt, 2)
    assert model.training  # generate restores the mode


def test_generate_past_block_size_is_refused():
    model = _ours(9)
    prompt = torch.zeros(1, 10, dtype=torch.long)
    assert model.generate(prompt, 7).shape == (1, 17)  # 16 positions fed: the last token is never fed back
    with pytest.raises(ValueError, match="block_size = 16"):
        model.generate(prompt, 8)
    with pytest.raises(ValueError, match="block_size = 16"):
        model.generate(torch.zeros(1, 17, dtype=torch.long), 1)


def test_bad_input():
    model = _ours(10)
    V = CFG["vocab_size"]
    ok = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=f"token id {V}, outside the vocabulary"):
        model(torch.full((2, 3), V))
    with pytest.raises(ValueError, match="token id -1"):
        model.generate(torch.full((2, 3), -1), 2)
    with pytest.raises(ValueError, match="more than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p must be None or a number in \(0, 1\]"):
            model.generate(ok, 2, top_p=top_p)
    with pytest.raises(ValueError, match="temperature must be"):
        model.generate(ok, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be"):
        model.generate(ok, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ok, -1)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(vocab_size=5, block_size=4, n_head=3, n_embd=32)


def test_filter_logits_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 30, generator=g) * 2
    for top_k, top_p in [(1, None), (5, None), (50, None), (None, 0.5), (None, 0.95), (None, 1.0), (7, 0.6)]:
        out = filter_logits(logits, top_k, top_p)
        for row, orow in zip(logits, out):
            keep = torch.ones(30, dtype=torch.bool)
            if top_k is not None:
                keep &= row >= row.topk(min(top_k, 30)).values[-1]
            masked = row.masked_fill(~keep, float("-inf"))
            if top_p is not None:
                probs = masked.softmax(-1)
                order = probs.argsort(descending=True).tolist()
                mass, nucleus = 0.0, set()
                for i in order:  # the smallest prefix (by probability) whose mass reaches top_p
                    if mass >= top_p:
                        break
                    nucleus.add(i)
                    mass += probs[i].item()
                keep &= torch.tensor([i in nucleus for i in range(30)])
            assert torch.equal(torch.isfinite(orow), keep), (top_k, top_p)
            assert torch.equal(orow[keep], row[keep])


def test_sample_next_greedy_and_distribution():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(400)])
    freq = (draws[:, 0] == 1).float().mean().item()
    p = logits[0].softmax(-1)[1].item()
    assert abs(freq - p) < 0.08, (freq, p)
    assert sample_next(logits, 1.0, top_k=1).tolist() == [1, 0]  # one candidate left: the argmax
    assert sample_next(logits, 1.0, top_p=1e-6).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------------
# the two-stage model against taming's Net2NetTransformer

def _net2net_yaml(cond: str, n_classes: int = 5, pkeep: float = 1.0, permuter=None) -> dict:
    first = {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 8, "n_embed": 24,
        "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}
    if cond == "unconditional":
        cond_cfg = "__is_unconditional__"
    elif cond == "class":
        cond_cfg = {"target": "taming.modules.util.Labelator", "params": {"n_classes": n_classes}}
    else:
        cond_cfg = cond
    params = {"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
                  "vocab_size": 24, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}},
              "first_stage_config": first, "cond_stage_config": cond_cfg, "pkeep": pkeep,
              "first_stage_key": "image", "cond_stage_key": "class_label"}
    if permuter is not None:
        params["permuter_config"] = permuter
    if cond == "unconditional":
        params["sos_token"] = 3
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.cond_transformer.Net2NetTransformer",
                      "params": params}}


def _taming_net2net(cfg: dict, seed: int):
    import copy

    from taming.models.cond_transformer import Net2NetTransformer

    torch.manual_seed(seed)
    params = copy.deepcopy(cfg["model"]["params"])
    model = Net2NetTransformer(**params)
    # random weights everywhere (taming's init leaves pos_emb 0 and a tiny codebook)
    _spread_weights(model.transformer, seed, std=0.3)
    with torch.no_grad():
        model.first_stage_model.quantize.embedding.weight.normal_()
    return model


@pytest.mark.parametrize("cond", ["unconditional", "class"])
def test_from_taming_net2net_same_logits(taming, tmp_path, cond):
    cfg = _net2net_yaml(cond, pkeep=0.5)
    ref = _taming_net2net(cfg, 11)
    ckpt, yml = tmp_path / "last.ckpt", tmp_path / "model.yaml"
    torch.save({"state_dict": ref.state_dict(), "global_step": 3}, ckpt)
    yml.write_text(yaml.safe_dump(cfg))
    ours = VQGANTransformer.from_taming(ckpt, yml)
    assert ours.config.pkeep == 0.5 and ours.config.latent_size == (4, 4)
    assert ours.config.n_classes == (5 if cond == "class" else None)
    x = torch.randn(3, 3, 8, 8)
    c = torch.tensor([4, 0, 2]) if cond == "class" else x  # taming's unconditional model ignores c's values
    ref.eval()
    with torch.no_grad():
        logits_ref, target_ref = ref(x, c)
        logits, target = ours(x, c)
    assert torch.equal(target, target_ref)
    # the truth: taming's transformer in float64 on the same codes (the first stage's argmin is compared above,
    # exactly; a float64 first stage could break a near-tie the other way)
    ref64 = copy.deepcopy(ref).double()
    ref64.encode_to_z = lambda _x: (None, target_ref)
    with torch.no_grad():
        logits64, _ = ref64(x.double(), c)
    assert_port_close(logits, logits_ref, logits64, what="logits")
    # training mode: the same pkeep corruption from the same random stream
    ref.train()
    ours.train()
    ref64.train()
    torch.manual_seed(12)
    logits_ref, _ = ref(x, c)
    torch.manual_seed(12)
    logits, _ = ours(x, c)
    torch.manual_seed(12)
    logits64, _ = ref64(x.double(), c)
    assert_port_close(logits, logits_ref, logits64, what="logits (training mode)")
    assert not ours.first_stage_model.training  # the first stage stays frozen in eval mode
    assert not any(p.requires_grad for p in ours.first_stage_model.parameters())
    # the same conditioning tokens as taming's cond stage (class c is token c; sos_token otherwise)
    want = c[:, None] if cond == "class" else torch.full((3, 1), 3)
    assert torch.equal(ours.cond_tokens(3, c if cond == "class" else None), want)


def test_two_stage_sample_and_pretrained_round_trip(taming, tmp_path):
    cfg = _net2net_yaml("class")
    ref = _taming_net2net(cfg, 13)
    model = VQGANTransformer.from_taming(ref.state_dict(), cfg)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    codes = model.sample_codes(3, class_label=[1, 4, 4], top_k=6, generator=g())
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    prompt = torch.tensor([[1], [4], [4]])
    ref_tokens = generate_reference(model.transformer, prompt, 16, top_k=6, generator=g())
    assert torch.equal(codes.reshape(3, -1), ref_tokens[:, 1:])
    images = model.sample(3, class_label=[1, 4, 4], top_k=6, generator=g())
    assert images.shape == (3, 3, 8, 8)
    torch.testing.assert_close(images, model.first_stage_model.decode_code(codes))
    assert model.transformer.last_generate_stats.tokens == 3 * 16

    model.save_pretrained(tmp_path / "m")
    loaded = VQGANTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x, [0, 3])[0], model(x, [0, 3])[0])


def test_two_stage_bad_input(taming):
    model = VQGANTransformer.from_taming(_taming_net2net(_net2net_yaml("class"), 14).state_dict(),
                                         _net2net_yaml("class"))
    with pytest.raises(ValueError, match=r"class label 5 is outside the model's classes \[0, 5\)"):
        model.sample(2, class_label=[0, 5])
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2)
    with pytest.raises(ValueError, match="class label -1"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([-1]))
    uncond = VQGANTransformer(VQGANTransformerConfig.from_taming(_net2net_yaml("unconditional")))
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(1, class_label=2)
    assert uncond.sample(1).shape == (1, 3, 8, 8)

    subsample = {"target": "taming.modules.transformer.permuter.Subsample", "params": {"H": 4, "W": 4}}
    with pytest.raises(NotImplementedError, match="permuter_config"):
        VQGANTransformerConfig.from_taming(_net2net_yaml("unconditional", permuter=subsample))
    with pytest.raises(NotImplementedError, match="__is_first_stage__"):
        VQGANTransformerConfig.from_taming(_net2net_yaml("__is_first_stage__"))
    with pytest.raises(ValueError, match="n_classes"):
        VQGANTransformerConfig.from_taming(_net2net_yaml("class", n_classes=25))
    small = _net2net_yaml("unconditional")
    small["model"]["params"]["transformer_config"]["params"]["block_size"] = 8
    with pytest.raises(ValueError, match="block_size"):
        VQGANTransformerConfig.from_taming(small)
