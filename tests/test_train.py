"""End to end: `python -m spidr.train` on the committed speech, exact resume, refusal of bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from spidr.models import build_model
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.toml"


def train(tmp_path, *overrides: str, name: str = "run") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPIDR_OPS_BACKEND")}
    cmd = [sys.executable, "-m", "spidr.train", str(DEMO), "--set", f"run.workdir={tmp_path}"]
    cmd += ["--set", f"run.wandb_name={name}"]
    for override in overrides:
        cmd += ["--set", override]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def run_dir(tmp_path, name="run"):
    return tmp_path / "demo" / name


def test_demo_trains_and_the_loss_goes_down(tmp_path):
    result = train(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir(tmp_path)
    assert (out / "final.pt").is_file() and (out / "config.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[-1]["step"] == 60
    assert log[-1]["loss"] < log[0]["loss"]
    for key in ("loss", "grad_norm", "batch_size", "target_ppl", "pred_ppl", "lr", "ema_decay"):
        assert key in log[-1]
    model = build_model(checkpoint=out / "final.pt")
    assert model.current_step.item() == 60
    assert len(list(out.glob("step_*.pt"))) <= 2  # keep_latest


def test_exact_resume_is_bit_identical(tmp_path):
    short = ["optimizer.max_steps=6", "run.save_interval=100", "run.log_interval=1"]
    assert train(tmp_path, *short, name="straight").returncode == 0
    first = train(tmp_path, "optimizer.max_steps=3", "run.save_interval=100", name="resumed")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(tmp_path, *short, name="resumed")  # same command, larger max_steps: continues from final.pt
    assert second.returncode == 0, second.stderr[-3000:]
    a = torch.load(run_dir(tmp_path, "straight") / "final.pt", weights_only=True)
    b = torch.load(run_dir(tmp_path, "resumed") / "final.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.encoder_widht=3", "unknown key model.encoder_widht"), ("optimizer.max_steps=-1", "optimizer.max_steps")],
)
def test_bad_config_is_refused_before_anything_starts(tmp_path, override, message):
    result = train(tmp_path, override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not run_dir(tmp_path).exists()
