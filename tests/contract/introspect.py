"""Dumps the real TensorRT / cuda-python bindings' API as JSON; runs in a subprocess next to stand-in libraries.

Standalone (stdlib only): `python -S introspect.py < request.json > api.json`, with PYTHONPATH = the bindings'
--target dir and LD_LIBRARY_PATH = the stand-in libnvinfer & co. The request names the root modules to dump
({"tensorrt": "tensorrt", "cudart": "cuda.bindings.runtime"}) and the import statements to try.

A node is {"kind": "module" | "class" | "routine" | "property" | "value", ...}: classes refer to an entry of
"types" (keyed by qualified name) holding their members, enum members and methods' overloads; a routine keeps
every overload's parameters ([name, kind, has_default]) and its return type (a "types" key when it is one).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import site
import sys
import types
from typing import Any

# pybind11 signature line: `name(self: tensorrt.X, a: int, b: int = 0) -> tensorrt.Y`, maybe numbered (overloads).
SIGNATURE = re.compile(r"^\s*(?:\d+\.\s+)?(?P<name>\w+)\((?P<params>.*)\)\s*->\s*(?P<returns>.+?)\s*$")


def split_params(text: str) -> list[str]:
    """Split a parameter list on top-level commas (types and defaults nest brackets and quotes)."""
    parts, depth, current, quote = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_param(text: str, keyword_only: bool) -> list[Any]:
    if text.startswith("**"):
        return [text[2:].split(":", maxsplit=1)[0], "var_keyword", True]
    if text.startswith("*"):
        return [text[1:].split(":", maxsplit=1)[0], "var_positional", True]
    name = text.split(":", maxsplit=1)[0].split("=", maxsplit=1)[0].strip()
    return [name, "keyword_only" if keyword_only else "positional_or_keyword", "=" in text]


def pybind_overloads(name: str, doc: str) -> list[dict[str, Any]]:
    overloads = []
    for line in doc.splitlines():
        match = SIGNATURE.match(line)
        if match is None or match["name"] != name:
            continue
        params: list[list[Any]] = []
        keyword_only = False
        for part in split_params(match["params"]):
            if part == "*":
                keyword_only = True
            elif part == "/":
                for param in params:
                    param[1] = "positional_only"
            else:
                params.append(parse_param(part, keyword_only))
                keyword_only = keyword_only or params[-1][1] == "var_positional"
        overloads.append({"params": params, "returns": match["returns"]})
    return overloads


def routine_overloads(name: str, obj: Any) -> list[dict[str, Any]] | None:
    """Every overload from pybind11's docstring, or inspect's signature (Python, Cython); None when unknown."""
    doc = getattr(obj, "__doc__", None) or ""
    overloads = pybind_overloads(name, doc)
    if overloads:
        return overloads
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = [
        [p.name, p.kind.name.lower(), p.default is not inspect.Parameter.empty] for p in signature.parameters.values()
    ]
    return [{"params": params, "returns": str(signature.return_annotation)}]


class Dumper:
    def __init__(self, package: str) -> None:
        self.package = package
        self.types: dict[str, dict[str, Any]] = {}

    def type_key(self, cls: type) -> str | None:
        return cls.__qualname__ if (cls.__module__ or "").startswith(self.package) else None

    def returns_key(self, returns: str) -> str | None:
        for prefix in (f"{self.package}.tensorrt.", f"{self.package}."):
            name = returns.removeprefix(prefix).removesuffix(" | None")
            if name != returns and name in self.types:
                return name
        return None

    def node(self, name: str, raw: Any, value: Any) -> dict[str, Any]:
        if isinstance(raw, property):
            return {"kind": "property", "readable": raw.fget is not None, "writable": raw.fset is not None}
        if isinstance(value, type):
            return {"kind": "class", "ref": self.dump_type(value)}
        if isinstance(value, types.ModuleType):
            return {"kind": "module"}
        if callable(value):
            return {"kind": "routine", "overloads": routine_overloads(name, value)}
        return {"kind": "value", "type": self.type_key(type(value))}

    def members(self, owner: Any, names: list[str]) -> dict[str, Any]:
        out = {}
        for name in names:
            try:
                raw = inspect.getattr_static(owner, name)
                value = getattr(owner, name)
            except AttributeError:
                continue
            out[name] = self.node(name, raw, value)
        return out

    def dump_type(self, cls: type) -> str | None:
        key = self.type_key(cls)
        if key is None or key in self.types:
            return key
        entry: dict[str, Any] = {"members": {}}
        self.types[key] = entry  # before recursing: members refer back (enum members, nested classes)
        names = [n for n in dir(cls) if not n.startswith("__") or n == "__init__"]
        entry["members"] = self.members(cls, names)
        enum_members = getattr(cls, "__members__", None)
        if enum_members is not None and hasattr(enum_members, "keys"):
            entry["enum_members"] = list(enum_members.keys())
        return key

    def resolve_returns(self) -> None:
        for entry in self.types.values():
            for node in entry["members"].values():
                self._resolve(node)

    def _resolve(self, node: dict[str, Any]) -> None:
        for overload in node.get("overloads") or []:
            overload["returns_type"] = self.returns_key(overload["returns"])


def dump_module(name: str) -> dict[str, Any]:
    module = importlib.import_module(name)
    dumper = Dumper(module.__name__.split(".")[0] if name != "tensorrt" else "tensorrt_bindings")
    names = [n for n in dir(module) if not n.startswith("_")] + ["__version__"]
    members = dumper.members(module, names)
    for node in members.values():
        dumper._resolve(node)
    dumper.resolve_returns()
    return {"module": module.__name__, "members": members, "types": dumper.types}


def try_import(statement: str) -> str | None:
    try:
        exec(statement, {})
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    request = json.load(sys.stdin)
    for path in sys.path[:]:
        site.addsitedir(path)  # the target dir's .pth files, as an installed environment would run them
    # The `tensorrt` package itself comes from the tensorrt-cuNN sdist, which is exactly this re-export.
    shim = types.ModuleType("tensorrt")
    exec("from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__", shim.__dict__)
    sys.modules["tensorrt"] = shim
    imports = {statement: try_import(statement) for statement in request["imports"]}
    apis = {}
    for api, module in request["roots"].items():
        try:
            apis[api] = dump_module(module)
        except Exception as exc:
            apis[api] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump({"imports": imports, "apis": apis}, sys.stdout)


if __name__ == "__main__":
    main()
