"""Bad input gets a clear {"error": ...} with the right status; nothing a client sends hurts the server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from tests.modelzoo import FEATURES, VOCAB, lookup_model, nonfinite_model, two_io_model, unshared_add_model
from tests.runtime.conftest import ServerFactory, ServerProcess

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


# --- client mistakes the server used to answer with a 500 -----------------------------------------------


def assert_clean(response: requests.Response) -> None:
    """No traceback, ONNX Runtime source path or C++ signature reaches a client."""
    for leak in ("Traceback", "onnxruntime_src", ".cc:", ".h:", "onnxruntime::", "[ONNXRuntimeError]"):
        assert leak not in response.text, response.text


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (infer_body(datatype=["FP32"]), ["input 'input': unsupported datatype ['FP32']"]),  # type: ignore[arg-type]
        (infer_body(datatype={"a": 1}), ["input 'input': unsupported datatype {'a': 1}"]),  # type: ignore[arg-type]
        (infer_body(shape=[0, 2**62], data=[]), ["input 'input': shape [0, 4611686018427387904] has a dimension"]),
        (infer_body(shape=[0, 10**30], data=[]), ["input 'input': 'shape' must be a list of integers"]),
        (infer_body(shape=[1] * 65, data=[0.5]), ["input 'input': shape has 65 dimensions, above the limit of 64"]),
        (infer_body(shape=[1] * 64, data=[0.5]), ["input 'input' has shape [1, 1, 1", "the model expects [-1, 16]"]),
        (infer_body(data=["0.25"] * FEATURES), ["input 'input': FP32 data must be JSON numbers, found a string"]),
        (infer_body(data=[None] * FEATURES), ["input 'input': FP32 data must be JSON numbers, found null"]),
        (infer_body(data=[True] + ROW[1:]), ["input 'input': FP32 data must be JSON numbers, found true/false"]),
        (infer_body(data=[1e39] + ROW[1:]), ["input 'input': a value in 'data' is out of range for FP32"]),
        (infer_body(data=0.25), ["input 'input': 'data' must be a list"]),  # type: ignore[arg-type]
        (infer_body(name="x" * 5000), ["input name xxxxx", "(5000 characters) is above the limit of 1024"]),
    ],
)
def test_malformed_fields_are_400_naming_the_tensor(
    classifier_server: ServerProcess, body: dict[str, Any], needles: list[str]
) -> None:
    response = post(classifier_server, "/v2/models/classifier/infer", body)
    assert_error(response, 400, *needles)
    assert_clean(response)
    assert len(response.content) < 400, "the client's input is echoed back unbounded"


@pytest.fixture(scope="module")
def zoo_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    root = tmp_path_factory.mktemp("zoo")
    factory = ServerFactory(root)
    servers = {
        "lookup": factory(lookup_model(root / "lookup.onnx"), "lookup", max_batch_size="8"),
        "two_io": factory(two_io_model(root / "two_io.onnx"), "two_io"),
        "unshared_add": factory(unshared_add_model(root / "unshared_add.onnx"), "unshared_add"),
        "nonfinite": factory(nonfinite_model(root / "nonfinite.onnx"), "nonfinite"),
    }
    yield servers
    factory.cleanup()


def zoo_infer(server: ServerProcess, *inputs: tuple[str, str, Any], **extra: Any) -> requests.Response:
    body = {
        "inputs": [
            {"name": n, "datatype": t, "shape": list(np.shape(d)), "data": np.asarray(d).reshape(-1).tolist()}
            for n, t, d in inputs
        ],
        **extra,
    }
    return post(server, f"/v2/models/{server.name}/infer", body)


@pytest.mark.parametrize("index", [VOCAB, -VOCAB - 1, 2**62])
def test_an_out_of_range_token_id_is_400_naming_the_input(zoo_servers: dict[str, ServerProcess], index: int) -> None:
    response = zoo_infer(zoo_servers["lookup"], ("idx", "INT64", [[3], [index]]))
    assert_error(
        response, 400, "input 'idx' was rejected by the model: Gather node: indices element out of data bounds"
    )
    assert_clean(response)
    assert zoo_infer(zoo_servers["lookup"], ("idx", "INT64", [[3]])).json()["outputs"][0]["data"] == [12, 13, 14, 15]


def test_int_tensors_take_only_json_integers(zoo_servers: dict[str, ServerProcess]) -> None:
    lookup = zoo_servers["lookup"]
    assert_error(
        zoo_infer(lookup, ("idx", "INT64", [[1.9]])), 400, "INT64 data must be JSON integers, found a floating"
    )
    assert_error(
        zoo_infer(lookup, ("idx", "INT64", [[True]])), 400, "INT64 data must be JSON integers, found true/false"
    )
    assert_error(
        zoo_infer(lookup, ("idx", "INT64", [["1"]])), 400, 'INT64 data must be JSON integers, found a string ("1")'
    )
    assert_error(zoo_infer(lookup, ("idx", "INT64", [[2**63]])), 400, "a value in 'data' is out of range for INT64")


def test_dimensions_the_model_names_alike_must_agree(zoo_servers: dict[str, ServerProcess]) -> None:
    response = zoo_infer(zoo_servers["two_io"], ("a", "FP32", np.ones((1, 3))), ("b", "FP32", np.ones((1, 4))))
    assert_error(response, 400, "input 'b' has 4 along axis 1 but input 'a' has 3", "the model names both 'seq'")


def test_shapes_the_model_cannot_combine_are_400_naming_the_inputs(zoo_servers: dict[str, ServerProcess]) -> None:
    server = zoo_servers["unshared_add"]
    response = zoo_infer(server, ("a", "FP32", np.ones((1, 3))), ("b", "FP32", np.ones((1, 4))))
    assert_error(response, 400, "inputs 'a', 'b' were rejected by the model: Add node: Attempting to broadcast")
    assert_clean(response)
    ok = zoo_infer(server, ("a", "FP32", np.ones((1, 3))), ("b", "FP32", np.ones((1, 1))))
    assert ok.json()["outputs"][0]["data"] == [2, 2, 2]
    assert server.metric("modelfleet_requests_total", outcome="error") == 0


def test_nan_and_infinities_are_written_as_triton_writes_them(zoo_servers: dict[str, ServerProcess]) -> None:
    server = zoo_servers["nonfinite"]
    x = [[0.0, -1.0, 1.0, 4.0]]
    with np.errstate(divide="ignore", invalid="ignore"):
        want_log = np.log(np.array(x, np.float32))  # [-inf, nan, 0, ln 4]
    response = zoo_infer(server, ("x", "FP32", x))
    assert response.status_code == 200, response.text
    assert b'"data":[-Infinity,NaN,0.0,' in response.content
    assert b'"data":[Infinity,-1.0,1.0,0.25]' in response.content
    assert b"null" not in response.content
    log = json.loads(response.content)["outputs"][0]["data"]  # Python's json reads the tokens too
    np.testing.assert_array_equal(np.array(log, np.float32), want_log.reshape(-1))
    # Triton's client reads those tokens back, in JSON and in binary.
    client = httpclient.InferenceServerClient(url=server.host)
    for binary in (False, True):
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.array(x, np.float32), binary_data=binary)
        wanted = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("log", "inverse")]
        result = client.infer("nonfinite", [inp], outputs=wanted)
        np.testing.assert_array_equal(result.as_numpy("log"), want_log)
        np.testing.assert_array_equal(result.as_numpy("inverse"), [[np.inf, -1, 1, 0.25]])
