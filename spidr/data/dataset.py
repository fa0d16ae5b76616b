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
from spidr.data.manifests import AudioEntry, ManifestError, manifest_columns
from spidr.data.masks import MaskGenerator
from spidr.data.samplers import BucketizeBatchSampler, DistributedBatchSampler, get_buckets, verify_lengths
from spidr.data.utils import bytes_from_archive, read_manifest
from spidr.models.components import receptive_field

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
    """Utterances of a manifest: item ``i`` is the ``i``-th row's waveform, a 1-D tensor at 16 kHz (float32).

    Args:
        manifest_path: a ``.csv``, ``.jsonl`` or fairseq ``.tsv`` manifest (see :mod:`spidr.data.manifests`).
        normalize: standardise every waveform (zero mean, unit variance over the utterance), as the models expect.

    Attributes:
        manifest: the manifest as a polars DataFrame (:func:`spidr.data.manifests.read_manifest`). The dataset
            reads its rows when an item is asked for, so a filtered or extended DataFrame assigned here is the
            dataset's from then on (extra columns, e.g. labels, are kept for subclasses).

    Subclasses implement ``_load_audio(index) -> (samples (channels, frames), sample_rate)``.

    Raises:
        spidr.data.manifests.ManifestError: the manifest cannot be read (named, with the line when known).
    """

    def __init__(self, manifest_path: Path | str, *, normalize: bool) -> None:
        super().__init__()
        self.manifest_path = Path(manifest_path)
        self.manifest = read_manifest(manifest_path)
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.manifest)

    def _resolve(self, written: str) -> str:
        """A path as written in the manifest: absolute as is; a relative one beside the manifest when it exists
        there, else from the current directory (where the release looks)."""
        if os.path.isabs(written):
            return written
        beside = str(self.manifest_path.resolve().parent / written)
        return beside if os.path.exists(beside) or not os.path.exists(written) else os.path.abspath(written)

    def entry(self, index: int) -> AudioEntry:
        """Row ``index`` of the manifest as an :class:`~spidr.data.manifests.AudioEntry` (paths resolved).

        Raises:
            TypeError: ``index`` is not an int.
            IndexError: ``index`` is out of range.
            ValueError: the row has no ``path`` (or, for a tar member, no ``byte_offset``/``byte_size``).
        """
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self.manifest) <= index < len(self.manifest):
            raise IndexError(f"index {index} is out of range for {self.manifest_path} ({len(self.manifest)} rows)")
        row = self.manifest.row(index, named=True)
        if row.get("path") in (None, ""):
            raise ValueError(
                f"{self.manifest_path}, row {index}: no 'path' to read the audio from (columns: "
                f"{', '.join(self.manifest.columns)})"
            )
        path = str(row["path"])
        count = row.get("num_samples")
        num_samples = int(float(count)) if count not in (None, "") else 0
        fileid = str(row.get("fileid") or Path(path).stem)
        archive = row.get("archive")
        if archive in (None, ""):
            return AudioEntry(fileid, self._resolve(path), num_samples)
        offset, size = row.get("byte_offset"), row.get("byte_size")
        if offset is None or size is None:
            raise ValueError(f"{self.manifest_path}, row {index}: a tar member needs byte_offset and byte_size")
        return AudioEntry(fileid, path, num_samples, self._resolve(str(archive)), int(offset), int(size))

    @abc.abstractmethod
    def _load_audio(self, index: int) -> tuple[Tensor, int]:
        """``(samples, sample_rate)`` of row ``index``: samples of shape (channels, frames)."""

    def __getitem__(self, index: int) -> Tensor:
        waveform, sample_rate = self._load_audio(index)
        if not isinstance(waveform, Tensor) or waveform.dim() != 2:
            got = tuple(waveform.shape) if isinstance(waveform, Tensor) else type(waveform).__name__
            raise ValueError(f"_load_audio({index}) must return samples of shape (channels, frames), got {got}")
        if sample_rate != SAMPLE_RATE or waveform.shape[0] != 1:
            where = self.manifest["path"][index] if "path" in self.manifest.columns else f"row {index}"
            raise ValueError(
                f"Sample {index} ({where}): expected mono audio at {SAMPLE_RATE} Hz, "
                f"got {waveform.shape[0]} channel(s) at {sample_rate} Hz"
            )
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
    """The dataset of a manifest: :class:`SpeechDatasetFromArchive` when it has the tar columns (``archive``,
    ``byte_offset``, ``byte_size``), else :class:`SpeechDatasetFromFiles`.

    Raises:
        spidr.data.manifests.ManifestError: the manifest cannot be read (named).
    """
    tar_columns = {"archive", "byte_offset", "byte_size"} <= set(manifest_columns(manifest_path))
    return (SpeechDatasetFromArchive if tar_columns else SpeechDatasetFromFiles)(manifest_path, normalize=normalize)


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
        padding_mask = out.padding_mask
        if padding_mask is None:  # every row has all the frames
            padding_mask = torch.zeros((len(batch), int(out.frame_lengths.max())), dtype=torch.bool)
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
    if "num_samples" not in dataset.manifest.columns:
        raise ManifestError(f"{data_cfg.manifest}: no 'num_samples' column, which batching needs")
    lengths = [int(float(n)) for n in dataset.manifest["num_samples"].to_list()]
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
