"""Which execution provider a model got, and the install checks around it (issue 17): real servers, real ORT."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from modelfleet_runtime.backends.base import ExecutionProvider
from modelfleet_runtime.backends.onnxruntime import (
    fallback_message,
    preferred_providers,
    preload_gpu_libraries,
    requested_provider,
)
from modelfleet_runtime.cuda import MODULE_PATHS
from modelfleet_runtime.selfcheck import onnxruntime_conflict
from tests.runtime.conftest import ROOT, ServerFactory

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
INFO = "modelfleet_execution_provider_info"


# --- the server reports what it computes on ----------------------------------------------------------------


def test_a_gpu_architecture_served_by_the_cpu_build_says_so_three_ways(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(models["classifier"], "gpu-on-cpu", architecture="sm90")
    meta = requests.get(f"{server.url}/v2/models/gpu-on-cpu", timeout=10).json()
    assert meta["parameters"] == {
        "execution_provider": CPU,
        "requested_execution_provider": CUDA,  # no tensorrt installed: no ORT TensorRT provider first
        "gpu_expected": True,
    }
    # tritonclient hands the metadata back untouched, the extra field included.
    client = httpclient.InferenceServerClient(server.host)
    assert client.get_model_metadata("gpu-on-cpu")["parameters"]["execution_provider"] == CPU
    assert server.metric(INFO, provider=CPU, requested=CUDA) == 1
    warnings = [line for line in server.log().splitlines() if " WARNING " in line and "serving on" in line]
    assert len(warnings) == 1, server.log()
    assert (
        f"serving on {CPU}; asked for {CUDA}: this ONNX Runtime (onnxruntime {ort.__version__}) has no" in warnings[0]
    )


def test_a_named_gpu_provider_is_what_counts_as_asked_for(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["classifier"], "cuda-first", architecture="sm80", providers=f"{CUDA},{CPU}")
    assert server.metric(INFO, provider=CPU, requested=CUDA) == 1


def test_a_cpu_model_serves_on_cpu_without_a_warning(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["classifier"], "plain")
    meta = requests.get(f"{server.url}/v2/models/plain", timeout=10).json()
    assert meta["parameters"] == {"execution_provider": CPU, "requested_execution_provider": CPU, "gpu_expected": False}
    assert server.metric(INFO, provider=CPU, requested=CPU) == 1
    assert "serving on" not in server.log()


# --- the decisions ------------------------------------------------------------------------------------------


def test_ort_tensorrt_provider_is_tried_only_beside_tensorrt_10() -> None:
    assert preferred_providers("10.16.1.11") == (TRT, CUDA, CPU)
    assert preferred_providers("11.4.0.106") == (CUDA, CPU)  # its libnvinfer.so.10 cannot load beside 11
    assert preferred_providers(None) == (CUDA, CPU)


def test_the_provider_asked_for() -> None:
    assert requested_provider((), [CPU], gpu_expected=True) == CUDA  # no tensorrt here: CUDA comes first
    assert requested_provider((CUDA, CPU), [CPU], gpu_expected=True) == CUDA
    assert requested_provider((CPU,), [CPU], gpu_expected=True) == CPU  # CPU asked for by name
    assert requested_provider((), [CUDA, CPU], gpu_expected=False) == CUDA  # what this build offers first
    assert requested_provider((), [CPU], gpu_expected=False) == CPU


def test_the_fallback_warning_names_the_cause() -> None:
    built = fallback_message(
        ExecutionProvider(CPU, CUDA, True), available=[TRT, CUDA, CPU], build="onnxruntime-gpu 1.31.1", preload="ran"
    )
    assert built is not None
    assert built.startswith(f"serving on {CPU}; asked for {CUDA}: onnxruntime-gpu 1.31.1 has it but it did not load")
    # TensorRT missing, CUDA serving: still worth a line
    assert fallback_message(ExecutionProvider(CUDA, TRT, True), available=[TRT, CUDA, CPU], build="x", preload="ran")
    assert (
        fallback_message(ExecutionProvider(CUDA, CUDA, True), available=[CUDA, CPU], build="x", preload="ran") is None
    )
    assert fallback_message(ExecutionProvider(CPU, CPU), available=[CPU], build="x", preload="ran") is None


def test_preload_dlls_is_called_and_never_fatal() -> None:
    assert preload_gpu_libraries(ort) == "ran"  # the real function: a no-op in a CPU build

    def broken() -> None:
        raise OSError("libcudart.so.13: cannot open shared object file")

    assert preload_gpu_libraries(SimpleNamespace(preload_dlls=broken)).startswith("failed: libcudart.so.13")
    assert preload_gpu_libraries(SimpleNamespace(__version__="1.20.0")) == "unavailable"


# --- two ONNX Runtime distributions ----------------------------------------------------------------------


def test_the_conflict_decision() -> None:
    assert onnxruntime_conflict({"onnxruntime": "1.32.0"}) is None
    assert onnxruntime_conflict({"onnxruntime-gpu": "1.31.1"}) is None
    both = onnxruntime_conflict({"onnxruntime": "1.32.0", "onnxruntime_gpu": "1.31.1"})
    assert both is not None
    assert "Uninstall onnxruntime and reinstall onnxruntime-gpu" in both
    assert "pip install onnxruntime-gpu==1.31.1" in both
    other = onnxruntime_conflict({"onnxruntime": "1.32.0", "onnxruntime-openvino": "1.20.0"})
    assert other is not None and "Uninstall onnxruntime-openvino and reinstall onnxruntime" in other


def fake_gpu_distribution(root: Path) -> Path:
    """The dist-info pip writes for onnxruntime-gpu (its RECORD names the shared onnxruntime/ files)."""
    info = root / "onnxruntime_gpu-1.31.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\nonnxruntime_gpu-1.31.1.dist-info/METADATA,,\n")
    return root


def run_modelfleet(args: list[str], extra_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{extra_path}"}
    return subprocess.run(
        [sys.executable, "-m", "modelfleet_runtime.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_serve_and_build_refuse_to_start_beside_both_builds(tmp_path: Path, models: dict[str, Path]) -> None:
    extra = fake_gpu_distribution(tmp_path / "site")
    served = run_modelfleet(["serve", "--model", str(models["classifier"]), "--name", "m", "--http-port", "0"], extra)
    assert served.returncode == 2, served.stderr
    assert "refusing to serve: onnxruntime" in served.stderr and "onnxruntime-gpu 1.31.1" in served.stderr
    assert "listening" not in served.stderr
    built = run_modelfleet(
        ["build", "--model", str(models["classifier"]), "--store", str(tmp_path / "store"), "--termination-log",
         str(tmp_path / "result")], extra)  # fmt: skip
    assert built.returncode == 6, built.stderr
    result = json.loads((tmp_path / "result").read_text())
    assert result["reason"] == "Unsupported" and "uninstall" in result["message"].lower()


# --- the extras ---------------------------------------------------------------------------------------------


def test_the_runtime_and_gpu_extras_differ_only_in_the_ml_runtime() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu_only = {"onnxruntime-gpu", "tensorrt", "cuda-python"}

    def names(reqs: list[str]) -> dict[str, str]:
        return {r.split(">")[0].split("=")[0].split(";")[0].strip(): r for r in reqs}

    cpu, gpu = names(extras["runtime"]), names(extras["gpu"])
    assert "onnxruntime" in cpu and "onnxruntime" not in gpu
    assert {k: v for k, v in cpu.items() if k != "onnxruntime"} == {k: v for k, v in gpu.items() if k not in gpu_only}


def test_the_cuda_runtime_module_paths_new_layout_first() -> None:
    assert MODULE_PATHS == ("cuda.bindings.runtime", "cuda.cudart")


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (["cuda/bindings/runtime.py", "cuda/cudart.py"], "cuda.bindings.runtime"),  # cuda-python 12.6-12.9
        (["cuda/bindings/runtime.py"], "cuda.bindings.runtime"),  # cuda-python 13
        (["cuda/cudart.py"], "cuda.cudart"),  # cuda-python < 12.6
        ([], "ImportError"),
    ],
)
def test_the_cuda_runtime_module_is_found_in_each_layout(tmp_path: Path, layout: list[str], expected: str) -> None:
    for rel in layout:  # stand-in packages laid out as cuda-python's; import resolution is Python's own
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("cudaGetDeviceCount = None\n")
        for parent in path.relative_to(tmp_path).parents:
            if parent != Path("."):
                (tmp_path / parent / "__init__.py").touch()
    code = (
        "from modelfleet_runtime import cuda\n"
        "try:\n    print(cuda.cudart().__name__)\nexcept ImportError:\n    print('ImportError')\n"
        "print(cuda.device_architecture())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'runtime'}:{tmp_path}"},
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == [expected, "None"]
