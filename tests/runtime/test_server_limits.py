"""HTTP-level limits of a real server: header size and timeouts, connection cap, upgrades, framing, paths, echoes."""

from __future__ import annotations

import http.client
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.modelzoo import FEATURES, classifier_reference
from tests.runtime.conftest import ROOT, ServerFactory, ServerProcess

GUARD_S = 60.0  # hang guard for any one socket operation


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed (EOF or reset); a hang guard turns a server that never does into False."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        return False
    return True


def send_until_refused(sock: socket.socket, chunk: bytes, times: int) -> bool:
    try:
        for _ in range(times):
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def infer_json(x: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode()


def json_error(body: bytes) -> str:
    message: str = json.loads(body)["error"]
    return message


@pytest.fixture
def limited(start_server: ServerFactory, models: dict[str, Path]) -> ServerProcess:
    return start_server(
        models["classifier"],
        "classifier",
        max_header_bytes="8192",
        header_timeout_seconds="1",
        body_timeout_seconds="1",
        idle_timeout_seconds="1",
    )


@pytest.mark.timeout(300)
def test_a_header_past_the_limit_gets_431_and_the_connection_closes(limited: ServerProcess) -> None:
    sock = connect(limited)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
    assert send_until_refused(sock, b"a" * 65536, 64)  # the server closes while 4 MiB is still to go
    status, headers, body = read_response(sock)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert "exceed the limit of 8192 bytes" in json_error(body)
    assert requests.get(f"{limited.url}/v2/health/live", timeout=GUARD_S).status_code == 200


@pytest.mark.timeout(300)
def test_headers_just_under_the_limit_are_served(limited: ServerProcess) -> None:
    response = requests.get(f"{limited.url}/v2/health/live", headers={"X-Pad": "a" * 7000}, timeout=GUARD_S)
    assert response.status_code == 200


@pytest.mark.timeout(300)
def test_headers_that_never_finish_get_408(limited: ServerProcess) -> None:
    sock = connect(limited)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    status, _, body = read_response(sock)
    assert status == 408
    assert "request headers not received within 1 s" in json_error(body)
    assert closed_by_server(sock)


@pytest.mark.timeout(300)
def test_a_body_that_never_finishes_gets_408(limited: ServerProcess) -> None:
    sock = connect(limited)
    sock.sendall(b'POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inp')
    status, _, body = read_response(sock)
    assert status == 408
    assert "request body not received within 1 s" in json_error(body)
    assert closed_by_server(sock)


@pytest.mark.timeout(300)
def test_idle_connections_are_closed_including_ones_that_never_send(limited: ServerProcess) -> None:
    silent = connect(limited)
    assert closed_by_server(silent)
    kept = connect(limited)
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(kept)[0] == 200
    assert closed_by_server(kept)


@pytest.mark.timeout(300)
def test_past_the_connection_cap_infer_gets_503_but_probes_are_answered(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(models["classifier"], "classifier", max_connections="3")
    assert "connection cap 3" in server.log()
    held = [connect(server) for _ in range(3)]
    for sock in held:  # make sure each is accepted before the next one counts
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    x = np.ones((1, FEATURES), np.float32)
    body = infer_json(x)
    over = connect(server)
    over.sendall(
        b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status, headers, payload = read_response(over)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert "too many open connections" in json_error(payload)
    probe = requests.get(f"{server.url}/v2/health/ready", timeout=GUARD_S)
    assert probe.status_code == 200
    assert probe.headers["connection"] == "close"
    for sock in held:
        sock.close()
    ok = requests.post(f"{server.url}/v2/models/classifier/infer", data=body, timeout=GUARD_S)
    assert ok.status_code == 200, ok.text


@pytest.fixture
def low_soft_nofile() -> Iterator[int]:
    """Servers started meanwhile inherit a soft open-file limit of 1024 (the common default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-file limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(300)
def test_the_soft_open_file_limit_is_raised_to_the_hard_limit(
    start_server: ServerFactory, models: dict[str, Path], low_soft_nofile: int
) -> None:
    server = start_server(models["classifier"], "classifier")
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard != "1024"
    assert f"(open-file limit {soft})" in server.log()


H2C = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_h2c_upgrade_request_is_served_as_http_1_1(classifier_server: ServerProcess, chunked: bool) -> None:
    x = np.random.default_rng(3).normal(size=(2, FEATURES)).astype(np.float32)
    conn = http.client.HTTPConnection("127.0.0.1", classifier_server.port, timeout=GUARD_S)
    body: Any = iter([infer_json(x)]) if chunked else infer_json(x)
    conn.request("POST", "/v2/models/classifier/infer", body=body, headers=H2C, encode_chunked=chunked)
    response = conn.getresponse()
    payload = response.read()
    assert response.status == 200, payload
    assert response.version == 11
    got = np.asarray(json.loads(payload)["outputs"][0]["data"], np.float32).reshape(2, -1)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    # The connection is still plain HTTP/1.1 for the next request.
    conn.request("GET", "/v2/health/live")
    assert conn.getresponse().status == 200


@pytest.mark.timeout(300)
@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"])
def test_malformed_http_gets_a_json_400(classifier_server: ServerProcess, raw: bytes) -> None:
    sock = connect(classifier_server)
    sock.sendall(raw)
    status, headers, body = read_response(sock)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json_error(body).startswith("invalid HTTP request")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["/v2/health%2Flive", "/v2/health%252Flive", "/v2%252Fhealth/live"])
def test_an_encoded_slash_is_not_a_path_separator(classifier_server: ServerProcess, path: str) -> None:
    response = requests.get(classifier_server.url + path, timeout=GUARD_S)
    assert response.status_code == 404
    assert "no route for" in response.json()["error"]


@pytest.mark.timeout(300)
def test_a_percent_encoded_name_is_decoded_once(classifier_server: ServerProcess) -> None:
    assert requests.get(f"{classifier_server.url}/v2/models/classifi%65r/ready", timeout=GUARD_S).status_code == 200
    response = requests.get(f"{classifier_server.url}/v2/models/classifi%2565r/ready", timeout=GUARD_S)
    assert response.status_code == 404
    assert "classifi%65r" in response.json()["error"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "route", ["/v2/models/{}/ready", "/v2/models/{}/infer", "/v2/{}", "/v2/models/classifier/versions/{}"]
)
def test_error_messages_echo_a_bounded_part_of_client_input(classifier_server: ServerProcess, route: str) -> None:
    long_name = "n" * 5000
    url = classifier_server.url + route.format(long_name)
    response = requests.post(url, json={}, timeout=GUARD_S) if "infer" in route else requests.get(url, timeout=GUARD_S)
    assert response.status_code == 404
    message = response.json()["error"]
    assert "n" * 90 in message
    assert len(message) < 300


@pytest.mark.timeout(300)
def test_a_taken_port_is_one_line_and_exit_code_1(models: dict[str, Path]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    command = [sys.executable, "-m", "modelfleet_runtime.cli", "serve", "--model", str(models["classifier"])]
    command += ["--name", "classifier", "--host", "127.0.0.1", "--http-port", str(port)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    taken.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in errors[0]


@pytest.mark.timeout(300)
def test_a_head_past_the_limit_in_one_read_gets_431(limited: ServerProcess) -> None:
    # 12 KiB of headers in one write: the head is complete within one read, which the count of bytes
    # received while a head is unfinished never sees.
    many = b"".join(b"X-h%d: %s\r\n" % (i, b"v" * 600) for i in range(20))
    sock = connect(limited)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    status, headers, body = read_response(sock)
    assert status == 431
    assert headers["connection"] == "close"
    assert "exceed the limit of 8192 bytes" in json_error(body)
    assert closed_by_server(sock)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("count", "status"), [(99, 200), (100, 431)])
def test_more_than_100_headers_get_431(limited: ServerProcess, count: int, status: int) -> None:
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(count))  # plus Host: 100 or 101 headers, ~1 KiB
    sock = connect(limited)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    got, _, body = read_response(sock)
    assert got == status, body
    if status == 431:
        assert json_error(body) == "more than 100 request headers"


@pytest.fixture
def rate_limited(start_server: ServerFactory, models: dict[str, Path]) -> ServerProcess:
    return start_server(
        models["classifier"],
        "classifier",
        min_body_bytes_per_second="200",
        body_rate_grace_seconds="1",
        body_timeout_seconds="600",
    )


@pytest.mark.timeout(300)
def test_a_body_trickling_below_the_minimum_rate_gets_408(rate_limited: ServerProcess) -> None:
    sock = connect(rate_limited)
    sock.sendall(b'POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"in')
    status, _, body = read_response(sock)  # long before the 600 s body timeout
    assert status == 408
    assert "below the minimum of 200 bytes/s" in json_error(body)
    assert closed_by_server(sock)


@pytest.mark.timeout(300)
def test_a_slow_body_above_the_minimum_rate_is_served(rate_limited: ServerProcess) -> None:
    x = np.random.default_rng(4).normal(size=(8, FEATURES)).astype(np.float32)
    body = infer_json(x)
    pieces = [body[i : i + len(body) // 10 + 1] for i in range(0, len(body), len(body) // 10 + 1)]
    sock = connect(rate_limited)
    sock.sendall(b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    for piece in pieces:  # ~2.5 s at well over 200 bytes/s: past the grace period, above the minimum
        time.sleep(0.25)
        sock.sendall(piece)
    status, _, payload = read_response(sock)
    assert status == 200, payload
    got = np.asarray(json.loads(payload)["outputs"][0]["data"], np.float32).reshape(8, -1)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
