"""ABX error rates of extracted features, computed by the ``fastabx`` library (ZeroSpeech 2021 protocol).

fastabx needs Python >= 3.12 and is imported only when a score is computed, so that the rest of this
module (reading and checking the item file, slicing the features) works everywhere. Items are matched to
the ``.pt`` files written by ``spidr.extract`` by file stem, and sliced at the feature frame rate with
fastabx's convention: an item [onset, offset] in seconds covers the frames whose centre, at
``(i + 0.5) / rate`` seconds, lies inside it, i.e. frames ``ceil(onset * rate - 0.5)`` to
``floor(offset * rate - 0.5)`` included (fastabx's default, without the Libri-Light off-by-one).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from types import ModuleType
from typing import Literal

import torch

from spidr.evaluate.features import find_extract_files, load_extract_file, relative_name

__all__ = [
    "DISTANCES",
    "ITEM_COLUMNS",
    "AbxResult",
    "FastabxMissingError",
    "Item",
    "ItemFeatures",
    "abx_error_rate",
    "import_fastabx",
    "item_frames",
    "load_item_features",
    "read_item_file",
]

# Columns of a ZeroSpeech item file, in their usual order (more columns are allowed and ignored).
ITEM_COLUMNS = ("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker")
# Our distance names -> fastabx's. "cosine" and "angular" are the same in fastabx: arccos(cosine) / pi.
DISTANCES = {"cosine": "cosine", "angular": "angular", "kl": "kl_symmetric"}
# ZeroSpeech 2021 subsampling: at most 10 A, B or X per cell, and 5 X speakers per (A, B) across speakers.
ZEROSPEECH_MAX_SIZE_GROUP = 10
ZEROSPEECH_MAX_X_ACROSS = 5


class FastabxMissingError(RuntimeError):
    """fastabx cannot be imported."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"ABX needs the fastabx library, which cannot be imported ({reason}); it requires Python >= 3.12: "
            "install it with `pip install 'spidr[eval]'` in a Python >= 3.12 environment"
        )


