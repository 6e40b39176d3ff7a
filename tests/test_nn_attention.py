"""vqkernels.nn.CausalSelfAttention and KVCache: against an SDPA-based reference module and minGPT's module,
the cache writing exactly where it should, and the cached path equal to the full one."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from vqkernels.nn import CausalSelfAttention, KVCache
from vqkernels.nn.attention import Linear, inference_weights, mingpt_mask


@pytest.fixture
def mingpt(monkeypatch):
    """taming's minGPT module; its `transformers.top_k_top_p_filtering` import needs a stand-in, put in sys.modules
    for this test only (monkeypatch takes it out again)."""
    pytest.importorskip("taming")  # absent on the GPU image: the comparisons skip there
    stub = types.ModuleType("transformers")

    def _unused(*a, **k):
        raise NotImplementedError("test stand-in for transformers.top_k_top_p_filtering")

    stub.top_k_top_p_filtering = _unused
    monkeypatch.setitem(sys.modules, "transformers", stub)
    from taming.modules.transformer import mingpt

    return mingpt


def sdpa_reference(attn: CausalSelfAttention, x: torch.Tensor, n_unmasked: int = 0) -> torch.Tensor:
    """The same function written with PyTorch's scaled_dot_product_attention and an explicit mask."""
    B, T, C = x.shape
    H, Hkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.query(x).view(B, T, H, hs).transpose(1, 2)
    k = attn.key(x).view(B, T, Hkv, hs).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = attn.value(x).view(B, T, Hkv, hs).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    mask = mingpt_mask(T, n_unmasked)[0, 0].bool()
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


# ---------------------------------------------------------------------------------------------------------
# KVCache

def test_kv_cache_writes_exactly_its_positions():
    B, Hkv, Tmax, Dh = 3, 2, 11, 5
    cache = KVCache(B, Hkv, Tmax, Dh)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    k1, v1 = torch.randn(B, Hkv, 4, Dh), torch.randn(B, Hkv, 4, Dh)
    cache.append(k1, v1)
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [4] * B
    assert torch.equal(cache.k[:, :, :4], k1) and torch.equal(cache.v[:, :, :4], v1)
    assert torch.isnan(cache.k[:, :, 4:]).all() and torch.isnan(cache.v[:, :, 4:]).all()
    k2, v2 = torch.randn(B, Hkv, 1, Dh), torch.randn(B, Hkv, 1, Dh)
    cache.append(k2, v2)
    assert torch.equal(cache.k[:, :, 4:5], k2) and torch.equal(cache.v[:, :, 4:5], v2)
    assert torch.equal(cache.k[:, :, :4], k1)
    assert torch.isnan(cache.k[:, :, 5:]).all() and torch.isnan(cache.v[:, :, 5:]).all()


def test_kv_cache_ragged_lengths():
    B, Hkv, Tmax, Dh = 3, 2, 9, 4
    cache = KVCache(B, Hkv, Tmax, Dh)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.reset([2, 0, 5])
    kn, vn = torch.randn(B, Hkv, 3, Dh), torch.randn(B, Hkv, 3, Dh)
    cache.append(kn, vn)
    assert cache.seqlens.tolist() == [5, 3, 8] and cache.lengths == [5, 3, 8]
    for b, start in enumerate([2, 0, 5]):
        assert torch.equal(cache.k[b, :, start:start + 3], kn[b])
        assert torch.equal(cache.v[b, :, start:start + 3], vn[b])
        poisoned = torch.ones(Tmax, dtype=torch.bool)
        poisoned[start:start + 3] = False
        assert torch.isnan(cache.k[b, :, poisoned]).all() and torch.isnan(cache.v[b, :, poisoned]).all()


def test_kv_cache_bounds_and_reset():
    cache = KVCache(2, 1, 4, 3)
    cache.append(torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="max_len = 4"):
        cache.append(torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3))
    assert cache.lengths == [3, 3]  # a refused append changes nothing
    with pytest.raises(ValueError, match="k_new must be"):
        cache.append(torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3))
    with pytest.raises(ValueError, match="lengths must be"):
        cache.reset([1, 5])
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0] and cache.is_empty()
    cache.append(torch.randn(2, 1, 4, 3), torch.randn(2, 1, 4, 3))
    with pytest.raises(ValueError, match="batch must be a positive int"):
        KVCache(0, 1, 4, 3)


