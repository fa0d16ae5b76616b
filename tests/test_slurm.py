"""`python -m spidr` (SLURM through submitit), tested without SLURM: dry runs and submitit's local executor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

submitit = pytest.importorskip("submitit")

from spidr.slurm import TrainTask, ValidateTask  # noqa: E402

DEMO = REPO / "configs" / "demo.toml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spidr", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_dry_run_prints_one_task_per_gpu(tmp_path):
    result = cli(
        str(DEMO),
        "-A",
        "acct",
        "-N",
        "2",
        "-G",
        "4",
        "-t",
        "90",
        "-q",
        "high",
        "-C",
        "a100",
        "--dump",
        str(tmp_path),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for flag in (
        "--account=acct",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--time=90",
        "--qos=high",
        "--constraint=a100",
    ):
        assert flag in out
    assert str(tmp_path / "spidr_demo") in out
    assert not any(tmp_path.iterdir())  # nothing submitted, nothing written


def test_bad_config_is_refused_before_submitting(tmp_path):
    result = cli(str(DEMO), "-A", "acct", "-N", "1", "-G", "1", "--set", "optimizer.lr=-1", "--dry-run")
    assert result.returncode == 2 and "optimizer.lr = -1.0" in result.stderr
    result = cli(str(DEMO), "-A", "acct", "-N", "0", "-G", "1", "--dry-run")
    assert result.returncode == 2 and "--nodes must be at least 1" in result.stderr
    result = cli(str(DEMO), "-N", "1", "-G", "1", "--dry-run")
    assert result.returncode == 2 and "--account" in result.stderr


def test_train_task_runs_under_submitit_and_requeues_itself(tmp_path):
    overrides = (f"run.workdir={tmp_path}", "optimizer.max_steps=3", "run.save_interval=0")
    task = TrainTask(str(DEMO), overrides)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit" / "%j")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(task)
    assert job.result() == str(DEMO)
    run = tmp_path / "demo" / "spidr_demo"
    assert (run / "final.pt").is_file()
    requeued = task.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission) and requeued.function == task


def test_validate_task_appends_results(tmp_path):
    overrides = (f"run.workdir={tmp_path}", "optimizer.max_steps=2", "run.save_interval=0")
    from spidr.train import main  # in-process: faster than another executor

    assert main([str(DEMO), *(a for o in overrides for a in ("--set", o))]) == 0
    run = tmp_path / "demo" / "spidr_demo"
    before = (run / "validation.jsonl").read_text().splitlines()
    assert ValidateTask(str(run / "config.json"), str(run / "final.pt"))() == str(run / "final.pt")
    after = (run / "validation.jsonl").read_text().splitlines()
    assert len(after) == len(before) + 1
    record = json.loads(after[-1])
    assert record["step"] == 2 and record["group"] == "speech" and record["loss"] > 0
