"""Overload answered honestly: a full queue rejects at once; an expired request is rejected, never run late.

A very long max queue delay holds requests in the queue for as long as the test needs, so nothing here
depends on how fast the machine is: the timers used are hang guards or deadlines the test sets itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.modelzoo import FEATURES, classifier_reference
from tests.runtime.conftest import ServerFactory, ServerProcess

HOLD: dict[str, Any] = {"max_batch_size": "64", "max_queue_delay_microseconds": "600000000"}  # 10 minutes


def infer_request(x: np.ndarray, **params: object) -> dict[str, object]:
    body: dict[str, object] = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    if params:
        body["parameters"] = params
    return body


def post_infer(server: ServerProcess, body: dict[str, object]) -> requests.Response:
    return requests.post(f"{server.url}/v2/models/classifier/infer", json=body, timeout=300)


@pytest.mark.timeout(300)
def test_a_full_queue_rejects_at_once_and_queued_requests_still_finish(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(
        models["classifier"], "classifier", max_queue_size="4", inline_compute_microseconds="0", **HOLD
    )
    xs = [np.full((1, FEATURES), i, np.float32) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(post_infer, server, infer_request(x)) for x in xs]
        server.wait_metric("modelfleet_queue_depth", 4)

        rejected = post_infer(server, infer_request(np.zeros((1, FEATURES), np.float32)))
        assert rejected.status_code == 503
        assert "queue full" in rejected.json()["error"]
        assert server.metric("modelfleet_requests_total", outcome="rejected_queue_full") == 1
        assert not any(f.done() for f in held)

        # SIGTERM drains: the queued requests are dispatched at once and answered, then the server exits 0.
        assert server.terminate() == 0
        for x, future in zip(xs, held, strict=True):
            response = future.result(timeout=120)
            assert response.status_code == 200, response.text
            got = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(1, -1)
            np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    counts = server.final_counts()
    assert (counts["success"], counts["rejected_queue_full"], counts["inflight"]) == (4, 1, 0)


@pytest.mark.timeout(300)
def test_an_expired_request_is_rejected_and_never_computed(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(models["classifier"], "classifier", **HOLD)
    client = httpclient.InferenceServerClient(url=server.host, network_timeout=300)
    inp = httpclient.InferInput("input", [1, FEATURES], "FP32")
    inp.set_data_from_numpy(np.ones((1, FEATURES), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("classifier", [inp], timeout=200_000)  # microseconds, as Triton defines it
    assert info.value.status() == "503"
    assert "timed out after 200000 us in the queue; it was not computed" in info.value.message()
    assert server.metric("modelfleet_requests_total", outcome="timeout") == 1
    assert server.metric("modelfleet_batch_size_count") == 0
    assert server.metric("modelfleet_queue_depth") == 0


@pytest.mark.timeout(300)
def test_the_default_timeout_applies_unless_a_request_overrides_it(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(models["classifier"], "classifier", default_timeout_microseconds="100000", **HOLD)
    x = np.ones((1, FEATURES), np.float32)
    response = post_infer(server, infer_request(x))
    assert response.status_code == 503
    assert "timed out after 100000 us" in response.json()["error"]

    # timeout 0 means "no timeout": held by the long delay until SIGTERM flushes the queue.
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post_infer, server, infer_request(x, timeout=0))
        server.wait_metric("modelfleet_queue_depth", 1)
        assert server.terminate() == 0
        assert future.result(timeout=120).status_code == 200
    assert server.final_counts() | {"success": 1, "timeout": 1, "inflight": 0} == server.final_counts()


@pytest.mark.timeout(300)
def test_requests_within_their_timeout_succeed(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["classifier"], "classifier", max_queue_delay_microseconds="0")
    x = np.random.default_rng(0).normal(size=(2, FEATURES)).astype(np.float32)
    for _ in range(5):
        response = post_infer(server, infer_request(x, timeout=120_000_000))
        assert response.status_code == 200, response.text
    assert server.metric("modelfleet_requests_total", outcome="success") == 5
