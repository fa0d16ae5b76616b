"""What a user meets when things go wrong in training, data, configs, checkpoints and ops, and that nothing is lost.

Every case is provoked through the public API or the command line, as a user would meet it. Faults that need a
running training process (a non-finite loss, SIGKILL in the middle of a save, a signal at a known step) are
injected by a small test-only wrapper around ``spidr.train.main`` (``HOOKS`` below), never by production code.
Training runs use the demo config without its validation table, for speed, and compare their final weights with
one uninterrupted reference run: a resumed run must end bit-identical to it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import spidr.ops as ops
from spidr.config import ConfigError, DinoSRConfig, from_mapping, read_config
from spidr.data.audio import AudioError, load_audio
from spidr.data.loader import TrainingData
from spidr.data.manifests import ManifestError, read_entries
from spidr.models import (
    CheckpointError,
    build_model,
    dinosr_base_original,
    dinosr_base_reproduced,
    spidr_base,
)
from spidr.models.pretrained import load_checkpoint_file
from tests.conftest import REPO, load_fixture

DEMO = REPO / "configs" / "demo.toml"
SPEECH = REPO / "tests" / "data" / "speech"
MAX_STEPS = 6  # the reference run: checkpoints at steps 2 and 4, final.pt at 6
BASE = [
    "run.wandb_mode=disabled",
    f"optimizer.max_steps={MAX_STEPS}",
    "run.save_interval=2",
    "run.log_interval=1",
    "run.keep_latest=-1",
]

# Test-only fault injection: run as `python hooks.py CONFIG --set ...` with SPIDR_TEST_FAULT set to
#   nan:3,4            the training forward's loss is NaN on its 3rd and 4th calls
#   nan_from:3         ... on its 3rd call and every later one
#   pause_at_step:3    after logging step 3, touch SPIDR_TEST_MARKER and wait (60 s at most) for a signal
#   stall_save_at_step:4   the save of step 4 writes half its bytes, touches the marker and hangs (60 s)
HOOKS = """
import io
import os
import sys
import time
from pathlib import Path

import torch

kind, _, value = os.environ["SPIDR_TEST_FAULT"].partition(":")
marker = Path(os.environ.get("SPIDR_TEST_MARKER", os.devnull))

if kind in ("nan", "nan_from"):
    from spidr.models.dinosr import DinoSR

    calls = {int(v) for v in value.split(",")}
    forward, count = DinoSR.forward, [0]

    def nan_forward(self, *args, **kwargs):
        loss, ppl = forward(self, *args, **kwargs)
        if self.training:
            count[0] += 1
            if count[0] in calls or (kind == "nan_from" and count[0] >= min(calls)):
                loss = loss * float("nan")
        return loss, ppl

    DinoSR.forward = nan_forward
elif kind == "pause_at_step":
    from spidr.train import Trainer

    log = Trainer.log

    def pausing_log(self, record):
        log(self, record)
        if record["step"] == int(value) and "event" not in record:
            marker.touch()
            deadline = time.monotonic() + 60
            while self.stop.signal is None and time.monotonic() < deadline:
                time.sleep(0.01)

    Trainer.log = pausing_log
elif kind == "stall_save_at_step":
    save = torch.save

    def stalling_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == int(value):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            marker.touch()
            time.sleep(60)
        return save(obj, f, *args, **kwargs)

    torch.save = stalling_save
else:
    raise SystemExit(f"unknown SPIDR_TEST_FAULT {kind!r}")

from spidr.train import main

sys.exit(main(sys.argv[1:]))
"""


# --------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> dict[str, Path]:
    """The fast configs (the demo without validation; a DinoSR variant) and the fault-injection wrapper."""
    folder = tmp_path_factory.mktemp("tools")
    text = DEMO.read_text().split("[validation.speech]")[0]
    text = text.replace('manifest = "tests/data/speech/manifest.csv"', f'manifest = "{SPEECH / "manifest.csv"}"')
    (folder / "fast.toml").write_text(text)
    dinosr = "\n".join(line for line in text.splitlines() if not line.startswith("ema_timescale"))
    (folder / "fast_dinosr.toml").write_text(dinosr.replace('model_type = "spidr"', 'model_type = "dinosr"'))
    (folder / "hooks.py").write_text(HOOKS)
    return {"config": folder / "fast.toml", "dinosr": folder / "fast_dinosr.toml", "hooks": folder / "hooks.py"}


def command(
    tools: dict[str, Path], workdir: Path, *overrides: str, name: str = "run", fault: str | None = None
) -> list[str]:
    script = ["-m", "spidr.train"] if fault is None else [str(tools["hooks"])]
    cmd = [sys.executable, *script, str(tools["config"]), "--set", f"run.workdir={workdir}"]
    for override in [f"run.wandb_name={name}", *BASE, *overrides]:
        cmd += ["--set", override]
    return cmd


def environment(fault: str | None = None, marker: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPIDR_OPS_BACKEND")}
    if fault is not None:
        env["SPIDR_TEST_FAULT"] = fault
    if marker is not None:
        env["SPIDR_TEST_MARKER"] = str(marker)
    return env


def train(
    tools: dict[str, Path], workdir: Path, *overrides: str, name: str = "run", fault: str | None = None
) -> subprocess.CompletedProcess:
    cmd = command(tools, workdir, *overrides, name=name, fault=fault)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=environment(fault), timeout=300)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """The training processes a test starts; any still running at its end (a failed test) is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(
    processes: list[subprocess.Popen],
    tools: dict[str, Path],
    workdir: Path,
    *overrides: str,
    fault: str,
    marker: Path,
) -> tuple[subprocess.Popen, Path]:
    """A training process with a fault hook, its stderr going to a file (a full pipe would block it)."""
    stderr = workdir / f"stderr-{fault.replace(':', '-')}.txt"
    workdir.mkdir(parents=True, exist_ok=True)
    with stderr.open("w") as err:
        cmd = command(tools, workdir, *overrides, fault=fault)
        proc = subprocess.Popen(cmd, cwd=REPO, env=environment(fault, marker), stdout=subprocess.DEVNULL, stderr=err)
    processes.append(proc)
    return proc, stderr


