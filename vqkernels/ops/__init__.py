"""One folder per op: the PyTorch reference, the Triton kernel and the C++/CUDA bridge."""
