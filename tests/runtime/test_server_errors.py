"""Bad input gets a clear {"error": ...} with the right status; nothing a client sends hurts the server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.modelzoo import FEATURES
from tests.runtime.conftest import ServerProcess

ROW = [0.25] * FEATURES


def post(server: ServerProcess, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    if isinstance(body, dict):
        kwargs["json"] = body
    elif body is not None:
        kwargs["data"] = body
    return requests.post(f"{server.url}{path}", timeout=60, **kwargs)


def infer_body(
    name: str = "input", shape: list[int] | None = None, datatype: str = "FP32", data: list[Any] | None = None
) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "shape": shape or [1, FEATURES],
                "datatype": datatype,
                "data": ROW if data is None else data,
            }
        ]
    }


def assert_error(response: requests.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    for needle in needles:
        assert needle in body["error"], body


@pytest.fixture(autouse=True)
def _server_survives(classifier_server: ServerProcess) -> Iterator[None]:
    yield
    assert classifier_server.proc.poll() is None, classifier_server.log()
    assert requests.get(f"{classifier_server.url}/v2/health/ready", timeout=30).status_code == 200


def test_unknown_model_is_404_everywhere(classifier_server: ServerProcess) -> None:
    assert_error(post(classifier_server, "/v2/models/nope/infer", infer_body()), 404, "unknown model 'nope'")
    assert_error(requests.get(f"{classifier_server.url}/v2/models/nope", timeout=30), 404, "unknown model")
    assert_error(requests.get(f"{classifier_server.url}/v2/models/nope/ready", timeout=30), 404, "unknown model")
    assert_error(post(classifier_server, "/v2/models/classifier/versions/7/infer", infer_body()), 404, "no version '7'")


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (infer_body(name="pixels"), ["unknown input 'pixels'", "input"]),
        (infer_body(datatype="FP64"), ["input 'input' has datatype FP64, the model expects FP32"]),
        (infer_body(datatype="INT32", data=[1] * FEATURES), ["input 'input' has datatype INT32"]),
        (infer_body(shape=[1, FEATURES - 1], data=ROW[:-1]), ["input 'input' has shape [1, 15]"]),
        (
            infer_body(shape=[FEATURES], data=ROW),
            ["input 'input' has shape [16], the model expects [-1, 16]"],
        ),
        (
            infer_body(shape=[17, FEATURES], data=ROW * 17),
            ["input 'input' has batch size 17, above the maximum 16"],
        ),
        (
            infer_body(shape=[2, FEATURES], data=ROW),
            ["input 'input': 16 elements in 'data' for shape [2, 16]"],
        ),
        (infer_body(data=["x"] * FEATURES), ["input 'input': FP32 data must be JSON numbers, found a string"]),
        ({"inputs": []}, ["no 'inputs'"]),
        ({**infer_body(), "outputs": [{"name": "logits"}]}, ["unknown output 'logits'"]),
    ],
)
def test_bad_tensors_are_400_naming_the_tensor(
    classifier_server: ServerProcess, body: dict[str, Any], needles: list[str]
) -> None:
    assert_error(post(classifier_server, "/v2/models/classifier/infer", body), 400, *needles)


def test_binary_data_that_does_not_match_its_header_is_400(classifier_server: ServerProcess) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": FEATURES * 4},
                }
            ]
        }
    ).encode()
    short = header + b"\0" * (FEATURES * 4 - 8)
    response = post(
        classifier_server,
        "/v2/models/classifier/infer",
        short,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_error(response, 400, "input 'input': binary_data_size 64 runs past the end of the body")
    response = post(
        classifier_server,
        "/v2/models/classifier/infer",
        short,
        headers={"Inference-Header-Content-Length": "oops"},
    )
    assert_error(response, 400, "Inference-Header-Content-Length must be an integer")


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[]", b'{"inputs": "x"}', b"null"])
def test_garbage_bodies_are_400(classifier_server: ServerProcess, raw: bytes) -> None:
    response = post(classifier_server, "/v2/models/classifier/infer", raw)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_a_body_above_the_limit_is_413_before_it_is_buffered(classifier_server: ServerProcess) -> None:
    big = b" " * 300_000  # the fixture's limit is 200,000 bytes
    assert_error(post(classifier_server, "/v2/models/classifier/infer", big), 413, "exceeds the limit of 200000")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for _ in range(30):
            yield b" " * 10_000

    assert_error(post(classifier_server, "/v2/models/classifier/infer", chunks()), 413, "exceeds the limit")
    assert classifier_server.metric("modelfleet_requests_total", outcome="invalid") >= 2


def test_wrong_methods_and_unknown_routes(classifier_server: ServerProcess) -> None:
    assert_error(requests.get(f"{classifier_server.url}/v2/models/classifier/infer", timeout=30), 405, "POST")
    assert_error(post(classifier_server, "/v2/models/classifier", infer_body()), 405, "GET")
    assert_error(requests.get(f"{classifier_server.url}/v3/anything", timeout=30), 404, "no route")
    assert_error(requests.get(f"{classifier_server.url}/v2/models/classifier/stats", timeout=30), 404, "no route")


def test_broken_http_does_not_hurt_the_server(classifier_server: ServerProcess) -> None:
    for junk in (
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
    ):
        with socket.create_connection(("127.0.0.1", classifier_server.port), timeout=30) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
    # and it still serves: the process lives and answers health checks.
    assert classifier_server.proc.poll() is None
    assert requests.get(f"{classifier_server.url}/v2/health/ready", timeout=30).status_code == 200


def test_expect_100_continue_is_answered_before_the_body(classifier_server: ServerProcess) -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": ROW}]})
    head = (
        f"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", classifier_server.port), timeout=30) as sock:
        sock.sendall(head)
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body.encode())
        reply = b""
        while b"model_name" not in reply:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK")

    big = (
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 900000\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", classifier_server.port), timeout=30) as sock:
        sock.sendall(big)  # too large: refused at once, and the client never has to send the body
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
