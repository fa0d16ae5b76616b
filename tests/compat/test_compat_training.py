"""Training-side names of the reference release (spidr 0.2.0): optimiser, schedules, checkpoints, tools, configs,
and run directories crossing both ways, against values 0.2.0 itself produced (fixtures/release_goldens.pt and
the 0.2.0 run directory fixtures/release_run/, made by generators/make_release_goldens.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_step
from spidr.checkpoint import Checkpointer, find_checkpoints, remove_param_group
from spidr.config import ConfigError, OptimizerConfig, ResumeConfig, SpidRConfig, read_config
from spidr.models import build_model
from spidr.models.dinosr import ema_scheduler
from spidr.models.spidr import exp_ema_scheduler
from spidr.optimizer import build_optimizer
from spidr.tools import AverageMeters, MetricsQueue
from tests.conftest import REPO

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = torch.load(FIXTURES / "release_goldens.pt", weights_only=True)
TINY = {
    k: [tuple(layer) for layer in v] if k == "extractor_conv_layer_config" else v
    for k, v in GOLDEN["meta"]["tiny_model_config"].items()
}
_CANDIDATES = [os.environ.get(bench_step.REFERENCE_ENV, ""), "/work/refwheel/spidr-0.2.0-py3-none-any.whl"]
REFERENCE = next((Path(p) for p in _CANDIDATES if p and Path(p).exists()), None)


def optimizer_config(values: dict) -> OptimizerConfig:
    return OptimizerConfig(**{k: tuple(v) if k == "betas" else v for k, v in values.items()})


# ------------------------------------------------------------------------------------------- optimiser, schedules
@pytest.mark.parametrize("variant", ["tristage", "cosine", "rsqrt", "constant", "tristage_no_warmup"])
def test_build_optimizer_groups_and_learning_rates_equal_the_release(variant):
    golden = GOLDEN["schedules"]["optimizer"][variant]
    cfg = optimizer_config(golden["optimizer_config"])
    for mode in ("full", "remove_group_1_at_25"):
        torch.manual_seed(0)
        model = build_model(cfg=SpidRConfig(**TINY))
        optimizer, scaler, scheduler = build_optimizer(model, cfg)
        assert isinstance(optimizer, torch.optim.AdamW) and isinstance(scaler, torch.GradScaler)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        if golden[mode]["param_groups_initial"]:
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
            assert groups == [g["param_names"] for g in golden[mode]["param_groups_initial"]]
        rates = []
        for step in range(61):
            rates.append(list(scheduler.get_last_lr()))
            if mode != "full" and step == 25:
                remove_param_group(optimizer, scheduler, 1)
            optimizer.step()
            scheduler.step()
        for step, (ours, theirs) in enumerate(zip(rates, golden[mode]["lrs"], strict=True)):
            torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=0, msg=f"{variant} {mode} step {step}")


def test_ema_schedulers_equal_the_release():
    golden = GOLDEN["schedules"]
    steps = golden["ema_steps"]
    dinosr = [ema_scheduler(step, **golden["ema_scheduler"]["params"]) for step in steps]
    spidr = [exp_ema_scheduler(step, **golden["exp_ema_scheduler"]["params"]) for step in steps]
    assert dinosr == pytest.approx(golden["ema_scheduler"]["values"], rel=1e-12)
    assert spidr == pytest.approx(golden["exp_ema_scheduler"]["values"], rel=1e-12)


# ------------------------------------------------------------------------------------------------- run directories
def release_run(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the 0.2.0 run directory under tmp_path, and its config.json pointed at it."""
    run = tmp_path / "fixtures" / "release_run"
    shutil.copytree(FIXTURES / "release_run", run)
    return run, run / "config.json"


def release_overrides(tmp_path: Path, *more: str) -> list[str]:
    """Point the 0.2.0 run's config at this machine: the run in tmp_path, the committed speech, no workers."""
    manifest = REPO / "tests" / "data" / "speech" / "manifest.csv"
    return [
        f"run.workdir={tmp_path}",
        f"data.manifest={manifest}",
        "data.num_workers=0",
        "data.max_batch_length=100000",
        "data.max_sample_size=50000",
        f"validation.dev.manifest={manifest}",
        "validation.dev.num_workers=0",
        *more,
    ]


def release_config(config: Path, tmp_path: Path, *more: str):
    return read_config(config, release_overrides(tmp_path, *more))


