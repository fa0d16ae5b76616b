"""The reference release's dataset API (spidr 0.2.0's ``spidr.data.dataset``), on this library's data layer.

``speech_dataset(manifest, normalize=True)`` gives a map-style dataset of 1-D float32 waveforms;
``build_dataloader(data_cfg, masking_cfg)`` a ``DataLoader`` of ``(waveforms, attention_mask, mask_indices)``
batches, bucketed by length and split across ``torch.distributed`` ranks, as the release's training reads them.
Decoding is :func:`spidr.data.audio.decode_audio` (fast PCM WAV path, TorchCodec for the rest), batching is the
plan of :class:`spidr.data.samplers.BucketBatchSampler` and collation :func:`spidr.data.collate.collate`, so the
same seeds give the release's batches. ``python -m spidr.train`` uses :class:`spidr.data.loader.TrainingData`,
which adds exact mid-epoch resume and skips bad files instead of stopping.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset

from spidr.config import DEFAULT_CONV_LAYER_CONFIG, SAMPLE_RATE, DataConfig, MaskingConfig
from spidr.data.audio import decode_audio
from spidr.data.collate import collate
from spidr.data.manifests import AudioEntry, read_entries
from spidr.data.masks import MaskGenerator
from spidr.data.samplers import BucketizeBatchSampler, DistributedBatchSampler, get_buckets, verify_lengths
from spidr.data.utils import bytes_from_archive, read_manifest
from spidr.models.components import num_frames, receptive_field

__all__ = [
    "BucketizeBatchSampler",
    "DistributedBatchSampler",
    "SpeechCollatorWithMasking",
    "SpeechDataset",
    "SpeechDatasetFromArchive",
    "SpeechDatasetFromFiles",
    "build_dataloader",
    "bytes_from_archive",
    "conv_length",
    "crop_audio",
    "get_buckets",
    "min_length_for_model",
    "read_manifest",
    "speech_dataset",
    "verify_lengths",
]

logger = logging.getLogger(__name__)


class SpeechDataset(Dataset[Tensor], abc.ABC):
    """Utterances of a manifest: item ``i`` is the ``i``-th row's waveform, a 1-D float32 tensor at 16 kHz.

    Args:
        manifest_path: a ``.csv``, ``.jsonl`` or fairseq ``.tsv`` manifest (see :mod:`spidr.data.manifests`).
        normalize: standardise every waveform (zero mean, unit variance over the utterance), as the models expect.

    Attributes:
        manifest: the manifest as a polars DataFrame (:func:`spidr.data.manifests.read_manifest`).
        entries: the same rows as :class:`~spidr.data.manifests.AudioEntry`, paths resolved.

    Subclasses implement ``_load_audio(index) -> (samples (channels, frames), sample_rate)``.

    Raises:
        spidr.data.manifests.ManifestError: the manifest cannot be read (named, with line and column).
    """

    def __init__(self, manifest_path: Path | str, *, normalize: bool) -> None:
        super().__init__()
        self.manifest_path = Path(manifest_path)
        self.entries: list[AudioEntry] = read_entries(manifest_path)
        self.manifest = read_manifest(manifest_path)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, index: int) -> AudioEntry:
        """Row ``index`` of the manifest. A relative path that does not exist beside the manifest but does from
        the current directory (where the release looks) is taken from there."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self.entries) <= index < len(self.entries):
            raise IndexError(f"index {index} is out of range for {self.manifest_path} ({len(self.entries)} rows)")
        entry = self.entries[index]
        column = "archive" if entry.archive is not None else "path"
        written = str(self.manifest[index, column])
        resolved = entry.archive if entry.archive is not None else entry.path
        if not os.path.isabs(written) and not os.path.exists(resolved) and os.path.exists(written):
            fallback = os.path.abspath(written)
            return AudioEntry(
                entry.fileid,
                entry.path if entry.archive is not None else fallback,
                entry.num_samples,
                fallback if entry.archive is not None else None,
                entry.byte_offset,
                entry.byte_size,
            )
        return entry

    @abc.abstractmethod
    def _load_audio(self, index: int) -> tuple[Tensor, int]:
        """``(samples, sample_rate)`` of row ``index``: samples of shape (channels, frames)."""

    def __getitem__(self, index: int) -> Tensor:
        waveform, sample_rate = self._load_audio(index)
        if not isinstance(waveform, Tensor) or waveform.dim() != 2:
            got = tuple(waveform.shape) if isinstance(waveform, Tensor) else type(waveform).__name__
            raise ValueError(f"_load_audio({index}) must return samples of shape (channels, frames), got {got}")
        if sample_rate != SAMPLE_RATE or waveform.shape[0] != 1:
            raise ValueError(
                f"Sample {index} ({self.entries[index].path}): expected mono audio at {SAMPLE_RATE} Hz, "
                f"got {waveform.shape[0]} channel(s) at {sample_rate} Hz"
            )
        waveform = waveform.to(torch.float32)
        if self.normalize:
            waveform = torch.nn.functional.layer_norm(waveform, waveform.shape)
        return waveform[0]


