"""Data input: manifests (CSV, JSONL, fairseq TSV, tar members), the write_manifest CLI, and audio decoding."""

from __future__ import annotations

import gzip
import logging
import math
import shutil
import struct
import subprocess
import sys
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr.data import audio
from spidr.data.audio import AudioError, audio_info, load_audio
from spidr.data.manifests import (
    ArchiveError,
    AudioEntry,
    ManifestError,
    read_entries,
    scan_directory,
    scan_tar,
    write_manifest,
)
from spidr.data.write_manifest import main as cli_main

REPO = Path(__file__).parent.parent
SPEECH = REPO / "tests" / "data" / "speech"
UTT = SPEECH / "alice" / "utt00.wav"
SOX = shutil.which("sox")
needs_sox = pytest.mark.skipif(SOX is None, reason="sox is not installed")


# --------------------------------------------------------------------------------------------------------------------
# Helpers: WAV writers independent of spidr's own parser.


def pcm16(path: Path) -> tuple[np.ndarray, int]:
    """int16 samples (frames, channels) and sample rate of a 16-bit PCM WAV, read with the standard library."""
    with wave.open(str(path), "rb") as file:
        frames = file.readframes(file.getnframes())
        return np.frombuffer(frames, "<i2").reshape(-1, file.getnchannels()), file.getframerate()


def write_pcm16(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write int16 samples (frames,) or (frames, channels) with the standard library's wave module."""
    samples = np.asarray(samples, dtype="<i2")
    samples = samples[:, None] if samples.ndim == 1 else samples
    with wave.open(str(path), "wb") as file:
        file.setnchannels(samples.shape[1])
        file.setsampwidth(2)
        file.setframerate(sample_rate)
        file.writeframes(samples.tobytes())
    return path


def write_float_wav(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write mono IEEE-float32 WAV (format code 3), built by hand."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def sine(frequency: float, sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return amplitude * np.sin(2 * math.pi * frequency * t)


def make_tar(path: Path, files: dict[str, Path], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, source in files.items():
            tar.add(source, arcname=name)
    return path


def corpus_tar(tmp_path: Path) -> Path:
    files = {
        f"{speaker.name}/{wav.name}": wav for speaker in sorted(SPEECH.iterdir()) for wav in speaker.glob("*.wav")
    }
    files["README.md"] = SPEECH / "README.md"  # not audio: skipped
    return make_tar(tmp_path / "speech.tar", files)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "spidr.data.write_manifest", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


# --------------------------------------------------------------------------------------------------------------------
# Manifests: round trips.


@pytest.fixture(scope="module")
def corpus_entries() -> list[AudioEntry]:
    return scan_directory(SPEECH)


def test_scan_directory_is_recursive_sorted_and_reads_headers(corpus_entries):
    assert [Path(e.path).relative_to(SPEECH).as_posix() for e in corpus_entries] == [
        f"{speaker}/utt0{i}.wav" for speaker in ("alice", "bob") for i in range(5)
    ]
    assert [e.fileid for e in corpus_entries] == [f"utt0{i}" for i in range(5)] * 2  # same names in both folders
    for entry in corpus_entries:
        samples, sample_rate = pcm16(Path(entry.path))
        assert (entry.num_samples, sample_rate) == (len(samples), 16_000)
        assert entry.archive is entry.byte_offset is entry.byte_size is None


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_file_manifest_round_trip(tmp_path, corpus_entries, suffix):
    manifest = tmp_path / f"train{suffix}"
    write_manifest(corpus_entries, manifest, fairseq_root=SPEECH if suffix == ".tsv" else None)
    assert read_entries(manifest, check_exists=True) == corpus_entries
    if suffix == ".tsv":
        lines = manifest.read_text().splitlines()
        assert lines[0] == str(SPEECH.resolve())
        assert lines[1] == f"alice/utt00.wav\t{corpus_entries[0].num_samples}"
    if suffix == ".csv":
        assert manifest.read_text().splitlines()[0] == "fileid,path,num_samples"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_tar_manifest_round_trip(tmp_path, corpus_entries, suffix):
    archive = corpus_tar(tmp_path)
    entries = scan_tar(archive)
    assert [e.path for e in entries] == [Path(e.path).relative_to(SPEECH).as_posix() for e in corpus_entries]
    assert [e.num_samples for e in entries] == [e.num_samples for e in corpus_entries]
    with tarfile.open(archive) as tar:
        for entry in entries:
            member = tar.getmember(entry.path)
            assert (entry.archive, entry.byte_offset, entry.byte_size) == (
                str(archive),
                member.offset_data,
                member.size,
            )
            assert tar.extractfile(member).read() == (SPEECH / entry.path).read_bytes()
    manifest = tmp_path / f"train{suffix}"
    write_manifest(entries, manifest)
    if suffix == ".csv":
        assert manifest.read_text().splitlines()[0] == "fileid,path,num_samples,archive,byte_offset,byte_size"
    assert read_entries(manifest, check_exists=True) == entries


def test_relative_paths_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "shard.tar").write_bytes(bytes(2048))
    rows = ["a,../audio/a.wav,10,,,", "b,b.wav,5,../shard.tar,512,100"]
    (tmp_path / "lists" / "m.csv").write_text("\n".join([TAR.strip(), *rows]) + "\n")
    a, b = read_entries(tmp_path / "lists" / "m.csv")
    assert a == AudioEntry("a", str(tmp_path / "lists" / ".." / "audio" / "a.wav"), 10)
    assert b == AudioEntry("b", "b.wav", 5, str(tmp_path / "lists" / ".." / "shard.tar"), 512, 100)
    (tmp_path / "lists" / "m.tsv").write_text("../audio\nx/c.flac\t7\n\n")
    assert read_entries(tmp_path / "lists" / "m.tsv") == [
        AudioEntry("c", str(tmp_path / "lists" / ".." / "audio" / "x" / "c.flac"), 7)
    ]


def test_missing_files_are_reported_only_with_check_exists(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"fileid,path,num_samples\nutt00,{UTT},3\nghost,{tmp_path / 'ghost.wav'},3\n")
    assert len(read_entries(manifest)) == 2
    with pytest.raises(ManifestError, match=r"line 3, column 'path': file not found: .*ghost\.wav"):
        read_entries(manifest, check_exists=True)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"fileid": "a", "path": "a.wav", "num_samples": 1, "archive": "none.tar", "byte_offset": 0, "byte_size": 1}\n'
    )
    assert read_entries(manifest)[0].archive == str(tmp_path / "none.tar")
    with pytest.raises(ManifestError, match=r"line 1, column 'archive': archive not found"):
        read_entries(manifest, check_exists=True)