def test_a_release_run_directory_resumes_in_our_trainer(tmp_path, caplog):
    from spidr.train import Env, Trainer

    golden = GOLDEN["run_dir"]
    run, config = release_run(tmp_path)
    cfg = release_config(config, tmp_path)
    assert cfg.run.dir == run
    trainer = Trainer(cfg, Env())
    with caplog.at_level("WARNING"):
        assert trainer.resume()
    assert "holds no data position or random generator states" in caplog.text
    assert trainer.step == golden["step"] == 3 and trainer.epoch == golden["epoch"]
    model = trainer.model
    assert int(model.current_step) == int(golden["model_current_step"].reshape(-1)[0])
    final = torch.load(run / "final.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, final["model"][name]), name
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())  # step 3 >= freeze_step 2
    assert len(trainer.optimizer.param_groups) == 1
    assert trainer.scheduler.get_last_lr() == pytest.approx(golden["scheduler_last_lr"][:1], rel=1e-12)
    state_steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert state_steps == {float(golden["optimizer_state_step"])}


def test_python_m_spidr_train_continues_a_release_run(tmp_path):
    run, config = release_run(tmp_path)
    overrides = release_overrides(tmp_path, "optimizer.max_steps=5", "run.save_interval=0", "run.compile=false")
    args = [sys.executable, "-m", "spidr.train", str(config), *(a for o in overrides for a in ("--set", o))]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {run / 'final.pt'} at step 3" in result.stderr
    assert "the data stream starts afresh" in result.stderr
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["step"] == 5 and int(final["model"]["current_step"]) == 5


def test_the_release_checkpointer_saves_loads_and_reads_release_files(tmp_path):
    golden = GOLDEN["run_dir"]
    run, _ = release_run(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg=SpidRConfig(**TINY))
    cfg = optimizer_config(GOLDEN["meta"]["small_optimizer_config"])
    optimizer, scaler, scheduler = build_optimizer(model, cfg)
    ckpt = Checkpointer(run, 2, -1)
    ckpt.init_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    assert ckpt.last == run / "final.pt" and find_checkpoints(run) == [run / "step_2.pt", run / "final.pt"]
    assert ckpt.load_existing_run()
    assert int(ckpt.step) == golden["checkpointer_step"] and int(ckpt.epoch) == golden["checkpointer_epoch"]
    assert len(optimizer.param_groups) == 1 and not model.feature_extractor.conv_layers[0].conv.weight.requires_grad
    # Save in the release's layout, atomically, and load it back in a fresh state.
    assert ckpt.save(4, 2) and (run / "step_4.pt").is_file() and not ckpt.save(5, 2)
    saved = torch.load(run / "step_4.pt", weights_only=True)
    assert sorted(saved) == ["epoch", "model", "optimizer", "scaler", "scheduler", "step"]
    assert saved["step"].tolist() == [4] and saved["epoch"].tolist() == [2]
    other = Checkpointer(run, 2, keep_latest=1)
    fresh = build_model(cfg=SpidRConfig(**TINY))
    fresh_opt, fresh_scaler, fresh_sched = build_optimizer(fresh, cfg)
    other.init_state(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, scaler=fresh_scaler)
    assert other.load(4) and int(other.step) == 4
    assert not other.load(99)
    # keep_latest counts final.pt, as the release's Checkpointer does (final.pt itself is never deleted)
    assert other.save_final(6, 3) and sorted(p.name for p in run.glob("*.pt")) == ["final.pt"]


def test_meters_behave_as_the_release():
    golden = GOLDEN["tools"]["average_meters"]
    meters = AverageMeters(["a", "b"], torch.device("cpu"))
    meters.update(a=torch.tensor(1.0), b=torch.tensor(4.0))
    meters.update(a=torch.tensor(3.0))
    meters["b"].update(torch.tensor(2.0), n=3)
    assert {k: m.sum.item() for k, m in meters.meters.items()} == golden["sums_before_pop"]
    assert {k: m.count.item() for k, m in meters.meters.items()} == golden["counts_before_pop"]
    assert meters.pop() == golden["pop1"]
    assert all(value != value for value in meters.pop().values())  # NaN after a reset, as the release
    with pytest.raises(KeyError, match="no meter named 'c'"):
        meters.update(c=torch.tensor(1.0))


