"""Record golden outputs of the reference release (spidr 0.2.0 from PyPI) for compatibility tests.

Run it inside a virtual environment where the release is installed as ``spidr`` (it cannot share one
with this project, which has the same package name), from the repository root:

    . /work/refvenv/bin/activate
    python tests/compat/generators/make_release_goldens.py tests/compat/fixtures/release_goldens.pt

It writes the golden file given as argument and, next to it, the run directory ``release_run/``
(``config.json``, ``step_2.pt``, ``final.pt``) of a 3-step training run emulated on the CPU.
Everything is seeded: running it twice gives identical files. The golden file holds only plain
tensors, lists, dicts, ints, floats, strings, bools and None, so it loads with
``torch.load(path, weights_only=True)``.

Top-level entries (every recorded case carries a ``call`` string that says how to replay it; the
``inputs`` it names are stored next to it):

- ``meta``: release version, torch / polars / torchcodec versions, the tiny model config.
- ``dataset``: ``speech_dataset`` on a manifest of the 10 committed wavs (normalize True / False)
  and on an uncompressed tar of them written with ``write_manifest_tar``: class name, length,
  manifest columns / dtypes / rows (paths relative to tests/data/speech, archive replaced by the tar
  file name), per item shape, dtype, float64 sum and sum of squares and the first 32 samples; full
  items 0 and 5 (normalize=True); ``num_samples`` of each wav; ``write_manifest`` /
  ``write_manifest_fairseq`` / ``read_manifest`` outputs; reading errors.
- ``masks``: ``compute_mask_indices`` over a grid of arguments (including seeded generators),
  ``mask_lengths`` / ``mask_id_overlap`` / ``mask_id_no_overlap`` called directly, ``MaskGenerator``
  outputs, and the poisson strategy (which draws its rates from the global RNG).
- ``samplers``: ``BucketizeBatchSampler`` iteration lists over 200 seeded lengths (token-count and
  batch-size modes, epochs 0 / 1 / 2), ``get_buckets``, ``DistributedBatchSampler`` per rank,
  ``verify_lengths`` errors, ``conv_length`` and ``crop_audio``.
- ``collate``: ``SpeechCollatorWithMasking`` on 4 real waveforms for padding / cropping variants.
- ``dataloader``: ``build_dataloader`` batches for epochs 1 and 2, with and without persistent workers.
- ``schedules``: the EMA schedulers, and the learning rates of ``build_optimizer`` for each scheduler
  type over 60 steps, with and without ``remove_param_group`` at step 25; the param groups.
- ``run_dir``: what the emulated run did and stored, and what 0.2.0 loads back from it.
- ``metrics``: ``perplexities``, ``bitrate``, ``units_quality``, ``proba_phone_code``,
  ``build_count_matrix``, ``params_norm`` on seeded inputs.
- ``tools``: ``AverageMeters``, ``MetricsQueue`` (call by call), ``find_checkpoints`` and
  ``Checkpointer.last``.
- ``config``: default values of every config dataclass, ``read_config`` round trip and errors.
"""

import contextlib
import dataclasses
import importlib.metadata
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

# The script's own folder is sys.path[0]; make sure nothing from this repository shadows the release.
REPO = Path(__file__).resolve().parents[3]
os.environ.setdefault("TQDM_DISABLE", "1")  # write_manifest* show progress bars
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

import polars as pl  # noqa: E402
import torch  # noqa: E402
import torchcodec  # noqa: E402
from torch import distributed as dist  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import spidr  # noqa: E402
from spidr.checkpoint import Checkpointer, find_checkpoints, remove_param_group  # noqa: E402
from spidr.config import (  # noqa: E402
    DEFAULT_CONV_LAYER_CONFIG,
    Config,
    DataConfig,
    DinoSRConfig,
    MaskingConfig,
    OptimizerConfig,
    ResumeConfig,
    RunConfig,
    SpidRConfig,
    read_config,
)
from spidr.data import build_dataloader, num_samples, read_manifest, speech_dataset  # noqa: E402
from spidr.data.dataset import (  # noqa: E402
    BucketizeBatchSampler,
    DistributedBatchSampler,
    SpeechCollatorWithMasking,
    conv_length,
    crop_audio,
    get_buckets,
    verify_lengths,
)
from spidr.data.masks import (  # noqa: E402
    MaskGenerator,
    compute_mask_indices,
    mask_id_no_overlap,
    mask_id_overlap,
    mask_lengths,
)
from spidr.data.write_manifest import write_manifest, write_manifest_fairseq, write_manifest_tar  # noqa: E402
from spidr.environment import set_seed  # noqa: E402
from spidr.models import build_model  # noqa: E402
from spidr.models.dinosr import ema_scheduler  # noqa: E402
from spidr.models.metrics import (  # noqa: E402
    bitrate,
    build_count_matrix,
    params_norm,
    perplexities,
    proba_phone_code,
    units_quality,
)
from spidr.models.spidr import exp_ema_scheduler  # noqa: E402
from spidr.optimizer import build_optimizer  # noqa: E402
from spidr.tools import AverageMeters, MetricsQueue  # noqa: E402
from spidr.tools.metrics_queue import pull_inserted_lines  # noqa: E402

SPEECH = REPO / "tests" / "data" / "speech"
TINY = {
    "extractor_conv_layer_config": [(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
    "encoder_embed_dim": 32,
    "encoder_num_layers": 3,
    "encoder_num_heads": 4,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_groups": 4,
    "encoder_pos_conv_kernel": 16,
    "encoder_pos_conv_depth": 2,
    "codebook_size": 12,
    "num_codebooks": 2,
    "encoder_attention_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_drop": 0.0,
    "freeze_step": 2,
}
SMALL_OPT = {
    "warmup_steps": 10,
    "hold_steps": 20,
    "decay_steps": 30,
    "max_steps": 60,
    "rsqrt_timescale": 5,
    "rsqrt_shift": 2,
}
TINY_CALL = "SpidRConfig(**meta['tiny_model_config'])"


# ----------------------------------------------------------------------------------------------- helpers


def keep(t: torch.Tensor) -> torch.Tensor:
    """A compact copy: slices and expanded views would otherwise save their whole storage."""
    return t.detach().clone().contiguous()


def plain(value: Any) -> Any:
    """Turn tuples, paths, dtypes and other values into plain picklable types."""
    if isinstance(value, torch.Tensor):
        return keep(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str | int) else str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def stats(t: torch.Tensor) -> dict:
    d = t.detach().double()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype),
        "sum": d.sum().item(),
        "sumsq": d.square().sum().item(),
    }


def check_plain(value: Any, where: str) -> None:
    """Fail early on anything but the plain types the golden file promises."""
    if type(value) is dict:
        for k, v in value.items():
            if type(k) not in {str, int}:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__}")
            check_plain(v, f"{where}[{k!r}]")
    elif type(value) is list:
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    elif type(value) is torch.Tensor:
        if value.layout != torch.strided or not value.is_contiguous():
            raise TypeError(f"{where}: non-dense tensor")
    elif value is not None and type(value) not in {bool, int, float, str}:
        raise TypeError(f"{where}: {type(value).__name__}")


