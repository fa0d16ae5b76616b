"""Data input for SpidR/DinoSR training and feature extraction.

Submodules:

* :mod:`spidr.data.manifests`: :class:`AudioEntry`, :func:`read_entries` (a list of entries, paths resolved),
  :func:`read_manifest` (a polars DataFrame, as the reference release reads it) and ``write_manifest`` for CSV,
  JSONL and fairseq TSV manifests, and :func:`scan_directory` / :func:`scan_tar` to index a dataset;
* :mod:`spidr.data.dataset`: the reference release's :func:`speech_dataset` and :func:`build_dataloader`;
* :mod:`spidr.data.audio`: :func:`load_audio` (mono 16 kHz float32 waveforms, from files or tar members) and
  :func:`audio_info` (header only);
* ``python -m spidr.data.write_manifest DATASET OUTPUT``: the command line that writes a manifest.

The names below are exported lazily, so that ``import spidr.data`` loads neither polars nor TorchCodec.
``write_manifest`` is not among them, since ``spidr.data.write_manifest`` is the command-line module: use
``spidr.data.manifests.write_manifest``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spidr.data.audio import AudioError, audio_info, load_audio
    from spidr.data.dataset import build_dataloader, speech_dataset
    from spidr.data.manifests import (
        ArchiveError,
        AudioEntry,
        ManifestError,
        read_entries,
        read_manifest,
        scan_directory,
        scan_tar,
    )
    from spidr.data.utils import num_samples

_EXPORTS = {
    "ArchiveError": "spidr.data.manifests",
    "AudioEntry": "spidr.data.manifests",
    "ManifestError": "spidr.data.manifests",
    "read_entries": "spidr.data.manifests",
    "read_manifest": "spidr.data.manifests",
    "build_dataloader": "spidr.data.dataset",
    "speech_dataset": "spidr.data.dataset",
    "num_samples": "spidr.data.utils",
    "scan_directory": "spidr.data.manifests",
    "scan_tar": "spidr.data.manifests",
    "AudioError": "spidr.data.audio",
    "audio_info": "spidr.data.audio",
    "load_audio": "spidr.data.audio",
}

__all__ = [
    "ArchiveError",
    "AudioEntry",
    "AudioError",
    "ManifestError",
    "audio_info",
    "build_dataloader",
    "load_audio",
    "num_samples",
    "read_entries",
    "read_manifest",
    "scan_directory",
    "scan_tar",
    "speech_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
