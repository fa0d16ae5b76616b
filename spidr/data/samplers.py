"""Length-bucketed, size-capped, distributed batch sampler with exact mid-epoch resume.

Plan of one epoch (identical on every rank, since it only depends on ``seed + epoch``):

1. Files shorter than ``min_sample_size`` samples are dropped (listed in :attr:`BucketBatchSampler.dropped`);
   the others have their length capped at ``max_sample_size`` (the collator crops them to it).
2. Files are sorted by capped length and put in ``num_buckets`` buckets, with boundaries uniform between
   ``min_sample_size`` and ``max_sample_size`` (``bucket_method="uniform"``) or at length percentiles
   (``"percentile"``).
3. Files are shuffled within each bucket (``shuffle``), then taken bucket after bucket, shortest bucket first,
   and packed greedily: a file joins the current batch while the batch's cost stays within
   ``max_batch_length``, otherwise it starts a new batch. A file whose cost alone exceeds the limit (only when
   ``max_sample_size`` is larger than ``max_batch_length``) makes a batch of its own.
4. The list of batches is shuffled, then made divisible by ``world_size``: the first batches are repeated
   (cyclically) to pad it, or the last ones are dropped (``drop_last``). Rank ``r`` takes batches
   ``r, r + W, r + 2W, ...``.

Batch cost (see :meth:`BucketBatchSampler.cost`):

- cropping (``enable_padding=False``, the default): the sum of the capped lengths, the rule of the reference
  release. The collated batch, ``files x shortest``, is never larger than that sum, so it is bounded too.
- padding (``enable_padding=True``): ``files x longest capped length``, i.e. the size of the zero-padded batch.
  The release keeps the sum here as well, which lets padded batches exceed ``max_batch_length``; this
  implementation bounds what is actually allocated instead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler"]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, grouped by length and capped in total samples, split across ranks.

    Args:
        lengths: Number of samples of every file of the dataset (index ``i`` of the dataset has ``lengths[i]``).
        max_batch_length: Largest cost of a batch in samples (see the module docstring for the cost rule).
        min_sample_size: Files shorter than this are dropped.
        max_sample_size: Lengths are capped at this (``None``: no cap).
        num_buckets: Number of length buckets.
        bucket_method: ``"uniform"`` bucket boundaries between the smallest and largest lengths, or
            ``"percentile"`` boundaries at the quantiles of the lengths.
        enable_padding: Whether the collator pads to the longest file (cost = files x longest) or crops to the
            shortest (cost = sum of lengths).
        shuffle: Shuffle within buckets and the order of the batches every epoch (seeded by ``seed + epoch``).
            Without it the batches come in increasing length order, the same every epoch.
        seed: Base seed (non-negative); epoch ``e`` is seeded by ``seed + e``.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of ranks sharing the batches.
        drop_last: Drop the last batches so that their number is divisible by ``world_size`` instead of
            repeating the first ones.

    Iterating yields this rank's batches of the current epoch (:meth:`set_epoch`). :meth:`state_dict` records
    the epoch and how many batches have been yielded in it; after :meth:`load_state_dict` the next iteration
    starts with the very next batch. Behind a ``DataLoader`` with worker processes, the loader draws batches
    ahead of the training loop, so save the number of batches the loop consumed as ``position`` rather than the
    sampler's own count.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray | Tensor,
        *,
        max_batch_length: int = 3_800_000,
        min_sample_size: int = 2_000,
        max_sample_size: int | None = 320_000,
        num_buckets: int = 1000,
        bucket_method: Literal["uniform", "percentile"] = "uniform",
        enable_padding: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        all_lengths = np.asarray(lengths.tolist() if isinstance(lengths, Tensor) else lengths, dtype=np.int64)
        if all_lengths.ndim != 1:
            raise ValueError(f"lengths must be a flat sequence of sample counts, got shape {all_lengths.shape}")
        if max_batch_length <= 0:
            raise ValueError(f"max_batch_length must be positive, got {max_batch_length}")
        if min_sample_size < 0 or (max_sample_size is not None and max_sample_size < min_sample_size):
            raise ValueError(
                f"need 0 <= min_sample_size <= max_sample_size, got {min_sample_size} and {max_sample_size}"
            )
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
        if bucket_method not in ("uniform", "percentile"):
            raise ValueError(f"bucket_method must be 'uniform' or 'percentile', got {bucket_method!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, {world_size=}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")

        self.max_batch_length = int(max_batch_length)
        self.min_sample_size = int(min_sample_size)
        self.max_sample_size = None if max_sample_size is None else int(max_sample_size)
        self.num_buckets = int(num_buckets)
        self.bucket_method = bucket_method
        self.enable_padding = bool(enable_padding)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)

        kept = all_lengths >= self.min_sample_size
        #: Dataset indices dropped for being shorter than ``min_sample_size`` (ascending).
        self.dropped: list[int] = np.flatnonzero(~kept).tolist()
        #: Length of every dataset index, capped at ``max_sample_size`` (dropped indices included).
        self.lengths: np.ndarray = (
            all_lengths if self.max_sample_size is None else np.minimum(all_lengths, self.max_sample_size)
        )
        kept_indices = np.flatnonzero(kept)
        if kept_indices.size == 0:
            raise ValueError(f"no file is at least min_sample_size={self.min_sample_size} samples long")
        by_length = np.argsort(self.lengths[kept_indices], kind="stable")
        self._indices = kept_indices[by_length]  # dataset indices, shortest first
        self._lengths = self.lengths[self._indices]
        self._buckets = self._bucket_ids(self._lengths)

        self.epoch = 0
        self._position = 0  # batches yielded in this epoch
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self._plan: tuple[int, list[list[int]]] | None = None

    def _bucket_ids(self, sorted_lengths: np.ndarray) -> np.ndarray:
        if self.bucket_method == "uniform":
            upper = self.max_sample_size if self.max_sample_size is not None else int(sorted_lengths[-1])
            boundaries = np.linspace(self.min_sample_size - 1, upper + 1, self.num_buckets + 1)
        else:
            quantiles = np.linspace(0.0, 1.0, self.num_buckets + 1)
            boundaries = np.quantile(sorted_lengths, quantiles, method="lower")[1:]
        # Bucket i holds the lengths in (boundaries[i - 1], boundaries[i]].
        return np.searchsorted(boundaries, sorted_lengths, side="left")

    def cost(self, batch: Sequence[int]) -> int:
        """Cost in samples of a batch of dataset indices under this sampler's rule (capped lengths)."""
        batch_lengths = self.lengths[np.asarray(batch, dtype=np.int64)]
        if batch_lengths.size == 0:
            return 0
        if self.enable_padding:
            return int(batch_lengths.max()) * int(batch_lengths.size)
        return int(batch_lengths.sum())

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Greedily pack the files in ``order`` (positions in the sorted arrays) into batches."""
        batches: list[list[int]] = []
        batch: list[int] = []
        total = longest = 0
        limit, padding = self.max_batch_length, self.enable_padding
        for index, length in zip(self._indices[order].tolist(), self._lengths[order].tolist(), strict=True):
            cost = (len(batch) + 1) * max(longest, length) if padding else total + length
            if batch and cost > limit:
                batches.append(batch)
                batch, total, longest = [], 0, 0
            batch.append(index)
            total += length
            longest = max(longest, length)
        if batch:
            batches.append(batch)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, for all ranks, in order, before padding or dropping for the ranks."""
        rng = np.random.default_rng(self.seed + epoch)
        if self.shuffle:
            order = np.lexsort((rng.random(self._indices.size), self._buckets))
        else:
            order = np.arange(self._indices.size)
        batches = self._pack(order)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            batches = self.epoch_batches(self.epoch)
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            else:
                missing = -len(batches) % self.world_size
                batches = batches + [batches[i % len(batches)] for i in range(missing)]
            self._plan = (self.epoch, batches[self.rank :: self.world_size])
        return self._plan[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. Changing epoch restarts at its first batch; setting the current epoch
        again keeps a position restored by :meth:`load_state_dict`."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._position = self._resume_at = 0

    def __len__(self) -> int:
        """Number of batches of this rank in the current epoch (the same on every rank)."""
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._resume_at = self._resume_at, 0
        self._position = start
        return self._iterate(batches, start)

    def _iterate(self, batches: list[list[int]], start: int) -> Iterator[list[int]]:
        for batch in batches[start:]:
            self._position += 1
            yield list(batch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": ..., "position": ...}``: the epoch and the number of its batches yielded so far."""
        return {"epoch": self.epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output: the next iteration starts with batch ``position`` of ``epoch``."""
        try:
            epoch, position = operator.index(state["epoch"]), operator.index(state["position"])
        except TypeError as error:
            raise ValueError(f"epoch and position must be integers, got {dict(state)}") from error
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch and position must be non-negative, got {dict(state)}")
        self.epoch = epoch
        available = len(self._rank_batches())
        if position > available:
            raise ValueError(f"position {position} is past the {available} batches of epoch {epoch} on this rank")
        self._position = self._resume_at = position
