"""Training checkpoints: atomic saves, the newest complete one found on restart, ``keep_latest`` honoured."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from spidr.models.pretrained import load_checkpoint_file

logger = logging.getLogger(__name__)

_STEP = re.compile(r"step_(\d+)\.pt")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save to a temporary file in the same directory, fsync it, then rename.

    A crash at any point leaves either the old file or the new one, never a partial file.

    Raises:
        CheckpointSaveError: the write failed (the temporary file is removed; ``path`` is untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointSaveError(f"could not save checkpoint {path}: {error}") from error
        raise


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first: ``step_N.pt`` by N, then ``final.pt``."""
    folder = Path(folder)
    steps = sorted(
        (p for p in folder.glob("step_*.pt") if _STEP.fullmatch(p.name)), key=lambda p: int(p.stem.split("_")[1])
    )
    final = folder / "final.pt"
    return [*steps, final] if final.is_file() else steps


def newest_loadable(folder: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (a corrupt one is reported and skipped), or None."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint_file(path)
        except Exception as error:  # a damaged file must not stop a restart: fall back to the previous one
            logger.warning("Skipping unreadable checkpoint %s: %s", path, error)
    return None


def prune(folder: str | Path, keep_latest: int) -> None:
    """Delete all but the ``keep_latest`` newest ``step_N.pt`` files (-1 keeps everything)."""
    if keep_latest < 0:
        return
    steps = [p for p in list_checkpoints(folder) if p.name != "final.pt"]
    for path in steps[: max(0, len(steps) - keep_latest)]:
        path.unlink(missing_ok=True)
