"""List the public API of the reference release (spidr 0.2.0) as JSON, by static analysis.

Run with a Python >= 3.12 interpreter (0.2.0 uses PEP 695 syntax, which older ``ast`` cannot parse),
pointing at the unpacked package folder of the release (the folder holding its ``__init__.py``):

    ~/.pyenv/versions/3.12.1/bin/python tests/compat/generators/release_api.py /tmp/ref/spidr \
        [tests/compat/fixtures/release_api.json]

Nothing is imported: every module is parsed with ``ast``. The output maps each dotted module name
(``spidr``, ``spidr.data.dataset``, ``spidr.__main__``, ...) to:

- ``functions``: top-level public functions, each with ``params`` (ordered list of
  ``{name, kind, annotation, has_default, default}``; kind is positional_only /
  positional_or_keyword / var_positional / keyword_only / var_keyword; ``annotation`` and ``default``
  are source text or null), ``returns`` (source text or null), ``decorators``, ``is_async`` and
  ``type_params`` (PEP 695 source text).
- ``classes``: top-level public classes with ``bases`` and ``keywords`` (source text), ``decorators``,
  ``kind`` (class / dataclass / namedtuple / typeddict / exception / enum), for dataclasses ``frozen``
  and the other ``@dataclass(...)`` options, ``fields`` (own fields declared in the body, in order:
  ``{name, annotation, has_default, default}``; for dataclasses also ``all_fields``: the fields of the
  generated ``__init__`` after resolving bases defined inside the package), ``init`` (the explicit
  ``__init__`` parameters without ``self``, or null), ``methods`` (public and dunder methods, with
  ``params`` including ``self``/``cls``, ``returns``, ``decorators`` and ``method_kind``: instance /
  static / class), ``properties`` (``returns``, ``decorators``, whether a setter exists) and
  ``attributes`` (class-level assignments).
- ``constants``: public top-level assignments (``annotation``, ``value`` source text).
- ``imported``: names bound by ``from spidr... import ...`` at module top level, with
  ``imported_from`` (the module named in the import), ``original_name`` and ``defined_in`` (the module
  that finally defines it, following re-exports inside the package). Names imported from the standard
  library or third-party packages are left out entirely.
- ``all``: the module's ``__all__`` list or null; ``docstring``; ``main_block``: whether it has an
  ``if __name__ == "__main__":`` block, and ``cli_arguments``: the source text of every
  ``add_argument(...)`` call inside that block (the command-line interface).
"""

import ast
import json
import sys
from pathlib import Path

PACKAGE = "spidr"


def src(node: ast.AST | None, text: str) -> str | None:
    if node is None:
        return None
    segment = ast.get_source_segment(text, node)
    return segment if segment is not None else ast.unparse(node)


