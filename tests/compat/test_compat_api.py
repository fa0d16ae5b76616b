"""Every public module and name of the reference release (spidr 0.2.0) exists here, with a signature that takes
the same calls: ``from spidr.X import Y`` works for every public Y of every 0.2.0 module X.

The release's API is listed in fixtures/release_api.json (generators/release_api.py parses its source). A
callable matches when each of the release's parameters exists here under the same name, positional ones at the
same positions, keyword-only ones passable by keyword, with a default wherever the release has one, and every
parameter we add has a default. Dataclass fields keep the release's order (positional construction works).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("polars")
pytest.importorskip("torchcodec")
pytest.importorskip("submitit")

API = json.loads((Path(__file__).parent / "fixtures" / "release_api.json").read_text())["modules"]

# Names whose release signature we do not take, each with the reason (the README lists them too).
DIFFERENCES: dict[str, str] = {}


def names_of(module: str) -> list[tuple[str, str, dict]]:
    entry = API[module]
    found = [(n, "function", spec) for n, spec in entry["functions"].items() if not n.startswith("_")]
    found += [(n, "class", spec) for n, spec in entry["classes"].items() if not n.startswith("_")]
    found += [(n, "constant", spec) for n, spec in entry["constants"].items() if not n.startswith("_")]
    found += [(n, "imported", spec) for n, spec in entry["imported"].items() if not n.startswith("_")]
    return found


CASES = [(module, name, kind, spec) for module in sorted(API) for name, kind, spec in names_of(module)]


def check_parameters(where: str, theirs: list[dict], ours: inspect.Signature) -> None:
    params = list(ours.parameters.values())
    by_name = {p.name: p for p in params}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    their_names = set()
    for index, param in enumerate(theirs):
        name, kind = param["name"], param["kind"]
        their_names.add(name)
        if kind == "var_positional":
            assert var_positional, f"{where}: the release takes *{name}"
            continue
        if kind == "var_keyword":
            assert var_keyword, f"{where}: the release takes **{name}"
            continue
        mine = by_name.get(name)
        if mine is None:
            assert var_keyword and kind == "keyword_only", f"{where}: no parameter {name!r}"
            continue
        if kind == "positional_or_keyword":
            assert index < len(positional) and positional[index].name == name, (
                f"{where}: {name!r} is positional #{index} in the release"
            )
        else:
            assert mine.kind in (mine.KEYWORD_ONLY, mine.POSITIONAL_OR_KEYWORD), (
                f"{where}: {name!r} is keyword-only there"
            )
        if param["has_default"]:
            assert mine.default is not inspect.Parameter.empty, f"{where}: {name!r} has a default in the release"
    for param in params:
        if param.name in their_names or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        assert param.default is not inspect.Parameter.empty, (
            f"{where}: our extra parameter {param.name!r} needs a default"
        )


def init_params(spec: dict) -> list[dict] | None:
    if spec.get("kind") in ("dataclass", "namedtuple"):
        return [
            {"name": f["name"], "kind": "positional_or_keyword", "has_default": f["has_default"]}
            for f in spec.get("all_fields") or spec["fields"]
        ]
    if spec.get("init") is not None:
        return spec["init"]
    return None


@pytest.mark.parametrize(("module", "name", "kind", "spec"), CASES, ids=[f"{m}:{n}" for m, n, _, _ in CASES])
def test_release_name_exists_with_its_signature(module: str, name: str, kind: str, spec: dict[str, Any]) -> None:
    if f"{module}.{name}" in DIFFERENCES:
        pytest.skip(DIFFERENCES[f"{module}.{name}"])
    ours = importlib.import_module(module)
    assert hasattr(ours, name), f"from {module} import {name} fails"
    value = getattr(ours, name)
    where = f"{module}.{name}"
    if kind == "function":
        assert callable(value), where
        check_parameters(where, spec["params"], inspect.signature(value))
    elif kind == "class":
        assert inspect.isclass(value) or typing.is_typeddict(value), where
        if spec.get("kind") == "typeddict":
            assert typing.is_typeddict(value), f"{where} is a TypedDict in the release"
            hints = typing.get_type_hints(value)
            assert all(f["name"] in hints for f in spec["fields"]), where
            return
        if spec.get("kind") == "dataclass":
            fields = [f.name for f in dataclasses.fields(value)]
            theirs = [f["name"] for f in spec.get("all_fields") or spec["fields"]]
            assert fields[: len(theirs)] == theirs, f"{where}: fields {fields} do not start with {theirs}"
        params = init_params(spec)
        if params is not None and spec.get("kind") not in ("typeddict",):
            signature = inspect.signature(value)
            check_parameters(f"{where}()", [p for p in params if p["name"] != "self"], signature)
        for method, method_spec in spec.get("methods", {}).items():
            if method.startswith("_") and not (method.startswith("__") and method.endswith("__")):
                continue
            assert hasattr(value, method), f"{where}.{method} is missing"
            if method == "__init__" or method_spec.get("method_kind") == "property":
                continue
            member = inspect.getattr_static(value, method)
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            if callable(member):
                theirs = method_spec["params"]
                if method_spec.get("method_kind") in ("instance", "classmethod") and theirs:
                    theirs = theirs[1:]
                    signature = inspect.signature(member)
                    signature = signature.replace(parameters=list(signature.parameters.values())[1:])
                else:
                    signature = inspect.signature(member)
                check_parameters(f"{where}.{method}", theirs, signature)
        for prop in spec.get("properties", {}):
            assert hasattr(value, prop), f"{where}.{prop} is missing"


def test_every_release_module_imports() -> None:
    for module in API:
        importlib.import_module(module)
