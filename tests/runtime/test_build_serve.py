"""Built artifacts are what `modelfleet serve` loads: a real server process answers within the gate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from modelfleet_runtime.build.cli import main
from modelfleet_runtime.build.options import DEFAULT_GATES
from tests.commands import MODELFLEET
from tests.modelzoo import FEATURES, classifier_model, classifier_reference

pytest.importorskip("modelfleet_runtime.server")

REPO = Path(__file__).resolve().parents[2]
READY_WITHIN_SECONDS = 180  # an upper bound for a loaded machine, not a performance assertion


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture
def serve() -> Iterator[Any]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(key_dir: Path) -> str:
        port = free_port()
        process = subprocess.Popen(
            [*MODELFLEET, "serve", "--model", str(key_dir), "--name", "m", "--http-port", str(port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_WITHIN_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
            try:
                if http("GET", f"{base}/v2/health/ready")[0] == 200:
                    return base
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_built_artifact_is_served_within_the_gate(tmp_path: Path, serve: Any, precision: str) -> None:
    model = classifier_model(tmp_path / "classifier.onnx")
    term = tmp_path / "term"
    store = tmp_path / "store"
    argv = [
        "--model",
        str(model),
        "--store",
        str(store),
        "--precision",
        precision,
        "--termination-log",
        str(term),
    ]
    assert main(argv) == 0
    result = json.loads(term.read_text())
    base = serve(store / result["key"])

    x = np.random.default_rng(11).standard_normal((8, FEATURES)).astype(np.float32)
    payload = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, body = http("POST", f"{base}/v2/models/m/infer", payload)
    assert status == 200, body
    (output,) = [o for o in body["outputs"] if o["name"] == "probabilities"]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    want = classifier_reference(x)
    assert got.shape == want.shape
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:  # what the gate let through, and the very artifact it gated
        assert np.abs(got - want).max() <= DEFAULT_GATES["int8"].max_rel_error * np.abs(want).max()
        session = ort.InferenceSession(str(store / result["key"] / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(got, session.run(None, {"input": x})[0], atol=1e-5)
    assert os.path.exists(store / result["key"] / "manifest.json")