def wait_for(path: Path, proc: subprocess.Popen, stderr: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the hooked run never reached {path.name}:\n{stderr.read_text()[-3000:]}")
        time.sleep(0.05)


def error_line(stderr: str) -> str:
    """The one `error: ...` line a refused or failed run prints."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_model(a: Path, b: Path) -> None:
    first, second = load(a)["model"], load(b)["model"]
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"{a} and {b} differ at {key}"


@pytest.fixture(scope="module")
def reference(tools, tmp_path_factory) -> Path:
    """An uninterrupted run to MAX_STEPS: step_2.pt, step_4.pt, final.pt."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train(tools, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "demo" / "run"


def copy_run(reference: Path, workdir: Path) -> Path:
    run = workdir / "demo" / "run"
    shutil.copytree(reference, run)
    return run


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16_000, *, float32: bool = False) -> Path:
    """A PCM16 (or float32) WAV of ``samples`` (frames,) or (frames, channels), without spidr's code."""
    samples = np.asarray(samples, dtype=np.float64)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if float32:
        data, code, width = samples.astype("<f4").tobytes(), 3, 4
    else:
        data, code, width = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes(), 1, 2
    fmt = struct.pack(
        "<HHIIHH", code, channels, sample_rate, sample_rate * channels * width, channels * width, 8 * width
    )
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def good_rows() -> list[str]:
    """The committed speech as manifest rows with absolute paths."""
    rows = (SPEECH / "manifest.csv").read_text().splitlines()[1:]
    return [row.replace(",alice/", f",{SPEECH}/alice/").replace(",bob/", f",{SPEECH}/bob/") for row in rows]


# --------------------------------------------------------------------------------------------------------------------
# 1. Bad audio while training: skipped, named, counted; the run goes on.


