"""Seeded fuzzing of the public entry points: every call succeeds or raises an exception its docstring documents.

Random shapes, dtypes and values go to the ops of every usable CPU backend; random, truncated and bit-flipped bytes
go to the audio decoder, the manifest reader, the config reader and the checkpoint loaders. A crash of the
interpreter would end pytest itself, which is part of the check. The allowed exception types per entry point are
those of its docstring's Raises section (named in ``ALLOWED``); anything else is a library bug.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import spidr.ops as ops
from spidr.config import (
    Config,
    ConfigError,
    DataConfig,
    MaskingConfig,
    OptimizerConfig,
    RunConfig,
    SpidRConfig,
    read_config,
)
from spidr.data.audio import AudioError, audio_info, load_audio
from spidr.data.manifests import AudioEntry, ManifestError, read_entries
from spidr.models import CheckpointError, DinoSR, build_model, spidr_base
from spidr.models.pretrained import load_checkpoint_file
from tests.conftest import REPO

# torch warns about the pickle protocols it finds in damaged files: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

SEED = 20_251_125
SPEECH = REPO / "tests" / "data" / "speech"

# What each entry point documents (Raises sections); BackendError cannot happen: only usable backends are forced.
ALLOWED: dict[str, tuple[type[BaseException], ...]] = {
    "spidr.ops": (TypeError, ValueError),
    "load_audio": (AudioError,),
    "audio_info": (AudioError,),
    "read_entries": (ManifestError,),
    "read_config": (ConfigError,),
    "load_checkpoint_file": (CheckpointError,),
    "build_model": (CheckpointError,),  # with cfg given and an existing file: no ConfigError, no FileNotFoundError
    "spidr_base": (CheckpointError,),
}


def attempt(entry: str, case: object, function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """``(True, function(*args, **kwargs))`` or ``(False, the exception)``, failing on an undocumented exception."""
    try:
        return True, function(*args, **kwargs)
    except ALLOWED[entry] as error:
        assert str(error), f"{entry} raised {type(error).__name__} without a message for {case!r}"
        return False, error
    except Exception as error:  # the point of the fuzzing: name what escaped, with the input that made it
        pytest.fail(f"{entry} raised the undocumented {type(error).__name__}: {error} for {case!r}")


def flip_bits(data: bytes, rng: random.Random, count: int, *, head: int | None = None) -> bytes:
    """``data`` with ``count`` random bits flipped (within the first ``head`` bytes when given)."""
    out = bytearray(data)
    for _ in range(count):
        position = rng.randrange(min(head or len(out), len(out)))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def mutate(data: bytes, rng: random.Random, *, head: int | None = None) -> bytes:
    """One of: truncated, bits flipped, a random chunk inserted, or random bytes altogether."""
    kind = rng.random()
    if kind < 0.3:
        return data[: rng.randrange(len(data) + 1)]
    if kind < 0.8:
        return flip_bits(data, rng, rng.randint(1, 8), head=head if rng.random() < 0.5 else None)
    if kind < 0.95:
        position = rng.randrange(len(data) + 1)
        return data[:position] + rng.randbytes(rng.randint(1, 16)) + data[position:]
    return rng.randbytes(rng.randint(0, 2_000))


# --------------------------------------------------------------------------------------------------------------------
# spidr.ops, for every usable CPU backend.

DTYPES = [torch.float32] * 6 + [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool]


def random_tensor(rng: random.Random, shape: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of about ``shape`` (sometimes another rank or size), dtype and layout, with random values."""
    shape = list(shape)
    roll = rng.random()
    if roll < 0.06 and shape:
        shape.pop(rng.randrange(len(shape)))
    elif roll < 0.1:
        shape.insert(rng.randrange(len(shape) + 1), rng.randint(1, 2))
    elif roll < 0.16 and shape:
        shape[rng.randrange(len(shape))] = rng.randint(0, 4)
    dtype = dtype or rng.choice(DTYPES)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=generator).to(dtype)
    elif dtype == torch.bool:
        t = torch.rand(shape, generator=generator) < 0.5
    else:
        t = torch.randint(-1, 6, shape, generator=generator, dtype=dtype)
    if t.dim() >= 2 and rng.random() < 0.2:  # the same values in a non-contiguous layout
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


