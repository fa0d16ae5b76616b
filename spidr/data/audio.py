"""Audio decoding for SpidR: mono 16 kHz float32 waveforms from files or from members of uncompressed tars.

Two decoders sit behind :func:`load_audio` and :func:`audio_info`:

* a fast path for PCM ``.wav`` (8/16/24/32-bit integer, 32/64-bit float): the RIFF header is parsed here and the
  samples are converted with numpy, with the same conventions as FFmpeg (int16 divided by 32768, ...). It avoids
  TorchCodec's per-call overhead, which dominates for the short utterances held in memory when reading a tar.
* TorchCodec (FFmpeg) for everything else: FLAC, MP3, Ogg, non-PCM WAV (mu-law, ADPCM, ...), RF64.

Both give the same samples for the same PCM WAV (covered by the tests). TorchCodec is imported only when used.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torchcodec.decoders import AudioDecoder

    from spidr.data.manifests import AudioEntry

from spidr.config import SAMPLE_RATE

__all__ = ["SAMPLE_RATE", "AudioError", "audio_info", "decode_audio", "load_audio"]

logger = logging.getLogger(__name__)

MIN_RESAMPLED_RATE = 1_000
"""Files below this rate are not resampled: such a rate comes from a corrupt header, and upsampling from it would
turn a small file into gigabytes of samples."""


class AudioError(ValueError):
    """An audio file (or tar member) that cannot be used: the message names it and says why."""


# --------------------------------------------------------------------------------------------------------------------
# Where the encoded bytes are: a whole file, or a byte range of an archive.


@dataclass(frozen=True)
class _Blob:
    name: str  # for messages: the file, or "MEMBER in archive ARCHIVE"
    file: Path  # the file to open: the audio file itself or the archive
    suffix: str  # lower-cased suffix of the audio file name (picks the fast WAV path)
    offset: int = 0
    size: int | None = None  # None: up to the end of the file


def _blob(source: str | os.PathLike[str] | AudioEntry) -> _Blob:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return _Blob(str(path), path, path.suffix.lower())
    archive = getattr(source, "archive", None)
    member = getattr(source, "path", None)
    if member is None:
        raise TypeError(f"expected a path or an AudioEntry, got {type(source).__name__}")
    if archive is None:
        return _Blob(str(member), Path(member), Path(member).suffix.lower())
    name = f"{member!s} in archive {archive!s}"
    if source.byte_offset is None or source.byte_size is None:
        raise AudioError(f"{name}: a tar member needs byte_offset and byte_size")
    if source.byte_offset < 0 or source.byte_size < 0:
        raise AudioError(f"{name}: negative byte_offset or byte_size")
    return _Blob(name, Path(archive), Path(member).suffix.lower(), source.byte_offset, source.byte_size)


class _Slice(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes of an open binary file, starting at ``offset``."""

    def __init__(self, file: io.BufferedReader, offset: int, size: int) -> None:
        super().__init__()
        self._file, self._offset, self._size, self._pos = file, offset, size, 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        remaining = max(0, self._size - self._pos)
        size = remaining if size is None or size < 0 else min(size, remaining)
        if size == 0:
            return b""
        self._file.seek(self._offset + self._pos)
        data = self._file.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read_at(self, position: int, size: int) -> bytes:
        self.seek(position)
        return self.read(size)


class _Opened:
    """Context manager: opens a blob and yields a :class:`_Slice` over its bytes, with clear errors."""

    def __init__(self, blob: _Blob) -> None:
        self.blob = blob
        self._file: io.BufferedReader | None = None

    def __enter__(self) -> _Slice:
        blob = self.blob
        what = "archive" if blob.size is not None else "file"
        try:
            self._file = blob.file.open("rb")
        except FileNotFoundError:
            raise AudioError(f"{blob.name}: {what} not found") from None
        except IsADirectoryError:
            raise AudioError(f"{blob.name}: is a directory, not an audio file") from None
        except OSError as error:
            raise AudioError(f"{blob.name}: cannot open {what} ({error.strerror or error})") from None
        file_size = os.fstat(self._file.fileno()).st_size
        if blob.size is None:
            size = file_size
        else:
            size = blob.size
            if blob.offset + blob.size > file_size:
                self._file.close()
                raise AudioError(
                    f"{blob.name}: bytes {blob.offset}..{blob.offset + blob.size} lie outside the archive "
                    f"({file_size} bytes; truncated archive or stale manifest?)"
                )
        if size == 0:
            self._file.close()
            raise AudioError(f"{blob.name}: empty file (0 bytes)")
        return _Slice(self._file, blob.offset, size)

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()


