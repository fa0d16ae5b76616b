"""SpidR: each of the last ``num_codebooks`` student layers predicts the teacher's clusters of that layer."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from spidr.config import SpidRConfig
from spidr.models.components import mask_from_index, select_masked
from spidr.models.dinosr import DinoSR
from spidr.models.metrics import perplexities

__all__ = [
    "DinoSR",
    "SpidR",
    "SpidRConfig",
    "exp_ema_scheduler",
    "mask_from_index",
    "perplexities",
    "select_masked",
    "spidr_ema_decay",
]


def exp_ema_scheduler(step: int, start_decay: float, timescale: float, threshold: float) -> float:
    """SpidR's EMA decay after optimiser step ``step``: ``1 - (1 - start_decay) * exp(-step / timescale)``, exactly 1
    once ``1 - decay <= threshold``."""
    decay = 1 - (1 - start_decay) * math.exp(-step / timescale)
    return decay if 1 - decay > threshold else 1.0


def spidr_ema_decay(step: int, cfg: SpidRConfig) -> float:
    """:func:`exp_ema_scheduler` with the schedule of ``cfg`` (``ema_start_decay``, ``ema_timescale``,
    ``ema_threshold``)."""
    return exp_ema_scheduler(step, cfg.ema_start_decay, cfg.ema_timescale, cfg.ema_threshold)


class SpidR(DinoSR):
    """SpidR (Poli et al., 2025) as in the reference release.

    Head i reads the student's layer result (before the residual) of layer
    ``num_layers - num_codebooks + i``; the student's last normalisation, unused by the loss, is frozen.
    ``ema_scheduler`` is :func:`exp_ema_scheduler` with the config's schedule.
    """

    cfg: SpidRConfig

    def __init__(self, cfg: SpidRConfig | None = None) -> None:
        cfg = SpidRConfig() if cfg is None else cfg
        if not isinstance(cfg, SpidRConfig):
            raise TypeError(f"cfg must be a SpidRConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        self.ema_scheduler = partial(
            exp_ema_scheduler,
            start_decay=cfg.ema_start_decay,
            timescale=cfg.ema_timescale,
            threshold=cfg.ema_threshold,
        )
        last_norm = (
            "layer_norm" if cfg.encoder_layer_norm_first else f"layers.{cfg.encoder_num_layers - 1}.final_layer_norm"
        )
        self.student.get_submodule(last_norm).requires_grad_(False)

    def _head_inputs(self, x: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        return self.student.get_intermediate_outputs(x, attention_mask)[-self.num_codebooks :]

    def _predictions(self, x: Tensor, attention_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
        """(C, N, dim): each head's layer result at the masked frames."""
        return torch.stack([select_masked(y, mask_indices) for y in self._head_inputs(x, attention_mask)])