def labels_for(rng: random.Random, c: int, n: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    if rng.random() < 0.8:
        return torch.randint(0, max(k, 1), (c, n), generator=generator)
    if rng.random() < 0.5:
        return torch.randint(-1, k + 2, (c, n), generator=generator)  # sometimes outside [0, K)
    return random_tensor(rng, [c, n])


def fuzz_assign(rng: random.Random) -> None:
    c, n, d, k = rng.randint(0, 3), rng.randint(0, 7), rng.randint(0, 5), rng.randint(0, 4)
    x = random_tensor(rng, [c, n, d])
    codebooks = random_tensor(rng, [c, k, d], torch.float32 if rng.random() < 0.8 else None)
    counts = random_tensor(rng, [c, k], torch.float32 if rng.random() < 0.8 else None)
    if counts.is_floating_point():
        counts = counts.abs() + 1
    case = ("assign_codes", x.shape, x.dtype, codebooks.shape, codebooks.dtype, counts.shape, counts.dtype)
    ok, labels = attempt("spidr.ops", case, ops.assign_codes, x, codebooks, counts)
    if ok:
        assert labels.dtype == torch.int64 and labels.shape == x.shape[:2], case
        assert labels.numel() == 0 or (0 <= int(labels.min()) and int(labels.max()) < codebooks.shape[1]), case


def fuzz_update(rng: random.Random) -> None:
    c, n, d, k = rng.randint(0, 3), rng.randint(0, 7), rng.randint(0, 5), rng.randint(0, 4)
    codebooks = random_tensor(rng, [c, k, d], torch.float32 if rng.random() < 0.8 else None)
    counts = random_tensor(rng, [c, k], torch.float32 if rng.random() < 0.8 else None)
    x = random_tensor(rng, [c, n, d])
    labels = labels_for(rng, c, n, k)
    decay = rng.choice([0.9, 0.0, 1.0, rng.uniform(-0.5, 1.5), float("nan"), "0.9", None])
    before = (codebooks.clone(), counts.clone())
    case = ("codebook_update_", codebooks.shape, codebooks.dtype, counts.shape, x.shape, x.dtype, labels.shape, decay)
    ok, _ = attempt("spidr.ops", case, ops.codebook_update_, codebooks, counts, x, labels, decay)
    assert codebooks.shape == before[0].shape and counts.shape == before[1].shape, case
    if not ok:  # a refused update changes nothing
        assert torch.equal(codebooks, before[0]) and torch.equal(counts, before[1]), case


def fuzz_loss(rng: random.Random) -> None:
    c, n, d, k = rng.randint(0, 3), rng.randint(0, 7), rng.randint(0, 5), rng.randint(0, 4)
    h = random_tensor(rng, [c, n, d] if rng.random() < 0.5 else [n, d])
    weight = random_tensor(rng, [c, k, d])
    bias = random_tensor(rng, [c, k])
    labels = labels_for(rng, c, n, k)
    grads = rng.random() < 0.5
    for t in (h, weight, bias):
        if grads and t.is_floating_point():
            t.requires_grad_(True)
    case = ("masked_prediction_loss", h.shape, h.dtype, weight.shape, weight.dtype, bias.shape, labels.shape, grads)
    ok, out = attempt("spidr.ops", case, ops.masked_prediction_loss, h, weight, bias, labels)
    if ok:
        loss, mean_probs = out
        assert loss.shape == (h.shape[-2],) and mean_probs.shape == tuple(bias.shape), case
        if loss.requires_grad:
            loss.sum().backward()
            for t in (h, weight, bias):
                assert t.grad is None or t.grad.shape == t.shape, case


@pytest.mark.parametrize("backend", ops.backends("cpu"))
def test_ops_fuzz(backend):
    rng = random.Random(f"{SEED}-{backend}")
    cases = 60 if backend == "triton" else 300  # Triton runs in its (slow) interpreter on the CPU
    with ops.use_backend(backend):
        for _ in range(cases):
            rng.choice([fuzz_assign, fuzz_update, fuzz_loss])(rng)


# --------------------------------------------------------------------------------------------------------------------
# Audio: random bytes, truncated and bit-flipped WAV and FLAC files.


@pytest.fixture(scope="module")
def audio_samples(tmp_path_factory) -> dict[str, bytes]:
    """A real utterance cut to 0.3 s, as PCM WAV and as FLAC (encoded by TorchCodec)."""
    from torchcodec.encoders import AudioEncoder

    folder = tmp_path_factory.mktemp("audio")
    wav = load_audio(SPEECH / "alice" / "utt00.wav")[:4_800]
    AudioEncoder(wav[None], sample_rate=16_000).to_file(str(folder / "utt.flac"))
    AudioEncoder(wav[None], sample_rate=16_000).to_file(str(folder / "utt.wav"))
    return {".wav": (folder / "utt.wav").read_bytes(), ".flac": (folder / "utt.flac").read_bytes()}


def test_audio_fuzz(tmp_path, audio_samples):
    rng = random.Random(f"{SEED}-audio")
    for i in range(400):
        suffix = rng.choice([".wav", ".wav", ".flac", ".flac", ".mp3", ""])
        original = audio_samples.get(suffix) or audio_samples[rng.choice([".wav", ".flac"])]
        data = mutate(original, rng, head=64)
        path = tmp_path / f"case{i}{suffix}"
        path.write_bytes(data)
        resample, normalize = rng.random() < 0.3, rng.random() < 0.5
        case = (path.name, len(data), resample, normalize)
        ok, info = attempt("audio_info", case, audio_info, path)
        if ok:
            rate, channels, samples = info
            assert rate > 0 and channels > 0 and samples >= 0, (case, info)
        ok, wav = attempt("load_audio", case, load_audio, path, resample=resample, normalize=normalize)
        if ok:
            assert wav.dtype == torch.float32 and wav.dim() == 1 and wav.numel() > 0, case
            assert bool(torch.isfinite(wav).all()), case
        else:
            assert str(path) in str(wav), (case, wav)  # the message names the file


def test_audio_fuzz_in_tar_members(tmp_path, audio_samples):
    rng = random.Random(f"{SEED}-tar")
    archive = tmp_path / "a.tar"
    archive.write_bytes(bytes(1_000) + audio_samples[".wav"] + audio_samples[".flac"] + bytes(1_000))
    size = archive.stat().st_size
    for _ in range(100):
        member = rng.choice(["u.wav", "u.flac", "u"])
        offset = rng.choice([1_000, rng.randint(-10, size + 10)])
        length = rng.choice([len(audio_samples[".wav"]), rng.randint(-10, size + 10), 0])
        entry = AudioEntry("u", member, 1, str(archive), offset, length)
        ok, result = attempt("load_audio", entry, load_audio, entry)
        if not ok:
            assert f"{member} in archive {archive}" in str(result), (entry, result)


# --------------------------------------------------------------------------------------------------------------------
# Manifests: random and bit-flipped manifests of each kind.


def manifest_texts(tmp_path: Path) -> dict[str, str]:
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(SPEECH / "alice" / "utt00.wav", arcname="a/utt00.wav")
    rows = [("utt00", "alice/utt00.wav", 54_801), ("utt01", "bob/utt01.wav", 50_493)]
    return {
        ".csv": "fileid,path,num_samples\n" + "".join(f"{f},{p},{n}\n" for f, p, n in rows),
        "tar.csv": "fileid,path,num_samples,archive,byte_offset,byte_size\nu,a/utt00.wav,54801,s.tar,512,109646\n",
        ".jsonl": "".join(json.dumps({"fileid": f, "path": p, "num_samples": n}) + "\n" for f, p, n in rows),
        "tar.jsonl": json.dumps(
            {
                "fileid": "u",
                "path": "a/utt00.wav",
                "num_samples": 1,
                "archive": "s.tar",
                "byte_offset": 512,
                "byte_size": 9,
            }
        )
        + "\n",
        ".tsv": f"{SPEECH}\n" + "".join(f"{p}\t{n}\n" for _, p, n in rows),
    }


def test_manifest_fuzz(tmp_path):
    rng = random.Random(f"{SEED}-manifest")
    texts = manifest_texts(tmp_path)
    pieces = [",", "\t", "\n", '"', "\r\n", "{", "}", ":", "null", "-1", "1.5", "é", "\ufeff", " ", "\x00", "[1]"]
    for i in range(400):
        kind = rng.choice(list(texts))
        data = texts[kind].encode()
        if rng.random() < 0.5:
            data = mutate(data, rng)
        else:  # text-level edits that keep the bytes valid UTF-8 more often
            text = texts[kind]
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(text) + 1)
                text = text[:position] + rng.choice(pieces) + text[position + rng.randint(0, 3) :]
            data = text.encode()
        path = tmp_path / f"m{i}{Path(kind).suffix or kind}"
        path.write_bytes(data)
        check = rng.random() < 0.3
        ok, entries = attempt("read_entries", (path.name, data), read_entries, path, check_exists=check)
        if ok:
            for entry in entries:
                assert isinstance(entry, AudioEntry) and isinstance(entry.num_samples, int), (path.name, data)
                assert entry.num_samples >= 0 and entry.fileid and entry.path, (path.name, data)
        else:
            assert str(entries).startswith(str(path)), (data, entries)  # the message names the manifest


