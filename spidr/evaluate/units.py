"""Quality of discrete units against phone alignments: PNMI, purities, codebook perplexity, bitrate.

Phone labels come at 10 ms frames and units at 20 ms frames: each unit is repeated twice so that both
sequences share the 10 ms grid, and the longer one is cut to the shorter (a difference of at most two
frames is tolerated, more is an error). Every metric derives from the joint distribution p(phone, unit)
over all the frames of all the utterances, counted with one ``bincount`` on ``phone * K + unit``:

- PNMI = I(phone; unit) / H(phone)
- phone purity = sum over units of max over phones of p(phone, unit)
- cluster purity = sum over phones of max over units of p(phone, unit)
- codebook perplexity = 2 ** H(unit), and active codewords = number of units seen at least once
- bitrate = log2(K) x deduplicated units per second, over the full (uncut) unit sequences, where
  deduplication merges consecutive repeats of a unit.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from spidr.evaluate.features import find_extract_files, load_extract_file

__all__ = [
    "PHONE_FRAME_MS",
    "UNIT_FRAME_MS",
    "UnitsFromExtract",
    "UnitsQuality",
    "aligned_length",
    "bitrate",
    "joint_counts",
    "pair_utterances",
    "quality_from_counts",
    "read_phones_jsonl",
    "read_units_dir",
    "read_units_jsonl",
    "units_quality",
    "write_units_quality_csv",
]

logger = logging.getLogger(__name__)

PHONE_FRAME_MS = 10
UNIT_FRAME_MS = 20
_REPEAT = UNIT_FRAME_MS // PHONE_FRAME_MS
_MAX_LENGTH_DIFF = 2

IntSequence = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class UnitsQuality:
    """Unit quality metrics of :func:`units_quality` (all floats are in [0, 1] except perplexity and bitrate).

    Attributes:
        pnmi: phone-normalised mutual information I(phone; unit) / H(phone); NaN with a single phone.
        phone_purity: sum over units of max over phones of p(phone, unit).
        cluster_purity: sum over phones of max over units of p(phone, unit).
        codebook_perplexity: 2 ** H(unit), in [1, K].
        active_codewords: units that occur at least once.
        bitrate: log2(K) x deduplicated units per second, in bits per second.
    """

    pnmi: float
    phone_purity: float
    cluster_purity: float
    codebook_perplexity: float
    active_codewords: int
    bitrate: float

    def as_dict(self) -> dict[str, float | int]:
        """The metrics by name, in field order."""
        return asdict(self)


def _codes(values: IntSequence, *, name: str, what: str, upper: int) -> np.ndarray:
    """``values`` as a 1-D int64 array, checked to lie in [0, upper)."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"utterance {name!r}: {what} must be integers, got a {values.dtype} tensor")
        array = values.detach().cpu().numpy()
    else:
        array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"utterance {name!r}: {what} must be a 1-D sequence, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"utterance {name!r}: {what} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        raise ValueError(f"utterance {name!r}: {what} value {bad} is outside [0, {upper})")
    return array


def _entropy(p: np.ndarray, eps: float = 0.0) -> float:
    """Shannon entropy in nats of a probability vector, ``-sum p log(p + eps)`` (zeros contribute nothing)."""
    p = p[p > 0]
    return float(-(p * np.log(p + eps)).sum())


def aligned_length(
    name: str,
    phone_frames: int,
    num_units: int,
    *,
    repeat: int = _REPEAT,
    max_length_diff: int = _MAX_LENGTH_DIFF,
) -> int:
    """Frames an utterance's phones and its units (each repeated ``repeat`` times) share: the shorter length.

    Raises:
        ValueError: the lengths differ by more than ``max_length_diff`` frames (naming the utterance).
    """
    frames = num_units * repeat
    if abs(phone_frames - frames) > max_length_diff:
        raise ValueError(
            f"utterance {name!r}: {phone_frames} phone frames but {num_units} units, i.e. {frames} frames once "
            f"each unit is repeated {repeat} times; at most {max_length_diff} frames of difference are tolerated"
        )
    return min(phone_frames, frames)


