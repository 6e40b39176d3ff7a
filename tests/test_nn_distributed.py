"""The quantizers under torch.distributed: EMA statistics, k-means init and dead-code restarts synchronised.

Two processes (gloo, CPU) each train on their own, differently sized part of every batch; afterwards
every rank must hold the same codebook and EMA buffers, equal (within fp32 rounding: the statistics
are summed in another order) to one process trained on the concatenated batches. The random draws
(k-means seeds, restart vectors) are made on rank 0 from the union of the ranks' vectors, so one
process with rank 0's random state draws the same vectors.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqkernels import VectorQuantize, VectorQuantizer, use_backend

WORLD = 2
STEPS = 4
ROWS = (37, 21)  # tokens per rank for VectorQuantize: unequal on purpose
IMAGES = (3, 2)  # images per rank for VectorQuantizer (3 x 3 latents each)


def _build():
    torch.manual_seed(0)  # every rank builds the same modules (DDP would broadcast them)
    vq = VectorQuantize(dim=6, codebook_size=24, decay=0.8, kmeans_init=True, kmeans_iters=3,
                        threshold_ema_dead_code=2.0)
    tq = VectorQuantizer(20, 5, 0.25, decay=0.6, use_cosine_sim=True, threshold_ema_dead_code=0.8)
    # more codes than vectors: k-means draws with replacement, and more codes die than there are vectors
    # to restart them from (a random subset is restarted)
    big = VectorQuantizer(96, 5, 1.0, legacy=False, decay=0.5, kmeans_init=True, kmeans_iters=2,
                          threshold_ema_dead_code=3.0)
    return vq.train(), tq.train(), big.train()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(1, sum(ROWS), 6, generator=g) * (1 + s), torch.randn(sum(IMAGES), 5, 3, 3, generator=g))
            for s in range(STEPS)]


def _train(rank: int | None):
    with use_backend("torch"):  # what is tested is the synchronisation (the ops' backends have their own tests)
        return _train_steps(rank)


def _train_steps(rank: int | None):
    vq, tq, big = _build()
    for s, (x, z) in enumerate(_batches()):
        if rank is not None:  # this rank's part of the batch
            x = x.split(ROWS, dim=1)[rank]
            z = z.split(IMAGES, dim=0)[rank]
        torch.manual_seed(100 + s)  # the draws follow rank 0's random state (the only one used under sync)
        _, _, loss = vq(x.requires_grad_())
        loss.backward()
        _, loss, _ = tq(z.requires_grad_())
        loss.backward()
        big(z)
    return {f"{name}.{k}": v for name, m in (("vq", vq), ("tq", tq), ("big", big)) for k, v in m.state_dict().items()}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        state = _train(rank)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for k in states[0]:  # every rank holds the same codebook and buffers
        assert torch.equal(states[0][k], states[1][k]), k
    single = _train(None)
    assert set(single) == set(states[0])
    for k, v in single.items():
        torch.testing.assert_close(states[0][k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert bool(single["vq._codebook.initted"])


def test_sync_is_off_without_a_process_group():
    from vqkernels.nn import _distributed as dist_sync

    assert not dist.is_initialized()
    assert not dist_sync.sync_enabled(None) and not dist_sync.sync_enabled(True) and not dist_sync.sync_enabled(False)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