# --------------------------------------------------------------------------------------------------------------------
# Fast path: PCM WAV parsed from its RIFF header.

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # GUID after the 2-byte format code
_FAST_FORMATS = {(_WAVE_FORMAT_PCM, 8), (_WAVE_FORMAT_PCM, 16), (_WAVE_FORMAT_PCM, 24), (_WAVE_FORMAT_PCM, 32)}
_FAST_FORMATS |= {(_WAVE_FORMAT_IEEE_FLOAT, 32), (_WAVE_FORMAT_IEEE_FLOAT, 64)}


@dataclass(frozen=True)
class _WavHeader:
    format_code: int  # _WAVE_FORMAT_PCM or _WAVE_FORMAT_IEEE_FLOAT
    bits: int
    sample_rate: int
    num_channels: int
    data_offset: int
    num_frames: int


def _parse_wav(reader: _Slice, name: str) -> _WavHeader | None:
    """The header of a PCM/float WAV, or None when the fast path does not apply (not RIFF, other codec).

    Raises AudioError for a RIFF WAVE file that is corrupt or truncated.
    """
    head = reader.read_at(0, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None  # RF64, RIFX, or not a WAV at all: TorchCodec decides
    fmt: tuple[int, int, int, int, int] | None = None  # format code, channels, rate, block align, bits
    position = 12
    while True:
        chunk = reader.read_at(position, 8)
        if len(chunk) < 8:
            reason = "no 'fmt ' chunk" if fmt is None else "no 'data' chunk"
            raise AudioError(f"{name}: corrupt or truncated WAV ({reason})")
        chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        body = position + 8
        if chunk_id == b"fmt ":
            raw = reader.read_at(body, min(chunk_size, 40))
            if chunk_size < 16 or len(raw) < 16:
                raise AudioError(f"{name}: corrupt or truncated WAV ('fmt ' chunk of {len(raw)} bytes)")
            code, channels, rate, _, block_align, bits = struct.unpack("<HHIIHH", raw[:16])
            if code == _WAVE_FORMAT_EXTENSIBLE:
                if len(raw) < 40 or raw[26:40] != _KSDATAFORMAT_TAIL:
                    return None
                code = struct.unpack("<H", raw[24:26])[0]
            fmt = (code, channels, rate, block_align, bits)
        elif chunk_id == b"data":
            if fmt is None:
                return None  # unusual layout: leave it to FFmpeg
            code, channels, rate, block_align, bits = fmt
            if (code, bits) not in _FAST_FORMATS or channels < 1 or block_align != channels * bits // 8:
                return None
            if rate <= 0:
                raise AudioError(f"{name}: corrupt WAV (sample rate {rate})")
            available = reader.size - body
            if chunk_size == 0xFFFFFFFF:  # written to a stream: the size was never filled in
                chunk_size = available
            elif chunk_size > available:
                raise AudioError(
                    f"{name}: truncated WAV (the data chunk declares {chunk_size} bytes, the file holds {available})"
                )
            return _WavHeader(code, bits, rate, channels, body, chunk_size // block_align)
        position = body + chunk_size + (chunk_size & 1)  # chunks are padded to an even size


def _wav_samples(reader: _Slice, header: _WavHeader) -> np.ndarray:
    """Samples as float32 (channels, frames), converted exactly as FFmpeg converts to its float format."""
    count = header.num_frames * header.num_channels
    data = reader.read_at(header.data_offset, count * header.bits // 8)
    if header.format_code == _WAVE_FORMAT_IEEE_FLOAT:
        samples = np.frombuffer(data, dtype="<f4" if header.bits == 32 else "<f8").astype(np.float32)
    elif header.bits == 8:  # unsigned, centred on 128
        samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) * np.float32(1 / 128)
    elif header.bits == 16:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)
    elif header.bits == 24:
        # FFmpeg widens 24-bit samples to int32 (shifted left by 8) and scales by 2**-31: do the same.
        widened = np.zeros((count, 4), dtype=np.uint8)
        widened[:, 1:] = np.frombuffer(data, dtype=np.uint8).reshape(count, 3)
        samples = widened.view("<i4").reshape(count).astype(np.float32) * np.float32(2.0**-31)
    else:
        samples = np.frombuffer(data, dtype="<i4").astype(np.float32) * np.float32(2.0**-31)
    return samples.reshape(header.num_frames, header.num_channels).T


# --------------------------------------------------------------------------------------------------------------------
# TorchCodec path.


def _torchcodec_error(name: str, error: Exception) -> AudioError:
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    # TorchCodec's messages start with the C++ function and source location: keep only FFmpeg's reason.
    message = re.sub(r"^\w+, \S+:\d+, ", "", message)
    return AudioError(f"{name}: corrupt or undecodable audio ({message})")


def _decoder(source: bytes | _Slice, name: str, **kwargs: int) -> AudioDecoder:
    from torchcodec.decoders import AudioDecoder

    try:
        return AudioDecoder(source, **kwargs)
    except (RuntimeError, ValueError) as error:
        raise _torchcodec_error(name, error) from None


def _torchcodec_samples(decoder: AudioDecoder, name: str) -> torch.Tensor:
    try:
        return decoder.get_all_samples().data
    except (RuntimeError, ValueError) as error:
        raise _torchcodec_error(name, error) from None


# --------------------------------------------------------------------------------------------------------------------
# Internal decoders, also used by the tests to compare the two paths.


def _decode_wav(source: str | os.PathLike[str] | AudioEntry) -> tuple[torch.Tensor, int] | None:
    """(samples (channels, frames) float32, sample rate) by the fast WAV path, or None where it does not apply."""
    blob = _blob(source)
    with _Opened(blob) as reader:
        header = _parse_wav(reader, blob.name)
        if header is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(_wav_samples(reader, header))), header.sample_rate


