"""End to end: `python -m spidr.train` on the committed speech, exact resume, refusal of bad configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPIDR_OPS_BACKEND")}
    cmd = [sys.executable, "-m", "spidr.train", str(DEMO), "--set", f"run.workdir={tmp_path}"]
    cmd += ["--set", "optimizer.max_steps=100000", "--set", "run.save_interval=0", "--set", "run.wandb_name=run"]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:  # a file, not a pipe: a full pipe would block the process
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        log = run_dir(tmp_path) / "log.jsonl"
        deadline = time.monotonic() + 120
        while not log.is_file() and time.monotonic() < deadline:  # wait for the first training step
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr[-2000:]
    saved = list(run_dir(tmp_path).glob("step_*.pt"))
    assert len(saved) == 1 and "Received signal" in stderr
    step = torch.load(saved[0], weights_only=True)["step"]
    assert step >= 1 and not (run_dir(tmp_path) / "final.pt").exists()


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    from types import SimpleNamespace

    from spidr.config import read_config
    from spidr.train import Env, Trainer, TrainingError

    cfg = read_config(DEMO, [f"run.workdir={tmp_path}", "run.max_nonfinite_steps=2"])
    trainer = Trainer(cfg, Env())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    bad = SimpleNamespace(
        waveforms=torch.full((2, 16000), float("nan")),
        attention_mask=None,
        mask_indices=torch.arange(10).expand(2, -1).contiguous(),
    )
    assert trainer.train_step(bad) is None
    assert trainer.step == 0 and trainer.counters["skipped_steps"] == 1
    for key, value in trainer.model.state_dict().items():
        if not key.startswith("codebooks."):  # the forward pass itself updates the codebooks
            assert torch.equal(value, before[key]), key
    assert not trainer.optimizer.state  # AdamW never stepped
    with pytest.raises(TrainingError, match="2 consecutive steps with a non-finite loss"):
        trainer.train_step(bad)


def test_missing_files_are_skipped_and_too_many_stop_the_run(tmp_path):
    manifest = tmp_path / "manifest.csv"
    lines = (REPO / "tests" / "data" / "speech" / "manifest.csv").read_text().splitlines()
    rows = [
        line.replace(",alice/", f",{REPO}/tests/data/speech/alice/").replace(",bob/", ",missing/") for line in lines
    ]
    manifest.write_text("\n".join(rows) + "\n")
    ok = train(
        tmp_path,
        f"data.manifest={manifest}",
        "optimizer.max_steps=4",
        "run.max_bad_fraction=0.9",
        "run.log_interval=1",
        name="ok",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Skipping bad audio file" in ok.stderr and "missing/utt0" in ok.stderr
    record = json.loads((run_dir(tmp_path, "ok") / "log.jsonl").read_text().splitlines()[-1])
    assert record["bad_files"] > 0
    stopped = train(tmp_path, f"data.manifest={manifest}", "run.max_bad_fraction=0.1", name="stopped")
    assert stopped.returncode == 1
    assert "unreadable, more than run.max_bad_fraction = 0.1" in stopped.stderr
