"""nearest_code: every backend against the reference, tie-aware, on fresh random inputs and odd shapes.

The same test bodies run every backend where it can run: here (no GPU) the torch reference, the C++
cpu kernel and the Triton kernel under its interpreter; on a GPU machine also the cuda kernel and
Triton compiled for the device. A backend that cannot run here is skipped with the reasons the
dispatcher gives.
"""

import pytest
import torch

import vqkernels
from vqkernels import BackendNotSupported, _backend, nearest_code
from vqkernels.ops import nearest_code as nc
from vqkernels.testing import check_nearest, exact_distances, make_inputs

from helpers import BACKENDS, HAS_CUDA, device_for, with_threads  # noqa: E402
from helpers import require as require_op  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def require(backend, x, cb, metric="l2", allow_tf32=False):
    """Skip, with the dispatcher's reasons, when ``backend`` cannot run nearest_code on these inputs here."""
    require_op(nc.OP, backend, x=x.reshape(-1, x.shape[-1]), codebook=cb, metric=nc.METRICS[metric],
               allow_tf32=allow_tf32)


def run(backend, x, cb, **kw):
    require(backend, x, cb, kw.get("metric", "l2"), kw.get("allow_tf32", False))
    return nearest_code(x, cb, backend=backend, return_distance=True, **kw)


# (N, K, D): D in 1, 3, 8, 255, 256, 1000; K from 1 to 65536; N including 0 and 1.
SHAPES = [
    (0, 5, 8),
    (1, 1, 1),
    (1, 17, 3),
    (3, 16, 8),
    (333, 1, 8),
    (333, 17, 1),
    (257, 1000, 8),
    (129, 4097, 3),
    (65, 300, 255),
    (200, 130, 256),
    (33, 70, 1000),
    (5, 65536, 8),
]
# The Triton interpreter runs tiles in numpy: keep its share of the matrix small.
INTERP_SHAPES = {(0, 5, 8), (1, 1, 1), (1, 17, 3), (3, 16, 8), (333, 17, 1), (257, 1000, 8), (65, 300, 255),
                 (33, 70, 1000)}


def _skip_slow_interp(backend, shape, dtype=torch.float32):
    if backend == "triton" and device_for("triton") == "cpu":
        if shape not in INTERP_SHAPES:
            pytest.skip("shape too slow for the Triton interpreter; runs on a GPU")
        if dtype != torch.float32 and shape[1] * shape[2] > 20000:
            pytest.skip("low-precision shape too slow for the Triton interpreter; runs on a GPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d-K%d-D%d" % s)
def test_l2_matches_reference(backend, dtype, shape):
    _skip_slow_interp(backend, shape, dtype)
    N, K, D = shape
    x, cb = make_inputs(N, K, D, dtype, device_for(backend), seed=N * 7 + K * 3 + D)
    idx, dist = run(backend, x, cb)
    check_nearest(x, cb, idx, dist)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(1, 1, 3), (100, 33, 8), (64, 513, 64), (40, 100, 256)],
                         ids=lambda s: "N%d-K%d-D%d" % s)
def test_cosine_matches_reference(backend, dtype, shape):
    N, K, D = shape
    x, cb = make_inputs(N, K, D, dtype, device_for(backend), seed=11 + D)
    x = x * torch.rand(N, 1, device=x.device).to(dtype) * 5  # norms must not matter
    idx, dist = run(backend, x, cb, metric="cosine")
    check_nearest(x, cb, idx, dist, metric="cosine")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 8, 64, 255])
