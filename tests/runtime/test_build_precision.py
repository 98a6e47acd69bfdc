"""Precision through the model (build/precision.py): fp16 and Q/DQ ONNX made once, gated on the CPU, shared."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from modelfleet_runtime.build import AccuracyGateFailed, Unsupported, accuracy, precision
from modelfleet_runtime.build.cli import prepares
from modelfleet_runtime.build.options import PREPARE_SCHEMES, AccuracyGate, BuildOptions, Calibration
from modelfleet_runtime.build.validate import validate_model
from tests.modelzoo import FEATURES, classifier_model
from tests.runtime.test_build_cli import build, sha256

QDQ = {"QuantizeLinear", "DequantizeLinear"}


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    return classifier_model(tmp_path / "models" / "classifier.onnx")


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(3).standard_normal((256, FEATURES)).astype(np.float32))
    return path


def prepare(tmp_path: Path, model: Path, options: BuildOptions, calibration: Path | None = None) -> Any:
    spec = validate_model(model, options=options)
    feeds = None if calibration is None else accuracy.load_calibration(calibration, spec)
    return precision.prepare(
        model_path=model,
        model_digest=sha256(model),
        spec=spec,
        options=options,
        store=tmp_path / "store",
        workdir=tmp_path,
        calibration=feeds,
    )


def calibrated(precision_name: str, calibration: Path, **gate: Any) -> BuildOptions:
    return BuildOptions.model_validate(
        {
            "precision": precision_name,
            "calibration": Calibration(path=str(calibration), sha256=sha256(calibration)),
            "accuracy": AccuracyGate(**gate),
        }
    )


def initializer_types(path: Path) -> set[int]:
    return {init.data_type for init in onnx.load(str(path)).graph.initializer}


def test_fp16_model_has_fp16_weights_and_fp32_inputs_and_outputs(tmp_path: Path, classifier: Path) -> None:
    prepared = prepare(tmp_path, classifier, BuildOptions(precision="fp16"))
    model = onnx.load(str(prepared.path))
    assert TensorProto.FLOAT16 in initializer_types(prepared.path)
    assert TensorProto.FLOAT not in initializer_types(prepared.path)
    assert [v.type.tensor_type.elem_type for v in model.graph.input] == [TensorProto.FLOAT]
    assert {v.type.tensor_type.elem_type for v in model.graph.output} == {TensorProto.FLOAT}
    manifest = json.loads((prepared.path.parent / "manifest.json").read_text())
    assert manifest["scheme"] == PREPARE_SCHEMES["fp16"] == prepared.details["scheme"]
    assert 0 < manifest["accuracy"]["max_rel_error"] <= 2e-2  # fp16 rounding is real, and within the gate
    assert prepared.path.parent.parent == tmp_path / "store" / "prepared"


def test_prepared_model_is_made_once_then_found(tmp_path: Path, classifier: Path) -> None:
    first = prepare(tmp_path, classifier, BuildOptions(precision="fp16"))
    second = prepare(tmp_path, classifier, BuildOptions(precision="fp16"))
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.key == second.key and first.path == second.path
    assert second.details["sha256"] == sha256(second.path)


def test_concurrent_builds_of_one_model_prepare_it_once(tmp_path: Path, classifier: Path, calibration: Path) -> None:
    options = calibrated("int8", calibration)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare(tmp_path, classifier, options, calibration)))
        for _ in "ab"
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(r.cache_hit for r in results) == [False, True]
    assert len({r.key for r in results}) == 1
    assert [p.name for p in (tmp_path / "store" / "prepared").iterdir() if not p.name.startswith(".")] == [
        results[0].key
    ]


def test_int8_qdq_is_symmetric_per_channel_and_wraps_every_matmul(
    tmp_path: Path, classifier: Path, calibration: Path
) -> None:
    prepared = prepare(tmp_path, classifier, calibrated("int8", calibration), calibration)
    model = onnx.load(str(prepared.path))
    producers = {out: node for node in model.graph.node for out in node.output}
    compute = [n for n in model.graph.node if n.op_type in precision.QUANTIZED_OPS]
    assert compute, [n.op_type for n in model.graph.node]
    for node in compute:  # activation and weight both arrive through DequantizeLinear
        assert [producers[i].op_type for i in node.input[:2]] == ["DequantizeLinear"] * 2, node.name
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8
    weight_scales = [initializers[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert any(s.size > 1 for s in weight_scales)  # per-channel weights
    manifest = json.loads((prepared.path.parent / "manifest.json").read_text())
    assert manifest["accuracy"]["top1_agreement"] >= 0.98
    assert 0 < manifest["accuracy"]["max_rel_error"] <= 0.2


def test_fp8_qdq_is_e4m3_at_opset_19(tmp_path: Path, classifier: Path, calibration: Path) -> None:
    # E4M3 keeps the class of ~96 % of inputs on this small MLP (int8: ~98 %): below the default gate's 98 %.
    prepared = prepare(tmp_path, classifier, calibrated("fp8", calibration, min_top1_agreement=0.95), calibration)
    model = onnx.load(str(prepared.path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= precision.FP8_OPSET
    zero_names = {n.input[2] for n in model.graph.node if n.op_type in QDQ}
    types = {i.data_type for i in model.graph.initializer if i.name in zero_names}
    assert types == {TensorProto.FLOAT8E4M3FN}
    manifest = json.loads((prepared.path.parent / "manifest.json").read_text())
    assert 0 < manifest["accuracy"]["max_rel_error"] <= 0.2  # E4M3's 3 mantissa bits cost more than int8's


def test_a_prepared_model_outside_the_gate_is_refused_and_never_stored(
    tmp_path: Path, classifier: Path, calibration: Path
) -> None:
    options = calibrated("int8", calibration, max_rel_error=1e-6)
    with pytest.raises(AccuracyGateFailed, match=r"int8 model \(prepared once for every architecture.*relative"):
        prepare(tmp_path, classifier, options, calibration)
    assert [p for p in (tmp_path / "store" / "prepared").iterdir() if not p.name.startswith(".")] == []


def test_int8_without_calibration_or_qdq_is_refused(tmp_path: Path, classifier: Path) -> None:
    with pytest.raises(Unsupported, match="calibration data"):
        prepare(tmp_path, classifier, BuildOptions(precision="int8", backend="tensorrt"))


def test_the_key_follows_the_inputs_and_not_the_architecture() -> None:
    versions = precision.tool_versions()

    def key(options: BuildOptions, digest: str = "a" * 64, tools: dict[str, str] = versions) -> str:
        return precision.prepare_key(model_digest=digest, options=options, versions=tools)

    fp16 = key(BuildOptions(precision="fp16"))
    assert fp16 == key(BuildOptions(precision="fp16", backend="tensorrt"))  # no backend, no architecture
    assert fp16 != key(BuildOptions(precision="int8"))
    assert fp16 != key(BuildOptions(precision="fp16"), digest="b" * 64)
    assert fp16 != key(BuildOptions(precision="fp16"), tools={**versions, "onnxruntime": "0.0.1"})


def test_which_builds_compile_the_prepared_model() -> None:
    trt = BuildOptions(backend="tensorrt", precision="fp16")
    assert prepares(trt, architecture="sm80") and prepares(
        trt.model_copy(update={"precision": "int8"}), architecture="sm90"
    )
    assert not prepares(BuildOptions(backend="tensorrt", precision="fp32"), architecture="sm80")
    ort16 = BuildOptions(backend="onnxruntime", precision="fp16")
    assert prepares(ort16, architecture="sm80") and not prepares(ort16, architecture="cpu")
    assert not prepares(BuildOptions(backend="onnxruntime", precision="int8"), architecture="cpu")  # dynamic
    assert trt.normalized()["prepare"] == PREPARE_SCHEMES["fp16"]
    assert BuildOptions(backend="onnxruntime", precision="int8").normalized()["prepare"] is None


def test_builds_for_two_architectures_share_one_fp16_model(tmp_path: Path, classifier: Path) -> None:
    """The ONNX Runtime path for GPU targets serves the prepared fp16 model; built here for sm80 then sm90."""
    results = []
    for architecture in ("sm80", "sm90"):
        code, result = build(
            tmp_path, "--model", str(classifier), "--precision", "fp16", "--backend", "onnxruntime",
            "--architecture", architecture,
        )  # fmt: skip
        assert code == 0, result
        results.append(result)
    assert [r["effectivePrecision"] for r in results] == ["fp16", "fp16"]
    assert [r["prepared"]["cacheHit"] for r in results] == [False, True]
    assert results[0]["prepared"]["key"] == results[1]["prepared"]["key"]
    assert results[0]["key"] != results[1]["key"]  # one engine per architecture
    artifact = tmp_path / "store" / results[0]["key"] / "model.onnx"
    assert TensorProto.FLOAT16 in initializer_types(artifact)
    manifest = json.loads((tmp_path / "store" / results[0]["key"] / "manifest.json").read_text())
    assert manifest["details"]["prepared"]["key"] == results[0]["prepared"]["key"]
    assert results[0]["accuracy"]["maxRelError"] <= 2e-2


def test_qdq_method_serves_the_tensorrt_graph_on_the_cpu(tmp_path: Path, classifier: Path, calibration: Path) -> None:
    code, result = build(
        tmp_path, "--model", str(classifier), "--precision", "int8", "--ort-quantization", "qdq",
        "--calibration", str(calibration),
    )  # fmt: skip
    assert code == 0, result
    assert (result["effectivePrecision"], result["int8Portable"]) == ("int8", False)
    manifest = json.loads((tmp_path / "store" / result["key"] / "manifest.json").read_text())
    assert manifest["details"]["quantization"] == PREPARE_SCHEMES["int8"]
    prepared = tmp_path / "store" / "prepared" / result["prepared"]["key"] / "model.onnx"
    assert {n.op_type for n in onnx.load(str(prepared)).graph.node} >= QDQ
    assert result["accuracy"]["top1Agreement"] >= 0.98


def test_fp16_on_a_cpu_target_stays_fp32_and_prepares_nothing(tmp_path: Path, classifier: Path) -> None:
    code, result = build(tmp_path, "--model", str(classifier), "--precision", "fp16")
    assert code == 0, result
    assert (result["precision"], result["effectivePrecision"]) == ("fp16", "fp32")
    assert "prepared" not in result
    assert not (tmp_path / "store" / "prepared").exists()
