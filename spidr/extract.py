"""Batched feature and unit extraction: ``python -m spidr.extract INPUT OUTPUT --model NAME_OR_PATH``.

Files are sorted by length and batched by total duration with attention masks; each output equals the
per-file ``model.get_intermediate_outputs`` (the model is padding-invariant). Files longer than
``chunk_seconds`` are cut into chunks that carry ``context_seconds`` of audio on each side; only each chunk's
centre is kept. Outputs are written atomically, one ``.pt`` per audio file mirroring INPUT's relative
paths, so an interrupted run resumes where it stopped.

Output file format (``torch.load(path, weights_only=True)``)::

    {"format": "spidr.extract/1", "source": "alice/utt00.wav", "model": "spidr_base", "frame_rate": 50,
     "layers": [6],                 # 1-based layer numbers
     "frames": T,                   # 20 ms frames
     "features": {6: (T, D)},       # without --units: float32 (or bfloat16 with --dtype bfloat16)
     "units": {6: (T,) int16},      # with --units
     "num_units": {6: K}}           # with --units
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import itertools
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spidr.models.components import num_frames, receptive_field

logger = logging.getLogger("spidr.extract")

SAMPLE_RATE = 16_000
FORMAT = "spidr.extract/1"
INDEX_NAME = "index.jsonl"
ERRORS_NAME = "errors.jsonl"
SETTINGS_NAME = "extract.json"


class ExtractionError(RuntimeError):
    """The run cannot go on (bad arguments, an unusable OUTPUT, a full disk); the message says why."""


# --------------------------------------------------------------------------- inputs
@dataclass
class Item:
    """One audio file to extract: where it is read from and its path relative to INPUT."""

    relative: str  # mirrored under OUTPUT, with ".pt" instead of the audio suffix
    source: Any  # a path, or an AudioEntry (manifest rows, tar members included)
    num_samples: int | None = None  # from the header or the manifest, at the file's own rate
    display: str = ""  # what errors name

    @property
    def output(self) -> str:
        return str(Path(self.relative).with_suffix(".pt"))


def _tar_member_path(entry: Any) -> str:
    return f"{entry.archive}/{entry.path}"


def list_inputs(source: str | os.PathLike[str], ext: str = ".wav") -> list[Item]:
    """The audio files of INPUT: a directory (recursive, files ending in ``ext``, case-insensitive), a
    manifest (``.csv``, ``.jsonl``, ``.tsv``: the training manifests) or one audio file.

    Relative paths are taken from the directory, or from the deepest folder common to a manifest's files
    (a tar member counts as ``archive_path/member``), so two files with the same name in different folders
    get different outputs.

    Raises:
        FileNotFoundError: INPUT does not exist.
        spidr.data.manifests.ManifestError: an unreadable manifest (named, with the line).
        ExtractionError: nothing to extract.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"INPUT {path}: no such file or directory")
    ext = ext if ext.startswith(".") else f".{ext}"
    if path.is_dir():
        root = path.resolve()
        found = []
        for folder, _, names in os.walk(root):
            found += [Path(folder) / name for name in names if name.lower().endswith(ext.lower())]
        items = [
            Item(str(p.relative_to(root)), str(p), None, str(p))
            for p in sorted(found)
            if p.is_file() or p.is_symlink()
        ]
        if not items:
            raise ExtractionError(f"INPUT {path}: no '{ext}' files found (use --ext to pick another extension)")
        return items
    if path.suffix.lower() in (".csv", ".jsonl", ".tsv"):
        from spidr.data.manifests import read_entries

        entries = read_entries(path)
        if not entries:
            raise ExtractionError(f"INPUT {path}: the manifest lists no files")
        full = [_tar_member_path(e) if e.archive else os.path.abspath(e.path) for e in entries]
        root = os.path.commonpath([os.path.dirname(p) for p in full]) if len(full) > 1 else os.path.dirname(full[0])
        items, seen = [], set()
        for entry, name in zip(entries, full, strict=True):
            if name in seen:
                continue
            seen.add(name)
            items.append(Item(os.path.relpath(name, root), entry, entry.num_samples, name))
        return items
    return [Item(path.name, str(path), None, str(path))]


