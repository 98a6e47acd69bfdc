"""Small real ONNX models built with onnx.helper, shared by the runtime, build and e2e tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# onnx >= 1.20 writes IR version 11+ by default, newer than some ONNX Runtime releases load.
IR_VERSION = 9
FEATURES = 16
CLASSES = 10


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


Sizes = tuple[int, int, int]  # features, hidden units, classes
SIZES: Sizes = (FEATURES, 32, CLASSES)


def classifier_weights(seed: int = 0, sizes: Sizes = SIZES) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    features, hidden, classes = sizes
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (features, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (hidden,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (hidden, classes)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    return w1, b1, w2, b2


def classifier_reference(x: np.ndarray, seed: int = 0, sizes: Sizes = SIZES) -> np.ndarray:
    """NumPy reference of `classifier_model`: softmax(relu(x @ w1 + b1) @ w2 + b2)."""
    w1, b1, w2, b2 = classifier_weights(seed, sizes)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def classifier_model(path: Path, seed: int = 0, sizes: Sizes = SIZES) -> Path:
    """A classifier-shaped MLP: input `input` FP32 [batch, 16] -> output `probabilities` FP32 [batch, 10]
    (other `sizes`: [batch, features] -> [batch, classes])."""
    w1, b1, w2, b2 = classifier_weights(seed, sizes)
    features, _, classes = sizes
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)


def two_io_reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of `two_io_model`: (a + b, row-sum of a * b as INT64-free FP32 [batch, 1])."""
    return (a + b).astype(np.float32), (a * b).sum(axis=1, keepdims=True).astype(np.float32)


def two_io_model(path: Path) -> Path:
    """Two inputs and two outputs with a dynamic second axis.

    `a`, `b`: FP32 [batch, seq] -> `sum` FP32 [batch, seq], `dot` FP32 [batch, 1].
    """
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Mul", ["a", "b"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axes"], ["dot"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("dot", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)
