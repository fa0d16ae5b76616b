"""Root logger setup of the training processes (the reference release's ``init_logger``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import ClassVar

__all__ = ["ColoredFormatter", "init_logger"]

_FORMAT = "[spidr] %(asctime)s - %(levelname)s - %(name)s - %(message)s"


class ColoredFormatter(logging.Formatter):
    """A formatter that colours each record by its level (ANSI escapes)."""

    COLORS: ClassVar[dict[str, str]] = {
        "DEBUG": "\033[36m",
        "INFO": "\033[32m",
        "WARNING": "\033[33m",
        "ERROR": "\033[31m",
        "CRITICAL": "\033[35m",
    }
    RESET = "\033[0m"

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.COLORS.get(record.levelname, '')}{super().format(record)}{self.RESET}"


def init_logger(file: str | Path | None = None, *, with_colors: bool = False) -> None:
    """Send every log record to stdout, WARNING and above to stderr as well (the reference release's setup)
    and, with ``file``, append them to that file too. Replaces the root logger's handlers and sets it to DEBUG."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    formatter = (ColoredFormatter if with_colors else logging.Formatter)(_FORMAT)
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.DEBUG)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
    root.handlers = [out, err]
    if file is not None:
        to_file = logging.FileHandler(file, "a", encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(logging.Formatter(_FORMAT))  # no colour escapes in files
        root.addHandler(to_file)
