"""Command line of the evaluations: ``python -m spidr.evaluate units|abx ...`` (see ``--help``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from spidr.evaluate.abx import DISTANCES, ZEROSPEECH_MAX_SIZE_GROUP, ZEROSPEECH_MAX_X_ACROSS, abx_error_rate
from spidr.evaluate.units import (
    pair_utterances,
    read_phones_jsonl,
    read_units_dir,
    read_units_jsonl,
    units_quality,
    write_units_quality_csv,
)

UNITS_EPILOG = """\
PHONES is a JSONL or JSONL.gz file of {"name": ..., "phones": ["SIL", "AH", ...]}, one label per 10 ms.
UNITS is either a JSONL(.gz) file of {"name": ..., "units": [12, 12, 7, ...]}, one unit per 20 ms, or the
output directory of spidr.extract (utterance name = file name without extension, or the path relative to
that directory, e.g. alice/utt00, where names repeat in several folders). Utterances found in only one of
the two are skipped with a warning; having none in common is an error.

Examples:
  python -m spidr.evaluate units phones.jsonl.gz units.jsonl.gz --num-units 256 --layer 6
  python -m spidr.evaluate units phones.jsonl.gz extracted/ --layer 6 --csv quality.csv --name spidr_base
"""

ABX_EPILOG = """\
FEATURES is the output directory of spidr.extract (run with features), ITEM_FILE a ZeroSpeech item file
with the columns "#file onset offset #phone prev-phone next-phone speaker" (onset and offset in seconds;
#file is matched to the feature file name without extension, or to its path relative to FEATURES, e.g.
alice/utt00, which names repeated in several folders need). Needs fastabx: pip install 'spidr[eval]' on
Python >= 3.12. Prints the ABX error rate in percent (lower is better, 50 % is chance).

Examples:
  python -m spidr.evaluate abx extracted/ dev-clean.item --layer 6
  python -m spidr.evaluate abx extracted/ dev-clean.item --layer 6 --speaker across --context any
