"""The one `modelfleet` command; each subcommand imports only what it needs (the operator image has no ONNX Runtime)."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "operator": ("modelfleet_operator.main", "run the Kubernetes operator"),
    "serve": ("modelfleet_runtime.server", "serve a model over the Open Inference Protocol v2"),
    "build": ("modelfleet_runtime.build.cli", "build an engine into the content-addressed store"),
}


def usage() -> str:
    lines = ["usage: modelfleet {operator,serve,build} [options]", ""]
    lines += [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'modelfleet <subcommand> --help' for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"modelfleet: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
