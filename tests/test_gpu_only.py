"""Cases that only mean something on a GPU (issue 14): non-default streams, CUDA-graph capture, offsets past
2^31, TF32 on every path of the kernels, and the autotuned Triton configurations.

They skip here (no CUDA device) with the reason, and run in the GPU check's ``tests-search`` stage
(scripts/gpu_check.sh). Correctness is checked with the same tie-aware oracle as the other tests.
"""
import pytest
import torch

import vqkernels
from vqkernels.testing import check_nearest, make_inputs

from helpers import HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (streams, graphs and TF32 exist only there)")
GPU_BACKENDS = ["cuda", "triton"]


def _free_gb() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nearest_code_on_a_side_stream_matches_the_default_stream(backend):
    x, cb = make_inputs(3001, 1031, 64, torch.float16, "cuda", seed=1)
    ref = vqkernels.nearest_code(x, cb, backend=backend)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # Work queued on the side stream only: a kernel launched on the default stream would race the copy.
        x2, cb2 = x.clone(), cb.clone()
        got = vqkernels.nearest_code(x2, cb2, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_vq_loss_on_a_side_stream_matches_the_default_stream(backend):
    z = torch.randn(4, 257, 32, device="cuda")
    cb = torch.randn(300, 32, device="cuda")
    idx = vqkernels.nearest_code(z, cb, backend=backend)
    zq, loss = vqkernels.vq_loss(z, cb, idx, backend=backend)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        zq2, loss2 = vqkernels.vq_loss(z.clone(), cb.clone(), idx.clone(), backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(zq2, zq, rtol=0, atol=0)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)


def _capture(fn):
    """Warm ``fn`` up on a side stream (as the CUDA-graph docs ask), capture it, return (graph, outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_quantizer_step_is_graph_capturable(backend):
    """nearest_code + vq_loss forward and backward + code_stats inside one CUDA graph: no host synchronisation."""
    z = torch.randn(2, 129, 64, device="cuda", requires_grad=True)
    cb = torch.randn(257, 64, device="cuda", requires_grad=True)

    def step():
        idx = vqkernels.nearest_code(z.detach(), cb.detach(), backend=backend)
        zq, loss = vqkernels.vq_loss(z, cb, idx, backend=backend)
        gz, gcb = torch.autograd.grad((zq.square().sum() + loss,), (z, cb))
        counts, _ = vqkernels.code_stats(z.detach(), idx, 257, backend=backend)
        return idx, loss, gz, gcb, counts

    g, (idx, loss, gz, gcb, counts) = _capture(step)
    with torch.no_grad():
        z.add_(0.5)  # new inputs, same buffers: the replay must see them
    g.replay()
    torch.cuda.synchronize()
    ref = step()
    for a, b, name in zip((idx, loss, gz, gcb, counts), ref, ("idx", "loss", "grad_z", "grad_codebook", "counts")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cached_decoding_is_graph_capturable(backend):
    attention_with_kv_cache = pytest.importorskip("vqkernels.ops.attention").attention_with_kv_cache
    B, H, Hkv, Tmax, Dh = 4, 8, 2, 512, 64
    kc = torch.randn(B, Hkv, Tmax, Dh, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, H, 1, Dh, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([1, 100, 300, 512], dtype=torch.int32, device="cuda")
    g, out = _capture(lambda: attention_with_kv_cache(q, kc, vc, lens, backend=backend))
    lens.copy_(torch.tensor([7, 200, 511, 2], dtype=torch.int32))  # the graph reads the lengths on the device
    g.replay()
    torch.cuda.synchronize()
    ref = attention_with_kv_cache(q, kc, vc, lens, backend="torch")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_gpt_generate_as_a_cuda_graph_equals_eager():
    """generate(cuda_graph=True): the decoding step captured once (no capture warning) and replayed per token gives
    the tokens of the eager loop (greedy: no sampling noise; and sampled under one seed)."""
    import warnings

    from vqkernels.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=3, n_head=4, n_embd=128, n_kv_head=2))
    model = model.to("cuda")  # float32: the same kernels either way, so the same tokens
    prompt = torch.randint(0, 256, (4, 3), device="cuda")
    for kw in (dict(temperature=0.0), dict(top_k=20)):
        eager = model.generate(prompt, 50, generator=torch.Generator("cuda").manual_seed(1), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture warns and decodes eagerly: that must not happen here
            graphed = model.generate(prompt, 50, generator=torch.Generator("cuda").manual_seed(1), cuda_graph=True,
                                     **kw)
        assert torch.equal(graphed, eager), kw


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nearest_code_rows_past_2_to_the_31_elements(backend):
    """N * D >= 2^31: every offset into x must be 64-bit. Checks a sample of rows, the last ones included."""
    D = 64
    N = 2**31 // D + 4099
    if _free_gb() < N * D * 2 / 2**30 + 4:
        pytest.skip("not enough free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(N, D, device="cuda", dtype=torch.float16, generator=g)
    cb = torch.randn(1000, D, device="cuda", dtype=torch.float16, generator=g)
    idx = vqkernels.nearest_code(x, cb, backend=backend)
    rows = torch.cat([torch.arange(0, 4096), torch.arange(N - 8192, N),
                      torch.randint(0, N, (4096,), generator=torch.Generator().manual_seed(0))]).cuda()
    check_nearest(x[rows], cb, idx[rows])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nearest_code_codebook_past_2_to_the_31_elements(backend):
    """K * D >= 2^31: offsets into the codebook must be 64-bit. The nearest codes are planted at the end."""
    D = 64
    K = 2**31 // D + 1031
    if _free_gb() < K * D * 2 / 2**30 + 4:
        pytest.skip("not enough free GPU memory")
    cb = torch.full((K, D), 100.0, device="cuda", dtype=torch.float16)
    x = torch.randn(37, D, device="cuda", dtype=torch.float16)
    want = torch.arange(K - 37, K, device="cuda")
    cb[want] = x  # distance 0, far below every other code's
    idx = vqkernels.nearest_code(x, cb, backend=backend)
    torch.testing.assert_close(idx, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(513, 1003, 200), (257, 131, 67), (64, 4099, 129), (1000, 16384, 256)],
                         ids=lambda s: "N%d-K%d-D%d" % s)
def test_tf32_on_every_path(backend, shape):
    """TF32 on the streamed D > 128 path, unaligned D and K tails (the D = 64 case is in test_nearest_code)."""
    N, K, D = shape
    x, cb = make_inputs(N, K, D, torch.float32, "cuda", seed=N + K + D)
    idx, dist = vqkernels.nearest_code(x, cb, backend=backend, allow_tf32=True, return_distance=True)
    check_nearest(x, cb, idx, dist, precision="tf32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8192, 1024, 256), (65536, 512, 64), (300, 16384, 8)],
                         ids=lambda s: "N%d-K%d-D%d" % s)
def test_triton_autotuned_configurations_are_correct(dtype, shape):
    """The benchmark sizes go through Triton's autotuner (maxnreg=128 among the configs): every config it may
    keep must give correct answers, so check the answer at sizes where each config family wins."""
    N, K, D = shape
    x, cb = make_inputs(N, K, D, dtype, "cuda", seed=3)
    idx, dist = vqkernels.nearest_code(x, cb, backend="triton", return_distance=True)
    rows = torch.arange(0, N, max(1, N // 2048), device="cuda")
    check_nearest(x[rows], cb, idx[rows], dist[rows])


_BAD_INDEX_SCRIPT = r"""
import torch, vqkernels
z = torch.randn(2, 9, 8, device="cuda"); cb = torch.randn(5, 8, device="cuda")
idx = torch.zeros(2, 9, dtype=torch.int64, device="cuda"); idx[1, 3] = 7
zq, loss = vqkernels.vq_loss(z, cb, idx, backend="cuda")   # queues the work: no wait here
torch.cuda.synchronize()                                    # the device-side check fires now
print("NO ERROR")
"""


def test_cuda_out_of_range_index_is_caught_on_the_device():
    """Without a host sync, a bad index stops the op's range-check kernel (a device-side error, as torch's
    embedding): in a subprocess, since such an error ends the CUDA context."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _BAD_INDEX_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "NO ERROR" not in r.stdout, r.stdout + r.stderr
    assert "indices out of range: got index 7" in r.stdout + r.stderr


