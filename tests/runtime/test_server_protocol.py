"""NVIDIA's tritonclient, unchanged, against a real `modelfleet serve`: metadata, health and inference."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.modelzoo import CLASSES, FEATURES, classifier_reference, two_io_reference
from tests.runtime.conftest import ROOT, ServerProcess


@pytest.fixture
def client(classifier_server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=classifier_server.host, network_timeout=60)


def classifier_inputs(x: np.ndarray, *, binary: bool) -> list[httpclient.InferInput]:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return [inp]


def test_server_is_live_and_ready_with_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("classifier")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta["name"] == "modelfleet"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_lists_tensors_with_a_dynamic_batch_axis(
    client: httpclient.InferenceServerClient,
) -> None:
    meta = client.get_model_metadata("classifier")
    assert meta["name"] == "classifier"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, CLASSES]}]
    assert client.get_model_metadata("classifier", model_version="1")["name"] == "classifier"


def test_model_config_reports_the_batching_policy(client: httpclient.InferenceServerClient) -> None:
    config = client.get_model_config("classifier")
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [FEATURES]}]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_inference_matches_the_reference(
    client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    x = np.random.default_rng(3).normal(size=(4, FEATURES)).astype(np.float32)
    result = client.infer(
        "classifier",
        classifier_inputs(x, binary=binary_in),
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)],
        request_id="req-7",
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "classifier"
    assert ("parameters" in response["outputs"][0]) is binary_out


def test_outputs_default_to_binary_when_none_are_named(client: httpclient.InferenceServerClient) -> None:
    # tritonclient then sets binary_data_output, so every output comes back as binary data.
    x = np.ones((1, FEATURES), np.float32)
    result = client.infer("classifier", classifier_inputs(x, binary=True), model_version="1")
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == CLASSES * 4
    np.testing.assert_allclose(result.as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6)


def test_two_inputs_two_outputs_and_a_dynamic_sequence_axis(two_io_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(url=two_io_server.host, network_timeout=60)
    rng = np.random.default_rng(5)
    for batch, seq in [(1, 3), (2, 17), (5, 1)]:
        a = rng.normal(size=(batch, seq)).astype(np.float32)
        b = rng.normal(size=(batch, seq)).astype(np.float32)
        inputs = [
            httpclient.InferInput("a", [batch, seq], "FP32"),
            httpclient.InferInput("b", [batch, seq], "FP32"),
        ]
        inputs[0].set_data_from_numpy(a, binary_data=True)
        inputs[1].set_data_from_numpy(b, binary_data=False)
        outputs = [
            httpclient.InferRequestedOutput("dot", binary_data=False),
            httpclient.InferRequestedOutput("sum", binary_data=True),
        ]
        result = client.infer("two_io", inputs, outputs=outputs)
        want_sum, want_dot = two_io_reference(a, b)
        np.testing.assert_allclose(result.as_numpy("sum"), want_sum, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("dot"), want_dot, rtol=1e-5, atol=1e-5)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["dot", "sum"]


def test_a_client_error_reaches_tritonclient_as_its_message(client: httpclient.InferenceServerClient) -> None:
    x = np.ones((2, FEATURES + 1), np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("classifier", [inp])
    assert info.value.status() == "400"
    assert "input 'input' has shape [2, 17], the model expects [-1, 16]" in info.value.message()


def test_compressed_requests_from_tritonclient_are_accepted(client: httpclient.InferenceServerClient) -> None:
    x = np.random.default_rng(9).normal(size=(3, FEATURES)).astype(np.float32)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("classifier", classifier_inputs(x, binary=True), request_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6)


def test_metrics_count_successes_by_model(classifier_server: ServerProcess) -> None:
    before = classifier_server.metric("modelfleet_requests_total", outcome="success")
    body = {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.5] * FEATURES}]}
    assert requests.post(f"{classifier_server.url}/v2/models/classifier/infer", json=body, timeout=60).ok
    assert classifier_server.metric("modelfleet_requests_total", outcome="success") == before + 1
    text = requests.get(f"{classifier_server.url}/metrics", timeout=10).text
    for name in (
        "modelfleet_request_duration_seconds_bucket",
        "modelfleet_queue_duration_seconds_bucket",
        "modelfleet_compute_duration_seconds_bucket",
        "modelfleet_batch_size_bucket",
        "modelfleet_queue_depth",
        "modelfleet_inflight_requests",
    ):
        assert f"{name}{{" in text, name


def test_the_same_api_runs_as_an_asgi_app_under_uvicorn(models: dict[str, Path], tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    env.update({"MODELFLEET_MODEL": str(models["classifier"]), "MODELFLEET_NAME": "classifier"})
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "modelfleet_runtime.server:create_app",
            "--fd",
            str(sock.fileno()),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
        ],
        cwd=ROOT,
        env=env,
        pass_fds=[sock.fileno()],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sock.close()
    try:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    break
            time.sleep(0.1)
        assert client.is_model_ready("classifier")
        x = np.random.default_rng(4).normal(size=(2, FEATURES)).astype(np.float32)
        result = client.infer("classifier", classifier_inputs(x, binary=True))
        np.testing.assert_allclose(result.as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("other", classifier_inputs(x, binary=False))
    finally:
        proc.terminate()
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit is "killed by SIGTERM".
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
        log.close()