def error_of(fn, *args, **kwargs) -> dict:
    """Run ``fn`` and return its result or the exception it raised."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        return {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}
    return {"ok": True, "result": plain(result)}


def tensor_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else keep(t)


def padding_mask_from(lengths: list[int], frames: int) -> torch.Tensor:
    return torch.arange(frames).expand(len(lengths), frames) >= torch.tensor(lengths)[:, None]


def tiny_config(**overrides: Any) -> SpidRConfig:
    return SpidRConfig(**(TINY | overrides))


def manifest_rows(df: pl.DataFrame, *, replace: dict[str, Any]) -> list[list]:
    rows = []
    for row in df.iter_rows(named=True):
        for column, fn in replace.items():
            if column in row:
                row[column] = fn(row[column])
        rows.append([row[c] for c in df.columns])
    return rows


def relative_to_speech(path: str) -> str:
    return Path(path).resolve().relative_to(SPEECH.resolve()).as_posix()


# ----------------------------------------------------------------------------------------------- dataset


def write_abs_manifest(folder: Path) -> Path:
    """The committed manifest with absolute paths (0.2.0 reads paths relative to the current directory)."""
    lines = (SPEECH / "manifest.csv").read_text(encoding="utf-8").splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        fileid, path, n = line.split(",")
        out.append(f"{fileid},{(SPEECH / path).resolve()},{n}")
    target = folder / "manifest.csv"
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
    return target


def build_tar(folder: Path) -> Path:
    """Uncompressed, reproducible tar of the 10 wavs, members named like the manifest's paths."""
    tar = folder / "speech.tar"
    rel_paths = [line.split(",")[1] for line in (SPEECH / "manifest.csv").read_text().splitlines()[1:]]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for rel in rel_paths:
            info = tf.gettarinfo(SPEECH / rel, arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with (SPEECH / rel).open("rb") as fh:
                tf.addfile(info, fh)
    return tar


def describe_dataset(ds, *, replace: dict[str, Any], full_items: tuple[int, ...]) -> dict:
    manifest = ds.manifest
    items = []
    full = {}
    for i in range(len(ds)):
        wav = ds[i]
        items.append(stats(wav) | {"first32": keep(wav[:32])})
        if i in full_items:
            full[i] = keep(wav)
    return {
        "class_name": type(ds).__name__,
        "len": len(ds),
        "normalize": ds.normalize,
        "columns": list(manifest.columns),
        "dtypes": [str(t) for t in manifest.dtypes],
        "rows": manifest_rows(manifest, replace=replace),
        "items": items,
        "full_items": full,
    }


def dataset_section(tmp: Path) -> dict:
    manifest = write_abs_manifest(tmp)
    out: dict[str, Any] = {
        "note": (
            "Manifest = tests/data/speech/manifest.csv with each path made absolute (written to a temp dir); "
            "rows below have paths relative to tests/data/speech. first32 = item[:32]; sum / sumsq in float64."
        ),
    }
    for normalize in (True, False):
        ds = speech_dataset(manifest, normalize=normalize)
        key = f"files_normalize_{normalize}"
        out[key] = describe_dataset(
            ds, replace={"path": relative_to_speech}, full_items=(0, 5) if normalize else ()
        ) | {"call": f"speech_dataset(<abs manifest>, normalize={normalize})"}

    tar = build_tar(tmp)
    tar_manifest = tmp / "speech_tar.csv"
    with contextlib.redirect_stderr(io.StringIO()):
        path_arg = error_of(write_manifest_tar, tar, tmp / "unused.csv", ".wav")
        write_manifest_tar(str(tar), tar_manifest, ".wav")
    out["archive_note"] = (
        "speech.tar: USTAR, members in manifest order, named like manifest paths ('alice/utt00.wav'), "
        "mtime/uid/gid 0, empty uname/gname, mode 0o644. Manifest written by "
        "write_manifest_tar(str(tar), out_csv, '.wav'); the 'archive' column holds str(tar) and is "
        "replaced by 'speech.tar' below."
    )
    out["write_manifest_tar_with_path_object"] = path_arg | {
        "call": "write_manifest_tar(Path(tar), out_csv, '.wav')",
        "note": "0.2.0 fails when the archive is a pathlib.Path: polars pl.lit(Path) raises TypeError",
    }
    for normalize in (True, False):
        ds = speech_dataset(tar_manifest, normalize=normalize)
        out[f"archive_normalize_{normalize}"] = describe_dataset(
            ds, replace={"archive": lambda p: Path(p).name}, full_items=()
        ) | {"call": f"speech_dataset(<tar manifest>, normalize={normalize})"}

    wavs = [line.split(",")[1] for line in (SPEECH / "manifest.csv").read_text().splitlines()[1:]]
    out["num_samples"] = {
        "call": "num_samples(SPEECH / rel) / num_samples(SPEECH / rel, verify=True) / num_samples(bytes)",
        "paths": wavs,
        "values": [num_samples(SPEECH / rel) for rel in wavs],
        "values_str_path": [num_samples(str(SPEECH / rel)) for rel in wavs],
        "values_verify": [num_samples(SPEECH / rel, verify=True) for rel in wavs],
        "values_bytes": [num_samples((SPEECH / rel).read_bytes()) for rel in wavs],
    }

    with contextlib.redirect_stderr(io.StringIO()):
        write_manifest(SPEECH, tmp / "wm.csv", ".wav")
        write_manifest_fairseq(SPEECH, tmp / "wm.tsv", ".wav")
    wm = read_manifest(tmp / "wm.csv")
    tsv = read_manifest(tmp / "wm.tsv")
    tsv_lines = (tmp / "wm.tsv").read_text().splitlines()
    out["write_manifest"] = {
        "call": "write_manifest(SPEECH, out_csv, '.wav'); read_manifest(out_csv)",
        "note": "rows sorted by path (0.2.0 writes them in rglob order, which is filesystem dependent); "
        "the path column is absolute in the file, relative here",
        "columns": list(wm.columns),
        "dtypes": [str(t) for t in wm.dtypes],
        "rows": sorted(manifest_rows(wm, replace={"path": relative_to_speech}), key=lambda r: r[1]),
        "header_line": (tmp / "wm.csv").read_text().splitlines()[0],
    }
    out["write_manifest_fairseq"] = {
        "call": "write_manifest_fairseq(SPEECH, out_tsv, '.wav'); read_manifest(out_tsv)",
        "note": "first line is str(SPEECH.resolve()) (replaced by <ROOT>); data lines sorted; read rows sorted",
        "file_lines": ["<ROOT>" if tsv_lines[0] == str(SPEECH.resolve()) else tsv_lines[0], *sorted(tsv_lines[1:])],
        "columns": list(tsv.columns),
        "dtypes": [str(t) for t in tsv.dtypes],
        "rows": sorted(manifest_rows(tsv, replace={"path": relative_to_speech}), key=lambda r: r[1]),
    }
    jsonl = tmp / "m.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"fileid": r[0], "path": r[1], "num_samples": r[2]}) + "\n" for r in wm.rows()),
        encoding="utf-8",
    )
    jl = read_manifest(jsonl)
    out["read_manifest_jsonl"] = {
        "call": "read_manifest(<jsonl with keys fileid, path, num_samples>)",
        "columns": list(jl.columns),
        "dtypes": [str(t) for t in jl.dtypes],
    }
    (tmp / "m.txt").write_text("x\n")
    (tmp / "bad.tsv").write_text("/nonexistent/root/dir\nfoo.wav\t12\n")
    out["read_manifest_errors"] = {
        "txt": error_of(read_manifest, tmp / "m.txt") | {"call": "read_manifest('m.txt')"},
        "tsv_bad_root": error_of(read_manifest, tmp / "bad.tsv")
        | {"call": "read_manifest('bad.tsv') whose first line is '/nonexistent/root/dir'"},
    }
    return out


# ----------------------------------------------------------------------------------------------- masks

PADDING_LENGTHS = {(4, 120): [120, 101, 87, 64], (3, 57): [57, 44, 30]}
MASK_TYPES = [("static", 0.0), ("uniform", 2), ("normal", 2.0)]
OVERLAPS = [(False, 1), (True, 1), (True, 2)]


