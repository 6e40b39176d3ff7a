"""The two-stage model over a LlamaGen tokenizer and a LLaMA-family (LlamaGen c2i) GPT.

What LlamaGen's sample_c2i.py does, as facts from its code (autoregressive/sample/sample_c2i.py, models/generate.py):
the GPT is built with ``vocab_size = codebook_size`` and ``block_size = latent_size ** 2``; ``generate(gpt, labels,
latent_size ** 2, cfg_scale=, cfg_interval=, temperature=, top_k=, top_p=)`` returns the (B, latent_size ** 2)
codes; with cfg_scale > 1 every row also runs with the null class ``num_classes`` and the token comes from
``uncond + (cond - uncond) * cfg_scale``, from the conditional logits alone once the decode step i (the token after
the first is step 0) exceeds cfg_interval (> -1); the null rows are fed the conditional rows' tokens; then
``vq_model.decode_code(codes, (B, codebook_embed_dim, latent_size, latent_size))``. The tokenizer's and GPT's own
agreement with LlamaGen is tested in test_models_llamagen_vq.py and the GPT's tests.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")

from vqkernels.models import GPT, GPTConfig, VQGANConfig, VQGANTransformer, VQGANTransformerConfig, VQModel  # noqa: E402

# a LlamaGen tokenizer with 2x downsampling (8x8 images -> 4x4 codes) and a 2-layer c2i GPT over its 64 codes
VQ_ARGS = {"encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2], "codebook_size": 64, "codebook_embed_dim": 8,
           "z_channels": 32}
GPT_ARGS = {"dim": 32, "n_layer": 2, "n_head": 2, "multiple_of": 32, "num_classes": 5, "block_size": 16}
N_CLASSES = 5


def _spread(module: torch.nn.Module, seed: int, std: float) -> None:
    """Random weights large enough that the logits are far from uniform (so sampling options matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """LlamaGen-format checkpoints (weights under 'model', as its training scripts save them) on disk."""
    d = tmp_path_factory.mktemp("llamagen")
    vq = VQModel(VQGANConfig.from_llamagen(VQ_ARGS))
    _spread(vq, 1, 0.05)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(2))
    gpt = GPT(GPTConfig(arch="llama", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, multiple_of=32,
                        num_classes=N_CLASSES, embd_pdrop=0.1, resid_pdrop=0.1, ffn_pdrop=0.1))
    _spread(gpt, 3, 0.3)
    vq_path, gpt_path = d / "vq.pt", d / "gpt.pt"
    torch.save({"model": vq.state_dict(), "steps": 10}, vq_path)
    torch.save({"model": gpt.state_dict(), "steps": 10}, gpt_path)
    return vq_path, gpt_path


@pytest.fixture(scope="module")
def model(pair):
    vq_path, gpt_path = pair
    return VQGANTransformer.from_llamagen(vq_path, VQ_ARGS, gpt_path, GPT_ARGS)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_from_llamagen_pair(model, pair):
    vq_path, gpt_path = pair
    cfg = model.config
    assert model.is_llama and model.conditional and not model.training
    assert cfg.latent_size == (4, 4) and cfg.n_classes == N_CLASSES
    assert cfg.gpt.vocab_size == 64  # sample_c2i.py: vocab_size = codebook_size
    vq_sd, gpt_sd = torch.load(vq_path)["model"], torch.load(gpt_path)["model"]
    for k, v in model.first_stage_model.state_dict().items():
        assert torch.equal(v, vq_sd[k]), k
    for k, v in model.transformer.state_dict().items():
        assert torch.equal(v, gpt_sd[k]), k
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())


@pytest.mark.parametrize("kw", [dict(cfg_scale=2.5, top_k=10, temperature=0.8),
                                dict(cfg_scale=4.0, cfg_interval=3, top_p=0.9),
                                dict(top_k=20)])
def test_sample_is_the_gpts_codes_decoded(model, kw):
    labels = [0, 4, 2]
    images = model.sample(3, class_label=labels, generator=_g(7), **kw)
    codes = model.transformer.generate(None, 16, class_labels=torch.tensor(labels), generator=_g(7), **kw)
    assert codes.shape == (3, 16)
    assert torch.equal(model.sample_codes(3, class_label=labels, generator=_g(7), **kw), codes.view(3, 4, 4))
    # sample_c2i.py: vq_model.decode_code(index_sample, qzshape)
    torch.testing.assert_close(images, model.first_stage_model.decode_code(codes.view(3, 4, 4)), rtol=0, atol=0)
    assert images.shape == (3, 3, 8, 8)


