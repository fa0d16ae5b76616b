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

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Sampler

__all__ = [
    "BucketBatchSampler",
    "BucketizeBatchSampler",
    "DistributedBatchSampler",
    "get_buckets",
    "rank_share",
    "verify_lengths",
]


def verify_lengths(min_len: int, max_len: int, batch_size: int | None, max_token_count: int | None) -> None:
    """Check the length options of a bucketing sampler; raise one ValueError listing every problem.

    ``0 <= min_len <= max_len``; exactly one of ``batch_size`` (files per batch) and ``max_token_count`` (samples
    per batch); and ``max_len <= max_token_count`` so that every file fits in a batch.
    """
    problems = []
    if not 0 <= min_len <= max_len:
        problems.append(f"min_len ({min_len}) must be at least 0 and at most max_len ({max_len})")
    if max_token_count is not None and batch_size is not None:
        problems.append("max_token_count and batch_size cannot both be set")
    if max_token_count is None and batch_size is None:
        problems.append("max_token_count or batch_size must be set")
    if max_token_count is not None and max_len > max_token_count:
        problems.append(f"max_len ({max_len}) must be at most max_token_count ({max_token_count})")
    if problems:
        raise ValueError("; ".join(problems))


def get_buckets(lengths: Sequence[int], num_buckets: int, uniform_limits: tuple[int, int] | None) -> dict[int, Tensor]:
    """Group positions of ``lengths`` (sorted ascending) into length buckets.

    Bucket ``i`` holds the lengths in ``(b[i - 1], b[i]]`` for boundaries ``b``: ``num_buckets + 1`` float32 points
    evenly spaced from ``uniform_limits[0] - 1`` to ``uniform_limits[1] + 1``, or, with ``uniform_limits=None``,
    the ``lower`` quantiles of the lengths at ``1/num_buckets, 2/num_buckets, ..., 1``.

    Returns:
        bucket id -> int32 tensor of the positions in that bucket (ascending), for the non-empty buckets, in
        increasing bucket order (the reference release's layout).
    """
    if num_buckets < 0:
        raise ValueError(f"num_buckets must be non-negative, got {num_buckets}")
    values = torch.tensor(list(lengths), dtype=torch.int64)
    if uniform_limits is not None:
        boundaries = torch.linspace(uniform_limits[0] - 1, uniform_limits[1] + 1, num_buckets + 1)
    elif values.numel() == 0:
        return {}
    else:
        quantiles = torch.linspace(0, 1, num_buckets + 1)
        boundaries = torch.quantile(values.to(torch.float32), quantiles, interpolation="lower")[1:]
    ids = torch.bucketize(values, boundaries)
    order = torch.argsort(ids, stable=True).to(torch.int32)  # positions grouped by bucket, ascending within each
    present, counts = torch.unique_consecutive(ids[order.long()], return_counts=True)
    return dict(zip(present.tolist(), torch.split(order, counts.tolist()), strict=True))


def rank_share(batches: list[list[int]], rank: int, world_size: int, *, drop_last: bool) -> list[list[int]]:
    """Rank ``rank``'s batches: ``batches`` made divisible by ``world_size`` (the last ones dropped with
    ``drop_last``, else the first ones repeated, cyclically when there are fewer batches than ranks), then every
    ``world_size``-th batch from position ``rank``."""
    if drop_last:
        batches = batches[: len(batches) - len(batches) % world_size]
    elif batches:
        missing = -len(batches) % world_size
        batches = batches + [batches[i % len(batches)] for i in range(missing)]
    return batches[rank::world_size]


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
        batch_size: Batches of at most this many files instead of ``max_batch_length`` samples.

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
        batch_size: int | None = None,
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
        if num_buckets < 0:
            raise ValueError(f"num_buckets must be non-negative, got {num_buckets}")
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
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size

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
        upper = self.max_sample_size if self.max_sample_size is not None else int(all_lengths.max())
        limits = (self.min_sample_size, upper) if self.bucket_method == "uniform" else None
        #: Bucket id -> positions (in the length-sorted order of the kept files) of the files in that bucket.
        self.buckets: dict[int, Tensor] = get_buckets(self._lengths.tolist(), self.num_buckets, limits)

        self.epoch = 0
        self._position = 0  # batches yielded in this epoch
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self._plan: tuple[int, list[list[int]]] | None = None

    def cost(self, batch: Sequence[int]) -> int:
        """Cost in samples of a batch of dataset indices under this sampler's rule (capped lengths)."""
        batch_lengths = self.lengths[np.asarray(batch, dtype=np.int64)]
        if batch_lengths.size == 0:
            return 0
        if self.batch_size is not None:
            return int(batch_lengths.size)
        if self.enable_padding:
            return int(batch_lengths.max()) * int(batch_lengths.size)
        return int(batch_lengths.sum())

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Greedily pack the files in ``order`` (positions in the sorted arrays) into batches."""
        batches: list[list[int]] = []
        batch: list[int] = []
        total = longest = 0
        limit, padding = self.max_batch_length, self.enable_padding
        if self.batch_size is not None:
            limit, padding = self.batch_size, False
        for index, length in zip(self._indices[order].tolist(), self._lengths[order].tolist(), strict=True):
            if self.batch_size is not None:
                length = 1
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

    def bucket_order(self, epoch: int) -> np.ndarray:
        """Positions (in the length-sorted order of the kept files) in the order they are packed in ``epoch``:
        bucket after bucket, shortest first, shuffled within each bucket (``shuffle``) by a torch generator seeded
        ``seed + epoch`` drawing one ``randperm`` per bucket, in bucket order, as the reference release does."""
        if not self.shuffle:
            return np.arange(self._indices.size)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = [bucket[torch.randperm(bucket.numel(), generator=generator)] for bucket in self.buckets.values()]
        return torch.cat(order).numpy().astype(np.int64)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, for all ranks, in order, before padding or dropping for the ranks.

        With ``shuffle`` the batches are permuted by a generator seeded ``seed + epoch`` (the release's
        ``DistributedBatchSampler``): with the release's cost rule (cropping), the same seed and epoch give the
        same batches as its ``BucketizeBatchSampler.set_epoch(epoch)``.
        """
        batches = self._pack(self.bucket_order(epoch))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            batches = rank_share(self.epoch_batches(self.epoch), self.rank, self.world_size, drop_last=self.drop_last)
            self._plan = (self.epoch, batches)
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


