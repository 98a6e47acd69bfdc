"""The models the abuse bench serves: the fuzz suite's five, and a compute-bound one for overload."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.loadgen import HttpRequest
from tests.modelzoo import IR_VERSION, OPSET, classifier_model, two_io_model
from tests.runtime.test_fuzz import NUMERIC, identity_model, tokens_model

WIDTH, ROWS, LAYERS = 512, 192, 4


def compute_model(path: Path) -> Path:
    """`x` FP32 [batch, 512] broadcast to [batch, 192, 512], four 512x512 MatMul+Tanh, mean over the 192 rows:
    ~400 MFLOP per row, ~5-20 ms of one core, from a 2 KiB request."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones((ROWS, WIDTH), np.float32), "rows")]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axis")]
    nodes = [helper.make_node("Unsqueeze", ["x", "axis"], ["x3"]), helper.make_node("Mul", ["x3", "rows"], ["h0"])]
    for i in range(LAYERS):
        w = (rng.normal(0, 1 / np.sqrt(WIDTH), (WIDTH, WIDTH))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]),
        ]
    nodes.append(helper.make_node("ReduceMean", [f"h{LAYERS}"], ["y"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "compute",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def compute_ms(path: Path) -> float:
    """One batch-1 inference in-process with one thread, best of 10: what a request costs the server's core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, WIDTH), np.float32)
    best = float("inf")
    for _ in range(10):
        began = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def compute_request(seed: int = 0) -> HttpRequest:
    x = np.random.default_rng(seed).normal(size=(1, WIDTH)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = (("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", str(len(header))))
    return HttpRequest("POST", "/v2/models/compute/infer", header + x.tobytes(), headers)


def fuzz_models(root: Path) -> dict[str, Path]:
    """The five models of tests/runtime/test_fuzz.py, by the model name they are served under."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "classifier": classifier_model(root / "classifier.onnx"),
        "two_io": two_io_model(root / "two_io.onnx"),
        "kitchen": identity_model(root / "kitchen.onnx", [(f"x_{d.lower()}", f"y_{d.lower()}", d) for d in NUMERIC]),
        "strings": identity_model(root / "strings.onnx", [("text", "text_out", "BYTES")]),
        "tokens": tokens_model(root / "tokens.onnx"),
    }
