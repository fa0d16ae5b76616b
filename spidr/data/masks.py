"""Span masking of frame sequences for masked prediction (the span masking of fairseq's wav2vec 2.0).

For each row of unpadded length ``T`` (in frames), ``int(mask_prob * T / mask_length + u)`` spans are drawn
(``u ~ U[0, 1)`` rounds probabilistically; at least ``min_masks``), their lengths follow the masking strategy and
the union of the spans, clipped to ``T``, is the row's masked set. Every row is then subsampled at random down
to the smallest masked count of the batch, so the result is a rectangular (batch, count) tensor of positions.

The functions keep the reference release's names and arguments (``compute_mask_indices``, ``mask_lengths``,
``mask_id_overlap``, ``mask_id_no_overlap``, ``MaskGenerator``) and draw their random numbers from the
``torch.Generator`` they are given (the global one for ``None``) in the release's order, so that the same
generator state gives the same masks as the release. Two exceptions, both documented in the README: the
``poisson`` strategy draws its Poisson rates from ``generator`` too (the release draws them from the global
generator whatever it is given), and inputs on which the release raises (no span to draw, an empty range for a
span start) give an empty or shortened mask instead of an error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spidr.config import MaskingConfig, MaskingStrategy

__all__ = [
    "MASK_SELECTIONS",
    "MaskGenerator",
    "MaskingConfig",
    "MaskingStrategy",
    "compute_mask_indices",
    "mask_id_no_overlap",
    "mask_id_overlap",
    "mask_lengths",
]

MASK_SELECTIONS: tuple[str, ...] = ("static", "uniform", "normal", "poisson")


def mask_lengths(
    num_mask: int, mask_length: int, mask_other: float, mask_type: MaskingStrategy, generator: torch.Generator | None
) -> Tensor:
    """Lengths of ``num_mask`` spans (an integer tensor of shape ``(num_mask,)``) drawn by strategy.

    - ``static``: every span is ``mask_length`` long (int64);
    - ``uniform``: integers uniform in ``[int(mask_other), 2 * mask_length]`` (int64);
    - ``normal``: ``round(N(mask_length, std=mask_other))``, at least 1 (int32);
    - ``poisson``: ``round(Poisson(u * mask_length))`` with ``u ~ U[0, 1)`` per span, the release's rates (int32).

    Raises:
        ValueError: an unknown ``mask_type``, or ``int(mask_other) > 2 * mask_length`` with ``uniform``.
    """
    if mask_type == "static":
        return torch.full((num_mask,), mask_length)
    if mask_type == "uniform":
        low, high = int(mask_other), 2 * mask_length + 1
        if low >= high:
            raise ValueError(f"uniform masking needs int(mask_other) <= 2 * mask_length, got mask_other={mask_other}")
        return torch.randint(low, high, size=(num_mask,), generator=generator)
    if mask_type == "normal":
        drawn = torch.normal(float(mask_length), float(mask_other), size=(num_mask,), generator=generator)
        return torch.maximum(torch.ones(1), torch.round(drawn)).int()
    if mask_type == "poisson":
        rates = torch.rand(num_mask, generator=generator) * mask_length
        return torch.round(torch.poisson(rates, generator=generator)).int()
    raise ValueError(f"unknown mask strategy {mask_type!r}: expected one of {', '.join(MASK_SELECTIONS)}")


def mask_id_overlap(lengths: Tensor, num_mask: int, sz: int, generator: torch.Generator | None) -> Tensor:
    """Masked positions (possibly repeated, possibly ``>= sz``) of ``num_mask`` spans that may overlap.

    The starts are distinct positions drawn without replacement among the first ``sz - min(lengths)``; when that
    leaves too few positions for ``num_mask`` starts the range is widened to ``num_mask + 1`` positions.
    """
    if len(lengths) == 0 or num_mask <= 0:
        return torch.zeros(0, dtype=torch.int64)
    lengths = torch.as_tensor(lengths).to(torch.int64)
    shortest = int(lengths.min())
    if sz - shortest <= num_mask:
        shortest = sz - num_mask - 1
    starts = torch.randperm(sz - shortest, generator=generator)[:num_mask]
    lengths = lengths[: starts.numel()]
    offsets = torch.arange(int(lengths.max()) if lengths.numel() else 0)
    keep = offsets[None, :] < lengths[:, None]
    return (starts[:, None] + offsets[None, :])[keep]


def mask_id_no_overlap(lengths: Tensor, min_space: int, sz: int, generator: torch.Generator | None) -> Tensor:
    """Masked positions of non-overlapping spans, at least ``min_space`` unmasked frames apart.

    Spans are placed longest first: each goes in a free part chosen with probability proportional to its size
    (among the parts that can hold it with ``min_space`` to spare), at a uniform start, and the part is split
    into what is left on either side. Spans that no longer fit anywhere are skipped.
    """
    positions: list[int] = []
    values = [int(v) for v in torch.as_tensor(lengths).reshape(-1).tolist()]
    if not values:
        return torch.zeros(0, dtype=torch.int64)
    keep_length = min(values)
    parts = [(0, sz)]
    for length in sorted(values, reverse=True):
        sizes = torch.tensor([end - begin for begin, end in parts], dtype=torch.int)
        sizes[sizes < length + min_space] = 0
        total = sizes.sum()
        if total == 0:
            break
        chosen = int(torch.multinomial(sizes / total, 1, generator=generator))
        begin, end = parts.pop(chosen)
        high = end - length
        start = int(torch.randint(begin, high, size=(1,), generator=generator)) if high > begin else begin
        positions.extend(range(start, start + length))
        if start - begin - min_space >= keep_length:
            parts.append((begin, start - min_space + 1))
        # The release's rule for the right-hand part (it compares with the shortest span where fairseq uses the
        # span just placed); kept so that the same generator gives the same masks.
        if end - start - keep_length - min_space > keep_length:
            parts.append((start + length + min_space, end))
    return torch.tensor(positions, dtype=torch.int64)


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: Tensor | None,
    mask_prob: float,
    mask_length: int,
    mask_type: MaskingStrategy,
    mask_other: float,
    min_masks: int,
    min_space: int,
    *,
    no_overlap: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Positions to mask in each row of a ``shape = (batch, frames)`` batch, as a sorted int64 (batch, count).

    Args:
        shape: ``(batch, frames)``.
        padding_mask: bool ``(batch, frames)``, True on padded frames (each row's unpadded length is ``frames``
            minus its count of True), or ``None`` (no padding).
        mask_prob: sets the number of spans per row, ``mask_prob * T / mask_length`` rounded at random.
        mask_length: span length (``static``) or its scale for the other strategies.
        mask_type: how span lengths are drawn: ``static``, ``uniform``, ``normal`` or ``poisson``.
        mask_other: lower bound (``uniform``) or standard deviation (``normal``) of the span lengths.
        min_masks: minimum number of spans per row.
        min_space: minimum gap between spans with ``no_overlap``.
        no_overlap: place spans so that they do not overlap.
        generator: the torch generator every random number is drawn from (``None``: the global one).

    Returns:
        int64 ``(batch, count)``; every row sorted, duplicate-free and below its row's length. ``count`` is the
        smallest masked count of the rows (longer rows are subsampled at random), 0 when some row is empty.

    Raises:
        ValueError: a ``shape`` that is not two non-negative integers, a ``padding_mask`` of another shape or
            not boolean, an unknown ``mask_type``, or ``mask_length < 1``.
    """
    if len(shape) != 2 or any(int(n) < 0 for n in shape):
        raise ValueError(f"shape must be (batch, frames) with non-negative sizes, got {tuple(shape)}")
    batch, frames = int(shape[0]), int(shape[1])
    if padding_mask is not None:
        if not isinstance(padding_mask, Tensor) or tuple(padding_mask.shape) != (batch, frames):
            got = tuple(padding_mask.shape) if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
            raise ValueError(f"padding_mask must be a bool tensor of shape {(batch, frames)}, got {got}")
        if padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a bool tensor (True on padded frames), got {padding_mask.dtype}")
    if mask_type not in MASK_SELECTIONS:
        raise ValueError(f"unknown mask strategy {mask_type!r}: expected one of {', '.join(MASK_SELECTIONS)}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be at least 1, got {mask_length}")

    # The batch-wide count is drawn even when every row draws its own: the release does, and the draws must match.
    all_num_mask = max(min_masks, int(mask_prob * frames / float(mask_length) + torch.rand(1, generator=generator)))
    padded = None if padding_mask is None else padding_mask.long().sum(dim=1).tolist()
    rows: list[Tensor] = []
    for i in range(batch):
        if padded is not None:
            sz = frames - int(padded[i])
            num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + torch.rand(1, generator=generator)))
        else:
            sz, num_mask = frames, all_num_mask
        if num_mask <= 0:
            rows.append(torch.zeros(0, dtype=torch.int64))
            continue
        lengths = mask_lengths(num_mask, mask_length, mask_other, mask_type, generator)
        if int(lengths.sum()) == 0:
            lengths[0] = min(mask_length, sz - 1)
        if no_overlap:
            positions = mask_id_no_overlap(lengths, min_space, sz, generator)
        else:
            positions = mask_id_overlap(lengths, num_mask, sz, generator)
        rows.append(torch.unique(positions[positions < sz]).to(torch.int64))

    count = min((row.numel() for row in rows), default=0)
    mask = torch.empty((batch, count), dtype=torch.int64)
    for i, row in enumerate(rows):
        if row.numel() > count:
            row = row[torch.randperm(row.numel(), generator=generator)[:count]].sort().values
        mask[i] = row
    return mask