# --------------------------------------------------------------------------- options
def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"all"``, ``"6"``, ``"1,6"`` or ranges ``"1-4,8"`` to sorted 1-based layer numbers.

    Raises:
        ExtractionError: a malformed spec or a layer outside [1, num_layers] (the valid range is named).
    """
    if spec.strip().lower() == "all":
        return list(range(1, num_layers + 1))
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                chosen = range(low, high + 1)
            else:
                chosen = range(int(part), int(part) + 1)
        except ValueError:
            raise ExtractionError(
                f"--layers {spec!r}: expected 'all' or layer numbers such as '6', '1,6' or '1-4'"
            ) from None
        for layer in chosen:
            if not 1 <= layer <= num_layers:
                raise ExtractionError(
                    f"--layers {spec!r}: layer {layer} does not exist; this model has layers 1 to {num_layers} "
                    "(numbered from 1, the first transformer layer)"
                )
            layers.add(layer)
    if not layers:
        raise ExtractionError(f"--layers {spec!r}: no layer given")
    return sorted(layers)


@dataclass(frozen=True)
class Settings:
    """What decides the content of the outputs; a re-run into the same OUTPUT must use the same."""

    model: str
    layers: tuple[int, ...]
    units: str | None
    dtype: str
    chunk_seconds: float
    context_seconds: float
    resample: bool

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data


@dataclass
class Summary:
    """What a run did: counts, audio duration and wall time, and each failed file with its reason."""

    extracted: int = 0
    skipped: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- the model side
class Extractor:
    """Runs a model on batches of standardised waveforms and returns the chosen layers' features or units.

    Args:
        model: a SpidR or DinoSR model (put in eval mode here).
        layers: 1-based layer numbers.
        units: None (features), ``"codebook"`` (the student heads' argmax; only layers that have a head), or
            a :class:`spidr.kmeans.KMeans` (its centroids applied to the one chosen layer).
        device: where the model runs.
        dtype: ``torch.float32`` or ``torch.bfloat16`` (autocast; features are stored in that dtype).

    Raises:
        ExtractionError: layers that have no codebook head, or a k-means model that does not fit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[int],
        *,
        units: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.layers = list(layers)
        self.units = units
        self.dtype = dtype
        cfg = model.cfg
        self.num_layers = cfg.encoder_num_layers
        self.conv_layers = cfg.extractor_conv_layer_config
        self.min_samples = receptive_field(self.conv_layers)
        self.hop = math.prod(stride for _, _, stride in self.conv_layers)
        # A group-norm extractor normalises over the whole utterance: padding and chunking would change it.
        self.local_extractor = cfg.extractor_mode == "layer_norm"
        first_head = self.num_layers - cfg.num_codebooks + 1
        if units == "codebook":
            bad = [layer for layer in self.layers if layer < first_head]
            if bad:
                raise ExtractionError(
                    f"--units codebook: layer(s) {bad} have no codebook head; this model's heads read layers "
                    f"{first_head} to {self.num_layers}"
                )
        elif units is not None:
            if len(self.layers) != 1:
                raise ExtractionError(f"k-means units are for one layer, got layers {self.layers}")
            dim = units.centroids.shape[1]
            if dim != cfg.encoder_embed_dim:
                raise ExtractionError(
                    f"the k-means centroids have dimension {dim}, the model's features {cfg.encoder_embed_dim}"
                )
            self.centroids = units.centroids.to(self.device, torch.float32)

    @property
    def num_units(self) -> int | None:
        if self.units is None:
            return None
        if self.units == "codebook":
            return self.model.cfg.codebook_size
        return int(self.units.centroids.shape[0])

    def frames(self, num_samples: int) -> int:
        return num_frames(num_samples, self.conv_layers)

    @property
    def packed(self) -> bool:
        """Whether batches run packed: each waveform's conv features alone, then the transformer on all of
        them end to end (``segments``), so no padded frame is ever computed. On the CPU with a layer-norm
        extractor (its features do not depend on the utterance as a whole), except for codebook units (their
        heads read the padded batch). Elsewhere batches are padded and masked."""
        return self.device.type == "cpu" and self.local_extractor and self.units != "codebook"

    @torch.inference_mode()
    def __call__(self, waveforms: Sequence[Tensor]) -> list[dict[int, Tensor]]:
        """Per waveform (1-D, standardised, at least ``min_samples`` long): layer -> (frames, D) features, or
        layer -> (frames,) int64 units. Waveforms of different lengths are padded and masked, or packed
        (:attr:`packed`)."""
        lengths = [int(w.shape[0]) for w in waveforms]
        frames = [self.frames(n) for n in lengths]
        use_autocast = self.dtype != torch.float32
        extractor = self.model.feature_extractor
        previous, extractor.gemm_on_cpu = extractor.gemm_on_cpu, True
        try:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_autocast):
                if self.packed:
                    return self._run_packed(waveforms, frames)
                return self._run_padded(waveforms, lengths, frames)
        finally:
            extractor.gemm_on_cpu = previous

    def _run_packed(self, waveforms: Sequence[Tensor], frames: list[int]) -> list[dict[int, Tensor]]:
        model = self.model
        rows = []
        for wav in waveforms:
            wav = wav.to(self.device).unsqueeze(0)
            model._check_inputs(wav, None)
            rows.append(model.feature_extractor(wav))
        # The projection is per frame: one GEMM over every file's conv features.
        x = model.feature_projection(rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))
        outputs = model.student.get_intermediate_outputs(x, None, max(self.layers), segments=frames)
        per_layer = {layer: self._finish(outputs[layer - 1][0]) for layer in self.layers}
        return [
            {layer: values[start:stop] for layer, values in per_layer.items()}
            for start, stop in itertools.pairwise(itertools.accumulate(frames, initial=0))
        ]

    def _run_padded(
        self, waveforms: Sequence[Tensor], lengths: list[int], frames: list[int]
    ) -> list[dict[int, Tensor]]:
        longest = max(lengths)
        batch = torch.zeros(len(waveforms), longest)
        for row, wav in enumerate(waveforms):
            batch[row, : wav.shape[0]] = wav
        batch = batch.to(self.device, non_blocking=True)
        mask = None
        if any(n != longest for n in lengths):
            total = self.frames(longest)
            mask = (torch.arange(total) < torch.tensor(frames).unsqueeze(1)).view(len(lengths), 1, 1, total)
            mask = mask.to(self.device)
        model = self.model
        model._check_inputs(batch, mask)
        x = self._padded_features(batch, lengths, frames)
        if self.units == "codebook":
            units = model.units_from_features(x, mask)
            per_layer = {layer: units[layer - 1] for layer in self.layers}
        else:
            outputs = model.student.get_intermediate_outputs(x, mask, max(self.layers))
            per_layer = {layer: self._finish(outputs[layer - 1]) for layer in self.layers}
        return [
            {layer: values[row, :count] for layer, values in per_layer.items()} for row, count in enumerate(frames)
        ]

    def _padded_features(self, batch: Tensor, lengths: list[int], frames: list[int]) -> Tensor:
        """The projected conv features (batch, frames, dim). The conv extractor is local (layer-norm mode), so
        on the CPU each row runs alone on its own samples: the batched convolution's (batch, 512, samples / 5)
        activations fall out of cache and run several times slower; on a GPU the padded batch runs at once.
        On the CPU the convolutions run as GEMMs over their windows (``FeatureExtractor.gemm_on_cpu``), about
        twice as fast as the convolution kernels, equal up to float rounding (1e-5)."""
        model = self.model
        if self.device.type != "cpu" or len(lengths) == 1 or not self.local_extractor:
            return model._features(batch)
        rows = [model._features(batch[row : row + 1, :n]) for row, n in enumerate(lengths)]
        out = rows[0].new_zeros(len(rows), max(frames), rows[0].shape[-1])
        for row, values in enumerate(rows):
            out[row, : values.shape[1]] = values[0]
        return out

    def _finish(self, x: Tensor) -> Tensor:
        """One layer's output (..., frames, D): the stored features (in ``dtype``) or the k-means units."""
        if self.units is None:
            return x.to(self.dtype)
        from spidr import ops

        x = x.float()
        flat = x.reshape(1, -1, x.shape[-1])
        ones = torch.ones(1, self.centroids.shape[0], device=self.device)
        labels = ops.assign_codes(flat, self.centroids.unsqueeze(0), ones)
        return labels.view(x.shape[:-1])