class SpeechDatasetFromFiles(SpeechDataset):
    """A :class:`SpeechDataset` of audio files (the manifest's ``path`` column)."""

    def _load_audio(self, index: int) -> tuple[Tensor, int]:
        return decode_audio(self.entry(index))


class SpeechDatasetFromArchive(SpeechDataset):
    """A :class:`SpeechDataset` of members of uncompressed tar archives (``archive``, ``byte_offset``,
    ``byte_size`` columns); each member's bytes are read at their offset and decoded in memory."""

    def _load_audio(self, index: int) -> tuple[Tensor, int]:
        entry = self.entry(index)
        if entry.archive is None:
            raise ValueError(f"{self.manifest_path}: row {index} has no archive (use SpeechDatasetFromFiles)")
        return decode_audio(entry)


def speech_dataset(manifest_path: Path | str, *, normalize: bool) -> SpeechDataset:
    """The dataset of a manifest: :class:`SpeechDatasetFromArchive` when its rows are tar members, else
    :class:`SpeechDatasetFromFiles`.

    Raises:
        spidr.data.manifests.ManifestError: the manifest cannot be read (named, with line and column).
    """
    entries = read_entries(manifest_path)
    if entries and all(entry.archive is not None for entry in entries):
        return SpeechDatasetFromArchive(manifest_path, normalize=normalize)
    return SpeechDatasetFromFiles(manifest_path, normalize=normalize)


def conv_length(shapes: Sequence[tuple[int, int, int]], length: Tensor) -> Tensor:
    """Frames the conv extractor ``shapes`` (``(channels, kernel, stride)`` per layer) gives for ``length``
    samples (any integer tensor), 0 where too short."""
    for _, kernel, stride in shapes:
        length = torch.clamp(torch.div(length - kernel, stride, rounding_mode="floor") + 1, min=0)
    return length


def crop_audio(waveform: Tensor, num_samples: int, max_sample_size: int, *, rand_crop: bool) -> tuple[Tensor, int]:
    """Cut a 1-D ``waveform`` to ``min(num_samples, max_sample_size)`` samples (or keep it when shorter), at a
    random offset from torch's global generator (``rand_crop``) or from its start; returns ``(samples, length)``."""
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be 1-D (samples,), got shape {tuple(waveform.shape)}")
    target = min(num_samples, max_sample_size)
    length = waveform.shape[0]
    if length <= target:
        return waveform, length
    offset = int(torch.randint(length - target, size=(1,))) if rand_crop else 0
    return waveform[offset : offset + target], target


