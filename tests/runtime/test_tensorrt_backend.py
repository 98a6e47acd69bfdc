"""The native TensorRT 10 backend against ONNX Runtime on the same model; needs tensorrt and a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.modelzoo import FEATURES, classifier_model, classifier_reference

trt = pytest.importorskip(
    "tensorrt",
    reason="tensorrt is not installed (the `gpu` extra); the TensorRT backend runs on GPU machines only",
)


def _cuda_device_count() -> int:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return 0
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


pytestmark = pytest.mark.skipif(_cuda_device_count() == 0, reason="no CUDA device: TensorRT engines need a GPU")


def build_engine(onnx_path: Path, plan_path: Path, *, max_batch: int) -> Path:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, FEATURES), (max(1, max_batch // 2), FEATURES), (max_batch, FEATURES))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT could not build the engine"
    plan_path.write_bytes(bytes(plan))
    return plan_path


def test_engine_outputs_match_the_reference_for_every_batch(tmp_path: Path) -> None:
    from modelfleet_runtime.backends.tensorrt import TensorRTBackend

    plan = build_engine(classifier_model(tmp_path / "c.onnx"), tmp_path / "engine.plan", max_batch=16)
    backend = TensorRTBackend(plan)
    try:
        assert backend.max_batch_size == 16
        assert [s.name for s in backend.inputs] == ["input"]
        assert backend.inputs[0].shape == (-1, FEATURES)
        backend.warmup([1, 8, 16], iterations=2, dims={})
        rng = np.random.default_rng(0)
        for batch in (1, 3, 16):
            x = rng.normal(size=(batch, FEATURES)).astype(np.float32)
            got = backend.infer({"input": x})["probabilities"]
            np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-3, atol=1e-4)
        with pytest.raises(ValueError, match="exceeds the engine profile max"):
            backend.infer({"input": np.zeros((17, FEATURES), np.float32)})
    finally:
        backend.close()