"""


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _subsample_size(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if number < 0:
        return None
    if number < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, or negative to disable subsampling, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m spidr.evaluate``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    parser = argparse.ArgumentParser(
        prog="python -m spidr.evaluate",
        description="Evaluate extracted units (PNMI, purities, perplexity, bitrate) and features (ABX).",
        epilog="Run 'python -m spidr.evaluate units --help' or '... abx --help' for each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{units,abx}")

    units = commands.add_parser(
        "units",
        parents=[common],
        help="unit quality against phone alignments",
        description="Unit quality against phone alignments: PNMI, phone and cluster purity, codebook\n"
        "perplexity, active codewords and bitrate. Units (20 ms) are repeated twice to match the phones (10 ms).",
        epilog=UNITS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    units.add_argument("phones", type=Path, metavar="PHONES", help="phone alignments, JSONL or JSONL.gz")
    units.add_argument("units", type=Path, metavar="UNITS", help="units: JSONL(.gz) file or spidr.extract directory")
    units.add_argument(
        "--num-units",
        type=_positive_int,
        metavar="K",
        help="codebook size K, e.g. 256 (default: K recorded in the extract files, else the largest unit + 1)",
    )
    units.add_argument(
        "--layer",
        type=_positive_int,
        metavar="L",
        help="1-based layer, e.g. 6: selects it in a spidr.extract directory holding several layers, and labels "
        "the CSV (for a JSONL file it is only a label)",
    )
    units.add_argument("--csv", type=Path, metavar="OUT", help="also write the scores to OUT, e.g. quality.csv")
    units.add_argument(
        "--name",
        metavar="MODEL",
        help="model column of the CSV, e.g. spidr_kmeans (default: the model in the extract files, else the "
        "UNITS file name)",
    )

    abx = commands.add_parser(
        "abx",
        parents=[common],
        help="ABX error rate of features (fastabx)",
        description="ABX phone discrimination error rate of extracted features, ZeroSpeech 2021 protocol,\n"
        "computed by fastabx with DTW over the 20 ms frames.",
        epilog=ABX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    abx.add_argument("features", type=Path, metavar="FEATURES", help="spidr.extract output directory with features")
    abx.add_argument("item_file", type=Path, metavar="ITEM_FILE", help="ZeroSpeech item file, e.g. dev-clean.item")
    abx.add_argument(
        "--speaker",
        choices=["within", "across"],
        default="within",
        help="A, B and X from the same speaker (within), or X from another speaker (across); default: within",
    )
    abx.add_argument(
        "--context",
        choices=["within", "any"],
        default="within",
        help="A, B and X share the previous and next phones (within), or not necessarily (any); default: within",
    )
    abx.add_argument(
        "--distance",
        choices=list(DISTANCES),
        default="angular",
        help="frame distance: angular = cosine = arccos(cosine similarity) / pi; kl = symmetric KL divergence, "
        "for features that are probabilities; default: angular",
    )
    abx.add_argument(
        "--layer",
        type=_positive_int,
        metavar="L",
        help="1-based layer to evaluate, e.g. 6 (required when the files hold several layers)",
    )
    abx.add_argument(
        "--max-size-group",
        type=_subsample_size,
        default=ZEROSPEECH_MAX_SIZE_GROUP,
        metavar="N",
        help="at most N items for each of A, B and X in a cell, negative to disable; "
        f"default: {ZEROSPEECH_MAX_SIZE_GROUP} (ZeroSpeech)",
    )
    abx.add_argument(
        "--max-x-across",
        type=_subsample_size,
        default=ZEROSPEECH_MAX_X_ACROSS,
        metavar="N",
        help="with --speaker across, at most N speakers for X per (A, B), negative to disable; "
        f"default: {ZEROSPEECH_MAX_X_ACROSS} (ZeroSpeech)",
    )
    abx.add_argument("--seed", type=int, default=0, help="seed of the subsampling; default: 0")
    abx.add_argument("--device", help="device for fastabx, e.g. cpu or cuda:0 (default: cuda if available)")
    abx.add_argument("--progress", action="store_true", help="show fastabx's progress bars")
    return parser


def _units_command(args: argparse.Namespace) -> None:
    phones, labels = read_phones_jsonl(args.phones)
    layer, model, num_units = args.layer, args.name, args.num_units
    if args.units.is_dir():
        extracted = read_units_dir(args.units, layer=layer)
        units: dict = extracted.units
        layer, model = extracted.layer, model or extracted.model or None
        num_units = num_units or extracted.num_units
    else:
        units = read_units_jsonl(args.units)
    model = model or args.units.name.removesuffix(".gz").removesuffix(".jsonl")
    data, _, _ = pair_utterances(phones, units, phones_source=str(args.phones), units_source=str(args.units))
    if num_units is None:
        num_units = 1 + max((int(np.max(np.asarray(u))) for _, u in data.values() if len(u)), default=0)
        print(
            f"note: --num-units not given nor recorded with the units: using {num_units} (largest + 1)",
            file=sys.stderr,
        )
    quality = units_quality(data, num_units=num_units, num_phones=len(labels))
    layer_text = f"layer {layer}, " if layer is not None else ""
    print(f"{model}: {layer_text}{len(data)} utterances, {len(labels)} phones, {num_units} units")
    print(f"{'metric':<20} score")
    for metric, value in quality.as_dict().items():
        text = str(value) if isinstance(value, int) else f"{value:.2f}" if value > 1 else f"{value:.4f}"
        print(f"{metric:<20} {text}")
    if args.csv is not None:
        write_units_quality_csv(args.csv, quality, model=model, layer=layer)
        print(f"wrote {args.csv}")


def _abx_command(args: argparse.Namespace) -> None:
    result = abx_error_rate(
        args.features,
        args.item_file,
        speaker=args.speaker,
        context=args.context,
        distance=args.distance,
        layer=args.layer,
        max_size_group=args.max_size_group,
        max_x_across=args.max_x_across,
        seed=args.seed,
        device=args.device,
        progress=args.progress,
    )
    print(
        f"ABX error rate: {100 * result.error_rate:.2f} % (layer {result.layer}, {result.speaker} speaker, "
        f"{result.context} context, {result.distance} distance, {result.items} items)"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 1 after an error printed on one line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "units":
            _units_command(args)
        else:
            _abx_command(args)
    except Exception as error:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(error).splitlines()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