# --------------------------------------------------------------------------------------------------------------------
# Configs: random TOML and JSON, and damaged copies of the demo config.


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choices = [
        lambda: rng.randint(-(2**40), 2**40),
        lambda: rng.choice([0, 1, -1, 2, 400]),
        lambda: rng.uniform(-2, 2),
        lambda: rng.choice([float("inf"), float("-inf"), float("nan"), 1e300]),
        lambda: rng.choice(["", "x", "spidr", "dinosr", "static", "float16", "tristage", "é\u2028"]),
        lambda: rng.choice([True, False]),
    ]
    if depth < 2:
        choices.append(lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))])
        choices.append(lambda: {rng.choice(["a", "lr", "x"]): random_value(rng, depth + 1)})
    return rng.choice(choices)()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(str(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def test_config_fuzz(tmp_path):
    rng = random.Random(f"{SEED}-config")
    demo = (REPO / "configs" / "demo.toml").read_text()
    keys = {
        "run": [f.name for f in fields(RunConfig)],
        "data": [f.name for f in fields(DataConfig)],
        "model": [f.name for f in fields(SpidRConfig)],
        "optimizer": [f.name for f in fields(OptimizerConfig)],
        "masking": [f.name for f in fields(MaskingConfig)],
    }
    for i in range(400):
        roll = rng.random()
        if roll < 0.35:  # the demo with some keys set to random values
            overrides = []
            for _ in range(rng.randint(1, 3)):
                table = rng.choice(list(keys))
                overrides.append(f"{table}.{rng.choice(keys[table])}={json.dumps(random_value(rng))}")
            path, data = tmp_path / "demo.toml", demo.encode()
            path.write_bytes(data)
        elif roll < 0.55:  # damaged bytes of the demo
            path, overrides = tmp_path / f"c{i}.toml", []
            data = mutate(demo.encode(), rng)
            path.write_bytes(data)
        else:  # random tables, as TOML or JSON
            content = {
                table: {rng.choice(keys.get(table, ["x"])): random_value(rng) for _ in range(rng.randint(0, 4))}
                for table in rng.sample([*keys, "validation", "extra"], rng.randint(0, 5))
            }
            if rng.random() < 0.5:
                path = tmp_path / f"c{i}.json"
                data = json.dumps(content).encode()
            else:
                path = tmp_path / f"c{i}.toml"
                lines = [
                    f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in t.items())
                    for table, t in content.items()
                ]
                data = "\n".join(lines).encode()
            path.write_bytes(data)
            overrides = []
        ok, cfg = attempt("read_config", (data[:300], overrides), read_config, path, overrides)
        if ok:
            assert isinstance(cfg, Config), (data, overrides)
        else:
            assert str(path) in str(cfg) or "override" in str(cfg), (data, overrides, cfg)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: random, truncated and bit-flipped files through the loaders.

TINY = {
    "extractor_conv_layer_config": [(8, 10, 5), (8, 3, 2)],
    "encoder_embed_dim": 16,
    "encoder_num_layers": 2,
    "encoder_num_heads": 2,
    "encoder_ff_interm_features": 16,
    "encoder_pos_conv_kernel": 4,
    "encoder_pos_conv_groups": 2,
    "encoder_pos_conv_depth": 1,
    "codebook_size": 4,
    "num_codebooks": 1,
}


def test_checkpoint_fuzz(tmp_path):
    rng = random.Random(f"{SEED}-checkpoint")
    cfg = SpidRConfig(**TINY)
    torch.manual_seed(0)
    state = build_model(cfg=cfg).state_dict()
    original = tmp_path / "original.pt"
    torch.save({"model": state, "step": 3, "model_type": "spidr"}, original)
    data = original.read_bytes()
    for i in range(200):
        path = tmp_path / f"c{i}.pt"
        path.write_bytes(mutate(data, rng))
        case = (path.name, path.stat().st_size)
        attempt("load_checkpoint_file", case, load_checkpoint_file, path)
        ok, model = attempt("build_model", case, build_model, checkpoint=path, cfg=cfg)
        if ok:
            assert isinstance(model, DinoSR) and model.training, case  # the release's mode
        else:
            assert str(path) in str(model), (case, model)
        if i % 10 == 0:
            attempt("spidr_base", case, spidr_base, checkpoint=path)


def test_fuzz_inputs_are_reproducible():
    first, second = random.Random(f"{SEED}-x"), random.Random(f"{SEED}-x")
    assert mutate(b"0123456789" * 10, first) == mutate(b"0123456789" * 10, second)
    assert np.array_equal(random_tensor(first, [2, 3]).numpy(), random_tensor(second, [2, 3]).numpy())