class SpeechCollatorWithMasking:
    """Collate 1-D waveforms into ``(waveforms, attention_mask, mask_indices)`` (the release's collator).

    Waveforms are cropped to the shortest of the batch at random offsets (``rand_crop``), or padded to the
    longest (``enable_padding``), at most ``max_sample_size`` samples; ``attention_mask`` is the bool
    (batch, 1, 1, frames) keep-mask, ``None`` without padding; ``mask_indices`` come from ``mask_generator``
    (``None`` when it masks nothing). Random numbers come from torch's global generator.
    """

    def __init__(
        self,
        mask_generator: MaskGenerator,
        *,
        max_sample_size: int,
        conv_layer_config: list[tuple[int, int, int]],
        enable_padding: bool,
        rand_crop: bool,
    ) -> None:
        self.mask_generator = mask_generator
        self.max_sample_size = max_sample_size
        self.conv_layer_config = conv_layer_config
        self.enable_padding = enable_padding
        self.rand_crop = rand_crop

    def __call__(self, batch: list[Tensor]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        out = collate(
            batch,
            list(range(len(batch))),
            conv_layers=self.conv_layer_config,
            enable_padding=self.enable_padding,
            rand_crop=self.rand_crop,
            max_sample_size=self.max_sample_size,
            mask_prob=0.0,
            rng=None,
        )
        frames = num_frames(out.waveforms.shape[1], [tuple(layer) for layer in self.conv_layer_config])
        padding_mask = out.padding_mask
        if padding_mask is None:
            padding_mask = torch.zeros((len(batch), frames), dtype=torch.bool)
        mask_indices = self.mask_generator(padding_mask)[0]
        return out.waveforms, out.attention_mask, mask_indices


def min_length_for_model(cfg: DataConfig, lengths: Sequence[int], conv_layers: Sequence[tuple[int, int, int]]) -> int:
    """The shortest file (in samples) a batch may hold: ``cfg.min_sample_size``, raised to the model's receptive
    field when it is below it and the manifest holds files in between (they would give no frame: they are left
    out, with a warning naming ``data.min_sample_size``)."""
    needed = receptive_field([tuple(layer) for layer in conv_layers])
    if cfg.min_sample_size >= needed:
        return cfg.min_sample_size
    too_short = sum(1 for n in lengths if cfg.min_sample_size <= n < needed)
    if too_short:
        logger.warning(
            "%s: %d file(s) are shorter than the model's receptive field (%d samples) though not shorter than "
            "data.min_sample_size = %d; they give no frame and are left out",
            cfg.manifest,
            too_short,
            needed,
            cfg.min_sample_size,
        )
    return needed


def build_dataloader(
    data_cfg: DataConfig,
    mask_cfg: MaskingConfig,
    *,
    conv_layer_config: list[tuple[int, int, int]] | None = None,
) -> DataLoader:
    """A ``DataLoader`` over ``data_cfg.manifest`` as the release's training reads it.

    Batches are ``(waveforms, attention_mask, mask_indices)`` (see :class:`SpeechCollatorWithMasking`), of at most
    ``max_batch_length`` samples, bucketed by length, shuffled and split across the ``torch.distributed`` ranks
    (:class:`DistributedBatchSampler`); call ``loader.batch_sampler.set_epoch(epoch)`` at each epoch.

    Raises:
        spidr.data.manifests.ManifestError: the manifest cannot be read.
        ValueError: inconsistent length options, or no file long enough.
    """
    layers = conv_layer_config or DEFAULT_CONV_LAYER_CONFIG
    dataset = speech_dataset(data_cfg.manifest, normalize=data_cfg.normalize)
    lengths = [entry.num_samples for entry in dataset.entries]
    sampler = DistributedBatchSampler(
        BucketizeBatchSampler(
            lengths=lengths,
            num_buckets=data_cfg.num_buckets,
            min_len=min_length_for_model(data_cfg, lengths, layers),
            max_len=data_cfg.max_sample_size,
            max_token_count=data_cfg.max_batch_length,
            batch_size=None,
            seed=data_cfg.random_seed,
            bucket_method=data_cfg.bucket_method,
            shuffle=True,
            drop_last=data_cfg.drop_last,
        ),
        seed=data_cfg.random_seed,
        shuffle=True,
        drop_last=data_cfg.drop_last,
    )
    collator = SpeechCollatorWithMasking(
        MaskGenerator(mask_cfg),
        max_sample_size=data_cfg.max_sample_size,
        conv_layer_config=layers,
        enable_padding=data_cfg.enable_padding,
        rand_crop=data_cfg.rand_crop,
    )
    workers = data_cfg.num_workers
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collator,
        pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=data_cfg.persistent_workers and workers > 0,
        generator=torch.Generator().manual_seed(data_cfg.random_seed + rank),
    )
