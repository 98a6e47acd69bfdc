"""The operator's own Prometheus metrics, named as controller-runtime and client-go name theirs.

Names and labels follow sigs.k8s.io/controller-runtime pkg/internal/controller/metrics (reconcile_*),
pkg/internal/metrics/workqueue.go (workqueue_*, labels name and controller) and pkg/metrics/client_go_adapter.go
(rest_client_*; `code` is the HTTP status or "<error>" when no response came, as client-go's rest.sanitize).
Dashboards and alerts written for Go operators then work here unchanged.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTROLLER = "inferencemodel"
RECONCILE_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    *(1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60),
)
WORKQUEUE_BUCKETS = tuple(10e-9 * 10**i for i in range(12))  # prometheus.ExponentialBuckets(10e-9, 10, 12)
REST_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
BUILD_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200)
RESULTS = ("success", "error", "requeue", "requeue_after")


class ModelConditions(Collector):
    """`modelfleet_models{condition,status}`: how many InferenceModels have each condition in each status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[tuple[str, str], dict[str, str]] = {}

    def set(self, key: tuple[str, str], conditions: Iterable[Mapping[str, Any]] | None) -> None:
        with self._lock:
            if conditions is None:
                self._by_model.pop(key, None)
            else:
                self._by_model[key] = {str(c["type"]): str(c.get("status", "Unknown")) for c in conditions}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            tally = Tally((t, s) for conds in self._by_model.values() for t, s in conds.items())
        family = GaugeMetricFamily(
            "modelfleet_models", "InferenceModels by condition type and status.", labels=["condition", "status"]
        )
        for condition in sorted({t for t, _ in tally}):
            for status in ("True", "False", "Unknown"):
                family.add_metric([condition, status], tally.get((condition, status), 0))
        yield family


class OperatorMetrics:
    """Every series the operator exports besides the autoscaler's, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None, controller: str = CONTROLLER) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.controller = controller
        r, c, q = self.registry, ["controller"], ["name", "controller"]
        self.reconcile_total = Counter(
            "controller_runtime_reconcile", "Total number of reconciliations per controller", [*c, "result"], registry=r
        )
        self.reconcile_errors = Counter(
            "controller_runtime_reconcile_errors", "Total number of reconciliation errors per controller", c, registry=r
        )
        self.reconcile_time = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            c,
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.max_workers = Gauge(
            "controller_runtime_max_concurrent_reconciles", "Maximum number of concurrent reconciles per controller", c,
            registry=r,
        )  # fmt: skip
        self.active_workers = Gauge(
            "controller_runtime_active_workers", "Number of currently used workers per controller", c, registry=r
        )
        self.depth = Gauge(
            "workqueue_depth", "Current depth of workqueue by workqueue and priority", [*q, "priority"], registry=r
        )
        self.adds = Counter("workqueue_adds", "Total number of adds handled by workqueue", q, registry=r)
        self.retries = Counter(
            "workqueue_retries", "Total number of items added to the workqueue with a non-zero delay", q, registry=r
        )
        self.queue_duration = Histogram(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            q,
            buckets=WORKQUEUE_BUCKETS,
            registry=r,
        )
        self.work_duration = Histogram(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes.",
            q,
            buckets=WORKQUEUE_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "rest_client_requests",
            "Number of HTTP requests, partitioned by status code, method, and host.",
            ["code", "method", "host"],
            registry=r,
        )
        self.request_duration = Histogram(
            "rest_client_request_duration_seconds",
            "Request latency in seconds. Broken down by verb and host.",
            ["verb", "host"],
            buckets=REST_BUCKETS,
            registry=r,
        )
        self.builds = Counter(
            "modelfleet_builds", "Engine builds finished, by architecture and outcome (succeeded, failed).",
            ["architecture", "outcome"], registry=r,
        )  # fmt: skip
        self.build_duration = Histogram(
            "modelfleet_build_duration_seconds",
            "Time from a build Job's start to its completion, by architecture.",
            ["architecture"],
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.models = ModelConditions()
        r.register(self.models)
        ProcessCollector(registry=r)
        self._init_series()

    def _init_series(self) -> None:
        """Series that exist from the start (at 0), as controller-runtime's initMetrics does."""
        for result in RESULTS:
            self.reconcile_total.labels(self.controller, result)
        self.reconcile_errors.labels(self.controller)
        self.active_workers.labels(self.controller).set(0)
        self.depth.labels(self.controller, self.controller, "").set(0)
        self.adds.labels(self.controller, self.controller)
        self.retries.labels(self.controller, self.controller)

    def workers(self, count: int) -> None:
        self.max_workers.labels(self.controller).set(count)

    def queued(self, depth: int) -> None:
        """An item was added to the queue, which now holds `depth` items."""
        self.adds.labels(self.controller, self.controller).inc()
        self.depth.labels(self.controller, self.controller, "").set(depth)

    def retried(self) -> None:
        self.retries.labels(self.controller, self.controller).inc()

    def dequeued(self, depth: int, waited: float) -> None:
        self.depth.labels(self.controller, self.controller, "").set(depth)
        self.queue_duration.labels(self.controller, self.controller).observe(waited)
        self.active_workers.labels(self.controller).inc()

    def reconciled(self, result: str, seconds: float) -> None:
        """One reconcile ended with `result` (success | error | requeue | requeue_after)."""
        self.active_workers.labels(self.controller).dec()
        self.reconcile_total.labels(self.controller, result).inc()
        if result == "error":
            self.reconcile_errors.labels(self.controller).inc()
        self.reconcile_time.labels(self.controller).observe(seconds)
        self.work_duration.labels(self.controller, self.controller).observe(seconds)

    def request(self, *, code: str, method: str, host: str, seconds: float) -> None:
        self.requests.labels(code, method.upper(), host).inc()
        self.request_duration.labels(method.upper(), host).observe(seconds)

    def build_finished(self, architecture: str, outcome: str, seconds: float | None) -> None:
        self.builds.labels(architecture, outcome).inc()
        if seconds is not None and seconds >= 0:
            self.build_duration.labels(architecture).observe(seconds)


class Stopwatch:
    """Monotonic seconds since it was made."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.start


def serve(port: int, *registries: CollectorRegistry) -> Any:
    """One /metrics endpoint for several registries (the operator's and the autoscaler's); returns the server
    (port 0: an ephemeral port, `server.server_port`)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: controller-runtime has none either
    combined = CollectorRegistry(auto_describe=False)
    for registry in registries:
        combined.register(_Forward(registry))
    server, _ = start_http_server(port, registry=combined)
    return server


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