def joint_counts(phones: np.ndarray, units: np.ndarray, *, num_phones: int, num_units: int) -> np.ndarray:
    """Counts (num_phones, num_units) int64 of the aligned (phone, unit) frame pairs, in one ``bincount``."""
    flat = phones.astype(np.int64, copy=False) * num_units + units.astype(np.int64, copy=False)
    return np.bincount(flat, minlength=num_phones * num_units).reshape(num_phones, num_units)


def _deduplicated(units: IntSequence) -> tuple[int, int]:
    """(length, length once consecutive repeats are merged) of a unit sequence."""
    array = units.detach().cpu().numpy() if isinstance(units, torch.Tensor) else np.asarray(units)
    if array.size == 0:
        return 0, 0
    array = array.reshape(-1)
    return array.size, 1 + int(np.count_nonzero(array[1:] != array[:-1]))


def bitrate(
    *, num_units: int, sequences: Iterable[IntSequence] | None = None, frame_step: int = UNIT_FRAME_MS
) -> float:
    """Bitrate in bits per second: ``log2(num_units)`` x units per second.

    Args:
        num_units: the number of distinct units (the codebook size).
        sequences: unit sequences; consecutive repeats of a unit are merged (deduplicated) before counting.
            None: one unit every ``frame_step`` ms, i.e. ``log2(num_units) * 1000 / frame_step``.
        frame_step: milliseconds per unit.

    Raises:
        ValueError: ``sequences`` holds no unit at all.
    """
    if sequences is None:
        return math.log2(num_units) * 1000 / frame_step
    total = deduplicated = 0
    for units in sequences:
        length, merged = _deduplicated(units)
        total += length
        deduplicated += merged
    if total == 0:
        raise ValueError("bitrate needs at least one unit in sequences")
    return math.log2(num_units) * deduplicated / (total * frame_step / 1000)


def quality_from_counts(counts: np.ndarray, *, bitrate: float, eps: float = 0.0) -> UnitsQuality:
    """The metrics of the joint counts (num_phones, num_units) of aligned frames (see the module docstring).

    ``eps`` smooths the logarithms as the reference release does (``log(p / (p_phone p_unit + eps) + eps)``,
    ``log(p + eps)``); 0 gives the exact values. ``bitrate`` is passed through (see :func:`bitrate`).

    Raises:
        ValueError: no frame is counted.
    """
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no frame to evaluate: every utterance is empty")
    joint = counts / total
    p_phone, p_unit = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    outer = np.outer(p_phone, p_unit)
    mutual_information = float((joint[nonzero] * np.log(joint[nonzero] / (outer[nonzero] + eps) + eps)).sum())
    phone_entropy = _entropy(p_phone, eps)
    return UnitsQuality(
        pnmi=mutual_information / phone_entropy if phone_entropy > 0 else math.nan,
        phone_purity=float(joint.max(axis=0).sum()),
        cluster_purity=float(joint.max(axis=1).sum()),
        codebook_perplexity=math.exp(_entropy(p_unit, eps)),  # 2 ** H in bits = e ** H in nats
        active_codewords=int(np.count_nonzero(p_unit)),
        bitrate=bitrate,
    )


