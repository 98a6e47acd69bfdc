"""The operator's log lines (JSON and logfmt), kopf's retry lines collapsed, and the Event aggregation keys."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from modelfleet_operator.controller import finished_builds
from modelfleet_operator.k8s import EventCache, event_key
from modelfleet_operator.logs import KopfRetryFilter, StructuredFormatter, choose_format, for_object


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(KopfRetryFilter())
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.handlers.clear()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_json_line_names_the_object_and_carries_its_fields(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(StructuredFormatter("json"))
    for_object(logger, "team-a", "clf").info("Deployment rolled", extra={"child": "clf-sm80", "replicas": 2})
    (line,) = lines(stream)
    fields = json.loads(line)
    assert fields["msg"] == "Deployment rolled" and fields["level"] == "info"
    assert (fields["namespace"], fields["name"], fields["object"], fields["kind"]) == (
        "team-a",
        "clf",
        "team-a/clf",
        "InferenceModel",
    )
    assert (fields["child"], fields["replicas"]) == ("clf-sm80", 2)
    assert fields["logger"] == logger.name and fields["ts"].endswith("Z")


def test_logfmt_quotes_only_what_needs_it(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = capture
    handler.setFormatter(StructuredFormatter("text"))
    for_object(logger, "team-a", "clf").warning("build failed", extra={"reason": "InvalidModel", "retry": 3})
    (line,) = lines(stream)
    assert "level=warning" in line and 'msg="build failed"' in line
    assert "namespace=team-a name=clf object=team-a/clf" in line
    assert "reason=InvalidModel retry=3" in line


def test_a_traceback_stays_inside_one_json_line(capture: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = capture
    handler.setFormatter(StructuredFormatter("json"))
    try:
        raise ValueError("bad value")
    except ValueError:
        for_object(logger, "ns", "m").exception("reconcile failed")
    (line,) = lines(stream)
    fields = json.loads(line)
    assert fields["error"] == "ValueError: bad value"
    assert "Traceback" in fields["stack"] and "raise ValueError" in fields["stack"]


def test_kopf_object_lines_get_the_object_s_fields(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(StructuredFormatter("json"))
    ref = {"namespace": "ns", "name": "clf", "kind": "InferenceModel", "uid": "u", "apiVersion": "v"}
    logger.warning("Handler failed", extra={"k8s_ref": ref, "k8s_skip": False})
    fields = json.loads(lines(stream)[0])
    assert (fields["object"], fields["kind"]) == ("ns/clf", "InferenceModel")
    assert "k8s_ref" not in fields and "k8s_skip" not in fields


def test_kopf_request_retries_keep_the_first_failure_and_the_escalation(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(StructuredFormatter("json"))
    what = "GET https://127.0.0.1:6443/api/v1/pods?watch=true -> ClientConnectorError('refused')"
    for attempt in range(1, 9):
        logger.error(f"Request attempt #{attempt}/9 failed; will retry: {what}")
    logger.error(f"Request attempt #9/9 failed; escalating: {what}")
    logger.error("Request attempt #4/9 failed; TCP closed; will re-authenticate: GET https://127.0.0.1:6443/api")
    logger.error("something else failed")
    kept = [json.loads(line) for line in lines(stream)]
    kept_as = [(f.get("retry"), f["level"]) for f in kept]
    assert kept_as == [(1, "warning"), (9, "warning"), (4, "warning"), (None, "error")]
    assert kept[0]["transient"] is True


def test_the_format_follows_the_flag_then_the_terminal() -> None:
    assert choose_format("json") == "json" and choose_format("text") == "text"
    assert choose_format(None) in {"json", "text"}


def event(**changes: str) -> dict[str, Any]:
    base: dict[str, Any] = {
        "source": {"component": "modelfleet-operator"},
        "involvedObject": {
            "kind": "InferenceModel",
            "namespace": "ns",
            "name": "clf",
            "uid": "uid-1",
            "apiVersion": "modelfleet.io/v1alpha1",
        },
        "type": "Normal",
        "reason": "EngineReady",
        "message": "sm80: engine abc ready",
    }
    for field, value in changes.items():
        if field in {"uid", "name"}:
            base["involvedObject"][field] = value
        else:
            base[field] = value
    return base


def test_the_aggregation_key_is_client_go_s_source_object_type_reason_message() -> None:
    same = event_key(event())
    assert event_key(event()) == same
    for change in ({"message": "other"}, {"reason": "Ready"}, {"type": "Warning"}, {"uid": "uid-2"}, {"name": "x"}):
        assert event_key(event(**change)) != same, change
    # Fields outside the key (timestamps, count) do not matter.
    assert event_key({**event(), "count": 7, "lastTimestamp": "2026-01-01T00:00:00Z"}) == same


def test_the_event_cache_is_a_bounded_lru_with_a_window() -> None:
    now = [1000.0]
    cache = EventCache(size=2, window=600, monotonic=lambda: now[0])
    a, b, c = (event_key(event(message=m)) for m in "abc")
    cache.record(a, name="ev-a", namespace="ns", count=1)
    cache.record(b, name="ev-b", namespace="ns", count=1)
    assert cache.repeat_of(a) is not None  # a is now the most recently used
    cache.record(a, name="ev-a", namespace="ns", count=2)
    cache.record(c, name="ev-c", namespace="ns", count=1)  # evicts b, the least recently used
    assert len(cache) == 2 and cache.repeat_of(b) is None
    seen = cache.repeat_of(a)
    assert seen is not None and (seen.name, seen.count) == ("ev-a", 2)
    now[0] += 601  # past the window: a new Event, not a repeat
    assert cache.repeat_of(a) is None


def test_a_build_counts_once_when_its_engine_reaches_ready_or_failed() -> None:
    def engine(arch: str, build: str, phase: str) -> dict[str, str]:
        return {"architecture": arch, "buildId": build, "phase": phase, "job": f"clf-{arch}-{build}"}

    old = {"engines": [engine("sm80", "b1", "Building"), engine("sm90", "b1", "Ready")]}
    new = {"engines": [engine("sm80", "b1", "Ready"), engine("sm90", "b1", "Ready"), engine("sm75", "b2", "Failed")]}
    assert finished_builds(old, new) == [("sm80", "succeeded", "clf-sm80-b1"), ("sm75", "failed", "clf-sm75-b2")]
    assert finished_builds(new, new) == []
