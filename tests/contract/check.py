"""Checks the contract our code uses (tests/contract/scan.py) against one binding version's dump
(tests/contract/introspect.py): members exist, calls fit an overload's arity, writes hit a settable property,
subclassed bases are classes, and each group of imports has one that works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.contract.scan import ImportUse, Step, Use

Node = dict[str, Any]


@dataclass(frozen=True)
class Finding:
    where: str
    member: str  # what was looked up, e.g. "BuilderFlag.FP16", "IBuilderConfig.set_flag"
    problem: str  # "" when the use checks out
    detail: str  # the arity range, or what we know
    optional: bool
    source: str

    def __str__(self) -> str:
        return f"{self.member}: {self.problem} at {self.where} ({self.source}){' [optional]' if self.optional else ''}"


def fits(overload: dict[str, Any], step: Step, *, bound: bool) -> bool:
    """Whether a call with step's positional and keyword arguments binds to this overload's parameters."""
    params = overload["params"]
    positional = step.positional + (1 if bound else 0)
    filled: set[str] = set()
    index = 0
    for name, kind, _ in params:
        if index == positional:
            break
        if kind == "var_positional":
            index = positional
            break
        if kind in {"positional_only", "positional_or_keyword"}:
            filled.add(name)
            index += 1
    if index < positional:
        return False
    takes_any_keyword = any(kind == "var_keyword" for _, kind, _ in params)
    keywordable = {n for n, kind, _ in params if kind in {"positional_or_keyword", "keyword_only"}}
    for keyword in step.keywords:
        if keyword in filled or (keyword not in keywordable and not takes_any_keyword):
            return False
        filled.add(keyword)
    required = {n for n, kind, default in params if not default and kind not in {"var_positional", "var_keyword"}}
    return required <= filled


def arity(overloads: list[dict[str, Any]] | None, *, bound: bool) -> str:
    """Each overload's accepted argument counts, self excluded when bound, e.g. "1" or "1-2 | 3"."""
    if not overloads:
        return "arity unknown"
    ranges = []
    for overload in overloads:
        params = [p for p in overload["params"] if p[1] not in {"var_keyword"}]
        if bound and params:
            params = params[1:]
        low = sum(1 for p in params if not p[2])
        high = "*" if any(p[1] == "var_positional" for p in params) else str(len(params))
        ranges.append(str(low) if str(low) == high else f"{low}-{high}")
    return " | ".join(dict.fromkeys(ranges))


class Checker:
    def __init__(self, dump: dict[str, Any]) -> None:
        self.dump = dump

    def check(self, use: Use) -> Finding:
        api = self.dump["apis"][use.api]
        label, problem, detail = self.walk(api, use)
        return Finding(use.where, label, problem, detail, use.optional, use.source)

    def walk(self, api: dict[str, Any], use: Use) -> tuple[str, str, str]:
        if "error" in api:
            return use.api, f"the module does not import: {api['error']}", ""
        # state: ("module", None) | ("class", key, instance) | ("routine", node, bound) | ("unknown",)
        state: tuple[Any, ...] = ("class", use.root, True) if use.root else ("module", None)
        label, detail = use.root or "", ""
        for position, step in enumerate(use.steps):
            last = position == len(use.steps) - 1
            if step.name is None:
                state, problem, detail = self.call(api, state, step)
                if problem or state[0] == "unknown" or last:
                    return label, problem, detail
                label = f"({label}(...) -> {state[1]})"
                continue
            if step.name.startswith("?"):
                return f"{label}.<{step.name[1:]}>", "a dynamic getattr the contract cannot read", ""
            members = self.members(api, state)
            if members is None:
                return label, "", "type not followed"
            label = f"{label}.{step.name}" if label else step.name
            node = members.get(step.name)
            if node is None:
                return label, "missing", ""
            if last:
                return label, *self.final(node, use, instance=state[0] == "class" and state[2])
            state = self.advance(node, state)
        return label, "", detail

    def members(self, api: dict[str, Any], state: tuple[Any, ...]) -> dict[str, Node] | None:
        if state[0] == "module":
            members: dict[str, Node] = api["members"]
            return members
        if state[0] == "class" and state[1] in api["types"]:
            members = api["types"][state[1]]["members"]
            return members
        return None

    def advance(self, node: Node, state: tuple[Any, ...]) -> tuple[Any, ...]:
        instance = state[0] == "class" and state[2]
        if node["kind"] == "class":
            return ("class", node["ref"], False)
        if node["kind"] == "routine":
            return ("routine", node, instance)
        if node["kind"] == "value" and node.get("type"):
            return ("class", node["type"], True)  # an enum member: its own attributes (name, value)
        return ("unknown",)

    def final(self, node: Node, use: Use, *, instance: bool) -> tuple[str, str]:
        kind = node["kind"]
        if use.subclass:
            return ("", "class") if kind == "class" else (f"is a {kind}, cannot be subclassed", "")
        if use.write:
            if kind != "property":
                return f"is a {kind}, not a settable property", ""
            return ("", "property, settable") if node["writable"] else ("read-only property", "")
        if kind == "property":
            return "", "property" + (", settable" if node["writable"] else "")
        if kind == "routine":
            return "", f"referenced, {arity(node['overloads'], bound=instance)} args"
        return "", kind

    def call(self, api: dict[str, Any], state: tuple[Any, ...], step: Step) -> tuple[tuple[Any, ...], str, str]:
        """A call: constructor (class), function or method (routine); the result's type when a binding type."""
        if state[0] == "class" and not state[2]:
            init = api["types"].get(state[1], {}).get("members", {}).get("__init__")
            overloads, bound = (init or {}).get("overloads"), True
            result: tuple[Any, ...] = ("class", state[1], True)
        elif state[0] == "routine":
            overloads, bound = state[1]["overloads"], state[2]
            returns = {o.get("returns_type") for o in overloads or []}
            result = ("class", returns.pop(), True) if len(returns) == 1 and None not in returns else ("unknown",)
        else:
            return ("unknown",), "", ""
        detail = f"{arity(overloads, bound=bound)} args"
        if not overloads or step.unpacked:
            return result, "", detail
        if any(fits(o, step, bound=bound) for o in overloads):
            return result, "", detail
        given = f"{step.positional} positional" + (f" + {', '.join(step.keywords)}=" if step.keywords else "")
        return result, f"no overload takes {given}", detail


def check_imports(dump: dict[str, Any], imports: list[ImportUse]) -> list[str]:
    """One line per import group of which no statement works with these bindings."""
    failures = []
    for use in imports:
        errors = {statement: dump["imports"].get(statement) for statement in use.group}
        if all(errors.values()) and use.statement == use.group[0]:
            failures.append(f"{' / '.join(use.group)} at {use.file}:{use.line}: {errors[use.statement]}")
    return failures
