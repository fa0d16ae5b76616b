"""Online clustering of the teacher's targets: codebooks stored as decayed sums and counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast, overload

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spidr import ops
from spidr.ops.reference import apply_ema_


class Codebook(nn.Module):
    """One codebook of ``codebook_size`` codewords of dimension ``encoder_embed_dim``.

    Buffers (float32): ``codebook`` (K, D), the decayed sum of assigned vectors, and ``counts`` (K,),
    the decayed count; the codewords are ``codebook / counts[:, None]``. Calling the module assigns
    targets (the reference release's one-hot form); :class:`Codebooks` assigns and updates all the
    codebooks at once without building one-hots.
    """

    codebook: Tensor
    counts: Tensor

    def __init__(self, encoder_embed_dim: int, codebook_size: int, codebook_decay: float) -> None:
        super().__init__()
        self.codebook_decay = codebook_decay
        self.codebook_size = codebook_size
        # A (D, K) normal draw whose D rows are standardised across the K codewords, then transposed.
        draw = torch.randn(encoder_embed_dim, codebook_size, dtype=torch.float32).unsqueeze(0)
        self.register_buffer("codebook", F.instance_norm(draw).squeeze(0).t().contiguous())
        self.register_buffer("counts", torch.ones(codebook_size, dtype=torch.float32))

    def _check_target(self, target: Tensor) -> None:
        dim = self.codebook.shape[1]
        if not isinstance(target, Tensor) or target.dim() != 2 or target.shape[1] != dim:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"target must have shape (N, {dim}), got {shape}")

    @torch.no_grad()
    def forward(self, target: Tensor) -> Tensor:
        """One-hot float32 (N, K) of the nearest codeword of each row of ``target`` (N, D): the squared-L2
        argmin, computed in float32 even under autocast, ties to the lowest index (:func:`spidr.ops.assign_codes`).

        Raises:
            ValueError: ``target`` is not (N, D).
        """
        self._check_target(target)
        labels = ops.assign_codes(target.unsqueeze(0), self.codebook.unsqueeze(0), self.counts.unsqueeze(0))[0]
        return F.one_hot(labels, self.codebook_size).float()

    @torch.no_grad()
    def update(self, count: Tensor, memory: Tensor) -> None:
        """EMA update in place from ``count`` (K,), the targets assigned to each codeword, and ``memory`` (K, D),
        their sum: where ``count > 0``, ``counts = d * counts + (1 - d) * count`` and
        ``codebook = d * codebook + (1 - d) * memory`` (d = ``codebook_decay``); other codewords are left as they
        are, and nothing changes when ``d >= 1``. The inputs are not modified.

        Raises:
            ValueError: ``count`` or ``memory`` of another shape.
        """
        size, dim = self.codebook.shape
        if not isinstance(count, Tensor) or tuple(count.shape) != (size,):
            raise ValueError(f"count must have shape ({size},), got {getattr(count, 'shape', type(count).__name__)}")
        if not isinstance(memory, Tensor) or tuple(memory.shape) != (size, dim):
            raise ValueError(
                f"memory must have shape ({size}, {dim}), got {getattr(memory, 'shape', type(memory).__name__)}"
            )
        if self.codebook_decay >= 1.0:
            return
        count = count.to(device=self.counts.device, dtype=self.counts.dtype)
        memory = memory.to(device=self.codebook.device, dtype=self.codebook.dtype, copy=True)  # apply_ema_ reuses it
        apply_ema_(
            self.codebook.unsqueeze(0), self.counts.unsqueeze(0), count[None], memory[None], self.codebook_decay
        )


class Codebooks(nn.ModuleList):
    """The model's codebooks; assignment and update go through :mod:`spidr.ops` for all of them at once."""

    def __iter__(self) -> Iterator[Codebook]:
        return cast("Iterator[Codebook]", super().__iter__())

    @property
    def decay(self) -> float:
        """The decay of the first codebook (the models give every codebook the same)."""
        return next(iter(self)).codebook_decay

    @overload
    def quantize(self, targets: Tensor) -> Tensor: ...

    @overload
    def quantize(self, targets: Sequence[Tensor]) -> list[Tensor]: ...

    @torch.no_grad()
    def quantize(self, targets: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Assign the targets of every codebook, then, in training mode, update the codebooks (SPEC 1.5).

        The assignment is made before the update; in distributed training the counts and sums are
        summed over the ranks in one all-reduce.

        Args:
            targets: (C, N, D), one (N, D) set per codebook; or, as in the reference release, a list of C
                tensors (N, D).

        Returns:
            The labels, int64 (C, N), for a tensor; for a list, as the reference release, a list of C one-hot
            float32 (N, K).

        Raises:
            ValueError: not one (N, D) set per codebook, all of the same shape.
        """
        if not isinstance(targets, Tensor):
            targets = list(targets)
            shapes = {tuple(t.shape) if isinstance(t, Tensor) else None for t in targets}
            if len(targets) != len(self) or len(shapes) != 1 or None in shapes:
                raise ValueError(
                    f"targets must be {len(self)} tensors (N, D) of one shape, one per codebook; got {len(targets)} "
                    f"of shapes {sorted(str(s) for s in shapes)}"
                )
            labels = self.quantize(torch.stack(targets))
            return [F.one_hot(row, codebook.codebook_size).float() for row, codebook in zip(labels, self, strict=True)]
        if targets.dim() != 3 or targets.shape[0] != len(self):
            raise ValueError(f"targets must have shape ({len(self)}, N, D), got {tuple(targets.shape)}")
        stacked = torch.stack([cb.codebook for cb in self])
        counts = torch.stack([cb.counts for cb in self])
        labels = ops.assign_codes(targets, stacked, counts)
        if not self.training:
            return labels
        decays = {cb.codebook_decay for cb in self}
        if len(decays) == 1:
            (decay,) = decays
            if decay >= 1.0:
                return labels
            ops.codebook_update_(stacked, counts, targets, labels, decay)
        else:  # codebooks built by hand with different decays: one update each
            for i, cb in enumerate(self):
                if cb.codebook_decay < 1.0:
                    one = slice(i, i + 1)
                    ops.codebook_update_(stacked[one], counts[one], targets[one], labels[one], cb.codebook_decay)
        for i, cb in enumerate(self):
            cb.codebook.copy_(stacked[i])
            cb.counts.copy_(counts[i])
        return labels
