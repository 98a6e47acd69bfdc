"""Dynamic batching through a real server: concurrent requests share batches, each gets its own rows back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.modelzoo import FEATURES, VOCAB, classifier_reference, lookup_model, two_io_reference
from tests.runtime.conftest import ServerFactory, ServerProcess

CONCURRENT = 64


def batch_histogram(server: ServerProcess) -> tuple[float, float, float]:
    """(batches, items, batches of exactly one item) from modelfleet_batch_size."""
    batches = server.metric("modelfleet_batch_size_count")
    items = server.metric("modelfleet_batch_size_sum")
    singles = server.metric("modelfleet_batch_size_bucket", le="1")
    return batches, items, singles


def send_concurrently(
    client: httpclient.InferenceServerClient,
    model: str,
    requests: list[list[httpclient.InferInput]],
    outputs: list[httpclient.InferRequestedOutput] | None = None,
) -> list[httpclient.InferResult]:
    pending = [client.async_infer(model, inputs, outputs=outputs) for inputs in requests]
    return [p.get_result(timeout=120) for p in pending]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("inline_us", ["0", "1000000"], ids=["executor", "inline"])
def test_concurrent_requests_form_batches_and_get_their_own_rows(
    start_server: ServerFactory, models: dict[str, Path], inline_us: str
) -> None:
    # A long queue delay makes the test independent of timing: a batch leaves when it is full (64 rows)
    # or 2 s after its first request, and either way holds more than one request.
    server = start_server(
        models["classifier"],
        "classifier",
        max_batch_size="64",
        max_queue_delay_microseconds="2000000",
        inline_compute_microseconds=inline_us,
    )
    assert ("inline on the event loop" in server.log()) is (inline_us != "0")
    client = httpclient.InferenceServerClient(url=server.host, concurrency=CONCURRENT, network_timeout=120)
    rng = np.random.default_rng(42)
    rows = [int(n) for n in rng.integers(1, 4, size=CONCURRENT)]  # requests carry batch 1..3
    xs = [rng.normal(size=(n, FEATURES)).astype(np.float32) for n in rows]
    requests = []
    for i, x in enumerate(xs):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=i % 2 == 0)
        requests.append([inp])
    before = batch_histogram(server)
    results = send_concurrently(client, "classifier", requests)

    for x, result in zip(xs, results, strict=True):
        got = result.as_numpy("probabilities")
        assert got.shape == (x.shape[0], 10)
        np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    batches, items, singles = (a - b for a, b in zip(batch_histogram(server), before, strict=True))
    assert items == sum(rows)
    assert batches < CONCURRENT, "no two requests shared a batch"
    assert singles < batches or batches == 1
    assert server.metric("modelfleet_batch_size_bucket", le="+Inf") >= 1
    assert server.metric("modelfleet_requests_total", outcome="success") == CONCURRENT


@pytest.mark.timeout(300)
def test_requests_of_different_sequence_lengths_are_never_mixed(two_io_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(url=two_io_server.host, concurrency=CONCURRENT, network_timeout=120)
    rng = np.random.default_rng(7)
    cases = []
    requests = []
    for i in range(CONCURRENT):
        batch, seq = int(rng.integers(1, 4)), (3, 8, 8, 21)[i % 4]
        a = rng.normal(size=(batch, seq)).astype(np.float32)
        b = rng.normal(size=(batch, seq)).astype(np.float32)
        inputs = [
            httpclient.InferInput("a", [batch, seq], "FP32"),
            httpclient.InferInput("b", [batch, seq], "FP32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        cases.append((a, b))
        requests.append(inputs)
    results = send_concurrently(client, "two_io", requests)
    for (a, b), result in zip(cases, results, strict=True):
        want_sum, want_dot = two_io_reference(a, b)
        np.testing.assert_allclose(result.as_numpy("sum"), want_sum, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("dot"), want_dot, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(300)
def test_io_binding_and_two_instances_give_the_same_results(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(
        models["classifier"],
        "classifier",
        io_binding="on",
        instances="2",
        inline_compute_microseconds="0",
        max_batch_size="8",
        preferred_batch_sizes="4,8",
        max_queue_delay_microseconds="1000",
    )
    client = httpclient.InferenceServerClient(url=server.host, concurrency=16, network_timeout=120)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1, FEATURES)).astype(np.float32) for _ in range(32)]
    requests = []
    for x in xs:
        inp = httpclient.InferInput("input", [1, FEATURES], "FP32")
        inp.set_data_from_numpy(x)
        requests.append([inp])
    results = send_concurrently(client, "classifier", requests)
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(result.as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6)
    assert "io_binding=True" in server.log()


VALID = 20


def lookup_request(index: int) -> list[httpclient.InferInput]:
    inp = httpclient.InferInput("idx", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[index]], dtype=np.int64))
    return [inp]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("inline_us", ["0", "1000000"], ids=["executor", "inline"])
def test_a_bad_value_fails_alone_and_its_batch_mates_get_their_answers(
    start_server: ServerFactory, tmp_path: Path, inline_us: str
) -> None:
    # maxBatchSize 21 and a 10-minute delay: the 21 requests sent together leave as exactly one full batch.
    server = start_server(
        lookup_model(tmp_path / "lookup.onnx"),
        "lookup",
        max_batch_size=str(VALID + 1),
        max_queue_delay_microseconds="600000000",
        inline_compute_microseconds=inline_us,
    )
    client = httpclient.InferenceServerClient(url=server.host, concurrency=VALID + 1, network_timeout=120)
    indices = [i % VOCAB for i in range(VALID)]
    indices.insert(VALID // 2, VOCAB + 89)  # the poisoned one, in the middle of the batch
    pending = [client.async_infer("lookup", lookup_request(i)) for i in indices]

    for index, request in zip(indices, pending, strict=True):
        if index >= VOCAB:
            with pytest.raises(InferenceServerException) as info:
                request.get_result(timeout=120)
            assert info.value.status() == "400"
            assert "input 'idx' was rejected by the model: Gather node: " in info.value.message()
            assert "idx=99 must be within the inclusive range [-10,9]" in info.value.message()
        else:
            row = request.get_result(timeout=120).as_numpy("row")
            np.testing.assert_array_equal(row, [[np.arange(4) + 4 * index]])
    assert f"batch of {VALID + 1} requests ({VALID + 1} items) failed on a request's values" in server.log()
    assert "one by one, 1 failed" in server.log()
    assert server.metric("modelfleet_requests_total", outcome="success") == VALID
    assert server.metric("modelfleet_requests_total", outcome="invalid") == 1
    assert server.metric("modelfleet_requests_total", outcome="error") == 0
    # The retry computed the valid requests one at a time; the failed batch itself is not counted.
    batches, items, singles = batch_histogram(server)
    assert (batches, items, singles) == (VALID, VALID, VALID)


@pytest.mark.timeout(300)
def test_a_batch_of_valid_requests_is_computed_once(start_server: ServerFactory, tmp_path: Path) -> None:
    server = start_server(
        lookup_model(tmp_path / "lookup.onnx"),
        "lookup",
        max_batch_size=str(VALID),
        max_queue_delay_microseconds="600000000",
    )
    client = httpclient.InferenceServerClient(url=server.host, concurrency=VALID, network_timeout=120)
    pending = [client.async_infer("lookup", lookup_request(i % VOCAB)) for i in range(VALID)]
    for i, request in enumerate(pending):
        np.testing.assert_array_equal(request.get_result(timeout=120).as_numpy("row"), [[np.arange(4) + 4 * (i % 10)]])
    assert batch_histogram(server) == (1, VALID, 0)
    assert "one by one" not in server.log()


@pytest.mark.timeout(300)
def test_adaptive_batching_tunes_itself_and_answers_every_request_right(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    server = start_server(models["classifier"], "classifier", max_batch_size="64", batching_adaptive="true")
    assert "adaptive batching: p99 target 100 ms" in server.log()
    client = httpclient.InferenceServerClient(url=server.host, concurrency=CONCURRENT, network_timeout=120)
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(1, FEATURES)).astype(np.float32) for _ in range(200)]
    for x in xs[:50]:  # one at a time: light load
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(
            client.infer("classifier", [inp]).as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6
        )
    # Microsecond batches fit any latency target, and single requests keep up: the whole batch, no delay.
    assert server.metric("modelfleet_batch_limit") == 64
    assert server.metric("modelfleet_queue_delay_target_seconds") == 0
    requests = []
    for x in xs[50:]:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        requests.append([inp])
    results = send_concurrently(client, "classifier", requests)
    for x, result in zip(xs[50:], results, strict=True):
        np.testing.assert_allclose(result.as_numpy("probabilities"), classifier_reference(x), rtol=1e-5, atol=1e-6)
    assert server.metric("modelfleet_batching_changes_total") >= 1
