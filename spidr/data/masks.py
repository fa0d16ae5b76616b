"""Span masking of frame sequences for masked prediction (the span masking of fairseq's wav2vec 2.0).

For each row of unpadded length ``T`` (in frames), ``int(mask_prob * T / mask_length + u)`` spans are drawn
(``u ~ U[0, 1)`` rounds probabilistically; at least ``min_masks``), their lengths follow ``mask_selection`` and
the union of the spans, clipped to ``T``, is the row's masked set. Every row is then subsampled at random down
to the smallest masked count of the batch, so the result is a rectangular (batch, count) tensor of positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["MASK_SELECTIONS", "MaskSelection", "compute_mask_indices", "span_lengths"]

MaskSelection = Literal["static", "uniform", "normal", "poisson"]
MASK_SELECTIONS: tuple[str, ...] = ("static", "uniform", "normal", "poisson")


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def span_lengths(
    num_spans: int,
    *,
    mask_length: int,
    mask_selection: MaskSelection,
    mask_other: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Lengths (int64, shape ``(num_spans,)``) of ``num_spans`` spans drawn with the given strategy.

    - ``static``: every span is ``mask_length`` long;
    - ``uniform``: integers uniform in ``[int(mask_other), 2 * mask_length]``;
    - ``normal``: ``round(N(mask_length, std=mask_other))``, at least 1;
    - ``poisson``: ``round(Poisson(mask_length))`` (``mask_other`` unused, as in fairseq).
    """
    if mask_selection == "static":
        return np.full(num_spans, mask_length, dtype=np.int64)
    if mask_selection == "uniform":
        low, high = int(mask_other), 2 * mask_length + 1
        if low >= high:
            raise ValueError(f"uniform masking needs int(mask_other) <= 2 * mask_length, got mask_other={mask_other}")
        return rng.integers(low, high, size=num_spans, dtype=np.int64)
    if mask_selection == "normal":
        drawn = np.rint(rng.normal(mask_length, mask_other, size=num_spans))
        return np.maximum(drawn, 1).astype(np.int64)
    if mask_selection == "poisson":
        return np.rint(rng.poisson(mask_length, size=num_spans)).astype(np.int64)
    raise ValueError(f"mask_selection must be one of {MASK_SELECTIONS}, got {mask_selection!r}")


def _overlapping_spans(lengths: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size,) union of spans whose starts are distinct positions drawn without replacement."""
    num_spans = lengths.shape[0]
    shortest = int(lengths.min())
    # Starts are drawn among the first ``size - shortest`` positions; when that leaves too few positions to
    # draw ``num_spans`` distinct starts, widen the range (spans are clipped to the row below).
    if size - shortest <= num_spans:
        shortest = size - num_spans - 1
    starts = rng.choice(size - shortest, size=num_spans, replace=False)
    offsets = np.arange(int(lengths.max()))
    positions = starts[:, None] + offsets[None, :]
    keep = (offsets[None, :] < lengths[:, None]) & (positions < size)
    masked = np.zeros(size, dtype=bool)
    masked[positions[keep]] = True
    return masked


def _separated_spans(lengths: np.ndarray, size: int, min_space: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size,) union of non-overlapping spans, at least ``min_space`` unmasked frames apart.

    Spans are placed longest first. Free regions are half-open intervals that can hold a whole span; a span
    goes in a region chosen with probability proportional to its size (among regions large enough for it),
    at a uniform start, and the region is split into what is left on either side once ``min_space`` frames
    around the span are reserved. Regions shorter than the shortest span are discarded. Spans that no longer
    fit anywhere are skipped.
    """
    masked = np.zeros(size, dtype=bool)
    lengths = lengths[lengths > 0]
    if lengths.size == 0:
        return masked
    shortest = int(lengths.min())
    regions: list[tuple[int, int]] = [(0, size)] if size >= shortest else []
    for length in sorted(lengths.tolist(), reverse=True):
        weights = np.array([end - begin if end - begin >= length else 0 for begin, end in regions], dtype=np.float64)
        total = weights.sum() if weights.size else 0.0
        if total == 0:
            break
        begin, end = regions.pop(int(rng.choice(len(weights), p=weights / total)))
        start = int(rng.integers(begin, end - length + 1))
        masked[start : start + length] = True
        for left, right in ((begin, start - min_space), (start + length + min_space, end)):
            if right - left >= shortest:
                regions.append((left, right))
    return masked