# ---------------------------------------------------------------------------------------------------------
# CausalSelfAttention

@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, None), (4, 2), (4, 1)])
def test_forward_and_gradients_match_sdpa_reference(T, n_head, n_kv_head):
    torch.manual_seed(T * 10 + n_head + (n_kv_head or 0))
    attn = CausalSelfAttention(32, n_head, n_kv_head)
    x = torch.randn(2, T, 32, requires_grad=True)
    y = attn(x)
    y_ref = sdpa_reference(attn, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(attn.parameters()), g)
    grads_ref = torch.autograd.grad(y_ref, [x] + list(attn.parameters()), g)
    for name, a, b in zip(["x"] + [n for n, _ in attn.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n_unmasked,T", [(3, 9), (5, 5), (6, 4)])
def test_n_unmasked_prefix(n_unmasked, T):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, n_unmasked=n_unmasked)
    x = torch.randn(3, T, 16)
    torch.testing.assert_close(attn(x), sdpa_reference(attn, x, n_unmasked), atol=1e-5, rtol=1e-5)
    # the prefix really is unmasked: changing the last prefix position changes the first output
    if min(n_unmasked, T) > 1:
        x2 = x.clone()
        x2[:, min(n_unmasked, T) - 1] += 1
        assert not torch.allclose(attn(x2)[:, 0], attn(x)[:, 0])


def test_same_function_and_keys_as_mingpt(mingpt):
    cfg = mingpt.GPTConfig(50, 12, n_embd=24, n_head=3, attn_pdrop=0.0, resid_pdrop=0.0, n_unmasked=0)
    torch.manual_seed(1)
    ref = mingpt.CausalSelfAttention(cfg)
    torch.manual_seed(1)
    ours = CausalSelfAttention(24, 3)
    sd = ref.state_dict()
    assert set(sd) - set(ours.state_dict()) == {"mask"}
    for k, v in ours.state_dict().items():  # minGPT's creation order: the same seed gives the same weights
        assert torch.equal(v, sd[k]), k
    for p in ref.parameters():
        p.data.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the mask is accepted
    ours.load_state_dict(ours.state_dict(), strict=True)  # and ours, without it, too
    x = torch.randn(2, 12, 24)
    torch.testing.assert_close(ours(x), ref(x)[0], atol=1e-5, rtol=1e-5)


def test_mask_of_another_n_unmasked_is_refused(mingpt):
    cfg = mingpt.GPTConfig(50, 8, n_embd=16, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, n_unmasked=3)
    ref = mingpt.CausalSelfAttention(cfg)
    with pytest.raises(RuntimeError, match="n_unmasked = 0"):
        CausalSelfAttention(16, 2).load_state_dict(ref.state_dict())
    CausalSelfAttention(16, 2, n_unmasked=3).load_state_dict(ref.state_dict(), strict=True)
    bad = ref.state_dict()
    bad["mask"] = torch.ones(1, 8, 8)
    with pytest.raises(RuntimeError, match="mask"):
        CausalSelfAttention(16, 2, n_unmasked=3).load_state_dict(bad)


@pytest.mark.parametrize("n_kv_head", [None, 1])
@pytest.mark.parametrize("prompt", [1, 4])
def test_cached_path_equals_full_forward(n_kv_head, prompt):
    torch.manual_seed(2)
    attn = CausalSelfAttention(32, 4, n_kv_head).eval()
    B, T = 2, 9
    x = torch.randn(B, T, 32)
    with torch.inference_mode():
        full = attn(x)
        cache = KVCache(B, attn.n_kv_head, T + 2, attn.head_dim)
        cache.k.fill_(float("nan"))  # never read past the lengths
        cache.v.fill_(float("nan"))
        with attn.fused_qkv():
            outs = [attn(x[:, :prompt], cache)]
            for t in range(prompt, T):
                outs.append(attn(x[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [T] * B
    assert attn._fused is None  # the fused copy is dropped on leaving the context


def test_cached_path_with_unmasked_prefix():
    torch.manual_seed(3)
    attn = CausalSelfAttention(16, 2, n_unmasked=3).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache(2, 2, 7, 8)
        outs = [attn(x[:, :4], cache)] + [attn(x[:, t:t + 1], cache) for t in range(4, 7)]
        torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
        cache = KVCache(2, 2, 7, 8)
        attn(x[:, :2], cache)
        with pytest.raises(ValueError, match="n_unmasked = 3"):
            attn(x[:, 2:3], cache)


def test_inference_weights_same_outputs_and_dropped_after():
    torch.manual_seed(5)
    net = torch.nn.ModuleDict({"attn": CausalSelfAttention(32, 4, 2), "fc": Linear(32, 7),
                               "head": Linear(32, 5, bias=False)})
    net.eval()
    x = torch.randn(3, 6, 32)
    want = [net["attn"](x), net["fc"](x), net["head"](x)]
    with torch.no_grad(), inference_weights(net):
        assert net["attn"]._fused is not None
        got = [net["attn"](x), net["fc"](x), net["head"](x)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert net["attn"]._fused is None and net["fc"]._packed is None and net["head"]._packed is None
    assert set(net.state_dict()) == {"attn.key.weight", "attn.key.bias", "attn.query.weight", "attn.query.bias",
                                     "attn.value.weight", "attn.value.bias", "attn.proj.weight", "attn.proj.bias",
                                     "fc.weight", "fc.bias", "head.weight"}


def test_cache_path_refuses_gradients():
    attn = CausalSelfAttention(16, 2)
    x = torch.randn(1, 3, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        attn(x, KVCache(1, 2, 4, 8))


def test_attention_dropout():
    torch.manual_seed(4)
    attn = CausalSelfAttention(32, 4, attn_pdrop=0.5)
    x = torch.randn(2, 10, 32)
    attn.eval()
    torch.testing.assert_close(attn(x), sdpa_reference(attn, x), atol=1e-5, rtol=1e-5)  # eval: no dropout
    attn.train()
    y1, y2 = attn(x), attn(x)
    assert not torch.allclose(y1, y2)  # training: dropout on the probabilities
    # still causal: output 3 does not depend on inputs 4..9
    xg = x.clone().requires_grad_(True)
    attn(xg)[:, 3].sum().backward()
    assert xg.grad[:, :4].abs().sum() > 0 and torch.equal(xg.grad[:, 4:], torch.zeros_like(xg.grad[:, 4:]))
    assert attn.query.weight.grad is not None and torch.isfinite(attn.query.weight.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of n_head"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        CausalSelfAttention(32, 4, 3)
    with pytest.raises(ValueError, match="attn_pdrop"):
        CausalSelfAttention(32, 4, attn_pdrop=1.0)


def test_kv_cache_device_position_writes_only_there():
    # at_position: one position per append, at the device-held pos (advanced by the caller), lengths = pos + 1
    cache = KVCache(2, 3, 8, 4)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.append(torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4))  # a prompt of 2, the usual way
    pos = torch.tensor([2])
    with cache.at_position(pos, 2):
        for i in (2, 3, 4):
            pos.fill_(i)
            cache.append(torch.full((2, 3, 1, 4), float(i)), torch.full((2, 3, 1, 4), -float(i)))
            assert cache.seqlens.tolist() == [i + 1, i + 1]
        with pytest.raises(ValueError, match=r"\(B, Hkv, 1, Dh\)"):
            cache.append(torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4))
    assert cache.lengths == [2, 2]  # the host mirror is the caller's to set
    cache.reset([5, 5])
    for i in (2, 3, 4):
        assert (cache.k[:, :, i] == i).all() and (cache.v[:, :, i] == -i).all()
    assert (cache.k[:, :, :2] == 0).all() and torch.isnan(cache.k[:, :, 5:]).all()  # nothing else written
    with pytest.raises(ValueError, match="int64 \\(1,\\) tensor"):
        with cache.at_position(torch.tensor([1, 2]), 5):
            pass
    with pytest.raises(ValueError, match="every sequence must have length 4"):
        with cache.at_position(torch.tensor([4]), 4):
            pass