# --------------------------------------------------------------------------- planning
@dataclass
class Piece:
    """A span of one file run as one batch row: samples [start, stop) of the standardised waveform, of
    whose frames [keep_start, keep_stop) (relative to the span) are kept at file frame ``first_frame``."""

    item: int
    start: int
    stop: int
    keep_start: int
    keep_stop: int
    first_frame: int
    last: bool  # the file is complete once this piece is done (pieces of one file run in order)


def plan_pieces(
    num_samples: int, hop: int, min_samples: int, total_frames: int, chunk_frames: int, context_frames: int
) -> list[tuple[int, int, int, int, int]]:
    """Cut a file of ``total_frames`` frames into (start, stop, keep_start, keep_stop, first_frame) spans.

    Frame ``t`` of the file covers samples ``[t * hop, t * hop + min_samples)``; a span starting at sample
    ``s * hop`` gives frames ``s, s + 1, ...`` exactly, so chunk boundaries only change what the transformer
    sees. Each chunk keeps ``chunk_frames`` frames and sees ``context_frames`` more on each side (fewer at the
    file's ends). A file of at most ``chunk_frames + context_frames`` frames is one span.
    """
    if chunk_frames <= 0 or total_frames <= chunk_frames + context_frames:
        return [(0, num_samples, 0, total_frames, 0)]
    spans = []
    for core in range(0, total_frames, chunk_frames):
        core_stop = min(core + chunk_frames, total_frames)
        first = max(0, core - context_frames)
        last = min(total_frames, core_stop + context_frames)  # exclusive
        start = first * hop
        stop = num_samples if last == total_frames else (last - 1) * hop + min_samples
        spans.append((start, stop, core - first, core_stop - first, core))
    return spans


