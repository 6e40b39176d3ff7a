"""What the quantizer modules synchronise across ranks, and how.

Three things must agree on every rank, or the replicas' codebooks drift apart:

- the EMA statistics: per-code counts and sums are all-reduced (summed) before the EMA mixing, so every
  rank mixes the global batch's statistics;
- k-means initialisation: the initial means are sampled from the union of every rank's batch, each
  Lloyd step all-reduces counts and sums;
- dead-code restarts: the replacement vectors are drawn from the union of every rank's batch.

Random choices are made on rank 0 only and broadcast, and a vector is fetched from the rank that holds
it: every rank then holds the same rows, and they are the rows a single process would draw, with rank
0's random state, from the concatenation of the ranks' batches in rank order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sync_enabled(sync: bool | None) -> bool:
    """``sync``: None = synchronise whenever torch.distributed is initialised with more than one rank."""
    if sync is False:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _broadcast_from_rank0(make, shape, dtype, device) -> torch.Tensor:
    """``make()`` on rank 0 (its random state), broadcast to every rank."""
    if dist.get_rank() == 0:
        t = make().to(device=device, dtype=dtype).contiguous()
    else:
        t = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(t, src=0)
    return t


def _local_sizes(n: int, device) -> list[int]:
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def sample_indices(num_samples: int, num: int, device) -> torch.Tensor:
    """``num`` row indices out of ``num_samples``: distinct if there are enough (vector-quantize-pytorch's
    ``sample_vectors``: ``randperm(n)[:num]``, else ``randint(0, n, (num,))``: the same random calls)."""
    if num_samples >= num:
        return torch.randperm(num_samples, device=device)[:num]
    return torch.randint(0, num_samples, (num,), device=device)


def sample_rows(x: torch.Tensor, num: int, sync: bool) -> torch.Tensor:
    """``num`` rows of ``x`` (n, D) chosen at random; with ``sync``, out of every rank's rows, the same on all ranks."""
    if not sync:
        return x[sample_indices(x.shape[0], num, x.device)]
    sizes = _local_sizes(x.shape[0], x.device)
    total = sum(sizes)
    if total == 0:
        raise RuntimeError("cannot sample vectors: every rank's batch is empty")
    g = _broadcast_from_rank0(lambda: sample_indices(total, num, x.device), (num,), torch.int64, x.device)
    rank = dist.get_rank()
    lo = sum(sizes[:rank])
    mine = (g >= lo) & (g < lo + x.shape[0])
    out = x.new_zeros((num, x.shape[1]))
    out[mine] = x[g[mine] - lo]
    dist.all_reduce(out, op=dist.ReduceOp.SUM)  # each row is nonzero on exactly one rank
    return out


def random_subset_mask(mask: torch.Tensor, keep: int, sync: bool) -> torch.Tensor:
    """A mask keeping ``keep`` of the True entries of ``mask``, chosen at random (rank 0's choice under ``sync``)."""
    idx = mask.nonzero(as_tuple=True)[0]
    n = idx.numel()
    if sync:
        perm = _broadcast_from_rank0(lambda: torch.randperm(n, device=mask.device), (n,), torch.int64, mask.device)
    else:
        perm = torch.randperm(n, device=mask.device)
    out = torch.zeros_like(mask)
    out[idx[perm[:keep]]] = True
    return out


def total_rows(n: int, device, sync: bool) -> int:
    return sum(_local_sizes(n, device)) if sync else n