def units_quality(
    data: Mapping[str, tuple[IntSequence, IntSequence]], *, num_units: int, num_phones: int
) -> UnitsQuality:
    """Unit quality of ``data`` against its phone alignments.

    Args:
        data: utterance name -> (phones, units): phones (T_p,) integer labels in [0, num_phones) at 10 ms
            frames, units (T_u,) integers in [0, num_units) at 20 ms frames, as lists, numpy arrays or
            tensors. Each unit is repeated twice and both sequences are cut to the shorter one, which is
            what the SpidR release does.
        num_units: K, the codebook size (sets the bitrate's log2(K)).
        num_phones: the number of phone classes.

    Returns:
        The metrics, computed in float64 (see the module docstring for the definitions).

    Raises:
        ValueError: ``data`` is empty or has no frame; a value is out of range, not an integer, or not 1-D;
            or ``|T_p - 2 T_u| > 2`` for an utterance (the message names the utterance and both lengths).
    """
    if num_units < 1 or num_phones < 1:
        raise ValueError(f"num_units and num_phones must be positive, got {num_units} and {num_phones}")
    if not data:
        raise ValueError("no utterance to evaluate")
    phone_parts, unit_parts, sequences = [], [], []
    for name, (phones, units) in data.items():
        phones = _codes(phones, name=name, what="phones", upper=num_phones)
        units = _codes(units, name=name, what="units", upper=num_units)
        length = aligned_length(name, len(phones), len(units))
        phone_parts.append(phones[:length])
        unit_parts.append(np.repeat(units, _REPEAT)[:length])
        sequences.append(units)
    counts = joint_counts(
        np.concatenate(phone_parts), np.concatenate(unit_parts), num_phones=num_phones, num_units=num_units
    )
    if not counts.any():
        raise ValueError("no frame to evaluate: every utterance is empty")
    return quality_from_counts(counts, bitrate=bitrate(num_units=num_units, sequences=sequences))


# Metric order of the CSV files (that of the SpidR paper's fixture).
CSV_METRICS = ("phone_purity", "cluster_purity", "pnmi", "codebook_perplexity", "active_codewords", "bitrate")
CSV_COLUMNS = ("model", "layer", "metric", "score")


def write_units_quality_csv(path: str | Path, quality: UnitsQuality, *, model: str, layer: int | None) -> None:
    """Write ``quality`` as CSV rows ``model,layer,metric,score`` (one per metric, every score as a float).

    ``layer`` is left empty when unknown.
    """
    values = quality.as_dict()
    with Path(path).open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for metric in CSV_METRICS:
            writer.writerow([model, "" if layer is None else layer, metric, repr(float(values[metric]))])


def _open_text(path: Path) -> IO[str]:
    """Open a text file, decompressing it on the fly when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl_records(path: Path, key: str) -> Iterator[tuple[int, str, list[Any]]]:
    """Yield (line number, name, list under ``key``) for each non-blank line; names must be unique."""
    seen: set[str] = set()
    with _open_text(path) as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise ValueError(f'{path}, line {line_number}: expected an object with a string "name"')
            name = record["name"]
            if not isinstance(record.get(key), list):
                raise ValueError(f'{path}, line {line_number}: utterance {name!r} has no "{key}" list')
            if name in seen:
                raise ValueError(f"{path}, line {line_number}: utterance {name!r} appears twice")
            seen.add(name)
            yield line_number, name, record[key]


def read_phones_jsonl(path: str | Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read phone alignments from a JSONL (or JSONL.gz) file of ``{"name": ..., "phones": [label, ...]}``.

    Phone labels are strings, one per 10 ms frame.

    Returns:
        (phones, labels): phones maps each utterance to an int64 array of indices into ``labels``, the
        sorted list of the distinct phone labels (so ``num_phones = len(labels)``).

    Raises:
        ValueError: a line is not valid JSON, lacks "name" or "phones", repeats a name, or holds a label
            that is not a string (naming the file and line).
    """
    path = Path(path)
    first_seen: dict[str, int] = {}
    phones: dict[str, np.ndarray] = {}
    for line_number, name, labels in _jsonl_records(path, "phones"):
        codes = []
        for label in labels:
            code = first_seen.get(label) if isinstance(label, str) else None
            if code is None:
                if not isinstance(label, str):
                    raise ValueError(f"{path}, line {line_number}: phone label {label!r} is not a string")
                code = first_seen[label] = len(first_seen)
            codes.append(code)
        phones[name] = np.array(codes, dtype=np.int64)
    sorted_labels = sorted(first_seen)
    # Renumber from first-seen order to sorted order in one gather per utterance.
    renumber = np.empty(len(first_seen), dtype=np.int64)
    for index, label in enumerate(sorted_labels):
        renumber[first_seen[label]] = index
    return {name: renumber[codes] for name, codes in phones.items()}, sorted_labels


