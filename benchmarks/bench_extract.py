"""Extraction: the batched ``spidr.extract`` path against a per-file loop, side by side in one process.

    python benchmarks/bench_extract.py               # base-size SpidR, layer 6 of the committed speech
    python benchmarks/bench_extract.py --quick       # the small test model (a smoke run)
    python benchmarks/bench_extract.py --reference /path/to/spidr-0.2.0-py3-none-any.whl   # + the release's loop

Task: layer-6 features of the ten committed utterances (tests/data/speech, 34 s of espeak-ng speech),
written as one ``.pt`` per file. The model is the base-size SpidR with random weights (the published
checkpoint is not downloaded here; the compute is the same). Rows:

- ``per-file``: the loop a user writes with the release's API (reference row): for each file, load and
  standardise the waveform, ``get_intermediate_outputs`` (every layer), keep layer 6, ``torch.save``;
- ``per-file, stop at layer``: the same loop with our ``num_layers=6`` (no batching);
- ``per-file, release``: the same loop as ``per-file`` run by the reference release (spidr 0.2.0, loaded with the
  same weights under a private alias, see ``bench_step.load_release``) when it is given (``--reference PATH`` or
  ``SPIDR_REFERENCE``): what a user of the release runs today. Without it the row is skipped, with the reason;
- ``spidr.extract``: the CLI's code path (``spidr.extract.extract``): files sorted by length, batched by
  ``--batch-seconds`` (on the CPU packed: each file's conv features alone, the transformer on all the
  batch's frames end to end with attention within each file, no padded frame computed), layers computed up
  to 6, audio decoded in a background thread, atomic writes, index.

The rows are timed round robin, so a drift of the machine's speed hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_step import ReleaseError, load_release, reference_path, release_model
from benchmarks.harness import Row, Suite, machine_line, paired_ratio, time_interleaved
from spidr.config import SpidRConfig
from spidr.data.audio import load_audio
from spidr.extract import extract
from spidr.models import SpidR

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech"


def _model(quick: bool) -> tuple[SpidR, int]:
    torch.manual_seed(0)
    if quick:
        from benchmarks.bench_step import quick_config

        cfg = quick_config()
        return SpidR(cfg).eval(), 2
    return SpidR(SpidRConfig()).eval(), 6


RELEASE_ROW = "per-file, release"


def _release_loop_model(model: SpidR, reference: str | os.PathLike[str] | None, skipped: list[str]) -> Any:
    """The release and its model with our model's weights, or None with the reason appended to ``skipped``."""
    path = reference_path(reference)
    if path is None:
        skipped.append(
            f"`{RELEASE_ROW}`: no reference release given (--reference PATH or SPIDR_REFERENCE=PATH: its wheel or a "
            "directory holding its spidr/ package)"
        )
        return None
    try:
        release = load_release(path)
        device = next(model.parameters()).device
        return release, release_model(release, model.cfg, model.state_dict(), device).eval()
    except ReleaseError as error:
        skipped.append(f"`{RELEASE_ROW}`: {error}")
        return None


