"""Loading of the compiled extension ``spidr._C``, with one warning when it cannot be loaded."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

import torch  # noqa: F401 -- spidr._C links against libtorch, which must be loaded first

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {}


def load() -> ModuleType | None:
    """Import ``spidr._C`` once; on failure log one warning saying why and return None."""
    if "module" not in _state:
        try:
            _state["module"] = importlib.import_module("spidr._C")
            _state["error"] = None
        except (ImportError, OSError) as error:
            _state["module"] = None
            _state["error"] = f"{type(error).__name__}: {error}"
            logger.warning(
                "spidr's compiled extension spidr._C could not be loaded (%s); only the 'torch' ops backend is "
                "available. Rebuild it against the installed torch with `pip install --no-build-isolation -e .`.",
                _state["error"],
            )
    return _state["module"]


def load_error() -> str | None:
    """Why the extension could not be loaded (None when it loaded or was not tried yet)."""
    return _state.get("error")


def build_info() -> dict[str, Any]:
    """How ``spidr._C`` was built: compiler, OpenMP, CUDA, torch version; ``{"loaded": False, ...}`` if absent."""
    module = load()
    if module is None:
        return {"loaded": False, "error": load_error()}
    return {"loaded": True, **module.build_info()}
