"""Prints the API table of tests/contract/README.md: each TensorRT / cuda-python member our code touches, and
the members a TensorRT 11 port needs, per pinned binding version (`python -m tests.contract.table`)."""

from __future__ import annotations

from typing import Any

from tests.contract import environment
from tests.contract.check import Checker, arity
from tests.runtime.test_tensorrt_contract import contract, dump_of

# Members our code does not use (yet) but a port to TensorRT 11 / strongly typed networks needs to know about.
RELEVANT = (
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    "Builder.create_network",
    "BuilderFlag.BF16",
    "BuilderFlag.TF32",
    "BuilderFlag.INT4",
    "BuilderFlag.FP4",
    "IBuilderConfig.get_calibration_profile",
    "IBuilderConfig.set_quantization_flag",
    "IBuilderConfig.build_route",
    "INetworkDefinition.add_quantize",
    "INetworkDefinition.add_dequantize",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_shape",
    "ICudaEngine.get_tensor_profile_shape",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.execute_async_v3",
    "Runtime.deserialize_cuda_engine",
    "OnnxParser.parse_from_file",
    "ParserError.node_name",
)


def describe(api: dict[str, Any], path: str) -> str:
    """yes/no and the arity of a dotted member of one dump."""
    members, instance, node = api["members"], False, None
    for name in path.split("."):
        node = members.get(name)
        if node is None:
            return "**no**"
        if node["kind"] == "class":
            members, instance = api["types"].get(node["ref"], {}).get("members", {}), True
    assert node is not None
    if node["kind"] == "routine":
        return f"yes, {arity(node['overloads'], bound=instance and '.' in path)} args"
    if node["kind"] == "property":
        return "yes, property" + (", settable" if node["writable"] else ", read-only")
    return "yes"


def main() -> None:
    versions = environment.VERSIONS
    dumps = {v: dump_of(v) for v in versions}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    wheres: dict[tuple[str, str], str] = {}
    for version, dump in dumps.items():
        checker = Checker(dump)
        for use in contract().uses:
            finding = checker.check(use)
            key = (use.api, finding.member)
            cell = f"**no** ({finding.problem})" if finding.problem else f"yes, {finding.detail}".rstrip(", ")
            rows.setdefault(key, {})[version] = cell + (" (optional)" if use.optional else "")
            wheres.setdefault(key, use.where)
    print("| API | member | " + " | ".join(versions) + " | first use |")
    print("|---|---|" + "---|" * len(versions) + "---|")
    for (api, member), cells in sorted(rows.items()):
        print(
            f"| {api} | `{member}` | "
            + " | ".join(cells.get(v, "—") for v in versions)
            + f" | {wheres[(api, member)]} |"
        )
    print("\n| relevant to the TensorRT 11 port | " + " | ".join(versions) + " |")
    print("|---|" + "---|" * len(versions))
    for path in RELEVANT:
        print(f"| `{path}` | " + " | ".join(describe(dumps[v]["apis"]["tensorrt"], path) for v in versions) + " |")
    for version, dump in dumps.items():
        flags = dump["apis"]["tensorrt"]["types"]["BuilderFlag"].get("enum_members", [])
        print(f"\nBuilderFlag in {version}: {', '.join(flags)}")
        print(
            f"imports in {version}: "
            + "; ".join(f"`{s}` {'ok' if e is None else e}" for s, e in dump["imports"].items())
        )


if __name__ == "__main__":
    main()