def masks_section() -> dict:
    grid = []
    for shape in PADDING_LENGTHS:
        for padded in (False, True):
            for mask_prob in (0.65, 0.8):
                for mask_length in (5, 10):
                    for mask_type, mask_other in MASK_TYPES:
                        for no_overlap, min_space in OVERLAPS:
                            for seed in (0, 1, 2):
                                lengths = PADDING_LENGTHS[shape] if padded else None
                                pm = None if lengths is None else padding_mask_from(lengths, shape[1])
                                out = compute_mask_indices(
                                    shape,
                                    pm,
                                    mask_prob,
                                    mask_length,
                                    mask_type,
                                    mask_other,
                                    2,
                                    min_space,
                                    no_overlap=no_overlap,
                                    generator=torch.Generator().manual_seed(seed),
                                )
                                grid.append(
                                    {
                                        "shape": list(shape),
                                        "padding_lengths": lengths,
                                        "mask_prob": mask_prob,
                                        "mask_length": mask_length,
                                        "mask_type": mask_type,
                                        "mask_other": mask_other,
                                        "min_masks": 2,
                                        "min_space": min_space,
                                        "no_overlap": no_overlap,
                                        "seed": seed,
                                        "output": keep(out),
                                    }
                                )
    result: dict[str, Any] = {
        "grid_call": (
            "compute_mask_indices(tuple(e['shape']), padding_mask, e['mask_prob'], e['mask_length'], "
            "e['mask_type'], e['mask_other'], e['min_masks'], e['min_space'], no_overlap=e['no_overlap'], "
            "generator=torch.Generator().manual_seed(e['seed'])) where padding_mask is None if "
            "e['padding_lengths'] is None else torch.arange(T).expand(B, T) >= torch.tensor(lengths)[:, None]"
        ),
        "grid": grid,
    }

    # Poisson: the rates come from torch.rand(num_mask) on the GLOBAL generator.
    poisson = []
    for padded in (False, True):
        for no_overlap, min_space in ((False, 1), (True, 1)):
            for seed in (0, 1):
                global_seed = 1234 + seed
                shape = (4, 120)
                lengths = PADDING_LENGTHS[shape] if padded else None
                pm = None if lengths is None else padding_mask_from(lengths, shape[1])
                torch.manual_seed(global_seed)
                out = compute_mask_indices(
                    shape,
                    pm,
                    0.65,
                    10,
                    "poisson",
                    0.0,
                    2,
                    min_space,
                    no_overlap=no_overlap,
                    generator=torch.Generator().manual_seed(seed),
                )
                poisson.append(
                    {
                        "shape": list(shape),
                        "padding_lengths": lengths,
                        "mask_prob": 0.65,
                        "mask_length": 10,
                        "mask_type": "poisson",
                        "mask_other": 0.0,
                        "min_masks": 2,
                        "min_space": min_space,
                        "no_overlap": no_overlap,
                        "seed": seed,
                        "global_seed": global_seed,
                        "output": keep(out),
                    }
                )
    result["poisson"] = poisson
    result["poisson_note"] = (
        "0.2.0's mask_lengths('poisson') calls torch.poisson(torch.rand(num_mask) * mask_length, generator=g): "
        "the rates come from the GLOBAL torch RNG, not from the generator. Each entry was produced with "
        "torch.manual_seed(e['global_seed']) right before the same call as the grid."
    )

    direct: dict[str, Any] = {}
    for mask_type, mask_other in [("static", 0.0), ("uniform", 2), ("uniform", 0), ("normal", 2.0), ("normal", 5.0)]:
        key = f"{mask_type}_{mask_other}"
        direct[key] = {
            "call": f"mask_lengths(8, 10, {mask_other!r}, {mask_type!r}, torch.Generator().manual_seed(3))",
            "output": keep(mask_lengths(8, 10, mask_other, mask_type, torch.Generator().manual_seed(3))),
        }
    torch.manual_seed(77)
    direct["poisson_0.0"] = {
        "call": "torch.manual_seed(77); mask_lengths(8, 10, 0.0, 'poisson', torch.Generator().manual_seed(3))",
        "global_seed": 77,
        "output": keep(mask_lengths(8, 10, 0.0, "poisson", torch.Generator().manual_seed(3))),
    }
    direct["unknown"] = error_of(mask_lengths, 8, 10, 0.0, "bogus", None) | {
        "call": "mask_lengths(8, 10, 0.0, 'bogus', None)"
    }
    result["mask_lengths"] = direct

    overlap_cases = [
        ([10] * 6, 6, 120, 0),
        ([3, 7, 12, 5, 9], 5, 120, 1),
        ([10, 10, 10], 3, 12, 2),  # sz - min(lengths) <= num_mask: 0.2.0 shrinks min_len to sz - num_mask - 1
        ([4, 2, 6], 3, 30, 3),
    ]
    result["mask_id_overlap"] = [
        {
            "lengths": lengths,
            "num_mask": num_mask,
            "sz": sz,
            "seed": seed,
            "call": "mask_id_overlap(torch.tensor(lengths), num_mask, sz, torch.Generator().manual_seed(seed))",
            "output": keep(mask_id_overlap(torch.tensor(lengths), num_mask, sz, torch.Generator().manual_seed(seed))),
        }
        for lengths, num_mask, sz, seed in overlap_cases
    ]
    no_overlap_cases = [
        ([10] * 6, 1, 120, 0),
        ([10] * 6, 2, 120, 1),
        ([3, 7, 12, 5, 9], 1, 120, 2),
        ([10] * 8, 1, 50, 3),  # runs out of room: 0.2.0 stops placing spans
        ([5, 5], 3, 14, 4),
    ]
    result["mask_id_no_overlap"] = [
        {
            "lengths": lengths,
            "min_space": min_space,
            "sz": sz,
            "seed": seed,
            "call": "mask_id_no_overlap(torch.tensor(lengths), min_space, sz, torch.Generator().manual_seed(seed))",
            "output": keep(
                mask_id_no_overlap(torch.tensor(lengths), min_space, sz, torch.Generator().manual_seed(seed))
            ),
        }
        for lengths, min_space, sz, seed in no_overlap_cases
    ]

    generators: dict[str, Any] = {}
    pm = padding_mask_from([120, 101, 87, 64], 120)
    for key, cfg_kwargs, channels in [
        ("default", {}, None),
        ("default_channels16", {}, 16),
        ("channel_prob_0.2", {"mask_channel_prob": 0.2}, 16),
        (
            "channel_prob_0.5_no_overlap",
            {"mask_channel_prob": 0.5, "no_mask_channel_overlap": True, "mask_channel_length": 3},
            16,
        ),
        ("mask_prob_0", {"mask_prob": 0.0}, None),
        (
            "uniform_no_overlap",
            {"mask_selection": "uniform", "mask_other": 2, "no_mask_overlap": True, "mask_min_space": 2},
            None,
        ),
    ]:
        for padded in (False, True):
            mask = pm if padded else torch.zeros_like(pm)
            kwargs = {} if channels is None else {"channels": channels}
            indices, channel = MaskGenerator(MaskingConfig(**cfg_kwargs))(
                mask, generator=torch.Generator().manual_seed(5), **kwargs
            )
            generators[f"{key}_padded_{padded}"] = {
                "config": cfg_kwargs,
                "channels": channels,
                "padding_lengths": [120, 101, 87, 64] if padded else None,
                "call": (
                    "MaskGenerator(MaskingConfig(**config))(padding_mask, generator=torch.Generator().manual_seed(5)"
                    + ("" if channels is None else ", channels=channels")
                    + ")  # padding_mask (4, 120) bool, "
                    "all False when padding_lengths is None"
                ),
                "mask_indices": tensor_or_none(indices),
                "mask_channel_indices_shape": None if channel is None else list(channel.shape),
                "mask_channel_indices_stride": None if channel is None else list(channel.stride()),
                "mask_channel_indices_dtype": None if channel is None else str(channel.dtype),
                "mask_channel_indices_time0": None if channel is None else keep(channel[:, 0, :]),
                "mask_channel_indices_constant_over_time": None
                if channel is None
                else bool((channel == channel[:, :1, :]).all()),
            }
    generators["channel_prob_without_channels"] = error_of(
        MaskGenerator(MaskingConfig(mask_channel_prob=0.2)), torch.zeros(2, 50, dtype=torch.bool)
    ) | {"call": "MaskGenerator(MaskingConfig(mask_channel_prob=0.2))(torch.zeros(2, 50, dtype=torch.bool))"}
    result["mask_generator"] = generators
    result["mask_generator_note"] = (
        "mask_channel_indices is (batch, time, channels) bool, an expanded view of a (batch, channels) mask "
        "(stride 0 over time); only [:, 0, :] is stored."
    )
    return result


# ----------------------------------------------------------------------------------------------- samplers


def bucketize(**kwargs: Any) -> BucketizeBatchSampler:
    return BucketizeBatchSampler(**kwargs)


def sampler_epochs(sampler) -> dict:
    out = {"epoch0": [list(b) for b in sampler.iter_list], "len0": len(sampler)}
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        out[f"epoch{epoch}"] = [list(b) for b in sampler.iter_list]
        out[f"len{epoch}"] = len(sampler)
    return out


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    saved = dist.is_initialized, dist.get_world_size, dist.get_rank
    dist.is_initialized = lambda: True  # ty: ignore
    dist.get_world_size = lambda *a, **k: world_size  # ty: ignore
    dist.get_rank = lambda *a, **k: rank  # ty: ignore
    try:
        yield
    finally:
        dist.is_initialized, dist.get_world_size, dist.get_rank = saved