def make_batches(lengths: list[int], batch_samples: int) -> list[list[int]]:
    """Group indices (already sorted by length, longest first) so that rows x longest <= batch_samples
    (a longer single row is its own batch)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in range(len(lengths)):
        n = lengths[index]
        if current and max(longest, n) * (len(current) + 1) > batch_samples:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------- writing
def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, then rename: a reader (or a re-run) never sees a
    partial file. A full disk raises ExtractionError naming the path; the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = None
    try:
        with open(tmp, "wb") as handle:
            writer = _Writer(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError: the OSError under it says why.
        cause = writer.error if writer is not None and writer.error is not None else error
        if not isinstance(cause, OSError):
            raise
        raise _write_error(path, cause) from error


class _Writer(io.RawIOBase):
    """A file handle for torch.save that keeps the OSError of a failed write (torch wraps it)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        if not self.handle.closed:
            self.handle.flush()


def _write_error(path: Path, error: OSError) -> ExtractionError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExtractionError(
            f"no space left on the output device while writing {path}: free some space and run the same "
            "command again (finished files are kept and skipped)"
        )
    return ExtractionError(f"cannot write {path}: {error.strerror or error}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, error) from error


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the file's output decides, not this line
            continue
    return rows


# --------------------------------------------------------------------------- the run
def _model_name(model: str) -> str:
    return model if not model.endswith((".pt", ".ckpt")) else str(Path(model).resolve())


def load_model(model: str, model_type: str | None = None) -> torch.nn.Module:
    """A pretrained name (see ``spidr.models.pretrained.PRETRAINED``) or a local checkpoint with ``config.json``
    beside it (``model_type`` where the config does not say; default ``spidr``)."""
    from spidr.models.pretrained import PRETRAINED, build_model, load_pretrained

    if model in PRETRAINED:
        return load_pretrained(model)
    path = Path(model)
    if not path.is_file():
        raise ExtractionError(
            f"--model {model!r} is neither a pretrained name ({', '.join(PRETRAINED)}) nor an existing file"
        )
    has_type = False
    config = path.parent / "config.json"
    if config.is_file():
        try:
            has_type = "model_type" in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            has_type = False
    return build_model(checkpoint=path, model_type=model_type or (None if has_type else "spidr"))


def _check_settings(output: Path, settings: Settings, overwrite: bool) -> None:
    path = output / SETTINGS_NAME
    if path.is_file() and not overwrite:
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != settings.to_dict():
            changed = (
                ", ".join(
                    f"{key}: {previous.get(key)!r} -> {value!r}"
                    for key, value in settings.to_dict().items()
                    if previous.get(key) != value
                )
                if isinstance(previous, dict)
                else "unreadable extract.json"
            )
            raise ExtractionError(
                f"OUTPUT {output} was extracted with other settings ({changed}): use --overwrite to redo it, "
                "or another OUTPUT"
            )
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(settings.to_dict(), indent=2) + "\n")


def _progress(total: float, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=round(total, 1),
        unit="s",
        desc="extracting",
        disable=not enabled or None,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}, {rate_fmt}]",
    )


