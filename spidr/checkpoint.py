"""Training checkpoints: atomic saves, the newest one loaded on restart, ``keep_latest`` honoured.

The reference release's names are here too: :class:`Checkpointer`, :class:`Checkpoint`, :func:`find_checkpoints`,
:func:`remove_param_group` and :class:`~spidr.tools.MetricsQueue`.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import GradScaler, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from spidr.models.pretrained import CheckpointError, load_checkpoint_file, load_state_dict_checked
from spidr.optim import load_scheduler_state, remove_param_group
from spidr.tools.metrics_queue import MetricsQueue

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "MetricsQueue",
    "find_checkpoints",
    "list_checkpoints",
    "newest_loadable",
    "prune",
    "remove_param_group",
    "remove_temporaries",
    "save_atomic",
]

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


def prune(folder: str | Path, keep_latest: int, *, keep: str | Path | None = None, count_final: bool = False) -> None:
    """Delete all but the ``keep_latest`` newest ``step_N.pt`` files (0 or less keeps everything, as in the
    reference release); ``keep`` (the checkpoint just written) and ``final.pt`` are never deleted. With
    ``count_final`` (the release's ``Checkpointer``), ``final.pt`` is one of the ``keep_latest``."""
    if keep_latest <= 0:
        return
    kept = Path(keep).resolve() if keep is not None else None
    checkpoints = list_checkpoints(folder)
    finals = sum(p.name == "final.pt" for p in checkpoints) if count_final else 0
    steps = [p for p in checkpoints if p.name != "final.pt"]
    for path in steps[: max(0, len(steps) + finals - keep_latest)]:
        if path.resolve() != kept:
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# The reference release's checkpoint API (spidr 0.2.0's names and arguments), on the functions above.


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def find_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first: ``step_N.pt`` by N, then ``final.pt``."""
    return list_checkpoints(folder)


@dataclass
class Checkpoint:
    """What a :class:`Checkpointer` saves and restores."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: GradScaler
    epoch: torch.Tensor
    step: torch.Tensor


class Checkpointer:
    """Save and restore a training state in ``folder`` every ``interval`` steps (the reference release's class).

    A checkpoint holds ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` and ``step``, written
    atomically (:func:`save_atomic`); ``keep_latest`` > 0 keeps that many ``step_N.pt``. Validation results of
    separate jobs go to ``metrics.jsonl``, read in step order by :meth:`find_new_metrics`. Checkpoints of
    ``python -m spidr.train`` load too (their extra entries are ignored here).

    Args:
        folder: the run directory (created).
        interval: save every this many steps (0 or less: never, as ``disable``).
        keep_latest: how many ``step_N.pt`` to keep (0 or less: all).
        disable: neither save nor load.
        start: the first step whose validation results are expected.
    """

    def __init__(
        self, folder: Path, interval: int, keep_latest: int = -1, *, disable: bool = False, start: int = 0
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.interval, self.keep_latest = interval, keep_latest
        self.disable = disable or interval <= 0
        self._path: Path | None = None
        self._state: Checkpoint | None = None
        self._metrics_queue = MetricsQueue(self.metrics, max(interval, 1), start=start)

    def _require_state(self) -> Checkpoint:
        if self._state is None:
            raise RuntimeError("Checkpointer.init_state(model, optimizer, scheduler, scaler) must be called first")
        return self._state

    @property
    def step(self) -> torch.Tensor:
        """The step of the state (an int64 tensor of shape (1,))."""
        return self._require_state().step

    @property
    def epoch(self) -> torch.Tensor:
        """The epoch of the state (an int64 tensor of shape (1,))."""
        return self._require_state().epoch

    @property
    def last(self) -> Path | None:
        """The checkpoint saved or loaded last, else the newest one in the folder, else None."""
        if self._path is None:
            checkpoints = find_checkpoints(self.folder)
            self._path = checkpoints[-1] if checkpoints else None
        return self._path

    @property
    def metrics(self) -> Path:
        """The JSONL file of validation results."""
        return self.folder / "metrics.jsonl"

    def init_state(self, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, scaler: GradScaler) -> None:
        """Register the objects to save and restore, at step 0 and epoch 0."""
        zero = torch.zeros(1, dtype=torch.long)
        self._state = Checkpoint(model, optimizer, scheduler, scaler, epoch=zero.clone(), step=zero.clone())

    def _save_to_path(self, path: Path, step: int, epoch: int) -> bool:
        if self.disable:
            return False
        state = self._require_state()
        state.step.fill_(step)
        state.epoch.fill_(epoch)
        model = _unwrapped(state.model)
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(),
                "epoch": state.epoch,
                "step": state.step,
            },
            path,
        )
        self._path = path
        prune(self.folder, self.keep_latest, keep=path, count_final=True)
        return True

    def save(self, step: int, epoch: int, *, force: bool = False) -> bool:
        """Save ``step_<step>.pt`` when ``step`` is a multiple of the interval (or ``force``); True if saved."""
        if self.disable or not (force or step % self.interval == 0):
            return False
        return self._save_to_path(self.folder / f"step_{step}.pt", step, epoch)

    def save_final(self, step: int, epoch: int) -> bool:
        """Save ``final.pt``; True if saved."""
        return self._save_to_path(self.folder / "final.pt", step, epoch)

    def _load_from_path(self, path: Path) -> bool:
        if self.disable or not path.is_file():
            return False
        state = self._require_state()
        if path.name == "final.pt":
            logger.warning("Loading the final checkpoint %s", path)
        ckpt = load_checkpoint_file(path)
        missing = [key for key in ("model", "optimizer", "scheduler", "step", "epoch") if key not in ckpt]
        if missing:
            raise CheckpointError(f"{path} is not a training checkpoint: no {', '.join(missing)}")
        model = _unwrapped(state.model)
        weights = dict(ckpt["model"])
        consume_prefix_in_state_dict_if_present(weights, "module.")
        load_state_dict_checked(model, weights, str(path))
        state.step = torch.as_tensor(ckpt["step"], dtype=torch.long).reshape(1)
        state.epoch = torch.as_tensor(ckpt["epoch"], dtype=torch.long).reshape(1)
        if ckpt.get("scaler"):
            state.scaler.load_state_dict(ckpt["scaler"])
        freeze_step = getattr(model, "freeze_step", None)
        current = getattr(model, "current_step", None)
        if freeze_step is not None and current is not None and int(current) >= freeze_step:
            model.freeze_extractor()  # type: ignore[operator]
            if len(state.optimizer.param_groups) > 1:
                remove_param_group(state.optimizer, state.scheduler, 1)
        saved_groups = len(ckpt["optimizer"]["param_groups"])
        if len(state.optimizer.param_groups) != saved_groups:
            raise CheckpointError(
                f"{path}: the optimizer has {len(state.optimizer.param_groups)} parameter group(s), the checkpoint "
                f"{saved_groups}"
            )
        state.optimizer.load_state_dict(ckpt["optimizer"])
        load_scheduler_state(state.scheduler, ckpt["scheduler"])
        self._path = path
        return True

    def load_existing_run(self) -> bool:
        """Restore the newest checkpoint of the folder; False when there is none."""
        path = self.last
        return path is not None and self._load_from_path(path)

    def load(self, step: int) -> bool:
        """Restore ``step_<step>.pt``; False when it does not exist."""
        return self._load_from_path(self.folder / f"step_{step}.pt")

    def find_new_metrics(self) -> Iterator[dict[str, Any]]:
        """The validation results added to ``metrics.jsonl`` that can be logged now, in step order."""
        yield from self._metrics_queue()
