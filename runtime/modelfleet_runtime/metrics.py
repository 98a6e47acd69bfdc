"""Prometheus metrics of one server, in a registry of its own; the autoscaler reads these names.

Durations are histograms in seconds with geometric buckets, ~34% apart, from 0.5 ms to 2.5 s (30 bounds),
so a `histogram_quantile(0.99, ...)` anywhere between 1 ms and 2 s lands in a bucket narrow enough to act on.

The series are kept by a custom prometheus-client collector rather than Counter/Histogram objects: every
update happens on the event loop thread, so plain integer lists do (no lock per observation), and the
hot path of a request costs a bisect and two additions instead of several locked updates.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from modelfleet_runtime.adaptive import Choice
from modelfleet_runtime.backends.base import ExecutionProvider
from modelfleet_runtime.batcher import BatchObserver
from modelfleet_runtime.cache import ResponseCache

# rejected_memory: the in-flight body budget was full; cancelled: the client went before its answer.
OUTCOMES = (
    "success",
    "invalid",
    "rejected_queue_full",
    "rejected_memory",
    "timeout",
    "error",
    "unavailable",
    "cancelled",
)


def build_duration_buckets(low: float = 0.0005, high: float = 2.5, count: int = 30) -> tuple[float, ...]:
    """Geometric bucket bounds from `low` to `high` seconds, rounded to 3 significant digits."""
    ratio = (high / low) ** (1 / (count - 1))
    return tuple(float(f"{low * ratio**i:.3g}") for i in range(count))


DURATION_BUCKETS = build_duration_buckets()
BATCH_BUCKETS: tuple[float, ...] = (
    1,
    2,
    3,
    4,
    6,
    8,
    12,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    1024,
)


class Histogram:
    """Bucket counts (non-cumulative, +Inf last) and a sum; not thread-safe by design (loop thread only)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, documentation: str, model: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=["model"])
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        family.add_metric([model], buckets, sum_value=self.total)
        return family


