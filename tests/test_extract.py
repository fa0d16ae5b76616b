"""python -m spidr.extract: batched = per-file, chunking, resuming, units, bad files, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spidr.data.audio import load_audio
from spidr.extract import Extractor, extract, list_inputs, plan_pieces
from spidr.models.pretrained import build_model
from tests.conftest import REPO, load_fixture

SPEECH = REPO / "tests" / "data" / "speech"
WAVS = sorted(SPEECH.glob("*/*.wav"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The small SpidR fixture saved as a local checkpoint with config.json beside it."""
    fixture = load_fixture("spidr_small.pt")
    folder = tmp_path_factory.mktemp("model")
    torch.save(fixture["state_dict"], folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({"model_type": "spidr", "model": fixture["config"]}))
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return build_model(checkpoint=model_dir / "model.pt")


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, width: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def write_float_wav(path: Path, samples: np.ndarray) -> Path:
    """A 32-bit float WAV (format 3), which can hold NaN."""
    data = samples.astype("<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
    fmt += (64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    return path


def per_file(model, path: Path, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model.get_intermediate_outputs(load_audio(path, normalize=True)[None])[layer - 1][0]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spidr.extract", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_batched_outputs_equal_per_file(tmp_path, model, packed, monkeypatch):
    # 15 s per batch: several files of different lengths per batch, so most rows are padded (or packed).
    assert Extractor(model, [1]).packed  # the CPU default for a layer-norm extractor
    monkeypatch.setattr(Extractor, "packed", property(lambda self: packed))
    summary = extract(
        SPEECH, tmp_path, model="small", loaded_model=model, layers="1,4", batch_seconds=15, progress=False
    )
    assert summary.extracted == len(WAVS) and not summary.errors
    for wav in WAVS:
        record = torch.load(tmp_path / wav.relative_to(SPEECH).with_suffix(".pt"), weights_only=True)
        assert record["format"] == "spidr.extract/1" and record["layers"] == [1, 4]
        assert record["source"] == str(wav.relative_to(SPEECH)) and record["frame_rate"] == 50
        for layer in (1, 4):
            expected = per_file(model, wav, layer)
            got = record["features"][layer]
            assert got.dtype == torch.float32 and got.shape == expected.shape == (record["frames"], 64)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_bfloat16_features_are_stored_as_bfloat16_and_close(tmp_path, model, packed, monkeypatch):
    monkeypatch.setattr(Extractor, "packed", property(lambda self: packed))
    summary = extract(
        SPEECH,
        tmp_path,
        model="small",
        loaded_model=model,
        layers="4",
        batch_seconds=15,
        dtype="bfloat16",
        progress=False,
    )
    assert summary.extracted == len(WAVS) and not summary.errors
    for wav in WAVS[:3]:
        got = torch.load(tmp_path / wav.relative_to(SPEECH).with_suffix(".pt"), weights_only=True)["features"][4]
        expected = per_file(model, wav, 4)
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        # bfloat16 keeps 8 bits of mantissa; over 4 layers the features move by a few percent.
        assert (got.float() - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize(("kernel", "depth"), [(95, 5), (128, 1), (16, 2)])  # SpidR, DinoSR, even and small
def test_channels_last_positional_convs_equal_the_default(kernel, depth):
    from spidr.models.components import ConvPositionalEmbedding

    torch.manual_seed(0)
    pos = ConvPositionalEmbedding(64, kernel, 16, depth).eval()
    x = torch.randn(2, 150, 64)
    with torch.inference_mode():
        torch.testing.assert_close(pos.forward_channels_last(x), pos(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kernel", "depth"), [(95, 5), (128, 1), (16, 2)])
@pytest.mark.parametrize("lengths", [[150], [40, 3, 97, 1, 60]])  # one sequence; shorter than the kernel
def test_packed_positional_convs_equal_each_sequence_alone(kernel, depth, lengths):
    from spidr.models.components import ConvPositionalEmbedding

    torch.manual_seed(0)
    pos = ConvPositionalEmbedding(64, kernel, 16, depth).eval()
    x = torch.randn(1, sum(lengths), 64)
    with torch.inference_mode():
        got = pos.forward_packed(x, lengths)
        expected = torch.cat([pos(part) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("mode", "conv_bias"), [("layer_norm", False), ("layer_norm", True), ("group_norm", False)])
def test_channels_last_conv_extractor_equals_the_default(mode, conv_bias):
    """FeatureExtractor.gemm_on_cpu (the extraction path: GEMMs over the windows, Winograd for the k=3 s=2
    blocks, fused norms) against the default convolutions, on a base-size extractor."""
    from spidr.config import SpidRConfig
    from spidr.models.components import FeatureExtractor

    torch.manual_seed(0)
    cfg = dataclasses.replace(SpidRConfig(), extractor_mode=mode, extractor_conv_bias=conv_bias)
    extractor = FeatureExtractor(cfg).eval()
    for block in extractor.conv_layers:  # non-trivial affine norms and biases
        for p in (block.layer_norm.weight, block.layer_norm.bias) if block.layer_norm is not None else ():
            p.data.normal_(1.0 if p is block.layer_norm.weight else 0.0, 0.2)
        if block.conv.bias is not None:
            block.conv.bias.data.normal_(0.0, 0.1)
    wav = load_audio(WAVS[0], normalize=True)[None, :23_000]
    with torch.inference_mode():
        expected = extractor(wav)
        extractor.gemm_on_cpu = True
        got = extractor(wav)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)


def test_packed_sequences_equal_each_sequence_alone(model):
    """Transformer.get_intermediate_outputs(segments=...): sequences end to end, each as if run alone."""
    g = torch.Generator().manual_seed(3)
    lengths = [7, 30, 1, 19]
    seqs = [torch.randn(1, n, model.cfg.encoder_embed_dim, generator=g) for n in lengths]
    with torch.inference_mode():
        packed = model.student.get_intermediate_outputs(torch.cat(seqs, dim=1), num_layers=3, segments=lengths)
        starts = [0, 7, 37, 38]
        for seq, start, n in zip(seqs, starts, lengths, strict=True):
            alone = model.student.get_intermediate_outputs(seq, num_layers=3)
            for got, expected in zip(packed, alone, strict=True):
                torch.testing.assert_close(got[:, start : start + n], expected, atol=1e-4, rtol=0)
        x = torch.cat(seqs, dim=1)
        for bad in ([7, 30, 1], [0, 57]):
            with pytest.raises(ValueError, match="segments"):
                model.student.get_intermediate_outputs(x, segments=bad)
        with pytest.raises(ValueError, match="segments"):
            model.student.get_intermediate_outputs(torch.cat([x, x]), segments=lengths)


def test_same_names_in_two_folders_do_not_collide_and_index_lists_every_file(tmp_path, model):
    extract(SPEECH, tmp_path, model="small", loaded_model=model, layers="2", progress=False)
    alice = torch.load(tmp_path / "alice" / "utt00.pt", weights_only=True)
    bob = torch.load(tmp_path / "bob" / "utt00.pt", weights_only=True)
    assert alice["source"] == "alice/utt00.wav" and bob["source"] == "bob/utt00.wav"
    assert not torch.equal(alice["features"][2][:100], bob["features"][2][:100])
    rows = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [str(w.relative_to(SPEECH)) for w in WAVS]
    assert all(r["status"] == "ok" and r["layers"] == [2] for r in rows)
    assert [r["frames"] for r in rows] == [torch.load(tmp_path / r["output"])["frames"] for r in rows]


def test_manifest_and_single_file_inputs(tmp_path, model):
    items = list_inputs(SPEECH / "manifest.csv")
    assert sorted(i.relative for i in items) == sorted(str(w.relative_to(SPEECH)) for w in WAVS)
    extract(WAVS[3], tmp_path / "one", model="small", loaded_model=model, layers="3", progress=False)
    record = torch.load(tmp_path / "one" / WAVS[3].with_suffix(".pt").name, weights_only=True)
    torch.testing.assert_close(record["features"][3], per_file(model, WAVS[3], 3), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- chunking
def test_chunk_plan_covers_every_frame_once_on_frame_boundaries():
    hop, field = 320, 400
    for num_samples in (16000 * 17 + 123, 400, 16000 * 9):
        total = (num_samples - field) // hop + 1
        spans = plan_pieces(num_samples, hop, field, total, chunk_frames=200, context_frames=100)
        kept = []
        for start, stop, keep_start, keep_stop, first in spans:
            assert start % hop == 0 and stop <= num_samples
            assert first == start // hop + keep_start  # the span's frame j is file frame start/hop + j
            assert (stop - start - field) // hop + 1 >= keep_stop
            kept += range(first, first + keep_stop - keep_start)
        assert kept == list(range(total))


def test_chunks_are_frame_aligned_and_close_to_the_whole_file(tmp_path, model):
    long = write_wav(tmp_path / "in" / "long.wav", torch.cat([load_audio(w) for w in WAVS]).numpy())  # 34 s
    whole = extract(
        long.parent,
        tmp_path / "whole",
        model="small",
        loaded_model=model,
        layers="1,4",
        chunk_seconds=0,
        progress=False,
    )
    assert whole.extracted == 1
    reference = torch.load(tmp_path / "whole" / "long.pt", weights_only=True)["features"]
    # Frames are aligned exactly: the conv extractor output of every chunk equals the whole file's there.
    x = load_audio(long, normalize=True)
    with torch.no_grad():
        full = model.feature_extractor(x[None])[0]
        hop = 320
        for start, stop, keep_start, keep_stop, first in plan_pieces(x.shape[0], hop, 400, full.shape[-2], 200, 250):
            part = model.feature_extractor(x[None, start:stop])[0]
            torch.testing.assert_close(part[keep_start:keep_stop], full[first : first + keep_stop - keep_start])
    results = {}
    for chunk in (4, 10):
        out = tmp_path / f"chunk{chunk}"
        extract(
            long.parent,
            out,
            model="small",
            loaded_model=model,
            layers="1,4",
            chunk_seconds=chunk,
            context_seconds=5,
            progress=False,
        )
        results[chunk] = torch.load(out / "long.pt", weights_only=True)["features"]
        for layer in (1, 4):
            got, ref = results[chunk][layer], reference[layer]
            assert got.shape == ref.shape
            # Attention is global: a chunk sees 14 s or 20 s of the 34 s, so features move a little.
            assert F.cosine_similarity(got, ref, dim=-1).min() > 0.995
            assert (got - ref).norm() / ref.norm() < 0.05
    assert (results[4][4] - results[10][4]).norm() / reference[4].norm() < 0.05


# --------------------------------------------------------------------------- units
def test_codebook_units_are_the_heads_argmax_as_int16(tmp_path, model):
    extract(SPEECH, tmp_path, model="small", loaded_model=model, units="codebook", batch_seconds=15, progress=False)
    for wav in WAVS[:4]:
        record = torch.load(tmp_path / wav.relative_to(SPEECH).with_suffix(".pt"), weights_only=True)
        assert record["layers"] == [3, 4] and record["num_units"] == {3: 16, 4: 16} and "features" not in record
        with torch.no_grad():
            onehots = model.get_codebooks(load_audio(wav, normalize=True)[None], onehot=True)
        for layer in (3, 4):
            assert record["units"][layer].dtype == torch.int16
            assert torch.equal(record["units"][layer].long(), onehots[layer - 1].argmax(-1))


def test_codebook_units_on_a_layer_without_head_names_the_valid_range(tmp_path, model_dir):
    result = run_cli(
        str(WAVS[0]), str(tmp_path), "--model", str(model_dir / "model.pt"), "--units", "codebook", "--layers", "1"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "heads read layers 3 to 4" in result.stderr


@pytest.mark.parametrize("layers", ["0", "5", "2,9", "x"])
def test_wrong_layer_number_names_the_valid_range(tmp_path, model_dir, layers):
    result = run_cli(str(WAVS[0]), str(tmp_path), "--model", str(model_dir / "model.pt"), "--layers", layers)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--layers" in result.stderr
    if layers != "x":
        assert "layers 1 to 4" in result.stderr


# --------------------------------------------------------------------------- bad input
def test_bad_files_are_reported_and_good_files_still_extracted(tmp_path, model_dir, model):
    data = tmp_path / "in"
    for wav in WAVS[:3]:
        (data / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(wav, data / "good" / wav.name)
    rng = np.random.default_rng(0)
    write_wav(data / "stereo.wav", rng.uniform(-0.1, 0.1, (16000, 2)))
    write_wav(data / "rate8k.wav", rng.uniform(-0.1, 0.1, 8000), rate=8000)
    write_wav(data / "short.wav", rng.uniform(-0.1, 0.1, 399))
    write_wav(data / "nosamples.wav", np.zeros(0))
    (data / "empty.wav").write_bytes(b"")
    (data / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00garbage that is not audio at all" * 3)
    truncated = WAVS[0].read_bytes()
    (data / "truncated.wav").write_bytes(truncated[:30])
    nan = rng.uniform(-0.1, 0.1, 16000).astype(np.float32)
    nan[100] = np.nan
    write_float_wav(data / "nan.wav", nan)
    (data / "unreadable.wav").symlink_to(data / "missing-target.wav")

    result = run_cli(str(data), str(tmp_path / "out"), "--model", str(model_dir / "model.pt"), "--layers", "4")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = {
        json.loads(line)["source"]: json.loads(line)["reason"]
        for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    }
    expected = {
        "stereo.wav": "2 channel(s)",
        "rate8k.wav": "8000 Hz",
        "short.wav": "too short",
        "nosamples.wav": "",
        "empty.wav": "empty",
        "corrupt.wav": "",
        "truncated.wav": "",
        "nan.wav": "NaN",
        "unreadable.wav": "",
    }
    assert sorted(errors) == sorted(expected)
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])
        assert f"{data / name}: " in result.stderr  # each named with its path at the end of the run
    for wav in WAVS[:3]:
        record = torch.load(tmp_path / "out" / "good" / wav.with_suffix(".pt").name, weights_only=True)
        torch.testing.assert_close(record["features"][4], per_file(model, wav, 4), atol=1e-4, rtol=0)
    assert "3 file(s) extracted" in result.stderr and "9 failed" in result.stderr


def test_cli_errors_without_traceback(tmp_path, model_dir):
    missing = run_cli(str(tmp_path / "nope"), str(tmp_path / "out"), "--model", str(model_dir / "model.pt"))
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr
    bad_model = run_cli(str(WAVS[0]), str(tmp_path / "out"), "--model", "no_such_model")
    assert bad_model.returncode == 1 and "spidr_base" in bad_model.stderr
    for result in (missing, bad_model):
        assert "Traceback" not in result.stderr
    debug = run_cli(str(tmp_path / "nope"), str(tmp_path / "out"), "--model", "x", "--debug")
    assert "Traceback" in debug.stderr


def test_help_explains_every_option_with_an_example():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in (
        "--model",
        "--layers",
        "--units",
        "--device",
        "--batch-seconds",
        "--dtype",
        "--ext",
        "--overwrite",
        "--chunk-seconds",
        "--context-seconds",
        "examples:",
        "errors.jsonl",
    ):
        assert option in result.stdout


# --------------------------------------------------------------------------- resuming
def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path, model):
    extract(WAVS[0], tmp_path, model="small", loaded_model=model, layers="2", progress=False)
    with pytest.raises(Exception, match="other settings .*layers"):
        extract(WAVS[0], tmp_path, model="small", loaded_model=model, layers="3", progress=False)
    summary = extract(WAVS[0], tmp_path, model="small", loaded_model=model, layers="3", progress=False, overwrite=True)
    assert summary.extracted == 1
    assert torch.load(tmp_path / "utt00.pt", weights_only=True)["layers"] == [3]


def test_killed_run_leaves_no_partial_file_and_rerun_completes(tmp_path, model_dir, model):
    out = tmp_path / "out"
    args = [
        str(SPEECH),
        str(out),
        "--model",
        str(model_dir / "model.pt"),
        "--layers",
        "all",
        "--batch-seconds",
        "4",
        "--quiet",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "spidr.extract", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.rglob("*.pt"))) < 3 and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(out.rglob("*.pt"))
    assert 0 < len(done) < len(WAVS), "the run should have been killed half-way"
    for path in done:  # every file present is complete
        assert torch.load(path, weights_only=True)["frames"] > 0
    before = {p: p.stat().st_mtime_ns for p in done}
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"{len(done)} already done" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in done} == before  # finished files were not redone
    for wav in WAVS:
        record = torch.load(out / wav.relative_to(SPEECH).with_suffix(".pt"), weights_only=True)
        torch.testing.assert_close(record["features"][4], per_file(model, wav, 4), atol=1e-4, rtol=0)
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(rows) == len(WAVS) and all(r["status"] == "ok" for r in rows)
    assert not list(out.rglob("*.tmp"))  # a temporary file left by the killed write is removed


def test_full_output_disk_stops_with_a_clear_error(tmp_path, model_dir):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = run_cli(
            str(SPEECH), str(disk / "out"), "--model", str(model_dir / "model.pt"), "--layers", "all", "--quiet"
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "no space left on the output device" in result.stderr
        for path in (disk / "out").rglob("*.pt"):  # what was written is complete
            assert torch.load(path, weights_only=True)["frames"] > 0
        assert not list((disk / "out").rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_kmeans_units_are_the_nearest_centroid_of_the_layer(tmp_path, model_dir, model):
    from spidr.kmeans import fit_kmeans, save_kmeans

    features = tmp_path / "features"
    extract(SPEECH, features, model="small", loaded_model=model, layers="3", progress=False)
    frames = torch.cat([torch.load(p, weights_only=True)["features"][3] for p in sorted(features.rglob("*.pt"))])
    km = dataclasses.replace(fit_kmeans(frames, 8, iters=5, seed=0), layer=3)
    save_kmeans(km, tmp_path / "km.pt")
    result = run_cli(
        str(SPEECH),
        str(tmp_path / "units"),
        "--model",
        str(model_dir / "model.pt"),
        "--units",
        f"kmeans:{tmp_path / 'km.pt'}",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    for wav in WAVS[:3]:
        record = torch.load(tmp_path / "units" / wav.relative_to(SPEECH).with_suffix(".pt"), weights_only=True)
        assert record["layers"] == [3] and record["num_units"] == {3: 8}
        expected = torch.cdist(per_file(model, wav, 3), km.centroids).argmin(-1)
        assert record["units"][3].dtype == torch.int16
        assert (record["units"][3].long() == expected).float().mean() > 0.99  # near-ties may differ in rounding
