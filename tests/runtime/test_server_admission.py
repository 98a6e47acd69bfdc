"""Admission before work: refused before the body is read, decoded off the loop, gone clients never computed."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.modelzoo import FEATURES
from tests.runtime.conftest import ServerFactory, ServerProcess

GUARD_S = 120.0
HOLD: dict[str, Any] = {"max_batch_size": "64", "max_queue_delay_microseconds": "600000000"}  # 10 minutes
ROW = json.dumps({"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.5] * FEATURES}]})


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S)


def send_head(sock: socket.socket, path: str, length: int, *extra: str) -> None:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}", *extra]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def post_row(server: ServerProcess) -> requests.Response:
    return requests.post(f"{server.url}/v2/models/classifier/infer", data=ROW, timeout=GUARD_S)


@pytest.mark.timeout(300)
def test_an_unknown_model_is_refused_before_the_body_is_sent(classifier_server: ServerProcess) -> None:
    sock = connect(classifier_server)
    send_head(sock, "/v2/models/nope/infer", 150_000)  # within max_request_bytes; the body never comes
    status, headers, body = read_response(sock)
    assert status == 404
    assert json.loads(body)["error"] == "unknown model 'nope'"
    assert headers.get("connection") != "close"  # a small unread body is read past; the connection is kept


@pytest.mark.timeout(300)
def test_a_full_queue_is_refused_before_the_body_is_sent(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["classifier"], "classifier", max_queue_size="1", **HOLD)
    held = threading.Thread(target=post_row, args=(server,), daemon=True)
    held.start()
    server.wait_metric("modelfleet_queue_depth", 1)
    sock = connect(server)
    send_head(sock, "/v2/models/classifier/infer", 5_000_000)
    status, headers, body = read_response(sock)
    assert status == 503
    assert "queue full" in json.loads(body)["error"]
    assert headers["connection"] == "close"  # a large body is not received only to be discarded
    assert server.metric("modelfleet_requests_total", outcome="rejected_queue_full") == 1
    assert server.terminate() == 0
    held.join(timeout=GUARD_S)


@pytest.mark.timeout(300)
def test_past_the_body_budget_a_request_gets_503_before_its_body_is_read(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    size = 600_000
    server = start_server(
        models["classifier"], "classifier", max_request_bytes="1000000", max_inflight_body_bytes="1000000"
    )
    uploading = connect(server)
    send_head(uploading, "/v2/models/classifier/infer", size)
    uploading.sendall(b" " * 1000)
    server.wait_metric("modelfleet_inflight_requests", 1)

    refused = connect(server)
    send_head(refused, "/v2/models/classifier/infer", size)
    status, headers, body = read_response(refused)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert "holding 600000 bytes of request bodies (limit 1000000)" in json.loads(body)["error"]
    assert server.metric("modelfleet_requests_total", outcome="rejected_memory") == 1

    uploading.sendall(b" " * (size - 1000))  # whitespace: not an infer request, but read in full
    assert read_response(uploading)[0] == 400
    second = connect(server)
    send_head(second, "/v2/models/classifier/infer", size)
    second.sendall(b" " * size)
    assert read_response(second)[0] == 400  # the budget was given back


def bytes_request(count: int) -> bytes:
    """A JSON infer request with `count` empty strings: few bytes gzipped, much Python work to decode."""
    doc = {"inputs": [{"name": "input", "shape": [count], "datatype": "BYTES", "data": [""] * count}]}
    return gzip.compress(json.dumps(doc).encode(), compresslevel=6)


@pytest.mark.timeout(600)
def test_health_is_answered_while_a_huge_body_decodes(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["classifier"], "classifier")
    body = bytes_request(6_000_000)
    answered: list[tuple[float, int]] = []
    done = threading.Event()

    def probe() -> None:
        session = requests.Session()
        while not done.is_set():
            status = session.get(f"{server.url}/v2/health/ready", timeout=GUARD_S).status_code
            answered.append((time.monotonic(), status))

    sock = connect(server)
    send_head(sock, "/v2/models/classifier/infer", len(body), "Content-Encoding: gzip")
    sock.sendall(body)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    status, _, payload = read_response(sock)
    finished = time.monotonic()
    done.set()
    prober.join(timeout=GUARD_S)
    assert status == 400, payload  # strings for a float model, found once decoded
    # The event loop kept answering while the body inflated and decoded: probes came back one after
    # another before the infer answer. A loop blocked by the decode answers at most one of them before it.
    during = [t for t, code in answered if t < finished and code == 200]
    assert len(during) >= 3, f"{len(during)} health answers while decoding"


@pytest.mark.timeout(300)
def test_a_request_whose_client_went_is_not_computed(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["classifier"], "classifier", preferred_batch_sizes="2,3", **HOLD)
    gone = connect(server)
    send_head(gone, "/v2/models/classifier/infer", len(ROW))
    gone.sendall(ROW.encode())
    server.wait_metric("modelfleet_queue_depth", 1)
    gone.close()
    server.wait_metric("modelfleet_requests_total", 1, outcome="cancelled")

    # Two more requests form a preferred batch of 2 from the live ones; had the first been kept, it would
    # have been batched with the second.
    results: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: results.append(post_row(server))) for _ in range(2)]
    threads[0].start()
    server.wait_metric("modelfleet_inflight_requests", 1)
    threads[1].start()
    for t in threads:
        t.join(timeout=GUARD_S)
    assert [r.status_code for r in results] == [200, 200]
    assert server.metric("modelfleet_batch_size_count") == 1
    assert server.metric("modelfleet_batch_size_sum") == 2
    assert server.terminate() == 0
    counts = server.final_counts()
    assert (counts["success"], counts["cancelled"], counts["inflight"]) == (2, 1, 0)
