"""Collation of waveforms into a training batch: crop or pad, frame lengths, attention mask, span masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from spidr.config import DEFAULT_CONV_LAYER_CONFIG, MaskingStrategy
from spidr.data.masks import compute_mask_indices
from spidr.models.components import num_frames

__all__ = ["Batch", "collate"]


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        waveforms: float32 (batch, samples), zero after each row's length.
        lengths: int64 (batch,) number of real samples per row.
        frame_lengths: int64 (batch,) number of real frames per row (conv extractor frames of ``lengths``).
        padding_mask: bool (batch, frames), True on padded frames; None when no frame is padded.
        attention_mask: bool (batch, 1, 1, frames), True on frames to attend (``~padding_mask``); None when no
            frame is padded.
        mask_indices: int64 (batch, count) sorted frame positions to mask, each below its row's frame length.
        indices: Dataset indices of the rows.
    """

    waveforms: Tensor
    lengths: Tensor
    frame_lengths: Tensor
    padding_mask: Tensor | None
    attention_mask: Tensor | None
    mask_indices: Tensor
    indices: list[int]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: fn(v) if isinstance(v, Tensor) else v for name, v in values.items()})


def collate(
    waveforms: Sequence[Tensor],
    indices: Sequence[int],
    *,
    conv_layers: Sequence[tuple[int, int, int]] = DEFAULT_CONV_LAYER_CONFIG,
    enable_padding: bool = False,
    rand_crop: bool = True,
    max_sample_size: int | None = 320_000,
    mask_prob: float = 0.8,
    mask_length: int = 10,
    mask_selection: MaskingStrategy = "static",
    mask_other: float = 0.0,
    no_mask_overlap: bool = False,
    mask_min_space: int = 1,
    min_masks: int = 2,
    rng: torch.Generator | int | None,
) -> Batch:
    """Collate 1-D waveforms into a :class:`Batch`.

    Every waveform is first cut to a target length: the shortest waveform of the batch (cropping, the default)
    or the longest (``enable_padding``), in both cases at most ``max_sample_size``. A longer waveform is cut at a
    random offset drawn from ``rng`` (``rand_crop``) or from its start; with padding, shorter ones are followed
    by zeros. Span masks are drawn over the real frames of each row (:func:`spidr.data.masks.compute_mask_indices`
    with the masking options; none at all when ``mask_prob`` is 0). The random numbers are drawn in the
    reference release's order (each crop offset as ``randint(length - target)``, then the masks), so the same
    generator state gives the release's batch.

    Args:
        waveforms: 1-D tensors of samples, one per file.
        indices: Their dataset indices (kept in the batch).
        conv_layers: (out_channels, kernel, stride) of the conv feature extractor, for the frame counts.
        enable_padding: Pad to the longest waveform instead of cropping to the shortest.
        rand_crop: Cut at a random offset rather than at the start.
        max_sample_size: Longest row in samples (``None``: no cap).
        mask_prob, mask_length, mask_selection, mask_other, no_mask_overlap, mask_min_space, min_masks: Masking
            options (``MaskingConfig`` names).
        rng: the torch generator (or an int seed) drawing the crop offsets and the masks; ``None`` draws from
            torch's global generator.
    """
    generator = torch.Generator().manual_seed(rng) if isinstance(rng, int) else rng
    if len(waveforms) == 0:
        raise ValueError("cannot collate an empty batch")
    if len(indices) != len(waveforms):
        raise ValueError(f"got {len(waveforms)} waveforms but {len(indices)} indices")
    for i, wav in enumerate(waveforms):
        if wav.dim() != 1:
            raise ValueError(f"waveform {i} must be 1-D (samples,), got shape {tuple(wav.shape)}")
    sizes = [int(wav.shape[0]) for wav in waveforms]
    target = max(sizes) if enable_padding else min(sizes)
    if max_sample_size is not None:
        target = min(target, int(max_sample_size))

    batch = torch.zeros((len(waveforms), target), dtype=torch.float32)
    lengths = torch.empty(len(waveforms), dtype=torch.int64)
    for i, (wav, size) in enumerate(zip(waveforms, sizes, strict=True)):
        length = min(size, target)
        offset = (
            int(torch.randint(size - length, size=(1,), generator=generator)) if rand_crop and size > length else 0
        )
        batch[i, :length] = wav[offset : offset + length].to(torch.float32)
        lengths[i] = length

    layers = [tuple(layer) for layer in conv_layers]
    frame_lengths = torch.tensor([num_frames(int(n), layers) for n in lengths.tolist()], dtype=torch.int64)
    frames = num_frames(target, layers)
    padded = torch.arange(frames).unsqueeze(0) >= frame_lengths.unsqueeze(1)
    padding_mask = padded if bool(padded.any()) else None
    attention_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
    if mask_prob > 0:
        mask_indices = compute_mask_indices(
            (len(waveforms), frames),
            padded,
            mask_prob,
            mask_length,
            mask_selection,
            mask_other,
            min_masks,
            mask_min_space,
            no_overlap=no_mask_overlap,
            generator=generator,
        )
    else:
        mask_indices = torch.zeros((len(waveforms), 0), dtype=torch.int64)
    return Batch(
        waveforms=batch,
        lengths=lengths,
        frame_lengths=frame_lengths,
        padding_mask=padding_mask,
        attention_mask=attention_mask,
        mask_indices=mask_indices,
        indices=[int(i) for i in indices],
    )