def _decode_torchcodec(
    source: str | os.PathLike[str] | AudioEntry, *, sample_rate: int | None = None
) -> tuple[torch.Tensor, int]:
    """(samples (channels, frames) float32, the file's own sample rate) decoded by TorchCodec.

    With ``sample_rate``, the samples are resampled to it (FFmpeg's resampler); the rate returned is still the
    file's, so that the caller knows whether resampling happened.
    """
    blob = _blob(source)
    with _Opened(blob) as reader:
        data = reader.read_at(0, reader.size)
    kwargs = {} if sample_rate is None else {"sample_rate": sample_rate}
    decoder = _decoder(data, blob.name, **kwargs)
    rate = decoder.metadata.sample_rate
    if sample_rate is not None and rate is not None and rate < MIN_RESAMPLED_RATE:
        raise AudioError(
            f"{blob.name}: implausible sample rate of {rate} Hz (corrupt header?): not resampled to {sample_rate} Hz"
        )
    return _torchcodec_samples(decoder, blob.name), rate


# --------------------------------------------------------------------------------------------------------------------
# Public API.


def audio_info(source: str | os.PathLike[str] | AudioEntry) -> tuple[int, int, int]:
    """``(sample_rate, num_channels, num_samples)`` from the audio header, without decoding the samples.

    ``source`` is a path or an :class:`~spidr.data.manifests.AudioEntry` (a tar member is read from its archive).
    PCM WAV headers are parsed directly; other formats go through TorchCodec's metadata, whose duration comes
    from the container header (estimated for some formats such as MP3 without a Xing header). Where the
    container gives no duration, the file is decoded to count its samples.

    Raises:
        AudioError: the file is missing, empty, corrupt or truncated.
    """
    blob = _blob(source)
    with _Opened(blob) as reader:
        if blob.suffix == ".wav":
            header = _parse_wav(reader, blob.name)
            if header is not None:
                return header.sample_rate, header.num_channels, header.num_frames
        reader.seek(0)
        decoder = _decoder(reader, blob.name)
        metadata = decoder.metadata
        if not metadata.sample_rate or not metadata.num_channels:
            raise AudioError(f"{blob.name}: no sample rate or channel count in the header")
        duration = metadata.duration_seconds_from_header
        if duration is not None:
            return metadata.sample_rate, metadata.num_channels, round(duration * metadata.sample_rate)
        return metadata.sample_rate, metadata.num_channels, int(_torchcodec_samples(decoder, blob.name).shape[1])