def test_metrics_queue_yields_what_the_release_yields(tmp_path):
    """The release's own sequence of appends and calls (see the generator), replayed on ours."""
    events = iter(GOLDEN["tools"]["metrics_queue"]["events"])
    path = tmp_path / "metrics.jsonl"

    def append(target: Path, *records: dict) -> None:
        with target.open("a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)

    def check(queue: MetricsQueue) -> None:
        expected = next(events)["result"]
        if expected["ok"]:
            assert list(queue()) == expected["yielded"]
        else:
            with pytest.raises(ValueError):
                list(queue())

    q1 = MetricsQueue(path, 100, start=0)
    check(q1)
    append(path, {"step": 0, "group": "dev", "loss": 1.5})
    check(q1)
    append(path, {"step": 200, "group": "dev", "loss": 1.1})
    check(q1)
    append(path, {"step": 100, "group": "dev", "loss": 1.3}, {"step": 0, "group": "test", "acc": 0.5})
    check(q1)
    check(q1)
    q2 = MetricsQueue(path, 100, start=0)
    check(q2)
    append(path, {"step": 300, "group": "dev", "loss": 1.0}, {"step": 200, "group": "test", "acc": 0.7})
    check(q2)
    check(q1)
    append(path, {"step": 100, "group": "test", "acc": 0.6})
    check(q2)
    append(path, {"step": 100, "group": "dev", "loss": 9.0})
    check(q2)
    q3 = MetricsQueue(path, 100, start=200)
    check(q3)
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"step": 0, "group": "dev", "loss": 2.5})
    path.write_text("\n".join(lines) + "\n")
    check(q3)
    fresh = tmp_path / "fresh.jsonl"
    append(fresh, {"step": 200, "group": "dev", "m": 1}, {"step": 300, "group": "dev", "m": 2})
    q4 = MetricsQueue(fresh, 100, start=200)
    check(q4)
    append(fresh, {"step": 400, "group": "dev", "m": 3})
    check(q4)
    q5 = MetricsQueue(tmp_path / "other.jsonl", 100, start=200)
    append(tmp_path / "other.jsonl", {"step": 200, "group": "dev", "m": 1})
    check(q5)
    assert next(events, None) is None