def import_fastabx() -> ModuleType:
    """Import and return fastabx.

    Raises:
        FastabxMissingError: fastabx is not installed, or cannot be imported (e.g. on Python 3.11).
    """
    try:
        return importlib.import_module("fastabx")
    except (ImportError, SyntaxError) as error:  # SyntaxError: PEP 695 code imported by Python < 3.12
        raise FastabxMissingError(f"{type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class Item:
    """One line of an item file: a phone of ``file`` between ``onset`` and ``offset`` seconds.

    ``line`` is the 1-based line number in the item file, for error messages.
    """

    line: int
    file: str
    onset: Decimal
    offset: Decimal
    phone: str
    prev_phone: str
    next_phone: str
    speaker: str


def _seconds(value: str, *, path: Path, line: int, column: str) -> Decimal:
    """Parse a time in seconds (a finite, non-negative decimal number)."""
    try:
        seconds = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{path}, line {line}: {column} {value!r} is not a number") from None
    if not seconds.is_finite() or seconds < 0:
        raise ValueError(f"{path}, line {line}: {column} {value!r} must be a finite number of seconds >= 0")
    return seconds


def read_item_file(path: str | Path) -> list[Item]:
    """Read and check a ZeroSpeech item file.

    The first line is a header naming the space-separated columns; it must include those of
    :data:`ITEM_COLUMNS` (``#file onset offset #phone prev-phone next-phone speaker``), in any order.
    Blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a column is missing from the header, a line has the wrong number of fields, an onset or
            offset is not a non-negative number, or an offset is not after its onset; or there is no item.
            Messages name the file, the line and the value.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as file:
        lines = file.read().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}, line 1: expected the header {' '.join(ITEM_COLUMNS)!r}")
    header = lines[0].split()
    missing = [column for column in ITEM_COLUMNS if column not in header]
    if missing:
        raise ValueError(
            f"{path}, line 1: missing column(s) {', '.join(missing)} in the header {lines[0]!r} "
            f"(expected {' '.join(ITEM_COLUMNS)!r})"
        )
    position = {column: header.index(column) for column in ITEM_COLUMNS}
    items = []
    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {line_number}: {len(fields)} fields in {line!r}, expected {len(header)}")
        onset = _seconds(fields[position["onset"]], path=path, line=line_number, column="onset")
        offset = _seconds(fields[position["offset"]], path=path, line=line_number, column="offset")
        if offset <= onset:
            raise ValueError(f"{path}, line {line_number}: offset {offset} is not after onset {onset}")
        items.append(
            Item(
                line=line_number,
                file=fields[position["#file"]],
                onset=onset,
                offset=offset,
                phone=fields[position["#phone"]],
                prev_phone=fields[position["prev-phone"]],
                next_phone=fields[position["next-phone"]],
                speaker=fields[position["speaker"]],
            )
        )
    if not items:
        raise ValueError(f"{path}: no item after the header")
    return items


def item_frames(onset: Decimal, offset: Decimal, frame_rate: int) -> tuple[int, int]:
    """The frames [start, end) covered by [onset, offset] seconds: those whose centre lies inside it."""
    start = (onset * frame_rate - Decimal("0.5")).to_integral_value(rounding=ROUND_CEILING)
    last = (offset * frame_rate - Decimal("0.5")).to_integral_value(rounding=ROUND_FLOOR)
    return int(start), int(last) + 1


@dataclass(frozen=True)
class ItemFeatures:
    """The features of every item, concatenated.

    Attributes:
        data: (N, D) float32, the frames of all items (grouped by file).
        spans: item i's frames are ``data[spans[i][0]:spans[i][1]]``, in the item file's order.
        layer: the 1-based layer read.
    """

    data: torch.Tensor
    spans: list[tuple[int, int]]
    layer: int


def load_item_features(
    items: Sequence[Item], item_path: str | Path, features_dir: str | Path, *, layer: int | None = None
) -> ItemFeatures:
    """Load ``layer``'s features from ``features_dir`` (written by ``spidr.extract``) and cut out every item.

    Args:
        items: from :func:`read_item_file` of ``item_path`` (named in error messages).
        features_dir: searched recursively; an item's ``#file`` is matched to a file stem, or to a path
            relative to ``features_dir`` without ``.pt`` (needed where stems repeat, see
            :func:`~spidr.evaluate.features.find_extract_files`).
        layer: 1-based layer; None is allowed when the files hold a single layer.

    Raises:
        ValueError: an item names a file with no feature file, or a stem that several feature files share
            (naming the item file, line and value); an item is shorter than one frame, or runs past the end
            of its features; a file is not a spidr.extract file, has no features for the layer, or holds several
            layers while ``layer`` is None.
    """
    item_path = Path(item_path)
    files = find_extract_files(features_dir)
    # An item's #file: a stem, or a path relative to features_dir (either works for every file).
    relative = {relative_name(path, features_dir): path for path in files.values()}
    by_file: dict[Path, list[int]] = {}
    for index, item in enumerate(items):
        path = files.get(item.file) or relative.get(item.file)
        if path is None:
            shared = sorted(name for name in relative if name.rpartition("/")[2] == item.file)
            if shared:
                raise ValueError(
                    f"{item_path}, line {item.line}: {item.file!r} names {len(shared)} feature files in "
                    f"{features_dir} ({', '.join(shared)}); name each by that path in the item file"
                )
            raise ValueError(
                f"{item_path}, line {item.line}: no feature file for {item.file!r} in {features_dir} "
                f"(looked for {item.file}.pt in any subdirectory)"
            )
        by_file.setdefault(path, []).append(index)

    parts: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(items)
    size = 0
    for path, indices in by_file.items():
        extract = load_extract_file(path)
        layer = extract.choose_layer(layer)
        features = extract.layer_tensor("features", layer)
        for index in indices:
            item = items[index]
            start, end = item_frames(item.onset, item.offset, extract.frame_rate)
            if end <= start:
                raise ValueError(
                    f"{item_path}, line {item.line}: item {item.onset}-{item.offset} s is shorter than one "
                    f"frame at {extract.frame_rate} Hz"
                )
            if end > features.size(0):
                raise ValueError(
                    f"{item_path}, line {item.line}: item {item.onset}-{item.offset} s needs frames "
                    f"[{start}, {end}) but {extract.path} has {features.size(0)}"
                )
            parts.append(features[start:end])
            spans[index] = (size, size + end - start)
            size += end - start
    if layer is None:  # unreachable: items is not empty, so a file was read
        raise ValueError(f"{item_path}: no item")
    return ItemFeatures(data=torch.cat(parts), spans=spans, layer=layer)


@dataclass(frozen=True)
class AbxResult:
    """An ABX error rate and how it was computed.

    Attributes:
        error_rate: ABX error rate in [0, 1] (0.5 is chance).
        layer: the 1-based layer evaluated.
        speaker, context, distance: the conditions (distance as named by spidr).
        items: the number of items in the item file.
    """

    error_rate: float
    layer: int
    speaker: str
    context: str
    distance: str
    items: int


def abx_error_rate(
    features_dir: str | Path,
    item_file: str | Path,
    *,
    speaker: Literal["within", "across"] = "within",
    context: Literal["within", "any"] = "within",
    distance: Literal["cosine", "angular", "kl"] = "angular",
    layer: int | None = None,
    max_size_group: int | None = ZEROSPEECH_MAX_SIZE_GROUP,
    max_x_across: int | None = ZEROSPEECH_MAX_X_ACROSS,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> AbxResult:
    """ABX error rate of ``layer``'s features on the phones of ``item_file``, with fastabx.

    Reproduces the ZeroSpeech 2021 protocol of ``fastabx.zerospeech_abx``: ON the phone, BY context
    (previous and next phones, for ``context="within"``) and speaker (``speaker="within"``) or ACROSS
    speakers, cells subsampled to ``max_size_group`` (and ``max_x_across`` X speakers), DTW over the
    frames, scores averaged over contexts then speakers. ``kl`` is the symmetric KL divergence, for
    features that are probability distributions.

    Args:
        features_dir: output directory of ``spidr.extract`` with features.
        item_file: ZeroSpeech item file (see :func:`read_item_file`).
        max_size_group, max_x_across: subsampling limits (None disables; otherwise >= 2).
        seed: seed of the subsampling.
        device: where fastabx computes (default: CUDA if available, else CPU).

    Raises:
        FastabxMissingError: fastabx cannot be imported.
        ValueError: bad ``speaker``, ``context``, ``distance`` or subsampling sizes, and the errors of
            :func:`read_item_file` and :func:`load_item_features`.
    """
    if speaker not in ("within", "across"):
        raise ValueError(f"speaker must be 'within' or 'across', got {speaker!r}")
    if context not in ("within", "any"):
        raise ValueError(f"context must be 'within' or 'any', got {context!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    for option, value in (("max_size_group", max_size_group), ("max_x_across", max_x_across)):
        if value is not None and value < 2:
            raise ValueError(f"{option} must be at least 2 (or None to disable it), got {value}")
    fastabx = import_fastabx()
    import polars as pl  # a dependency of fastabx

    items = read_item_file(item_file)
    features = load_item_features(items, item_file, features_dir, layer=layer)
    labels = pl.DataFrame(
        {
            "#file": [item.file for item in items],
            "onset": [str(item.onset) for item in items],
            "offset": [str(item.offset) for item in items],
            "#phone": [item.phone for item in items],
            "prev-phone": [item.prev_phone for item in items],
            "next-phone": [item.next_phone for item in items],
            "speaker": [item.speaker for item in items],
        }
    )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    accessor = fastabx.InMemoryAccessor(dict(enumerate(features.spans)), features.data, torch.device(device))
    dataset = fastabx.Dataset(labels=labels, accessor=accessor)
    context_columns = ["prev-phone", "next-phone"] if context == "within" else []
    by = context_columns + (["speaker"] if speaker == "within" else [])
    across = ["speaker"] if speaker == "across" else None
    subsampler = fastabx.Subsampler(max_size_group, max_x_across, seed)
    task = fastabx.Task(dataset, on="#phone", by=by or None, across=across, subsampler=subsampler)
    score = fastabx.Score(task, DISTANCES[distance], progress=progress)
    levels = ([("next-phone", "prev-phone")] if context == "within" else []) + ["speaker"]
    return AbxResult(
        error_rate=score.collapse(levels=levels),
        layer=features.layer,
        speaker=speaker,
        context=context,
        distance=distance,
        items=len(items),
    )
