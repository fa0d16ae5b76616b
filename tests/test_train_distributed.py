"""Two CPU processes with gloo: DDP keeps the ranks identical, and the codebooks equal one process on the union."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spidr.config import read_config
from tests.conftest import REPO

OVERRIDES = [
    "optimizer.dtype=float32",
    "run.compile=false",
    "model.encoder_dropout=0.0",
    "model.encoder_attention_dropout=0.0",
]


def rank_batch(rank: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(100 + rank)
    waveforms = torch.randn(2, 16000, generator=g)
    mask_indices = torch.stack([torch.randperm(49, generator=g)[:20].sort().values for _ in range(2)])
    return SimpleNamespace(waveforms=waveforms, attention_mask=None, mask_indices=mask_indices)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from spidr.train import Env, Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = read_config(REPO / "configs" / "demo.toml", [*OVERRIDES, f"run.workdir={out}"])
        trainer = Trainer(cfg, Env(rank=rank, world_size=world))
        trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model)
        trainer.forward = trainer.model
        metrics = trainer.train_step(rank_batch(rank))
        assert metrics is not None
        state = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical_and_codebooks_see_the_union(tmp_path):
    world, port = 2, 29700 + os.getpid() % 1000
    mp.start_processes(_worker, args=(world, port, str(tmp_path)), nprocs=world, start_method="spawn")
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key

    # One process, the same initial model, both ranks' batches at once: the same codebook update.
    from spidr.train import Env, Trainer

    cfg = read_config(REPO / "configs" / "demo.toml", [*OVERRIDES, f"run.workdir={tmp_path / 'single'}"])
    model = Trainer(cfg, Env()).model
    union = [rank_batch(r) for r in range(world)]
    model(torch.cat([b.waveforms for b in union]), mask_indices=torch.cat([b.mask_indices for b in union]))
    for key, value in model.state_dict().items():
        if key.startswith("codebooks."):
            torch.testing.assert_close(states[0][key], value, atol=1e-5, rtol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
