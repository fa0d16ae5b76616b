"""The reference release's data API (spidr 0.2.0), called as its users call it, against values that 0.2.0 itself
produced (tests/compat/fixtures/release_goldens.pt, made by tests/compat/generators/make_release_goldens.py)."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytest.importorskip("polars")
pytest.importorskip("torchcodec")

from spidr.config import DEFAULT_CONV_LAYER_CONFIG, DataConfig, MaskingConfig
from spidr.data import build_dataloader, num_samples, read_manifest, speech_dataset
from spidr.data.dataset import (
    BucketizeBatchSampler,
    DistributedBatchSampler,
    SpeechCollatorWithMasking,
    SpeechDatasetFromArchive,
    SpeechDatasetFromFiles,
    conv_length,
    crop_audio,
    get_buckets,
    verify_lengths,
)
from spidr.data.manifests import ManifestError
from spidr.data.masks import (
    MaskGenerator,
    compute_mask_indices,
    mask_id_no_overlap,
    mask_id_overlap,
    mask_lengths,
)
from spidr.data.write_manifest import (
    CompressedArchiveError,
    NoAudioFileError,
    write_manifest,
    write_manifest_fairseq,
    write_manifest_tar,
)

SPEECH = REPO / "tests" / "data" / "speech"
GOLDEN = torch.load(Path(__file__).parent / "fixtures" / "release_goldens.pt", weights_only=True)


def absolute_manifest(folder: Path) -> Path:
    """The committed manifest with absolute paths (the release reads paths relative to the current directory)."""
    lines = (SPEECH / "manifest.csv").read_text().splitlines()
    rows = [lines[0]] + [",".join([f, str(SPEECH / p), n]) for f, p, n in (line.split(",") for line in lines[1:])]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def release_tar(folder: Path) -> Path:
    """The tar the golden generator indexed: USTAR, manifest order, zeroed owner and time."""
    tar = folder / "speech.tar"
    paths = [line.split(",")[1] for line in (SPEECH / "manifest.csv").read_text().splitlines()[1:]]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
        for rel in paths:
            info = archive.gettarinfo(SPEECH / rel, arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with (SPEECH / rel).open("rb") as file:
                archive.addfile(info, file)
    return tar


def relative_rows(frame, replace: dict[str, str]) -> list[list]:
    rows = []
    for row in frame.rows():
        out = []
        for value in row:
            for old, new in replace.items():
                if isinstance(value, str):
                    value = value.replace(old, new)
            out.append(value)
        rows.append(out)
    return rows


def check_items(dataset, golden: dict) -> None:
    assert type(dataset).__name__ == golden["class_name"] and len(dataset) == golden["len"]
    for i, expected in enumerate(golden["items"]):
        item = dataset[i]
        assert list(item.shape) == list(expected["shape"]) and str(item.dtype) == expected["dtype"]
        assert math.isclose(item.double().sum().item(), expected["sum"], rel_tol=1e-6, abs_tol=1e-3)
        assert math.isclose(item.double().square().sum().item(), expected["sumsq"], rel_tol=1e-6)
        torch.testing.assert_close(item[:32], expected["first32"], rtol=0, atol=1e-6)
    for i, full in golden.get("full_items", {}).items():
        torch.testing.assert_close(dataset[int(i)], full, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("normalize", [True, False])
def test_speech_dataset_of_files_gives_the_release_items(tmp_path, normalize):
    golden = GOLDEN["dataset"][f"files_normalize_{normalize}"]
    dataset = speech_dataset(absolute_manifest(tmp_path), normalize=normalize)
    assert isinstance(dataset, SpeechDatasetFromFiles)
    assert dataset.manifest.columns == golden["columns"]
    assert [str(t) for t in dataset.manifest.dtypes] == golden["dtypes"]
    assert relative_rows(dataset.manifest, {f"{SPEECH}/": ""}) == golden["rows"]
    check_items(dataset, golden)


@pytest.mark.parametrize("normalize", [True, False])
def test_speech_dataset_of_a_tar_gives_the_release_items(tmp_path, normalize):
    golden = GOLDEN["dataset"][f"archive_normalize_{normalize}"]
    tar = release_tar(tmp_path)
    write_manifest_tar(tar, tmp_path / "tar.csv", ".wav")
    dataset = speech_dataset(tmp_path / "tar.csv", normalize=normalize)
    assert isinstance(dataset, SpeechDatasetFromArchive)
    assert dataset.manifest.columns == golden["columns"]
    # Our rows are sorted by member name, the release keeps the tar's order: compare as sets, then items by id.
    ours = relative_rows(dataset.manifest, {str(tar): "speech.tar"})
    assert sorted(ours) == sorted(golden["rows"])
    order = [ours.index(row) for row in golden["rows"]]
    for position, expected in zip(order, golden["items"], strict=True):
        item = dataset[position]
        assert list(item.shape) == list(expected["shape"])
        torch.testing.assert_close(item[:32], expected["first32"], rtol=0, atol=1e-6)
        assert math.isclose(item.double().square().sum().item(), expected["sumsq"], rel_tol=1e-6)


def test_relative_paths_are_found_from_the_current_directory_as_the_release_does(tmp_path, monkeypatch):
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("fileid,path,num_samples\nutt00,alice/utt00.wav,54801\n")
    monkeypatch.chdir(SPEECH)  # the path is relative to here, not to the manifest's folder
    dataset = speech_dataset(manifest, normalize=True)
    torch.testing.assert_close(
        dataset[0], GOLDEN["dataset"]["files_normalize_True"]["full_items"][0], rtol=0, atol=1e-6
    )
    assert dataset.manifest["path"].to_list() == ["alice/utt00.wav"]


def test_num_samples_of_paths_and_bytes():
    golden = GOLDEN["dataset"]["num_samples"]
    for rel, expected in zip(golden["paths"], golden["values"], strict=True):
        assert num_samples(SPEECH / rel) == expected
        assert num_samples(str(SPEECH / rel), verify=True) == expected
        assert num_samples((SPEECH / rel).read_bytes()) == expected


def test_write_manifest_functions_give_the_release_rows(tmp_path):
    golden = GOLDEN["dataset"]["write_manifest"]
    write_manifest(SPEECH, tmp_path / "m.csv")
    frame = read_manifest(tmp_path / "m.csv")
    assert frame.columns == golden["columns"]
    assert sorted(relative_rows(frame, {f"{SPEECH}/": ""})) == sorted(golden["rows"])
    write_manifest_fairseq(SPEECH, tmp_path / "m.tsv")
    assert (tmp_path / "m.tsv").read_text().splitlines()[0] == str(SPEECH)
    assert read_manifest(tmp_path / "m.tsv").columns == ["fileid", "path", "num_samples"]
    assert read_manifest(tmp_path / "m.tsv")["fileid"].to_list()[0] == "alice/utt00.wav"  # the release's fileid
    with pytest.raises(NoAudioFileError, match="No file found in .* with extension `.flac`"):
        write_manifest(SPEECH, tmp_path / "none.csv", ".flac")
    (tmp_path / "a.tar.gz").write_bytes(b"\x1f\x8b\x08" + bytes(100))
    with pytest.raises(CompressedArchiveError):
        write_manifest_tar(tmp_path / "a.tar.gz", tmp_path / "gz.csv")


def test_read_manifest_reads_any_columns_as_the_release_does(tmp_path):
    (tmp_path / "m.csv").write_text("fileid,path,num_samples,speaker\na,a.wav,10,s1\n")
    frame = read_manifest(tmp_path / "m.csv")
    assert frame.columns == ["fileid", "path", "num_samples", "speaker"] and frame["speaker"].to_list() == ["s1"]
    (tmp_path / "ids.csv").write_text("fileid,num_samples\na,16000\n")  # a manifest of ids, paths added later
    assert read_manifest(tmp_path / "ids.csv").columns == ["fileid", "num_samples"]
    (tmp_path / "units.jsonl").write_text('{"fileid": "a", "units": [1, 2]}\n')
    assert read_manifest(tmp_path / "units.jsonl")["units"].to_list() == [[1, 2]]
    with pytest.raises(ManifestError, match=r"unknown manifest suffix '\.txt'"):
        speech_dataset(tmp_path / "m.txt", normalize=True)
    (tmp_path / "bad.jsonl").write_text('{"fileid": "a"\n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl: cannot parse JSONL"):
        read_manifest(tmp_path / "bad.jsonl")


def test_dataset_takes_the_manifest_it_is_given(tmp_path):
    wav = SPEECH / "alice" / "utt00.wav"
    (tmp_path / "paths.csv").write_text(f"path,num_samples\n{wav},54801.0\n{SPEECH / 'bob' / 'utt01.wav'},1\n")
    dataset = speech_dataset(tmp_path / "paths.csv", normalize=True)  # no fileid, a float count: the release reads it
    golden = GOLDEN["dataset"]["files_normalize_True"]["full_items"][0]
    torch.testing.assert_close(dataset[0], golden, rtol=0, atol=1e-6)
    dataset.manifest = dataset.manifest.tail(1)  # a filtered manifest is the dataset's from then on
    assert len(dataset) == 1 and dataset.entry(0).path == str(SPEECH / "bob" / "utt01.wav")
    (tmp_path / "ids.csv").write_text("fileid,num_samples\na,16000\n")
    with pytest.raises(ValueError, match=r"ids\.csv, row 0: no 'path' to read the audio from \(columns: fileid"):
        speech_dataset(tmp_path / "ids.csv", normalize=True)[0]
    (tmp_path / "nocount.csv").write_text(f"fileid,path\na,{wav}\n")
    with pytest.raises(ManifestError, match=r"nocount\.csv: no 'num_samples' column, which batching needs"):
        build_dataloader(DataConfig(manifest=str(tmp_path / "nocount.csv"), num_workers=0), MaskingConfig())


def test_dataset_errors_name_the_file(tmp_path):
    (tmp_path / "m.csv").write_text(f"fileid,path,num_samples\nx,{tmp_path / 'missing.wav'},10\n")
    dataset = speech_dataset(tmp_path / "m.csv", normalize=True)
    with pytest.raises(ValueError, match=r"missing\.wav"):
        dataset[0]
    with pytest.raises(IndexError, match="out of range"):
        dataset[3]


# ------------------------------------------------------------------------------------------------------------ masks
def padding_mask_of(entry: dict) -> torch.Tensor | None:
    batch, frames = entry["shape"]
    if entry["padding_lengths"] is None:
        return None
    return torch.arange(frames).expand(batch, frames) >= torch.tensor(entry["padding_lengths"])[:, None]


def test_compute_mask_indices_equals_the_release_for_the_same_generator():
    grid = GOLDEN["masks"]["grid"]
    assert len(grid) > 400
    for e in grid:
        out = compute_mask_indices(
            tuple(e["shape"]),
            padding_mask_of(e),
            e["mask_prob"],
            e["mask_length"],
            e["mask_type"],
            e["mask_other"],
            e["min_masks"],
            e["min_space"],
            no_overlap=e["no_overlap"],
            generator=torch.Generator().manual_seed(e["seed"]),
        )
        assert torch.equal(out, e["output"]), e


def test_poisson_spans_follow_the_release_distribution():
    # The release draws its Poisson rates from the global generator whatever it is given; ours from `generator`,
    # so the draws differ but the distribution is the same: with no generator at all, both use the global one.
    for e in GOLDEN["masks"]["poisson"]:
        torch.manual_seed(e["global_seed"])
        out = compute_mask_indices(
            tuple(e["shape"]),
            padding_mask_of(e),
            e["mask_prob"],
            e["mask_length"],
            "poisson",
            e["mask_other"],
            e["min_masks"],
            e["min_space"],
            no_overlap=e["no_overlap"],
            generator=None,
        )
        assert out.dtype == torch.int64 and out.shape[0] == e["shape"][0]
    # Poisson(u * mask_length), u ~ U[0, 1): mean mask_length / 2, variance mask_length / 2 + mask_length^2 / 12.
    lengths = mask_lengths(20_000, 10, 0.0, "poisson", torch.Generator().manual_seed(0)).double()
    assert abs(lengths.mean().item() - 5.0) < 0.1 and abs(lengths.var().item() - (5.0 + 100 / 12)) < 0.5


def test_mask_building_blocks_equal_the_release():
    golden = GOLDEN["masks"]
    for key, e in golden["mask_lengths"].items():
        if key.startswith("poisson") or key == "unknown":  # poisson: see the test above
            continue
        out = eval(e["call"], {"mask_lengths": mask_lengths, "torch": torch})  # the release's own call, replayed
        assert torch.equal(out, e["output"]), key
    with pytest.raises(ValueError, match="unknown mask strategy"):
        mask_lengths(8, 10, 0.0, "gamma", None)
    for e in golden["mask_id_overlap"]:
        out = mask_id_overlap(
            torch.tensor(e["lengths"]), e["num_mask"], e["sz"], torch.Generator().manual_seed(e["seed"])
        )
        assert torch.equal(out.sort().values, e["output"].long().sort().values), e
    for e in golden["mask_id_no_overlap"]:
        out = mask_id_no_overlap(
            torch.tensor(e["lengths"]), e["min_space"], e["sz"], torch.Generator().manual_seed(e["seed"])
        )
        assert torch.equal(out, e["output"].long()), e


def test_mask_generator_equals_the_release():
    for key, e in GOLDEN["masks"]["mask_generator"].items():
        if key == "channel_prob_without_channels":
            continue
        lengths = e["padding_lengths"]
        padding = torch.arange(120).expand(4, 120) >= torch.tensor(lengths or [120] * 4)[:, None]
        kwargs = {} if e["channels"] is None else {"channels": e["channels"]}
        indices, channels = MaskGenerator(MaskingConfig(**e["config"]))(
            padding, generator=torch.Generator().manual_seed(5), **kwargs
        )
        assert (indices is None) == (e["mask_indices"] is None), key
        if indices is not None:
            assert torch.equal(indices, e["mask_indices"]), key
        if e["mask_channel_indices_shape"] is None:
            assert channels is None
        else:
            assert list(channels.shape) == list(e["mask_channel_indices_shape"]) and channels.dtype == torch.bool
            assert torch.equal(channels[:, 0], e["mask_channel_indices_time0"]), key
    with pytest.raises(ValueError, match="channels must be given"):
        MaskGenerator(MaskingConfig(mask_channel_prob=0.2))(torch.zeros(2, 50, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------- samplers
def test_bucketize_batch_sampler_equals_the_release():
    golden = GOLDEN["samplers"]
    for key, e in [*golden["token_count"].items(), *golden["batch_size"].items()]:
        kwargs = dict(e["kwargs"]) | {"lengths": golden["lengths"]}
        sampler = BucketizeBatchSampler(**kwargs)
        if "sorted_lengths" in e:
            assert sampler.lengths == e["sorted_lengths"] and sampler.indices == e["sorted_indices"], key
            buckets = {k: v.tolist() for k, v in sampler.buckets.items()}
            assert buckets == {int(k): v.tolist() for k, v in e["buckets"].items()}, key
        assert sampler.iter_list == e["epoch0"] and len(sampler) == e["len0"], key
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            assert sampler.iter_list == e[f"epoch{epoch}"] and len(sampler) == e[f"len{epoch}"], (key, epoch)
            assert list(sampler) == e[f"epoch{epoch}"]


def test_distributed_batch_sampler_equals_the_release(monkeypatch):
    golden = GOLDEN["samplers"]
    for key, e in golden["distributed"].items():
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda e=e: e["world_size"])
        monkeypatch.setattr(torch.distributed, "get_rank", lambda e=e: e["rank"])
        inner = BucketizeBatchSampler(**(dict(e["inner_kwargs"]) | {"lengths": golden["lengths"]}))
        sampler = DistributedBatchSampler(inner, seed=0, shuffle=e["shuffle"], drop_last=e["drop_last"])
        monkeypatch.undo()
        assert len(sampler) == e["len_after_init"], key
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            assert list(sampler) == e[f"epoch{epoch}"], (key, epoch)
            assert len(sampler) == e[f"len_epoch{epoch}"], (key, epoch)


def test_get_buckets_conv_length_crop_audio_and_verify_lengths():
    golden = GOLDEN["samplers"]
    for key, e in golden["get_buckets"].items():
        out = eval(e["call"], {"get_buckets": get_buckets, "lengths": golden["lengths"]})
        assert {k: v.tolist() for k, v in out.items()} == {int(k): v.tolist() for k, v in e["output"].items()}, key
    lengths = golden["conv_length"]["input"]
    assert torch.equal(conv_length(DEFAULT_CONV_LAYER_CONFIG, lengths), golden["conv_length"]["default"])
    for e in golden["crop_audio"]["cases"]:
        torch.manual_seed(e["global_seed"])
        out, length = crop_audio(
            torch.arange(1000, dtype=torch.float32), e["num_samples"], e["max_sample_size"], rand_crop=e["rand_crop"]
        )
        assert (length, out.numel()) == (e["returned_length"], e["out_len"]), e
        assert (int(out[0]) if out.numel() else None) == e["offset"], e
    for e in golden["verify_lengths"].values():
        args = e["args"]
        if e["ok"]:
            verify_lengths(*args)
        else:
            with pytest.raises(ValueError):
                verify_lengths(*args)


# ---------------------------------------------------------------------------------------------------------- collate
def test_collator_equals_the_release_for_the_same_global_seed(tmp_path):
    golden = GOLDEN["collate"]
    dataset = speech_dataset(absolute_manifest(tmp_path), normalize=True)
    batch = [dataset[i] for i in golden["dataset_indices"]]
    for key, e in golden["cases"].items():
        collator = SpeechCollatorWithMasking(
            MaskGenerator(MaskingConfig()),
            max_sample_size=e["max_sample_size"],
            conv_layer_config=DEFAULT_CONV_LAYER_CONFIG,
            enable_padding=e["enable_padding"],
            rand_crop=e["rand_crop"],
        )
        torch.manual_seed(e["global_seed"])
        waveforms, attention_mask, mask_indices = collator(batch)
        assert list(waveforms.shape) == e["waveforms_shape"], key
        torch.testing.assert_close(waveforms[:, :64], e["first64"], rtol=0, atol=1e-6)
        for row, expected in zip(waveforms, e["row_sumsq"], strict=True):
            assert math.isclose(row.double().square().sum().item(), expected, rel_tol=1e-6), key
        if e["attn_mask"] is None:
            assert attention_mask is None, key
        else:
            assert torch.equal(attention_mask, e["attn_mask"]), key
        assert torch.equal(mask_indices, e["mask_indices"]), key


@pytest.mark.parametrize("persistent", [False, True])
def test_build_dataloader_gives_the_release_batches(tmp_path, persistent):
    golden = GOLDEN["dataloader"][f"persistent_workers_{persistent}"]
    cfg = DataConfig(
        manifest=str(absolute_manifest(tmp_path)),
        num_workers=1,
        max_batch_length=200_000,
        max_sample_size=100_000,
        pin_memory=False,
        persistent_workers=persistent,
    )
    loader = build_dataloader(cfg, MaskingConfig())
    assert len(loader) == golden["len_loader_initial"]
    for epoch in (1, 2):
        loader.batch_sampler.set_epoch(epoch)
        expected = golden[f"epoch{epoch}"]
        assert [list(b) for b in loader.batch_sampler] == expected["batch_indices"]
        batches = list(loader)
        assert len(batches) == len(expected["batches"]) == len(loader)
        for (waveforms, attention_mask, mask_indices), want in zip(batches, expected["batches"], strict=True):
            assert list(waveforms.shape) == want["waveforms_shape"]
            torch.testing.assert_close(waveforms[:, :64], want["first64"], rtol=0, atol=1e-6)
            assert (attention_mask is None) == (want["attn_mask"] is None)
            assert torch.equal(mask_indices, want["mask_indices"])


def test_build_dataloader_runs_without_workers(tmp_path):
    # The release's DataLoader call fails with num_workers=0 (prefetch_factor is always passed); ours runs.
    cfg = DataConfig(
        manifest=str(absolute_manifest(tmp_path)), num_workers=0, max_batch_length=200_000, max_sample_size=100_000
    )
    loader = build_dataloader(cfg, MaskingConfig())
    loader.batch_sampler.set_epoch(1)
    waveforms, _, mask_indices = next(iter(loader))
    assert waveforms.dim() == 2 and mask_indices.shape[0] == waveforms.shape[0]
