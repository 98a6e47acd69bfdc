"""Model checks before a build, and the TensorRT path's pure planning (profiles, refusals) on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelfleet_runtime.build import InvalidModel, InvalidOptions, Unsupported
from modelfleet_runtime.build.accuracy import synthetic_feeds
from modelfleet_runtime.build.options import BatchProfile, BuildOptions, Calibration, ShapeRange
from modelfleet_runtime.build.trt import build_profile_shapes, check_precision, timing_cache_path
from modelfleet_runtime.build.validate import validate_model
from tests.modelzoo import classifier_model, two_io_model


def embedding_model(path: Path, *, vocab: int = 500) -> Path:
    """ids INT64 [batch, seq] -> Gather from a [vocab, 4] table -> mean over seq: [batch, 4]."""
    table = numpy_helper.from_array(np.ones((vocab, 4), np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("ReduceMean", ["emb", "axes"], ["pooled"], keepdims=0),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 4])],
        initializer=[table, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_spec_of_a_valid_model(tmp_path: Path) -> None:
    spec = validate_model(classifier_model(tmp_path / "c.onnx"), options=BuildOptions())
    assert spec.opset == 17
    assert [(t.name, t.datatype, t.shape) for t in spec.inputs] == [("input", "FP32", ("batch", 16))]
    assert spec.outputs[0].classifier_shaped
    assert not spec.has_qdq


def test_synthetic_ids_stay_inside_the_embedding_table(tmp_path: Path) -> None:
    spec = validate_model(embedding_model(tmp_path / "e.onnx", vocab=500), options=BuildOptions())
    assert spec.inputs[0].id_range == 500
    ids = synthetic_feeds(spec, options=BuildOptions(), rows=64)["ids"]
    assert ids.dtype == np.int64
    assert ids.min() >= 0
    assert ids.max() < 500
    assert ids.max() >= 100  # spread over the table, not only the first (special) rows


def test_a_graph_the_checker_rejects_is_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "missing_weight"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InvalidModel, match=r"bad\.onnx fails onnx\.checker"):
        validate_model(path, options=BuildOptions())


def test_scalar_input_has_no_batch_axis(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["y"])],
        "scalar",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "scalar.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InvalidModel, match="input 's' is a scalar"):
        validate_model(path, options=BuildOptions())


def test_shape_rank_must_match_the_input(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "t.onnx")
    options = BuildOptions(shapes={"a": ShapeRange(min=(1, 1), opt=(2, 2), max=(3, 3))})
    with pytest.raises(InvalidOptions, match="gives 2 non-batch dims, but input 'a' has 1"):
        validate_model(model, options=options)


def test_tensorrt_profiles_come_from_batch_and_shapes(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "t.onnx")
    options = BuildOptions(
        backend="tensorrt",
        batch=BatchProfile(min=1, opt=8, max=32),
        shapes={
            "a": ShapeRange(min=(16,), opt=(128,), max=(256,)),
            "b": ShapeRange(min=(16,), opt=(128,), max=(256,)),
        },
    )
    spec = validate_model(model, options=options)
    assert build_profile_shapes(spec, options) == {
        "a": ((1, 16), (8, 128), (32, 256)),
        "b": ((1, 16), (8, 128), (32, 256)),
    }
    plain = BuildOptions(backend="tensorrt", batch=BatchProfile(min=1, opt=8, max=32))
    fixed = validate_model(classifier_model(tmp_path / "c.onnx"), options=plain)
    assert build_profile_shapes(fixed, plain) == {"input": ((1, 16), (8, 16), (32, 16))}


def test_tensorrt_needs_ranges_for_dynamic_axes(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "t.onnx")
    spec = validate_model(model, options=BuildOptions())
    with pytest.raises(InvalidOptions, match=r"input 'a' has dynamic axes \[1\].*--shape a="):
        build_profile_shapes(spec, BuildOptions(backend="tensorrt"))


def test_tensorrt_precision_refusals(tmp_path: Path) -> None:
    spec = validate_model(classifier_model(tmp_path / "c.onnx"), options=BuildOptions())
    with pytest.raises(Unsupported, match="sm89"):
        check_precision(spec=spec, options=BuildOptions(precision="fp8"), architecture="sm80")
    with pytest.raises(Unsupported, match=r"fp8 on tensorrt needs --calibration data \(for its Q/DQ ranges\)"):
        check_precision(spec=spec, options=BuildOptions(precision="fp8"), architecture="sm90")
    fp8_calibrated = BuildOptions(precision="fp8", calibration=Calibration(path="c.npz"))
    check_precision(spec=spec, options=fp8_calibrated, architecture="sm90")  # accepted: precision.py adds FP8 Q/DQ
    with pytest.raises(Unsupported, match="--calibration"):
        check_precision(spec=spec, options=BuildOptions(precision="int8"), architecture="sm80")
    with pytest.raises(Unsupported, match="GPU architecture"):
        check_precision(spec=spec, options=BuildOptions(), architecture="cpu")
    calibrated = BuildOptions(precision="int8", calibration=Calibration(path="c.npz"))
    check_precision(spec=spec, options=calibrated, architecture="sm80")  # accepted


def test_timing_cache_is_per_architecture_and_version(tmp_path: Path) -> None:
    assert timing_cache_path(tmp_path, architecture="sm89", version="10.13.0") == (
        tmp_path / "timing-cache" / "sm89-10.13.0.bin"
    )
