"""The response cache through a real server: byte-exact hits that skip the batcher, misses, errors, eviction."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests

from modelfleet_runtime.cache import ENTRY_OVERHEAD
from tests.modelzoo import FEATURES, classifier_model, classifier_reference, lookup_model, two_io_reference
from tests.runtime.conftest import ServerFactory, ServerProcess
from tests.runtime.test_server_lifecycle import write_store

CACHE = "modelfleet_response_cache"
HEADER = "Inference-Header-Content-Length"


def json_body(inputs: dict[str, np.ndarray], **extra: Any) -> bytes:
    tensors = [
        {"name": n, "shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()} for n, a in inputs.items()
    ]
    return orjson.dumps({"inputs": tensors, **extra})


def binary_body(name: str, x: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    header = orjson.dumps({"inputs": [tensor], **extra})
    return header + raw, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def post(server: ServerProcess, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{server.url}/v2/models/{server.name}/infer", data=body, headers=headers or {}, timeout=60)


def counts(server: ServerProcess) -> dict[str, float]:
    """The cache's series and the batcher's batch count, from one scrape."""
    samples = server.metrics()
    model = frozenset({("model", server.name)})
    names = [f"{CACHE}_{s}" for s in ("hits_total", "misses_total", "evictions_total", "bytes", "entries")]
    out = {name.removeprefix(CACHE + "_"): samples[(name, model)] for name in names}
    out["batches"] = samples[("modelfleet_batch_size_count", model)]
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


@pytest.fixture
def cached_classifier(start_server: ServerFactory, models: dict[str, Path]) -> ServerProcess:
    return start_server(models["classifier"], "classifier", max_batch_size="16", response_cache_bytes="1000000")


@pytest.mark.timeout(300)
def test_a_repeated_request_is_a_byte_exact_hit_that_skips_the_batcher(cached_classifier: ServerProcess) -> None:
    server = cached_classifier
    x = np.random.default_rng(1).normal(size=(2, FEATURES)).astype(np.float32)
    start = counts(server)
    first = post(server, json_body({"input": x}))
    assert first.status_code == 200, first.text
    after_miss = counts(server)
    again = post(server, json_body({"input": x}))
    after_hit = counts(server)
    assert again.status_code == 200 and again.content == first.content
    miss, hit = delta(after_miss, start), delta(after_hit, after_miss)
    assert (miss["hits_total"], miss["misses_total"], miss["entries"], miss["batches"]) == (0, 1, 1, 1)
    assert miss["bytes"] == len(first.content) + ENTRY_OVERHEAD
    assert hit == {"hits_total": 1, "misses_total": 0, "evictions_total": 0, "bytes": 0, "entries": 0, "batches": 0}
    got = np.asarray(first.json()["outputs"][0]["data"], np.float32).reshape(2, -1)
    np.testing.assert_allclose(got, classifier_reference(x), rtol=1e-5, atol=1e-6)
    # The same tensor sent as binary data is the same request: a hit, with the id it asked for.
    tagged = post(server, *binary_body("input", x, id="r-9"))
    assert tagged.status_code == 200, tagged.text
    assert tagged.json() == {**first.json(), "id": "r-9"}
    assert delta(counts(server), after_hit)["hits_total"] == 1
    assert server.metric("modelfleet_requests_total", outcome="success") == 3


@pytest.mark.timeout(300)
def test_different_inputs_or_requested_outputs_miss(start_server: ServerFactory, models: dict[str, Path]) -> None:
    server = start_server(models["two_io"], "two_io", response_cache_bytes="1000000")
    rng = np.random.default_rng(3)
    a, b = (rng.normal(size=(1, 5)).astype(np.float32) for _ in range(2))
    changed = a.copy()
    changed[0, 4] += np.float32(0.5)
    variants = {
        "base": json_body({"a": a, "b": b}),
        "one value": json_body({"a": changed, "b": b}),
        "one output": json_body({"a": a, "b": b}, outputs=[{"name": "dot"}]),
        "output order": json_body({"a": a, "b": b}, outputs=[{"name": "dot"}, {"name": "sum"}]),
        "binary output": json_body({"a": a, "b": b}, outputs=[{"name": "dot", "parameters": {"binary_data": True}}]),
    }
    before = counts(server)
    answers = {label: post(server, body) for label, body in variants.items()}
    assert {label: r.status_code for label, r in answers.items()} == dict.fromkeys(variants, 200)
    moved = delta(counts(server), before)
    assert (moved["hits_total"], moved["misses_total"], moved["entries"], moved["batches"]) == (0, 5, 5, 5)
    assert len({r.content for r in answers.values()}) == 5
    total, dot = two_io_reference(changed, b)
    outputs = {o["name"]: o["data"] for o in answers["one value"].json()["outputs"]}
    np.testing.assert_allclose(outputs["sum"], total.ravel(), rtol=1e-6)
    np.testing.assert_allclose(outputs["dot"], dot.ravel(), rtol=1e-5)
    assert [o["name"] for o in answers["output order"].json()["outputs"]] == ["dot", "sum"]
    # Each variant is now stored: sending them all again hits every one, computing nothing.
    again = {label: post(server, body).content for label, body in variants.items()}
    assert again == {label: r.content for label, r in answers.items()}
    assert delta(counts(server), before)["hits_total"] == 5


@pytest.mark.timeout(300)
def test_an_error_response_is_not_cached(start_server: ServerFactory, tmp_path: Path) -> None:
    server = start_server(lookup_model(tmp_path / "lookup.onnx"), "lookup", response_cache_bytes="1000000")
    bad = orjson.dumps({"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [99]}]})
    before = counts(server)
    replies = [post(server, bad) for _ in range(3)]
    assert [r.status_code for r in replies] == [400, 400, 400]
    assert all("rejected by the model" in r.json()["error"] for r in replies)
    moved = delta(counts(server), before)
    assert (moved["hits_total"], moved["misses_total"], moved["entries"], moved["bytes"]) == (0, 3, 0, 0)
    good = orjson.dumps({"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [3]}]})
    assert [post(server, good).status_code for _ in range(2)] == [200, 200]
    assert delta(counts(server), before)["hits_total"] == 1


@pytest.mark.timeout(300)
def test_the_cache_evicts_the_least_recently_used_by_bytes(
    start_server: ServerFactory, models: dict[str, Path]
) -> None:
    limit = 8000
    server = start_server(models["classifier"], "classifier", max_batch_size="16", response_cache_bytes=str(limit))
    rows = [np.full((1, FEATURES), i, np.float32) for i in range(40)]
    assert post(server, json_body({"input": rows[0]})).status_code == 200
    cost = counts(server)["bytes"]  # one entry: its response bytes plus the fixed overhead
    fits = int(limit // cost)
    for row in rows[1:fits]:
        assert post(server, json_body({"input": row})).status_code == 200
    assert counts(server)["entries"] == fits and counts(server)["evictions_total"] == 0
    assert post(server, json_body({"input": rows[0]})).status_code == 200  # a hit: rows[0] is now the newest
    for row in rows[fits : fits + 3]:
        assert post(server, json_body({"input": row})).status_code == 200
    now = counts(server)
    print(f"entry cost {cost:.0f} B, {fits} fit in {limit} B; after 3 more: {now}")
    assert (now["entries"], now["evictions_total"], now["hits_total"]) == (fits, 3, 1)
    assert now["bytes"] <= limit
    before = counts(server)
    post(server, json_body({"input": rows[0]}))  # kept: it was used after rows[1..3]
    post(server, json_body({"input": rows[1]}))  # evicted first
    moved = delta(counts(server), before)
    assert (moved["hits_total"], moved["misses_total"]) == (1, 1)
    # A response above an eighth of the limit is computed and answered, never stored.
    wide = post(server, json_body({"input": np.zeros((16, FEATURES), np.float32)}))
    assert wide.status_code == 200 and len(wide.content) > limit / 8
    assert delta(counts(server), before)["entries"] == 0


@pytest.mark.timeout(300)
def test_a_new_engine_does_not_hit_the_old_ones_entries(
    start_server: ServerFactory, models: dict[str, Path], tmp_path: Path
) -> None:
    x = np.random.default_rng(5).normal(size=(1, FEATURES)).astype(np.float32)
    other = classifier_model(tmp_path / "seed1.onnx", seed=1)
    old = write_store(tmp_path / "store" / "k-old", models["classifier"], batch_max=8)
    new = write_store(tmp_path / "store" / "k-new", other, batch_max=8)
    answers, identities = [], []
    for entry in (old, new):
        server = start_server(entry, "classifier", response_cache_bytes="1000000")
        replies = [post(server, json_body({"input": x})) for _ in range(2)]
        answers.append(replies[0].json()["outputs"][0]["data"])
        moved = counts(server)
        assert (moved["misses_total"], moved["hits_total"], replies[1].content) == (1, 1, replies[0].content)
        manifest = json.loads((entry / "manifest.json").read_text())
        identities.append(f'"key":"{entry.name}","sha256":"{manifest["artifact_sha256"]}"')
        assert identities[-1] in server.log()
        assert server.terminate() == 0
    np.testing.assert_allclose(np.reshape(answers[1], (1, -1)), classifier_reference(x, seed=1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(answers[0], answers[1])
    assert identities[0] != identities[1]
    # A bare .onnx file has no manifest: the cache keys on the sha256 of the file itself.
    plain = start_server(other, "classifier", response_cache_bytes="1000000")
    assert f'"key":null,"sha256":"{hashlib.sha256(other.read_bytes()).hexdigest()}"' in plain.log()


def test_the_cache_is_off_by_default(classifier_server: ServerProcess) -> None:
    assert not any(name.startswith(CACHE) for name, _ in classifier_server.metrics())
