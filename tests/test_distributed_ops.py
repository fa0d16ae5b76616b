"""codebook_update_ under torch.distributed: one all-reduce for all codebooks, equal to one process on the union."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spidr.ops as ops


def _worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        codebooks = torch.randn(3, 10, 8, generator=g)
        counts = torch.rand(3, 10, generator=g) + 0.5
        xs = [torch.randn(3, 20 + 7 * r, 8, generator=g) for r in range(world)]  # different N per rank
        calls = []
        original = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            with ops.use_backend(backend):
                labels = ops.assign_codes(xs[rank], codebooks, counts)
                ops.codebook_update_(codebooks, counts, xs[rank], labels, 0.9)
        finally:
            dist.all_reduce = original
        torch.save((rank, len(calls), codebooks, counts), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [b for b in ops.backends("cpu") if b != "triton"])
def test_one_all_reduce_and_union_equivalence(backend, tmp_path):
    world, port = 2, 29500 + os.getpid() % 1000
    mp.start_processes(_worker, args=(world, port, backend, str(tmp_path)), nprocs=world, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    g = torch.Generator().manual_seed(0)
    codebooks = torch.randn(3, 10, 8, generator=g)
    counts = torch.rand(3, 10, generator=g) + 0.5
    union = torch.cat([torch.randn(3, 20 + 7 * r, 8, generator=g) for r in range(world)], dim=1)
    with ops.use_backend("torch"):
        labels = ops.assign_codes(union, codebooks, counts)
        ops.codebook_update_(codebooks, counts, union, labels, 0.9)
    for _rank, num_calls, rank_codebooks, rank_counts in results:
        assert num_calls == 1
        torch.testing.assert_close(rank_codebooks, codebooks, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(rank_counts, counts, atol=1e-6, rtol=0)
