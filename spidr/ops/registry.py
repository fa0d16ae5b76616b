"""Backend registry: which implementations of the ops exist, which can run, and which one ran last."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

ENV_VAR = "SPIDR_OPS_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of the three ops.

    Attributes:
        name: what users force it by (``SPIDR_OPS_BACKEND`` or :func:`use_backend`).
        priorities: device type (``"cpu"``, ``"cuda"``, or ``"*"`` for any) -> rank; higher runs
            first. Device types not listed are not supported.
        available: whether it can run now on a device type (hardware, interpreter settings).
        assign_codes, codebook_update_, masked_prediction_loss: the implementations.
    """

    name: str
    priorities: Mapping[str, int]
    available: Callable[[str], bool]
    assign_codes: Callable
    codebook_update_: Callable
    masked_prediction_loss: Callable

    def priority(self, device_type: str) -> int | None:
        """Rank on ``device_type``, None when unsupported there."""
        return self.priorities.get(device_type, self.priorities.get("*"))

    def usable(self, device_type: str) -> bool:
        """Whether it supports ``device_type`` and can run there now."""
        return self.priority(device_type) is not None and self.available(device_type)


_REGISTRY: dict[str, Backend] = {}
_KNOWN_NAMES = ("torch", "cpp", "cuda", "triton")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("spidr_ops_backend", default=None)
_last: list[str | None] = [None]


class BackendError(RuntimeError):
    """A forced backend does not exist or cannot run on the given tensors."""


_pending_loaders: list[Callable[[], None]] = []


def add_loader(loader: Callable[[], None]) -> None:
    """Run ``loader`` (which may register backends) once, the first time backends are looked up."""
    _pending_loaders.append(loader)


def _run_loaders() -> None:
    while _pending_loaders:
        _pending_loaders.pop(0)()


def register(backend: Backend) -> None:
    """Add ``backend`` to the registry (only finished backends are ever registered)."""
    _REGISTRY[backend.name] = backend


def registered() -> list[str]:
    """Names of all registered backends, usable or not."""
    _run_loaders()
    return sorted(_REGISTRY)


def backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends usable for tensors on ``device``, fastest first."""
    device_type = torch.device(device).type
    usable = [name for name in registered() if _REGISTRY[name].usable(device_type)]
    return sorted(usable, key=lambda name: -(_REGISTRY[name].priority(device_type) or 0))


def _forced_name() -> str | None:
    name = _forced.get()
    if name is None:
        name = os.environ.get(ENV_VAR) or None
    return name


def select(device: torch.device) -> Backend:
    """The backend to run for tensors on ``device``: the forced one, else the fastest usable one."""
    backend = _REGISTRY[_resolve(device.type)]
    _last[0] = backend.name
    return backend


def _resolve(device_type: str) -> str:
    _run_loaders()
    name = _forced_name()
    if name is None:
        usable = backends(device_type)
        if not usable:
            raise BackendError(f"no spidr.ops backend can run on {device_type} tensors")
        return usable[0]
    backend = _REGISTRY.get(name)
    if backend is None:
        why = "is not built or not available in this installation" if name in _KNOWN_NAMES else "is unknown"
        raise BackendError(
            f"spidr.ops backend {name!r} (forced by {ENV_VAR} or use_backend) {why}; "
            f"registered backends: {', '.join(registered())}"
        )
    if not backend.usable(device_type):
        raise BackendError(
            f"spidr.ops backend {name!r} (forced by {ENV_VAR} or use_backend) cannot run on {device_type} "
            f"tensors; usable there: {', '.join(backends(device_type))}"
        )
    return name


# torch.compile runs _resolve at trace time and bakes the choice into the graph (forcing another
# backend afterwards needs a recompile) instead of breaking the graph on ContextVar and os.environ.
# This is what torch.compiler.assume_constant_result does, without importing torch._dynamo (and
# with it triton) at `import spidr`; tests/test_compile.py fails if the marker stops working.
_resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the backend ``name`` for the ops called inside the ``with`` block.

    Takes precedence over ``SPIDR_OPS_BACKEND``. An unknown name raises at once; a backend that
    cannot run on the tensors raises when an op is called, never falling back silently.
    """
    _run_loaders()
    if name not in _REGISTRY:
        why = "is not built or not available in this installation" if name in _KNOWN_NAMES else "is unknown"
        raise BackendError(f"spidr.ops backend {name!r} {why}; registered backends: {', '.join(registered())}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def last_backend() -> str | None:
    """Name of the backend that ran the most recent op call (None before the first call)."""
    return _last[0]
