"""`modelfleet build` end to end on CPU: real ONNX Runtime builds of the test models, and every refusal."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelfleet_runtime.build import accuracy, cpu
from modelfleet_runtime.build import ort as ort_build
from modelfleet_runtime.build.cli import TERMINATION_LIMIT, Result, main, resolve_architecture
from modelfleet_runtime.build.options import DEFAULT_GATES, BuildOptions
from tests.modelzoo import FEATURES, classifier_model, classifier_reference, two_io_model, two_io_reference

REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(tmp_path: Path, *args: str, store: Path | None = None) -> tuple[int, dict[str, Any]]:
    """Run `modelfleet build` in-process; return the exit code and the termination message."""
    term = tmp_path / f"term-{len(list(tmp_path.glob('term-*')))}"
    code = main(["--store", str(store or tmp_path / "store"), "--termination-log", str(term), *args])
    return code, json.loads(term.read_text())


def entries(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if not p.name.startswith("."))


def leftovers(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if p.name.startswith((".tmp-", ".trash-", ".work-")))


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    return classifier_model(tmp_path / "models" / "classifier.onnx")


def test_fp32_build_publishes_a_verified_artifact_that_matches_the_reference(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier))
    assert code == 0, result
    assert result["phase"] == "Ready"
    assert result["cacheHit"] is False
    assert (result["architecture"], result["backend"], result["precision"]) == ("cpu", "onnxruntime", "fp32")
    assert result["backendVersion"] == ort.__version__
    key_dir = tmp_path / "store" / result["key"]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    # The contract the serving runtime reads.
    assert manifest["key"] == result["key"]
    assert manifest["backend"] == "onnxruntime"
    assert manifest["artifact"] == "model.onnx"
    assert manifest["artifact_sha256"] == sha256(key_dir / "model.onnx")
    assert manifest["options"]["batch"] == {"min": 1, "opt": 16, "max": 32}
    assert manifest["model_digest"] == sha256(classifier)
    assert manifest["precision"] == {"requested": "fp32", "effective": "fp32"}
    assert manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert manifest["accuracy"]["samples"] >= 64
    assert manifest["accuracy"]["max_rel_error"] <= 1e-3
    assert manifest["build_seconds"] >= 0
    assert manifest["versions"]["onnxruntime"] == ort.__version__
    assert leftovers(tmp_path / "store") == []
    x = np.random.default_rng(7).standard_normal((5, FEATURES)).astype(np.float32)
    session = ort.InferenceSession(str(key_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], classifier_reference(x), atol=1e-5)


def test_int8_dynamic_build_is_quantized_and_within_the_gate(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier), "--precision", "int8")
    assert code == 0, result
    manifest = json.loads((tmp_path / "store" / result["key"] / "manifest.json").read_text())
    assert manifest["precision"] == {"requested": "int8", "effective": "int8"}
    # uint8 weights (U8U8): the artifact computes alike on every CPU, so it is portable, whatever this CPU is.
    assert manifest["details"]["quantization"] == "dynamic-u8u8-per-channel"
    assert manifest["details"]["int8Portable"] is True
    assert manifest["details"]["cpuInt8Kernel"] == result["cpuInt8Kernel"] == cpu.this_cpu()
    weights = [i for i in onnx.load(str(tmp_path / "store" / result["key"] / "model.onnx")).graph.initializer]
    assert TensorProto.INT8 not in {w.data_type for w in weights}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "store" / result["key"] / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    gate = DEFAULT_GATES["int8"]
    assert gate.max_rel_error is not None
    assert gate.min_top1_agreement is not None
    assert result["accuracy"]["samples"] == gate.samples == 256
    assert result["accuracy"]["maxRelError"] <= gate.max_rel_error
    assert result["accuracy"]["top1Agreement"] >= gate.min_top1_agreement >= 0.98


def test_int8_static_build_uses_the_calibration_data(tmp_path: Path, classifier: Path) -> None:
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=np.random.default_rng(3).standard_normal((256, FEATURES)).astype(np.float32))
    code, result = build(
        tmp_path,
        "--model",
        str(classifier),
        "--precision",
        "int8",
        "--ort-quantization",
        "static",
        "--calibration",
        str(calibration),
        # Static MinMax ranges keep the class of 96-98 % of inputs on this small MLP (`make bench-int8`):
        # below the default gate, which dynamic quantization meets.
        "--min-top1-agreement",
        "0.95",
    )
    assert code == 0, result
    manifest = json.loads((tmp_path / "store" / result["key"] / "manifest.json").read_text())
    assert manifest["details"]["quantization"] == "static-qdq-u8u8-per-channel"
    assert manifest["details"]["int8Portable"] is True
    assert manifest["options"]["calibration"]["sha256"] == sha256(calibration)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "store" / result["key"] / "model.onnx")).graph.node}
    assert ops & {"QuantizeLinear", "QLinearMatMul", "MatMulIntegerToFloat"}, ops
    assert result["accuracy"]["top1Agreement"] >= 0.95


def u8s8_gate(classifier: Path, tmp_path: Path) -> accuracy.GateResult:
    """The int8 gate on the classifier quantized the way the build did before: int8 weights (U8S8)."""
    scheme = ort_build.INT8_SCHEMES["dynamic-u8s8-per-channel"]
    quantized, artifact = tmp_path / "u8s8.onnx", tmp_path / "u8s8-artifact.onnx"
    ort_build.quantize_with(scheme, ort_build.preprocess(classifier, tmp_path), quantized, None)
    ort_build.optimize_offline(quantized, artifact, architecture="cpu")
    feeds = {"input": np.random.default_rng(0).standard_normal((256, FEATURES)).astype(np.float32)}
    return accuracy.run_gate(
        reference=accuracy.onnxruntime_runner(classifier, optimize=False),
        candidate=ort_build.candidate_runner(artifact),
        batches=accuracy.split_batches(feeds, batch_size=16, min_batch=1),
        gate=BuildOptions(precision="int8").accuracy.resolved("int8"),
        classifiers=frozenset({"probabilities"}),
    )


def test_int8_weights_saturate_exactly_where_the_cpu_class_says(tmp_path: Path, classifier: Path) -> None:
    """U8S8 saturates on x86 without VNNI (this CPU's class says whether): there the gate refuses it, naming
    the output; elsewhere it passes. Either way the detected class and the real kernels agree."""
    outcome = u8s8_gate(classifier, tmp_path)
    if cpu.u8s8_saturates(cpu.this_cpu()):
        assert not outcome.passed, outcome.message
        assert "'probabilities'" in outcome.message
    else:
        assert outcome.passed, outcome.message


def test_a_model_with_its_own_int8_weights_is_recorded_as_not_portable(tmp_path: Path, classifier: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    qdq = tmp_path / "qdq.onnx"
    rows = np.random.default_rng(5).standard_normal((64, FEATURES)).astype(np.float32)
    quantize_static(
        classifier,
        qdq,
        ort_build.batch_reader([{"input": rows}]),
        quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    code, result = build(tmp_path, "--model", str(qdq), "--precision", "int8")
    assert code == 0, result
    manifest = json.loads((tmp_path / "store" / result["key"] / "manifest.json").read_text())
    assert manifest["details"]["quantization"] == "qdq-in-model"
    assert manifest["details"]["int8Portable"] is False
    assert result["int8Portable"] is False
    assert result["cpuInt8Kernel"] == cpu.this_cpu()


def test_dynamic_axes_take_their_shape_from_the_flags(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "two_io.onnx")
    code, result = build(tmp_path, "--model", str(model), "--shape", "a=4:8:16", "--shape", "b=4:8:16")
    assert code == 0, result
    assert result["accuracy"]["top1Agreement"] is None  # [batch, seq] is not classifier-shaped
    key_dir = tmp_path / "store" / result["key"]
    a, b = (np.random.default_rng(i).standard_normal((3, 8)).astype(np.float32) for i in (1, 2))
    session = ort.InferenceSession(str(key_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got_sum, got_dot = session.run(["sum", "dot"], {"a": a, "b": b})
    want_sum, want_dot = two_io_reference(a, b)
    np.testing.assert_allclose(got_sum, want_sum, atol=1e-6)
    np.testing.assert_allclose(got_dot, want_dot, atol=1e-5)


def test_an_impossible_threshold_fails_the_gate_and_publishes_nothing(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier), "--precision", "int8", "--max-abs-error", "0")
    assert code == 8
    assert result["phase"] == "Failed"
    assert result["reason"] == "AccuracyGateFailed"
    assert "max absolute error" in result["message"]
    assert "'probabilities'" in result["message"]
    assert "nothing was published" in result["message"]
    assert result["accuracy"]["maxAbsError"] > 0
    store = tmp_path / "store"
    assert entries(store) == []
    assert leftovers(store) == []


@pytest.mark.parametrize("cut", [0, 10, 1000, -200])
def test_truncated_or_empty_model_gives_a_clear_error(tmp_path: Path, classifier: Path, cut: int) -> None:
    data = classifier.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[:cut])  # a negative cut drops the tail
    code, result = build(tmp_path, "--model", str(broken))
    assert code == 5, result
    assert result["reason"] == "InvalidModel"
    assert "broken.onnx" in result["message"]
    assert any(word in result["message"] for word in ("truncated", "empty", "onnx.checker")), result["message"]
    assert "Traceback" not in result["message"]


def test_corrupted_bytes_give_a_clear_error(tmp_path: Path, classifier: Path) -> None:
    data = bytearray(classifier.read_bytes())
    data[20:60] = os.urandom(40)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(bytes(data))
    code, result = build(tmp_path, "--model", str(corrupt))
    assert code == 5, result
    assert "corrupt.onnx" in result["message"]


def _fixed_batch_model(path: Path, batch: int) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["out"])],
        "fixed",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_an_input_without_a_batch_axis_is_refused_by_name(tmp_path: Path) -> None:
    model = _fixed_batch_model(tmp_path / "fixed.onnx", batch=4)
    code, result = build(tmp_path, "--model", str(model))
    assert code == 5
    assert "input 'features'" in result["message"]
    assert "axis 0 is fixed to 4" in result["message"]
    # Pinning the batch profile to the fixed size makes it a valid (single-batch) build.
    code, result = build(tmp_path, "--model", str(model), "--batch-min", "4", "--batch-opt", "4", "--batch-max", "4")
    assert code == 0, result


def test_an_unsupported_opset_is_refused(tmp_path: Path, classifier: Path) -> None:
    model = onnx.load(str(classifier))
    model.opset_import[0].version = 8
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    code, result = build(tmp_path, "--model", str(old))
    assert code == 5
    assert "opset 8" in result["message"] or "onnx.checker" in result["message"]


def test_shape_for_an_unknown_input_is_refused_by_name(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier), "--shape", "tokens=1:2:3")
    assert code == 2
    assert "'tokens'" in result["message"]
    assert "input" in result["message"]


def test_a_wrong_sha256_is_refused(tmp_path: Path, classifier: Path) -> None:
    wrong = "0" * 64
    code, result = build(tmp_path, "--model", str(classifier), "--model-sha256", wrong)
    assert code == 4
    assert result["reason"] == "DigestMismatch"
    assert wrong in result["message"]
    assert sha256(classifier) in result["message"]
    assert not (tmp_path / "store").exists() or entries(tmp_path / "store") == []


def test_https_without_sha256_is_refused_before_any_download(tmp_path: Path) -> None:
    code, result = build(tmp_path, "--model", "https://models.invalid/classifier.onnx")
    assert code == 4
    assert "--model-sha256" in result["message"]


def test_file_uri_and_sha256_prefix_are_accepted(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", classifier.as_uri(), "--model-sha256", "sha256:" + sha256(classifier))
    assert code == 0, result


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_download_is_verified_against_its_sha256(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, root = http_root
    model = classifier_model(root / "classifier.onnx")
    code, result = build(tmp_path, "--model", f"{base}/classifier.onnx", "--model-sha256", "1" * 64)
    assert code == 4
    assert "sha256 mismatch" in result["message"]
    code, result = build(tmp_path, "--model", f"{base}/missing.onnx", "--model-sha256", "1" * 64)
    assert code == 3
    assert result["reason"] == "FetchFailed"
    assert "404" in result["message"]
    code, result = build(tmp_path, "--model", f"{base}/classifier.onnx", "--model-sha256", sha256(model))
    assert code == 0, result
    assert leftovers(tmp_path / "store") == []


def test_second_run_is_a_cache_hit(tmp_path: Path, classifier: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, first = build(tmp_path, "--model", str(classifier))
    assert code == 0
    artifact = tmp_path / "store" / first["key"] / "model.onnx"
    before = artifact.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="modelfleet.build")
    caplog.clear()
    code, second = build(tmp_path, "--model", str(classifier))
    assert code == 0
    assert second["cacheHit"] is True
    assert second["key"] == first["key"]
    assert second["phase"] == "Ready"
    assert second["accuracy"]["maxRelError"] == first["accuracy"]["maxRelError"]
    assert "cache hit" in caplog.text
    assert "[4/7]" not in caplog.text  # stopped before validating or building
    assert artifact.stat().st_mtime_ns == before


def test_a_corrupted_entry_is_rebuilt(tmp_path: Path, classifier: Path) -> None:
    code, first = build(tmp_path, "--model", str(classifier))
    artifact = tmp_path / "store" / first["key"] / "model.onnx"
    artifact.write_bytes(b"not the artifact")
    code, second = build(tmp_path, "--model", str(classifier))
    assert code == 0
    assert second["cacheHit"] is False
    manifest = json.loads((artifact.parent / "manifest.json").read_text())
    assert manifest["artifact_sha256"] == sha256(artifact)
    code, third = build(tmp_path, "--model", str(classifier))
    assert third["cacheHit"] is True
    assert leftovers(tmp_path / "store") == []


def test_two_concurrent_builder_processes_leave_one_valid_artifact(tmp_path: Path, classifier: Path) -> None:
    store = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "modelfleet_runtime.build.cli",
        "--model",
        str(classifier),
        "--store",
        str(store),
    ]
    builders = [
        subprocess.Popen(
            [*command, "--termination-log", str(tmp_path / f"race-{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(2)
    ]
    outputs = [b.communicate(timeout=300) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    results = [json.loads((tmp_path / f"race-{i}").read_text()) for i in range(2)]
    assert results[0]["key"] == results[1]["key"]
    assert [p.name for p in entries(store)] == [results[0]["key"]]
    assert leftovers(store) == []
    key_dir = store / results[0]["key"]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    assert manifest["artifact_sha256"] == sha256(key_dir / manifest["artifact"])
    assert sorted(p.name for p in key_dir.iterdir()) == ["manifest.json", "model.onnx"]


def test_tensorrt_and_fp8_are_refused_without_a_gpu(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier), "--backend", "tensorrt")
    assert code == 6
    assert result["reason"] == "Unsupported"
    assert "GPU" in result["message"]
    code, result = build(tmp_path, "--model", str(classifier), "--precision", "fp8")
    assert code == 6
    assert "fp8" in result["message"]


def test_fp16_on_onnxruntime_records_the_effective_precision(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier), "--precision", "fp16")
    assert code == 0
    assert (result["precision"], result["effectivePrecision"]) == ("fp16", "fp32")


def test_architecture_resolution() -> None:
    assert resolve_architecture(None, None) == "cpu"
    assert resolve_architecture("sm80", None) == "sm80"
    assert resolve_architecture(None, "sm90") == "sm90"
    assert resolve_architecture("cpu", "sm90") == "cpu"
    with pytest.raises(Exception, match="sm90"):
        resolve_architecture("sm80", "sm90")


def test_termination_message_stays_under_the_kubernetes_limit() -> None:
    outputs = {f"out{i}": {"maxAbsError": 1.0, "maxRelError": 1.0, "top1Agreement": None} for i in range(200)}
    result = Result(key="k" * 64, message="x" * 10_000, accuracy={"samples": 1, "outputs": outputs})
    line = result.to_json()
    assert len(line.encode()) <= TERMINATION_LIMIT
    assert json.loads(line)["message"].startswith("xxx")
    assert "\n" not in line
