"""Online clustering of the teacher's targets: codebooks stored as decayed sums and counts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spidr import ops


class Codebook(nn.Module):
    """One codebook of ``size`` codewords of dimension ``dim``.

    Buffers (float32): ``codebook`` (K, D), the decayed sum of assigned vectors, and ``counts`` (K,),
    the decayed count; the codewords are ``codebook / counts[:, None]``.
    """

    codebook: Tensor
    counts: Tensor

    def __init__(self, dim: int, size: int, decay: float) -> None:
        super().__init__()
        self.codebook_decay = decay
        self.codebook_size = size
        # A (D, K) normal draw whose D rows are standardised across the K codewords, then transposed.
        draw = torch.randn(dim, size, dtype=torch.float32).unsqueeze(0)
        self.register_buffer("codebook", F.instance_norm(draw).squeeze(0).t().contiguous())
        self.register_buffer("counts", torch.ones(size, dtype=torch.float32))


class Codebooks(nn.ModuleList):
    """The model's codebooks; assignment and update go through :mod:`spidr.ops` for all of them at once."""

    def __iter__(self) -> Iterator[Codebook]:
        return cast("Iterator[Codebook]", super().__iter__())

    @property
    def decay(self) -> float:
        return next(iter(self)).codebook_decay

    @torch.no_grad()
    def quantize(self, targets: Tensor) -> Tensor:
        """Labels (C, N) of the targets (C, N, D) before any update; in training, then update (SPEC 1.5)."""
        stacked = torch.stack([cb.codebook for cb in self])
        counts = torch.stack([cb.counts for cb in self])
        labels = ops.assign_codes(targets, stacked, counts)
        if self.training and self.decay < 1.0:
            ops.codebook_update_(stacked, counts, targets, labels, self.decay)
            for i, cb in enumerate(self):
                cb.codebook.copy_(stacked[i])
                cb.counts.copy_(counts[i])
        return labels