class MaskGenerator(nn.Module):
    """Time (and optional channel) masks of a batch from a :class:`~spidr.config.MaskingConfig`.

    ``forward(padding_mask, *, channels=None, generator=None)`` returns ``(mask_indices, channel_mask)``:
    ``mask_indices`` as :func:`compute_mask_indices` (``None`` when ``mask_prob`` is 0), and with
    ``mask_channel_prob > 0`` a bool ``(batch, frames, channels)`` mask of whole masked channels (else ``None``).
    """

    def __init__(self, config: MaskingConfig) -> None:
        super().__init__()
        if not isinstance(config, MaskingConfig):
            raise TypeError(f"config must be a spidr.config.MaskingConfig, got {type(config).__name__}")
        self.config = config

    def forward(
        self,
        padding_mask: Tensor,
        *,
        channels: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        if not isinstance(padding_mask, Tensor) or padding_mask.dim() != 2:
            got = tuple(padding_mask.shape) if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
            raise ValueError(f"padding_mask must be a bool (batch, frames) tensor, got {got}")
        cfg = self.config
        batch, frames = padding_mask.shape
        mask_indices = None
        if cfg.mask_prob > 0:
            mask_indices = compute_mask_indices(
                (batch, frames),
                padding_mask,
                cfg.mask_prob,
                cfg.mask_length,
                cfg.mask_selection,
                cfg.mask_other,
                min_masks=2,
                min_space=cfg.mask_min_space,
                no_overlap=cfg.no_mask_overlap,
                generator=generator,
            )
        channel_mask = None
        if cfg.mask_channel_prob > 0:
            if channels is None:
                raise ValueError("channels must be given to mask channels (masking.mask_channel_prob > 0)")
            picked = compute_mask_indices(
                (batch, channels),
                None,
                cfg.mask_channel_prob,
                cfg.mask_channel_length,
                cfg.mask_channel_selection,
                cfg.mask_channel_other,
                min_masks=0,
                min_space=cfg.mask_channel_min_space,
                no_overlap=cfg.no_mask_channel_overlap,
                generator=generator,
            )
            chosen = torch.zeros((batch, channels), dtype=torch.bool).scatter_(1, picked, value=True)
            channel_mask = chosen.unsqueeze(1).expand(-1, frames, -1)
        return mask_indices, channel_mask