# --------------------------------------------------------------------------------------------------------------------
# The reference release's two-level sampler (spidr 0.2.0's names and arguments), on the same plan as above.


class BucketizeBatchSampler(BatchSampler):
    """Length-bucketed batches of one process (the reference release's ``BucketizeBatchSampler``).

    ``iter_list`` holds the epoch's batches in bucket order (shortest bucket first, shuffled within buckets with
    ``shuffle``); :class:`DistributedBatchSampler` shuffles and splits them across ranks. The plan is
    :class:`BucketBatchSampler`'s, so both give the same batches for the same seed and epoch.

    Args:
        lengths: number of samples of every dataset index.
        num_buckets: number of length buckets.
        min_len: files shorter than this are left out.
        max_len: lengths are capped at this (``None``: the longest file).
        max_token_count: at most this many samples per batch (sum of the capped lengths) ...
        batch_size: ... or at most this many files per batch (exactly one of the two).
        seed: the shuffling seed; :meth:`set_epoch` reseeds with ``seed + epoch``.
        bucket_method: ``"uniform"`` or ``"percentile"`` bucket boundaries.
        shuffle: shuffle within buckets.
        drop_last: with ``batch_size``, leave out the epoch's last batch.

    Raises:
        ValueError: inconsistent lengths (:func:`verify_lengths`), an unknown ``bucket_method``, or no file of
            at least ``min_len`` samples.
    """

    def __init__(
        self,
        *,
        lengths: list[int],
        num_buckets: int,
        min_len: int,
        max_len: int | None,
        max_token_count: int | None,
        batch_size: int | None,
        seed: int,
        bucket_method: Literal["uniform", "percentile"],
        shuffle: bool,
        drop_last: bool,
    ) -> None:  # BatchSampler's own __init__ is not called: it needs a sampler, this class has its own plan
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("lengths is empty: no file to batch")
        if max_len is None:
            max_len = max(lengths)
        verify_lengths(min_len, max_len, batch_size, max_token_count)
        if bucket_method not in ("uniform", "percentile"):
            raise ValueError(f"bucket_method must be either 'uniform' or 'percentile', got {bucket_method!r}")
        try:
            self._plan = BucketBatchSampler(
                lengths,
                max_batch_length=max_token_count or 1,
                min_sample_size=min_len,
                max_sample_size=max_len,
                num_buckets=num_buckets,
                bucket_method=bucket_method,
                shuffle=shuffle,
                seed=seed,
                batch_size=batch_size,
            )
        except ValueError as error:
            raise ValueError(f"No samples with length in the range [{min_len}, {max_len}]: {error}") from None
        self.max_token_count, self.batch_size = max_token_count, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        #: Capped lengths of the files kept, shortest first, and their dataset indices.
        self.lengths: list[int] = self._plan._lengths.tolist()
        self.indices: list[int] = self._plan._indices.tolist()
        self.buckets = self._plan.buckets
        self.epoch = 0
        self._update_iter_list()

    def _update_iter_list(self) -> None:
        batches = self._plan._pack(self._plan.bucket_order(self.epoch))
        if batches and self.batch_size is not None and self.drop_last:
            batches = batches[:-1]
        self.iter_list: list[list[int]] = batches

    def set_epoch(self, epoch: int) -> None:
        """Make the batches of ``epoch`` (shuffled with ``seed + epoch``)."""
        self.epoch = int(epoch)
        self._update_iter_list()

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.iter_list)

    def __len__(self) -> int:
        return len(self.iter_list)


class DistributedBatchSampler(Sampler[list[int]]):
    """The batches of a :class:`BucketizeBatchSampler` shuffled and split across the ranks of
    ``torch.distributed`` (one rank without a process group); the reference release's class.

    Every epoch the batch list is permuted with ``seed + epoch`` (``shuffle``), made divisible by the world size
    (the last batches dropped with ``drop_last``, else the first ones repeated) and rank ``r`` takes batches
    ``r, r + W, ...``: every rank gets the same number of batches.
    """

    def __init__(self, batch_sampler: BucketizeBatchSampler, *, seed: int, shuffle: bool, drop_last: bool) -> None:
        super().__init__()
        if not isinstance(batch_sampler, BucketizeBatchSampler):
            raise TypeError(f"batch_sampler must be a BucketizeBatchSampler, got {type(batch_sampler).__name__}")
        self.batch_sampler = batch_sampler
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = torch.distributed.get_world_size() if initialized else 1
        self.rank = torch.distributed.get_rank() if initialized else 0
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        count = len(batch_sampler.iter_list)
        if drop_last:
            self.num_samples = count // self.num_replicas
        else:
            self.num_samples = math.ceil(count / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``, for this sampler and its batch sampler."""
        self.batch_sampler.set_epoch(epoch)
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batch_sampler.iter_list)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self.subset = rank_share(batches, self.rank, self.num_replicas, drop_last=self.drop_last)
        self.num_samples = len(self.subset)
        return iter(self.subset)

    def __len__(self) -> int:
        return self.num_samples
