"""Write the manifest of a directory of audio files or of an uncompressed tar archive.

The command line: ``python -m spidr.data.write_manifest DATASET OUTPUT`` (``--help`` for the options). The
functions, with the reference release's names and arguments: :func:`write_manifest` (CSV of a directory),
:func:`write_manifest_fairseq` (fairseq TSV of a directory), :func:`write_manifest_tar` (CSV of a tar archive).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from spidr.data import manifests as _manifests
from spidr.data.manifests import CompressedArchiveError, NoAudioFileError
from spidr.data.utils import bytes_from_archive, num_samples

__all__ = [
    "CompressedArchiveError",
    "NoAudioFileError",
    "bytes_from_archive",
    "main",
    "num_samples",
    "write_manifest",
    "write_manifest_fairseq",
    "write_manifest_tar",
]

_DESCRIPTION = """\
Write the manifest of a dataset: one row per audio file, with its number of samples read from the audio header.

DATASET is a directory (searched recursively) or an uncompressed .tar archive (compressed archives such as
.tar.gz are refused: audio is read at byte offsets inside the tar). OUTPUT's suffix picks the format: .csv
(header fileid,path,num_samples, plus archive,byte_offset,byte_size for a tar) or .jsonl; --fairseq writes a
fairseq TSV instead (the dataset root on the first line, then relative_path<TAB>num_samples). Rows are sorted by
path, and paths are absolute.
"""

_EPILOG = """\
examples:
  python -m spidr.data.write_manifest /data/LibriSpeech/train-clean-100 train.csv --ext .flac
  python -m spidr.data.write_manifest /data/shards/train-000.tar train-000.jsonl
  python -m spidr.data.write_manifest /data/my_corpus train.tsv --fairseq
"""


def _scan_directory(dataset: str | os.PathLike[str], file_extension: str) -> list[_manifests.AudioEntry]:
    if not Path(dataset).is_dir():
        raise NotADirectoryError(f"{dataset}: not a directory")
    entries = _manifests.scan_directory(dataset, file_extension, progress=True)
    if not entries:
        raise NoAudioFileError(dataset, file_extension)
    return entries


def write_manifest(
    dataset: str | os.PathLike[str], output: str | os.PathLike[str], file_extension: str = ".wav"
) -> None:
    """Write a CSV manifest (``fileid,path,num_samples``, absolute paths, sorted) of every ``*file_extension``
    file under the directory ``dataset`` (recursively), with a progress bar.

    Raises:
        NotADirectoryError: ``dataset`` is not a directory.
        NoAudioFileError: no such file under it.
        spidr.data.audio.AudioError: a file whose header cannot be read (named).
    """
    jsonl = Path(output).suffix.lower() == ".jsonl"
    _manifests.write_manifest(
        _scan_directory(dataset, file_extension), output, file_format="jsonl" if jsonl else "csv"
    )


def write_manifest_fairseq(
    dataset: str | os.PathLike[str], output: str | os.PathLike[str], file_extension: str = ".wav"
) -> None:
    """Write a fairseq TSV manifest of the directory ``dataset``: its absolute path on the first line, then
    ``relative_path<TAB>num_samples`` for every ``*file_extension`` file under it (recursively, sorted).

    Raises:
        NotADirectoryError, NoAudioFileError, spidr.data.audio.AudioError: as :func:`write_manifest`.
    """
    _manifests.write_manifest(_scan_directory(dataset, file_extension), output, fairseq_root=dataset)


def write_manifest_tar(
    dataset: str | os.PathLike[str], output: str | os.PathLike[str], file_extension: str = ".wav"
) -> None:
    """Write a CSV manifest (``fileid,path,num_samples,archive,byte_offset,byte_size``) of every
    ``*file_extension`` member of the uncompressed tar archive ``dataset``: ``path`` is the member's name,
    ``archive`` the archive's absolute path, and the member's data are the ``byte_size`` bytes at ``byte_offset``.

    Raises:
        FileNotFoundError: no such archive.
        ValueError: not a tar archive (``spidr.data.manifests.ArchiveError``).
        CompressedArchiveError: a compressed archive (.tar.gz...) or compressed members.
        NoAudioFileError: no such member.
    """
    entries = _manifests.scan_tar(dataset, file_extension, progress=True)
    if not entries:
        raise NoAudioFileError(dataset, file_extension)
    jsonl = Path(output).suffix.lower() == ".jsonl"
    _manifests.write_manifest(entries, output, file_format="jsonl" if jsonl else "csv")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spidr.data.write_manifest",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", metavar="DATASET", type=Path, help="directory of audio files, or uncompressed tar")
    parser.add_argument(
        "output", metavar="OUTPUT", type=Path, help="manifest to write: .csv, .jsonl, or any with --fairseq"
    )
    parser.add_argument(
        "--ext", default=".wav", help="extension of the audio files, case-insensitive (default: %(default)s)"
    )
    parser.add_argument("--fairseq", action="store_true", help="write a fairseq TSV manifest (directories only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"write_manifest: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 with a one-line message on stderr for bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(format="write_manifest: %(levelname)s: %(message)s", level=logging.WARNING)

    from spidr.data.audio import AudioError
    from spidr.data.manifests import ArchiveError, ManifestError, scan_directory, scan_tar, write_manifest

    dataset, output = args.dataset, args.output
    suffix = output.suffix.lower()
    if not args.fairseq and suffix not in (".csv", ".jsonl"):
        hint = " (pass --fairseq for a fairseq TSV)" if suffix == ".tsv" else ""
        return _fail(f"OUTPUT must end in .csv or .jsonl, got {str(output)!r}{hint}")
    if not dataset.exists():
        return _fail(f"{dataset}: no such file or directory")
    if args.fairseq and not dataset.is_dir():
        return _fail(f"{dataset}: --fairseq needs a directory (a fairseq TSV cannot point into a tar archive)")
    if not output.parent.is_dir():
        return _fail(f"{output}: the directory {output.parent} does not exist")
    try:
        if dataset.is_dir():
            entries = scan_directory(dataset, args.ext, progress=not args.quiet)
        else:
            entries = scan_tar(dataset, args.ext, progress=not args.quiet)
        if not entries:
            return _fail(f"{dataset}: no *{args.ext} files found")
        write_manifest(entries, output, fairseq_root=dataset if args.fairseq else None)
    except (AudioError, ArchiveError, ManifestError, OSError, ValueError) as error:
        return _fail(str(error))
    print(f"wrote {len(entries)} entries to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
