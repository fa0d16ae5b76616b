"""Training and unit-quality metrics under the reference release's names (``spidr.models.metrics`` of spidr 0.2.0).

The unit-quality maths lives in :mod:`spidr.evaluate.units` (counts, PNMI, purities, perplexity, bitrate); the
functions here give it the release's inputs and outputs: phone labels as strings, the count matrix as a tensor
whose rows are sorted by phone frequency, and :class:`UnitsQuality` as a named tuple.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch import distributed as dist

from spidr.evaluate.units import aligned_length, bitrate, joint_counts, quality_from_counts

__all__ = [
    "PPL_EPS",
    "NonFiniteError",
    "PhonesAndUnits",
    "UnitsQuality",
    "bitrate",
    "build_count_matrix",
    "params_norm",
    "perplexities",
    "perplexity",
    "proba_phone_code",
    "units_quality",
]

PPL_EPS = 1e-8


def perplexity(mean_probs: Tensor) -> Tensor:
    """``2 ** entropy`` (bits) of each row of ``mean_probs`` (..., K), with ``log2(p + 1e-8)``: (...,)."""
    return torch.exp2(-(mean_probs * (mean_probs + PPL_EPS).log2()).sum(-1))


@torch.no_grad()
def perplexities(ys: Sequence[Tensor]) -> Tensor:
    """Perplexity of each set of distributions ``ys[i]`` (N, K): of their mean over the N rows (over every rank
    when torch.distributed is initialised; every set is divided by the N of ``ys[0]``): (len(ys),).

    Raises:
        ValueError: ``ys`` is empty, or its tensors are not all 2-D with the same K.
    """
    if not ys or any(y.dim() != 2 for y in ys) or len({y.shape[1] for y in ys}) != 1:
        raise ValueError(f"ys must be tensors (N, K) with one K, got shapes {[tuple(y.shape) for y in ys]}")
    sums = torch.stack([y.sum(0) for y in ys])
    n = torch.tensor(ys[0].shape[0], device=ys[0].device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        dist.all_reduce(sums)
    return perplexity(sums / n)


class NonFiniteError(Exception):
    """Non-finite values were found."""


def params_norm(
    params: Tensor | Iterable[Tensor], norm_type: float = 2.0, *, error_if_nonfinite: bool = False
) -> Tensor:
    """The ``norm_type`` norm of all the tensors together (as if concatenated), like ``clip_grad_norm_``'s total.

    Raises:
        NonFiniteError: ``error_if_nonfinite`` and the norm is NaN or infinite.
        ValueError: no tensor is given.
    """
    tensors = [params] if isinstance(params, Tensor) else list(params)
    if not tensors:
        raise ValueError("params_norm needs at least one tensor")
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, norm_type)), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise NonFiniteError(f"the {norm_type}-norm of the parameters is {total.item()}")
    return total


PhonesAndUnits = tuple[list[str], list[int]]
"""An utterance's phone labels (one per alignment frame) and its units (one per unit frame)."""


def build_count_matrix(
    data: Mapping[str | Path, PhonesAndUnits],
    num_units: int,
    num_phones: int,
    repeat: int,
    max_length_diff: int = 2,
) -> tuple[Tensor, list[str]]:
    """Joint counts of phones and units over the aligned frames of every utterance.

    Each unit is repeated ``repeat`` times and both sequences are cut to the shorter one. Phones are numbered in
    the order they are first met; the rows are then sorted by phone frequency, most frequent first.

    Returns:
        ``(count, phone_order)``: int64 (num_phones, num_units), and the phone of each row. Rows of phones never
        met (when ``num_phones`` is larger than the phones seen) are zero, last, and not in ``phone_order``.

    Raises:
        ValueError: an utterance's lengths differ by more than ``max_length_diff`` frames after repetition.
        IndexError: more distinct phones than ``num_phones``, or a unit outside [0, num_units).
    """
    phone_index: dict[str, int] = {}
    phone_parts, unit_parts = [], []
    for path, (phones, units) in data.items():
        length = aligned_length(str(path), len(phones), len(units), repeat=repeat, max_length_diff=max_length_diff)
        unit_codes = np.repeat(np.asarray(units, dtype=np.int64).reshape(-1), repeat)[:length]
        labels, first, inverse = np.unique(np.asarray(phones[:length]), return_index=True, return_inverse=True)
        for k in np.argsort(first, kind="stable"):  # number new phones in the order they appear
            phone_index.setdefault(labels[k].item(), len(phone_index))
        phone_codes = np.array([phone_index[label.item()] for label in labels], dtype=np.int64)[inverse.reshape(-1)]
        if len(phone_index) > num_phones:
            extra = next(p for p, i in phone_index.items() if i == num_phones)
            raise IndexError(f"{path}: phone {extra!r} is phone number {num_phones + 1}, more than num_phones")
        if unit_codes.size and not 0 <= int(unit_codes.min()) <= int(unit_codes.max()) < num_units:
            bad = int(unit_codes.min()) if unit_codes.min() < 0 else int(unit_codes.max())
            raise IndexError(f"{path}: unit {bad} is outside [0, num_units={num_units})")
        phone_parts.append(phone_codes)
        unit_parts.append(unit_codes)
    empty = np.zeros(0, dtype=np.int64)
    count = torch.from_numpy(
        joint_counts(
            np.concatenate(phone_parts) if phone_parts else empty,
            np.concatenate(unit_parts) if unit_parts else empty,
            num_phones=num_phones,
            num_units=num_units,
        )
    )
    order = torch.argsort(count.sum(dim=1), descending=True, stable=True)
    names = list(phone_index)  # in index order
    return count[order], [names[i] for i in order.tolist() if i < len(names)]


