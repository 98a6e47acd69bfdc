"""OIP v2 over gRPC: tritonclient.grpc, unchanged, against a real `modelfleet serve` that also serves REST."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.modelzoo import CLASSES, FEATURES, classifier_reference, two_io_reference
from tests.runtime.conftest import ServerFactory, ServerProcess

GUARD_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_grpc(factory: ServerFactory, model: Path, name: str, **env: str) -> tuple[ServerProcess, str]:
    port = free_port()
    settings: dict[str, Any] = {"grpc_port": str(port), **env}
    server = factory(model, name, **settings)
    assert f"gRPC listening on 127.0.0.1:{port}" in server.log()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def classifier(session_servers: ServerFactory, models: dict[str, Path]) -> tuple[ServerProcess, str]:
    return start_grpc(session_servers, models["classifier"], "classifier", max_batch_size="16")


@pytest.fixture(scope="module")
def two_io(session_servers: ServerFactory, models: dict[str, Path]) -> tuple[ServerProcess, str]:
    return start_grpc(session_servers, models["two_io"], "two_io", max_batch_size="32")


def grpc_inputs(**arrays: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def rest_outputs(server: ServerProcess, model: str, outputs: list[str], **arrays: np.ndarray) -> dict[str, bytes]:
    """The REST path's answer, binary tensors, as raw bytes per output."""
    client = httpclient.InferenceServerClient(url=server.host, network_timeout=60)
    inputs = []
    for name, arr in arrays.items():
        inp = httpclient.InferInput(name, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr, binary_data=True)
        inputs.append(inp)
    wanted = [httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs]
    result = client.infer(model, inputs, outputs=wanted)
    return {o: result.as_numpy(o).tobytes() for o in outputs}


def test_health_and_metadata(classifier: tuple[ServerProcess, str]) -> None:
    client = grpcclient.InferenceServerClient(url=classifier[1])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("classifier")
    meta = client.get_model_metadata("classifier", as_json=True)
    assert meta["name"] == "classifier"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", str(FEATURES)]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", str(CLASSES)]}]
    server_meta = client.get_server_metadata(as_json=True)
    assert server_meta["name"] == "modelfleet"


def test_classifier_infer_matches_the_reference_and_rest_byte_for_byte(classifier: tuple[ServerProcess, str]) -> None:
    server, address = classifier
    client = grpcclient.InferenceServerClient(url=address)
    x = np.random.default_rng(1).standard_normal((5, FEATURES)).astype(np.float32)
    result = client.infer("classifier", grpc_inputs(input=x), request_id="r-7")
    got = result.as_numpy("probabilities")
    assert got.shape == (5, CLASSES)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "r-7"
    assert got.tobytes() == rest_outputs(server, "classifier", ["probabilities"], input=x)["probabilities"]