def samplers_section() -> dict:
    lengths = torch.randint(1000, 400_001, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    out: dict[str, Any] = {
        "lengths": lengths,
        "lengths_call": "torch.randint(1000, 400_001, (200,), generator=torch.Generator().manual_seed(0)).tolist()",
    }
    token = {}
    for bucket_method in ("uniform", "percentile"):
        for shuffle in (True, False):
            for drop_last in (False, True):
                kwargs = {
                    "lengths": "<lengths>",
                    "num_buckets": 10,
                    "min_len": 2000,
                    "max_len": 320_000,
                    "max_token_count": 1_000_000,
                    "batch_size": None,
                    "seed": 3,
                    "bucket_method": bucket_method,
                    "shuffle": shuffle,
                    "drop_last": drop_last,
                }
                sampler = bucketize(**(kwargs | {"lengths": lengths}))
                token[f"{bucket_method}_shuffle_{shuffle}_drop_last_{drop_last}"] = {
                    "kwargs": kwargs,
                    "sorted_lengths": list(sampler.lengths),
                    "sorted_indices": list(sampler.indices),
                    "buckets": {k: keep(v) for k, v in sampler.buckets.items()},
                } | sampler_epochs(sampler)
    kwargs = {
        "lengths": "<lengths>",
        "num_buckets": 7,
        "min_len": 0,
        "max_len": None,
        "max_token_count": 1_500_000,
        "batch_size": None,
        "seed": 0,
        "bucket_method": "uniform",
        "shuffle": True,
        "drop_last": False,
    }
    token["max_len_none"] = {"kwargs": kwargs} | sampler_epochs(bucketize(**(kwargs | {"lengths": lengths})))
    out["token_count"] = token
    out["token_count_call"] = (
        "s = BucketizeBatchSampler(**(kwargs | {'lengths': lengths})); epoch0 = s.iter_list right after "
        "construction; then s.set_epoch(1) -> epoch1; s.set_epoch(2) -> epoch2 (same object, in that order)"
    )

    batch = {}
    for shuffle in (True, False):
        for drop_last in (False, True):
            kwargs = {
                "lengths": "<lengths>",
                "num_buckets": 10,
                "min_len": 2000,
                "max_len": 320_000,
                "max_token_count": None,
                "batch_size": 8,
                "seed": 1,
                "bucket_method": "uniform",
                "shuffle": shuffle,
                "drop_last": drop_last,
            }
            batch[f"shuffle_{shuffle}_drop_last_{drop_last}"] = {"kwargs": kwargs} | sampler_epochs(
                bucketize(**(kwargs | {"lengths": lengths}))
            )
    out["batch_size"] = batch

    base = {
        "lengths": lengths,
        "num_buckets": 10,
        "min_len": 2000,
        "max_len": 320_000,
        "max_token_count": 1_000_000,
        "batch_size": None,
        "seed": 0,
        "bucket_method": "uniform",
        "shuffle": True,
        "drop_last": False,
    }
    out["bucketize_errors"] = {
        "no_samples": error_of(bucketize, **(base | {"min_len": 500_000, "max_len": 600_000}))
        | {"call": "BucketizeBatchSampler(**(base | {'min_len': 500_000, 'max_len': 600_000}))"},
        "bad_bucket_method": error_of(bucketize, **(base | {"bucket_method": "bogus"}))
        | {"call": "BucketizeBatchSampler(**(base | {'bucket_method': 'bogus'}))"},
        "base": {k: v for k, v in base.items() if k != "lengths"},
    }

    small = [5, 1, 9, 3, 7, 3, 10, 2]
    out["get_buckets"] = {
        "uniform": {
            "call": "get_buckets([5, 1, 9, 3, 7, 3, 10, 2], 3, (1, 10))",
            "output": plain(get_buckets(small, 3, (1, 10))),
        },
        "percentile": {
            "call": "get_buckets([5, 1, 9, 3, 7, 3, 10, 2], 3, None)",
            "output": plain(get_buckets(small, 3, None)),
        },
        "uniform_many": {
            "call": "get_buckets(lengths[:40], 5, (2000, 320000))",
            "output": plain(get_buckets(lengths[:40], 5, (2000, 320_000))),
        },
        "percentile_many": {
            "call": "get_buckets(lengths[:40], 5, None)",
            "output": plain(get_buckets(lengths[:40], 5, None)),
        },
    }

    distributed = {}
    for world_size in (2, 3):
        for drop_last in (False, True):
            for shuffle in (True, False):
                for rank in range(world_size):
                    inner_kwargs = {  # percentile: 43 batches in epochs 0 and 1, 42 in epoch 2
                        "lengths": "<lengths>",
                        "num_buckets": 10,
                        "min_len": 2000,
                        "max_len": 320_000,
                        "max_token_count": 1_000_000,
                        "batch_size": None,
                        "seed": 3,
                        "bucket_method": "percentile",
                        "shuffle": True,
                        "drop_last": drop_last,
                    }
                    inner = bucketize(**(inner_kwargs | {"lengths": lengths}))
                    with fake_world(world_size, rank):
                        sampler = DistributedBatchSampler(inner, seed=0, shuffle=shuffle, drop_last=drop_last)
                    entry = {
                        "world_size": world_size,
                        "rank": rank,
                        "shuffle": shuffle,
                        "drop_last": drop_last,
                        "inner_kwargs": inner_kwargs,
                        "len_after_init": len(sampler),
                        "inner_len_epoch0": len(inner),
                    }
                    for epoch in (1, 2):
                        sampler.set_epoch(epoch)
                        entry[f"inner_len_epoch{epoch}"] = len(inner)
                        entry[f"epoch{epoch}"] = [list(b) for b in sampler]
                        entry[f"len_epoch{epoch}"] = len(sampler)
                    distributed[f"ws{world_size}_rank{rank}_shuffle_{shuffle}_drop_last_{drop_last}"] = entry
    out["distributed"] = distributed
    out["distributed_call"] = (
        "inner = BucketizeBatchSampler(**(inner_kwargs | {'lengths': lengths})); with torch.distributed."
        "is_initialized/get_world_size/get_rank patched to (True, world_size, rank): "
        "s = DistributedBatchSampler(inner, seed=0, shuffle=shuffle, drop_last=drop_last); len_after_init = len(s); "
        "for epoch in (1, 2): s.set_epoch(epoch); epochN = list(s); len_epochN = len(s)"
    )

    out["verify_lengths"] = {
        name: error_of(verify_lengths, *args) | {"args": list(args), "call": f"verify_lengths(*{list(args)!r})"}
        for name, args in [
            ("valid_tokens", (0, 10, None, 100)),
            ("valid_batch", (5, 5, 4, None)),
            ("min_gt_max", (10, 5, None, 100)),
            ("negative_min", (-1, 5, None, 100)),
            ("both_set", (0, 10, 4, 100)),
            ("none_set", (0, 10, None, None)),
            ("max_gt_tokens", (0, 200, None, 100)),
            ("all_errors", (300, 200, 4, 100)),
            ("min_gt_max_none_set", (10, 5, None, None)),
        ]
    }

    lens = torch.tensor([0, 1, 399, 400, 401, 719, 720, 16_000, 42_662, 54_801, 100_000, 320_000])
    out["conv_length"] = {
        "input": keep(lens),
        "default": keep(conv_length(DEFAULT_CONV_LAYER_CONFIG, lens)),
        "tiny": keep(conv_length(TINY["extractor_conv_layer_config"], lens)),
        "custom": keep(conv_length([(8, 4, 3), (8, 5, 1)], lens)),
        "call": "conv_length(config, input) for config in DEFAULT_CONV_LAYER_CONFIG / tiny / [(8, 4, 3), (8, 5, 1)]",
    }

    crops = []
    wav = torch.arange(1000, dtype=torch.float32)
    for num, max_size, rand_crop in [
        (300, 1000, True),
        (300, 200, True),
        (2000, 5000, True),
        (1000, 5000, True),
        (300, 1000, False),
        (2000, 500, False),
        (999, 5000, True),
    ]:
        for k in (0, 1, 2):
            torch.manual_seed(k)
            cropped, length = crop_audio(wav, num, max_size, rand_crop=rand_crop)
            crops.append(
                {
                    "num_samples": num,
                    "max_sample_size": max_size,
                    "rand_crop": rand_crop,
                    "global_seed": k,
                    "returned_length": length,
                    "out_len": cropped.numel(),
                    "offset": int(cropped[0].item()) if cropped.numel() else None,
                    "sum": cropped.double().sum().item(),
                }
            )
    out["crop_audio"] = {
        "call": "torch.manual_seed(global_seed); crop_audio(torch.arange(1000, dtype=torch.float32), num_samples, "
        "max_sample_size, rand_crop=rand_crop)  # offset = out[0]",
        "cases": crops,
    }
    return out


# ----------------------------------------------------------------------------------------------- collate


def collate_section(tmp: Path) -> dict:
    ds = speech_dataset(write_abs_manifest(tmp), normalize=True)
    indices = [0, 1, 2, 5]
    batch = [ds[i] for i in indices]
    cases = {}
    for max_sample_size in (50_000, 320_000):
        for enable_padding in (False, True):
            for rand_crop in (True, False):
                for seed in (0, 1):
                    collator = SpeechCollatorWithMasking(
                        MaskGenerator(MaskingConfig()),
                        max_sample_size=max_sample_size,
                        conv_layer_config=DEFAULT_CONV_LAYER_CONFIG,
                        enable_padding=enable_padding,
                        rand_crop=rand_crop,
                    )
                    torch.manual_seed(seed)
                    wavs, attn, mask = collator(batch)
                    cases[f"max{max_sample_size}_padding_{enable_padding}_crop_{rand_crop}_seed{seed}"] = {
                        "max_sample_size": max_sample_size,
                        "enable_padding": enable_padding,
                        "rand_crop": rand_crop,
                        "global_seed": seed,
                        "waveforms_shape": list(wavs.shape),
                        "waveforms_dtype": str(wavs.dtype),
                        "row_sums": [wavs[i].double().sum().item() for i in range(wavs.size(0))],
                        "row_sumsq": [wavs[i].double().square().sum().item() for i in range(wavs.size(0))],
                        "first64": keep(wavs[:, :64]),
                        "attn_mask": tensor_or_none(attn),
                        "mask_indices": tensor_or_none(mask),
                    }
    return {
        "dataset_indices": indices,
        "dataset_lengths": [len(w) for w in batch],
        "call": (
            "batch = [speech_dataset(<abs manifest>, normalize=True)[i] for i in dataset_indices]; "
            "c = SpeechCollatorWithMasking(MaskGenerator(MaskingConfig()), max_sample_size=..., "
            "conv_layer_config=DEFAULT_CONV_LAYER_CONFIG, enable_padding=..., rand_crop=...); "
            "torch.manual_seed(global_seed); waveforms, attn_mask, mask_indices = c(batch)"
        ),
        "note": "0.2.0 draws crop offsets (torch.randint) and then the masks from the GLOBAL torch RNG.",
        "cases": cases,
    }


# ----------------------------------------------------------------------------------------------- dataloader


def dataloader_section(tmp: Path) -> dict:
    manifest = write_abs_manifest(tmp)
    out: dict[str, Any] = {}
    for persistent in (False, True):
        data_cfg = DataConfig(
            manifest=str(manifest),
            num_workers=1,
            max_batch_length=200_000,
            max_sample_size=100_000,
            pin_memory=False,
            persistent_workers=persistent,
        )
        loader = build_dataloader(data_cfg, MaskingConfig())
        entry: dict[str, Any] = {
            "data_config": plain(dataclasses.asdict(data_cfg)) | {"manifest": "<abs manifest>"},
            "len_loader_initial": len(loader),
            "loader_class": type(loader).__name__,
            "batch_sampler_class": type(loader.batch_sampler).__name__,
        }
        for epoch in (1, 2):
            loader.batch_sampler.set_epoch(epoch)
            batch_indices = [list(b) for b in loader.batch_sampler]
            batches = []
            for wavs, attn, mask in loader:
                batches.append(
                    {
                        "waveforms_shape": list(wavs.shape),
                        "row_sums": [wavs[i].double().sum().item() for i in range(wavs.size(0))],
                        "row_sumsq": [wavs[i].double().square().sum().item() for i in range(wavs.size(0))],
                        "first64": keep(wavs[:, :64]),
                        "attn_mask": tensor_or_none(attn),
                        "mask_indices": tensor_or_none(mask),
                    }
                )
            entry[f"epoch{epoch}"] = {"batch_indices": batch_indices, "batches": batches, "len_loader": len(loader)}
        del loader
        out[f"persistent_workers_{persistent}"] = entry
    out["call"] = (
        "loader = build_dataloader(DataConfig(manifest=<abs manifest>, num_workers=1, max_batch_length=200_000, "
        "max_sample_size=100_000, pin_memory=False, persistent_workers=...), MaskingConfig()); "
        "for epoch in (1, 2): loader.batch_sampler.set_epoch(epoch); batch_indices = list(loader.batch_sampler); "
        "batches = list(loader)"
    )
    out["note"] = (
        "The collate runs in the worker, whose global RNG is seeded from the loader's generator "
        "(torch.Generator().manual_seed(random_seed + rank)); with persistent workers epoch 2 continues the "
        "worker RNG of epoch 1, without them each epoch starts a new worker with the next base seed."
    )
    out["num_workers_0"] = error_of(
        build_dataloader, DataConfig(manifest=str(manifest), num_workers=0), MaskingConfig()
    ) | {"call": "build_dataloader(DataConfig(manifest=<abs manifest>, num_workers=0), MaskingConfig())"}
    out["num_workers_0_not_persistent"] = error_of(
        build_dataloader,
        DataConfig(manifest=str(manifest), num_workers=0, persistent_workers=False),
        MaskingConfig(),
    ) | {
        "call": "build_dataloader(DataConfig(manifest=<abs manifest>, num_workers=0, persistent_workers=False), "
        "MaskingConfig())"
    }
    return out


# ----------------------------------------------------------------------------------------------- schedules

EMA_STEPS = [0, 1, 10, 100, 1000, 12345, 29999, 30000, 30001, 199999, 200000, 250000, 400000]


def group_summary(optimizer, names: dict[int, str]) -> list[dict]:
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: plain(v) for k, v in group.items() if k != "params"}
        groups.append({"param_names": [names[id(p)] for p in group["params"]], "hyper": hyper})
    return groups


