"""Manifests: the list of utterances a dataset holds, with their number of samples.

Three formats, picked by the manifest's suffix:

* ``.csv`` with the header ``fileid,path,num_samples``; for audio stored in an uncompressed tar archive, three
  more columns ``archive,byte_offset,byte_size`` give the archive and the byte range of the member's data;
* ``.jsonl``: one JSON object per line with the same fields;
* ``.tsv`` (fairseq): the first line is the dataset root, then one ``relative_path<TAB>num_samples`` per line.

``fileid`` is the file name without its extension. Relative paths (and archives) in CSV/JSONL manifests are
relative to the manifest's directory; in a fairseq TSV they are relative to the root on the first line (itself
relative to the manifest's directory when not absolute). Polars parses CSV and JSONL; it is imported only when
a manifest is read or written, so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    import polars as pl

__all__ = [
    "ArchiveError",
    "AudioEntry",
    "CompressedArchiveError",
    "ManifestError",
    "NoAudioFileError",
    "read_entries",
    "read_manifest",
    "scan_directory",
    "scan_tar",
    "write_manifest",
]

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("fileid", "path", "num_samples")
TAR_COLUMNS = ("archive", "byte_offset", "byte_size")
_INT_COLUMNS = ("num_samples", "byte_offset", "byte_size")
_HEADER_HELP = "fileid,path,num_samples (plus archive,byte_offset,byte_size for tar members)"

# Magic numbers of compressed files, to refuse compressed tars (and compressed tar members) clearly.
_COMPRESSION_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"PK\x03\x04": "zip",
    b"7z\xbc\xaf\x27\x1c": "7z",
}
_COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".zst", ".lz4", ".zip", ".7z")


class ManifestError(ValueError):
    """A manifest that cannot be read or written: the message names the manifest, and the line and column."""


class ArchiveError(ValueError):
    """An archive that cannot be indexed: not a tar, compressed, or holding compressed members."""


class CompressedArchiveError(ArchiveError):
    """A compressed archive, or an archive holding compressed members: audio is read at byte offsets, so a tar
    must be uncompressed (the reference release's name)."""


class NoAudioFileError(ArchiveError):
    """No audio file with the requested extension in a dataset (the reference release's name and arguments)."""

    def __init__(self, archive: str | os.PathLike[str], file_extension: str) -> None:
        super().__init__(f"No file found in {archive} with extension `{file_extension}`.")
        self.archive, self.file_extension = str(archive), file_extension


@dataclass(frozen=True, slots=True)
class AudioEntry:
    """One utterance of a manifest.

    ``path`` is the audio file, or for a tar member (``archive`` set) the member's name inside the archive, whose
    data are the ``byte_size`` bytes at ``byte_offset`` in the archive. ``num_samples`` is read from the audio
    header at the file's own sample rate.
    """

    fileid: str
    path: str
    num_samples: int
    archive: str | None = None
    byte_offset: int | None = None
    byte_size: int | None = None


def _fail(
    manifest: str | os.PathLike[str], message: str, line: int | None = None, column: str | None = None
) -> ManifestError:
    where = "".join([f", line {line}" if line is not None else "", f", column '{column}'" if column else ""])
    return ManifestError(f"{manifest}{where}: {message}")


# --------------------------------------------------------------------------------------------------------------------
# Reading.


def read_entries(path: str | os.PathLike[str], *, check_exists: bool = False) -> list[AudioEntry]:
    """Read a ``.csv``, ``.jsonl`` or fairseq ``.tsv`` manifest as a list of :class:`AudioEntry`.

    Paths come back absolute: relative ones are joined to the manifest's directory (CSV, JSONL) or to the
    dataset root (TSV). For tar members, ``archive`` is resolved that way and ``path`` stays the member's name.
    Blank lines are skipped; columns other than the manifest's own are allowed and ignored.

    Args:
        path: the manifest; its suffix picks the format.
        check_exists: also check that every audio file (or archive) exists. Off by default: a training run
            skips unreadable files as it meets them.

    Raises:
        ManifestError: naming the manifest, the line (1-based, the header is line 1) and the column: text that is
            not UTF-8, a wrong header or missing columns, empty fileid or path, non-integer or negative
            num_samples/byte_offset/byte_size, tar columns partially present, a byte range outside its archive, a
            missing file (``check_exists``), or an unknown suffix.
    """
    manifest, suffix = _readable_manifest(path)
    if suffix == ".tsv":
        return _read_tsv(manifest, check_exists)
    return _read_table(manifest, suffix == ".csv", check_exists)


def read_manifest(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a manifest as a polars DataFrame, as the reference release does (its ``read_manifest``).

    CSV and JSONL come back with the file's own columns, whatever they are (``fileid``, ``path``,
    ``num_samples``, the tar columns, or others: a manifest of ``fileid,num_samples`` alone is read too), values
    as written and types inferred by polars; a fairseq TSV as the columns ``fileid`` (the relative path, as the
    release names it), ``path`` (the root joined to it) and ``num_samples``. Relative paths are left as written.
    Nothing is checked beyond what parsing needs: :func:`read_entries` checks a manifest of audio files.

    Raises:
        ManifestError: an unknown suffix, a missing file, text that is not UTF-8 or does not parse, or a TSV
            without its root line; the message names the manifest (and the line when it is known).
    """
    import polars as pl

    manifest, suffix = _readable_manifest(path)
    try:
        if suffix == ".csv":
            return pl.read_csv(manifest)
        if suffix == ".jsonl":
            return pl.read_ndjson(manifest) if _has_content(manifest) else pl.DataFrame()
    except pl.exceptions.PolarsError as error:
        raise _fail(manifest, f"cannot parse {suffix[1:].upper()} ({str(error).splitlines()[0]})") from None
    with manifest.open(encoding="utf-8-sig", newline="") as file:
        lines = file.read().splitlines()
    if not lines or not lines[0].strip():
        raise _fail(manifest, "the first line must be the dataset root (fairseq TSV manifest)", 1, "root")
    written = lines[0].strip()
    root = written if os.path.isabs(written) or os.path.isdir(written) else _join(manifest.resolve().parent, written)
    root = str(Path(root))
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        count = _parse_count(fields[1]) if len(fields) == 2 else None
        if count is None:
            raise _fail(manifest, "expected relative_path<TAB>num_samples", number)
        rows.append((fields[0], f"{root}{os.sep}{fields[0]}", count))
    schema = {"fileid": pl.String, "path": pl.String, "num_samples": pl.Int64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def manifest_columns(path: str | os.PathLike[str]) -> list[str]:
    """The column names of a manifest, from its first line (CSV header, first JSONL object; a fairseq TSV has
    ``fileid``, ``path`` and ``num_samples``), without reading the rest.

    Raises:
        ManifestError: as :func:`read_manifest`.
    """
    manifest, suffix = _readable_manifest(path)
    if suffix == ".tsv":
        return list(BASE_COLUMNS)
    with manifest.open(encoding="utf-8-sig", newline="") as file:
        first = next((line for line in file if line.strip()), "")
    if suffix == ".csv":
        return next(csv.reader([first]), [])
    try:
        record = json.loads(first) if first else {}
    except json.JSONDecodeError as error:
        raise _fail(manifest, f"invalid JSON ({error.msg})", 1) from None
    return list(record) if isinstance(record, dict) else []


def _readable_manifest(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The manifest's path and lower-cased suffix, once it is known to be a UTF-8 file of a known format."""
    manifest = Path(path)
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".tsv"):
        raise _fail(manifest, f"unknown manifest suffix '{manifest.suffix}' (expected .csv, .jsonl or .tsv)")
    if not manifest.is_file():
        raise _fail(manifest, "manifest not found" if not manifest.exists() else "not a file")
    _check_utf8(manifest)
    return manifest, suffix