class Metrics(BatchObserver, Collector):
    """All series carry the `model` label. Served at GET /metrics by `render()`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str) -> None:
        self.model = model
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.grpc_counts = dict.fromkeys(OUTCOMES, 0)  # the part of `counts` that came over gRPC
        self.request = Histogram(DURATION_BUCKETS)
        self.queue = Histogram(DURATION_BUCKETS)
        self.compute = Histogram(DURATION_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self._queue_depth: Callable[[], float] = lambda: 0
        self._inflight: Callable[[], float] = lambda: 0
        self._provider: Callable[[], ExecutionProvider | None] = lambda: None
        self._inline: Callable[[], bool | None] = lambda: None
        self.placements = {"inline": 0, "executor": 0}
        self.tuned_choice: Choice | None = None  # adaptive batching's current choice; None when off
        self.tunings = 0
        self._cache: ResponseCache | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def track(self, *, queue_depth: Callable[[], float], inflight: Callable[[], float]) -> None:
        """Gauges read the live objects at scrape time instead of being updated per request."""
        self._queue_depth = queue_depth
        self._inflight = inflight

    def track_provider(self, provider: Callable[[], ExecutionProvider | None]) -> None:
        """The execution provider, read at scrape time (None until the model is loaded)."""
        self._provider = provider

    def track_placement(self, inline: Callable[[], bool | None]) -> None:
        """Whether batches now compute inline on the event loop, read at scrape time (None before ready)."""
        self._inline = inline

    def track_cache(self, cache: ResponseCache) -> None:
        """The response cache's counters, read at scrape time; no series while the cache is off."""
        self._cache = cache

    def request_done(self, outcome: str, seconds: float | None, protocol: str = "rest") -> None:
        """Count one request; `seconds` is given for requests admitted to the queue."""
        self.counts[outcome] += 1
        if protocol == "grpc":
            self.grpc_counts[outcome] += 1
        if seconds is not None:
            self.request.observe(seconds)

    # BatchObserver
    def queued(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def computed(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.compute.observe(seconds)

    def placed(self, inline: bool) -> None:
        self.placements["inline" if inline else "executor"] += 1

    def tuned(self, choice: Choice) -> None:
        self.tuned_choice = choice
        self.tunings += 1

    # Collector
    def collect(self) -> Iterator[Metric]:
        model = self.model
        requests = CounterMetricFamily(
            "modelfleet_requests",
            "Inference requests by outcome (" + ", ".join(OUTCOMES) + ").",
            labels=["model", "outcome"],
        )
        for outcome in OUTCOMES:
            requests.add_metric([model, outcome], self.counts[outcome])
        yield requests
        grpc = CounterMetricFamily(
            "modelfleet_grpc_requests",
            "Inference requests over gRPC by outcome; each is counted in modelfleet_requests too.",
            labels=["model", "outcome"],
        )
        for outcome in OUTCOMES:
            grpc.add_metric([model, outcome], self.grpc_counts[outcome])
        yield grpc
        yield self.request.family(
            "modelfleet_request_duration_seconds",
            "Time from a request's arrival to its response, for requests admitted to the queue "
            "(outcomes success, timeout, error); rejected and invalid requests are not included.",
            model,
        )
        yield self.queue.family(
            "modelfleet_queue_duration_seconds",
            "Time a request waited in the batching queue before its batch was dispatched.",
            model,
        )
        yield self.compute.family(
            "modelfleet_compute_duration_seconds", "Time the model took to compute one batch.", model
        )
        yield self.batch.family(
            "modelfleet_batch_size",
            "Items (sum of the requests' batch dimensions) in each batch sent to the model.",
            model,
        )
        depth = GaugeMetricFamily("modelfleet_queue_depth", "Requests waiting in the batching queue.", labels=["model"])
        depth.add_metric([model], self._queue_depth())
        yield depth
        inflight = GaugeMetricFamily(
            "modelfleet_inflight_requests",
            "Inference requests being handled (queued or computing).",
            labels=["model"],
        )
        inflight.add_metric([model], self._inflight())
        yield inflight
        provider = self._provider()
        if provider is not None:
            info = GaugeMetricFamily(
                "modelfleet_execution_provider_info",
                "1 for the execution provider the model computes on (provider) and the one asked for first "
                "(requested); CPUExecutionProvider on a GPU architecture is a pod serving on CPU.",
                labels=["model", "provider", "requested"],
            )
            info.add_metric([model, provider.active, provider.requested], 1)
            yield info
        yield from self._placement_families()
        if self.tuned_choice is not None:
            yield from self._tuning_families(self.tuned_choice)
        if self._cache is not None:
            yield from self._cache_families(self._cache)

    def _cache_families(self, cache: ResponseCache) -> Iterator[Metric]:
        model = self.model
        for name, doc, value in (
            ("hits", "Infer requests answered from the response cache.", cache.hits),
            ("misses", "Infer requests looked up in the response cache and not found.", cache.misses),
            ("evictions", "Entries evicted from the response cache to make room (LRU).", cache.evictions),
        ):
            counter = CounterMetricFamily(f"modelfleet_response_cache_{name}", doc, labels=["model"])
            counter.add_metric([model], value)
            yield counter
        for name, doc, value in (
            ("bytes", "Bytes the response cache holds (responses plus a fixed overhead per entry).", cache.bytes),
            ("entries", "Responses the response cache holds.", len(cache)),
        ):
            gauge = GaugeMetricFamily(f"modelfleet_response_cache_{name}", doc, labels=["model"])
            gauge.add_metric([model], value)
            yield gauge

    def _placement_families(self) -> Iterator[Metric]:
        model = self.model
        placed = CounterMetricFamily(
            "modelfleet_batch_placements",
            "Batches dispatched inline on the event loop or to executor threads (placement).",
            labels=["model", "placement"],
        )
        for where, count in self.placements.items():
            placed.add_metric([model, where], count)
        yield placed
        inline = self._inline()
        if inline is not None:
            gauge = GaugeMetricFamily(
                "modelfleet_inline_compute",
                "1 while batches compute inline on the event loop, 0 while they go to executor threads "
                "(revised from measured compute times; see MODELFLEET_INLINE_COMPUTE_MICROSECONDS).",
                labels=["model"],
            )
            gauge.add_metric([model], 1 if inline else 0)
            yield gauge

    def _tuning_families(self, choice: Choice) -> Iterator[Metric]:
        model = self.model
        for name, doc, value in (
            ("modelfleet_batch_limit", "The largest batch adaptive batching now dispatches.", choice.limit),
            (
                "modelfleet_queue_delay_target_seconds",
                "The queue delay adaptive batching now waits, at most, for a batch to fill.",
                choice.delay_s,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model"])
            gauge.add_metric([model], value)
            yield gauge
        changes = CounterMetricFamily(
            "modelfleet_batching_changes",
            "Changes of batch limit or queue delay adaptive batching made.",
            labels=["model"],
        )
        changes.add_metric([model], self.tunings)
        yield changes

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
