"""Benchmark suites of spidr, side by side in one process; ``python -m benchmarks --help`` runs them all.

Each ``bench_*.py`` module exposes ``run_suite(*, repeats=5, quick=False, device="cpu")`` returning a
:class:`benchmarks.harness.Suite` (or a list of them) and has a command line of its own;
``project_400k.py`` projects the paper's 400k-step training time from a measured step; ``gpu.sh`` runs
everything that needs a GPU in one command. Results go to ``RESULTS.md``, dated, with the machine named.
"""
