"""Shared helpers: golden fixtures of the reference release, copied from shared/fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import DinoSR, SpidR

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

_cache: dict[str, dict] = {}


def load_fixture(name: str) -> dict:
    """A golden fixture (loaded once per session; treat it as read-only)."""
    if name not in _cache:
        _cache[name] = torch.load(FIXTURES / name, weights_only=True)
    return _cache[name]


def model_from_fixture(fixture: dict) -> DinoSR:
    """The fixture's model with its initial weights, in eval mode."""
    cfg_class = SpidRConfig if fixture["model_type"] == "spidr" else DinoSRConfig
    model = (SpidR if fixture["model_type"] == "spidr" else DinoSR)(cfg_class(**fixture["config"]))
    model.load_state_dict(fixture["state_dict"])
    return model.eval()


@pytest.fixture(params=["spidr_small.pt", "dinosr_small.pt"], ids=["spidr", "dinosr"])
def golden(request) -> dict:
    return load_fixture(request.param)
