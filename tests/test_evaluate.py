"""spidr.evaluate: unit quality (against the SpidR paper's figures) and the ABX glue around fastabx."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from spidr.evaluate import (
    FastabxMissingError,
    abx_error_rate,
    find_extract_files,
    item_frames,
    load_item_features,
    pair_utterances,
    read_item_file,
    read_phones_jsonl,
    read_units_dir,
    read_units_jsonl,
    units_quality,
)
from spidr.evaluate.__main__ import main

PAPER = Path(__file__).parent / "fixtures" / "paper"
PAPER_PHONES = PAPER / "phonemes-dev-clean-and-other.jsonl.gz"
PAPER_UNITS = PAPER / "units-kmeans-spidr-l6-dev-clean-and-other.jsonl.gz"
PAPER_CSV = PAPER / "expected-units-quality-kmeans-l6.csv"
REPO = Path(__file__).parent.parent
# Absolute tolerance of the probabilities (the release computes them in float32), relative one of the
# perplexity and bitrate.
ABS_TOL, REL_TOL = 1e-4, 1e-6


def expected_paper_scores() -> dict[str, float]:
    with PAPER_CSV.open(newline="") as file:
        return {row["metric"]: float(row["score"]) for row in csv.DictReader(file)}


def assert_matches_paper(scores: dict[str, float]) -> None:
    expected = expected_paper_scores()
    assert set(scores) == set(expected)
    for metric in ("pnmi", "phone_purity", "cluster_purity"):
        assert scores[metric] == pytest.approx(expected[metric], abs=ABS_TOL), metric
    for metric in ("codebook_perplexity", "bitrate"):
        assert scores[metric] == pytest.approx(expected[metric], rel=REL_TOL), metric
    assert scores["active_codewords"] == expected["active_codewords"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    return path


def write_extract_file(path: Path, *, features: dict | None = None, units: dict | None = None, num_units=None):
    """Write one file in the spidr.extract/1 format."""
    tables = features if features is not None else units
    content = {
        "format": "spidr.extract/1",
        "source": path.with_suffix(".wav").name,
        "model": "spidr_base",
        "frame_rate": 50,
        "layers": sorted(tables),
        "frames": len(next(iter(tables.values()))),
    }
    if features is not None:
        content["features"] = features
    if units is not None:
        content["units"] = units
        content["num_units"] = num_units
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)


# ----------------------------------------------------------------------------------------------------------------
# Unit quality


def reference_quality(data: dict, num_units: int) -> dict[str, float]:
    """The SPEC definitions, frame by frame with dictionaries (slow but plain)."""
    joint: Counter = Counter()
    deduplicated = total_units = 0
    for phones, units in data.values():
        phones, units = [int(p) for p in phones], [int(u) for u in units]
        repeated = [unit for unit in units for _ in range(2)]
        joint.update(zip(phones, repeated, strict=False))
        total_units += len(units)
        deduplicated += sum(1 for i, unit in enumerate(units) if i == 0 or units[i - 1] != unit)
    frames = sum(joint.values())
    p = {key: count / frames for key, count in joint.items()}
    p_phone: defaultdict = defaultdict(float)
    p_unit: defaultdict = defaultdict(float)
    best_phone_of_unit: defaultdict = defaultdict(float)
    best_unit_of_phone: defaultdict = defaultdict(float)
    for (phone, unit), value in p.items():
        p_phone[phone] += value
        p_unit[unit] += value
        best_phone_of_unit[unit] = max(best_phone_of_unit[unit], value)
        best_unit_of_phone[phone] = max(best_unit_of_phone[phone], value)
    mutual_information = sum(v * math.log(v / (p_phone[a] * p_unit[b])) for (a, b), v in p.items())
    phone_entropy = -sum(v * math.log(v) for v in p_phone.values())
    unit_entropy_bits = -sum(v * math.log2(v) for v in p_unit.values())
    return {
        "pnmi": mutual_information / phone_entropy,
        "phone_purity": sum(best_phone_of_unit.values()),
        "cluster_purity": sum(best_unit_of_phone.values()),
        "codebook_perplexity": 2**unit_entropy_bits,
        "active_codewords": len(p_unit),
        "bitrate": math.log2(num_units) * deduplicated / (total_units * 0.02),
    }


def test_units_quality_reproduces_paper_figures():
    phones, labels = read_phones_jsonl(PAPER_PHONES)
    units = read_units_jsonl(PAPER_UNITS)
    data, phones_only, units_only = pair_utterances(phones, units)
    assert len(data) == len(phones) == len(units)
    assert phones_only == units_only == 0
    quality = units_quality(data, num_units=256, num_phones=len(labels))
    assert_matches_paper(quality.as_dict())


def test_cli_units_writes_the_paper_csv(tmp_path, capsys):
    out = tmp_path / "quality.csv"
    argv = ["units", str(PAPER_PHONES), str(PAPER_UNITS), "--num-units", "256", "--layer", "6"]
    assert main([*argv, "--name", "spidr_kmeans", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    for metric in expected_paper_scores():
        assert re.search(rf"^{metric}\s+\d", printed, flags=re.MULTILINE), metric
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    with PAPER_CSV.open(newline="") as file:
        expected_rows = list(csv.DictReader(file))
    assert list(rows[0]) == list(expected_rows[0])  # same columns
    assert [(r["model"], r["layer"], r["metric"]) for r in rows] == [
        (r["model"], r["layer"], r["metric"]) for r in expected_rows
    ]
    assert_matches_paper({row["metric"]: float(row["score"]) for row in rows})


def random_corpus(seed: int, *, num_phones: int, num_units: int, utterances: int = 20) -> dict:
    """Random utterances with every tolerated length mismatch and every input type."""
    rng = random.Random(seed)
    data = {}
    for index in range(utterances):
        length = rng.randint(1, 60)
        mismatch = rng.randint(-2, 2)
        units = [rng.randrange(num_units) for _ in range(length)]
        # Runs of phones, correlated with the units so that the metrics are not trivial.
        phones = [(unit * 7 + (rng.random() < 0.3)) % num_phones for unit in units for _ in range(2)]
        phones = phones[: 2 * length + mismatch] if mismatch <= 0 else phones + phones[-1:] * mismatch
        kind = index % 3
        if kind == 1:
            phones, units = np.array(phones, dtype=np.int32), np.array(units, dtype=np.int16)
        elif kind == 2:
            phones, units = torch.tensor(phones), torch.tensor(units, dtype=torch.int16)
        data[f"utt{index}"] = (phones, units)
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_units_quality_matches_the_definitions(seed):
    data = random_corpus(seed, num_phones=7, num_units=11)
    quality = units_quality(data, num_units=11, num_phones=7).as_dict()
    expected = reference_quality(data, num_units=11)
    assert quality.keys() == expected.keys()
    for metric, value in expected.items():
        assert quality[metric] == pytest.approx(value, rel=1e-9, abs=1e-12), metric


def test_units_quality_extremes():
    # Units that determine the phone and the reverse: every ratio is 1.
    one_to_one = {"u": ([0, 0, 1, 1, 2, 2, 1, 1], [0, 1, 2, 1])}
    perfect = units_quality(one_to_one, num_units=3, num_phones=3)
    assert perfect.pnmi == pytest.approx(1) and perfect.phone_purity == pytest.approx(1)
    assert perfect.cluster_purity == pytest.approx(1)
    assert perfect.active_codewords == 3
    # A single unit tells nothing about the phones, and uses a codebook of one.
    constant = units_quality({"u": ([0, 1, 2, 0, 1, 2], [4, 4, 4])}, num_units=8, num_phones=3)
    assert constant.pnmi == pytest.approx(0, abs=1e-12)
    assert constant.codebook_perplexity == pytest.approx(1)
    assert constant.active_codewords == 1
    assert constant.bitrate == pytest.approx(math.log2(8) * 1 / (3 * 0.02))


def test_units_quality_truncates_to_the_shorter_sequence():
    # Two extra phone frames, then two missing ones: the extra frames (of another phone) must not count.
    longer_phones = units_quality({"u": ([0, 0, 1, 1, 1, 1], [0, 1])}, num_units=2, num_phones=2)
    shorter_phones = units_quality({"u": ([0, 0], [0, 1])}, num_units=2, num_phones=2)
    assert longer_phones.pnmi == pytest.approx(1)
    assert shorter_phones.active_codewords == 1


def test_units_quality_rejects_bad_input():
    with pytest.raises(ValueError, match=r"'bad'.*7 phone frames.*2 units.*4 frames"):
        units_quality({"ok": ([0, 0], [0]), "bad": ([0] * 7, [0, 0])}, num_units=2, num_phones=2)
    with pytest.raises(ValueError, match=r"'late'.*units value 5 is outside \[0, 5\)"):
        units_quality({"early": ([0, 0], [1]), "late": ([0, 0], [5])}, num_units=5, num_phones=2)
    with pytest.raises(ValueError, match=r"'neg'.*phones value -1"):
        units_quality({"neg": (np.array([-1, 0]), [0])}, num_units=5, num_phones=2)
    with pytest.raises(ValueError, match=r"'f'.*integers"):
        units_quality({"f": ([0, 0], torch.tensor([0.0]))}, num_units=5, num_phones=2)
    with pytest.raises(ValueError, match="no utterance"):
        units_quality({}, num_units=5, num_phones=2)
    with pytest.raises(ValueError, match="no frame"):
        units_quality({"empty": ([], [])}, num_units=5, num_phones=2)


def test_read_phones_and_units_jsonl(tmp_path):
    phones_path = write_jsonl(
        tmp_path / "phones.jsonl.gz",
        [{"name": "a", "phones": ["SIL", "AH", "AH", "B"]}, {"name": "b", "phones": ["B", "SIL"]}],
    )
    phones, labels = read_phones_jsonl(phones_path)
    assert labels == sorted({"SIL", "AH", "B"})
    assert [labels[i] for i in phones["a"]] == ["SIL", "AH", "AH", "B"]
    assert [labels[i] for i in phones["b"]] == ["B", "SIL"]
    units_path = write_jsonl(tmp_path / "units.jsonl", [{"name": "a", "units": [3, 1]}, {"name": "c", "units": []}])
    units = read_units_jsonl(units_path)
    assert units["a"].tolist() == [3, 1] and units["c"].tolist() == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: invalid JSON"),
        ('{"name": "x"}', r'line 2: utterance \'x\' has no "phones" list'),
        ('{"phones": []}', r'line 2: expected an object with a string "name"'),
        ('{"name": "a", "phones": []}', r"line 2: utterance 'a' appears twice"),
        ('{"name": "x", "phones": ["A", 3]}', r"line 2: phone label 3 is not a string"),
    ],
)
def test_read_phones_jsonl_errors(tmp_path, line, message):
    path = tmp_path / "phones.jsonl"
    path.write_text('{"name": "a", "phones": ["A"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ", " + message):
        read_phones_jsonl(path)


def test_read_units_jsonl_rejects_non_integers(tmp_path):
    path = write_jsonl(tmp_path / "units.jsonl", [{"name": "a", "units": [1, 2.5]}])
    with pytest.raises(ValueError, match=r"units\.jsonl, line 1: units of 'a' must be a list of integers"):
        read_units_jsonl(path)


def test_pair_utterances_skips_and_counts(caplog):
    with caplog.at_level(logging.WARNING):
        data, phones_only, units_only = pair_utterances(
            {"a": [0], "b": [0], "c": [0]}, {"b": [1], "c": [1], "d": [1], "e": [1]}
        )
    assert list(data) == ["b", "c"] and (phones_only, units_only) == (1, 2)
    assert "1 utterances of phones have no units" in caplog.text
    assert "2 utterances of units have no phones" in caplog.text
    with pytest.raises(ValueError, match=r"no utterance in common between P \(1 utterances, e\.g\. 'a'\)"):
        pair_utterances({"a": [0]}, {"b": [0]}, phones_source="P", units_source="U")


def test_read_units_dir(tmp_path):
    write_extract_file(
        tmp_path / "alice" / "u1.pt", units={6: torch.tensor([1, 2], dtype=torch.int16)}, num_units={6: 8}
    )
    write_extract_file(tmp_path / "bob" / "u2.pt", units={6: torch.tensor([3], dtype=torch.int16)}, num_units={6: 8})
    (tmp_path / "index.jsonl").write_text('{"source": "alice/u1.wav"}\n')
    extracted = read_units_dir(tmp_path)
    assert extracted.layer == 6 and extracted.num_units == 8 and extracted.model == "spidr_base"
    assert {name: units.tolist() for name, units in extracted.units.items()} == {"u1": [1, 2], "u2": [3]}
    with pytest.raises(ValueError, match=r"no layer 7 \(layers available: 6\)"):
        read_units_dir(tmp_path, layer=7)


def test_repeated_stems_are_named_by_relative_path(tmp_path):
    for rel, value in (("a/u1.pt", 1), ("b/u1.pt", 2), ("b/c/u1.pt", 3), ("b/u2.pt", 4)):
        write_extract_file(tmp_path / rel, units={6: torch.tensor([value], dtype=torch.int16)}, num_units={6: 8})
    files = find_extract_files(tmp_path)
    assert {name: path.relative_to(tmp_path).as_posix() for name, path in files.items()} == {
        "a/u1": "a/u1.pt",
        "b/c/u1": "b/c/u1.pt",
        "b/u1": "b/u1.pt",
        "u2": "b/u2.pt",
    }
    units = read_units_dir(tmp_path).units
    assert {name: u.tolist() for name, u in units.items()} == {"a/u1": [1], "b/c/u1": [3], "b/u1": [2], "u2": [4]}


def test_read_units_dir_errors(tmp_path):
    two_layers = {6: torch.zeros(2, dtype=torch.int16), 8: torch.zeros(2, dtype=torch.int16)}
    write_extract_file(tmp_path / "multi" / "u1.pt", units=two_layers, num_units={6: 8, 8: 8})
    with pytest.raises(ValueError, match=r"u1\.pt: holds layers 6, 8; choose one with --layer"):
        read_units_dir(tmp_path / "multi")
    write_extract_file(tmp_path / "k" / "u1.pt", units={6: torch.zeros(2, dtype=torch.int16)}, num_units={6: 8})
    write_extract_file(tmp_path / "k" / "u2.pt", units={6: torch.zeros(2, dtype=torch.int16)}, num_units={6: 16})
    with pytest.raises(ValueError, match=r"layer 6 has 8 units in .*u1\.pt but 16 in .*u2\.pt"):
        read_units_dir(tmp_path / "k")
    (tmp_path / "bad").mkdir()
    torch.save({"format": "other"}, tmp_path / "bad" / "x.pt")
    with pytest.raises(ValueError, match=r"x\.pt: not a spidr\.extract file"):
        read_units_dir(tmp_path / "bad")


def test_cli_units_on_an_extract_directory(tmp_path, capsys):
    extract_dir = tmp_path / "extracted"
    data = random_corpus(3, num_phones=4, num_units=16, utterances=6)
    labels = ["AA", "B", "SIL", "Z"]  # sorted, so that index i is labels[i] after reading
    records = []
    for name, (phones, units) in data.items():
        records.append({"name": name, "phones": [labels[int(p)] for p in phones]})
        units = torch.as_tensor(units).to(torch.int16)
        write_extract_file(extract_dir / "spk" / f"{name}.pt", units={6: units, 8: units}, num_units={6: 16, 8: 16})
    phones_path = write_jsonl(tmp_path / "phones.jsonl", records)
    out = tmp_path / "q.csv"
    assert main(["units", str(phones_path), str(extract_dir), "--layer", "8", "--csv", str(out)]) == 0
    captured = capsys.readouterr()
    assert "--num-units not given" not in captured.err  # K comes from the files
    expected = reference_quality(data, num_units=16)
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert {(row["model"], row["layer"]) for row in rows} == {("spidr_base", "8")}
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["metric"]], rel=1e-9), row["metric"]


def test_cli_units_defaults_k_and_reports_errors(tmp_path, capsys):
    phones = write_jsonl(tmp_path / "p.jsonl", [{"name": "a", "phones": ["A", "A", "B", "B"]}])
    units = write_jsonl(tmp_path / "u.jsonl", [{"name": "a", "units": [0, 5]}])
    assert main(["units", str(phones), str(units)]) == 0
    captured = capsys.readouterr()
    assert "using 6 (largest + 1)" in captured.err
    assert re.search(r"^active_codewords\s+2$", captured.out, flags=re.MULTILINE)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"name": "a", "units": [0, 5, 5, 5]}])
    assert main(["units", str(phones), str(bad), "--num-units", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: utterance 'a': 4 phone frames") and err.count("\n") == 1
    with pytest.raises(ValueError, match="4 phone frames"):
        main(["units", str(phones), str(bad), "--num-units", "8", "--debug"])


# ----------------------------------------------------------------------------------------------------------------
# ABX: the glue (always tested)

HEADER = "#file onset offset #phone prev-phone next-phone speaker"
PHONES = ("a", "b", "c")
ITEM_SECONDS = Decimal("0.1")  # 5 frames at 50 Hz
ITEMS_PER_FILE = 12


def make_abx_corpus(root: Path, *, separable_layer: int = 8, constant_layer: int = 6) -> tuple[Path, Path]:
    """Two speakers with two files each, holding 12 items of phones a, b, c in the same context.

    In ``separable_layer`` each phone's frames are one fixed probability vector, distinct for each phone,
    so that X is always closer to A (its phone) than to B: the ABX error is 0. In ``constant_layer``
    every frame is the same vector, so every triplet is a tie: the ABX error is 50 %.
    """
    features_dir, lines = root / "features", [HEADER]
    frames = ITEMS_PER_FILE * 5 + 2
    for speaker in ("s1", "s2"):
        for index in range(2):
            name = f"{speaker}-utt{index}"
            separable = torch.full((frames, 3), 1 / 3)
            for k in range(ITEMS_PER_FILE):
                phone = (k + index) % 3
                onset, offset = k * ITEM_SECONDS, (k + 1) * ITEM_SECONDS
                lines.append(f"{name} {onset} {offset} {PHONES[phone]} x y {speaker}")
                separable[5 * k : 5 * k + 5] = 0.1
                separable[5 * k : 5 * k + 5, phone] = 0.8
            layers = {separable_layer: separable, constant_layer: torch.full((frames, 3), 1 / 3)}
            write_extract_file(features_dir / speaker / f"{name}.pt", features=layers)
    item_file = root / "test.item"
    item_file.write_text("\n".join(lines) + "\n")
    return features_dir, item_file


def test_read_item_file(tmp_path):
    _, item_file = make_abx_corpus(tmp_path)
    items = read_item_file(item_file)
    assert len(items) == 4 * ITEMS_PER_FILE
    first = items[0]
    assert (first.line, first.file, first.onset, first.offset) == (2, "s1-utt0", Decimal(0), ITEM_SECONDS)
    assert (first.phone, first.prev_phone, first.next_phone, first.speaker) == ("a", "x", "y", "s1")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("#file onset offset #phone prev-phone speaker\n", r"line 1: missing column\(s\) next-phone"),
        (f"{HEADER}\nf 0.1 zero a x y s\n", r"line 2: offset 'zero' is not a number"),
        (f"{HEADER}\nf 0.1 0.2 a x y s\nf nan 0.2 a x y s\n", r"line 3: onset 'nan' must be a finite number"),
        (f"{HEADER}\nf -1 0.2 a x y s\n", r"line 2: onset '-1' must be a finite number of seconds >= 0"),
        (f"{HEADER}\nf 0.3 0.2 a x y s\n", r"line 2: offset 0.2 is not after onset 0.3"),
        (f"{HEADER}\nf 0.1 0.2 a x y\n", r"line 2: 6 fields in 'f 0.1 0.2 a x y', expected 7"),
        (f"{HEADER}\n\n", r"no item after the header"),
    ],
)
def test_read_item_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.item"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        read_item_file(path)


def test_item_frames_are_those_whose_centre_is_inside():
    rate = 50
    for onset_ms in range(0, 100, 3):
        for duration_ms in range(1, 80, 7):
            onset, offset = Decimal(onset_ms) / 1000, Decimal(onset_ms + duration_ms) / 1000
            centres = [i for i in range(20) if onset <= (Decimal(i) + Decimal("0.5")) / rate <= offset]
            start, end = item_frames(onset, offset, rate)
            assert list(range(start, end)) == centres, (onset, offset)


def test_load_item_features(tmp_path):
    features_dir, item_file = make_abx_corpus(tmp_path)
    items = read_item_file(item_file)
    loaded = load_item_features(items, item_file, features_dir, layer=8)
    assert loaded.layer == 8 and loaded.data.dtype == torch.float32
    stored = torch.load(features_dir / "s2" / "s2-utt1.pt", weights_only=True)["features"][8]
    for item, (left, right) in zip(items, loaded.spans, strict=True):
        if item.file == "s2-utt1":
            start, end = item_frames(item.onset, item.offset, 50)
            assert torch.equal(loaded.data[left:right], stored[start:end])
    with pytest.raises(ValueError, match=r"holds layers 6, 8; choose one with --layer"):
        load_item_features(items, item_file, features_dir)


def test_load_item_features_errors(tmp_path):
    features_dir = tmp_path / "features"
    write_extract_file(features_dir / "f1.pt", features={6: torch.zeros(10, 3, dtype=torch.bfloat16)})
    item_file = tmp_path / "x.item"
    item_file.write_text(f"{HEADER}\nf1 0.0 0.1 a x y s\nf2 0.0 0.1 a x y s\n")
    with pytest.raises(ValueError, match=re.escape(f"{item_file}, line 3: no feature file for 'f2'")):
        load_item_features(read_item_file(item_file), item_file, features_dir)
    item_file.write_text(f"{HEADER}\nf1 0.0 0.1 a x y s\nf1 0.1 0.3 a x y s\n")
    with pytest.raises(ValueError, match=r"line 3: item 0.1-0.3 s needs frames \[5, 15\) but .*f1\.pt has 10"):
        load_item_features(read_item_file(item_file), item_file, features_dir)
    item_file.write_text(f"{HEADER}\nf1 0.001 0.002 a x y s\n")
    with pytest.raises(ValueError, match=r"line 2: item 0.001-0.002 s is shorter than one frame at 50 Hz"):
        load_item_features(read_item_file(item_file), item_file, features_dir)
    item_file.write_text(f"{HEADER}\nf1 0.0 0.1 a x y s\n")
    assert load_item_features(read_item_file(item_file), item_file, features_dir).data.dtype == torch.float32


def test_item_files_name_repeated_stems_by_relative_path(tmp_path):
    features_dir = tmp_path / "features"
    for speaker, value in (("alice", 1.0), ("bob", 2.0)):
        write_extract_file(features_dir / speaker / "utt00.pt", features={6: torch.full((10, 3), value)})
    write_extract_file(features_dir / "carol" / "utt01.pt", features={6: torch.full((10, 3), 3.0)})
    item_file = tmp_path / "x.item"
    lines = ["bob/utt00 0.0 0.1 a x y bob", "alice/utt00 0.0 0.1 a x y alice", "carol/utt01 0.0 0.1 a x y c"]
    item_file.write_text("\n".join([HEADER, *lines, "utt01 0.1 0.2 a x y c"]) + "\n")
    loaded = load_item_features(read_item_file(item_file), item_file, features_dir)
    firsts = [loaded.data[left, 0].item() for left, _ in loaded.spans]
    assert firsts == [2.0, 1.0, 3.0, 3.0]  # a unique stem works either way
    item_file.write_text(f"{HEADER}\nutt00 0.0 0.1 a x y s\n")
    message = f"{item_file}, line 2: 'utt00' names 2 feature files in {features_dir} (alice/utt00, bob/utt00)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_item_features(read_item_file(item_file), item_file, features_dir)


def block_fastabx(monkeypatch) -> None:
    """Make ``import fastabx`` fail, as when it is not installed."""
    monkeypatch.setitem(sys.modules, "fastabx", None)


def test_abx_without_fastabx(tmp_path, monkeypatch, capsys):
    block_fastabx(monkeypatch)
    features_dir, item_file = make_abx_corpus(tmp_path)
    with pytest.raises(FastabxMissingError, match=r"spidr\[eval\].*Python >= 3\.12"):
        abx_error_rate(features_dir, item_file, layer=8)
    assert main(["abx", str(features_dir), str(item_file), "--layer", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ABX needs the fastabx library") and err.count("\n") == 1
    assert "pip install 'spidr[eval]'" in err and "Python >= 3.12" in err


def test_abx_cli_without_fastabx_has_no_traceback(tmp_path):
    features_dir, item_file = make_abx_corpus(tmp_path)
    # A real `python -m spidr.evaluate` run, with fastabx made unimportable first.
    code = (
        "import runpy, sys; sys.modules['fastabx'] = None; "
        f"sys.argv = ['spidr.evaluate', 'abx', {str(features_dir)!r}, {str(item_file)!r}, '--layer', '8']; "
        "runpy.run_module('spidr.evaluate', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ABX needs the fastabx library")


def test_abx_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["abx", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--speaker", "--context", "--distance", "--layer", "--max-size-group", "--debug", "Example"):
        assert option in text
    assert "kl" in text and "angular" in text and "cosine" in text


# ----------------------------------------------------------------------------------------------------------------
# ABX through fastabx (Python >= 3.12 with spidr[eval])


def run_abx_cli(capsys, features_dir: Path, item_file: Path, *options: str) -> float:
    """The ABX error rate in percent printed by the CLI."""
    assert main(["abx", str(features_dir), str(item_file), "--device", "cpu", *options]) == 0
    match = re.search(r"ABX error rate: ([0-9.]+) %", capsys.readouterr().out)
    assert match, "no ABX error rate printed"
    return float(match.group(1))


@pytest.mark.parametrize(
    ("speaker", "context", "distance"),
    [("within", "within", "angular"), ("across", "any", "cosine"), ("within", "any", "kl")],
)
def test_abx_separable_phones_give_zero_error(tmp_path, capsys, speaker, context, distance):
    pytest.importorskip("fastabx")
    features_dir, item_file = make_abx_corpus(tmp_path)
    options = ["--speaker", speaker, "--context", context, "--distance", distance, "--layer", "8"]
    assert run_abx_cli(capsys, features_dir, item_file, *options) == 0


def test_abx_indistinguishable_phones_give_chance(tmp_path, capsys):
    pytest.importorskip("fastabx")
    features_dir, item_file = make_abx_corpus(tmp_path)
    assert run_abx_cli(capsys, features_dir, item_file, "--layer", "6") == 50


@pytest.mark.parametrize(("speaker", "context"), [("within", "within"), ("across", "any")])
def test_abx_agrees_with_fastabx_zerospeech(tmp_path, speaker, context):
    fastabx = pytest.importorskip("fastabx")
    features_dir, item_file = make_abx_corpus(tmp_path)
    generator, flat_dir = torch.Generator().manual_seed(0), tmp_path / "flat"
    flat_dir.mkdir()
    for path in sorted(features_dir.rglob("*.pt")):  # noisy features, so that the error is neither 0 nor 50 %
        content = torch.load(path, weights_only=True)
        content["features"][8] += 0.3 * torch.randn(content["features"][8].shape, generator=generator)
        torch.save(content, path)
        torch.save(content, flat_dir / path.name)  # fastabx matches #file to paths relative to its root
    ours = abx_error_rate(features_dir, item_file, speaker=speaker, context=context, layer=8, device="cpu")
    theirs = fastabx.zerospeech_abx(
        item_file,
        flat_dir,
        max_size_group=10,
        max_x_across=5,
        speaker=speaker,
        context=context,
        feature_maker=lambda path: torch.load(path, weights_only=True)["features"][8],
        device="cpu",
        progress=False,
    )
    assert 0 < ours.error_rate < 0.5
    assert ours.error_rate == theirs