def test_bad_audio_is_skipped_named_and_counted_while_training(tools, tmp_path):
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad"
    bad.mkdir()
    utterance = (SPEECH / "alice" / "utt00.wav").read_bytes()
    reasons = {"missing.wav": "file not found"}
    (bad / "empty.wav").touch()
    reasons["empty.wav"] = "empty file (0 bytes)"
    (bad / "truncated.wav").write_bytes(utterance[: len(utterance) // 3])
    reasons["truncated.wav"] = "truncated WAV"
    (bad / "corrupt.flac").write_bytes(b"fLaC" + bytes(300))
    reasons["corrupt.flac"] = "corrupt or undecodable audio"
    write_wav(bad / "nothing.wav", np.zeros(0))
    reasons["nothing.wav"] = "no samples after decoding"
    write_wav(bad / "stereo.wav", 0.1 * rng.standard_normal((20_000, 2)))
    reasons["stereo.wav"] = "expected mono 16000 Hz audio, got 2 channel(s) at 16000 Hz"
    write_wav(bad / "8k.wav", 0.1 * rng.standard_normal(20_000), 8_000)
    reasons["8k.wav"] = "got 1 channel(s) at 8000 Hz (pass resample=True to convert)"
    samples = 0.1 * rng.standard_normal(20_000)
    samples[[5, 500]] = [np.nan, np.inf]
    write_wav(bad / "nan.wav", samples, float32=True)
    reasons["nan.wav"] = "2 NaN or infinite sample(s)"
    write_wav(bad / "short.wav", 0.1 * rng.standard_normal(300))  # the manifest below says 20000
    reasons["short.wav"] = "300 samples after decoding, fewer than the model's receptive field (400)"
    manifest = tmp_path / "manifest.csv"
    rows = good_rows() + [f"{Path(name).stem},{bad / name},20000" for name in reasons]
    manifest.write_text("fileid,path,num_samples\n" + "\n".join(rows) + "\n")
    before = {path.name: path.read_bytes() for path in bad.iterdir()}

    result = train(tools, tmp_path, f"data.manifest={manifest}", "run.max_bad_fraction=0.9", "optimizer.max_steps=8")

    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "Skipping bad audio file: " in line]
    for name, reason in reasons.items():
        named = [line for line in warnings if f"Skipping bad audio file: {bad / name}: " in line]
        assert named and reason in named[0], (name, named)
    run = tmp_path / "demo" / "run"
    last = log_records(run)[-1]
    final = load(run / "final.pt")
    assert last["step"] == final["step"] == 8
    assert last["bad_files"] >= len(reasons) and final["data"]["bad_files"] >= last["bad_files"]
    assert final["data"]["files_read"] > final["data"]["bad_files"]  # in the checkpoint: a restart keeps counting
    assert {path.name: path.read_bytes() for path in bad.iterdir()} == before  # bad input is never touched


@pytest.mark.parametrize(
    ("limit", "message"),
    [("0.01", "audio files read were unreadable, more than run.max_bad_fraction = 0.01"), ("1.0", "no usable batch")],
)
def test_a_manifest_of_unreadable_files_stops_the_run_at_once(tools, tmp_path, limit, message):
    manifest = tmp_path / "manifest.csv"
    rows = [row.replace(str(SPEECH), str(tmp_path / "gone")) for row in good_rows()]
    manifest.write_text("fileid,path,num_samples\n" + "\n".join(rows) + "\n")
    started = time.monotonic()
    result = train(tools, tmp_path, f"data.manifest={manifest}", f"run.max_bad_fraction={limit}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in error_line(result.stderr)
    assert time.monotonic() - started < 60  # it used to loop over empty epochs forever, deaf to SIGTERM
    assert not list((tmp_path / "demo" / "run").glob("*.pt"))


def test_the_bad_fraction_is_judged_once_enough_files_were_read(tmp_path):
    cfg = read_config(DEMO, [f"run.workdir={tmp_path}", f"data.manifest={SPEECH / 'manifest.csv'}"])
    data = TrainingData(cfg.data, cfg.masking, cfg.model, max_bad_fraction=0.2)
    assert data.judge_after == 10  # the whole manifest, as it holds fewer than 1000 files
    data.files_read, data.bad_files = 4, 1  # 25 % of a first batch: too early to judge
    data.check_bad_fraction(0.2)
    from spidr.train import TrainingError

    data.files_read, data.bad_files = 4, 3  # more bad files than 20 % of the 10 files: no need to read on
    with pytest.raises(TrainingError, match="3 of 4 audio files read were unreadable"):
        data.check_bad_fraction(0.2)
    data.files_read, data.bad_files = 10, 3
    with pytest.raises(TrainingError, match=r"more than run\.max_bad_fraction = 0\.2"):
        data.check_bad_fraction(0.2)
    data.files_read, data.bad_files = 1, 1
    with pytest.raises(TrainingError):  # 0 tolerates no bad file at all
        data.check_bad_fraction(0.0)


# --------------------------------------------------------------------------------------------------------------------
# 2. Bad manifests: refused before training, naming the manifest, the line and the column.


def make_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.add(SPEECH / "alice" / "utt00.wav", arcname="a/utt00.wav")
    return path


@pytest.mark.parametrize(
    ("table", "content", "where", "message"),
    [
        ("data", "utt00,a.wav,12\n", "line 1", "line 1 must be the header fileid,path,num_samples"),
        (
            "data",
            "fileid,path,num_samples,archive,byte_offset,byte_size\nu,a/utt00.wav,20000,s.tar,1000,9999999\n",
            "line 2, column 'byte_size'",
            "bytes 1000..10000999 lie outside the archive",
        ),
        ("validation.dev", "fileid,path\na,a.wav\n", "line 1, column 'num_samples'", "missing column"),
    ],
    ids=["wrong-header", "outside-archive", "validation-missing-column"],
)
def test_a_bad_manifest_is_refused_before_training(tools, tmp_path, table, content, where, message):
    make_tar(tmp_path / "s.tar")
    manifest = tmp_path / "bad.csv"
    manifest.write_text(content)
    result = train(tools, tmp_path / "runs", f"{table}.manifest={manifest}")
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert line.startswith(f"error: {manifest}, {where}: ") and message in line, line
    assert not (tmp_path / "runs").exists()
    assert manifest.read_text() == content


# --------------------------------------------------------------------------------------------------------------------
# 3. Bad configs: refused before anything starts, in one line naming table.key, the value and what was expected.


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.log_interval=often", "run.log_interval = 'often' has the wrong type: expected int"),
        ("optimizer.max_steps=-5", "optimizer.max_steps = -5 is invalid: expected a non-negative integer"),
        ("masking.mask_prob=-0.5", "masking.mask_prob = -0.5 is invalid: expected a non-negative number"),
        ("model.num_codebooks=5", "model.num_codebooks = 5 is invalid: expected at most encoder_num_layers (4)"),
    ],
)
def test_a_bad_config_is_refused_in_one_line_before_anything_starts(tools, tmp_path, override, message):
    result = train(tools, tmp_path, override)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr) == result.stderr.strip()  # nothing else printed
    assert result.stderr.startswith(f"error: {tools['config']}: {message}"), result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no checkpoint


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.random_seed=4294967296"], r"run\.random_seed = 4294967296 is invalid: expected an integer in \[0, "),
        (["data.random_seed=-3"], r"data\.random_seed = -3 is invalid: expected an integer in \[0, 4294967295\]"),
        (["data.prefetch_factor=0"], r"data\.prefetch_factor = 0 is invalid: expected a positive integer"),
        (
            ["data.max_sample_size=300"],
            r"data\.min_sample_size = 16000 is invalid: expected at most data\.max_sample_",
        ),
        (
            ["data.min_sample_size=100", "data.max_sample_size=300"],
            r"data\.max_sample_size = 300 is invalid: expected at least the model's receptive field \(400 samples",
        ),
        (["model.ema_timescale=0"], r"model\.ema_timescale = 0\.0 is invalid: expected a positive number"),
        (
            ["masking.mask_selection=normal", "masking.mask_other=-1"],
            r"masking\.mask_other = -1\.0 is invalid: expected a non-negative standard deviation with mask_sel",
        ),
        (["optimizer.lr=Infinity"], r"optimizer\.lr = inf is invalid: expected a finite number"),
        (["optimizer.betas=[0.9, NaN]"], r"optimizer\.betas\[1\] = nan is invalid: expected a finite number"),
        (
            ["masking.mask_selection=uniform", "masking.mask_other=21"],
            r"masking\.mask_other = 21\.0 is invalid: expected at most 2 \* masking\.mask_length \(10\) with",
        ),
        (
            [
                "validation.dev.manifest=dev.csv",
                "validation.dev.min_sample_size=10",
                "validation.dev.max_sample_size=300",
            ],
            r"validation\.dev\.max_sample_size = 300 is invalid: expected at least the model's receptive field \(400",
        ),
        (
            ["validation.dev.manifest=dev.csv", "validation.dev.max_sample_size=399"],
            r"validation\.dev\.min_sample_size = 2000 is invalid: expected at most validation\.dev\.max_sample_size",
        ),
    ],
)
def test_more_out_of_range_values_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(str(DEMO))}: {message}"):
        read_config(DEMO, [f"run.workdir={tmp_path}", *overrides])