def compute_mask_indices(
    lengths: Sequence[int] | Tensor | np.ndarray,
    frames: int,
    *,
    mask_prob: float = 0.8,
    mask_length: int = 10,
    mask_selection: MaskSelection = "static",
    mask_other: float = 0.0,
    no_mask_overlap: bool = False,
    mask_min_space: int = 1,
    min_masks: int = 2,
    rng: np.random.Generator | int,
) -> Tensor:
    """Positions to mask in each row of a (batch, frames) batch, as a sorted int64 (batch, count) tensor.

    Args:
        lengths: Unpadded length in frames of every row (each at most ``frames``).
        frames: Padded number of frames of the batch.
        mask_prob: Sets the number of spans per row, ``mask_prob * T / mask_length`` (so about ``mask_prob`` of
            the frames before spans overlap); ``0`` gives an empty (batch, 0) tensor (no masking at all).
        mask_length: Span length (``static``) or its scale for the other strategies.
        mask_selection: How span lengths are drawn: ``static``, ``uniform``, ``normal`` or ``poisson``.
        mask_other: Lower bound (``uniform``) or standard deviation (``normal``) of the span lengths.
        no_mask_overlap: Place spans so they do not overlap, at least ``mask_min_space`` frames apart.
        mask_min_space: Minimum gap between spans with ``no_mask_overlap``.
        min_masks: Minimum number of spans per row.
        rng: Numpy generator (or an int seed) drawing every random number: same state, same masks.

    Returns:
        int64 (batch, count) tensor; every row is sorted, duplicate-free and below that row's length. ``count`` is
        the smallest masked count of the rows (rows with more masked positions are subsampled at random), so it
        is 0 when some row is empty.
    """
    generator = _as_generator(rng)
    row_lengths = [int(t) for t in (lengths.tolist() if isinstance(lengths, Tensor | np.ndarray) else lengths)]
    frames = int(frames)
    if any(t < 0 or t > frames for t in row_lengths):
        raise ValueError(f"every length must be in [0, frames={frames}], got {row_lengths}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be at least 1, got {mask_length}")
    if mask_selection not in MASK_SELECTIONS:
        raise ValueError(f"mask_selection must be one of {MASK_SELECTIONS}, got {mask_selection!r}")
    if mask_min_space < 0 or min_masks < 0:
        raise ValueError(f"mask_min_space and min_masks must be >= 0, got {mask_min_space} and {min_masks}")
    batch = len(row_lengths)
    if mask_prob == 0 or batch == 0:
        return torch.zeros((batch, 0), dtype=torch.int64)

    rows: list[np.ndarray] = []
    for size in row_lengths:
        num_spans = max(min_masks, int(mask_prob * size / mask_length + generator.random()))
        if size == 0 or num_spans == 0:
            rows.append(np.zeros(0, dtype=np.int64))
            continue
        spans = span_lengths(
            num_spans, mask_length=mask_length, mask_selection=mask_selection, mask_other=mask_other, rng=generator
        )
        if spans.sum() == 0:
            spans[0] = max(0, min(mask_length, size - 1))
        if no_mask_overlap:
            masked = _separated_spans(spans, size, mask_min_space, generator)
        else:
            masked = _overlapping_spans(spans, size, generator)
        rows.append(np.flatnonzero(masked).astype(np.int64))

    count = min(row.size for row in rows)
    out = np.empty((batch, count), dtype=np.int64)
    for i, row in enumerate(rows):
        if row.size > count:
            row = np.sort(generator.choice(row, size=count, replace=False))
        out[i] = row
    return torch.from_numpy(out)
