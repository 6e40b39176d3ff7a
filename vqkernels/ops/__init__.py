"""One folder per op: the PyTorch reference, the Triton kernel and the C++/CUDA bridge.

    nearest_code/   the nearest code of each vector (vqkernels.nearest_code)
    vq_loss/        the fused VQ loss and vector_quantize (search + gather + loss, fused on the CPU)
    code_stats/     per-code counts and sums, the EMA codebook update, code usage
    attention/      fused scaled-dot-product attention
    linear/         inference linear for a few rows on a weight packed once (decoding)

Shared by every op's wrapper and kernels:

    _checks.py      argument checks that name the argument, the kernels' dtypes, new_output (poisoned)
    _custom_op.py   torch.library.custom_op without importing torch._dynamo on the first eager call
    _layout.py      the (B, T, D) row view the quantizer kernels read in place
    _launch.py      the device guard and block sizes around a Triton launch

Each op declares what its backends can take with ``vqkernels._backend.declare`` (which the wrapper's
``_backend.select`` and ``vqkernels info`` read), and maps backend names to implementations in one table.
"""