class UnitsQuality(NamedTuple):
    """Unit quality metrics of :func:`units_quality`, in the reference release's order."""

    phone_purity: float
    cluster_purity: float
    pnmi: float
    codebook_perplexity: float
    active_codewords: int
    bitrate: float


def units_quality(
    data: Mapping[str | Path, PhonesAndUnits],
    *,
    num_units: int,
    num_phones: int,
    frame_step: int = 20,
    alignment_step: int = 10,
    eps: float = 1e-10,
) -> UnitsQuality:
    """Unit quality of ``data`` (utterance -> (phone labels, units)) against its phone alignments.

    Units come every ``frame_step`` ms and phones every ``alignment_step`` ms; each unit is repeated
    ``frame_step // alignment_step`` times (see :func:`build_count_matrix`). The definitions are those of
    :mod:`spidr.evaluate.units` (which computes them), with the logarithms smoothed by ``eps``; the bitrate
    counts the deduplicated units of the full sequences.

    Raises:
        ValueError, IndexError: as :func:`build_count_matrix`; ValueError when no frame is counted.
    """
    count, _ = build_count_matrix(data, num_units, num_phones, frame_step // alignment_step)
    rate = bitrate(num_units=num_units, sequences=[units for _, units in data.values()], frame_step=frame_step)
    quality = quality_from_counts(count.numpy(), bitrate=rate, eps=eps)
    return UnitsQuality(
        phone_purity=quality.phone_purity,
        cluster_purity=quality.cluster_purity,
        pnmi=quality.pnmi,
        codebook_perplexity=quality.codebook_perplexity,
        active_codewords=quality.active_codewords,
        bitrate=quality.bitrate,
    )


def proba_phone_code(
    data: Mapping[str | Path, PhonesAndUnits],
    *,
    num_units: int,
    num_phones: int,
    only_active: bool,
    frame_step: int = 20,
    alignment_step: int = 10,
) -> tuple[Tensor, list[str], Tensor]:
    """p(phone | unit), with the units ordered for display: grouped by their most likely phone (phones by
    frequency), and within a group by decreasing probability of that phone.

    Returns:
        ``(proba, phone_order, codes_order)``: float32 (num_phones, units shown), the phone of each row (see
        :func:`build_count_matrix`), and the int64 unit of each column. ``only_active`` leaves out the units
        never seen (whose columns are zero).
    """
    count, phone_order = build_count_matrix(data, num_units, num_phones, frame_step // alignment_step)
    per_unit = count.sum(dim=0, keepdim=True)
    proba = torch.where(per_unit != 0, count / per_unit.clamp(min=1), torch.zeros((), dtype=torch.float32))
    best = proba.argmax(dim=0)
    codes: list[int] = []
    for row in range(count.shape[0]):
        units = torch.nonzero(best == row).flatten()
        codes += units[torch.argsort(proba[row, units], descending=True, stable=True)].tolist()
    if only_active:
        active = per_unit[0] > 0
        codes = [code for code in codes if active[code]]
    order = torch.tensor(codes, dtype=torch.int64)
    return proba[:, order], phone_order, order
