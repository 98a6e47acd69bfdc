"""The TensorRT / cuda-python contract extracted from our code by AST: every attribute chain, call, property
write and subclass rooted at the tensorrt or cuda runtime module or at a variable the caller's table maps to a
TensorRT class; plus every import of those modules, grouped with its fallbacks.

A table maps receiver names (`builder`, `self._context`) to "tensorrt.Builder" / "tensorrt" / "cudart" (a module)
or to "-" (not a binding object: not checked). `Scan.unmapped` lists receivers that look like binding objects
(assigned from a binding expression, or an `Any` parameter) but are in no table, so the table cannot rot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

API_MODULES = {"tensorrt": "tensorrt", "cuda.bindings.runtime": "cudart", "cuda.cudart": "cudart"}


@dataclass(frozen=True)
class Step:
    """One link of a chain: an attribute (`name`), or a call (`name` None) with its argument counts."""

    name: str | None
    positional: int = 0
    keywords: tuple[str, ...] = ()
    unpacked: bool = False  # *args / **kwargs: the arity cannot be checked


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    api: str  # "tensorrt" | "cudart"
    root: str | None  # a class name when the chain starts at an object of that class; None: the module
    steps: tuple[Step, ...]
    source: str
    write: bool = False
    subclass: bool = False
    optional: bool = False  # getattr(obj, "name", default): absent is allowed

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class ImportUse:
    file: str
    line: int
    statement: str
    group: tuple[str, ...]  # this import and its fallbacks (try/except ImportError): one of them must work


@dataclass
class Scan:
    uses: list[Use] = field(default_factory=list)
    imports: list[ImportUse] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # "file:line receiver.attr"
    files: list[str] = field(default_factory=list)


def receiver_key(node: ast.expr) -> str | None:
    """`name` or `self.name`: the receivers a table can map."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def unwind(node: ast.expr) -> tuple[str | None, list[Step]]:
    """`a.b(1, x=2).c` -> ("a", [b, call(1, x), c]); the root is the first receiver_key met."""
    steps: list[Step] = []
    while True:
        key = receiver_key(node)
        if key is not None:
            return key, steps[::-1]
        if isinstance(node, ast.Attribute):
            steps.append(Step(node.attr))
            node = node.value
        elif isinstance(node, ast.Call):
            unpacked = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
            steps.append(Step(None, len(node.args), keywords, unpacked))
            node = node.func
        else:
            return None, []


def api_import(node: ast.stmt) -> Iterator[tuple[str, str]]:
    """(bound name, api) for `import tensorrt as trt`, `from cuda.bindings import runtime as cudart`, ..."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in API_MODULES:
                yield alias.asname or alias.name, API_MODULES[alias.name]
    elif isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            if full in API_MODULES:
                yield alias.asname or alias.name, API_MODULES[full]


def importorskip(node: ast.AST) -> tuple[str, str] | None:
    """`trt = pytest.importorskip("tensorrt", ...)` binds trt to the module."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        call = node.value
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "importorskip"
            and call.args
            and isinstance(call.args[0], ast.Constant)
            and call.args[0].value in API_MODULES
        ):
            return node.targets[0].id, API_MODULES[call.args[0].value]
    return None


def touches_api(tree: ast.AST) -> bool:
    return any(list(api_import(n)) or importorskip(n) for n in ast.walk(tree) if isinstance(n, ast.stmt))


def is_api_import(node: ast.AST) -> bool:
    return isinstance(node, ast.Import | ast.ImportFrom) and bool(list(api_import(node)))


