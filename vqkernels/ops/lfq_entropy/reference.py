"""lfq_entropy in pure PyTorch: the spec, the fallback and the test oracle.

Function computed (every backend; see ``__init__.py`` for the derivation). x (N, C, d), s = scale:
    L[n, c, j]   = s * x[n, c, j]                        (the logit of bit j being +1 rather than -1)
    q[n, c, j]   = sigmoid(L[n, c, j])
    per_sample   = 1/(N C) sum_{n, c, j} h(q[n, c, j]),   h(q) = -q log q - (1 - q) log(1 - q)
    pbar[c, k]   = 1/N sum_n prod_j (q[n, c, j] if bit_j(k) else 1 - q[n, c, j])
    codebook     = 1/C sum_c -sum_k pbar[c, k] log(max(pbar[c, k], eps))
bit_j(k) is bit (d-1-j) of k (dim 0 is the most significant bit, as vector-quantize-pytorch's LFQ).

pbar of one codebook is one GEMM: split the d bits into the top h = ceil(d/2) and the low l = d - h,
A[n, a] = prod over the top bits, B[n, b] = prod over the low bits (the "bit tables"), then
pbar[a * 2^l + b] = 1/N (A^T B)[a, b]. Rows go through in chunks (``rows`` at a time, accumulated into
pbar), so memory is O(K + rows * 2^h): never N x K.

Backward (grad_ps, grad_cb the upstream gradients of the two scalars):
    G[c, k]      = grad_cb / C * (-(log pbar + 1) where pbar >= eps else -log eps)   (d codebook / d pbar)
    gA           = B G^T / N,  gB = A G / N                    (two GEMMs of the same size)
    dL[n, c, j]  = sum_a gA[n, a] A[n, a] (bit_j(a) - q_j)     (top bits; low bits alike with gB, B)
                   + grad_ps / (N C) * (-L q (1 - q))
    grad_x       = s * dL
Arithmetic in float32 (float64 for float64 input); float16/bfloat16 are widened first.
"""
from __future__ import annotations

import torch

ROWS = 2048  # rows per chunk of the GEMMs: the tables of one chunk are rows * 2^ceil(d/2) elements


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_bits(d: int) -> tuple[int, int]:
    """(top bits h, low bits l) of the table split: h = ceil(d / 2)."""
    h = (d + 1) // 2
    return h, d - h


def bit_table(L: torch.Tensor) -> torch.Tensor:
    """L (n, m) logits -> (n, 2^m): T[n, k] = prod_j sigmoid(+-L[n, j]), + where bit (m-1-j) of k is set."""
    n, m = L.shape
    T = torch.ones(n, 1, dtype=L.dtype, device=L.device)
    for j in range(m):
        plus = torch.sigmoid(L[:, j:j + 1])
        minus = torch.sigmoid(-L[:, j:j + 1])  # (not 1 - plus: exact where plus rounds to 1)
        T = torch.stack((T * minus, T * plus), dim=2).reshape(n, -1)
    return T


def bit_matrix(m: int, dtype, device) -> torch.Tensor:
    """(2^m, m): bits[k, j] = bit (m-1-j) of k, as 0/1."""
    k = torch.arange(1 << m, device=device)
    shifts = torch.arange(m - 1, -1, -1, device=device)
    return ((k[:, None] >> shifts[None, :]) & 1).to(dtype)


def binary_entropy(L: torch.Tensor) -> torch.Tensor:
    """h(sigmoid(L)) = softplus(-|L|) + |L| sigmoid(-|L|), stable for any L (0 at +-inf)."""
    a = L.abs()
    return torch.nn.functional.softplus(-a) + a * torch.sigmoid(-a)


def _entropy_terms(pbar: torch.Tensor, eps: float) -> torch.Tensor:
    """-p log(max(p, eps)) elementwise; eps = 0 is the exact entropy (0 log 0 = 0)."""
    tiny = torch.finfo(pbar.dtype).tiny
    return -pbar * torch.log(pbar.clamp_min(max(eps, tiny)))