def _check_utf8(manifest: Path) -> None:
    """Refuse a manifest that is not UTF-8 text, naming the line of the first bad byte."""
    try:
        data = manifest.read_bytes()
    except OSError as error:
        raise _fail(manifest, f"cannot read the manifest ({error.strerror or error})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}: {error.reason})"
        raise _fail(manifest, message, line) from None


def _read_tsv(manifest: Path, check_exists: bool) -> list[AudioEntry]:
    with manifest.open(encoding="utf-8-sig", newline="") as file:
        lines = file.read().splitlines()
    if not lines or not lines[0].strip():
        raise _fail(manifest, "the first line must be the dataset root (fairseq TSV manifest)", 1, "root")
    root = _join(manifest.resolve().parent, lines[0].strip()).rstrip(os.sep) or os.sep
    if check_exists and not os.path.isdir(root):
        raise _fail(manifest, f"dataset root {root} is not a directory", 1, "root")
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise _fail(
                manifest, f"expected 2 tab-separated fields (relative_path, num_samples), got {len(fields)}", number
            )
        relative, count = fields
        if not relative.strip():
            raise _fail(manifest, "empty path", number, "path")
        num_samples = _parse_count(count)
        if num_samples is None:
            raise _fail(manifest, f"not an integer: {count!r}", number, "num_samples")
        if num_samples < 0:
            raise _fail(manifest, f"negative: {num_samples}", number, "num_samples")
        audio = _join(root, relative)
        if check_exists and not os.path.isfile(audio):
            raise _fail(manifest, f"file not found: {audio}", number, "path")
        entries.append(AudioEntry(_stem(relative.rsplit("/", 1)[-1]), audio, num_samples))
    return entries


def _parse_count(text: str) -> int | None:
    text = text.strip()
    if not text.lstrip("+-").isdigit() or not text.isascii():
        return None
    return int(text)


def _stem(name: str, ext: str | None = None) -> str:
    """File name without extension: without ``ext`` when it ends with it (case-insensitive), else the last one."""
    if ext and name.lower().endswith(ext.lower()) and len(name) > len(ext):
        return name[: -len(ext)]
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


def _read_table(manifest: Path, is_csv: bool, check_exists: bool) -> list[AudioEntry]:
    import polars as pl

    if is_csv:
        columns = _csv_header(manifest)
        try:
            frame = pl.read_csv(manifest, infer_schema=False, encoding="utf8")
        except pl.exceptions.PolarsError as error:
            raise _csv_parse_error(manifest, len(columns), error) from None
    else:
        try:
            frame = pl.read_ndjson(manifest, infer_schema_length=None)
        except pl.exceptions.PolarsError as error:
            if not _has_content(manifest):
                return []
            raise _jsonl_scan_error(manifest, str(error)) from None
        columns = frame.columns
    _check_columns(manifest, frame, columns, is_csv)
    frame = _as_strings(manifest, frame, is_csv)
    frame = frame.with_row_index("_row")
    if is_csv:  # a blank line comes back as a row of nulls
        frame = frame.filter(~pl.all_horizontal(pl.exclude("_row").is_null()))
    _check_rows(manifest, frame, is_csv)
    return _entries(manifest, frame, is_csv, check_exists)


def _has_content(manifest: Path) -> bool:
    with manifest.open("rb") as file:
        return any(line.strip() for line in file)


def _csv_header(manifest: Path) -> list[str]:
    with manifest.open(encoding="utf-8-sig", newline="") as file:  # -sig: a byte-order mark is not a column name
        header = next(csv.reader(file), [])
    if not header or not set(header) & set(BASE_COLUMNS):
        raise _fail(manifest, f"line 1 must be the header {_HEADER_HELP}, got {','.join(header)!r}", 1)
    return header


def _check_columns(manifest: Path, frame: pl.DataFrame, columns: list[str], is_csv: bool) -> None:
    def first_line(column: str) -> int:
        if is_csv or column not in frame.columns:
            return 1
        return _line_of(manifest, frame, int(frame[column].is_not_null().arg_true()[0]), is_csv)

    seen = set()
    for column in columns:  # other columns (a speaker, a duration...) are allowed and left aside
        if column in seen:
            raise _fail(manifest, "duplicate column", 1, column)
        seen.add(column)
    for column in BASE_COLUMNS:
        if column not in seen:
            raise _fail(manifest, f"missing column (expected {_HEADER_HELP})", 1, column)
    present = [column for column in TAR_COLUMNS if column in seen]
    if present and len(present) != len(TAR_COLUMNS):
        missing = [column for column in TAR_COLUMNS if column not in seen]
        raise _fail(
            manifest,
            f"tar columns partially present: {', '.join(missing)} missing (a tar member needs all of "
            f"{', '.join(TAR_COLUMNS)})",
            first_line(present[0]),
            missing[0],
        )


def _as_strings(manifest: Path, frame: pl.DataFrame, is_csv: bool) -> pl.DataFrame:
    """All columns as strings (CSV already is); JSONL values of the wrong JSON type are reported by line."""
    import polars as pl

    frame = frame.select(column for column in frame.columns if column in BASE_COLUMNS + TAR_COLUMNS)
    if is_csv:
        return frame
    for column, dtype in frame.schema.items():
        wanted_int = column in _INT_COLUMNS
        if not (dtype in (pl.String, pl.Null) or (wanted_int and dtype.is_integer())):
            raise _jsonl_scan_error(manifest, f"column {column} has JSON type {dtype}")
    return frame.with_columns(pl.all().cast(pl.String))


def _check_rows(manifest: Path, frame: pl.DataFrame, is_csv: bool) -> None:
    """Find the first (line, column) with a bad value and raise; the frame holds string columns and ``_row``."""
    import polars as pl

    def empty(column: str) -> pl.Expr:
        return pl.col(column).is_null() | (pl.col(column).str.strip_chars() == "")

    def integer(column: str) -> pl.Expr:
        return pl.col(column).str.strip_chars().cast(pl.Int64, strict=False)

    checks: list[tuple[str, pl.Expr, Callable[[str | None], str]]] = [
        ("fileid", empty("fileid"), lambda _: "empty fileid"),
        ("path", empty("path"), lambda _: "empty path"),
        ("num_samples", empty("num_samples"), lambda _: "missing num_samples"),
        ("num_samples", integer("num_samples").is_null(), lambda value: f"not an integer: {value!r}"),
        ("num_samples", integer("num_samples") < 0, lambda value: f"negative: {value}"),
    ]
    if "archive" in frame.columns:
        set_count = pl.sum_horizontal(~empty(column) for column in TAR_COLUMNS)
        partial = "tar columns partially present: archive, byte_offset and byte_size must all be set or all empty"
        for column in TAR_COLUMNS:
            checks.append((column, (set_count > 0) & empty(column), lambda _, message=partial: message))
        for column in ("byte_offset", "byte_size"):
            present = ~empty(column)
            checks.append((column, present & integer(column).is_null(), lambda value: f"not an integer: {value!r}"))
            checks.append((column, present & (integer(column) < 0), lambda value: f"negative: {value}"))
    found = frame.select(
        pl.col("_row").filter(condition).first().alias(str(index)) for index, (_, condition, _) in enumerate(checks)
    ).row(0)
    failures = [(position, index) for index, position in enumerate(found) if position is not None]
    if not failures:
        return
    position, index = min(failures)
    column, _, message = checks[index]
    row = frame.filter(pl.col("_row") == position)
    raise _fail(manifest, message(row[column][0]), _line_of(manifest, frame, position, is_csv), column)


def _line_of(manifest: Path, frame: pl.DataFrame, row: int, is_csv: bool) -> int:
    """1-based line of a data row (``row`` counts data rows from 0, blank CSV lines included)."""
    import polars as pl

    if is_csv:  # header, then one line per row, plus the newlines inside quoted fields before it
        before = frame.filter(pl.col("_row") < row).drop("_row")
        inner = before.select(pl.sum_horizontal(pl.all().str.count_matches("\n").fill_null(0)).sum()).item()
        return row + 2 + int(inner or 0)
    # JSONL: polars skips blank lines
    with manifest.open(encoding="utf-8") as file:
        content = [number for number, line in enumerate(file, start=1) if line.strip()]
    return content[row] if row < len(content) else row + 1


def _csv_parse_error(manifest: Path, num_columns: int, error: Exception) -> ManifestError:
    with manifest.open(encoding="utf-8", errors="replace", newline="") as file:
        reader = csv.reader(file)
        for record in reader:
            if len(record) > num_columns:
                return _fail(manifest, f"{len(record)} fields, the header has {num_columns}", reader.line_num)
    return _fail(manifest, f"cannot parse CSV ({str(error).splitlines()[0]})")


def _jsonl_scan_error(manifest: Path, reason: str) -> ManifestError:
    """Locate a JSONL problem that polars reported without a line number."""
    names = {"num_samples": int, "byte_offset": int, "byte_size": int, "fileid": str, "path": str, "archive": str}
    with manifest.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                return _fail(manifest, f"invalid JSON ({error.msg})", number)
            if not isinstance(record, dict):
                return _fail(manifest, f"expected a JSON object, got {type(record).__name__}", number)
            for key, value in record.items():
                if key not in names:
                    continue
                if value is None or (isinstance(value, str) and names[key] is int):
                    continue
                if isinstance(value, bool) or not isinstance(value, names[key]):
                    kind = "an integer" if names[key] is int else "a string"
                    return _fail(manifest, f"expected {kind}, got {json.dumps(value)}", number, key)
    return _fail(manifest, f"cannot parse JSONL ({reason.splitlines()[0]})")


def _entries(manifest: Path, frame: pl.DataFrame, is_csv: bool, check_exists: bool) -> list[AudioEntry]:
    import polars as pl

    base = manifest.resolve().parent
    has_tar = "archive" in frame.columns
    strings = frame  # for line numbers
    frame = frame.with_columns(
        pl.col(column).str.strip_chars().cast(pl.Int64) for column in _INT_COLUMNS if column in frame.columns
    )

    def resolve(text: str) -> str:
        return _join(base, text)

    def resolved(column: str) -> pl.Expr:  # resolve() on a column, without a Python call per row
        value = pl.col(column)
        prefix = pl.lit(f"{base}{os.sep}")
        return pl.when(value.str.starts_with(os.sep)).then(value).otherwise(prefix + value.str.strip_prefix("./"))

    sizes: dict[str, int | None] = {}
    if has_tar:
        frame = frame.with_columns(pl.col("archive").str.strip_chars().replace("", None))
        for archive in frame["archive"].drop_nulls().unique():
            archive_path = resolve(archive)
            sizes[archive] = os.path.getsize(archive_path) if os.path.isfile(archive_path) else None
        size = pl.col("archive").replace_strict(sizes, default=None, return_dtype=pl.Int64)
        outside = frame.filter(pl.col("byte_offset") + pl.col("byte_size") > size).head(1)
        if len(outside):
            row = outside.row(0, named=True)
            raise _fail(
                manifest,
                f"bytes {row['byte_offset']}..{row['byte_offset'] + row['byte_size']} lie outside the archive "
                f"{resolve(row['archive'])} ({sizes[row['archive']]} bytes)",
                _line_of(manifest, strings, row["_row"], is_csv),
                "byte_size",
            )
    if has_tar:
        missing = {archive for archive, size in sizes.items() if size is None}
        frame = frame.with_columns(
            pl.col("archive").is_in(list(missing)).alias("_missing"),
            pl.when(pl.col("archive").is_null()).then(resolved("path")).otherwise(pl.col("path")).alias("path"),
            resolved("archive"),
        )
        rows = frame.select("_row", "_missing", "fileid", "path", "num_samples", *TAR_COLUMNS).iter_rows()
        entries = [AudioEntry(*values[2:]) for values in rows]
    else:
        frame = frame.with_columns(resolved("path"), pl.lit(False).alias("_missing"))
        entries = [AudioEntry(*values) for values in frame.select("fileid", "path", "num_samples").iter_rows()]
    if check_exists:
        for row, missing, entry in zip(frame["_row"], frame["_missing"], entries, strict=True):
            if entry.archive is None and not os.path.isfile(entry.path):
                raise _fail(
                    manifest, f"file not found: {entry.path}", _line_of(manifest, strings, row, is_csv), "path"
                )
            if missing:
                message = f"archive not found: {entry.archive}"
                raise _fail(manifest, message, _line_of(manifest, strings, row, is_csv), "archive")
    return entries


def _join(base: str | Path, path: str) -> str:
    """``path`` if absolute, else ``base/path`` (string operations only: no system call, no Path per row)."""
    if os.path.isabs(path):
        return path
    return f"{base}{os.sep}{path.removeprefix('./')}"


# --------------------------------------------------------------------------------------------------------------------
# Writing.


def write_manifest(
    entries: Iterable[AudioEntry],
    path: str | os.PathLike[str],
    *,
    fairseq_root: str | os.PathLike[str] | None = None,
    file_format: Literal["csv", "jsonl"] | None = None,
) -> None:
    """Write entries as a manifest whose format is picked by the suffix of ``path`` (``.csv`` or ``.jsonl``).

    With ``fairseq_root`` (required for a ``.tsv``), write a fairseq TSV instead: the root on the first line, then
    each path relative to it; every entry must then be a file under the root (not a tar member). CSV/JSONL get
    the tar columns when some entry is a tar member. Paths are written as they are in the entries.
    ``file_format`` writes CSV or JSONL whatever the suffix.

    Raises:
        ManifestError: unknown suffix, a ``.tsv`` without ``fairseq_root``, or entries that a TSV cannot hold.
    """
    manifest = Path(path)
    entries = list(entries)
    suffix = manifest.suffix.lower()
    if fairseq_root is not None:
        _write_tsv(entries, manifest, Path(fairseq_root))
        return
    if file_format is not None:
        suffix = f".{file_format}"
    if suffix == ".tsv":
        raise _fail(manifest, "a fairseq .tsv manifest needs fairseq_root (the dataset root on its first line)")
    if suffix not in (".csv", ".jsonl"):
        raise _fail(manifest, f"unknown manifest suffix '{manifest.suffix}' (expected .csv, .jsonl or .tsv)")

    import polars as pl

    has_tar = any(entry.archive is not None for entry in entries)
    schema = {"fileid": pl.String, "path": pl.String, "num_samples": pl.Int64}
    if has_tar:
        schema |= {"archive": pl.String, "byte_offset": pl.Int64, "byte_size": pl.Int64}
    frame = pl.DataFrame(
        {column: [getattr(entry, column) for entry in entries] for column in schema}, schema=schema, strict=True
    )
    if suffix == ".csv":
        frame.write_csv(manifest)
    else:
        frame.write_ndjson(manifest)


def _write_tsv(entries: list[AudioEntry], manifest: Path, root: Path) -> None:
    # Entries from scan_directory hold absolute paths under the resolved root: compare strings, resolving an
    # entry (system calls) only when it is not plainly under the root.
    root = root.resolve()
    prefix = str(root).rstrip(os.sep) + os.sep
    lines = [str(root)]
    for entry in entries:
        if entry.archive is not None:
            raise _fail(manifest, f"a fairseq TSV cannot hold tar members ({entry.path} in {entry.archive})")
        path = entry.path if entry.path.startswith(prefix) else str(Path(entry.path).resolve())
        if not path.startswith(prefix):
            raise _fail(manifest, f"{entry.path} is not under the fairseq root {root}")
        relative = path.removeprefix(prefix)
        if "\t" in relative or "\n" in relative:
            raise _fail(manifest, f"a fairseq TSV cannot hold a path with a tab or newline: {entry.path!r}")
        lines.append(f"{relative}\t{entry.num_samples}")
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Scanning datasets.

_T = TypeVar("_T")


def _progress(items: list[_T], enabled: bool, description: str) -> Iterator[_T] | list[_T]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return items
    return tqdm(items, desc=description, unit="file", disable=None)


def _normalize_ext(ext: str) -> str:
    if not ext or ext == ".":
        raise ValueError("empty file extension")
    return ext if ext.startswith(".") else f".{ext}"


def _warn_not_16k_mono(formats: dict[tuple[int, int], list[str]]) -> None:
    odd = {key: names for key, names in formats.items() if key != (16_000, 1)}
    for (sample_rate, channels), names in sorted(odd.items()):
        logger.warning(
            "%d file(s) are not mono 16 kHz (%d channel(s) at %d Hz), e.g. %s: loading them needs resample=True",
            len(names),
            channels,
            sample_rate,
            names[0],
        )


def scan_directory(root: str | os.PathLike[str], ext: str = ".wav", *, progress: bool = False) -> list[AudioEntry]:
    """Entries for every ``*ext`` file under ``root`` (recursively), sorted by path, with absolute paths.

    ``num_samples`` comes from each file's header (no decoding for WAV, FLAC and most containers). The extension
    match ignores case. ``progress`` shows a tqdm progress bar when tqdm is installed and stderr is a terminal.

    Raises:
        FileNotFoundError, NotADirectoryError: ``root`` is not a directory.
        spidr.data.audio.AudioError: a file that is empty, corrupt or truncated.
    """
    from spidr.data.audio import audio_info

    ext = _normalize_ext(ext)
    directory = Path(root).resolve()
    if not directory.exists():
        raise FileNotFoundError(f"{root}: no such directory")
    if not directory.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    paths = []
    for folder, _, names in os.walk(directory):
        paths += [os.path.join(folder, name) for name in names if name.lower().endswith(ext.lower())]
    paths = sorted(path for path in paths if os.path.isfile(path))
    entries, formats = [], {}
    for path in _progress(paths, progress, f"scanning {directory.name}"):
        sample_rate, channels, num_samples = audio_info(path)
        formats.setdefault((sample_rate, channels), []).append(path)
        entries.append(AudioEntry(_stem(os.path.basename(path), ext), path, num_samples))
    _warn_not_16k_mono(formats)
    return entries


def _compression(head: bytes) -> str | None:
    return next((name for magic, name in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def scan_tar(path: str | os.PathLike[str], ext: str = ".wav", *, progress: bool = False) -> list[AudioEntry]:
    """Entries for every ``*ext`` member of an uncompressed tar archive, sorted by member name.

    Each entry has ``archive`` (the absolute path of the tar), ``path`` (the member name), and ``byte_offset`` and
    ``byte_size``: where the member's data lie in the archive (``TarInfo.offset_data`` and ``TarInfo.size``), so
    that a training run reads them without tarfile. ``num_samples`` comes from each member's audio header.

    Raises:
        FileNotFoundError: the archive does not exist.
        ArchiveError: the file is not a tar, is compressed (.tar.gz, .tgz, .tar.bz2, .tar.xz, ...), or holds
            compressed members (e.g. ``utt.wav.gz``): audio is read at byte offsets, so nothing may be compressed.
        spidr.data.audio.AudioError: a member that is empty, corrupt or truncated.
    """
    from spidr.data.audio import audio_info

    ext = _normalize_ext(ext)
    archive = Path(path).resolve()
    if not archive.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with archive.open("rb") as file:
        kind = _compression(file.read(8))
    if kind is not None:
        raise CompressedArchiveError(
            f"{path}: {kind}-compressed archive; audio is read at byte offsets inside the tar, so it must be an "
            "uncompressed .tar (decompress it first, e.g. with gunzip, bunzip2 or unxz)"
        )
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = [member for member in tar.getmembers() if member.isreg()]
    except tarfile.TarError as error:
        raise ArchiveError(f"{path}: not a readable uncompressed tar archive ({error})") from None
    wanted = []
    with archive.open("rb") as file:
        for member in members:
            name = member.name.lower()
            if any(name.endswith(ext.lower() + suffix) for suffix in _COMPRESSED_SUFFIXES):
                raise CompressedArchiveError(
                    f"{path}: member {member.name} is compressed; store the audio uncompressed"
                )
            if not name.endswith(ext.lower()):
                continue
            if member.issparse():
                raise ArchiveError(f"{path}: member {member.name} is a sparse file; its data are not contiguous")
            file.seek(member.offset_data)
            kind = _compression(file.read(8))
            if kind is not None:
                message = f"{path}: member {member.name} is {kind}-compressed; store the audio uncompressed"
                raise CompressedArchiveError(message)
            wanted.append(member)
    wanted.sort(key=lambda member: member.name)
    entries, formats = [], {}
    for member in _progress(wanted, progress, f"scanning {archive.name}"):
        entry = AudioEntry(
            _stem(os.path.basename(member.name), ext), member.name, 0, str(archive), member.offset_data, member.size
        )
        sample_rate, channels, num_samples = audio_info(entry)
        formats.setdefault((sample_rate, channels), []).append(f"{member.name} in {archive}")
        entries.append(replace(entry, num_samples=num_samples))
    _warn_not_16k_mono(formats)
    return entries