def extract(
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str,
    model_type: str | None = None,
    layers: str = "all",
    units: str | None = None,
    device: str | None = None,
    batch_seconds: float = 120.0,
    dtype: str = "float32",
    ext: str = ".wav",
    overwrite: bool = False,
    resample: bool = False,
    chunk_seconds: float = 60.0,
    context_seconds: float = 5.0,
    progress: bool = True,
    loaded_model: torch.nn.Module | None = None,
) -> Summary:
    """Extract features (or units) of every audio file of ``inputs`` into ``output``; see the module docstring
    and ``python -m spidr.extract --help``. ``loaded_model`` skips loading ``model`` (then only its name).

    Returns:
        A :class:`Summary`; bad files are in ``summary.errors`` (and ``OUTPUT/errors.jsonl``), not raised.

    Raises:
        ExtractionError: bad options, OUTPUT extracted with other settings, or a write that failed (a full disk).
        FileNotFoundError, spidr.data.manifests.ManifestError: an unusable INPUT.
    """
    started = time.perf_counter()
    from spidr.data.audio import AudioError, audio_info, load_audio

    if dtype not in ("float32", "bfloat16"):
        raise ExtractionError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if batch_seconds <= 0 or chunk_seconds < 0 or context_seconds < 0:
        raise ExtractionError("--batch-seconds must be > 0, --chunk-seconds and --context-seconds >= 0")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractionError(f"--device {device}: no CUDA device is available here")
    output = Path(output)
    items = list_inputs(inputs, ext)

    net = loaded_model if loaded_model is not None else load_model(model, model_type)
    cfg = net.cfg
    kmeans = None
    if units is not None and units != "codebook":
        if not units.startswith("kmeans:"):
            raise ExtractionError(f"--units must be 'codebook' or 'kmeans:PATH', got {units!r}")
        from spidr.kmeans import load_kmeans

        kmeans = load_kmeans(units.split(":", 1)[1])
    if units == "codebook" and layers == "all":
        chosen = list(range(cfg.encoder_num_layers - cfg.num_codebooks + 1, cfg.encoder_num_layers + 1))
    elif kmeans is not None and layers == "all" and kmeans.layer is not None:
        chosen = [int(kmeans.layer)]
    else:
        chosen = parse_layers(layers, cfg.encoder_num_layers)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    extractor = Extractor(net, chosen, units=kmeans if kmeans is not None else units, device=device, dtype=torch_dtype)
    settings = Settings(
        _model_name(model),
        tuple(chosen),
        units if units in (None, "codebook") else f"kmeans:{Path(units.split(':', 1)[1]).resolve()}",
        dtype,
        chunk_seconds,
        context_seconds,
        resample,
    )
    _check_settings(output, settings, overwrite)
    for stale in output.rglob(".*.tmp"):  # left by a killed run (one run per OUTPUT at a time)
        stale.unlink(missing_ok=True)

    summary = Summary()
    index_path, errors_path = output / INDEX_NAME, output / ERRORS_NAME
    previous = {row.get("source"): row for row in _read_jsonl(index_path) if row.get("status") == "ok"}
    index: dict[str, dict[str, Any]] = {}

    def fail(item: Item, reason: str) -> None:
        summary.errors.append({"source": item.relative, "path": item.display, "reason": reason})
        index[item.relative] = {"source": item.relative, "status": "error", "reason": reason}

    # Which files are left, and their lengths (headers only; the audio is decoded batch by batch).
    todo: list[int] = []
    lengths: dict[int, int] = {}
    for i, item in enumerate(items):
        target = output / item.output
        if target.is_file() and not overwrite:
            summary.skipped += 1
            row = previous.get(item.relative) or _index_row_from_file(item, target)
            if row is not None:
                index[item.relative] = row
            continue
        try:
            sample_rate, channels, count = audio_info(item.source)
        except AudioError as error:
            fail(item, str(error))
            continue
        if (sample_rate != SAMPLE_RATE or channels != 1) and not resample:
            fail(
                item,
                f"expected mono {SAMPLE_RATE} Hz audio, got {channels} channel(s) at {sample_rate} Hz "
                "(use --resample to convert)",
            )
            continue
        if sample_rate != SAMPLE_RATE:
            count = round(count * SAMPLE_RATE / sample_rate)
        if count < extractor.min_samples:
            fail(item, f"too short: {count} samples, the model needs at least {extractor.min_samples} for one frame")
            continue
        lengths[i] = count
        todo.append(i)

    hop, min_samples = extractor.hop, extractor.min_samples
    frame_rate = SAMPLE_RATE / hop
    chunk_frames = round(chunk_seconds * frame_rate) if extractor.local_extractor else 0
    context_frames = round(context_seconds * frame_rate)
    if not extractor.local_extractor:
        logger.warning("this model's feature extractor uses group norm over time: files run one by one, unchunked")

    # Pieces: whole files, or chunks of long ones; planned from header lengths, re-planned if decoding differs.
    pieces: list[Piece] = []
    for i in todo:
        n = lengths[i]
        spans = plan_pieces(n, hop, min_samples, extractor.frames(n), chunk_frames, context_frames)
        for j, (start, stop, keep_start, keep_stop, first) in enumerate(spans):
            pieces.append(Piece(i, start, stop, keep_start, keep_stop, first, j == len(spans) - 1))
    # Longest first; a file's chunks stay in order (the last chunk may be shorter: sort by file, then span).
    file_longest = {i: max(p.stop - p.start for p in pieces if p.item == i) for i in todo} if pieces else {}
    pieces.sort(key=lambda p: (-file_longest[p.item], p.item, p.start))
    batch_samples = int(batch_seconds * SAMPLE_RATE) if extractor.local_extractor else 1
    batches = [[pieces[k] for k in b] for b in make_batches([p.stop - p.start for p in pieces], batch_samples)]

    waveforms: dict[int, Tensor] = {}
    parts: dict[int, list[tuple[int, dict[int, Tensor]]]] = {}
    failed: set[int] = set()
    done: set[int] = set()
    planned = dict(lengths)

    def decode(i: int) -> Tensor | str:
        try:
            return load_audio(items[i].source, resample=resample, normalize=True)
        except AudioError as error:
            return str(error)

    def load_batch(batch: list[Piece]) -> dict[int, Tensor | str]:
        needed = {p.item for p in batch if p.item not in waveforms}
        return {i: decode(i) for i in needed}

    bar = _progress(sum(lengths[i] for i in todo) / SAMPLE_RATE, progress)
    num_units = extractor.num_units
    index_handle = None
    try:
        index_handle = open(index_path, "a")  # appended per file; rewritten whole at the end
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming: Future | None = pool.submit(load_batch, batches[0]) if batches else None
            for b, batch in enumerate(batches):
                loaded = upcoming.result() if upcoming is not None else {}
                upcoming = pool.submit(load_batch, batches[b + 1]) if b + 1 < len(batches) else None
                for i, wav in loaded.items():
                    if isinstance(wav, str):
                        failed.add(i)
                        fail(items[i], wav)
                    elif wav.shape[0] != lengths[i]:
                        # The header's length was off: the file runs whole (see _replan_if_needed).
                        if wav.shape[0] < min_samples:
                            failed.add(i)
                            fail(
                                items[i],
                                f"too short: {wav.shape[0]} samples after decoding, the model "
                                f"needs at least {min_samples} for one frame",
                            )
                        else:
                            waveforms[i] = wav
                            lengths[i] = wav.shape[0]
                    else:
                        waveforms[i] = wav
                rows = [p for p in batch if p.item not in failed and p.item not in done]
                rows = _replan_if_needed(rows, lengths, planned, extractor)
                if not rows:
                    continue
                results = extractor([waveforms[p.item][p.start : p.stop] for p in rows])
                for piece, result in zip(rows, results, strict=True):
                    kept = {layer: v[piece.keep_start : piece.keep_stop] for layer, v in result.items()}
                    parts.setdefault(piece.item, []).append((piece.first_frame, kept))
                    if piece.last:
                        row = _finish(
                            items[piece.item],
                            parts.pop(piece.item),
                            output,
                            settings,
                            num_units,
                            extractor,
                            lengths[piece.item],
                        )
                        waveforms.pop(piece.item, None)
                        done.add(piece.item)
                        index[items[piece.item].relative] = row
                        index_handle.write(json.dumps(row) + "\n")
                        index_handle.flush()
                        summary.extracted += 1
                        summary.audio_seconds += lengths[piece.item] / SAMPLE_RATE
                bar.update(round(sum(p.keep_stop - p.keep_start for p in rows) / frame_rate, 1))
    except BaseException:
        _close_run(bar, index_handle, items, index, summary, index_path, errors_path, failing=True)
        raise
    _close_run(bar, index_handle, items, index, summary, index_path, errors_path, failing=False)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _close_run(
    bar: Any,
    index_handle: Any,
    items: list[Item],
    index: dict[str, dict[str, Any]],
    summary: Summary,
    index_path: Path,
    errors_path: Path,
    *,
    failing: bool,
) -> None:
    """Rewrite index.jsonl (every file of INPUT seen so far, in INPUT order) and errors.jsonl (this run's
    failures). When the run is already failing (a full disk, say), a failure here is logged, not raised, so
    that the first error is the one reported."""
    bar.close()
    if index_handle is not None:
        index_handle.close()
    order = [item.relative for item in items if item.relative in index]
    try:
        write_text_atomic(index_path, "".join(json.dumps(index[name]) + "\n" for name in order))
        if summary.errors:
            write_text_atomic(errors_path, "".join(json.dumps(e) + "\n" for e in summary.errors))
        elif errors_path.exists():
            errors_path.unlink()
    except (OSError, ExtractionError) as error:
        if not failing:
            raise
        logger.warning("could not rewrite %s: %s", index_path, error)