def is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def resolve_relative(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def parameters(args: ast.arguments, text: str) -> list[dict]:
    out: list[dict] = []
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, arg in enumerate(positional):
        kind = "positional_only" if i < len(args.posonlyargs) else "positional_or_keyword"
        out.append(param(arg, kind, defaults[i], text))
    if args.vararg is not None:
        out.append(param(args.vararg, "var_positional", None, text))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append(param(arg, "keyword_only", default, text))
    if args.kwarg is not None:
        out.append(param(args.kwarg, "var_keyword", None, text))
    return out


def param(arg: ast.arg, kind: str, default: ast.expr | None, text: str) -> dict:
    return {
        "name": arg.arg,
        "kind": kind,
        "annotation": src(arg.annotation, text),
        "has_default": default is not None,
        "default": src(default, text),
    }


def function_info(node: ast.FunctionDef | ast.AsyncFunctionDef, text: str) -> dict:
    return {
        "params": parameters(node.args, text),
        "returns": src(node.returns, text),
        "decorators": [src(d, text) for d in node.decorator_list],
        "is_async": isinstance(node, ast.AsyncFunctionDef),
        "type_params": [src(t, text) for t in getattr(node, "type_params", [])],
        "has_docstring": ast.get_docstring(node) is not None,
    }


def decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return ast.unparse(target)


def class_kind(node: ast.ClassDef, text: str) -> tuple[str, dict]:
    extra: dict = {}
    for deco in node.decorator_list:
        name = decorator_name(deco)
        if name in {"dataclass", "dataclasses.dataclass"}:
            options = {kw.arg: src(kw.value, text) for kw in deco.keywords} if isinstance(deco, ast.Call) else {}
            extra["frozen"] = options.pop("frozen", "False") == "True"
            extra["dataclass_options"] = options
            return "dataclass", extra
    bases = [ast.unparse(b) for b in node.bases]
    if any(b in {"NamedTuple", "typing.NamedTuple"} for b in bases):
        return "namedtuple", extra
    if any(b in {"TypedDict", "typing.TypedDict"} for b in bases):
        total = next((kw for kw in node.keywords if kw.arg == "total"), None)
        extra["total"] = True if total is None else src(total.value, text) == "True"
        return "typeddict", extra
    if any(b.endswith(("Enum", "IntEnum", "StrEnum", "Flag")) for b in bases):
        return "enum", extra
    if any(b.endswith(("Exception", "Error")) for b in bases):
        return "exception", extra
    return "class", extra


def class_info(node: ast.ClassDef, text: str) -> dict:
    kind, extra = class_kind(node, text)
    info: dict = {
        "bases": [src(b, text) for b in node.bases],
        "keywords": {kw.arg: src(kw.value, text) for kw in node.keywords},
        "decorators": [src(d, text) for d in node.decorator_list],
        "kind": kind,
        "type_params": [src(t, text) for t in getattr(node, "type_params", [])],
        "has_docstring": ast.get_docstring(node) is not None,
        **extra,
    }
    fields, attributes, methods, properties = [], {}, {}, {}
    init = None
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            entry = {
                "name": stmt.target.id,
                "annotation": src(stmt.annotation, text),
                "has_default": stmt.value is not None,
                "default": src(stmt.value, text),
            }
            if kind in {"dataclass", "namedtuple", "typeddict"} and "ClassVar" not in entry["annotation"]:
                fields.append(entry)
            elif is_public(stmt.target.id):
                attributes[stmt.target.id] = {"annotation": entry["annotation"], "value": entry["default"]}
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name) and is_public(target.id):
                    attributes[target.id] = {"annotation": None, "value": src(stmt.value, text)}
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            decos = [decorator_name(d) for d in stmt.decorator_list]
            if stmt.name == "__init__":
                init = parameters(stmt.args, text)[1:]
            if "property" in decos or "functools.cached_property" in decos or "cached_property" in decos:
                properties[stmt.name] = {
                    "returns": src(stmt.returns, text),
                    "decorators": [src(d, text) for d in stmt.decorator_list],
                    "has_setter": False,
                }
                continue
            if any(d.endswith((".setter", ".deleter")) for d in decos):
                prop = decos[0].rsplit(".", 1)[0]
                if prop in properties and decos[0].endswith(".setter"):
                    properties[prop]["has_setter"] = True
                continue
            if not is_public(stmt.name):
                continue
            method = function_info(stmt, text)
            method["method_kind"] = (
                "static" if "staticmethod" in decos else "class" if "classmethod" in decos else "instance"
            )
            methods[stmt.name] = method
    info["fields"] = fields if kind in {"dataclass", "namedtuple", "typeddict"} else None
    info["init"] = init
    info["methods"] = methods
    info["properties"] = properties
    info["attributes"] = attributes
    return info


