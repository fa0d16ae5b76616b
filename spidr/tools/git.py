"""The git state (branch, commit, uncommitted diff) of the code base, recorded beside a launched job."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

__all__ = ["GitInfo", "git_available", "git_info", "write_git_info_if_available"]


class GitInfo(NamedTuple):
    """Branch, commit and ``git diff`` of the code base."""

    branch: str
    commit: str
    diff: str


def _root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(_root()), *args], capture_output=True, check=False, text=True)


def git_available() -> bool:
    """Whether git is installed and the code base is inside a git work tree."""
    if shutil.which("git") is None:
        return False
    return _git("rev-parse", "--is-inside-work-tree").returncode == 0


def git_info() -> GitInfo:
    """The code base's branch, commit and uncommitted diff.

    Raises:
        RuntimeError: git failed (not a work tree, or git is missing); the message gives git's own.
    """
    head = _git("rev-parse", "HEAD", "--abbrev-ref", "HEAD")
    if head.returncode != 0:
        raise RuntimeError(f"git rev-parse failed in {_root()}: {head.stderr.strip()}")
    commit, branch = head.stdout.split()
    diff = _git("diff")
    if diff.returncode != 0:
        raise RuntimeError(f"git diff failed in {_root()}: {diff.stderr.strip()}")
    return GitInfo(branch=branch, commit=commit, diff=diff.stdout)


def write_git_info_if_available(path: str | Path) -> None:
    """Write ``git-info.txt`` (branch, commit) and ``git-diff.patch`` into the folder ``path`` when the code base
    is a git work tree; do nothing otherwise (an installed wheel, no git)."""
    if not git_available():
        return
    info = git_info()
    (Path(path) / "git-info.txt").write_text(f"branch: {info.branch}\ncommit: {info.commit}\n")
    (Path(path) / "git-diff.patch").write_text(info.diff)