def test_text_that_is_not_utf8_is_refused_naming_its_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"fileid,path,num_samples\na,a\xff.wav,3\n")
    with pytest.raises(
        ManifestError, match=rf"^{re.escape(str(manifest))}, line 2: not UTF-8 text \(byte 0xff at offset 27"
    ):
        read_entries(manifest)
    config = tmp_path / "c.toml"
    config.write_bytes(b'[run]\nworkdir = "\xe9"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: not UTF-8 text \(line 2, byte 0xe9\)"):
        read_config(config)


def test_resampling_refuses_an_implausible_sample_rate(tmp_path):
    path = write_wav(tmp_path / "1hz.wav", np.zeros(16_000), sample_rate=1)  # a corrupt header: 16000 s of audio
    with pytest.raises(
        AudioError, match=rf"^{re.escape(str(path))}: implausible sample rate of 1 Hz \(corrupt header\?\)"
    ):
        load_audio(path, resample=True)
    with pytest.raises(AudioError, match=r"got 1 channel\(s\) at 1 Hz \(pass resample=True to convert\)"):
        load_audio(path)


# --------------------------------------------------------------------------------------------------------------------
# 4. Checkpoints: unreadable, unsafe, of another model, or not fitting: clear errors, nothing loaded, nothing lost.


class CodeOnLoad:
    """Unpickling this calls ``open(marker, "w")``: loading it must never create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable, tuple[str, str]]:
        return (open, (self.marker, "w"))


def write_unsafe(path: Path, marker: Path, layout: str) -> Path:
    payload = (
        {"model": CodeOnLoad(marker)} if layout != "tensor" else {"model": {"mask_embedding": CodeOnLoad(marker)}}
    )
    if layout == "plain-pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("layout", ["torch-zip", "plain-pickle", "tensor"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tmp_path, layout):
    marker = tmp_path / "marker"
    path = write_unsafe(tmp_path / "evil.pt", marker, layout)
    loaders: dict[str, Callable[[], object]] = {
        "load_checkpoint_file": lambda: load_checkpoint_file(path),
        "build_model": lambda: build_model(checkpoint=path, model_type="spidr"),
        "spidr_base": lambda: spidr_base(checkpoint=path),
        "dinosr_base_reproduced": lambda: dinosr_base_reproduced(checkpoint=path),
        "dinosr_base_original": lambda: dinosr_base_original(checkpoint=path),
        "torch.hub": lambda: torch.hub.load(str(REPO), "spidr_base", source="local", checkpoint=path),
    }
    for name, loader in loaders.items():
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} cannot be loaded safely") as info:
            loader()
        assert "weights_only=True refuses" in str(info.value), name
        assert not marker.exists(), name


def test_training_refuses_unsafe_checkpoints_to_resume_or_initialise_from(tools, tmp_path):
    marker = tmp_path / "marker"
    evil = write_unsafe(tmp_path / "evil.pt", marker, "torch-zip")
    run = tmp_path / "resume" / "demo" / "run"
    run.mkdir(parents=True)
    shutil.copy(evil, run / "step_100.pt")
    resumed = train(tools, tmp_path / "resume")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    line = error_line(resumed.stderr)
    assert f"cannot resume: {run / 'step_100.pt'} cannot be loaded safely" in line
    assert f"Move step_100.pt out of {run} to start from scratch" in line
    assert sorted(p.name for p in run.iterdir()) == ["step_100.pt"]  # kept, and nothing written beside it

    initialised = train(tools, tmp_path / "init", f"run.init_ckpt={evil}")
    assert initialised.returncode == 2, initialised.stderr[-3000:]
    assert f"{evil} cannot be loaded safely" in error_line(initialised.stderr)
    assert not (tmp_path / "init").exists()
    assert not marker.exists()


def test_a_truncated_newest_checkpoint_stops_the_restart_and_loses_nothing(tools, tmp_path, reference):
    run = copy_run(reference, tmp_path)
    (run / "final.pt").write_bytes((reference / "final.pt").read_bytes()[:100_000])
    refused = train(tools, tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = error_line(refused.stderr)
    assert f"{run / 'final.pt'} is not a readable torch checkpoint (truncated or corrupt?)" in line
    assert f"Move final.pt out of {run} to resume from step_4.pt" in line
    for name in ("step_2.pt", "step_4.pt", "config.json", "log.jsonl"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name

    (run / "final.pt").rename(tmp_path / "damaged.pt")  # what the message says to do
    resumed = train(tools, tmp_path)  # back to MAX_STEPS, from step_4.pt
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {run / 'step_4.pt'} at step 4" in resumed.stderr
    assert_same_model(run / "final.pt", reference / "final.pt")


@pytest.mark.parametrize(
    ("config", "override", "messages"),
    [
        ("dinosr", "run.keep_latest=-1", ["final.pt holds a 'spidr' model, but run.model_type = 'dinosr'"]),
        (
            "config",
            "model.encoder_ff_interm_features=128",
            [
                "final.pt does not fit SpidR(SpidRConfig): 24 shape mismatch(es): ",
                "student.layers.0.feed_forward.intermediate_dense.weight (checkpoint (192, 96), model (128, 96))",
                "(and 19 more)",
            ],
        ),
    ],
    ids=["another-model-type", "another-model-size"],
)
def test_resuming_with_another_model_is_refused_and_keeps_the_run(
    tools, tmp_path, reference, config, override, messages
):
    run = copy_run(reference, tmp_path)
    cmd = command({**tools, "config": tools[config]}, tmp_path, override)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=environment(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result.stderr)
    for message in messages:
        assert message in line, line
    for path in reference.iterdir():  # config.json still describes the checkpoints beside it
        assert (run / path.name).read_bytes() == path.read_bytes(), path.name


def test_loading_another_model_names_the_mismatch(tmp_path, reference):
    with pytest.raises(ConfigError, match=r"describes a 'spidr' model, but model_type='dinosr' was asked for"):
        build_model(checkpoint=reference / "final.pt", model_type="dinosr")
    alone = tmp_path / "final.pt"  # a training checkpoint copied without its config.json
    shutil.copy(reference / "final.pt", alone)
    fields = json.loads((reference / "config.json").read_text())["model"]
    small = from_mapping(DinoSRConfig, {k: v for k, v in fields.items() if not k.startswith("ema_t")}, where="model")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(alone))} holds a 'spidr' model, not a 'dinosr' one"):
        build_model(checkpoint=alone, cfg=small)
    base = r"does not fit SpidR\(SpidRConfig\): \d+ missing key\(s\): .*more\); \d+ shape mismatch\(es\): .*more\)$"
    with pytest.raises(CheckpointError, match=base):
        spidr_base(checkpoint=alone)  # the demo's small weights against the base model
    fairseq = tmp_path / "dinosr.ckpt"
    torch.save(load_fixture("dinosr_fairseq_small.pt")["fairseq_checkpoint"], fairseq)
    with pytest.raises(
        CheckpointError, match=r"does not fit DinoSR\(DinoSRConfig\): \d+ missing key\(s\): .*; \d+ unexp"
    ):
        build_model(checkpoint=fairseq, model_type="dinosr")
    with pytest.raises(CheckpointError, match=r"is not an original DinoSR \(fairseq\) checkpoint"):
        dinosr_base_original(checkpoint=alone)


# --------------------------------------------------------------------------------------------------------------------
# 5. Training faults: non-finite steps, SIGKILL in the middle of a save, SIGTERM/SIGUSR1, a full disk.


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_nonfinite_step_changes_nothing_and_training_goes_on(tmp_path, dtype):
    from types import SimpleNamespace

    from spidr.train import Env, Trainer

    cfg = read_config(DEMO, [f"run.workdir={tmp_path}", f"optimizer.dtype={dtype}", "run.max_nonfinite_steps=30"])
    trainer = Trainer(cfg, Env())
    mask = torch.arange(10).expand(2, -1).contiguous()
    nan = SimpleNamespace(waveforms=torch.full((2, 16_000), float("nan")), attention_mask=None, mask_indices=mask)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    scheduler, scale = trainer.scheduler.state_dict(), trainer.scaler.get_scale()

    assert trainer.train_step(nan) is None
    after = trainer.model.state_dict()
    for key, value in before.items():  # codebooks and teacher (EMA) included
        assert torch.equal(value, after[key]), key
    assert not trainer.optimizer.state and trainer.scheduler.state_dict() == scheduler
    assert trainer.step == 0 and trainer.counters["skipped_steps"] == 1 and trainer.nonfinite_in_a_row == 1
    assert trainer.scaler.get_scale() == scale  # a non-finite loss leaves the float16 scaler as it was too

    good = SimpleNamespace(waveforms=torch.randn(2, 16_000), attention_mask=None, mask_indices=mask)
    for _ in range(20):  # float16: a few more overflows may come before the scale is low enough
        metrics = trainer.train_step(good)
        if metrics is not None:
            break
    assert metrics is not None and np.isfinite(metrics["loss"]) and trainer.step == 1
    assert trainer.nonfinite_in_a_row == 0
    if dtype == "float16":
        # A finite loss whose scaled gradients overflow is the scaler's signal, not a fault: the step is skipped
        # and the scale halves, as GradScaler does, so that float16 training finds a scale that fits.
        trainer.scaler.update(2.0**100)
        assert trainer.train_step(good) is None and trainer.step == 1
        assert trainer.scaler.get_scale() == 2.0**99


def test_nonfinite_steps_are_skipped_and_logged_and_the_run_goes_on(tools, tmp_path, reference):
    result = train(tools, tmp_path, fault="nan:3,4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Non-finite loss or gradient at step 3: step skipped" in result.stderr
    records = log_records(tmp_path / "demo" / "run")
    skipped = [r for r in records if r.get("event") == "nonfinite_step_skipped"]
    assert [(r["step"], r["skipped_steps"], r["nonfinite_in_a_row"]) for r in skipped] == [(2, 1, 1), (2, 2, 2)]
    assert records[-1]["step"] == MAX_STEPS and records[-1]["skipped_steps"] == 2
    assert load(tmp_path / "demo" / "run" / "final.pt")["step"] == MAX_STEPS


def test_too_many_nonfinite_steps_stop_the_run_keeping_the_last_good_state(tools, tmp_path, reference):
    result = train(tools, tmp_path, "run.max_nonfinite_steps=3", fault="nan_from:3")
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert "3 consecutive steps with a non-finite loss or gradient (run.max_nonfinite_steps = 3)" in line
    run = tmp_path / "demo" / "run"
    events = [r for r in log_records(run) if r.get("event") == "nonfinite_step_skipped"]
    assert [r["nonfinite_in_a_row"] for r in events] == [1, 2, 3]
    assert sorted(p.name for p in run.glob("*.pt")) == ["step_2.pt"]
    assert load(run / "step_2.pt")["step"] == 2
    assert_same_model(run / "step_2.pt", reference / "step_2.pt")  # the skipped steps changed nothing


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_the_rerun_finishes(
    tools, tmp_path, reference, processes
):
    marker = tmp_path / "saving"
    proc, stderr = start(processes, tools, tmp_path, fault="stall_save_at_step:4", marker=marker)
    wait_for(marker, proc, stderr)
    run = tmp_path / "demo" / "run"
    (partial,) = run.glob(".step_4.pt.*.tmp")
    assert 0 < partial.stat().st_size < (reference / "step_4.pt").stat().st_size
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert sorted(p.name for p in run.glob("*.pt")) == ["step_2.pt"]
    assert load(run / "step_2.pt")["step"] == 2

    rerun = train(tools, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Removed {partial}, left by a save that was interrupted" in rerun.stderr
    assert f"Resumed from {run / 'step_2.pt'} at step 2" in rerun.stderr
    assert not list(run.glob(".*.tmp"))
    assert_same_model(run / "final.pt", reference / "final.pt")


@pytest.mark.parametrize(
    ("sig", "keep_latest", "kept"),
    [(signal.SIGTERM, 1, ["step_3.pt"]), (signal.SIGUSR1, 0, ["step_2.pt", "step_3.pt"])],
    ids=["SIGTERM", "SIGUSR1"],
)
def test_a_signal_saves_and_exits_and_the_rerun_resumes_exactly(
    tools, tmp_path, reference, processes, sig, keep_latest, kept
):
    marker = tmp_path / "at_step_3"
    overrides = [f"run.keep_latest={keep_latest}"]
    proc, stderr = start(processes, tools, tmp_path, *overrides, fault="pause_at_step:3", marker=marker)
    wait_for(marker, proc, stderr)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, stderr.read_text()[-3000:]
    assert f"Received signal {int(sig)}: saving and exiting" in stderr.read_text()
    run = tmp_path / "demo" / "run"
    assert sorted(p.name for p in run.glob("*.pt")) == kept  # keep_latest = 1 keeps the one just saved; 0 keeps all
    assert load(run / "step_3.pt")["step"] == 3
    if sig == signal.SIGUSR1:  # SIGTERM's save and exit are also covered by test_train.py
        rerun = train(tools, tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"Resumed from {run / 'step_3.pt'} at step 3" in rerun.stderr
        assert_same_model(run / "final.pt", reference / "final.pt")


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot provoke a full disk with a small tmpfs")
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({result.stderr.decode().strip()})")


def test_a_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint(tools, tmp_path, reference):
    disk = tmp_path / "disk"
    size = (reference / "step_2.pt").stat().st_size
    mount_tmpfs(disk, f"{size * 3 // 2 // 1024}k")  # room for one checkpoint, not two
    try:
        full = train(tools, disk)
        run = disk / "demo" / "run"
        assert full.returncode == 1, full.stderr[-3000:]
        line = error_line(full.stderr)
        assert f"could not save checkpoint {run / 'step_4.pt'}: [Errno 28] No space left on device" in line
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "log.jsonl", "step_2.pt"]  # no temporary
        assert_same_model(run / "step_2.pt", reference / "step_2.pt")

        subprocess.run(["mount", "-o", f"remount,size={size * 4 // 1024}k", str(disk)], check=True)
        rerun = train(tools, disk)  # once there is room again, the run goes on from step 2
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"Resumed from {run / 'step_2.pt'} at step 2" in rerun.stderr
        assert_same_model(run / "final.pt", reference / "final.pt")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------------------------------------------------------------------
# 7. Ops: bad arguments raise Python exceptions naming the argument; the C++ entry points check theirs.


def op_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(2, 5, 4, generator=g),
        "codebooks": torch.randn(2, 3, 4, generator=g),
        "counts": torch.rand(2, 3, generator=g) + 1,
        "labels": torch.randint(0, 3, (2, 5), generator=g),
        "h": torch.randn(5, 4, generator=g),
        "bias": torch.randn(2, 3, generator=g),
    }


BAD_OP_CALLS = {
    "device": (
        lambda t: ops.assign_codes(t["x"], t["codebooks"].to("meta"), t["counts"]),
        ValueError,
        r"all tensors must be on the same device: x on cpu, codebooks on meta, counts on cpu",
    ),
    "dtype-labels": (
        lambda t: ops.codebook_update_(t["codebooks"], t["counts"], t["x"], t["labels"].int(), 0.5),
        TypeError,
        r"labels must have dtype int64; got int32",
    ),
    "dtype-h": (
        lambda t: ops.masked_prediction_loss(t["h"].long(), t["codebooks"], t["bias"], t["labels"]),
        TypeError,
        r"h must be a floating-point tensor",
    ),
    "shape-counts": (
        lambda t: ops.assign_codes(t["x"], t["codebooks"], t["counts"].t()),
        ValueError,
        r"counts must have shape \(C=2, K=3\) to match codebooks, got \(3, 2\)",
    ),
    "no-codewords": (
        lambda t: ops.codebook_update_(t["codebooks"][:, :0], t["counts"][:, :0], t["x"], t["labels"], 0.5),
        ValueError,
        r"codebooks must hold at least one codeword",
    ),
    "no-heads": (
        lambda t: ops.masked_prediction_loss(t["h"], t["codebooks"][:0], t["bias"][:0], t["labels"][:0]),
        ValueError,
        r"weight must hold at least one head \(C > 0\)",
    ),
    "label-range-update": (
        lambda t: ops.codebook_update_(t["codebooks"], t["counts"], t["x"], t["labels"] + 3, 0.5),
        ValueError,
        r"labels must be in \[0, K=3\), got values in \[3, 5\]",
    ),
    "label-range-loss": (
        lambda t: ops.masked_prediction_loss(t["h"], t["codebooks"], t["bias"], t["labels"] - 1),
        ValueError,
        r"labels must be in \[0, K=3\), got values in \[-1, 1\]",
    ),
    "decay-type": (
        lambda t: ops.codebook_update_(t["codebooks"], t["counts"], t["x"], t["labels"], "fast"),
        TypeError,
        r"decay must be a number, got str",
    ),
}


@pytest.mark.parametrize("backend", ops.backends("cpu"))
@pytest.mark.parametrize("case", list(BAD_OP_CALLS))
def test_ops_name_the_bad_argument_and_change_nothing(backend, case):
    call, error, message = BAD_OP_CALLS[case]
    inputs = op_inputs()
    saved = {name: value.clone() for name, value in inputs.items()}
    with ops.use_backend(backend), pytest.raises(error, match=message):
        call(inputs)
    for name, value in inputs.items():
        assert torch.equal(value, saved[name]), name


needs_cpp = pytest.mark.skipif("cpp" not in ops.backends("cpu"), reason="the compiled extension is not built")

BAD_CPP_CALLS = {
    "assign-x-rank": (lambda S, t: S.assign_codes(t["x"][0], t["codebooks"], t["counts"]), r"x must be \(C, N, D\)"),
    "assign-x-int": (lambda S, t: S.assign_codes(t["x"].int(), t["codebooks"], t["counts"]), "x must be float32"),
    "assign-codebooks-float64": (
        lambda S, t: S.assign_codes(t["x"], t["codebooks"].double(), t["counts"]),
        "codebooks must be float32, got Double",
    ),
    "assign-no-codewords": (
        lambda S, t: S.assign_codes(t["x"], t["codebooks"][:, :0], t["counts"][:, :0]),
        "at least one codeword",
    ),
    "assign-counts": (lambda S, t: S.assign_codes(t["x"], t["codebooks"], t["counts"].t()), r"counts must be \(C=2"),
    "sums-int32-labels": (lambda S, t: S.segment_sums(t["x"], t["labels"].int(), 3), "labels must be int64, got Int"),
    "sums-label-range": (lambda S, t: S.segment_sums(t["x"], t["labels"] + 3, 3), r"labels must be in \[0, 3\)"),
    "sums-label-shape": (lambda S, t: S.segment_sums(t["x"], t["labels"][:1], 3), r"labels must be \(C, N\)"),
    "sums-no-codewords": (lambda S, t: S.segment_sums(t["x"], t["labels"], 0), "num_codewords must be positive"),
    "loss-int32-labels": (
        lambda S, t: S.mpl_forward(t["h"], t["codebooks"], t["bias"], t["labels"].int(), True),
        "labels must be int64",
    ),
    "loss-no-heads": (
        lambda S, t: S.mpl_forward(t["h"], t["codebooks"][:0], t["bias"][:0], t["labels"][:0], True),
        r"at least one head \(C > 0\)",
    ),
    "loss-h-rank": (
        lambda S, t: S.mpl_forward(t["h"][0], t["codebooks"], t["bias"], t["labels"], True),
        r"h must be \(N, D\) or \(C, N, D\)",
    ),
    "loss-label-range": (
        lambda S, t: S.mpl_forward(t["h"], t["codebooks"], t["bias"], t["labels"] + 3, False),
        r"labels must be in \[0, 3\)",
    ),
    "backward-scalar-h": (
        lambda S, t: S.mpl_backward(
            torch.ones(5),
            torch.tensor(1.0),
            t["codebooks"],
            t["bias"],
            t["labels"],
            torch.empty(0),
            torch.empty(0),
            torch.empty(0),
        ),
        r"h must be \(N, D\) or \(C, N, D\)",
    ),
    "backward-grad-shape": (
        lambda S, t: S.mpl_backward(
            torch.ones(3),
            t["h"],
            t["codebooks"],
            t["bias"],
            t["labels"],
            torch.empty(0),
            torch.empty(0),
            torch.empty(0),
        ),
        r"grad_loss must be \(N=5,\)",
    ),
    "backward-grad-dtype": (
        lambda S, t: S.mpl_backward(
            torch.ones(5, dtype=torch.int64),
            t["h"],
            t["codebooks"],
            t["bias"],
            t["labels"],
            torch.empty(0),
            torch.empty(0),
            torch.empty(0),
        ),
        "grad_loss must be floating point",
    ),
    "backward-saved-dtype": (
        lambda S, t: S.mpl_backward(
            torch.ones(5), t["h"], t["codebooks"], t["bias"], t["labels"], t["h"].double(), t["codebooks"], t["bias"]
        ),
        "the saved gradients must have the dtypes of h, weight and bias",
    ),
}


@needs_cpp
@pytest.mark.parametrize("case", list(BAD_CPP_CALLS))
def test_cpp_entry_points_refuse_bad_inputs_with_a_python_exception(case):
    call, message = BAD_CPP_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        call(torch.ops.spidr, op_inputs())


@needs_cpp
def test_cpp_entry_points_take_unusual_but_valid_inputs():
    S, t = torch.ops.spidr, op_inputs()
    x_t = t["x"].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    assert not x_t.is_contiguous()
    assert torch.equal(
        S.assign_codes(x_t, t["codebooks"], t["counts"]), S.assign_codes(t["x"], t["codebooks"], t["counts"])
    )
    assert S.assign_codes(t["x"][:, :0], t["codebooks"], t["counts"]).shape == (2, 0)
    assert S.assign_codes(t["x"][:0], t["codebooks"][:0], t["counts"][:0]).shape == (0, 5)
    count, memory = S.segment_sums(t["x"][:0], t["labels"][:0], 3)  # C = 0, N = 5: nothing to sum
    assert count.shape == (0, 3) and memory.shape == (0, 3, 4)
    count, memory = S.segment_sums(t["x"][:, :0], t["labels"][:, :0], 3)
    assert not count.any() and not memory.any()
    labels_t = t["labels"].t().contiguous().t()
    assert torch.equal(S.segment_sums(t["x"], labels_t, 3)[1], S.segment_sums(t["x"], t["labels"], 3)[1])
    loss, mean_probs, *grads = S.mpl_forward(t["h"][:0], t["codebooks"], t["bias"], t["labels"][:, :0], True)
    assert loss.shape == (0,) and not mean_probs.any() and grads[0].shape == (0, 4)
    # saved gradients of the wrong shapes are recomputed, never returned as the gradients
    grad_h, grad_w, grad_b = S.mpl_backward(
        torch.ones(5), t["h"], t["codebooks"], t["bias"], t["labels"], torch.zeros(7), torch.zeros(1), torch.zeros(2)
    )
    expected = S.mpl_forward(t["h"], t["codebooks"], t["bias"], t["labels"], True)[2:]
    assert grad_h.shape == t["h"].shape and grad_w.shape == t["codebooks"].shape and grad_b.shape == t["bias"].shape
    for got, want in zip((grad_h, grad_w, grad_b), expected, strict=True):
        torch.testing.assert_close(got, want)