def _replan_if_needed(
    rows: list[Piece], lengths: dict[int, int], planned: dict[int, int], extractor: Extractor
) -> list[Piece]:
    """Pieces planned from a header length that turned out wrong (some containers estimate it): the file runs
    as one whole piece in place of its first, and its other pieces are dropped."""
    out = []
    for piece in rows:
        n = lengths[piece.item]
        if n == planned[piece.item]:
            out.append(piece)
        elif piece.start == 0:
            out.append(Piece(piece.item, 0, n, 0, extractor.frames(n), 0, True))
    return out


def _finish(
    item: Item,
    parts: list[tuple[int, dict[int, Tensor]]],
    output: Path,
    settings: Settings,
    num_units: int | None,
    extractor: Extractor,
    num_samples: int,
) -> dict[str, Any]:
    parts.sort(key=lambda part: part[0])
    layers = list(parts[0][1])
    joined = {layer: torch.cat([p[1][layer] for p in parts]).cpu() for layer in layers}
    frames = int(next(iter(joined.values())).shape[0])
    expected = extractor.frames(num_samples)
    if frames != expected:  # a planning bug would be silent otherwise
        raise ExtractionError(f"{item.display}: assembled {frames} frames, expected {expected}")
    record: dict[str, Any] = {
        "format": FORMAT,
        "source": item.relative,
        "model": settings.model,
        "frame_rate": SAMPLE_RATE // extractor.hop,
        "layers": layers,
        "frames": frames,
    }
    if settings.units is None:
        record["features"] = {layer: v.contiguous() for layer, v in joined.items()}
    else:
        record["units"] = {layer: v.to(torch.int16).contiguous() for layer, v in joined.items()}
        record["num_units"] = dict.fromkeys(layers, num_units)
    save_atomic(record, output / item.output)
    return {
        "source": item.relative,
        "output": item.output,
        "frames": frames,
        "layers": layers,
        "seconds": round(num_samples / SAMPLE_RATE, 4),
        "status": "ok",
    }