def test_windows_csv_with_byte_order_mark(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode() + b"a,a.wav,3\r\n")
    assert read_entries(tmp_path / "m.csv") == [AudioEntry("a", str(tmp_path / "a.wav"), 3)]


def test_empty_manifests(tmp_path):
    (tmp_path / "h.csv").write_text("fileid,path,num_samples\n")
    (tmp_path / "e.jsonl").write_text("\n")
    assert read_entries(tmp_path / "h.csv") == read_entries(tmp_path / "e.jsonl") == []
    write_manifest([], tmp_path / "w.csv")
    assert read_entries(tmp_path / "w.csv") == []


# --------------------------------------------------------------------------------------------------------------------
# Manifests: errors name the manifest, the line and the column.

GOOD = "fileid,path,num_samples\n"
TAR = "fileid,path,num_samples,archive,byte_offset,byte_size\n"

BAD_MANIFESTS = {
    "csv-empty-file": ("m.csv", "", "line 1: line 1 must be the header"),
    "csv-wrong-header": ("m.csv", "utt00,a.wav,12\n", "line 1: line 1 must be the header"),
    "csv-missing-column": ("m.csv", "fileid,path\na,a.wav\n", "line 1, column 'num_samples': missing column"),
    "csv-duplicate-column": ("m.csv", "fileid,path,num_samples,path\n", "line 1, column 'path': duplicate"),
    "csv-non-integer": ("m.csv", GOOD + "a,a.wav,1\nb,b.wav,12.5\n", "line 3, column 'num_samples': not an integer"),
    "csv-not-a-number": ("m.csv", GOOD + "a,a.wav,abc\n", "line 2, column 'num_samples': not an integer: 'abc'"),
    "csv-negative": ("m.csv", GOOD + "a,a.wav,-4\n", "line 2, column 'num_samples': negative: -4"),
    "csv-missing-value": ("m.csv", GOOD + "a,a.wav\n", "line 2, column 'num_samples': missing num_samples"),
    "csv-empty-fileid": ("m.csv", GOOD + "a,a.wav,1\n,b.wav,2\n", "line 3, column 'fileid': empty fileid"),
    "csv-blank-fileid": ("m.csv", GOOD + "  ,b.wav,2\n", "line 2, column 'fileid': empty fileid"),
    "csv-empty-path": ("m.csv", GOOD + "a,,3\n", "line 2, column 'path': empty path"),
    "csv-too-many-fields": ("m.csv", GOOD + "a,a.wav,1\nb,b.wav,2,3\n", "line 3: 4 fields, the header has 3"),
    "csv-blank-lines-count": ("m.csv", GOOD + "a,a.wav,1\n\nb,b.wav,x\n", "line 4, column 'num_samples'"),
    "csv-quoted-newline-counts": ("m.csv", GOOD + 'a,"x\ny.wav",1\nb,,2\n', "line 4, column 'path'"),
    "csv-tar-header-partial": (
        "m.csv",
        "fileid,path,num_samples,archive,byte_offset\n",
        "line 1, column 'byte_size': tar columns partially present",
    ),
    "csv-tar-row-partial": ("m.csv", TAR + "a,a.wav,1,,,\nb,b.wav,1,s.tar,,10\n", "line 3, column 'byte_offset': tar"),
    "csv-tar-negative-offset": ("m.csv", TAR + "b,b.wav,1,s.tar,-1,10\n", "line 2, column 'byte_offset': negative"),
    "csv-tar-outside-archive": (
        "m.csv",
        TAR + "a,a.wav,1,s.tar,0,100\nb,b.wav,1,s.tar,1000,100\n",
        "line 3, column 'byte_size': bytes 1000..1100 lie outside the archive",
    ),
    "jsonl-invalid-json": (
        "m.jsonl",
        '{"fileid": "a", "path": "a", "num_samples": 1}\n{"fileid": \n',
        "line 2: invalid JSON",
    ),
    "jsonl-not-an-object": ("m.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
    "jsonl-float": (
        "m.jsonl",
        '{"fileid": "a", "path": "a", "num_samples": 1}\n\n{"fileid": "b", "path": "b", "num_samples": 2.5}\n',
        "line 3, column 'num_samples': expected an integer, got 2.5",
    ),
    "jsonl-missing-key": (
        "m.jsonl",
        '{"fileid": "a", "path": "a", "num_samples": 1}\n\n{"fileid": "b", "path": "b"}\n',
        "line 3, column 'num_samples': missing num_samples",
    ),
    "jsonl-missing-column": (
        "m.jsonl",
        '{"fileid": "a", "path": "a"}\n',
        "line 1, column 'num_samples': missing column",
    ),
    "jsonl-negative": ("m.jsonl", '{"fileid": "a", "path": "a", "num_samples": -1}\n', "line 1, column 'num_samples'"),
    "jsonl-path-not-a-string": ("m.jsonl", '{"fileid": "a", "path": 3, "num_samples": 1}\n', "line 1, column 'path'"),
    "jsonl-tar-partial": (
        "m.jsonl",
        '{"fileid": "a", "path": "a", "num_samples": 1}\n'
        '{"fileid": "b", "path": "b", "num_samples": 1, "archive": "s.tar"}\n',
        "line 2, column 'byte_offset': tar columns partially present",
    ),
    "tsv-no-root": ("m.tsv", "\na.wav\t3\n", "line 1, column 'root'"),
    "tsv-non-integer": ("m.tsv", "/data\na.wav\t3\nb.wav\tthree\n", "line 3, column 'num_samples': not an integer"),
    "tsv-negative": ("m.tsv", "/data\na.wav\t-3\n", "line 2, column 'num_samples': negative"),
    "tsv-fields": ("m.tsv", "/data\na.wav 3\n", "line 2: expected 2 tab-separated fields"),
    "tsv-empty-path": ("m.tsv", "/data\n\t3\n", "line 2, column 'path': empty path"),
    "unknown-suffix": ("m.txt", GOOD, "unknown manifest suffix '.txt'"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_named(tmp_path, case):
    name, content, expected = BAD_MANIFESTS[case]
    (tmp_path / "s.tar").write_bytes(bytes(512))
    manifest = tmp_path / name
    manifest.write_text(content)
    with pytest.raises(ManifestError) as info:
        read_entries(manifest)
    assert str(info.value).startswith(f"{manifest}"), str(info.value)
    assert expected in str(info.value), str(info.value)


def test_write_manifest_refuses_what_a_format_cannot_hold(tmp_path, corpus_entries):
    with pytest.raises(ManifestError, match="needs fairseq_root"):
        write_manifest(corpus_entries, tmp_path / "m.tsv")
    with pytest.raises(ManifestError, match="not under the fairseq root"):
        write_manifest(corpus_entries, tmp_path / "m.tsv", fairseq_root=SPEECH / "alice")
    with pytest.raises(ManifestError, match="cannot hold tar members"):
        write_manifest([AudioEntry("a", "a.wav", 1, "s.tar", 0, 10)], tmp_path / "m.tsv", fairseq_root=tmp_path)
    with pytest.raises(ManifestError, match="unknown manifest suffix"):
        write_manifest(corpus_entries, tmp_path / "m.parquet")


# --------------------------------------------------------------------------------------------------------------------
# The write_manifest command line.


def test_cli_directory_csv_and_fairseq(tmp_path, corpus_entries):
    result = run_cli(SPEECH, tmp_path / "train.csv")
    assert result.returncode == 0, result.stderr
    assert "wrote 10 entries" in result.stdout
    assert read_entries(tmp_path / "train.csv") == corpus_entries
    result = run_cli(SPEECH, tmp_path / "train.tsv", "--fairseq", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "train.tsv").read_text().splitlines()[0] == str(SPEECH.resolve())
    assert read_entries(tmp_path / "train.tsv") == corpus_entries


def test_cli_uncompressed_tar(tmp_path, corpus_entries):
    archive = corpus_tar(tmp_path)
    result = run_cli(archive, tmp_path / "shard.jsonl")
    assert result.returncode == 0, result.stderr
    entries = read_entries(tmp_path / "shard.jsonl", check_exists=True)
    assert entries == scan_tar(archive)
    assert [e.fileid for e in entries] == [e.fileid for e in corpus_entries]
    assert all(e.archive == str(archive) for e in entries)


@pytest.mark.parametrize(
    "mode, name, kind",
    [("w:gz", "speech.tgz", "gzip"), ("w:bz2", "speech.tar.bz2", "bzip2"), ("w:xz", "a.tar.xz", "xz")],
)
def test_cli_refuses_compressed_tar(tmp_path, mode, name, kind):
    archive = make_tar(tmp_path / name, {"alice/utt00.wav": UTT}, mode)
    if kind == "gzip":  # one run of the command line is enough: the others go through the same check
        result = run_cli(archive, tmp_path / "m.csv")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
        assert "gzip-compressed archive" in result.stderr and "uncompressed" in result.stderr
        assert not (tmp_path / "m.csv").exists()
    with pytest.raises(ArchiveError, match=f"{kind}-compressed archive"):
        scan_tar(archive)


def test_tar_with_compressed_members_is_refused(tmp_path):
    gz = tmp_path / "utt00.wav.gz"
    gz.write_bytes(gzip.compress(UTT.read_bytes()))
    with pytest.raises(ArchiveError, match=r"member utt00\.wav\.gz is compressed"):
        scan_tar(make_tar(tmp_path / "a.tar", {"utt00.wav.gz": gz}))
    with pytest.raises(ArchiveError, match=r"member utt00\.wav is gzip-compressed"):
        scan_tar(make_tar(tmp_path / "b.tar", {"utt00.wav": gz}))


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nowhere", "{tmp}/m.csv"], "no such file or directory"),
        (["{speech}", "{tmp}/m.txt"], "OUTPUT must end in .csv or .jsonl"),
        (["{speech}", "{tmp}/m.tsv"], "pass --fairseq"),
        (["{speech}", "{tmp}/m.csv", "--ext", ".flac"], "no *.flac files found"),
        (["{speech}/README.md", "{tmp}/m.csv"], "not a readable uncompressed tar archive"),
        (["{speech}", "{tmp}/missing/m.csv"], "does not exist"),
        (["{tar}", "{tmp}/m.tsv", "--fairseq"], "--fairseq needs a directory"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "s.tar").write_bytes(bytes(1024))
    args = [a.format(tmp=tmp_path, speech=SPEECH, tar=tmp_path / "s.tar") for a in args]
    assert cli_main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("write_manifest: error: ") and "\n" not in err
    assert message in err


def test_cli_bad_audio_exits_2(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(UTT, tmp_path / "data" / "good.wav")
    (tmp_path / "data" / "broken.wav").write_bytes(UTT.read_bytes()[:5000])
    result = run_cli(tmp_path / "data", tmp_path / "m.csv")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("write_manifest: error: ") and "broken.wav: truncated WAV" in last
    assert "Traceback" not in result.stderr


def test_cli_help_has_an_example():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "python -m spidr.data.write_manifest /data/" in result.stdout and "--fairseq" in result.stdout


def test_importing_spidr_data_stays_light():
    code = (
        "import sys, spidr.data, spidr.data.manifests, spidr.data.audio, spidr.data.write_manifest\n"
        "print([m for m in ('polars', 'torchcodec') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------------
# Audio decoding.


def test_load_audio_matches_int16_over_32768():
    wav = load_audio(UTT)
    samples, _ = pcm16(UTT)
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert torch.equal(wav, torch.from_numpy(samples[:, 0].astype(np.float32) / 32768))
    assert audio_info(UTT) == (16_000, 1, len(samples))


def test_fast_wav_path_equals_torchcodec_on_the_same_file():
    fast, fast_rate = audio._decode_wav(UTT)
    codec, codec_rate = audio._decode_torchcodec(UTT)
    assert fast_rate == codec_rate == 16_000
    assert fast.shape == codec.shape and torch.equal(fast, codec)


@needs_sox
@pytest.mark.parametrize(
    "encoding",
    [
        ["-b", "8", "-e", "unsigned"],
        ["-b", "24"],
        ["-b", "32"],
        ["-b", "32", "-e", "float"],
        ["-b", "64", "-e", "float"],
    ],
    ids=["u8", "s24", "s32", "f32", "f64"],
)
def test_fast_wav_path_equals_torchcodec_for_other_pcm_formats(tmp_path, encoding):
    path = tmp_path / "x.wav"
    # a stereo file with distinct channels, so that the interleaving is checked too
    subprocess.run([SOX, "-M", str(UTT), str(SPEECH / "bob" / "utt00.wav"), *encoding, str(path)], check=True)
    fast, _ = audio._decode_wav(path)
    codec, _ = audio._decode_torchcodec(path)
    assert fast.shape == codec.shape == (2, audio_info(path)[2])
    assert torch.equal(fast, codec)


@needs_sox
def test_non_pcm_wav_goes_through_torchcodec(tmp_path):
    path = tmp_path / "mulaw.wav"
    subprocess.run([SOX, str(UTT), "-e", "mu-law", str(path)], check=True)
    assert audio._decode_wav(path) is None  # not for the fast path
    expected = audio._decode_torchcodec(path)[0][0]
    assert torch.equal(load_audio(path), expected)
    torch.testing.assert_close(expected, load_audio(UTT), atol=0.02, rtol=0)
    entry = scan_tar(make_tar(tmp_path / "m.tar", {"mulaw.wav": path}))[0]  # header read through a file-like slice
    assert audio_info(path) == audio_info(entry) == (16_000, 1, len(expected)) and entry.num_samples == len(expected)
    assert torch.equal(load_audio(entry), expected)


def test_tar_member_decodes_like_the_file(tmp_path):
    archive = corpus_tar(tmp_path)
    entries = {e.path: e for e in scan_tar(archive)}
    entry = entries["bob/utt03.wav"]
    from_tar = load_audio(entry)
    assert torch.equal(from_tar, load_audio(SPEECH / "bob" / "utt03.wav"))
    assert torch.equal(from_tar, audio._decode_torchcodec(entry)[0][0])  # TorchCodec from bytes in memory
    assert from_tar.shape == (entry.num_samples,)
    assert audio_info(entry) == audio_info(SPEECH / "bob" / "utt03.wav")
    assert torch.equal(load_audio(AudioEntry("x", str(UTT), 0)), load_audio(UTT))


def test_flac_decodes_through_torchcodec(tmp_path):
    from torchcodec.encoders import AudioEncoder

    reference = load_audio(UTT)
    flac = tmp_path / "utt00.flac"
    AudioEncoder(reference[None], sample_rate=16_000).to_file(str(flac))
    assert audio_info(flac) == (16_000, 1, len(reference))
    torch.testing.assert_close(load_audio(flac), reference, atol=1 / 32768, rtol=0)
    entry = scan_tar(make_tar(tmp_path / "f.tar", {"x/utt00.flac": flac}), ext=".flac")[0]
    assert entry.fileid == "utt00" and entry.num_samples == len(reference)
    assert torch.equal(load_audio(entry), load_audio(flac))


def test_bad_audio_raises_naming_the_file(tmp_path):
    cases = {}
    cases["missing.wav"] = "file not found"
    (tmp_path / "empty.wav").touch()
    cases["empty.wav"] = "empty file"
    (tmp_path / "truncated.wav").write_bytes(UTT.read_bytes()[:20_000])
    cases["truncated.wav"] = "truncated WAV"
    (tmp_path / "header.wav").write_bytes(UTT.read_bytes()[:30])
    cases["header.wav"] = "corrupt or truncated WAV"
    (tmp_path / "junk.wav").write_bytes(bytes(range(256)) * 8)
    cases["junk.wav"] = "corrupt or undecodable"
    (tmp_path / "junk.flac").write_bytes(b"fLaC" + bytes(300))
    cases["junk.flac"] = "corrupt or undecodable"
    samples, _ = pcm16(UTT)
    write_pcm16(tmp_path / "stereo.wav", np.stack([samples[:, 0], samples[:, 0]], axis=1), 16_000)
    cases["stereo.wav"] = "expected mono 16000 Hz audio, got 2 channel(s) at 16000 Hz"
    write_pcm16(tmp_path / "8k.wav", samples[::2, 0], 8_000)
    cases["8k.wav"] = "got 1 channel(s) at 8000 Hz (pass resample=True"
    signal = sine(200, 16_000, 0.1).astype(np.float32)
    signal[[10, 20]] = [np.nan, np.inf]
    write_float_wav(tmp_path / "nan.wav", signal, 16_000)
    cases["nan.wav"] = "2 NaN or infinite sample(s)"
    write_pcm16(tmp_path / "nothing.wav", np.zeros(0, dtype=np.int16), 16_000)
    cases["nothing.wav"] = "no samples after decoding"
    for name, reason in cases.items():
        with pytest.raises(AudioError) as info:
            load_audio(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: ") and reason in str(info.value), str(info.value)
    for name in ("missing.wav", "empty.wav", "truncated.wav", "junk.flac"):
        with pytest.raises(AudioError, match=name):
            audio_info(tmp_path / name)


def test_bad_tar_member_names_member_and_archive(tmp_path):
    archive = make_tar(tmp_path / "s.tar", {"a/utt00.wav": UTT})
    entry = scan_tar(archive)[0]
    beyond = AudioEntry("utt00", "a/utt00.wav", 1, str(archive), entry.byte_offset, 10**7)
    with pytest.raises(AudioError, match=r"^a/utt00\.wav in archive .*s\.tar: bytes .* lie outside the archive"):
        load_audio(beyond)
    cut = AudioEntry("utt00", "a/utt00.wav", 1, str(archive), entry.byte_offset, 1000)
    with pytest.raises(AudioError, match=r"^a/utt00\.wav in archive .*s\.tar: truncated WAV"):
        load_audio(cut)
    with pytest.raises(AudioError, match=r"archive not found"):
        load_audio(AudioEntry("utt00", "a/utt00.wav", 1, str(tmp_path / "gone.tar"), 0, 10))


def test_resample_converts_stereo_8k_to_mono_16k(tmp_path, caplog):
    left, right = sine(440, 8_000, 1.0, 0.6), sine(440, 8_000, 1.0, 0.2)
    path = write_pcm16(tmp_path / "st8k.wav", np.round(np.stack([left, right], axis=1) * 32767), 8_000)
    with caplog.at_level(logging.INFO, logger="spidr.data.audio"):
        wav = load_audio(path, resample=True)
    assert "st8k.wav: converted 2 channel(s) at 8000 Hz to mono 16000 Hz" in caplog.text
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert abs(wav.numel() - 16_000) <= 2
    expected = torch.from_numpy(sine(440, 16_000, 1.0, 0.4)).float()[: wav.numel()]  # mean of the channels
    torch.testing.assert_close(wav[200:-200], expected[200:-200], atol=0.02, rtol=0)


@needs_sox
def test_resample_flac_decodes_once_at_16k(tmp_path):
    path = tmp_path / "st44k.flac"
    subprocess.run([SOX, str(UTT), "-r", "44100", "-c", "2", str(path)], check=True)
    with pytest.raises(AudioError, match="got 2 channel.s. at 44100 Hz"):
        load_audio(path)
    wav = load_audio(path, resample=True)
    reference = load_audio(UTT)
    assert abs(wav.numel() - reference.numel()) <= 2
    n = min(wav.numel(), reference.numel())
    assert torch.corrcoef(torch.stack([wav[:n], reference[:n]]))[0, 1] > 0.99


def test_resample_averages_channels_at_16k(tmp_path):
    samples, _ = pcm16(UTT)
    other, _ = pcm16(SPEECH / "bob" / "utt00.wav")
    n = min(len(samples), len(other))
    path = write_pcm16(tmp_path / "st.wav", np.stack([samples[:n, 0], other[:n, 0]], axis=1), 16_000)
    wav = load_audio(path, resample=True)
    expected = (torch.from_numpy(samples[:n, 0] / 32768) + torch.from_numpy(other[:n, 0] / 32768)) / 2
    torch.testing.assert_close(wav, expected.float())
    assert torch.equal(load_audio(UTT, resample=True), load_audio(UTT))  # nothing to do for mono 16 kHz


def test_normalize_standardises_the_utterance():
    raw = load_audio(UTT)
    wav = load_audio(UTT, normalize=True)
    assert torch.equal(wav, torch.nn.functional.layer_norm(raw, raw.shape, eps=1e-5))
    assert abs(wav.mean().item()) < 1e-5
    variance = raw.double().var(unbiased=False).item()
    assert abs(wav.double().var(unbiased=False).item() - variance / (variance + 1e-5)) < 1e-5  # unit, up to eps


def test_loading_a_manifest_end_to_end(tmp_path, corpus_entries):
    manifest = tmp_path / "m.jsonl"
    write_manifest(corpus_entries, manifest)
    for entry in read_entries(manifest):
        assert load_audio(entry).shape == (entry.num_samples,)
