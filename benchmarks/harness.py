"""What every benchmark suite shares: timing, the machine's description and the table format.

A suite is a module under ``benchmarks/`` with a function

    run_suite(*, repeats: int = 5, quick: bool = False, device: str = "cpu") -> Suite

that measures its rows side by side in the calling process and returns a :class:`Suite`;
``python -m benchmarks`` collects them. ``quick`` means small shapes (a smoke run that checks the code
path, not a figure to report).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    """One measured configuration: times in seconds over ``runs`` repeats after a warm-up."""

    name: str
    median_s: float
    min_s: float
    max_s: float
    runs: int
    ratio: float | None = None  # median / the reference row's median (filled by Suite.finish)
    note: str = ""
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @classmethod
    def from_times(cls, name: str, times: list[float]) -> Row:
        """A row from its timed runs (seconds), e.g. one entry of :func:`time_interleaved`."""
        return cls(name=name, median_s=statistics.median(times), min_s=min(times), max_s=max(times), runs=len(times))


@dataclass
class Suite:
    """A table: its rows, which row the ratios are taken against, and free-text notes."""

    name: str
    title: str
    rows: list[Row]
    reference: str | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # rows not measured, each with the reason

    def finish(self) -> Suite:
        """Fill each row's ratio to the reference row (when that row was measured)."""
        ref = next((r for r in self.rows if r.name == self.reference), None)
        for row in self.rows:
            row.ratio = row.median_s / ref.median_s if ref is not None and ref.median_s > 0 else None
        return self

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "reference": self.reference,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
            "skipped": self.skipped,
        }

    def markdown(self) -> str:
        """The table as Markdown: median and spread in ms, ratio to the reference row, extra columns."""
        extra_keys: list[str] = []
        for row in self.rows:
            extra_keys += [k for k in row.extra if k not in extra_keys]
        ref = f" (ratio: median / `{self.reference}`)" if self.reference else ""
        lines = [f"### {self.title}{ref}", ""]
        header = ["row", "median ms", "spread ms", "runs", "ratio", *extra_keys, "note"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in self.rows:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
            cells = [
                f"`{r.name}`",
                f"{r.median_s * 1e3:.1f}",
                f"{r.min_s * 1e3:.1f}-{r.max_s * 1e3:.1f}",
                str(r.runs),
                ratio,
                *[_fmt(r.extra.get(k, "")) for k in extra_keys],
                r.note,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        for reason in self.skipped:
            lines.append(f"\nSkipped: {reason}")
        for note in self.notes:
            lines.append(f"\n{note}")
        return "\n".join(lines) + "\n"


def _fmt(value: float | int | str) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work (timings on CUDA must include it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu"
) -> tuple[float, float, float]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times; return (median, min, max) seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu"
) -> dict[str, list[float]]:
    """Time several workloads in turn, round robin: each round runs every workload once, starting one later.

    On a shared machine whose speed drifts over seconds, one-after-the-other timings compare different
    moments; round robin spreads each workload over the same moments, and pairs of times taken in one
    round can be compared directly (see :func:`paired_ratio`). Returns each workload's times in seconds,
    in round order.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(1, repeats)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]`` (both from one :func:`time_interleaved` call)."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def measure(
    name: str, fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, device: str = "cpu", note: str = ""
) -> Row:
    """Time ``fn`` with :func:`time_it` and return it as a :class:`Row`."""
    median, lo, hi = time_it(fn, repeats=repeats, warmup=warmup, device=device)
    return Row(name=name, median_s=median, min_s=lo, max_s=hi, runs=max(1, repeats), note=note)


def machine() -> dict[str, str | int]:
    """CPU model, cores, torch version and GPU (if any) of the machine running the benchmarks."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, str | int] = {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    return info


def machine_line() -> str:
    """:func:`machine` as one line for a table's caption."""
    m = machine()
    return (
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"Python {m['python']}, GPU: {m['gpu']}"
    )