def _greedy_reference(gpt, labels, n, cfg_scale, cfg_interval):
    """LlamaGen's generate with top_k=1, written as a cache-free loop in float64."""
    gpt = gpt.double() if next(gpt.parameters()).dtype != torch.float64 else gpt
    null = torch.full_like(labels, N_CLASSES)
    seq = torch.empty((labels.shape[0], 0), dtype=torch.int64)
    for t in range(n):
        cond = gpt(seq, class_labels=labels)[0][:, -1]
        if cfg_scale > 1:
            uncond = gpt(seq, class_labels=null)[0][:, -1]  # the null rows see the conditional rows' tokens
            step = t - 1  # decode step of token t (the first token is the prefill's)
            if cfg_interval == -1 or step <= cfg_interval:
                cond = uncond + (cond - uncond) * cfg_scale
        seq = torch.cat([seq, cond.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (3.0, 5)])
def test_guided_greedy_codes_as_llamagen(model, cfg_scale, cfg_interval):
    import copy

    labels = torch.tensor([1, 3, 0, 4])
    ours = model.sample_codes(4, class_label=labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, top_k=1)
    ref = _greedy_reference(copy.deepcopy(model.transformer).eval(), labels, 16, cfg_scale, cfg_interval)
    assert torch.equal(ours.view(4, 16), ref)
    if cfg_scale > 1:  # guidance changes the codes (so the comparison above sees it)
        plain = model.sample_codes(4, class_label=labels, top_k=1)
        assert not torch.equal(plain, ours)


def test_forward_and_training_loss(model):
    x = torch.randn(3, 3, 8, 8, generator=_g(4))
    c = torch.tensor([2, 0, 4])
    with torch.no_grad():
        logits, target = model(x, c)
        assert torch.equal(target, model.first_stage_model.tokenize(x).view(3, 16))
        want, _ = model.transformer(target[:, :-1], class_labels=c)  # the class, then codes 0..14
        torch.testing.assert_close(logits, want, rtol=0, atol=0)
        assert logits.shape == (3, 16, 64)
        other, _ = model(x, torch.tensor([1, 1, 1]))
        assert not torch.allclose(other, logits)  # the class embedding is used
        loss = model.training_loss(x, c)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want.reshape(-1, 64), target.reshape(-1)))


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    back = VQGANTransformer.from_pretrained(tmp_path / "m")
    assert back.config == model.config and back.is_llama
    a = model.sample(2, class_label=3, cfg_scale=2.0, top_k=5, generator=_g(9))
    b = back.sample(2, class_label=3, cfg_scale=2.0, top_k=5, generator=_g(9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    d = model.config.to_dict()
    assert VQGANTransformerConfig.from_dict(d) == model.config


def test_bad_input(model):
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2)
    with pytest.raises(ValueError, match=r"class label 6 is outside the model's classes \[0, 5\) and its null class 5"):
        model.sample(2, class_label=[0, 6])
    assert model.sample_codes(1, class_label=N_CLASSES, top_k=1).shape == (1, 4, 4)  # the null class: unconditional
    with pytest.raises(ValueError, match="no conditioning token"):
        model.cond_tokens(2, [0, 1])
    gpt, vq = model.config.gpt, model.config.vqgan
    with pytest.raises(ValueError, match="latent_size must be that grid"):
        VQGANTransformerConfig(gpt=gpt, vqgan=vq, latent_size=(2, 8))
    with pytest.raises(ValueError, match=r"n_classes \(7\) must be the llama GPT's num_classes \(5\)"):
        VQGANTransformerConfig(gpt=gpt, vqgan=vq, n_classes=7)
    with pytest.raises(ValueError, match="sos_token is for a minGPT model"):
        VQGANTransformerConfig(gpt=gpt, vqgan=vq, sos_token=3)
    with pytest.raises(ValueError, match="must cover the VQGAN's 128 codes"):
        VQGANTransformerConfig(gpt=gpt, vqgan=VQGANConfig.from_llamagen({**VQ_ARGS, "codebook_size": 128}))
    with pytest.raises(ValueError, match="gpt_checkpoint is required"):
        VQGANTransformer.from_llamagen({}, VQ_ARGS)


def test_mingpt_two_stage_refuses_guidance():
    vq = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=16,
                     n_embed=16, embed_dim=8)
    m = VQGANTransformer(VQGANTransformerConfig(
        gpt=GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16), vqgan=vq))
    assert not m.is_llama and m.config.latent_size == (4, 4)
    with pytest.raises(ValueError, match="need a llama GPT"):
        m.sample(1, cfg_scale=2.0)
    assert m.sample(1, top_k=3).shape == (1, 3, 8, 8)
