"""Batching layer: bucketed distributed batch sampler, span masks and collation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from spidr.config import DEFAULT_CONV_LAYER_CONFIG
from spidr.data.collate import Batch, collate
from spidr.data.masks import compute_mask_indices
from spidr.data.samplers import BucketBatchSampler
from spidr.models.components import num_frames

MAX_BATCH = 3_800_000
MIN_SIZE = 2_000
MAX_SIZE = 320_000


def speech_lengths(n: int = 3000, seed: int = 0) -> list[int]:
    """Sample counts spanning too short files, ordinary ones and files above the cap."""
    rng = np.random.default_rng(seed)
    return rng.integers(500, 450_000, size=n).tolist()


def sampler(lengths: list[int], **kwargs) -> BucketBatchSampler:
    options = {"max_batch_length": MAX_BATCH, "min_sample_size": MIN_SIZE, "max_sample_size": MAX_SIZE}
    return BucketBatchSampler(lengths, **(options | kwargs))


def epoch_of(s: BucketBatchSampler, epoch: int) -> list[list[int]]:
    s.set_epoch(epoch)
    return list(s)


def all_ranks(lengths: list[int], world_size: int, epoch: int = 0, **kwargs) -> list[list[list[int]]]:
    return [epoch_of(sampler(lengths, rank=r, world_size=world_size, **kwargs), epoch) for r in range(world_size)]


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("enable_padding", [False, True], ids=["crop", "pad"])
@pytest.mark.parametrize("bucket_method", ["uniform", "percentile"])
def test_batches_within_max_batch_length(enable_padding: bool, bucket_method: str) -> None:
    lengths = speech_lengths()
    s = sampler(lengths, enable_padding=enable_padding, bucket_method=bucket_method)
    assert s.lengths.max() <= MAX_SIZE
    assert s.lengths.tolist() == [min(n, MAX_SIZE) for n in lengths]
    for batch in epoch_of(s, 3):
        capped = [min(lengths[i], MAX_SIZE) for i in batch]
        cost = len(batch) * max(capped) if enable_padding else sum(capped)
        assert cost == s.cost(batch)
        assert cost <= MAX_BATCH
        # What the collator allocates is bounded in both modes.
        assert len(batch) * (max(capped) if enable_padding else min(capped)) <= MAX_BATCH
    # Packing is greedy: batches are not needlessly small.
    batches = list(s)
    assert len(batches) < 1.25 * sum(s.cost([i]) for b in batches for i in b) / MAX_BATCH + 2


def test_single_file_above_the_limit_gets_its_own_batch() -> None:
    lengths = [5_000] * 10 + [50_000] + [5_000] * 10
    s = BucketBatchSampler(lengths, max_batch_length=20_000, min_sample_size=0, max_sample_size=None)
    batches = list(s)
    assert [10] in batches
    assert all(s.cost(b) <= 20_000 for b in batches if b != [10])


def test_every_kept_index_once_per_epoch_and_short_files_dropped() -> None:
    lengths = speech_lengths()
    s = sampler(lengths)
    expected_dropped = [i for i, n in enumerate(lengths) if n < MIN_SIZE]
    assert expected_dropped and s.dropped == expected_dropped
    kept = sorted(set(range(len(lengths))) - set(expected_dropped))
    for epoch in (0, 1):
        batches = epoch_of(s, epoch)
        assert len(batches) == len(s)
        assert sorted(i for b in batches for i in b) == kept
    with pytest.raises(ValueError, match="min_sample_size"):
        sampler([100, 200])


def test_same_seed_and_epoch_same_batches_other_epoch_other_order() -> None:
    lengths = speech_lengths()
    first = epoch_of(sampler(lengths, seed=7), 2)
    assert epoch_of(sampler(lengths, seed=7), 2) == first
    s = sampler(lengths, seed=7)
    assert epoch_of(s, 2) == first and epoch_of(s, 3) != first and epoch_of(s, 2) == first
    assert epoch_of(sampler(lengths, seed=8), 2) != first
    assert sorted(i for b in epoch_of(s, 3) for i in b) == sorted(i for b in first for i in b)


def test_without_shuffle_batches_go_by_length() -> None:
    lengths = speech_lengths()
    s = sampler(lengths, shuffle=False)
    batches = epoch_of(s, 0)
    assert epoch_of(s, 1) == batches
    flat = [min(lengths[i], MAX_SIZE) for b in batches for i in b]
    assert flat == sorted(flat)


def test_buckets_shuffle_within_similar_lengths() -> None:
    # With one bucket the order within batches is random; with many, every batch holds similar lengths.
    lengths = speech_lengths()
    s = sampler(lengths, num_buckets=1000)
    spread = [max(s.lengths[b]) - min(s.lengths[b]) for b in epoch_of(s, 0)]
    assert np.median(spread) < 10_000
    s1 = sampler(lengths, num_buckets=1)
    assert np.median([max(s1.lengths[b]) - min(s1.lengths[b]) for b in epoch_of(s1, 0)]) > 100_000


# 13 batches of 4 files each: not divisible by 2, 3 or 8.
EVEN_LENGTHS = [3_000] * 52
EVEN_OPTIONS = {"max_batch_length": 12_000, "min_sample_size": 0}


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("kind", ["uniform13", "speech"])
def test_ranks_get_equal_counts_and_cover_every_batch(world_size: int, drop_last: bool, kind: str) -> None:
    if kind == "uniform13":
        lengths, options = EVEN_LENGTHS, EVEN_OPTIONS
    else:
        lengths, options = speech_lengths(1500, seed=1), {}
    reference = sampler(lengths, **options)
    batches = reference.epoch_batches(4)
    n = len(batches)
    if kind == "uniform13":
        assert n == 13
    per_rank = all_ranks(lengths, world_size, epoch=4, drop_last=drop_last, **options)
    counts = {len(r) for r in per_rank}
    assert len(counts) == 1
    count = counts.pop()
    assert count == (n // world_size if drop_last else math.ceil(n / world_size))
    for r in range(world_size):
        assert len(sampler(lengths, rank=r, world_size=world_size, drop_last=drop_last, **options)) == count
    # Rank r takes batches r, r + W, ... of the shuffled (padded) list.
    interleaved = [per_rank[i % world_size][i // world_size] for i in range(count * world_size)]
    if drop_last:
        assert interleaved == batches[: count * world_size]
    else:
        assert interleaved == batches + batches[: count * world_size - n]
        assert Counter(tuple(b) for b in interleaved) >= Counter(tuple(b) for b in batches)


def test_more_ranks_than_batches() -> None:
    lengths = [3_000] * 12  # 3 batches
    per_rank = all_ranks(lengths, 8, **EVEN_OPTIONS)
    assert all(len(r) == 1 for r in per_rank)
    assert {tuple(r[0]) for r in per_rank} == {tuple(b) for b in sampler(lengths, **EVEN_OPTIONS).epoch_batches(0)}
    assert all(r == [] for r in all_ranks(lengths, 8, drop_last=True, **EVEN_OPTIONS))


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("consumed", [0, 1, 5, "all"])
def test_exact_resume_mid_epoch(world_size: int, consumed: int | str) -> None:
    lengths = speech_lengths(2000, seed=2)
    rank = world_size - 1
    full = epoch_of(sampler(lengths, rank=rank, world_size=world_size, seed=3), 5)
    k = len(full) if consumed == "all" else consumed

    first = sampler(lengths, rank=rank, world_size=world_size, seed=3)
    first.set_epoch(5)
    it = iter(first)
    taken = [next(it) for _ in range(k)]
    state = first.state_dict()
    assert state == {"epoch": 5, "position": k}
    assert taken == full[:k]

    restarted = sampler(lengths, rank=rank, world_size=world_size, seed=3)
    restarted.load_state_dict(state)
    restarted.set_epoch(5)  # re-selecting the restored epoch keeps the position
    assert restarted.state_dict() == state
    rest = list(restarted)
    assert rest == full[k:]
    assert restarted.state_dict() == {"epoch": 5, "position": len(full)}
    # The following epoch starts from its beginning, as an uninterrupted run would.
    assert epoch_of(restarted, 6) == epoch_of(sampler(lengths, rank=rank, world_size=world_size, seed=3), 6)
    # So does a second pass over the same epoch.
    assert list(restarted) == epoch_of(sampler(lengths, rank=rank, world_size=world_size, seed=3), 6)


def test_load_state_dict_rejects_positions_past_the_end() -> None:
    s = sampler(speech_lengths(500))
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0, "position": len(s) + 1})


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="bucket_method"):
        sampler(speech_lengths(10), bucket_method="linear")
    with pytest.raises(ValueError, match="rank"):
        sampler(speech_lengths(10), rank=2, world_size=2)
    with pytest.raises(ValueError, match="min_sample_size"):
        sampler(speech_lengths(10), min_sample_size=10, max_sample_size=5)


# ------------------------------------------------------------------------------------------------ masks
def check_masks(mask: torch.Tensor, lengths: list[int]) -> None:
    assert mask.dtype == torch.int64 and mask.dim() == 2 and mask.shape[0] == len(lengths)
    for row, length in zip(mask.tolist(), lengths, strict=True):
        assert row == sorted(set(row))
        assert all(0 <= p < length for p in row)


def masks(
    lengths: list[int],
    frames: int,
    *,
    mask_prob: float = 0.8,
    mask_length: int = 10,
    mask_selection: str = "static",
    mask_other: float = 0.0,
    no_mask_overlap: bool = False,
    mask_min_space: int = 1,
    generator: torch.Generator,
) -> torch.Tensor:
    """compute_mask_indices (the release's signature) for rows of the given unpadded lengths."""
    padding_mask = torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]
    return compute_mask_indices(
        (len(lengths), frames),
        padding_mask,
        mask_prob,
        mask_length,
        mask_selection,
        mask_other,
        2,
        mask_min_space,
        no_overlap=no_mask_overlap,
        generator=generator,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("selection", ["static", "uniform", "normal", "poisson"])
@pytest.mark.parametrize("no_overlap", [False, True])
def test_masks_shape_sorted_within_lengths(selection: str, no_overlap: bool) -> None:
    lengths = [500, 499, 320, 121, 60, 33]
    mask = masks(
        lengths, 500, mask_selection=selection, mask_other=2.0, no_mask_overlap=no_overlap, generator=seeded(0)
    )
    check_masks(mask, lengths)
    assert mask.shape[1] > 0


def expected_static_fraction(frames: int, mask_prob: float, span: int) -> float:
    """Expected fraction of masked frames with overlapping static spans (``mask_prob * T / span`` an integer)."""
    num_spans = round(mask_prob * frames / span)
    starts = frames - span  # number of possible starts
    uncovered = 0.0
    for p in range(frames):
        covering = min(p, starts - 1) - max(0, p - span + 1) + 1
        uncovered += math.comb(starts - covering, num_spans) / math.comb(starts, num_spans)
    return 1 - uncovered / frames


def test_static_mask_fraction_matches_the_formula() -> None:
    generator = seeded(0)
    expected = expected_static_fraction(500, 0.8, 10)  # 40 spans of 10 among 490 starts
    assert 0.55 < expected < 0.58
    fractions = [masks([500], 500, generator=generator).shape[1] / 500 for _ in range(300)]
    assert 0.5 <= np.mean(fractions) <= 0.8
    assert abs(np.mean(fractions) - expected) < 0.01
    # A batch keeps the smallest count of its rows: a bit lower, but still most of the expected fraction.
    batch = masks([500] * 8, 500, generator=generator)
    assert 0.4 <= batch.shape[1] / 500 <= expected


def test_masks_reproducible_with_the_same_seed() -> None:
    lengths = [400, 350, 390]
    a = masks(lengths, 400, generator=seeded(11))
    b = masks(lengths, 400, generator=seeded(11))
    c = masks(lengths, 400, generator=seeded(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)  # generator=None draws from the global generator
    padding_mask = torch.arange(400)[None, :] >= torch.tensor(lengths)[:, None]
    d = compute_mask_indices((3, 400), padding_mask, 0.8, 10, "static", 0.0, 2, 1, no_overlap=False, generator=None)
    assert torch.equal(a, d)


def test_masks_with_padding_stay_within_each_row() -> None:
    rng = np.random.default_rng(1)
    generator = seeded(1)
    for _ in range(20):
        lengths = rng.integers(1, 300, size=6).tolist()
        check_masks(masks(lengths, 300, generator=generator), lengths)


def test_rows_shorter_than_a_span() -> None:
    generator = seeded(2)
    for no_overlap in (False, True):
        for length in range(13):
            mask = masks([length, 12], 12, no_mask_overlap=no_overlap, generator=generator)
            check_masks(mask, [length, 12])
    assert masks([0, 100], 100, generator=generator).shape == (2, 0)
    assert masks([5, 5], 5, generator=generator).shape[1] >= 1


def test_non_overlapping_spans_are_separated() -> None:
    generator = seeded(3)
    for min_space in (1, 3):
        for _ in range(10):
            row = masks([500], 500, no_mask_overlap=True, mask_min_space=min_space, generator=generator)[0]
            masked = np.zeros(500, dtype=bool)
            masked[row.numpy()] = True
            edges = np.flatnonzero(np.diff(np.concatenate([[0], masked.astype(np.int8), [0]])))
            starts, ends = edges[::2], edges[1::2]
            assert np.all(ends - starts == 10)  # every run is exactly one span
            assert np.all(starts[1:] - ends[:-1] >= min_space)
            assert len(starts) >= 25


def test_no_masking_and_bad_options() -> None:
    # The release's rule: mask_prob = 0 still draws min_masks spans; the collator masks nothing then.
    spans = masks([50, 40], 50, mask_prob=0.0, generator=seeded(0))
    assert 10 <= spans.shape[1] <= 20  # two spans of 10, which may overlap
    batch = collate(ramps([5000, 4000]), [0, 1], mask_prob=0.0, rng=0)
    assert batch.mask_indices.shape == (2, 0)
    with pytest.raises(ValueError, match="unknown mask strategy 'gamma'"):
        masks([50], 50, mask_selection="gamma", generator=seeded(0))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor of shape \(1, 50\)"):
        compute_mask_indices(
            (1, 50), torch.zeros(1, 60, dtype=torch.bool), 0.8, 10, "static", 0, 2, 1, no_overlap=False, generator=None
        )
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        compute_mask_indices((1, 50), torch.zeros(1, 50), 0.8, 10, "static", 0, 2, 1, no_overlap=False, generator=None)


# ------------------------------------------------------------------------------------------------ collate
def ramps(sizes: list[int]) -> list[torch.Tensor]:
    """Waveforms whose sample values are their positions, so a crop offset can be read back."""
    return [torch.arange(n, dtype=torch.float32) for n in sizes]


def test_collate_crops_to_the_shortest_at_random_offsets() -> None:
    sizes = [16_000, 23_456, 40_000, 17_001]
    rng = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(10):
        batch = collate(ramps(sizes), [3, 1, 4, 1], enable_padding=False, rand_crop=True, rng=rng)
        assert isinstance(batch, Batch)
        assert batch.waveforms.shape == (4, 16_000) and batch.waveforms.dtype == torch.float32
        assert batch.lengths.tolist() == [16_000] * 4
        assert batch.padding_mask is None and batch.attention_mask is None
        for row, size in zip(batch.waveforms, sizes, strict=True):
            offset = int(row[0])
            assert 0 <= offset <= size - 16_000
            assert torch.equal(row, torch.arange(offset, offset + 16_000, dtype=torch.float32))
            offsets.add(offset)
        assert batch.indices == [3, 1, 4, 1]
    assert len(offsets) > 5
    fixed = collate(ramps(sizes), [0, 1, 2, 3], rand_crop=False, rng=rng)
    assert torch.equal(fixed.waveforms, torch.arange(16_000, dtype=torch.float32).expand(4, -1))


def test_collate_pads_to_the_longest() -> None:
    sizes = [16_000, 23_456, 40_000, 5_000]
    batch = collate(ramps(sizes), [0, 1, 2, 3], enable_padding=True, rng=0)
    frames = num_frames(40_000, DEFAULT_CONV_LAYER_CONFIG)
    assert batch.waveforms.shape == (4, 40_000)
    assert batch.lengths.tolist() == sizes
    assert batch.frame_lengths.tolist() == [num_frames(n, DEFAULT_CONV_LAYER_CONFIG) for n in sizes]
    for row, size in zip(batch.waveforms, sizes, strict=True):
        assert torch.equal(row[:size], torch.arange(size, dtype=torch.float32))
        assert not row[size:].any()
    assert batch.padding_mask is not None and batch.attention_mask is not None
    assert batch.padding_mask.shape == (4, frames) and batch.padding_mask.dtype == torch.bool
    expected = torch.arange(frames)[None, :] >= batch.frame_lengths[:, None]
    assert torch.equal(batch.padding_mask, expected)
    assert batch.attention_mask.shape == (4, 1, 1, frames)
    assert torch.equal(batch.attention_mask, ~batch.padding_mask[:, None, None, :])
    check_masks(batch.mask_indices, batch.frame_lengths.tolist())


def test_collate_padding_caps_long_files_and_skips_masks_without_padding() -> None:
    batch = collate(ramps([9_000, 12_000]), [0, 1], enable_padding=True, max_sample_size=10_000, rng=0)
    assert batch.lengths.tolist() == [9_000, 10_000]
    offset = int(batch.waveforms[1, 0])
    assert 0 <= offset <= 2_000
    assert torch.equal(batch.waveforms[1], torch.arange(offset, offset + 10_000, dtype=torch.float32))
    same = collate(ramps([8_000, 8_000]), [0, 1], enable_padding=True, rng=0)
    assert same.padding_mask is None and same.attention_mask is None


@pytest.mark.parametrize("enable_padding", [False, True])
def test_collate_frame_lengths_masks_and_reproducibility(enable_padding: bool) -> None:
    sizes = [32_000, 31_999, 40_321, 48_000]
    first = collate(ramps(sizes), [0, 1, 2, 3], enable_padding=enable_padding, rng=5)
    again = collate(ramps(sizes), [0, 1, 2, 3], enable_padding=enable_padding, rng=5)
    assert first.frame_lengths.dtype == torch.int64 and first.lengths.dtype == torch.int64
    assert first.frame_lengths.tolist() == [num_frames(n, DEFAULT_CONV_LAYER_CONFIG) for n in first.lengths.tolist()]
    assert first.mask_indices.shape[1] > 0
    check_masks(first.mask_indices, first.frame_lengths.tolist())
    assert torch.equal(first.waveforms, again.waveforms) and torch.equal(first.mask_indices, again.mask_indices)
    moved = first.to("cpu")
    assert torch.equal(moved.mask_indices, first.mask_indices) and moved.indices == first.indices


def test_sampler_and_collate_together_respect_the_budget() -> None:
    lengths = np.random.default_rng(9).integers(1_000, 12_000, size=300).tolist()
    rng = torch.Generator().manual_seed(9)
    for padding in (False, True):
        s = BucketBatchSampler(
            lengths, max_batch_length=60_000, min_sample_size=2_000, max_sample_size=8_000, enable_padding=padding
        )
        for indices in s:
            wavs = [torch.randn(lengths[i]) for i in indices]
            batch = collate(wavs, indices, enable_padding=padding, max_sample_size=8_000, rng=rng)
            assert batch.waveforms.numel() <= 60_000
            assert batch.lengths.max() <= 8_000
