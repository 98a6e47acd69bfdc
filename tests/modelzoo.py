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


STRING_OPSET = 20  # StringConcat arrived in opset 20
HELLO = "héllo"


def strings_reference(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Python reference of `strings_model` on an array of str: ("<" + s + ">", s == "héllo")."""
    tagged = np.vectorize(lambda s: f"<{s}>", otypes=[object])(text)
    return tagged, text == HELLO


def strings_model(path: Path) -> Path:
    """A string model whose outputs depend on every byte of its input.

    `text` BYTES [batch, n] -> `tagged` BYTES [batch, n] ("<" + text + ">") and `is_hello` BOOL [batch, n]
    (text == "héllo"): a model that saw a repr such as "b'abc'" answers visibly wrong.
    """
    consts = [
        numpy_helper.from_array(np.array([value.encode()], dtype=np.object_), name)
        for name, value in (("open", "<"), ("close", ">"), ("hello", HELLO))
    ]
    nodes = [
        helper.make_node("StringConcat", ["open", "text"], ["opened"]),
        helper.make_node("StringConcat", ["opened", "close"], ["tagged"]),
        helper.make_node("Equal", ["text", "hello"], ["is_hello"]),
    ]
    graph = helper.make_graph(
        nodes,
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", "n"])],
        [
            helper.make_tensor_value_info("tagged", TensorProto.STRING, ["batch", "n"]),
            helper.make_tensor_value_info("is_hello", TensorProto.BOOL, ["batch", "n"]),
        ],
        initializer=consts,
    )
    opsets = [helper.make_opsetid("", STRING_OPSET)]
    return _save(helper.make_model(graph, opset_imports=opsets, producer_name="modelfleet-tests"), path)


VOCAB = 10


def lookup_model(path: Path) -> Path:
    """An embedding-table lookup: `idx` INT64 [batch, 1] -> `row` FP32 [batch, 1, 4] = table[idx].

    Row i of the table is [4i, 4i+1, 4i+2, 4i+3]; an index outside [-10, 9] makes Gather fail, as an
    out-of-range token id does in a language model.
    """
    table = numpy_helper.from_array(np.arange(VOCAB * 4, dtype=np.float32).reshape(VOCAB, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["batch", 1, 4])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)


def unshared_add_model(path: Path) -> Path:
    """`a` FP32 [batch, n] + `b` FP32 [batch, m] -> `sum`: the model does not say n == m, so only running
    it finds out (ONNX Runtime fails the Add when they differ and neither is 1)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "unshared_add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "n"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "m"]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", "k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)


def nonfinite_model(path: Path) -> Path:
    """`x` FP32 [batch, n] -> `log` = ln(x) and `inverse` = 1 / x: 0 and -1 give -inf, inf and NaN."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["log"]), helper.make_node("Reciprocal", ["x"], ["inverse"])],
        "nonfinite",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [
            helper.make_tensor_value_info("log", TensorProto.FLOAT, ["batch", "n"]),
            helper.make_tensor_value_info("inverse", TensorProto.FLOAT, ["batch", "n"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)


def growing_reference(x: np.ndarray, rounds: int = 4) -> np.ndarray:
    y = x.astype(np.float32)
    for _ in range(rounds):
        y = np.tanh(y @ y)
    return y


def growing_model(path: Path, rounds: int = 4) -> Path:
    """`x` FP32 [batch, n, n] -> `y`, `rounds` times y = tanh(y @ y): its cost grows as n cubed, so n = 1
    computes in microseconds and n = 256 in tens of milliseconds, with the same model and batch size."""
    nodes, current = [], "x"
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [current, current], [f"p{i}"]))
        current = "y" if i == rounds - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [current]))
    graph = helper.make_graph(
        nodes,
        "growing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)
