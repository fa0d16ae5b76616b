"""The reference release's optimiser module (spidr 0.2.0's ``spidr.optimizer``): ``build_optimizer`` returns the
AdamW optimizer, a gradient scaler and the learning-rate scheduler; ``build_scheduler`` the scheduler alone.

Both are :mod:`spidr.optim`'s: the same parameter groups (group 1 the extractor, removed at ``freeze_step``) and
learning rates at every step as the release's chained schedulers (one ``LambdaLR`` here).
"""

from __future__ import annotations

import torch
from torch import GradScaler, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from spidr import optim
from spidr.config import OptimizerConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_scheduler(opt: Optimizer, cfg: OptimizerConfig) -> LRScheduler:
    """The learning-rate schedule of ``cfg.scheduler`` (:func:`spidr.optim.lr_lambda`) for every group of ``opt``.

    Raises:
        ValueError: an unknown ``cfg.scheduler``.
    """
    if cfg.scheduler not in ("tristage", "cosine", "rsqrt", "constant"):
        raise ValueError(f"Unknown scheduler {cfg.scheduler!r}: expected tristage, cosine, rsqrt or constant")
    return LambdaLR(opt, [optim.lr_lambda(cfg)] * len(opt.param_groups))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> tuple[AdamW, GradScaler, LRScheduler]:
    """``(optimizer, scaler, scheduler)`` for ``model`` as the release builds them: AdamW (fused where possible)
    with the extractor in group 1, a ``GradScaler`` enabled for mixed precision on CUDA, and the schedule.

    Raises:
        ValueError: an unknown ``cfg.dtype``, or bfloat16 on a GPU that has no bfloat16 (before Ampere).
    """
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"optimizer.dtype must be float32, float16 or bfloat16, got {cfg.dtype!r}")
    if cfg.dtype == "bfloat16" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        raise ValueError("optimizer.dtype = 'bfloat16' needs an Ampere or newer GPU (V100?): use float16")
    optimizer, scheduler = optim.build_optimizer(model, cfg)
    cuda = torch.cuda.is_available()
    scaler = GradScaler("cuda" if cuda else "cpu", enabled=cfg.mixed_precision and cuda)
    return optimizer, scaler, scheduler