def lr_trajectory(cfg: OptimizerConfig, remove_at: int | None) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg=tiny_config())
    names = {id(p): n for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer, scaler, scheduler = build_optimizer(model, cfg)
        lrs = [list(scheduler.get_last_lr())]
        after_remove = None
        for step in range(1, 61):
            optimizer.step()
            scheduler.step()
            lrs.append(list(scheduler.get_last_lr()))
            if remove_at is not None and step == remove_at:
                remove_param_group(optimizer, scheduler, 1)
                after_remove = {
                    "get_last_lr": list(scheduler.get_last_lr()),
                    "param_groups": group_summary(optimizer, names),
                    "sub_scheduler_base_lrs": [list(getattr(s, "base_lrs", [])) for s in scheduler._schedulers],
                }
    return {
        "lrs": lrs,
        "group_lrs_final": [g["lr"] for g in optimizer.param_groups],
        "types": [type(optimizer).__name__, type(scaler).__name__, type(scheduler).__name__],
        "sub_schedulers": [type(s).__name__ for s in getattr(scheduler, "_schedulers", [])],
        "milestones": list(getattr(scheduler, "_milestones", [])),
        "scaler_enabled": scaler.is_enabled(),
        "param_groups_initial": None,
        "after_remove": after_remove,
        "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    }


def schedules_section() -> dict:
    out: dict[str, Any] = {
        "ema_steps": EMA_STEPS,
        "ema_scheduler": {
            "params": {"start_decay": 0.999, "final_decay": 0.9999, "final_step": 30000, "freeze_step": 200000},
            "call": "ema_scheduler(step, 0.999, 0.9999, 30000, 200000)",
            "values": [ema_scheduler(s, 0.999, 0.9999, 30000, 200000) for s in EMA_STEPS],
        },
        "exp_ema_scheduler": {
            "params": {"start_decay": 0.999, "timescale": 20000, "threshold": 1e-7},
            "call": "exp_ema_scheduler(step, 0.999, 20000, 1e-7)",
            "values": [exp_ema_scheduler(s, 0.999, 20000, 1e-7) for s in EMA_STEPS],
        },
    }
    optim = {}
    variants = [(name, SMALL_OPT | {"scheduler": name}) for name in ("tristage", "cosine", "rsqrt", "constant")]
    variants.append(("tristage_no_warmup", SMALL_OPT | {"scheduler": "tristage", "warmup_steps": 0}))
    for name, kwargs in variants:
        cfg = OptimizerConfig(**kwargs)
        torch.manual_seed(0)
        model = build_model(cfg=tiny_config())
        names = {id(p): n for n, p in model.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer, _, _ = build_optimizer(model, cfg)
        full = lr_trajectory(cfg, None)
        full["param_groups_initial"] = group_summary(optimizer, names)
        optim[name] = {
            "optimizer_config": plain(dataclasses.asdict(cfg)),
            "full": full,
            "remove_group_1_at_25": lr_trajectory(cfg, 25),
        }
    out["optimizer"] = optim
    out["optimizer_call"] = (
        "torch.manual_seed(0); model = build_model(cfg=" + TINY_CALL + "); optimizer, scaler, scheduler = "
        "build_optimizer(model, OptimizerConfig(**optimizer_config)); lrs[0] = scheduler.get_last_lr(); for step in "
        "1..60: optimizer.step(); scheduler.step(); lrs[step] = scheduler.get_last_lr(); in remove_group_1_at_25, "
        "remove_param_group(optimizer, scheduler, 1) right after lrs[25] is recorded (after_remove is read then)."
    )
    out["optimizer_errors"] = {
        "bad_scheduler": error_of(
            build_optimizer, torch.nn.Linear(2, 2), OptimizerConfig(scheduler="bogus", dtype="float32")
        )
        | {"call": "build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(scheduler='bogus', dtype='float32'))"},
        "bad_dtype": error_of(build_optimizer, torch.nn.Linear(2, 2), OptimizerConfig(dtype="float64"))
        | {"call": "build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(dtype='float64'))"},
    }
    return out


# ----------------------------------------------------------------------------------------------- run dir

RUN_BATCH, RUN_SAMPLES, RUN_DATA_SEED = 2, 16_000, 1234


def run_config() -> Config:
    return Config(
        run=RunConfig(
            workdir="tests/compat",
            wandb_project="fixtures",
            wandb_name="release_run",
            wandb_mode="disabled",
            save_interval=2,
            compile=False,
            model_type="spidr",
        ),
        data=DataConfig(manifest="tests/data/speech/manifest.csv"),
        model=tiny_config(),
        optimizer=OptimizerConfig(**(SMALL_OPT | {"max_steps": 3, "dtype": "float32"})),
        masking=MaskingConfig(),
        validation={"dev": DataConfig(manifest="tests/data/speech/manifest.csv", rand_crop=False)},
    )


def state_checksum(model: torch.nn.Module) -> dict:
    return {k: v.double().sum().item() for k, v in model.state_dict().items()}


def run_dir_section(run_dir: Path) -> dict:
    cfg = run_config()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=4))

    set_seed(cfg.run.random_seed)
    model = build_model(cfg=cfg.model, model_type=cfg.run.model_type, checkpoint=cfg.run.init_ckpt).train()
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer, scaler, scheduler = build_optimizer(model, cfg.optimizer)
    ckpt = Checkpointer(run_dir, 2, cfg.run.keep_latest)
    ckpt.init_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    step, epoch = int(ckpt.step), int(ckpt.epoch)
    data_gen = torch.Generator().manual_seed(RUN_DATA_SEED)
    mask_generator = MaskGenerator(cfg.masking)
    frames = int(conv_length(cfg.model.extractor_conv_layer_config, torch.tensor(RUN_SAMPLES)))
    history: list[dict] = []
    epoch += 1
    while step < cfg.optimizer.max_steps:
        waveforms = F.layer_norm(torch.randn(RUN_BATCH, RUN_SAMPLES, generator=data_gen), (RUN_SAMPLES,))
        mask_indices = mask_generator(torch.zeros(RUN_BATCH, frames, dtype=torch.bool), generator=data_gen)[0]
        num_frames = torch.full((), mask_indices.numel(), dtype=torch.int64)
        loss, outputs = model(waveforms, mask_indices=mask_indices, attention_mask=None)
        loss = loss.sum() * 1 / num_frames
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        ema_decay = model.update_ema(step)
        removed = False
        if step == cfg.model.freeze_step and len(optimizer.param_groups) > 1:
            remove_param_group(optimizer, scheduler, 1)
            removed = True
        saved = ckpt.save(step, epoch)
        history.append(
            {
                "step": step,
                "loss": loss.item(),
                "grad_norm": grad_norm.item(),
                "lr_before_step": lr,
                "ema_decay": ema_decay,
                "target_ppl": outputs["target_ppl"].item(),
                "pred_ppl": outputs["pred_ppl"].item(),
                "mask_indices": keep(mask_indices),
                "waveform_row_sums": [waveforms[i].double().sum().item() for i in range(RUN_BATCH)],
                "removed_param_group": removed,
                "saved": saved,
                "num_param_groups": len(optimizer.param_groups),
            }
        )
    ckpt.save_final(step, epoch)

    first = optimizer.param_groups[0]["params"][0]
    result: dict[str, Any] = {
        "files": sorted(p.name for p in run_dir.iterdir()),
        "config_json": json.loads((run_dir / "config.json").read_text()),
        "step": step,
        "epoch": epoch,
        "checkpointer_step": keep(ckpt.step),
        "checkpointer_epoch": keep(ckpt.epoch),
        "scheduler_last_lr": list(scheduler.get_last_lr()),
        "optimizer_state_step_param": names[id(first)],
        "optimizer_state_step": keep(optimizer.state[first]["step"]),
        "model_current_step": keep(model.current_step),
        "extractor_frozen": model._extractor_frozen,
        "param_groups": group_summary(optimizer, names),
        "history": history,
        "state_sums": state_checksum(model),
        "call": (
            "Emulates spidr.train.train on CPU, float32, world size 1: set_seed(0); "
            "model = build_model(cfg=cfg.model, "
            "model_type='spidr', checkpoint=None).train(); optimizer, scaler, scheduler = build_optimizer(model, "
            "cfg.optimizer); ckpt = Checkpointer(run_dir, 2, -1); ckpt.init_state(...); epoch = 1; data generator "
            f"g = torch.Generator().manual_seed({RUN_DATA_SEED}); each step: waveforms = F.layer_norm(torch.randn("
            f"{RUN_BATCH}, {RUN_SAMPLES}, generator=g), ({RUN_SAMPLES},)); mask_indices = MaskGenerator(cfg.masking)"
            f"(torch.zeros({RUN_BATCH}, {frames}, dtype=torch.bool), generator=g)[0]; loss = model(...)[0].sum() / "
            "mask_indices.numel(); backward; clip_grad_norm_(max_norm); optimizer.step(); zero_grad; "
            "scheduler.step(); step += 1; model.update_ema(step); remove_param_group(optimizer, scheduler, 1) at "
            "step == freeze_step (2); ckpt.save(step, epoch); after 3 steps ckpt.save_final(3, 1)."
        ),
        "note": (
            "The real loop also saves step_0.pt before training (step 0 % interval == 0); it is left out here to "
            "keep the fixture small. cfg = read_config('release_run/config.json') rebuilds the config (lists "
            "instead of tuples)."
        ),
    }

    summaries = {}
    for name in ("step_2.pt", "final.pt"):
        saved = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        summaries[name] = {
            "top_keys": list(saved),
            "model_keys": list(saved["model"]),
            "optimizer_param_groups": plain(saved["optimizer"]["param_groups"]),
            "optimizer_state_ids": sorted(saved["optimizer"]["state"]),
            "optimizer_state_keys": sorted(next(iter(saved["optimizer"]["state"].values()))),
            "scheduler": plain(saved["scheduler"]),
            "scaler": plain(saved["scaler"]),
            "step": keep(saved["step"]),
            "epoch": keep(saved["epoch"]),
            "model_current_step": keep(saved["model"]["current_step"]),
        }
    result["checkpoints"] = summaries

    # What 0.2.0 itself loads back from this directory.
    set_seed(1)
    fresh = build_model(cfg=cfg.model).train()
    fresh_opt, fresh_scaler, fresh_sched = build_optimizer(fresh, cfg.optimizer)
    loader = Checkpointer(run_dir, 2)
    loader.init_state(model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, scaler=fresh_scaler)
    resumed = loader.load_existing_run()
    result["resume"] = {
        "call": (
            "set_seed(1); fresh model/optimizer from cfg; ck = Checkpointer(run_dir, 2); ck.init_state(...); "
            "ck.load_existing_run()"
        ),
        "returned": resumed,
        "last": loader.last.name if loader.last else None,
        "step": keep(loader.step),
        "epoch": keep(loader.epoch),
        "num_param_groups": len(fresh_opt.param_groups),
        "scheduler_last_lr": list(fresh_sched.get_last_lr()),
        "model_current_step": keep(fresh.current_step),
        "extractor_frozen": fresh._extractor_frozen,
        "state_equal_to_trained": all(
            torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
        ),
    }
    set_seed(2)
    fresh2 = build_model(cfg=cfg.model).train()
    opt2, scaler2, sched2 = build_optimizer(fresh2, cfg.optimizer)
    loader2 = Checkpointer(run_dir, 2)
    loader2.init_state(model=fresh2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    result["load_step_2"] = {
        "call": "fresh objects (set_seed(2)); ck.load(2)",
        "returned": loader2.load(2),
        "step": keep(loader2.step),
        "epoch": keep(loader2.epoch),
        "num_param_groups": len(opt2.param_groups),
        "scheduler_last_lr": list(sched2.get_last_lr()),
        "model_current_step": keep(fresh2.current_step),
        "extractor_frozen": fresh2._extractor_frozen,
        "state_sums": state_checksum(fresh2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ckpt = build_model(model_type="spidr", checkpoint=run_dir / "final.pt")
    result["build_model_from_final"] = {
        "call": "build_model(model_type='spidr', checkpoint=run_dir / 'final.pt')",
        "class_name": type(from_ckpt).__name__,
        "training": from_ckpt.training,
        "current_step": keep(from_ckpt.current_step),
        "state_equal_to_trained": all(
            torch.equal(a, b)
            for a, b in zip(from_ckpt.state_dict().values(), model.state_dict().values(), strict=True)
        ),
        "extractor_frozen": from_ckpt._extractor_frozen,
    }
    reread = read_config(run_dir / "config.json")
    result["read_config"] = {
        "call": "read_config(run_dir / 'config.json')",
        "equal_to_written": reread == cfg,
        "asdict_equal_after_json": json.loads(json.dumps(dataclasses.asdict(reread))) == result["config_json"],
        "model_class": type(reread.model).__name__,
        "betas_type": type(reread.optimizer.betas).__name__,
        "conv_layer_type": type(reread.model.extractor_conv_layer_config[0]).__name__,
        "validation_keys": list(reread.validation),
        "run_dir_relative": reread.run.dir.relative_to(REPO).as_posix()
        if reread.run.dir.is_relative_to(REPO)
        else None,
    }
    return result


# ----------------------------------------------------------------------------------------------- metrics

PHONES = ["sil", "aa", "b", "k", "iy", "uw", "s", "t"]


def synthetic_data() -> dict[str, tuple[list[str], list[int]]]:
    g = torch.Generator().manual_seed(11)
    data = {}
    for u in range(6):
        num_units = int(torch.randint(20, 41, (1,), generator=g))
        num_phones = 2 * num_units + int(torch.randint(-2, 3, (1,), generator=g))
        phones: list[str] = []
        while len(phones) < num_phones:
            phone = PHONES[int(torch.randint(0, len(PHONES), (1,), generator=g))]
            phones.extend([phone] * int(torch.randint(2, 9, (1,), generator=g)))
        phones = phones[:num_phones]
        units = []
        for i in range(num_units):
            base = PHONES.index(phones[min(2 * i, num_phones - 1)]) * 2 % 14
            noise = int(torch.randint(0, 4, (1,), generator=g))
            units.append(base if noise else int(torch.randint(0, 14, (1,), generator=g)))
        data[f"utt{u}"] = (phones, units)
    return data


def metrics_section() -> dict:
    g = torch.Generator().manual_seed(21)
    soft = torch.softmax(torch.randn(50, 12, generator=g), dim=-1)
    onehot = F.one_hot(torch.randint(0, 12, (50,), generator=g), 12).float()
    soft2 = torch.softmax(3 * torch.randn(50, 12, generator=g), dim=-1)
    data = synthetic_data()
    out: dict[str, Any] = {
        "perplexities": {
            "inputs": [keep(soft), keep(onehot), keep(soft2)],
            "call": "perplexities(inputs) and perplexities(inputs[:1])",
            "output_all": keep(perplexities([soft, onehot, soft2])),
            "output_first": keep(perplexities([soft])),
        },
    }
    seqs = [[1, 1, 2, 3, 3, 3], [4, 4, 5], [7]]
    out["bitrate"] = {
        "sequences": seqs,
        "with_sequences_20": bitrate(num_units=16, sequences=seqs, frame_step=20),
        "with_sequences_10": bitrate(num_units=256, sequences=seqs, frame_step=10),
        "without_sequences_20": bitrate(num_units=16),
        "without_sequences_10": bitrate(num_units=256, frame_step=10),
        "call": "bitrate(num_units=16, sequences=sequences, frame_step=20); bitrate(num_units=256, "
        "sequences=sequences, frame_step=10); bitrate(num_units=16); bitrate(num_units=256, frame_step=10)",
    }
    out["data"] = {k: [list(p), list(u)] for k, (p, u) in data.items()}
    out["data_note"] = "utterance -> [phones (10 ms), units (20 ms)]; pass each value as a tuple (phones, units)"
    quality = units_quality(data, num_units=16, num_phones=8)
    out["units_quality"] = {
        "call": "units_quality({k: tuple(v) for k, v in data.items()}, num_units=16, num_phones=8)",
        "type_name": type(quality).__name__,
        "fields": list(quality._fields),
        "values": dict(quality._asdict()),
    }
    for only_active in (True, False):
        proba, phone_order, codes = proba_phone_code(data, num_units=16, num_phones=8, only_active=only_active)
        out[f"proba_phone_code_only_active_{only_active}"] = {
            "call": f"proba_phone_code(data, num_units=16, num_phones=8, only_active={only_active})",
            "proba": keep(proba),
            "phone_order": phone_order,
            "codes_order": keep(codes),
        }
    count, phone_order = build_count_matrix(data, 16, 8, 2)
    out["build_count_matrix"] = {
        "call": "build_count_matrix(data, 16, 8, 2)",
        "count": keep(count),
        "phone_order": phone_order,
    }
    bad_len = {"x": (["a"] * 10, [0] * 2)}
    bad_idx = {"x": (["a", "b", "c"] * 2, [0, 1, 2])}
    out["build_count_matrix_errors"] = {
        "length": error_of(build_count_matrix, bad_len, 16, 8, 2)
        | {"call": "build_count_matrix({'x': (['a'] * 10, [0] * 2)}, 16, 8, 2)"},
        "phones_out_of_bounds": error_of(build_count_matrix, bad_idx, 16, 2, 2)
        | {"call": "build_count_matrix({'x': (['a', 'b', 'c'] * 2, [0, 1, 2])}, 16, 2, 2)"},
        "units_out_of_bounds": error_of(build_count_matrix, bad_idx, 2, 8, 2)
        | {"call": "build_count_matrix({'x': (['a', 'b', 'c'] * 2, [0, 1, 2])}, 2, 8, 2)"},
    }
    g = torch.Generator().manual_seed(31)
    tensors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]
    with_nan = torch.tensor([1.0, float("nan")])
    out["params_norm"] = {
        "inputs": [keep(t) for t in tensors],
        "single": params_norm(tensors[0]).item(),
        "list": params_norm(tensors).item(),
        "generator": params_norm(t for t in tensors).item(),
        "norm1": params_norm(tensors, 1.0).item(),
        "norm_inf": params_norm(tensors, float("inf")).item(),
        "nan_no_error": params_norm([with_nan]).item(),
        "nan_error": error_of(params_norm, [with_nan], error_if_nonfinite=True),
        "call": "params_norm(inputs[0]); params_norm(inputs); params_norm(iter(inputs)); params_norm(inputs, 1.0); "
        "params_norm(inputs, inf); params_norm([tensor([1, nan])]) (with and without error_if_nonfinite=True)",
    }
    return out


# ----------------------------------------------------------------------------------------------- tools


def tools_section(tmp: Path) -> dict:
    meters = AverageMeters(["a", "b"], torch.device("cpu"))
    meters.update(a=torch.tensor(1.0), b=torch.tensor(4.0))
    meters.update(a=torch.tensor(3.0))
    meters["b"].update(torch.tensor(2.0), n=3)
    sums = {"a": meters["a"].sum.item(), "b": meters["b"].sum.item()}
    counts = {"a": int(meters["a"].count), "b": int(meters["b"].count)}
    first = meters.pop()
    second = meters.pop()
    meters64 = AverageMeters(["x"], torch.device("cpu"), dtype=torch.float64)
    meters64.update(x=torch.tensor(1 / 3, dtype=torch.float64))
    out: dict[str, Any] = {
        "average_meters": {
            "call": (
                "m = AverageMeters(['a', 'b'], torch.device('cpu')); m.update(a=tensor(1.), b=tensor(4.)); "
                "m.update(a=tensor(3.)); m['b'].update(tensor(2.), n=3); sums/counts read; pop(); pop()"
            ),
            "sums_before_pop": sums,
            "counts_before_pop": counts,
            "pop1": first,
            "pop2_after_reset": second,
            "sum_dtype": str(meters["a"].sum.dtype),
            "count_dtype": str(meters["a"].count.dtype),
            "float64_pop": meters64.pop(),
            "float64_call": "AverageMeters(['x'], cpu, dtype=torch.float64); update(x=tensor(1/3, float64)); pop()",
        }
    }

    path = tmp / "metrics.jsonl"

    def append(*records: dict) -> None:
        with path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def call(queue: MetricsQueue) -> dict:
        try:
            return {"ok": True, "yielded": list(queue())}
        except ValueError as exc:
            return {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}

    events = []
    q1 = MetricsQueue(path, 100, start=0)
    events.append({"action": "q1 = MetricsQueue(path, 100, start=0)  # file missing; q1()", "result": call(q1)})
    append({"step": 0, "group": "dev", "loss": 1.5})
    events.append({"action": "append dev step 0; q1()", "result": call(q1)})
    append({"step": 200, "group": "dev", "loss": 1.1})
    events.append({"action": "append dev step 200; q1()", "result": call(q1)})
    append({"step": 100, "group": "dev", "loss": 1.3}, {"step": 0, "group": "test", "acc": 0.5})
    events.append({"action": "append dev step 100 and test step 0; q1()", "result": call(q1)})
    events.append({"action": "nothing new; q1()", "result": call(q1)})
    q2 = MetricsQueue(path, 100, start=0)
    events.append({"action": "q2 = MetricsQueue(path, 100, start=0)  # existing file; q2()", "result": call(q2)})
    append({"step": 300, "group": "dev", "loss": 1.0}, {"step": 200, "group": "test", "acc": 0.7})
    events.append({"action": "append dev 300 and test 200; q2()", "result": call(q2)})
    events.append({"action": "q1()", "result": call(q1)})
    append({"step": 100, "group": "test", "acc": 0.6})
    events.append({"action": "append test 100; q2()", "result": call(q2)})
    append({"step": 100, "group": "dev", "loss": 9.0})
    events.append({"action": "append dev 100 again (lower than expected); q2()", "result": call(q2)})
    q3 = MetricsQueue(path, 100, start=200)
    events.append({"action": "q3 = MetricsQueue(path, 100, start=200); q3()", "result": call(q3)})
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"step": 0, "group": "dev", "loss": 2.5})
    path.write_text("\n".join(lines) + "\n")
    events.append({"action": "rewrite line 0 (modified); q3()", "result": call(q3)})
    fresh = tmp / "fresh.jsonl"
    fresh.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [{"step": 200, "group": "dev", "m": 1}, {"step": 300, "group": "dev", "m": 2}]
        )
    )
    q4 = MetricsQueue(fresh, 100, start=200)
    events.append(
        {"action": "fresh file with dev 200, 300; q4 = MetricsQueue(fresh, 100, start=200); q4()", "result": call(q4)}
    )
    with fresh.open("a") as f:
        f.write(json.dumps({"step": 400, "group": "dev", "m": 3}) + "\n")
    events.append({"action": "append dev 400 to fresh; q4()", "result": call(q4)})
    q5 = MetricsQueue(tmp / "other.jsonl", 100, start=200)
    (tmp / "other.jsonl").write_text(json.dumps({"step": 200, "group": "dev", "m": 1}) + "\n")
    events.append(
        {
            "action": "q5 = MetricsQueue(missing, 100, start=200); then file written with dev 200; q5()",
            "result": call(q5),
        }
    )
    out["metrics_queue"] = {"events": events, "note": "each record is one JSON line; results list what q() yields"}

    def pull(a: list[str], b: list[str]) -> dict:
        try:
            return {"ok": True, "yielded": list(pull_inserted_lines(a, b))}
        except ValueError as exc:
            return {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}

    out["pull_inserted_lines"] = [
        {"a": a, "b": b, "result": pull(a, b)}
        for a, b in [
            ([], ["x", "y"]),
            (["x"], ["x", "y"]),
            (["x", "z"], ["x", "y", "z"]),
            (["x", "y"], ["x"]),
            (["x", "y"], ["x", "q"]),
            (["x"], ["x"]),
        ]
    ]

    folder = tmp / "ckpts"
    folder.mkdir()
    for name in ("step_2.pt", "step_10.pt", "final.pt", "step_1.pt", "other.pt", "step_100.pt"):
        (folder / name).write_bytes(b"")
    ordering = [p.name for p in find_checkpoints(folder)]
    last = Checkpointer(folder, 2).last
    (folder / "final.pt").unlink()
    ordering_no_final = [p.name for p in find_checkpoints(folder)]
    last_no_final = Checkpointer(folder, 2).last
    empty = tmp / "empty"
    empty.mkdir()
    out["find_checkpoints"] = {
        "files": ["step_2.pt", "step_10.pt", "final.pt", "step_1.pt", "other.pt", "step_100.pt"],
        "ordering": ordering,
        "checkpointer_last": last.name if last else None,
        "ordering_without_final": ordering_no_final,
        "checkpointer_last_without_final": last_no_final.name if last_no_final else None,
        "empty": [p.name for p in find_checkpoints(empty)],
        "checkpointer_last_empty": Checkpointer(empty, 2).last,
        "call": "find_checkpoints(folder) (names only); Checkpointer(folder, 2).last.name",
    }
    return out