def decode_audio(source: str | os.PathLike[str] | AudioEntry) -> tuple[torch.Tensor, int]:
    """Decode an utterance as it is stored: ``(samples, sample_rate)``, float32 samples of shape
    ``(channels, frames)`` at the file's own rate (no downmix, no resampling; see :func:`load_audio` for that).

    Raises:
        AudioError: naming the file (and the archive for a tar member): missing, empty, corrupt, truncated or
            undecodable audio, or no samples.
    """
    blob = _blob(source)
    decoded = _decode_wav(source) if blob.suffix == ".wav" else None
    samples, rate = decoded if decoded is not None else _decode_torchcodec(source)
    if samples.numel() == 0:
        raise AudioError(f"{blob.name}: no samples after decoding")
    return samples.to(torch.float32), rate


def load_audio(
    source: str | os.PathLike[str] | AudioEntry, *, resample: bool = False, normalize: bool = False
) -> torch.Tensor:
    """Decode an utterance to a float32 1-D tensor at 16 kHz.

    Args:
        source: a path, or an :class:`~spidr.data.manifests.AudioEntry` (a tar member is read from its
            archive by ``byte_offset``/``byte_size`` and decoded from memory).
        resample: when the audio is not mono 16 kHz, average the channels to mono and resample to 16 kHz
            (logged at INFO level). Without it, such audio is an error.
        normalize: standardise the waveform over the whole utterance (zero mean, unit variance, eps 1e-5),
            exactly ``torch.nn.functional.layer_norm(w, w.shape, eps=1e-5)``.

    Integer PCM is scaled as TorchCodec/FFmpeg do (int16 divided by 32768, so values lie in [-1, 1)).

    Raises:
        AudioError: naming the file (and the archive for a tar member) and the reason: missing or empty file,
            corrupt, truncated or undecodable audio, no samples, not mono 16 kHz (without ``resample``), a sample
            rate below :data:`MIN_RESAMPLED_RATE` (with ``resample``), or NaN/infinite samples.
    """
    blob = _blob(source)
    decoded = _decode_wav(source) if blob.suffix == ".wav" else None
    if decoded is None:  # with resample, TorchCodec resamples while decoding (a no-op at 16 kHz)
        decoded = _decode_torchcodec(source, sample_rate=SAMPLE_RATE if resample else None)
        resampled = resample
    else:
        resampled = False
    samples, sample_rate = decoded
    num_channels = samples.shape[0]
    if sample_rate != SAMPLE_RATE or num_channels != 1:
        if not resample:
            raise AudioError(
                f"{blob.name}: expected mono {SAMPLE_RATE} Hz audio, got {num_channels} channel(s) at "
                f"{sample_rate} Hz (pass resample=True to convert)"
            )
        if sample_rate != SAMPLE_RATE and not resampled:  # a WAV read by the fast path
            samples, _ = _decode_torchcodec(source, sample_rate=SAMPLE_RATE)
        logger.info(
            "%s: converted %d channel(s) at %d Hz to mono %d Hz", blob.name, num_channels, sample_rate, SAMPLE_RATE
        )
    waveform = samples.mean(dim=0) if samples.shape[0] > 1 else samples[0]
    waveform = waveform.to(torch.float32).contiguous()
    if waveform.numel() == 0:
        raise AudioError(f"{blob.name}: no samples after decoding")
    if not bool(torch.isfinite(waveform).all()):
        bad = int((~torch.isfinite(waveform)).sum())
        raise AudioError(f"{blob.name}: {bad} NaN or infinite sample(s)")
    if normalize:
        waveform = torch.nn.functional.layer_norm(waveform, waveform.shape, eps=1e-5)
    return waveform