def test_two_io_infer_matches_rest_byte_for_byte(two_io: tuple[ServerProcess, str]) -> None:
    server, address = two_io
    client = grpcclient.InferenceServerClient(url=address)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((3, 7)).astype(np.float32) for _ in range(2))
    wanted = [grpcclient.InferRequestedOutput("dot"), grpcclient.InferRequestedOutput("sum")]
    result = client.infer("two_io", grpc_inputs(a=a, b=b), outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["dot", "sum"]
    want_sum, want_dot = two_io_reference(a, b)
    np.testing.assert_allclose(result.as_numpy("sum"), want_sum, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("dot"), want_dot, rtol=1e-5)
    rest = rest_outputs(server, "two_io", ["sum", "dot"], a=a, b=b)
    assert result.as_numpy("sum").tobytes() == rest["sum"]
    assert result.as_numpy("dot").tobytes() == rest["dot"]


def test_typed_contents_are_accepted(classifier: tuple[ServerProcess, str]) -> None:
    """Inputs in InferTensorContents (not raw bytes), built with tritonclient's own protobuf classes."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = np.random.default_rng(3).standard_normal((2, FEATURES)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, FEATURES])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(classifier[1]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=GUARD_S)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, CLASSES)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)


def expect_error(call: object, code: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    assert info.value.status() == code, info.value
    return str(info.value.message())


def test_errors_are_status_codes_naming_the_problem(classifier: tuple[ServerProcess, str]) -> None:
    server, address = classifier
    client = grpcclient.InferenceServerClient(url=address)
    bad = np.zeros((2, FEATURES + 1), dtype=np.float32)
    message = expect_error(lambda: client.infer("classifier", grpc_inputs(input=bad)), "StatusCode.INVALID_ARGUMENT")
    assert "'input'" in message and "shape" in message
    wrong_name = grpc_inputs(pixels=np.zeros((1, FEATURES), dtype=np.float32))
    message = expect_error(lambda: client.infer("classifier", wrong_name), "StatusCode.INVALID_ARGUMENT")
    assert "'pixels'" in message
    ok = grpc_inputs(input=np.zeros((1, FEATURES), dtype=np.float32))
    message = expect_error(lambda: client.infer("nope", ok), "StatusCode.NOT_FOUND")
    assert message == "unknown model 'nope'"
    expect_error(lambda: client.get_model_metadata("nope"), "StatusCode.NOT_FOUND")
    assert "Traceback" not in server.log()
    assert server.metric("modelfleet_grpc_requests_total", outcome="invalid") >= 3


@pytest.mark.timeout(300)
def test_a_full_queue_is_resource_exhausted(start_server: ServerFactory, models: dict[str, Path]) -> None:
    """The REST path's admission (503, rejected_queue_full) as RESOURCE_EXHAUSTED; the held request is
    answered once the drain flushes the queue."""
    hold = {"max_batch_size": "64", "max_queue_delay_microseconds": "600000000", "max_queue_size": "1"}
    server, address = start_grpc(start_server, models["classifier"], "classifier", **hold)
    client = grpcclient.InferenceServerClient(url=address)
    x = np.zeros((1, FEATURES), dtype=np.float32)
    answers: list[object] = []
    held = threading.Thread(target=lambda: answers.append(client.infer("classifier", grpc_inputs(input=x))))
    held.start()
    server.wait_metric("modelfleet_queue_depth", 1)
    other = grpcclient.InferenceServerClient(url=address)
    message = expect_error(lambda: other.infer("classifier", grpc_inputs(input=x)), "StatusCode.RESOURCE_EXHAUSTED")
    assert "queue full" in message
    assert server.metric("modelfleet_grpc_requests_total", outcome="rejected_queue_full") == 1
    assert server.terminate() == 0
    held.join(timeout=GUARD_S)
    assert len(answers) == 1  # admitted before the drain: computed, not dropped


@pytest.mark.timeout(300)
def test_deadlines_are_deadline_exceeded(start_server: ServerFactory, models: dict[str, Path]) -> None:
    """The OIP `timeout` parameter and the gRPC deadline both bound the time in the queue: not computed."""
    hold = {"max_batch_size": "64", "max_queue_delay_microseconds": "600000000"}
    server, address = start_grpc(start_server, models["classifier"], "classifier", **hold)
    client = grpcclient.InferenceServerClient(url=address)
    inputs = grpc_inputs(input=np.zeros((1, FEATURES), dtype=np.float32))
    message = expect_error(lambda: client.infer("classifier", inputs, timeout=200_000), "StatusCode.DEADLINE_EXCEEDED")
    assert "timed out after 200000 us in the queue" in message
    assert server.metric("modelfleet_grpc_requests_total", outcome="timeout") == 1
    expect_error(lambda: client.infer("classifier", inputs, client_timeout=0.5), "StatusCode.DEADLINE_EXCEEDED")
    server.wait_metric("modelfleet_queue_depth", 0)  # the server gave up on it too: nothing left queued
    assert server.metric("modelfleet_batch_size_count") == 0  # neither request was computed
    print(
        "deadline outcomes:",
        {o: server.metric("modelfleet_grpc_requests_total", outcome=o) for o in ("timeout", "cancelled")},
    )


@pytest.mark.timeout(300)
def test_draining_answers_not_ready_and_unavailable(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server, address = start_grpc(start_server, models["classifier"], "classifier", drain_delay_seconds="600")
    client = grpcclient.InferenceServerClient(url=address)
    inputs = grpc_inputs(input=np.zeros((1, FEATURES), dtype=np.float32))
    client.infer("classifier", inputs)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GUARD_S
    while client.is_server_ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.is_server_ready()
    assert client.is_server_live()
    message = expect_error(lambda: client.infer("classifier", inputs), "StatusCode.UNAVAILABLE")
    assert "draining" in message
    assert server.metric("modelfleet_grpc_requests_total", outcome="unavailable") == 1
    assert server.metric("modelfleet_grpc_requests_total", outcome="success") == 1
    server.kill()


@pytest.mark.timeout(300)
def test_a_message_above_the_request_limit_is_resource_exhausted(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    _, address = start_grpc(start_server, models["classifier"], "classifier", max_request_bytes="100000")
    client = grpcclient.InferenceServerClient(url=address)
    big = grpc_inputs(input=np.zeros((2000, FEATURES), dtype=np.float32))  # 128,000 bytes of tensor data
    message = expect_error(lambda: client.infer("classifier", big), "StatusCode.RESOURCE_EXHAUSTED")
    assert "100000" in message
    small = grpc_inputs(input=np.zeros((1, FEATURES), dtype=np.float32))
    assert client.infer("classifier", small).as_numpy("probabilities").shape == (1, CLASSES)


def test_bad_typed_contents_name_the_tensor(classifier: tuple[ServerProcess, str]) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="classifier")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, FEATURES])
    tensor.contents.fp32_contents.extend([0.5] * (FEATURES - 1))
    with grpc.insecure_channel(classifier[1]) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=GUARD_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"input 'input': {FEATURES - 1} values in contents.fp32_contents for shape [1, 16]"