def test_well_separated_codes_give_exact_indices(backend, D):
    """Where codes are far apart, the index itself (not just its distance) must equal the reference's."""
    g = torch.Generator().manual_seed(D)
    K, N = 300, 500
    dev = device_for(backend)
    cb = (torch.randn(K, D, generator=g) * 10)
    if D == 1:
        cb = torch.arange(K, dtype=torch.float32)[:, None] * 3.0
    target = torch.randint(0, K, (N,), generator=g)
    x = cb[target] + 0.01 * torch.randn(N, D, generator=g)
    idx = run(backend, x.to(dev), cb.to(dev))[0]
    assert torch.equal(idx.cpu(), target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_exact_ties_pick_the_lowest_index(backend, dtype):
    """Planted duplicate codes: among exactly equal scores the lowest index wins, as torch.argmin.

    The data are small integers (|code| <= 3, |x| <= 4, D = 16): every value is exact in bf16/fp16,
    and every product, norm and partial sum is an integer below 2^11, exact in any summation order
    and any precision the kernels accumulate in. So the scores of identical codes are bit-identical
    whatever the arithmetic underneath (e.g. the interpreter's tl.dot is numpy's BLAS, whose results
    for equal columns differ by position under some OPENBLAS_CORETYPE), and a failure here can only
    be a tie-breaking bug. Integer data also make distinct codes tie often, which is stressed too.
    """
    g = torch.Generator().manual_seed(5)
    K, D, N = 600, 16, 300
    base = torch.randint(-3, 4, (K, D), generator=g).float()
    # codes k and k + 300 are identical, and so are the copies spread across code tiles
    base[300:] = base[:300]
    base[599] = base[7]
    dev = device_for(backend)
    cb = base.to(dtype).to(dev)
    pick = torch.randint(0, 300, (N,), generator=g)
    x = (base[pick] + torch.randint(-1, 2, (N, D), generator=g).float()).to(dtype).to(dev)
    idx, dist = run(backend, x, cb)
    check_nearest(x, cb, idx, dist)
    assert int(idx.max()) < 300, "a duplicate with a higher index won a tie"
    # exact scores: the answer is exactly torch.argmin's (the first minimum) over float64 distances
    assert torch.equal(idx.cpu(), exact_distances(x.cpu(), cb.cpu()).argmin(1)), "not the lowest index among ties"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_batched_x(backend):
    dev = device_for(backend)
    x, cb = make_inputs(37, 50, 24, torch.float32, dev, seed=3, noncontiguous=True, lead=(2, 3))
    assert x.shape == (2, 3, 37, 24) and not x.is_contiguous()
    idx, dist = run(backend, x, cb)
    assert idx.shape == (2, 3, 37) and dist.shape == (2, 3, 37)
    check_nearest(x, cb, idx, dist)
    ref = nearest_code(x.contiguous(), cb, backend="torch")
    d = exact_distances(x, cb)
    assert torch.allclose(d.gather(1, idx.reshape(-1, 1).cpu()), d.gather(1, ref.reshape(-1, 1).cpu()), atol=1e-4)
    # a non-contiguous codebook (a transposed copy) too
    cbt = cb.T.contiguous().T
    assert not cbt.is_contiguous()
    idx2 = run(backend, x, cbt)[0]
    check_nearest(x, cb, idx2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_vector_x(backend):
    dev = device_for(backend)
    x, cb = make_inputs(1, 40, 6, torch.float32, dev, seed=9)
    idx, dist = run(backend, x[0], cb)
    assert idx.shape == () and dist.shape == ()
    check_nearest(x[0], cb, idx, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf32_mode_is_close(backend):
    dev = device_for(backend)
    x, cb = make_inputs(200, 300, 64, torch.float32, dev, seed=21)
    idx, dist = run(backend, x, cb, allow_tf32=True)
    check_nearest(x, cb, idx, dist, precision="tf32")


# ---------------------------------------------------------------------------------------------
# Non-finite input: a documented, consistent result on every backend.

@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_codes_never_win_for_finite_rows(backend):
    dev = device_for(backend)
    x, cb = make_inputs(50, 40, 8, torch.float32, "cpu", seed=4)
    cb[3] = float("nan")
    cb[5, 2] = float("inf")
    cb[0] = x[0]  # would be the best code for row 0 ...
    cb[0, 1] = float("nan")  # ... but it holds a NaN
    idx, dist = run(backend, x.to(dev), cb.to(dev))
    idx = idx.cpu()
    assert not ({0, 3, 5} & set(idx.tolist()))
    finite = torch.ones(40, dtype=torch.bool)
    finite[[0, 3, 5]] = False
    sub = torch.nonzero(finite).squeeze(1)
    check_nearest(x, cb[finite], torch.searchsorted(sub, idx), dist.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_get_a_valid_index_and_nan_distance(backend):
    dev = device_for(backend)
    x, cb = make_inputs(20, 30, 8, torch.float32, "cpu", seed=6)
    x[4, 2] = float("nan")
    x[7] = float("nan")
    idx, dist = run(backend, x.to(dev), cb.to(dev))
    idx, dist = idx.cpu(), dist.cpu()
    assert int(idx.min()) >= 0 and int(idx.max()) < 30
    assert torch.isnan(dist[4]) and torch.isnan(dist[7])
    ok = torch.ones(20, dtype=torch.bool)
    ok[[4, 7]] = False
    check_nearest(x[ok], cb, idx[ok], dist[ok])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_codes_nan_gives_index_zero(backend):
    dev = device_for(backend)
    x, cb = make_inputs(9, 5, 4, torch.float32, "cpu", seed=1)
    cb[:] = float("nan")
    idx, _ = run(backend, x.to(dev), cb.to(dev))
    assert idx.cpu().tolist() == [0] * 9


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, on every backend.

@pytest.mark.parametrize("backend", BACKENDS + [None])
def test_bad_input_errors(backend):
    x = torch.randn(10, 8)
    cb = torch.randn(5, 8)
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        nearest_code(x, cb[0], backend=backend)
    with pytest.raises(ValueError, match="at least one dimension"):
        nearest_code(torch.tensor(1.0), cb, backend=backend)
    with pytest.raises(ValueError, match=r"last dimension of x \(7\)"):
        nearest_code(torch.randn(10, 7), cb, backend=backend)
    with pytest.raises(TypeError, match="share a dtype"):
        nearest_code(x, cb.double(), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        nearest_code(torch.ones(10, 8, dtype=torch.int32), cb, backend=backend)
    with pytest.raises(TypeError, match="codebook must be a floating-point"):
        nearest_code(x, torch.ones(5, 8, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match="one device"):
        nearest_code(x, cb.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="at least one code"):
        nearest_code(x, torch.empty(0, 8), backend=backend)
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest_code(x, cb, metric="dot", backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        nearest_code(x.numpy(), cb, backend=backend)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        nearest_code(torch.randn(3, 4), torch.randn(2, 4), backend="numpy")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_c_kernels_check_their_own_arguments(backend):
    """The C++ ops are callable directly (torch.ops.vqkernels_C); they must reject bad input themselves."""
    if _backend.c_extension() is None:
        pytest.skip("vqkernels._C was not built")
    if backend == "cuda" and not _backend.has_cuda_kernels():
        pytest.skip("_C was built without CUDA kernels")
    op = torch.ops.vqkernels_C.nearest_code
    dev = "cpu" if backend == "cpu" else ("cuda" if HAS_CUDA else "cpu")
    if backend == "cuda" and not HAS_CUDA:
        # CPU tensors must not reach the CUDA kernel: the dispatcher routes them to the CPU impl,
        # which is fine; nothing more to check without a GPU.
        pytest.skip("needs a CUDA GPU")
    with pytest.raises(RuntimeError, match="D="):
        op(torch.randn(4, 3, device=dev), torch.randn(5, 4, device=dev), 0, False)
    with pytest.raises(RuntimeError, match="at least one code"):
        op(torch.randn(4, 3, device=dev), torch.randn(0, 3, device=dev), 0, False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(torch.randn(4, 3, device=dev), torch.randn(5, 3, device=dev, dtype=torch.float16), 0, False)
    with pytest.raises(RuntimeError, match="metric"):
        op(torch.randn(4, 3, device=dev), torch.randn(5, 3, device=dev), 7, False)


# ---------------------------------------------------------------------------------------------
# torch.library integration

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = device_for(backend)
    x, cb = make_inputs(37, 19, 12, torch.float32, dev, seed=2)
    require(backend, x, cb)
    torch.library.opcheck(nc._nearest_code_op, (x, cb, 0, False, backend))
    torch.library.opcheck(nc._nearest_code_op, (x[:0], cb, 1, False, backend))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    x, cb = make_inputs(64, 33, 16, torch.float32, dev, seed=8, lead=(2,))
    require(backend, x, cb)

    def f(x, cb):
        idx, dist = nearest_code(x, cb, backend=backend, return_distance=True)
        return idx + 1, dist * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    i1, d1 = compiled(x, cb)
    i0, d0 = f(x, cb)
    assert torch.equal(i1, i0) and torch.allclose(d1, d0)


def test_gradients_do_not_flow_through_the_search():
    x = torch.randn(10, 4, requires_grad=True)
    cb = torch.randn(6, 4, requires_grad=True)
    idx, dist = nearest_code(x, cb, return_distance=True)
    assert not idx.requires_grad and not dist.requires_grad


# ---------------------------------------------------------------------------------------------
# The cpu kernel: results do not depend on the thread count.

def test_cpu_kernel_is_thread_count_independent():
    x, cb = make_inputs(3000, 1500, 40, torch.float32, "cpu", seed=12)
    cb[1400] = cb[3]  # a planted tie across far-apart code tiles
    require("cpu", x, cb)
    (i1, d1), (i2, d2) = with_threads(lambda: nearest_code(x, cb, backend="cpu", return_distance=True))
    assert torch.equal(i1, i2) and torch.equal(d1, d2)
    check_nearest(x, cb, i1, d1)


def test_reference_memory_is_bounded_by_chunks():
    """The reference never forms N x K at once: a tiny tile budget still gives the same answer."""
    from vqkernels.ops.nearest_code.reference import nearest_code_reference

    x, cb = make_inputs(100, 70, 5, torch.float32, "cpu", seed=30)
    i_small, d_small = nearest_code_reference(x, cb, 0, False, max_tile_elems=7)
    i_big, d_big = nearest_code_reference(x, cb, 0, False)
    assert torch.equal(i_small, i_big) and torch.allclose(d_small, d_big)
    check_nearest(x, cb, i_small, d_small)


def test_float64_runs_on_the_reference_only():
    x, cb = make_inputs(20, 9, 5, torch.float64, "cpu", seed=2)
    idx, dist = nearest_code(x, cb, backend="torch", return_distance=True)
    check_nearest(x, cb, idx, dist)
    if _backend.has_cpu_kernels():
        with pytest.raises(BackendNotSupported, match="float64"):
            nearest_code(x, cb, backend="cpu")
    assert vqkernels.nearest_code(x, cb).shape == (20,)  # auto falls back to a capable backend


# ---------------------------------------------------------------------------------------------
# The cpu kernel on every boundary of its tiling (4-row micro-tiles, 32-code panels, 64-row blocks,
# compile-time D = 4, 8, 16, the L2 chunking of the packed codebook): fp32 and bf16, l2 and cosine,
# 1 and 2 threads (bit-identical), non-contiguous x.

CPU_D = [1, 7, 8, 31, 32, 33, 64, 255, 1000]
CPU_K = [1, 15, 16, 17, 4097]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("K", CPU_K)
@pytest.mark.parametrize("D", CPU_D)
def test_cpu_kernel_tiling_boundaries(D, K, dtype, metric):
    N = 1000
    x, cb = make_inputs(N, K, D, dtype, "cpu", seed=D * 131 + K, noncontiguous=(K == 17))
    require("cpu", x, cb, metric)
    (i1, d1), (i2, d2) = with_threads(
        lambda: nearest_code(x, cb, metric=metric, backend="cpu", return_distance=True))
    assert torch.equal(i1, i2) and torch.equal(d1, d2), "the result depends on the thread count"
    check_nearest(x, cb, i1, d1, metric=metric)


@pytest.mark.parametrize("N", [0, 1, 3])
@pytest.mark.parametrize("D", [1, 8, 33, 1000])
def test_cpu_kernel_few_rows(N, D):
    for dtype in (torch.float32, torch.bfloat16):
        x, cb = make_inputs(N, 4097, D, dtype, "cpu", seed=N + D)
        require("cpu", x, cb)
        idx, dist = nearest_code(x, cb, backend="cpu", return_distance=True)
        check_nearest(x, cb, idx, dist)