def codebook_probs_reference(x: torch.Tensor, scale: float, rows: int = ROWS) -> torch.Tensor:
    """x (N, C, d) -> pbar (C, 2^d) in the accumulation dtype: each codebook's batch-mean code distribution."""
    N, C, d = x.shape
    acc = acc_dtype(x.dtype)
    h, l = split_bits(d)
    pbar = torch.zeros(C, 1 << h, 1 << l, dtype=acc, device=x.device)
    for n0 in range(0, N, rows):
        L = x[n0:n0 + rows].to(acc) * scale  # (r, C, d)
        for c in range(C):
            A = bit_table(L[:, c, :h])  # (r, 2^h)
            B = bit_table(L[:, c, h:])  # (r, 2^l)
            pbar[c] += A.T @ B
    return (pbar / max(N, 1)).reshape(C, -1)


def lfq_entropy_fwd_reference(x: torch.Tensor, scale: float, eps: float, rows: int = ROWS):
    """x (N, C, d) -> (per_sample 0-d, codebook 0-d, pbar (C, 2^d)) in the accumulation dtype."""
    N, C, d = x.shape
    acc = acc_dtype(x.dtype)
    if N == 0:
        nan = torch.full((), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone(), torch.full((C, 1 << d), float("nan"), dtype=acc, device=x.device)
    ps = torch.zeros((), dtype=acc, device=x.device)
    for n0 in range(0, N, rows):
        ps += binary_entropy(x[n0:n0 + rows].to(acc) * scale).sum()
    ps = ps / (N * C)
    pbar = codebook_probs_reference(x, scale, rows)
    cb = _entropy_terms(pbar, eps).sum(dim=1).mean()
    return ps, cb, pbar


def entropy_grad_weights(pbar: torch.Tensor, eps: float) -> torch.Tensor:
    """d(-p log max(p, eps))/dp: -(log p + 1) where p >= eps, else -log eps (the clamp passes no gradient)."""
    tiny = torch.finfo(pbar.dtype).tiny
    if eps > 0:
        return torch.where(pbar >= eps, -(torch.log(pbar.clamp_min(tiny)) + 1.0),
                           torch.full_like(pbar, -float(torch.log(torch.tensor(eps, dtype=torch.float64)))))
    return -(torch.log(pbar.clamp_min(tiny)) + 1.0)


def lfq_entropy_bwd_reference(grad_ps, grad_cb, x, pbar, scale: float, eps: float, rows: int = ROWS):
    """-> grad_x (N, C, d) in x's dtype."""
    N, C, d = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    if N == 0:
        return out.to(x.dtype)
    h, l = split_bits(d)
    gps = grad_ps.to(acc) / (N * C)
    G = (entropy_grad_weights(pbar.to(acc), eps) * (grad_cb.to(acc) / C)).reshape(C, 1 << h, 1 << l)
    bits_h = bit_matrix(h, acc, x.device)
    bits_l = bit_matrix(l, acc, x.device)
    for n0 in range(0, N, rows):
        L = x[n0:n0 + rows].to(acc) * scale  # (r, C, d)
        q = torch.sigmoid(L)
        dL = gps * (-L * q * torch.sigmoid(-L))
        for c in range(C):
            A = bit_table(L[:, c, :h])
            B = bit_table(L[:, c, h:])
            WA = (B @ G[c].T) * A / N  # (r, 2^h): d codebook / d A, times A
            WB = (A @ G[c]) * B / N  # (r, 2^l)
            dL[:, c, :h] += WA @ bits_h - q[:, c, :h] * WA.sum(1, keepdim=True)
            dL[:, c, h:] += WB @ bits_l - q[:, c, h:] * WB.sum(1, keepdim=True)
        out[n0:n0 + rows] = dL * scale
    return out.to(x.dtype)
