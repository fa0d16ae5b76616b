"""Evaluate discrete units and features: unit quality (PNMI, purities, bitrate) and ABX through fastabx.

Command line: ``python -m spidr.evaluate units PHONES UNITS`` and ``python -m spidr.evaluate abx FEATURES ITEMS``
(``--help`` for the options). The ABX needs fastabx (``pip install 'spidr[eval]'``, Python >= 3.12), imported
only when a score is computed.
"""

from spidr.evaluate.abx import (
    AbxResult,
    FastabxMissingError,
    Item,
    ItemFeatures,
    abx_error_rate,
    item_frames,
    load_item_features,
    read_item_file,
)
from spidr.evaluate.features import ExtractFile, find_extract_files, load_extract_file
from spidr.evaluate.units import (
    UnitsFromExtract,
    UnitsQuality,
    pair_utterances,
    read_phones_jsonl,
    read_units_dir,
    read_units_jsonl,
    units_quality,
    write_units_quality_csv,
)

__all__ = [
    "AbxResult",
    "ExtractFile",
    "FastabxMissingError",
    "Item",
    "ItemFeatures",
    "UnitsFromExtract",
    "UnitsQuality",
    "abx_error_rate",
    "find_extract_files",
    "item_frames",
    "load_extract_file",
    "load_item_features",
    "pair_utterances",
    "read_item_file",
    "read_phones_jsonl",
    "read_units_dir",
    "read_units_jsonl",
    "units_quality",
    "write_units_quality_csv",
]