def run_suite(
    *,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    batch_seconds: float = 120.0,
    reference: str | os.PathLike[str] | None = None,
) -> Suite:
    """Time the ways of extracting one layer of the committed speech; see the module docstring.

    ``reference``: the release's wheel or directory (default ``$SPIDR_REFERENCE``); none: its row is skipped.
    """
    model, layer = _model(quick)
    model = model.to(device)
    skipped: list[str] = []
    loaded = _release_loop_model(model, reference, skipped)
    files = sorted(SPEECH.glob("*/*.wav"))
    seconds = sum(load_audio(f).shape[0] for f in files) / 16000
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    repeats = 1 if quick else repeats

    def per_file(stop: bool) -> None:
        out = work / ("stop" if stop else "loop")
        for f in files:
            wav = load_audio(f, normalize=True).to(device)
            with torch.inference_mode():
                if stop:
                    feats = model.get_intermediate_outputs(wav[None], num_layers=layer)[layer - 1][0]
                else:
                    feats = model.get_intermediate_outputs(wav[None])[layer - 1][0]
            target = out / f.relative_to(SPEECH).with_suffix(".pt")
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": {layer: feats.cpu()}}, target)

    def release_per_file() -> None:  # the same loop, the release's model (its get_intermediate_outputs: every layer)
        release, rel_model = loaded
        for f in files:
            wav = load_audio(f, normalize=True).to(device)
            with torch.inference_mode(), release.active():
                feats = rel_model.get_intermediate_outputs(wav[None])[layer - 1][0]
            target = work / "release" / f.relative_to(SPEECH).with_suffix(".pt")
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": {layer: feats.cpu()}}, target)

    def batched() -> None:
        extract(
            SPEECH,
            work / "cli",
            model="bench",
            loaded_model=model,
            layers=str(layer),
            device=device,
            batch_seconds=batch_seconds,
            overwrite=True,
            progress=False,
        )

    try:
        fns = {"per-file": lambda: per_file(False), "per-file, stop at layer": lambda: per_file(True)}
        if loaded is not None:
            fns[RELEASE_ROW] = release_per_file
        fns["spidr.extract"] = batched
        times = time_interleaved(fns, repeats=repeats, device=device)
        rows = [Row.from_times(name, t) for name, t in times.items()]
        for row in rows:
            row.extra["vs per-file (paired)"] = round(paired_ratio(times[row.name], times["per-file"]), 3)
            if loaded is not None:
                row.extra["vs release loop (paired)"] = round(paired_ratio(times[row.name], times[RELEASE_ROW]), 3)
        checked = ["cli", "stop"] + (["release"] if loaded is not None else [])
        for path in (work / "loop").rglob("*.pt"):  # same numbers from every path
            mine = torch.load(path, weights_only=True)["features"][layer]
            for other in checked:
                theirs = torch.load(work / other / path.relative_to(work / "loop"), weights_only=True)
                torch.testing.assert_close(theirs["features"][layer], mine, atol=1e-4, rtol=0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row.extra["x real time"] = round(seconds / row.median_s, 1)
    size = "small test model" if quick else "base-size SpidR (random weights)"
    if loaded is not None:
        release, _ = loaded
        next(r for r in rows if r.name == RELEASE_ROW).note = f"spidr {release.version} from {release.entry.name}"
    return Suite(
        name="extract",
        title=f"Extraction of layer {layer}, {len(files)} files ({seconds:.1f} s of speech), {size}, {device}",
        rows=rows,
        reference="per-file",
        notes=[
            f"spidr.extract with --batch-seconds {batch_seconds:g}; the outputs of every row checked equal (1e-4). "
            "Rows timed round robin (each round runs every row once); vs per-file (paired): median over rounds "
            "of the row's time over the per-file loop's (or the release's loop's) in the same round."
        ],
        skipped=skipped,
    ).finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small test model, one run (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds after one warm-up round (default 5)")
    parser.add_argument("--device", default="cpu", help="where every row runs (default cpu)")
    parser.add_argument(
        "--batch-seconds", type=float, default=120.0, help="spidr.extract's --batch-seconds (default 120, its default)"
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    parser.add_argument(
        "--reference",
        metavar="PATH",
        help="the reference release (its wheel or a directory holding its spidr/ package; default $SPIDR_REFERENCE): "
        f"adds the `{RELEASE_ROW}` row, the release's own per-file loop",
    )
    args = parser.parse_args(argv)
    suite = run_suite(
        repeats=args.repeats,
        quick=args.quick,
        device=args.device,
        batch_seconds=args.batch_seconds,
        reference=args.reference,
    )
    print(machine_line())
    print()
    print(suite.markdown())
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "suites": [suite.to_dict()]}, indent=2))


if __name__ == "__main__":
    main()
