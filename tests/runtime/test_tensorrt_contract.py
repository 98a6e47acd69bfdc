"""Our TensorRT and cuda-python calls against the real bindings of each supported TensorRT major, without a GPU.

The contract is read off our code (tests/contract/scan.py); the bindings are the pinned wheels of
tests/contract/bindings-<version>.txt, imported in a subprocess next to gcc-built stand-ins for libnvinfer & co
(tests/contract/environment.py), which dumps their members, properties and pybind11 overloads.
"""

from __future__ import annotations

import functools
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.contract import environment
from tests.contract.check import Checker, Finding, check_imports
from tests.contract.scan import Scan, scan_tree

ROOT = Path(__file__).resolve().parents[2]
EXCLUDE = ("tests/contract", "tests/runtime/test_tensorrt_contract.py")

# Receivers our code uses -> what they hold: "tensorrt.<Class>", a module ("tensorrt", "cudart"), or "-" for
# values that are not binding objects (not checked). scan.py reports receivers missing from here.
TABLE = {
    "trt": "tensorrt",  # `import tensorrt as trt`, and the `trt: Any` parameters of trt.py's helpers
    "self._trt": "tensorrt",
    "cudart": "cudart",  # cuda.bindings.runtime (or the legacy cuda.cudart), via _cudart()
    "self._cudart": "cudart",
    "builder": "tensorrt.Builder",
    "network": "tensorrt.INetworkDefinition",
    "parser": "tensorrt.OnnxParser",
    "config": "tensorrt.IBuilderConfig",
    "profile": "tensorrt.IOptimizationProfile",
    "error": "tensorrt.ParserError",  # parser.get_error(i); pybind11 names its type nvonnxparser::IParserError
    "cache": "tensorrt.ITimingCache",
    "timing_cache": "tensorrt.ITimingCache",
    "serialized": "tensorrt.IHostMemory",
    "plan": "tensorrt.IHostMemory",
    "self._logger": "tensorrt.Logger",
    "self._runtime": "tensorrt.Runtime",
    "engine": "tensorrt.ICudaEngine",
    "self._engine": "tensorrt.ICudaEngine",
    "self._context": "tensorrt.IExecutionContext",
    "logger": "-",  # trt.py: our _Logger(trt.ILogger) with its own .errors; only passed to the bindings
    "calibrator": "-",  # our _Calibrator(trt.IInt8EntropyCalibrator2), its .free() is ours
    "name": "-",  # a tensor's name (str) or cudaGetErrorName's bytes
    "dtype_name": "-",  # DataType.name, a str
}


@functools.cache
def contract() -> Scan:
    return scan_tree(ROOT, TABLE, exclude=EXCLUDE)


@functools.cache
def dump_of(version: str) -> dict[str, Any]:
    statements = sorted({s for use in contract().imports for s in use.group})
    return environment.introspect(version, statements)


@pytest.fixture(params=environment.VERSIONS)
def dump(request: pytest.FixtureRequest) -> dict[str, Any]:
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the pinned binding wheels are cp311 builds; this is Python {sys.version.split()[0]}")
    return dump_of(request.param)


def findings(api: str, dump: dict[str, Any], scan: Scan) -> list[Finding]:
    checker = Checker(dump)
    return [checker.check(use) for use in scan.uses if use.api == api]


def assert_no_required_problems(api: str, dump: dict[str, Any], scan: Scan) -> None:
    results = findings(api, dump, scan)
    optional = sorted(str(f) for f in results if f.problem and f.optional)
    print(
        f"{api} (TensorRT {dump['version']} set): {len(results)} uses checked; optional, absent: {optional or 'none'}"
    )
    required = sorted({str(f) for f in results if f.problem and not f.optional})
    assert not required, (
        f"{api} of the TensorRT {dump['version']} set lacks {len(required)} member(s) our code uses:\n"
        + "\n".join(required)
    )


def test_the_contract_covers_our_tensorrt_and_cuda_code() -> None:
    scan = contract()
    assert {"runtime/modelfleet_runtime/build/trt.py", "runtime/modelfleet_runtime/backends/tensorrt.py"} <= set(
        scan.files
    )
    by_api = {api: [u for u in scan.uses if u.api == api] for api in ("tensorrt", "cudart")}
    print({api: len(uses) for api, uses in by_api.items()}, "imports:", len(scan.imports), "files:", scan.files)
    assert all(by_api.values()), by_api
    assert any(u.root for u in by_api["tensorrt"]), "no method call on a TensorRT object was found"


def test_every_binding_object_our_code_calls_is_in_the_table() -> None:
    assert contract().unmapped == [], "receivers that hold binding objects but are not in TABLE"


def test_tensorrt_members_our_code_uses_exist(dump: dict[str, Any]) -> None:
    assert_no_required_problems("tensorrt", dump, contract())


def test_cuda_runtime_members_our_code_uses_exist(dump: dict[str, Any]) -> None:
    assert_no_required_problems("cudart", dump, contract())


def test_every_import_our_code_relies_on_works(dump: dict[str, Any]) -> None:
    failures = check_imports(dump, contract().imports)
    assert not failures, "imports with no working alternative:\n" + "\n".join(failures)


SYNTHETIC = """
    import tensorrt as trt

    def build(config: Any) -> None:
        builder = trt.Builder(trt.Logger())
        network = builder.create_network(0, 1, 2)
        config.set_timing_cache(None, no_such_keyword=True)
        config.num_optimization_profiles = 2
        config.builder_optimization_level = 3
        trt.BuilderFlag.NO_SUCH_FLAG
        getattr(trt.BuilderFlag, "ALSO_MISSING", None)
        mystery = builder.create_builder_config()
        mystery.set_flag(trt.BuilderFlag.FP16)

    class _Broken(trt.NoSuchBase):
        pass
"""


def test_the_checker_reports_missing_members_bad_arity_and_unmapped_receivers(tmp_path: Path) -> None:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the pinned binding wheels are cp311 builds")
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "synthetic.py").write_text(textwrap.dedent(SYNTHETIC))
    scan = scan_tree(tmp_path, {k: v for k, v in TABLE.items() if k != "mystery"})
    problems = {(f.member, f.problem, f.optional) for f in findings("tensorrt", dump_of("10.16.1.11"), scan)}
    assert {p for p in problems if p[1]} == {
        ("Builder.create_network", "no overload takes 3 positional", False),
        ("IBuilderConfig.set_timing_cache", "no overload takes 1 positional + no_such_keyword=", False),
        ("IBuilderConfig.num_optimization_profiles", "read-only property", False),
        ("BuilderFlag.NO_SUCH_FLAG", "missing", False),
        ("BuilderFlag.ALSO_MISSING", "missing", True),
        ("NoSuchBase", "missing", False),
    }
    assert ("IBuilderConfig.builder_optimization_level", "", False) in problems
    assert scan.unmapped == ["runtime/synthetic.py:13 mystery.set_flag"]
