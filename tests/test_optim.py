"""Learning-rate schedules, parameter groups, freezing at freeze_step, and mixed-precision training steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from spidr.config import OptimizerConfig, read_config
from spidr.optim import build_optimizer, drop_frozen_group, lr_lambda
from tests.conftest import REPO


def test_tristage_schedule():
    f = lr_lambda(OptimizerConfig(warmup_steps=10, hold_steps=20, decay_steps=30))
    assert f(0) == pytest.approx(0.01) and f(5) == pytest.approx(0.505) and f(10) == 1.0 and f(29) == 1.0
    assert f(45) == pytest.approx(0.1)  # halfway through an exponential decay from 1 to 0.01
    assert f(60) == pytest.approx(0.01)
    assert f(90) == pytest.approx(0.0001)  # the release's decay goes on past decay_steps


def test_cosine_rsqrt_constant_schedules():
    cosine = lr_lambda(OptimizerConfig(scheduler="cosine", warmup_steps=10, max_steps=110))
    assert (
        cosine(10) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.505) and cosine(110) == pytest.approx(0.01)
    )
    # The release's rsqrt: the warmup ends at 1 / sqrt(1 + shift / timescale), a hold at 1, then the decay.
    rsqrt = lr_lambda(
        OptimizerConfig(scheduler="rsqrt", warmup_steps=10, hold_steps=5, rsqrt_timescale=100, rsqrt_shift=10)
    )
    assert rsqrt(10) == 1.0 and rsqrt(14) == 1.0
    assert rsqrt(5) == pytest.approx(0.01 + (1 / math.sqrt(1.1) - 0.01) / 2)
    assert rsqrt(105) == pytest.approx(1 / math.sqrt(2))
    constant = lr_lambda(OptimizerConfig(scheduler="constant", warmup_steps=10))
    assert constant(5) == pytest.approx(0.505) and constant(12345) == 1.0


def test_groups_exclude_the_teacher_and_drop_the_extractor():
    from spidr.config import SpidRConfig
    from spidr.models import build_model
    from tests.conftest import load_fixture

    model = build_model(cfg=SpidRConfig(**load_fixture("spidr_small.pt")["config"]))
    optimizer, scheduler = build_optimizer(model, OptimizerConfig())
    ids = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert not any(id(p) in ids[0] | ids[1] for p in model.teacher.parameters())
    extractor = {id(p) for p in [*model.feature_extractor.parameters(), *model.feature_projection.parameters()]}
    assert ids[1] == extractor and not (ids[0] & extractor)
    drop_frozen_group(optimizer, scheduler)
    assert len(optimizer.param_groups) == 1 and len(scheduler.base_lrs) == 1 and len(scheduler.lr_lambdas) == 1


def batch() -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        waveforms=torch.randn(2, 16000, generator=g),
        attention_mask=None,
        mask_indices=torch.stack([torch.randperm(49, generator=g)[:20].sort().values for _ in range(2)]),
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_steps_freeze_the_extractor_at_freeze_step(tmp_path, dtype):
    from spidr.train import Env, Trainer

    cfg = read_config(
        REPO / "configs" / "demo.toml", [f"run.workdir={tmp_path}", f"optimizer.dtype={dtype}", "model.freeze_step=2"]
    )
    trainer = Trainer(cfg, Env())
    for step in (1, 2):
        metrics = trainer.train_step(batch())
        assert metrics is not None and math.isfinite(metrics["loss"]) and trainer.step == step
    assert len(trainer.optimizer.param_groups) == 1
    assert not any(p.requires_grad for p in trainer.model.feature_extractor.parameters())
    extractor_before = trainer.model.feature_extractor.conv_layers[0].conv.weight.clone()
    assert trainer.train_step(batch()) is not None
    assert torch.equal(trainer.model.feature_extractor.conv_layers[0].conv.weight, extractor_before)
