"""SpidR: each of the last ``num_codebooks`` student layers predicts the teacher's clusters of that layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spidr.config import SpidRConfig
from spidr.models.dinosr import DinoSR, select_masked


def spidr_ema_decay(step: int, cfg: SpidRConfig) -> float:
    """``1 - (1 - ema_start_decay) * exp(-step / ema_timescale)``, exactly 1 once within ``ema_threshold`` of 1."""
    decay = 1 - (1 - cfg.ema_start_decay) * math.exp(-step / cfg.ema_timescale)
    return decay if 1 - decay > cfg.ema_threshold else 1.0


class SpidR(DinoSR):
    """SpidR (Poli et al., 2025) as in the reference release.

    Head i reads the student's layer result (before the residual) of layer
    ``num_layers - num_codebooks + i``; the student's last normalisation, unused by the loss, is frozen.
    """

    cfg: SpidRConfig

    def __init__(self, cfg: SpidRConfig | None = None) -> None:
        cfg = SpidRConfig() if cfg is None else cfg
        if not isinstance(cfg, SpidRConfig):
            raise TypeError(f"cfg must be a SpidRConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        last_norm = (
            "layer_norm" if cfg.encoder_layer_norm_first else f"layers.{cfg.encoder_num_layers - 1}.final_layer_norm"
        )
        self.student.get_submodule(last_norm).requires_grad_(False)

    def ema_decay(self, step: int) -> float:
        """The teacher's EMA decay after optimiser step ``step`` (SPEC 1.4, SpidR schedule)."""
        return spidr_ema_decay(step, self.cfg)

    def _head_inputs(self, x: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        return self.student.get_intermediate_outputs(x, attention_mask)[-self.num_codebooks :]

    def _predictions(self, x: Tensor, attention_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
        """(C, N, dim): each head's layer result at the masked frames."""
        return torch.stack([select_masked(y, mask_indices) for y in self._head_inputs(x, attention_mask)])
