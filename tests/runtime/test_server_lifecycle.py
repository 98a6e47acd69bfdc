"""A real server's lifecycle: ready after warm-up, SIGTERM losing no accepted work (uploads too), bad models."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper, numpy_helper

from tests.modelzoo import FEATURES, IR_VERSION, OPSET, classifier_reference
from tests.runtime.conftest import ROOT, ServerFactory

WIDTH = 512
LAYERS = 12


def slow_model(path: Path) -> Path:
    """A chain of 512x512 MatMul+Tanh layers: enough work that warming every batch size takes seconds."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        inits.append(
            numpy_helper.from_array((rng.normal(size=(WIDTH, WIDTH)) / WIDTH**0.5).astype(np.float32), f"w{i}")
        )
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        prev = "y" if i == LAYERS - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [prev]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return path


def infer_body(x: np.ndarray, name: str = "input") -> dict[str, object]:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.mark.timeout(600)
def test_ready_only_after_every_batch_size_is_warmed(start_server: ServerFactory, tmp_path: Path) -> None:
    model = slow_model(tmp_path / "slow.onnx")
    server = start_server(model, "slow", wait_ready=False, max_batch_size="48", warmup="all", warmup_iterations="16")
    observed_loading = refused = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # The state only moves loading -> ready, so readiness is probed last: a 503 there proves the
        # infer and live answers before it were given while loading.
        live = requests.get(f"{server.url}/v2/health/live", timeout=30)
        infer = requests.post(
            f"{server.url}/v2/models/slow/infer", json=infer_body(np.zeros((1, WIDTH)), "x"), timeout=30
        )
        ready = requests.get(f"{server.url}/v2/health/ready", timeout=30)
        assert live.status_code == 200
        if infer.status_code == 503:
            assert "loading" in infer.json()["error"]
            refused += 1
        if ready.status_code == 200:
            break
        assert ready.status_code == 503
        assert "loading" in ready.json()["error"]
        assert infer.status_code == 503, infer.text
        observed_loading += 1
        time.sleep(0.05)
    else:
        pytest.fail(f"never ready:\n{server.log()}")
    assert observed_loading > 0, "the server was ready before the first probe: warm-up too short to observe"
    assert f"warmed batch sizes {list(range(1, 49))}" in server.log()
    ok = requests.post(
        f"{server.url}/v2/models/slow/infer",
        json=infer_body(np.ones((2, WIDTH), np.float32), "x"),
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    assert server.metric("modelfleet_requests_total", outcome="unavailable") == refused
    assert server.terminate() == 0


class LoadThread(threading.Thread):
    """Sends requests back to back on a keep-alive session until the server is gone (bounded in count)."""

    def __init__(self, url: str, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.rng = np.random.default_rng(seed)
        self.ok = 0
        self.rejected: list[str] = []
        self.other: list[str] = []
        self.connection_errors = 0

    def run(self) -> None:
        session = requests.Session()
        for _ in range(100_000):
            if self.stop.is_set() or self.connection_errors >= 3:
                return
            x = self.rng.normal(size=(1, FEATURES)).astype(np.float32)
            try:
                r = session.post(f"{self.url}/v2/models/classifier/infer", json=infer_body(x), timeout=120)
            except requests.ConnectionError:
                self.connection_errors += 1
                session = requests.Session()
                continue
            if r.status_code == 200:
                got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, -1)
                if np.allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6):
                    self.ok += 1
                else:
                    self.other.append("wrong result")
            elif r.status_code == 503:
                self.rejected.append(r.json()["error"])
            else:
                self.other.append(f"{r.status_code} {r.text}")