# ----------------------------------------------------------------------------------------------- config


def config_section(tmp: Path) -> dict:
    out: dict[str, Any] = {
        "defaults": {
            "DataConfig": plain(dataclasses.asdict(DataConfig(manifest="m.csv"))),
            "OptimizerConfig": plain(dataclasses.asdict(OptimizerConfig())),
            "DinoSRConfig": plain(dataclasses.asdict(DinoSRConfig())),
            "SpidRConfig": plain(dataclasses.asdict(SpidRConfig())),
            "MaskingConfig": plain(dataclasses.asdict(MaskingConfig())),
            "RunConfig": plain(dataclasses.asdict(RunConfig(workdir="w", wandb_project="p", wandb_name="n"))),
        },
        "defaults_call": "dataclasses.asdict(XConfig(<required fields: manifest='m.csv' / workdir='w', "
        "wandb_project='p', wandb_name='n'>))",
        "optimizer_mixed_precision": {
            d: OptimizerConfig(dtype=d).mixed_precision for d in ("float32", "float16", "bfloat16")
        },
        "resume_config_fields": [f.name for f in dataclasses.fields(ResumeConfig)],
    }
    toml = tmp / "c.toml"
    toml.write_text(
        '[run]\nworkdir = "w"\nwandb_project = "p"\nwandb_name = "n"\nmodel_type = "spidr"\n'
        '[data]\nmanifest = "m.csv"\n[model]\nencoder_num_layers = 4\n[optimizer]\nlr = 1e-3\n'
        '[validation.dev]\nmanifest = "dev.csv"\n'
    )
    cfg = read_config(toml)
    out["read_config_toml"] = {
        "file": toml.read_text(),
        "call": "read_config(<file as .toml>)",
        "asdict": plain(dataclasses.asdict(cfg)),
        "model_class": type(cfg.model).__name__,
    }
    (tmp / "c.yaml").write_text("x: 1\n")
    out["read_config_bad_suffix"] = error_of(read_config, tmp / "c.yaml") | {"call": "read_config('c.yaml')"}
    return out


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    output = Path(sys.argv[1]).resolve()
    if importlib.metadata.version("spidr") != "0.2.0" or Path(spidr.__file__).resolve().is_relative_to(REPO):
        raise SystemExit(f"spidr 0.2.0 from PyPI is required, found {spidr.__file__}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA is not available.*")
    goldens: dict[str, Any] = {
        "meta": {
            "release": importlib.metadata.version("spidr"),
            "torch": str(torch.__version__),
            "polars": str(pl.__version__),
            "torchcodec": str(torchcodec.__version__),
            "python": sys.version.split()[0],
            "tiny_model_config": plain(TINY),
            "small_optimizer_config": dict(SMALL_OPT),
            "num_threads": 1,
            "generator": "tests/compat/generators/make_release_goldens.py",
        }
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sections = [
            ("dataset", lambda: dataset_section(tmp / "dataset")),
            ("masks", masks_section),
            ("samplers", samplers_section),
            ("collate", lambda: collate_section(tmp / "collate")),
            ("dataloader", lambda: dataloader_section(tmp / "dataloader")),
            ("schedules", schedules_section),
            ("run_dir", lambda: run_dir_section(output.parent / "release_run")),
            ("metrics", metrics_section),
            ("tools", lambda: tools_section(tmp / "tools")),
            ("config", lambda: config_section(tmp / "config")),
        ]
        for name in ("dataset", "collate", "dataloader", "tools", "config"):
            (tmp / name).mkdir()
        for name, fn in sections:
            torch.manual_seed(0)
            goldens[name] = fn()
            print(f"{name}: done", flush=True)
    check_plain(goldens, "goldens")
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(goldens, output)
    torch.load(output, weights_only=True)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
