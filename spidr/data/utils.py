"""Small data helpers with the reference release's names: ``num_samples``, ``bytes_from_archive``, ``read_manifest``.

``read_manifest`` here is :func:`spidr.data.manifests.read_manifest` (a polars DataFrame, as in the release);
:func:`spidr.data.manifests.read_entries` gives the same manifest as a list of resolved entries.
"""

from __future__ import annotations

import os
from pathlib import Path

from spidr.data.audio import AudioError, audio_info
from spidr.data.manifests import read_manifest

__all__ = ["bytes_from_archive", "num_samples", "read_manifest"]


def num_samples(source: str | os.PathLike[str] | bytes, *, verify: bool = False) -> int:
    """Number of samples (per channel, at the file's own rate) of an audio file, or of encoded audio bytes.

    Read from the header: PCM WAV headers exactly, other formats from the container's duration (TorchCodec).

    Args:
        source: a path, or the encoded bytes of a file (e.g. from :func:`bytes_from_archive`).
        verify: raise when the header's duration times the sample rate is not a whole number of samples.

    Raises:
        ValueError: the header gives no duration or sample rate, or (``verify``) a fractional count; the
            message names the file. ``spidr.data.audio.AudioError`` (a ValueError) for unreadable audio.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _num_samples_from_header(bytes(source), "audio bytes", verify=verify)
    path = Path(source)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.suffix.lower() == ".wav":  # the RIFF header holds the exact count
        return audio_info(path)[2]
    return _num_samples_from_header(str(path), str(path), verify=verify)


def _num_samples_from_header(source: bytes | str, name: str, *, verify: bool) -> int:
    try:
        from torchcodec.decoders import AudioDecoder

        metadata = AudioDecoder(source).metadata
    except (RuntimeError, ValueError) as error:
        raise AudioError(f"{name}: cannot read the audio header ({str(error).splitlines()[0]})") from None
    duration, rate = metadata.duration_seconds_from_header, metadata.sample_rate
    if duration is None or rate is None:
        raise ValueError(f"{name}: could not determine the duration or sample rate from the header")
    samples = duration * rate
    if verify and not float(samples).is_integer():
        raise ValueError(f"{name}: the header gives {samples} samples, not a whole number")
    return int(samples)


def bytes_from_archive(archive: str | os.PathLike[str], offset: int, file_size: int) -> bytes:
    """The ``file_size`` bytes at ``offset`` in ``archive`` (a tar member's data, as a manifest locates them).

    Raises:
        FileNotFoundError: no such archive.
        ValueError: a negative offset or size, or a range that runs past the end of the archive.
    """
    if offset < 0 or file_size < 0:
        raise ValueError(f"{archive}: offset ({offset}) and file_size ({file_size}) must be non-negative")
    with open(archive, "rb") as file:
        file.seek(offset)
        data = file.read(file_size)
    if len(data) != file_size:
        raise ValueError(
            f"{archive}: bytes {offset}..{offset + file_size} run past the end of the archive "
            f"({offset + len(data)} bytes)"
        )
    return data