@pytest.mark.timeout(600)
def test_sigterm_under_load_finishes_every_accepted_request(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(
        models["classifier"],
        "classifier",
        max_batch_size="16",
        max_queue_delay_microseconds="5000",
        drain_delay_seconds="3",
        inline_compute_microseconds="0",
    )
    stop = threading.Event()
    threads = [LoadThread(server.url, seed, stop) for seed in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while sum(t.ok for t in threads) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(15)
    # While draining: not ready, and new work is refused with 503 (the listener stays open for 3 s).
    probe = requests.get(f"{server.url}/v2/health/ready", timeout=30)
    while probe.status_code == 200 and time.monotonic() < deadline:
        probe = requests.get(f"{server.url}/v2/health/ready", timeout=30)
    assert probe.status_code == 503
    assert "draining" in probe.json()["error"]
    code = server.proc.wait(timeout=300)
    stop.set()
    for t in threads:
        t.join(timeout=300)

    assert code == 0, server.log()
    counts = server.final_counts()
    assert counts["inflight"] == 0
    assert [o for t in threads for o in t.other] == []
    # Every request the server accepted reached its client: its success count is the clients' 200 count.
    assert counts["success"] == sum(t.ok for t in threads)
    assert counts["unavailable"] == sum(len(t.rejected) for t in threads) > 0
    assert all("draining" in msg for t in threads for msg in t.rejected)


def write_store(directory: Path, model: Path, *, batch_max: int, sha: str | None = None) -> Path:
    directory.mkdir(parents=True)
    shutil.copy(model, directory / "model.onnx")
    digest = sha or hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    manifest = {
        "key": directory.name,
        "backend": "onnxruntime",
        "artifact": "model.onnx",
        "artifact_sha256": digest,
        "options": {"batch": {"min": 1, "opt": 4, "max": batch_max}},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.mark.timeout(300)
def test_an_engine_store_entry_is_served_with_its_batch_profile(
    start_server: ServerFactory, models: dict[str, Path], tmp_path: Path
) -> None:
    entry = write_store(tmp_path / "store" / "k123", models["classifier"], batch_max=8)
    server = start_server(entry, "classifier", max_batch_size="64")
    config = requests.get(f"{server.url}/v2/models/classifier/config", timeout=30).json()
    assert config["max_batch_size"] == 8
    x = np.random.default_rng(2).normal(size=(8, FEATURES)).astype(np.float32)
    ok = requests.post(f"{server.url}/v2/models/classifier/infer", json=infer_body(x), timeout=60)
    got = np.asarray(ok.json()["outputs"][0]["data"], np.float32).reshape(8, -1)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    too_big = requests.post(
        f"{server.url}/v2/models/classifier/infer", json=infer_body(np.zeros((9, FEATURES))), timeout=60
    )
    assert too_big.status_code == 400
    assert "above the maximum 8" in too_big.json()["error"]
    assert "warmed batch sizes [1, 2, 4, 8]" in server.log()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("problem", ["sha256", "missing", "corrupt"])
def test_a_model_that_cannot_load_exits_non_zero_with_the_reason(
    start_server: ServerFactory, models: dict[str, Path], tmp_path: Path, problem: str
) -> None:
    if problem == "sha256":
        target = write_store(tmp_path / "k1", models["classifier"], batch_max=8, sha="0" * 64)
        reason = "the manifest says " + "0" * 64
    elif problem == "missing":
        target, reason = tmp_path / "absent.onnx", "does not exist"
    else:
        target = tmp_path / "corrupt.onnx"
        target.write_bytes(models["classifier"].read_bytes()[:200])
        reason = "failed to load"
    server = start_server(target, "classifier", wait_ready=False)
    assert server.proc.wait(timeout=120) == 1
    assert reason in server.log()
    assert "failed to load" in server.log()


def test_invalid_settings_exit_2_naming_the_field(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "MODELFLEET_MAX_BATCH_SIZE": "0"}
    result = subprocess.run(  # noqa: PLW1510 - the exit code is the assertion
        [
            sys.executable,
            "-m",
            "modelfleet_runtime.cli",
            "serve",
            "--model",
            str(tmp_path / "m.onnx"),
            "--name",
            "m",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


@pytest.mark.timeout(600)
def test_sigterm_during_warm_up_exits_without_finishing_it(start_server: ServerFactory, tmp_path: Path) -> None:
    model = slow_model(tmp_path / "slow.onnx")
    # Warm-up this long would take hours; a server that waited for it would outlive the hang guard.
    server = start_server(
        model, "slow", wait_ready=False, max_batch_size="48", warmup="all", warmup_iterations="100000"
    )
    deadline = time.monotonic() + 120
    while "onnxruntime session on" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)  # the session is loaded: what follows is the warm-up
    assert requests.get(f"{server.url}/v2/health/ready", timeout=30).json()["error"] == "server is loading"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log()
    assert "stopped after draining" in server.log()


@pytest.mark.timeout(600)
def test_sigterm_lets_a_request_still_uploading_finish(start_server: ServerFactory, models: dict[str, Path]) -> None:
    # No minimum body rate: the upload stalls on purpose, longer than its grace period.
    server = start_server(models["classifier"], "classifier", drain_grace_seconds="120", min_body_bytes_per_second="0")
    x = np.random.default_rng(5).normal(size=(3, FEATURES)).astype(np.float32)
    body = json.dumps(infer_body(x)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    head = f"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body[:10])
    server.wait_metric("modelfleet_inflight_requests", 1)
    server.proc.send_signal(signal.SIGTERM)
    while requests.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200:
        time.sleep(0.05)
    # Longer than uvicorn's own fixed 5 s shutdown timeout, well within the drain grace.
    time.sleep(6)
    sock.sendall(body[10:])
    response = http.client.HTTPResponse(sock)
    response.begin()
    payload = response.read()
    assert response.status == 200, payload
    got = np.asarray(json.loads(payload)["outputs"][0]["data"], np.float32).reshape(3, -1)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    assert server.proc.wait(timeout=120) == 0
    assert server.final_counts()["success"] == 1


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=60).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.timeout(600)
def test_sigterm_answers_requests_on_connections_open_when_the_listener_closes(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    # Long timers, so only the shutdown can close these connections while the test runs.
    server = start_server(
        models["classifier"],
        "classifier",
        drain_grace_seconds="300",
        header_timeout_seconds="300",
        idle_timeout_seconds="300",
    )
    body = json.dumps(infer_body(np.ones((1, FEATURES), np.float32))).encode()
    head = f"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
    # One connection answered once, with the next request's head half written (in the same write, so it is
    # read with the first request: the 200 proves the server holds the half head).
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    busy.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + head)
    first = http.client.HTTPResponse(busy)
    first.begin()
    first.read()
    assert first.status == 200
    # One connection open but silent: the client saw connect() succeed, and will write its request later.
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    server.proc.send_signal(signal.SIGTERM)
    # Refused: the listener is closed, so the shutdown has already gone over the open connections.
    deadline = time.monotonic() + 300
    while not refused(server.port):
        assert time.monotonic() < deadline, server.log()
    for sock, rest in [(busy, b"\r\n" + body), (silent, head + b"\r\n" + body)]:
        sock.sendall(rest)
        response = http.client.HTTPResponse(sock)
        response.begin()
        payload = response.read()
        assert response.status == 503, payload
        assert response.getheader("connection") == "close"
        assert "draining" in json.loads(payload)["error"]
        sock.close()
    assert server.proc.wait(timeout=120) == 0, server.log()