def read_units_jsonl(path: str | Path) -> dict[str, np.ndarray]:
    """Read units from a JSONL (or JSONL.gz) file of ``{"name": ..., "units": [int, ...]}``, one per 20 ms.

    Returns:
        utterance name -> int64 array of units (their range is checked by :func:`units_quality`).

    Raises:
        ValueError: a line is not valid JSON, lacks "name" or "units", repeats a name, or holds units that
            are not integers (naming the file and line).
    """
    path = Path(path)
    units: dict[str, np.ndarray] = {}
    for line_number, name, values in _jsonl_records(path, "units"):
        try:
            array = np.asarray(values)
        except ValueError:
            array = np.asarray(values, dtype=object)
        if array.size and (array.ndim != 1 or not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{path}, line {line_number}: units of {name!r} must be a list of integers")
        units[name] = array.astype(np.int64)
    return units


@dataclass(frozen=True)
class UnitsFromExtract:
    """Units of one layer read from a ``spidr.extract`` output directory.

    Attributes:
        units: utterance name (file stem) -> (T,) int64 tensor of units.
        layer: the 1-based layer they come from.
        num_units: the codebook size K recorded in the files, or None if they do not say.
        model: the model name recorded in the files ("" if absent).
    """

    units: dict[str, torch.Tensor]
    layer: int
    num_units: int | None
    model: str


def read_units_dir(directory: str | Path, *, layer: int | None = None) -> UnitsFromExtract:
    """Read the units of ``layer`` from every ``.pt`` file under ``directory`` (written by ``spidr.extract``).

    Args:
        directory: the extraction output directory, searched recursively; utterances are named by file
            stem, or by path relative to it where stems repeat (see
            :func:`~spidr.evaluate.features.find_extract_files`).
        layer: 1-based layer; None is allowed when the files hold a single layer.

    Raises:
        ValueError: a file is not a spidr.extract file, has no units for the layer,
            or holds several layers while ``layer`` is None (listing them); or two files record different K
            (naming both).
    """
    units: dict[str, torch.Tensor] = {}
    num_units: int | None = None
    k_source: Path | None = None
    model = ""
    for name, path in find_extract_files(directory).items():
        extract = load_extract_file(path)
        layer = extract.choose_layer(layer)
        units[name] = extract.layer_tensor("units", layer)
        model = model or extract.model
        k = extract.num_units(layer)
        if k is not None:
            if num_units is not None and k != num_units:
                raise ValueError(
                    f"layer {layer} has {num_units} units in {k_source} but {k} in {path}: "
                    "were they extracted with the same codebook?"
                )
            num_units, k_source = k, path
    if layer is None:  # unreachable: find_extract_files found at least one file
        raise ValueError(f"{directory}: no unit file")
    return UnitsFromExtract(units=units, layer=layer, num_units=num_units, model=model)


def pair_utterances(
    phones: Mapping[str, IntSequence],
    units: Mapping[str, IntSequence],
    *,
    phones_source: str = "phones",
    units_source: str = "units",
) -> tuple[dict[str, tuple[IntSequence, IntSequence]], int, int]:
    """Pair phones and units by utterance name, as :func:`units_quality` expects them.

    Utterances found on one side only are skipped with a logged warning (alignments often cover a subset
    of what was extracted, and the reverse); the counts are returned so that callers can report them.

    Returns:
        (data, phones_only, units_only): data maps each common name to (phones, units), in the phones'
        order; phones_only and units_only count the names skipped on each side.

    Raises:
        ValueError: no utterance is in both (naming both sources and an example name from each).
    """
    data = {name: (labels, units[name]) for name, labels in phones.items() if name in units}
    phones_only, units_only = len(phones) - len(data), len(units) - len(data)
    if not data:
        example_phone = next(iter(phones), None)
        example_unit = next(iter(units), None)
        raise ValueError(
            f"no utterance in common between {phones_source} ({len(phones)} utterances, e.g. {example_phone!r}) "
            f"and {units_source} ({len(units)} utterances, e.g. {example_unit!r})"
        )
    if phones_only:
        logger.warning("%d utterances of %s have no units in %s: skipped", phones_only, phones_source, units_source)
    if units_only:
        logger.warning("%d utterances of %s have no phones in %s: skipped", units_only, units_source, phones_source)
    return data, phones_only, units_only
