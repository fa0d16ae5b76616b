"""Packaging: the compiled extension, the warning when it is missing, a light `import spidr.models`."""

from __future__ import annotations

import os
import subprocess
import sys

import spidr
from tests.conftest import REPO


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPIDR_OPS_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def test_extension_reports_how_it_was_built():
    info = spidr.build_info()
    assert info["loaded"], f"spidr._C did not load: {info.get('error')}"
    assert info["compiler"] and isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    import torch

    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_library_works_without_the_extension_and_warns_once():
    result = run_python(
        "import sys; sys.modules['spidr._C'] = None\n"
        "import torch, spidr.ops as ops\n"
        "x = torch.randn(1, 4, 3); cb = torch.randn(1, 5, 3); counts = torch.ones(1, 5)\n"
        "ops.assign_codes(x, cb, counts); ops.assign_codes(x, cb, counts)\n"
        "print(ops.backends('cpu'), ops.last_backend())\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['torch'] torch"
    assert result.stderr.count("spidr._C could not be loaded") == 1
    assert "only the 'torch' ops backend is available" in result.stderr


def test_import_is_light():
    result = run_python(
        "import time, sys, torch\n"
        "before = set(sys.modules)\n"  # torch itself may import tqdm (torch.hub) when it is installed
        "start = time.perf_counter(); import spidr.models; elapsed = time.perf_counter() - start\n"
        "new = set(sys.modules) - before\n"
        "heavy = [m for m in ('triton', 'torchcodec', 'polars', 'wandb', 'submitit', 'tqdm') if m in new]\n"
        "print(elapsed, heavy)\n"
    )
    assert result.returncode == 0, result.stderr
    elapsed, heavy = result.stdout.split(maxsplit=1)
    assert heavy.strip() == "[]"
    assert float(elapsed) < 1.5, f"import spidr.models took {elapsed} s"
