"""Training checkpoints: atomic saves, the newest one loaded on restart, ``keep_latest`` honoured."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from spidr.models.pretrained import CheckpointError, load_checkpoint_file

logger = logging.getLogger(__name__)

_STEP = re.compile(r"step_(\d+)\.pt")
_TEMPORARY = re.compile(r"\.(step_\d+|final)\.pt\..+\.tmp")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


class _RecordingWriter(io.RawIOBase):
    """Passes writes to ``file`` and keeps the first OSError: torch.save reports a failed write (a full disk)
    as a RuntimeError about stream positions, without the system's reason."""

    def __init__(self, file: io.BufferedWriter) -> None:
        super().__init__()
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save to a temporary file in the same directory, fsync it, then rename.

    A crash (even SIGKILL) at any point leaves either the old file or the new one, never a partial file
    under ``path``; at worst a hidden ``.NAME.*.tmp`` file remains, which :func:`remove_temporaries` deletes.

    Raises:
        CheckpointSaveError: the write failed, e.g. ``[Errno 28] No space left on device``; the message names
            ``path``. The temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as error:
                if writer.error is None:
                    raise
                raise writer.error from error
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointSaveError(
                f"could not save checkpoint {path}: {error}; the previous checkpoints are intact"
            ) from error
        raise


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted :func:`save_atomic` calls in ``folder``; return their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if _TEMPORARY.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first: ``step_N.pt`` by N, then ``final.pt``."""
    folder = Path(folder)
    steps = sorted(
        (p for p in folder.glob("step_*.pt") if _STEP.fullmatch(p.name)), key=lambda p: int(p.stem.split("_")[1])
    )
    final = folder / "final.pt"
    return [*steps, final] if final.is_file() else steps


def newest_loadable(folder: str | Path) -> tuple[Path, Any] | None:
    """The newest checkpoint of ``folder`` and its contents (loaded with ``weights_only=True``), or None.

    Saves are atomic, so the newest file is complete unless something else damaged or replaced it; such a file
    is not skipped silently (training from an older state, or from scratch, would discard work).

    Raises:
        CheckpointError: the newest checkpoint is unreadable (truncated, corrupt) or holds objects that cannot
            be loaded safely; the message names it and the checkpoint a restart would fall back to once it is
            moved away.
    """
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return None
    path = checkpoints[-1]
    try:
        return path, load_checkpoint_file(path)
    except CheckpointError as error:
        previous = checkpoints[-2] if len(checkpoints) > 1 else None
        fallback = f"resume from {previous.name}" if previous else "start from scratch"
        raise CheckpointError(f"cannot resume: {error}. Move {path.name} out of {path.parent} to {fallback}") from None


def prune(folder: str | Path, keep_latest: int, *, keep: str | Path | None = None) -> None:
    """Delete all but the ``keep_latest`` newest ``step_N.pt`` files (0 or less keeps everything, as in the
    reference release); ``keep`` (the checkpoint just written) is never deleted."""
    if keep_latest <= 0:
        return
    kept = Path(keep).resolve() if keep is not None else None
    steps = [p for p in list_checkpoints(folder) if p.name != "final.pt"]
    for path in steps[: max(0, len(steps) - keep_latest)]:
        if path.resolve() != kept:
            path.unlink(missing_ok=True)