def string_candidates(expr: ast.expr, function: ast.AST | None) -> list[tuple[str, int]] | None:
    """The names a getattr's second argument can take: a literal, or a loop variable over literals (directly,
    or a list the same function builds from literals). None when that cannot be read off the code."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [(expr.value, expr.lineno)]
    if not isinstance(expr, ast.Name) or function is None:
        return None
    found: list[tuple[str, int]] = []
    for node in ast.walk(function):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == expr.id:
            found += literals(node.iter, function) or []
    return found or None


def literals(expr: ast.expr, function: ast.AST) -> list[tuple[str, int]] | None:
    if isinstance(expr, ast.Tuple | ast.List):
        return [(e.value, e.lineno) for e in expr.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if not isinstance(expr, ast.Name):
        return None
    out: list[tuple[str, int]] = []
    for node in ast.walk(function):
        value = node.value if isinstance(node, ast.Assign | ast.AugAssign) else None
        if isinstance(value, ast.Tuple | ast.List) and expr.id in {receiver_key(t) for t in assignment_targets(node)}:
            out += literals(value, function) or []
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"append", "extend"}
            and receiver_key(node.func.value) == expr.id
            and node.args
        ):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((arg.value, arg.lineno))
            elif isinstance(arg, ast.Tuple | ast.List):
                out += literals(arg, function) or []
    return out


class FileScanner:
    """One file: its roots (imports, table), aliases, tainted receivers and the uses in its in-scope units."""

    def __init__(self, path: Path, rel: str, table: Mapping[str, str]) -> None:
        self.tree = ast.parse(path.read_text(), filename=rel)
        self.rel = rel
        self.table = table
        self.roots: dict[str, tuple[str, str | None]] = {}
        for key, target in table.items():
            if target != "-":
                api, _, cls = target.partition(".")
                self.roots[key] = (api, cls or None)
        api_bound: dict[str, str] = {}
        for node in ast.walk(self.tree):
            skip = importorskip(node)
            api_bound.update(dict(api_import(node)) if isinstance(node, ast.stmt) else {})
            api_bound.update(dict([skip]) if skip else {})
            if isinstance(node, ast.Import | ast.ImportFrom) and not is_api_import(node):
                for alias in node.names:  # e.g. cli.py's `from modelfleet_runtime.build import trt`: not TensorRT
                    self.roots.pop(alias.asname or alias.name.split(".")[0], None)
        self.roots.update({name: (api, None) for name, api in api_bound.items()})
        self.modules = {k for k, (_, cls) in self.roots.items() if cls is None}
        self.parents = {id(c): p for p in ast.walk(self.tree) for c in ast.iter_child_nodes(p)}
        self.aliases: dict[str, tuple[tuple[str, str | None], list[Step]]] = {}

    def in_scope(self, unit: ast.stmt) -> bool:
        for node in ast.walk(unit):
            if isinstance(node, ast.Name | ast.Attribute) and receiver_key(node) in self.modules:
                return True
            if is_api_import(node):
                return True
        return any(a.arg in self.table for a in self.any_params(unit))

    def any_params(self, unit: ast.AST) -> list[ast.arg]:
        params = []
        for node in ast.walk(unit):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                every = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                params += [a for a in every if isinstance(a.annotation, ast.Name) and a.annotation.id == "Any"]
        return params

    def enclosing_function(self, node: ast.AST) -> ast.AST | None:
        while id(node) in self.parents:
            node = self.parents[id(node)]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return None

    def scan(self, out: Scan) -> None:
        units = [u for u in self.tree.body if self.in_scope(u)]
        self.collect_aliases(units)
        tainted = self.tainted(units)
        suspects = tainted | {a.arg for u in units for a in self.any_params(u)}
        written = {id(t) for u in units for n in ast.walk(u) for t in assignment_targets(n)}
        seen: set[int] = set()
        for unit in units:
            for node in ast.walk(unit):
                if isinstance(node, ast.ClassDef):
                    self.subclass_uses(node, out)
                if not isinstance(node, ast.Attribute | ast.Call) or id(node) in seen:
                    continue
                mark_chain(node, seen)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
                    self.getattr_uses(node, out)
                    continue
                key, steps = unwind(node)
                if key is None or not steps:
                    continue
                if key in self.aliases or key in self.roots:
                    self.add(out, node, key, steps, write=id(node) in written)
                elif key in suspects and key not in self.table and steps[0].name is not None:
                    out.unmapped.append(f"{self.rel}:{node.lineno} {key}.{steps[0].name}")
        self.import_uses(out)

    def resolve(self, key: str, steps: list[Step]) -> tuple[tuple[str, str | None], list[Step]]:
        if key in self.aliases:
            root, prefix = self.aliases[key]
            return root, prefix + steps
        return self.roots[key], steps

    def add(self, out: Scan, node: ast.expr, key: str, steps: list[Step], **flags: bool) -> None:
        (api, cls), full = self.resolve(key, steps)
        out.uses.append(Use(self.rel, node.lineno, api, cls, tuple(full), ast.unparse(node)[:120], **flags))

    def collect_aliases(self, units: list[ast.stmt]) -> None:
        """`attr = cudart.cudaDeviceAttr`: later `attr.X` means `cudart.cudaDeviceAttr.X`."""
        for unit in units:
            for node in ast.walk(unit):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    key, steps = unwind(node.value)
                    plain = key in self.roots and steps and all(s.name is not None for s in steps)
                    if plain and key is not None and node.targets[0].id not in self.roots:
                        self.aliases[node.targets[0].id] = (self.roots[key], steps)

    def tainted(self, units: list[ast.stmt]) -> set[str]:
        """Receivers assigned from an expression rooted at a binding module or object (to a fixpoint)."""
        tainted: set[str] = set()
        while True:
            before = len(tainted)
            for unit in units:
                for node in ast.walk(unit):
                    if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                        key, _ = unwind(node.value)
                        if key is not None and (key in self.roots or key in tainted):
                            tainted |= {k for t in assignment_targets(node) if (k := receiver_key(t))}
            if len(tainted) == before:
                return tainted - set(self.roots)

    def getattr_uses(self, call: ast.Call, out: Scan) -> None:
        if len(call.args) < 2:
            return
        key, steps = unwind(call.args[0])
        if key is None or not (key in self.roots or key in self.aliases):
            return
        candidates = string_candidates(call.args[1], self.enclosing_function(call))
        optional = len(call.args) >= 3
        for name, line in candidates or [(f"?{ast.unparse(call.args[1])}", call.lineno)]:
            (api, cls), full = self.resolve(key, steps + [Step(name)])
            source = f"getattr({ast.unparse(call.args[0])}, {name!r}) (getattr at line {call.lineno})"
            out.uses.append(Use(self.rel, line, api, cls, tuple(full), source, optional=optional))

    def subclass_uses(self, node: ast.ClassDef, out: Scan) -> None:
        for base in node.bases:
            key, steps = unwind(base)
            if key is not None and steps and (key in self.roots or key in self.aliases):
                self.add(out, base, key, steps, subclass=True)

    def import_uses(self, out: Scan) -> None:
        grouped: set[int] = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Try) and any(is_api_import(s) for s in node.body):
                members: list[ast.AST] = [s for s in node.body if is_api_import(s)]
                if all(id(m) in grouped for m in members):
                    continue  # a nested try: its imports are fallbacks of the outer one
                members += [n for h in node.handlers for n in ast.walk(h) if is_api_import(n) and id(n) not in grouped]
                group = tuple(ast.unparse(m) for m in members)
                for member in members:
                    grouped.add(id(member))
                    line = getattr(member, "lineno", 0)
                    out.imports.append(ImportUse(self.rel, line, ast.unparse(member), group))
        for node in ast.walk(self.tree):
            skip = importorskip(node)
            if isinstance(node, ast.Import | ast.ImportFrom) and is_api_import(node) and id(node) not in grouped:
                statement = ast.unparse(node)
                out.imports.append(ImportUse(self.rel, node.lineno, statement, (statement,)))
            elif skip is not None and isinstance(node, ast.Assign):
                statement = f"import {ast.literal_eval(node.value.args[0])}"  # type: ignore[attr-defined]
                out.imports.append(ImportUse(self.rel, node.lineno, statement, (statement,)))


def assignment_targets(node: ast.AST) -> list[ast.expr]:
    """The receivers an assignment writes (tuple targets unpacked)."""
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, ast.AnnAssign | ast.AugAssign):
        targets = [node.target]
    else:
        return []
    flat: list[ast.expr] = []
    while targets:
        target = targets.pop()
        if isinstance(target, ast.Tuple | ast.List):
            targets += target.elts
        elif isinstance(target, ast.Starred):
            targets.append(target.value)
        else:
            flat.append(target)
    return flat


def mark_chain(node: ast.expr, seen: set[int]) -> None:
    """The inner links of a chain belong to its outermost node's use."""
    while isinstance(node, ast.Attribute | ast.Call):
        seen.add(id(node))
        node = node.value if isinstance(node, ast.Attribute) else node.func


def scan_tree(root: Path, table: Mapping[str, str], *, exclude: tuple[str, ...] = ()) -> Scan:
    """Every .py under root's operator/, runtime/, tests/ and bench/ that imports tensorrt or cuda."""
    out = Scan()
    for top in ("operator", "runtime", "tests", "bench"):
        for path in sorted((root / top).rglob("*.py")):
            rel = str(path.relative_to(root))
            if rel.startswith(exclude) or not any(word in path.read_text() for word in ("tensorrt", "cuda")):
                continue
            scanner = FileScanner(path, rel, table)
            if touches_api(scanner.tree):
                out.files.append(rel)
                scanner.scan(out)
    return out
