"""The benchmark scripts run and measure the right things (never their timings): ``python -m benchmarks``,
bench_ops' and bench_step's suites, the reference release's loading, the FLOP count of project_400k, and the
dry run of gpu.sh."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spidr
from benchmarks import __main__ as bench_main
from benchmarks import bench_extract, bench_ops, bench_step, project_400k
from spidr.config import SpidRConfig
from spidr.models.components import num_frames

REPO = Path(__file__).resolve().parent.parent
# The reference release is optional: SPIDR_REFERENCE, else the wheel where the development machines keep it.
_CANDIDATES = [os.environ.get(bench_step.REFERENCE_ENV, ""), "/work/refwheel/spidr-0.2.0-py3-none-any.whl"]
REFERENCE = next((Path(p) for p in _CANDIDATES if p and Path(p).exists()), None)
needs_reference = pytest.mark.skipif(REFERENCE is None, reason="no reference release (set SPIDR_REFERENCE)")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != bench_step.REFERENCE_ENV}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


# ----------------------------------------------------------------------------- python -m benchmarks
def test_python_m_benchmarks_quick_ops(tmp_path):
    out = tmp_path / "all.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "ops", "--repeats", "1", "--json", str(out)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "GPU:" in lines[0] and "torch" in lines[0]  # the machine first
    assert result.stdout.count("### spidr.ops") == 3
    report = json.loads(out.read_text())
    assert report["machine"] == lines[0]
    assert [s["name"] for s in report["suites"]] == [
        "ops/assign+update",
        "ops/loss fwd+bwd",
        "ops/loss fwd+bwd, shared h",
    ]
    for suite in report["suites"]:
        assert suite["reference"] == "torch"
        names = [r["name"] for r in suite["rows"]]
        assert names[0] == "torch" and "release" in names and names[-1] == "floor"
        torch_row = suite["rows"][0]
        assert torch_row["ratio"] == pytest.approx(1.0)
        assert all("vs floor" in r["extra"] for r in suite["rows"])
    assert "TFLOP/s" in report["suites"][-1]["notes"][-1]  # the roofline note


def test_missing_suite_or_dependency_is_skipped(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_needs_dep.py").write_text("import a_module_nobody_installed  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(bench_main.SUITES, "ghost", "benchmarks.bench_ghost")
    monkeypatch.setitem(bench_main.SUITES, "needsdep", "bench_needs_dep")
    assert bench_main.main(["--only", "ghost", "needsdep", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "skipped: benchmarks/bench_ghost.py is not there" in out
    assert "skipped: needs the module 'a_module_nobody_installed'" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["skipped"]) == {"ghost", "needsdep"} and report["suites"] == []


def test_failing_suite_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_broken.py").write_text(
        "def run_suite(*, repeats=5, quick=False, device='cpu'):\n    raise RuntimeError('boom')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(bench_main.SUITES, "broken", "bench_broken")
    monkeypatch.setitem(bench_main.SUITES, "ghost", "benchmarks.bench_ghost")
    assert bench_main.main(["--only", "broken", "ghost"]) == 1
    out = capsys.readouterr().out
    assert "failed: RuntimeError('boom')" in out and "skipped:" in out


@pytest.mark.parametrize("module", [bench_main, bench_ops, bench_step, bench_extract, project_400k])
def test_help_explains(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and "--json" in text and len(text) > 800


# ----------------------------------------------------------------------------- bench_step
def test_step_suite_quick_without_release(monkeypatch):
    monkeypatch.delenv(bench_step.REFERENCE_ENV, raising=False)
    suite = bench_step.run_suite(quick=True, repeats=1)
    assert [r.name for r in suite.rows] == ["ours", "ours-torch"]
    assert suite.reference == "ours-torch"
    assert suite.rows[1].ratio == pytest.approx(1.0)
    assert any("`release`: no reference release given" in s for s in suite.skipped)
    ours = suite.rows[0]
    assert "spidr.ops backend `" in ours.note and ours.note.split("`")[1] in spidr.ops.backends("cpu")
    assert ours.extra["samples/step"] == 2 * 16000 and ours.extra["samples/s"] > 0
    loss_note = next(n for n in suite.notes if n.startswith("First-step loss"))
    assert "(agree" in loss_note
    assert "Skipped: `release`" in suite.markdown()


def test_step_rows_interleaved(monkeypatch):
    monkeypatch.delenv(bench_step.REFERENCE_ENV, raising=False)
    suite = bench_step.run_suite(quick=True, repeats=2, interleave=True)
    assert [(r.name, r.runs) for r in suite.rows] == [("ours", 2), ("ours-torch", 2)]
    assert any("interleaved" in n for n in suite.notes)
    assert "(agree" in next(n for n in suite.notes if n.startswith("First-step loss"))
    with pytest.raises(ValueError, match="interleave"):
        bench_step.run_suite(quick=True, interleave=True, compile_model=True)


def test_step_batch_is_masked_like_training():
    cfg = bench_step.quick_config()
    batch = bench_step.make_batch(cfg, 3, 16000, seed=1)
    frames = num_frames(16000, cfg.extractor_conv_layer_config)
    assert batch.waveforms.shape == (3, 16000) and batch.attention_mask is None
    assert batch.mask_indices.dtype == torch.int64 and batch.mask_indices.shape[0] == 3
    assert 0.3 * frames < batch.mask_indices.shape[1] < 0.8 * frames
    assert torch.equal(bench_step.make_batch(cfg, 3, 16000, seed=1).mask_indices, batch.mask_indices)


def test_step_profile_restores_what_it_wraps(monkeypatch):
    monkeypatch.delenv(bench_step.REFERENCE_ENV, raising=False)
    clip = torch.nn.utils.clip_grad_norm_
    setup = bench_step.prepare(
        quick=True, device="cpu", reference=None, compile_model=False, batch=None, utterance_samples=None,
        dtype=None, seed=0, want_release=False,
    )  # fmt: skip
    text = bench_step.profile(setup, ["ours"], steps=1, top_ops=0)
    assert torch.nn.utils.clip_grad_norm_ is clip
    for phase in ("extractor", "student", "teacher", "codebooks", "optimizer", "ema", "**step**"):
        assert f"| {phase} |" in text


def test_bad_reference_is_skipped_with_the_reason(tmp_path):
    with pytest.raises(bench_step.ReleaseError, match="does not exist"):
        bench_step.load_release(tmp_path / "nope.whl")
    with pytest.raises(bench_step.ReleaseError, match="no spidr/ package"):
        bench_step.load_release(tmp_path)
    with pytest.raises(bench_step.ReleaseError, match="our own spidr package"):
        bench_step.load_release(REPO)
    suite = bench_step.run_suite(quick=True, repeats=1, reference=tmp_path, rows=("ours-torch", "release"))
    assert [r.name for r in suite.rows] == ["ours-torch"]
    assert any("no spidr/ package" in s for s in suite.skipped)
    assert Path(spidr.__file__).resolve() == bench_step.OUR_FILE


@needs_reference
def test_release_loads_under_an_alias_and_ours_stays():
    ours_models = sys.modules["spidr.models"]
    release = bench_step.load_release(REFERENCE)
    assert sys.modules["spidr.models"] is ours_models
    assert Path(importlib.import_module("spidr").__file__).resolve() == bench_step.OUR_FILE
    assert release.version in ("0.2.0", "unknown")  # "unknown": a directory without dist-info
    rel_models = release.module("spidr.models")
    assert rel_models is not ours_models and str(release.entry) in rel_models.__file__
    with release.active():  # what the release's functions import at call time is the release's
        assert importlib.import_module("spidr.models.metrics").__file__.startswith(str(release.entry))
        assert sys.modules["spidr"].__file__.startswith(str(release.entry))
    assert sys.modules["spidr.models"] is ours_models
    ours_metrics = sys.modules.get("spidr.models.metrics")  # the release's module went back to its stash
    assert ours_metrics is None or Path(ours_metrics.__file__).resolve() == REPO / "spidr" / "models" / "metrics.py"


@needs_reference
def test_release_row_matches_our_first_step_loss():
    suite = bench_step.run_suite(quick=True, repeats=1, reference=REFERENCE)
    assert [r.name for r in suite.rows] == ["ours", "ours-torch", "release"]
    assert suite.reference == "release" and not suite.skipped
    assert suite.rows[2].note.startswith("spidr ") and " from " in suite.rows[2].note
    note = next(n for n in suite.notes if n.startswith("First-step loss"))
    assert "(agree" in note, note
    assert Path(spidr.__file__).resolve() == bench_step.OUR_FILE


# ----------------------------------------------------------------------------- bench_extract
def test_extract_suite_quick_without_release(monkeypatch):
    monkeypatch.delenv(bench_step.REFERENCE_ENV, raising=False)
    suite = bench_extract.run_suite(quick=True)
    assert [r.name for r in suite.rows] == ["per-file", "per-file, stop at layer", "spidr.extract"]
    assert suite.reference == "per-file" and suite.rows[0].ratio == pytest.approx(1.0)
    assert all(r.runs == 1 and r.extra["vs per-file (paired)"] > 0 for r in suite.rows)
    assert any("`per-file, release`: no reference release given" in s for s in suite.skipped)
    assert "checked equal" in suite.notes[0]


@needs_reference
def test_extract_suite_release_loop_row():
    suite = bench_extract.run_suite(quick=True, reference=REFERENCE)
    names = [r.name for r in suite.rows]
    assert names == ["per-file", "per-file, stop at layer", "per-file, release", "spidr.extract"]
    assert not suite.skipped
    release_row = suite.rows[2]
    assert release_row.note.startswith("spidr ") and release_row.extra["vs release loop (paired)"] == 1
    assert Path(spidr.__file__).resolve() == bench_step.OUR_FILE


# ----------------------------------------------------------------------------- project_400k
def test_student_flops_per_frame_match_a_hand_count_for_one_layer():
    cfg = SpidRConfig(encoder_num_layers=1, num_codebooks=1)
    utterance, samples = 64_000, 3 * 64_000
    flops = project_400k.count_flops(cfg, samples, utterance_samples=utterance, mask_fraction=0.5)
    t = num_frames(utterance, cfg.extractor_conv_layer_config)
    d, f = 768, 3072
    per_frame = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * f + 4 * t * d  # qkv, proj, ffn; scores + weighted sum
    assert flops["student.layers.forward"] / (3 * t) == pytest.approx(per_frame)
    assert flops["teacher.layers.forward"] == flops["student.layers.forward"]
    pos = 5 * 2 * 19 * (d // 16) * d  # 5 grouped convs, kernel 95 // 5 = 19, 16 groups
    assert flops["student.pos_conv.forward"] / (3 * t) == pytest.approx(pos)
    heads = 2 * d * 256  # one head on the masked half of the frames
    assert flops["heads.forward"] / (3 * t * 0.5) == pytest.approx(heads)


def test_backward_is_twice_the_forward_of_trained_parts():
    flops = project_400k.count_flops(SpidRConfig())
    for part in ("extractor", "projection", "student.pos_conv", "student.layers", "heads"):
        assert flops[f"{part}.forward"] + flops[f"{part}.backward"] == pytest.approx(3 * flops[f"{part}.forward"])
    for part in ("teacher.pos_conv", "teacher.layers", "codebooks"):
        assert flops[f"{part}.backward"] == 0
    frozen = project_400k.count_flops(SpidRConfig(), extractor_frozen=True)
    assert frozen["extractor.backward"] == frozen["projection.backward"] == 0
    assert frozen["total"] < flops["total"]
    # base SpidR at 3.8 M samples: 19 x 12.5 s, 624 frames each; about 13 TFLOP per step
    assert 5e12 < flops["total"] < 3e13
    assert flops["total"] == pytest.approx(flops["forward"] + flops["backward"] + flops["optimizer"])
    layout = project_400k.batch_layout(SpidRConfig())
    assert layout.utterances == 19 and layout.frames == 624 and 0.45 < layout.mask_fraction < 0.6


def test_paper_mfu_and_projection(tmp_path, capsys):
    out = tmp_path / "p.json"
    project_400k.main(["--step-seconds", "0.5", "--samples", "1900000", "--gpus", "8", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| 16 x A100 | yes | 23 | 0.207 |" in text and "| 16 x H100 | no | 19 | 0.171 |" in text
    report = json.loads(out.read_text())
    for row in report["paper"]:
        assert 0.01 < row["mfu"] < 0.6
    projection = report["projection"]
    assert projection["step_seconds_at_3.8M"] == pytest.approx(1.0)
    assert projection["hours"] == pytest.approx(400_000 / 3600)
    assert projection["gpu_hours"] == pytest.approx(8 * 400_000 / 3600)
    assert math.isclose(projection["hours_at_paper_global_batch"], 2 * projection["hours"])


# ----------------------------------------------------------------------------- gpu.sh
@pytest.mark.slow
def test_gpu_sh_dry_run(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run", str(out)],
        cwd=REPO,
        env=_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pip install skipped" in result.stdout  # spidr is importable here
    for name in ("gpu.md", "gpu_tests.log", "ops.md", "step.md", "project_400k.md"):
        assert (out / name).stat().st_size > 0, name
    assert "collected" in (out / "gpu_tests.log").read_text()
    ops_report = json.loads((out / "ops.json").read_text())
    assert len(ops_report["suites"]) == 3  # assign+update, loss with h (C, N, D), loss with shared h
    step_report = json.loads((out / "step.json").read_text())
    assert [r["name"] for r in step_report["suites"][0]["rows"]] == ["ours", "ours-torch"]
    projection = json.loads((out / "project_400k.json").read_text())["projection"]
    assert projection is not None and projection["hours"] > 0
    summary = (out / "gpu.md").read_text()
    assert "DRY RUN" in summary and "## step" in summary and "### Projection" in summary
