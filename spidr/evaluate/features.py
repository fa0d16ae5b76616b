"""Read the per-file output of ``spidr.extract``: features and units of one layer, looked up by utterance name.

``spidr.extract`` writes one ``.pt`` file per audio file, mirroring the input tree, each holding a dict
(format ``"spidr.extract/1"``) with the 1-based ``layers`` it contains, the number of 20 ms ``frames``,
and ``features`` and/or ``units`` (with ``num_units``) keyed by layer. Evaluations identify an
utterance by the file stem (the name without directory and extension), as ZeroSpeech item files and
phone alignments do, or by its path relative to the output directory where stems repeat
(:func:`find_extract_files`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXTRACT_FORMAT", "ExtractFile", "find_extract_files", "load_extract_file", "relative_name"]

EXTRACT_FORMAT = "spidr.extract/1"
_EXTENSION = ".pt"


def find_extract_files(directory: str | Path) -> dict[str, Path]:
    """Map each utterance name to its ``.pt`` file, searching ``directory`` recursively.

    An utterance is named by its file stem (``utt00`` for ``alice/utt00.pt``), as ZeroSpeech item files and
    phone alignments name them; where several files share a stem (``spidr.extract`` mirrors its input's
    folders, so ``alice/utt00`` and ``bob/utt00`` may both exist), each of them is named by its path relative
    to ``directory`` without the extension (``alice/utt00``, ``bob/utt00``). Other files (``index.jsonl``,
    ``errors.jsonl``...) are ignored.

    Raises:
        NotADirectoryError: ``directory`` is not a directory.
        ValueError: no ``.pt`` file was found.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory of spidr.extract outputs")
    paths = [path for path in sorted(root.rglob(f"*{_EXTENSION}")) if path.is_file()]
    if not paths:
        raise ValueError(f"{root}: no {_EXTENSION} file found (expected the output directory of spidr.extract)")
    stems = Counter(_stem(path) for path in paths)
    return {_stem(path) if stems[_stem(path)] == 1 else relative_name(path, root): path for path in paths}


def relative_name(path: Path, root: str | Path) -> str:
    """``path`` relative to ``root``, without the ``.pt`` extension, with ``/`` separators (``alice/utt00``)."""
    return path.relative_to(root).as_posix().removesuffix(_EXTENSION)


def _stem(path: Path) -> str:
    return path.name.removesuffix(_EXTENSION)


@dataclass(frozen=True)
class ExtractFile:
    """One file written by ``spidr.extract``.

    Attributes:
        path: where it was read from.
        model: the model name recorded in the file ("" if absent).
        frame_rate: frames per second of ``features`` and ``units`` (50 for 20 ms frames).
        layers: the 1-based layer numbers the file holds.
        content: the raw dict, for the keys read by :meth:`layer_tensor`.
    """

    path: Path
    model: str
    frame_rate: int
    layers: tuple[int, ...]
    content: dict[str, Any]

    def choose_layer(self, layer: int | None) -> int:
        """The layer to read: ``layer`` if given, else the only one in the file.

        Raises:
            ValueError: ``layer`` is not in the file, or it is None and the file holds several layers
                (the message lists those available).
        """
        available = ", ".join(str(number) for number in self.layers)
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"{self.path}: holds layers {available}; choose one with --layer")
            return self.layers[0]
        if layer not in self.layers:
            raise ValueError(f"{self.path}: no layer {layer} (layers available: {available})")
        return layer

    def layer_tensor(self, key: str, layer: int) -> torch.Tensor:
        """The tensor stored under ``content[key][layer]`` (``key`` is ``"features"`` or ``"units"``).

        Returns:
            ``features``: (T, D) float32 (bfloat16 files are converted); ``units``: (T,) int64.

        Raises:
            ValueError: the file has no ``key`` for that layer, or the tensor has the wrong shape or dtype.
        """
        table = self.content.get(key)
        if not isinstance(table, dict) or layer not in table:
            raise ValueError(f"{self.path}: no {key} for layer {layer} (was it extracted with {key}?)")
        tensor = table[layer]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{self.path}: {key}[{layer}] is a {type(tensor).__name__}, not a tensor")
        if key == "features":
            if tensor.ndim != 2 or not tensor.is_floating_point():
                raise ValueError(
                    f"{self.path}: features[{layer}] must be a (frames, dim) float tensor, "
                    f"got shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
                )
            return tensor.float()
        if tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(
                f"{self.path}: {key}[{layer}] must be a (frames,) integer tensor, "
                f"got shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
            )
        return tensor.long()

    def num_units(self, layer: int) -> int | None:
        """The codebook size K recorded for ``layer``'s units, or None if the file does not say."""
        table = self.content.get("num_units")
        if isinstance(table, dict) and isinstance(table.get(layer), int):
            return table[layer]
        return None


def load_extract_file(path: str | Path) -> ExtractFile:
    """Load and check one ``.pt`` file written by ``spidr.extract``.

    Raises:
        ValueError: the file cannot be loaded safely (``weights_only=True``), or is not a dict in the
            ``spidr.extract/1`` format (missing or malformed ``layers`` or ``frame_rate``).
    """
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot be loaded as a spidr.extract file ({error})") from error
    if not isinstance(content, dict) or content.get("format") != EXTRACT_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: not a spidr.extract file (format {found!r}, expected {EXTRACT_FORMAT!r})")
    layers = content.get("layers")
    if not isinstance(layers, list | tuple) or not layers or not all(isinstance(n, int) for n in layers):
        raise ValueError(f"{path}: 'layers' must be a non-empty list of layer numbers, got {layers!r}")
    frame_rate = content.get("frame_rate")
    if not isinstance(frame_rate, int) or isinstance(frame_rate, bool) or frame_rate <= 0:
        raise ValueError(f"{path}: 'frame_rate' must be a positive integer, got {frame_rate!r}")
    model = content.get("model")
    return ExtractFile(
        path=path,
        model=model if isinstance(model, str) else "",
        frame_rate=frame_rate,
        layers=tuple(layers),
        content=content,
    )