@pytest.mark.skipif(REFERENCE is None, reason="no reference release wheel (set SPIDR_REFERENCE)")
def test_our_checkpoint_loads_in_the_release_build_model(tmp_path):
    from spidr.train import main

    config = REPO / "configs" / "demo.toml"
    overrides = [f"run.workdir={tmp_path}", "optimizer.max_steps=2", "run.save_interval=0"]
    assert main([str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    final = tmp_path / "demo" / "spidr_demo" / "final.pt"
    ours = build_model(checkpoint=final).eval()
    release = bench_step.load_release(REFERENCE)
    with release.active():
        theirs = release.module("spidr.models").build_model(model_type="spidr", checkpoint=final).eval()
    wav = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(ours.get_intermediate_outputs(wav), theirs.get_intermediate_outputs(wav), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_resume_config_and_run_dir_types():
    resume = ResumeConfig(step=3, checkpoint=None, results=Path("m.jsonl"))
    assert resume.step == 3 and resume.checkpoint is None
    cfg = read_config(FIXTURES / "release_run" / "config.json")
    assert isinstance(cfg.run.dir, Path) and cfg.run.dir.is_absolute()
    assert json.loads((FIXTURES / "release_run" / "config.json").read_text())["run"]["model_type"] == "spidr"


def test_configs_the_release_accepts_load(tmp_path):
    from spidr.slurm import executor_parameters

    unusual = [
        'run.slurm_validation={"partition": "gpu", "time": 30}',  # no account: the job's or the default one
        "run.keep_latest=0",
        "run.save_interval=-1",
        "optimizer.lr=0",
        "optimizer.rsqrt_timescale=0",  # unused by the tristage schedule
        "masking.mask_prob=1.2",
        "model.codebook_decay=1.0",
        "data.min_sample_size=100",  # below the receptive field: see the next test
    ]
    cfg = read_config(REPO / "configs" / "demo.toml", [f"run.workdir={tmp_path}", *unusual])
    assert cfg.run.slurm_validation == {"partition": "gpu", "time": 30}
    params = executor_parameters(cfg.run.slurm_validation, "val")
    assert params["nodes"] == 1 and params["gpus_per_node"] == 1 and params["partition"] == "gpu"
    with pytest.raises(ConfigError, match=r"unknown key run\.slurm_validation\.acount; valid keys: account,"):
        read_config(REPO / "configs" / "demo.toml", ['run.slurm_validation={"acount": "a"}'])


def test_files_shorter_than_the_receptive_field_are_left_out_with_a_warning(tmp_path, caplog):
    from spidr.data.loader import TrainingData

    speech = REPO / "tests" / "data" / "speech"
    (tmp_path / "m.csv").write_text(
        "fileid,path,num_samples\n"
        f"short,{tmp_path / 'short.wav'},300\n"
        + "".join(f"{p.stem},{p},{54801}\n" for p in sorted(speech.glob("alice/*.wav"))[:2])
    )
    cfg = read_config(
        REPO / "configs" / "demo.toml",
        [f"run.workdir={tmp_path}", f"data.manifest={tmp_path / 'm.csv'}", "data.min_sample_size=100"],
    )
    with caplog.at_level("WARNING"):
        data = TrainingData(cfg.data, cfg.masking, cfg.model)
    assert "shorter than the model's receptive field (400 samples) though not shorter than data.min_sample_size" in (
        caplog.text
    )
    assert data.sampler.dropped == [0]


def test_environment_setup_as_the_release_and_as_our_trainer(monkeypatch):
    from spidr import environment

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.setenv(name, "")  # recorded, so that the exports below are undone after the test
        monkeypatch.delenv(name)
    env = environment.setup_distributed("cpu", init_single_process=False)  # our trainer: a lone process
    assert (env.rank, env.world_size, env.device.type) == (0, 1, "cpu")
    assert "MASTER_PORT" not in os.environ and not torch.distributed.is_initialized()
    found = environment.distributed_environment()  # the release's: exported for init_process_group
    assert isinstance(found, environment.DistributedEnvironment) and found.world_size == 1
    assert os.environ["MASTER_PORT"] == str(found.master_port) and os.environ["RANK"] == "0"
    env = environment.setup_distributed("cpu")  # the release's setup_distributed(): a group even for one process
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    finally:
        torch.distributed.destroy_process_group()
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[012-013]")
    monkeypatch.setattr(environment.shutil, "which", lambda _: None)  # no scontrol here
    monkeypatch.delenv("LOCAL_RANK")
    slurm = environment.read_distributed_environment()
    assert (slurm.global_rank, slurm.local_rank, slurm.world_size, slurm.master_addr) == (3, 1, 8, "gpu012")
    assert 20_000 <= slurm.master_port <= 60_000


def test_init_wandb_as_the_release_calls_it(tmp_path, monkeypatch):
    import types

    from spidr.train import init_wandb, wandb_run_id

    calls: list[tuple[str, dict]] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or types.SimpleNamespace(finish=lambda: None)
    fake.define_metric = lambda name, **kwargs: calls.append((name, kwargs))
    monkeypatch.setitem(sys.modules, "wandb", fake)  # wandb itself need not be installed for the test
    cfg = read_config(
        REPO / "configs" / "demo.toml",
        [f"run.workdir={tmp_path}", "run.wandb_name=lr=5e-4,bs=8", "run.wandb_mode=disabled"],
    )
    assert init_wandb(cfg) is not None  # disabled still initialises, so a client's wandb.log() is a no-op
    (_, kwargs), *metrics = calls
    assert kwargs["mode"] == "disabled" and kwargs["name"] == "lr=5e-4,bs=8" and kwargs["project"] == "demo"
    assert kwargs["id"] == wandb_run_id("lr=5e-4,bs=8") and not set(kwargs["id"]) & set(":;,#?/' ")
    assert kwargs["dir"] == str(tmp_path.resolve()) and (cfg.run.dir / "config.json").is_file()
    assert ("train/*", {"step_metric": "train/step"}) in metrics
    assert wandb_run_id("spidr_demo") == "spidr_demo" and wandb_run_id("a/b") != wandb_run_id("a:b")


def test_launch_with_submitit_passes_every_option_through(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from spidr import slurm

    seen: dict = {}

    class Executor:
        def __init__(self, folder):
            seen["folder"] = folder

        def update_parameters(self, **params):
            seen["params"] = params

        def batch(self):
            import contextlib

            return contextlib.nullcontext()

        def submit(self, fn, *args):
            seen.setdefault("jobs", []).append((fn, args))

    monkeypatch.setattr(submitit, "SlurmExecutor", Executor)
    config = slurm.SlurmConfig(account="a", nodes=2, gpus_per_node=4)
    config["exclude"] = "n7"  # not a SlurmConfig key: passed to submitit as the release does
    assert slurm.launch_with_submitit("job", [(print, ("x",))], tmp_path, config)
    assert seen["params"] == {
        "job_name": "job",
        "nodes": 2,
        "ntasks_per_node": 4,
        "gpus_per_node": 4,
        "account": "a",
        "exclude": "n7",
    }
    ((fn, args),) = seen["jobs"]
    assert args == ("x",) and hasattr(fn, "checkpoint")
    info = json.loads((tmp_path / "job" / "job-info.json").read_text())
    assert info["job_name"] == "job" and info["exclude"] == "n7"
    assert slurm.launch_with_submitit("job", [], tmp_path, config)  # a second launch gets a timestamped folder
    assert len(list(tmp_path.iterdir())) == 2
