"""The training data stream: manifest -> bucketed batches -> decoded, collated, masked batches.

Bad audio files (unreadable, not mono 16 kHz, NaN samples, or shorter than the model's receptive field
once decoded) are skipped and counted (logged by path); the run stops when more than
``run.max_bad_fraction`` of the files read were bad, judged once :data:`JUDGE_AFTER_FILES` files (or
every file of the manifest, when it holds fewer) have been read, so that one bad file in the first batch
does not stop a run. Each batch's random crop and masks come from a generator seeded by (seed, epoch,
batch position), so a resumed run draws exactly the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spidr.config import DataConfig, DinoSRConfig, MaskingConfig
from spidr.data.audio import AudioError, load_audio
from spidr.data.collate import Batch, collate
from spidr.data.dataset import min_length_for_model
from spidr.data.manifests import read_entries
from spidr.data.samplers import BucketBatchSampler
from spidr.models.components import receptive_field

logger = logging.getLogger(__name__)

JUDGE_AFTER_FILES = 1000
"""The fraction of bad files is judged once this many files (or the whole manifest, if smaller) were read."""


class _AudioDataset(Dataset):
    """Item ``(index, epoch, position)`` -> ``(index, epoch, position, waveform or None, error or None)``."""

    def __init__(self, entries: list, cfg: DataConfig, min_samples: int) -> None:
        self.entries, self.cfg, self.min_samples = entries, cfg, min_samples

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, int, int, torch.Tensor | None, str | None]:
        index, epoch, position = key
        try:
            wav = load_audio(self.entries[index], resample=self.cfg.resample, normalize=self.cfg.normalize)
        except AudioError as error:
            return index, epoch, position, None, str(error)
        if wav.numel() < self.min_samples:  # the manifest's num_samples was wrong: the model cannot take it
            entry = self.entries[index]
            name = entry.path if entry.archive is None else f"{entry.path} in archive {entry.archive}"
            reason = f"{wav.numel()} samples after decoding, fewer than the model's receptive field"
            return index, epoch, position, None, f"{name}: {reason} ({self.min_samples})"
        return index, epoch, position, wav, None


class _KeyedSampler:
    """Yields each batch of the bucketed sampler as keys carrying (epoch, position) for the collate RNG."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.sampler.state_dict()["epoch"]
        start = self.sampler.state_dict()["position"]
        for offset, indices in enumerate(self.sampler):
            yield [(i, epoch, start + offset) for i in indices]


class TrainingData:
    """Manifest, sampler and loader of one training process (one rank).

    With ``max_bad_fraction``, :meth:`batches` raises :class:`~spidr.train.TrainingError` as soon as more than
    that fraction of the files read were bad (see the module's docstring), whether or not a batch is yielded.
    """

    def __init__(
        self,
        cfg: DataConfig,
        masking: MaskingConfig,
        model: DinoSRConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_bad_fraction: float | None = None,
    ) -> None:
        self.cfg, self.masking, self.model_cfg = cfg, masking, model
        self.max_bad_fraction = max_bad_fraction
        self.entries = read_entries(cfg.manifest)
        lengths = [e.num_samples for e in self.entries]
        self.sampler = BucketBatchSampler(
            lengths,
            max_batch_length=cfg.max_batch_length,
            min_sample_size=min_length_for_model(cfg, lengths, model.extractor_conv_layer_config),
            max_sample_size=cfg.max_sample_size,
            num_buckets=cfg.num_buckets,
            bucket_method=cfg.bucket_method,
            enable_padding=cfg.enable_padding,
            drop_last=cfg.drop_last,
            seed=cfg.random_seed,
            rank=rank,
            world_size=world_size,
        )
        if self.sampler.dropped:
            logger.info(
                "%d files shorter than %d samples are left out",
                len(self.sampler.dropped),
                self.sampler.min_sample_size,
            )
        self.judge_after = min(JUDGE_AFTER_FILES, len(self.entries) - len(self.sampler.dropped))
        self.bad_files = 0
        self.files_read = 0
        self.epoch, self.position = 0, 0

    def _collate(self, items: list[tuple[int, int, int, torch.Tensor | None, str | None]]) -> Batch | None:
        good = [(index, wav) for index, _, _, wav, error in items if wav is not None]
        for _, _, _, _, error in items:
            if error is not None:
                logger.warning("Skipping bad audio file: %s", error)
        _, epoch, position, _, _ = items[0]
        self._last_counts = (len(items), len(items) - len(good))
        if not good:
            return None
        # One generator per batch, seeded by (seed, epoch, position): a resumed run draws the same batch.
        seed = int(np.random.SeedSequence([self.cfg.random_seed, epoch, position]).generate_state(1)[0])
        rng = torch.Generator().manual_seed(seed)
        return collate(
            [wav for _, wav in good],
            [index for index, _ in good],
            conv_layers=self.model_cfg.extractor_conv_layer_config,
            enable_padding=self.cfg.enable_padding,
            rand_crop=self.cfg.rand_crop,
            max_sample_size=self.cfg.max_sample_size,
            mask_prob=self.masking.mask_prob,
            mask_length=self.masking.mask_length,
            mask_selection=self.masking.mask_selection,
            mask_other=self.masking.mask_other,
            no_mask_overlap=self.masking.no_mask_overlap,
            mask_min_space=self.masking.mask_min_space,
            rng=rng,
        )

    def batches(self) -> Iterator[Batch]:
        """This epoch's remaining batches, from the sampler's current position."""
        loader = DataLoader(
            _AudioDataset(self.entries, self.cfg, receptive_field(self.model_cfg.extractor_conv_layer_config)),
            batch_sampler=_KeyedSampler(self.sampler),
            collate_fn=self._collate_counting,
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers > 0 else None,
            persistent_workers=False,
            # Its own generator: creating the iterator must not draw from the global torch RNG, or a
            # run resumed mid-epoch (a new iterator) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.random_seed),
        )
        for batch, (read, bad), (epoch, position) in loader:
            self.files_read += read
            self.bad_files += bad
            # Position of the batches consumed, not of the sampler, which loader workers run ahead of.
            self.epoch, self.position = epoch, position + 1
            if self.max_bad_fraction is not None:
                self.check_bad_fraction(self.max_bad_fraction)
            if batch is not None:
                yield batch

    def _collate_counting(self, items: list) -> tuple[Batch | None, tuple[int, int], tuple[int, int]]:
        batch = self._collate(items)
        return batch, self._last_counts, (items[0][1], items[0][2])

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands (the epoch and the number of its batches already consumed), and the
        bad-file counts so far."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "bad_files": self.bad_files,
            "files_read": self.files_read,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.bad_files, self.files_read = int(state.get("bad_files", 0)), int(state.get("files_read", 0))
        self.sampler.load_state_dict({"epoch": self.epoch, "position": self.position})

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (from its first batch, unless a resumed state put us inside it)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self.sampler.set_epoch(epoch)
        self.sampler.load_state_dict({"epoch": epoch, "position": self.position})

    def check_bad_fraction(self, limit: float) -> None:
        """Raise when more than ``limit`` of the files read so far were bad, once enough files were read."""
        from spidr.train import TrainingError

        judged = self.files_read >= self.judge_after or self.bad_files > limit * self.judge_after
        if judged and self.files_read and self.bad_files / self.files_read > limit:
            raise TrainingError(
                f"{self.bad_files} of {self.files_read} audio files read were unreadable, more than "
                f"run.max_bad_fraction = {limit}; see the warnings above for their paths and reasons"
            )
