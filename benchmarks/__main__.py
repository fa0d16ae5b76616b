"""Run the benchmark suites and print one Markdown table per suite, after the machine's description.

    python -m benchmarks                              # every suite, CPU, full sizes (minutes)
    python -m benchmarks --quick                      # every suite on small shapes: a smoke run (seconds)
    python -m benchmarks --only ops step --json out.json
    python -m benchmarks --only step --reference /path/to/spidr-0.2.0-py3-none-any.whl

Suites (modules of this folder, imported only when they run):

- ``ops``: the three spidr.ops operations, every usable backend against the ``torch`` reference backend
  (three tables: assignment + update, the loss forward + backward with h per head and with a shared h),
  with GEMM floors and peak memory;
- ``step``: one training step of the base SpidR, ours against the reference release (``--reference`` or
  ``SPIDR_REFERENCE``; without it the release row is skipped and ratios are against ``ours-torch``);
- ``extract``: batched feature extraction against a per-file loop (ours, and the release's own when
  ``--reference`` or ``SPIDR_REFERENCE`` gives it);
- ``kmeans``: one Lloyd iteration of spidr.kmeans against scikit-learn's.

Every row is the median of ``--repeats`` runs after a warm-up, with the spread (min-max) and the ratio to
its table's reference row. A suite whose module is missing or whose optional dependency is not installed is
reported as ``skipped: <reason>``; one that fails prints its traceback, the others still run, and the exit
status is 1. Benchmarks never assert timings.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Suite, machine, machine_line

SUITES: dict[str, str] = {
    "ops": "benchmarks.bench_ops",
    "step": "benchmarks.bench_step",
    "extract": "benchmarks.bench_extract",
    "kmeans": "benchmarks.bench_kmeans",
}


class Skipped(Exception):
    """A suite that cannot run here; the message says why."""


def _missing_reason(error: ImportError, module: str) -> str:
    """Why a suite is skipped for an ImportError: its own module missing, or a dependency not installed."""
    missing = getattr(error, "name", None)
    if missing == module:
        return f"{module.replace('.', '/')}.py is not there"
    if missing:
        return f"needs the module {missing!r}, which is not installed ({error})"
    return f"an import failed: {error}"


def run_one(name: str, *, repeats: int, quick: bool, device: str) -> list[Suite]:
    """Import the suite ``name`` and run it; raise :class:`Skipped` when its module or a dependency is missing."""
    module_name = SUITES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise Skipped(_missing_reason(error, module_name)) from error
    run_suite = getattr(module, "run_suite", None)
    if run_suite is None:
        raise Skipped(f"{module_name} has no run_suite()")
    try:
        result = run_suite(repeats=repeats, quick=quick, device=device)
    except ImportError as error:  # an optional dependency imported inside the suite
        raise Skipped(_missing_reason(error, module_name)) from error
    return list(result) if isinstance(result, (list, tuple)) else [result]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(SUITES), metavar="SUITE", help=f"run only these suites ({', '.join(SUITES)})"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the machine and every table as JSON")
    parser.add_argument("--quick", action="store_true", help="small shapes and models: a smoke run, not figures")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row after one warm-up (default 5)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the suites run (default cpu)")
    parser.add_argument(
        "--reference",
        metavar="PATH",
        help="the reference release for the step and extract suites (its wheel or a directory holding its spidr/ "
        "package); sets SPIDR_REFERENCE",
    )
    args = parser.parse_args(argv)
    if args.reference:
        os.environ["SPIDR_REFERENCE"] = args.reference
    names = args.only or list(SUITES)
    print(machine_line())
    report: dict[str, Any] = {"machine": machine_line(), "machine_info": machine(), "suites": [], "skipped": {}}
    report["failed"] = {}
    for name in names:
        print()
        try:
            suites = run_one(name, repeats=args.repeats, quick=args.quick, device=args.device)
        except Skipped as reason:
            print(f"### {name}\n\nskipped: {reason}")
            report["skipped"][name] = str(reason)
            continue
        except Exception as error:  # one broken suite must not hide the others' tables
            traceback.print_exc()
            print(f"### {name}\n\nfailed: {error!r}")
            report["failed"][name] = repr(error)
            continue
        for suite in suites:
            print(suite.markdown())
            report["suites"].append(suite.to_dict())
        sys.stdout.flush()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