def is_main_guard(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.If):
        return False
    test = stmt.test
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def analyse_module(root: Path, path: Path) -> dict:
    name = module_name(root, path)
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    is_package = path.name == "__init__.py"
    functions, classes, constants, imported = {}, {}, {}, {}
    all_names = None
    main_block, cli_arguments = False, []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            if not stmt.name.startswith("_"):
                functions[stmt.name] = function_info(stmt, text)
        elif isinstance(stmt, ast.ClassDef):
            if not stmt.name.startswith("_"):
                classes[stmt.name] = class_info(stmt, text)
        elif isinstance(stmt, ast.ImportFrom):
            origin = resolve_relative(name, is_package, stmt.level, stmt.module) if stmt.level else stmt.module
            if origin is None or not (origin == PACKAGE or origin.startswith(PACKAGE + ".")):
                continue
            for alias in stmt.names:
                bound = alias.asname or alias.name
                imported[bound] = {"imported_from": origin, "original_name": alias.name}
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    bound = alias.asname or alias.name.split(".")[0]
                    imported[bound] = {"imported_from": alias.name, "original_name": None, "module_import": True}
        elif isinstance(stmt, ast.Assign | ast.AnnAssign | ast.TypeAlias):
            if isinstance(stmt, ast.Assign):
                targets = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
                annotation, value = None, src(stmt.value, text)
            elif isinstance(stmt, ast.AnnAssign):
                targets = [stmt.target.id] if isinstance(stmt.target, ast.Name) else []
                annotation, value = src(stmt.annotation, text), src(stmt.value, text)
            else:
                targets = [stmt.name.id]
                annotation, value = None, src(stmt.value, text)
            for target in targets:
                if target == "__all__":
                    all_names = ast.literal_eval(stmt.value)
                elif not target.startswith("_"):
                    constants[target] = {
                        "annotation": annotation,
                        "value": value,
                        "type_alias_statement": isinstance(stmt, ast.TypeAlias),
                    }
        elif is_main_guard(stmt):
            main_block = True
            for node in ast.walk(stmt):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"
                ):
                    cli_arguments.append(src(node, text))
    return {
        "path": path.relative_to(root).as_posix(),
        "docstring": ast.get_docstring(tree),
        "functions": functions,
        "classes": classes,
        "constants": constants,
        "imported": imported,
        "all": all_names,
        "main_block": main_block,
        "cli_arguments": cli_arguments,
    }


def resolve_definitions(modules: dict[str, dict]) -> None:
    def defined_in(module: str, name: str, seen: set) -> str | None:
        if (module, name) in seen or module not in modules:
            return None
        seen.add((module, name))
        info = modules[module]
        if name in info["functions"] or name in info["classes"] or name in info["constants"]:
            return module
        if name in info["imported"] and info["imported"][name]["original_name"] is not None:
            entry = info["imported"][name]
            return defined_in(entry["imported_from"], entry["original_name"], seen)
        if f"{module}.{name}" in modules:  # a submodule imported by name from its package
            return f"{module}.{name}"
        return None

    for info in modules.values():
        for entry in info["imported"].values():
            if entry["original_name"] is None:
                entry["defined_in"] = entry["imported_from"] if entry["imported_from"] in modules else None
            else:
                entry["defined_in"] = defined_in(entry["imported_from"], entry["original_name"], set())


def resolve_dataclass_fields(modules: dict[str, dict]) -> None:
    def lookup(module: str, base: str) -> tuple[str, dict] | None:
        info = modules[module]
        if base in info["classes"]:
            return module, info["classes"][base]
        if base in info["imported"]:
            target = info["imported"][base]["defined_in"]
            original = info["imported"][base]["original_name"]
            if target in modules and original in modules[target]["classes"]:
                return target, modules[target]["classes"][original]
        return None

    def all_fields(module: str, cls: dict) -> list[dict]:
        merged: dict[str, dict] = {}
        for base in reversed(cls["bases"]):
            found = lookup(module, base)
            if found is not None and found[1]["kind"] == "dataclass":
                for field in all_fields(*found):
                    merged[field["name"]] = field
        for field in cls["fields"]:
            if field["name"] in merged:
                merged[field["name"]] = field  # keeps the inherited position, takes the new default
            else:
                merged[field["name"]] = field
        return list(merged.values())

    for module, info in modules.items():
        for cls in info["classes"].values():
            if cls["kind"] == "dataclass":
                cls["all_fields"] = all_fields(module, cls)


def main() -> None:
    if len(sys.argv) not in {2, 3}:
        raise SystemExit(__doc__)
    root = Path(sys.argv[1]).resolve()
    default_out = Path(__file__).resolve().parent.parent / "fixtures" / "release_api.json"
    output = Path(sys.argv[2]) if len(sys.argv) == 3 else default_out
    if not (root / "__init__.py").is_file():
        raise SystemExit(f"{root} is not a package folder")
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(root, path): analyse_module(root, path) for path in paths}
    resolve_definitions(modules)
    resolve_dataclass_fields(modules)
    result = {
        "package": PACKAGE,
        "release": "0.2.0",
        "generator": "tests/compat/generators/release_api.py",
        "modules": modules,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {output}: {len(modules)} modules")


if __name__ == "__main__":
    main()