def test_cuda_sync_index_check_raises_index_error(monkeypatch):
    monkeypatch.setenv("VQKERNELS_SYNC_INDEX_CHECK", "1")
    z = torch.randn(2, 9, 8, device="cuda")
    cb = torch.randn(5, 8, device="cuda")
    idx = torch.zeros(2, 9, dtype=torch.int64, device="cuda")
    idx[0, 0] = -2
    with pytest.raises(IndexError, match="indices out of range: got index -2"):
        vqkernels.vq_loss(z, cb, idx, backend="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_quantizer_modules_on_the_gpu_match_the_cpu(backend):
    """The drop-in modules' GPU path (the peers are absent on the GPU image: this needs none): a training step
    of VectorQuantizer and of the EMA VectorQuantize on CUDA gives the CPU's indices, loss and gradients."""
    torch.manual_seed(0)
    z = torch.randn(2, 16, 5, 7)
    for make in (lambda: vqkernels.VectorQuantizer(37, 16, beta=0.25),
                 lambda: vqkernels.VectorQuantize(dim=16, codebook_size=37, decay=0.9)):
        torch.manual_seed(1)
        cpu_mod = make()
        gpu_mod = make().cuda()
        gpu_mod.load_state_dict(cpu_mod.state_dict())
        outs = []
        for mod, dev in ((cpu_mod, "cpu"), (gpu_mod, "cuda")):
            x = z.to(dev) if isinstance(mod, vqkernels.VectorQuantizer) else z.flatten(2).transpose(1, 2).to(dev)
            x = x.clone().requires_grad_()
            with vqkernels.use_backend("auto" if dev == "cpu" else backend):
                out = mod(x)
            q, loss = out[0], out[1] if isinstance(mod, vqkernels.VectorQuantizer) else out[2]
            (q.square().sum() + loss).backward()
            idx = out[2][2] if isinstance(mod, vqkernels.VectorQuantizer) else out[1]
            outs.append((q.detach().cpu(), loss.detach().cpu(), x.grad.cpu(), idx.cpu()))
        (qa, la, ga, ia), (qb, lb, gb, ib) = outs
        torch.testing.assert_close(ib, ia, rtol=0, atol=0)
        torch.testing.assert_close(qb, qa, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