def _index_row_from_file(item: Item, target: Path) -> dict[str, Any] | None:
    try:
        record = torch.load(target, weights_only=True, mmap=True)
        return {
            "source": item.relative,
            "output": item.output,
            "frames": int(record["frames"]),
            "layers": list(record["layers"]),
            "status": "ok",
        }
    except Exception:  # an unreadable old output: listed as done but without details
        return {"source": item.relative, "output": item.output, "status": "ok"}


def iter_outputs(output: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(relative source path, record) for every extracted file listed as ``ok`` in ``OUTPUT/index.jsonl``."""
    root = Path(output)
    for row in _read_jsonl(root / INDEX_NAME):
        if row.get("status") == "ok":
            yield row["source"], torch.load(root / row["output"], weights_only=True)


# --------------------------------------------------------------------------- CLI
_DESCRIPTION = """\
Extract features or discrete units of every audio file of INPUT with a SpidR or DinoSR model.

INPUT is a directory (searched recursively for --ext files), a training manifest (.csv, .jsonl or fairseq
.tsv) or one audio file. OUTPUT gets one .pt per audio file at the same relative path (alice/utt00.wav ->
OUTPUT/alice/utt00.pt), an index.jsonl listing every file's frames, layers and status, and errors.jsonl
listing the files that could not be extracted, with the reason. Audio must be mono 16 kHz (or pass
--resample).

Each .pt holds, for each chosen layer (numbered from 1, the first transformer layer), the layer's output
before the residual, as model.get_intermediate_outputs, after standardising the waveform: {"features":
{layer: (frames, dim)}} at 50 frames per second; with --units, {"units": {layer: (frames,) int16}}
instead. Load with torch.load(path, weights_only=True).

Files are sorted by length and run in batches of about --batch-seconds of audio with attention masks; the
result equals running each file alone. A file longer than --chunk-seconds + --context-seconds is cut into
chunks of --chunk-seconds, each run with --context-seconds of audio on both sides, of which only the centre
is kept. Frames stay aligned exactly (chunks start on a frame boundary), but attention is global, so a
chunk's features differ slightly from the whole file's: with 5 s of context, by about 1-2% (relative norm;
cosine similarity above 0.999 per frame) on our randomly initialised test models. More context, closer.

Outputs are written atomically: an interrupted run leaves no partial file, and running the same command
again skips the finished files and completes the rest. Bad files (unreadable, corrupt, empty, stereo,
another sample rate, NaN samples, shorter than one frame) are reported at the end and in errors.jsonl;
every good file is still extracted and the exit status is then 1.
"""

_EPILOG = """\
examples:
  python -m spidr.extract /data/LibriSpeech/dev-clean feats/ --model spidr_base --layers 6 --ext .flac
  python -m spidr.extract train.csv units/ --model spidr_base --units codebook
  python -m spidr.extract wavs/ units/ --model run/checkpoints/step_400000.pt --units kmeans:km256_l6.pt
  python -m spidr.extract one.wav out/ --model dinosr_base_reproduced --layers all --device cpu
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spidr.extract",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="directory of audio files, manifest, or one audio file")
    p.add_argument("output", metavar="OUTPUT", help="folder for the outputs (created)")
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_PATH",
        help="spidr_base, dinosr_base_reproduced, dinosr_base_original, or a local .pt checkpoint with "
        "config.json beside it (e.g. a training run's checkpoint)",
    )
    p.add_argument(
        "--model-type",
        choices=["spidr", "dinosr"],
        help="model type of a local checkpoint whose config.json does not say (default: spidr)",
    )
    p.add_argument(
        "--layers",
        default="all",
        help="layers to extract, from 1: 'all', '6', '1,6' or '1-4,8' (default: all; with --units codebook "
        "all the layers that have a head; with --units kmeans the k-means file's layer)",
    )
    p.add_argument(
        "--units",
        metavar="codebook|kmeans:PATH",
        help="write discrete units instead of features: 'codebook' = the student heads' argmax per layer; "
        "'kmeans:PATH' = nearest centroid of a model fitted by python -m spidr.kmeans",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--batch-seconds",
        type=float,
        default=120.0,
        help="audio per batch, padding included (default: %(default)s; raise it on a large GPU)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute (autocast) and storage dtype of features (default: %(default)s)",
    )
    p.add_argument("--ext", default=".wav", help="audio extension searched in a directory INPUT (default: .wav)")
    p.add_argument("--overwrite", action="store_true", help="re-extract files whose output already exists")
    p.add_argument("--resample", action="store_true", help="downmix and resample audio that is not mono 16 kHz")
    p.add_argument(
        "--chunk-seconds",
        type=float,
        default=60.0,
        help="cut longer files into chunks of this length (default: %(default)s; 0 = never)",
    )
    p.add_argument(
        "--context-seconds",
        type=float,
        default=5.0,
        help="audio on each side of a chunk that the model sees but whose frames are dropped (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when every file was extracted, 1 when some failed (listed) or the run could not go on."""
    args = _parser().parse_args(argv)
    logging.basicConfig(format="extract: %(levelname)s: %(message)s", level=logging.INFO)
    try:
        summary = extract(
            args.input,
            args.output,
            model=args.model,
            model_type=args.model_type,
            layers=args.layers,
            units=args.units,
            device=args.device,
            batch_seconds=args.batch_seconds,
            dtype=args.dtype,
            ext=args.ext,
            overwrite=args.overwrite,
            resample=args.resample,
            chunk_seconds=args.chunk_seconds,
            context_seconds=args.context_seconds,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("extract: interrupted; finished files are kept, run the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"extract: error: {error}", file=sys.stderr)
        return 1
    speed = summary.audio_seconds / summary.wall_seconds if summary.wall_seconds else 0.0
    print(
        f"extract: {summary.extracted} file(s) extracted ({summary.audio_seconds / 3600:.2f} h of audio, "
        f"{speed:.1f}x real time), {summary.skipped} already done, {len(summary.errors)} failed -> {args.output}",
        file=sys.stderr,
    )
    if summary.errors:
        print(
            f"extract: {len(summary.errors)} file(s) failed (also in {Path(args.output) / ERRORS_NAME}):",
            file=sys.stderr,
        )
        for error in summary.errors:
            print(f"  {error['path']}: {error['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
