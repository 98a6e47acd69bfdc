"""Turn two scrapes of the runtime's /metrics into QPS and p99 over the window between them, like PromQL.

QPS is the delta of `modelfleet_requests_total` summed over *every* outcome (success, invalid,
rejected_queue_full, timeout, error, unavailable) divided by the time between scrapes: the autoscaler sizes
for offered load, and requests rejected because the queue was full are exactly the load it failed to
serve. p99 is `histogram_quantile(0.99, ...)` over the bucket deltas of
`modelfleet_request_duration_seconds`, merged across pods (PromQL `sum by (le)`), with PromQL's rules:
linear interpolation inside a bucket, a lower bound of 0 for the first bucket, and the highest finite
bound when the quantile lands in +Inf. A counter or histogram that went down (the pod restarted) is read
as having restarted from zero; a pod without a previous scrape has no rate yet and counts as "missing".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from modelfleet_operator.autoscaler.algorithm import Observation, PodObservation

REQUESTS = "modelfleet_requests"  # the parser strips `_total` from counter family names
REQUEST_DURATION = "modelfleet_request_duration_seconds"
QUEUE_DEPTH = "modelfleet_queue_depth"
INFLIGHT = "modelfleet_inflight_requests"


class MetricsParseError(ValueError):
    """The exposition text could not be parsed, or lacks what the autoscaler needs."""


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: `bounds` ascending and ending in +Inf, `counts[i]` = observations ≤ bound."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0


@dataclass(frozen=True)
class Snapshot:
    """One pod's metrics at one scrape, for one model. `time` is the caller's clock, in seconds."""

    time: float
    requests: Mapping[str, float]
    request_duration: Histogram | None
    queue_depth: float | None = None
    inflight: float | None = None
    created: float | None = None

    @property
    def requests_total(self) -> float:
        return sum(self.requests.values())


def parse_snapshot(text: str, *, model: str, time: float) -> Snapshot:
    """Parse Prometheus text exposition and keep the series labelled `model=<model>`."""
    requests: dict[str, float] = {}
    buckets: dict[float, float] = {}
    duration_sum = 0.0
    queue_depth: float | None = None
    inflight: float | None = None
    created: float | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises bare ValueError/IndexError on garbage
        raise MetricsParseError(f"cannot parse metrics exposition: {exc}") from exc
    for family in families:  # samples match by name, whichever family (or none: no TYPE line) holds them
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            name, value = sample.name, float(sample.value)
            if name == f"{REQUESTS}_total":
                outcome = sample.labels.get("outcome", "")
                requests[outcome] = requests.get(outcome, 0.0) + value
            elif name == f"{REQUESTS}_created":
                # Its own gauge family in the 0.0.4 text format; a changed value means the pod restarted.
                created = value if created is None else min(created, value)
            elif name == f"{REQUEST_DURATION}_bucket":
                le = sample.labels.get("le")
                if le is None:
                    raise MetricsParseError(f"{REQUEST_DURATION}_bucket sample without an 'le' label")
                bound = float(le)
                buckets[bound] = buckets.get(bound, 0.0) + value
            elif name == f"{REQUEST_DURATION}_sum":
                duration_sum += value
            elif name == QUEUE_DEPTH:
                queue_depth = value
            elif name == INFLIGHT:
                inflight = value
    histogram = None
    if buckets:
        bounds = tuple(sorted(buckets))
        if not math.isinf(bounds[-1]):
            raise MetricsParseError(f"{REQUEST_DURATION} has no +Inf bucket")
        histogram = Histogram(bounds=bounds, counts=tuple(buckets[b] for b in bounds), sum=duration_sum)
    return Snapshot(
        time=time,
        requests=requests,
        request_duration=histogram,
        queue_depth=queue_depth,
        inflight=inflight,
        created=created,
    )


def histogram_quantile(q: float, histogram: Histogram) -> float | None:
    """PromQL `histogram_quantile` over a cumulative histogram; None where PromQL returns NaN."""
    if math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if len(histogram.bounds) != len(histogram.counts):
        raise ValueError("histogram bounds and counts differ in length")
    if not histogram.bounds or not math.isinf(histogram.bounds[-1]):
        return None
    # Coalesce equal bounds and force monotonic counts, as PromQL does for scraped (non-atomic) buckets.
    bounds: list[float] = []
    counts: list[float] = []
    for bound, count in sorted(zip(histogram.bounds, histogram.counts, strict=True)):
        if bounds and bounds[-1] == bound:
            counts[-1] += count
        else:
            bounds.append(bound)
            counts.append(count)
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    if len(bounds) < 2:
        return None
    observations = counts[-1]
    if observations == 0:
        return None
    rank = q * observations
    b = next(i for i, c in enumerate(counts) if c >= rank)  # the +Inf bucket holds them all: q <= 1
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0
    count = counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (bounds[b] - start) * (rank / count)


def _reset(previous: Snapshot, current: Snapshot) -> bool:
    if previous.created is not None and current.created is not None and previous.created != current.created:
        return True
    if current.requests_total < previous.requests_total:
        return True
    if previous.request_duration is not None and current.request_duration is not None:
        prev_h, cur_h = previous.request_duration, current.request_duration
        if prev_h.bounds == cur_h.bounds and any(c < p for c, p in zip(cur_h.counts, prev_h.counts, strict=True)):
            return True
    return False


def histogram_delta(previous: Histogram | None, current: Histogram, *, reset: bool = False) -> Histogram:
    """Observations made between two scrapes; after a reset (or a bucket layout change) all of `current`."""
    if reset or previous is None or previous.bounds != current.bounds:
        return current
    return Histogram(
        bounds=current.bounds,
        counts=tuple(c - p for c, p in zip(current.counts, previous.counts, strict=True)),
        sum=current.sum - previous.sum,
    )


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram | None:
    """Sum histograms bucket by bound (PromQL `sum by (le)`); bounds missing from one count as 0 there."""
    totals: dict[float, float] = {}
    total_sum = 0.0
    seen = False
    for h in histograms:
        seen = True
        total_sum += h.sum
        for bound, count in zip(h.bounds, h.counts, strict=True):
            totals[bound] = totals.get(bound, 0.0) + count
    if not seen:
        return None
    bounds = tuple(sorted(totals))
    return Histogram(bounds=bounds, counts=tuple(totals[b] for b in bounds), sum=total_sum)


@dataclass(frozen=True)
class PodWindow:
    """One pod over one window: its offered QPS and request-duration histogram delta (None = missing)."""

    name: str
    qps: float | None
    duration: Histogram | None
    reset: bool = False


def build_pod_window(name: str, previous: Snapshot | None, current: Snapshot | None) -> PodWindow:
    """Rates for one pod between two scrapes. Missing when either scrape is absent or no time passed."""
    if previous is None or current is None:
        return PodWindow(name=name, qps=None, duration=None)
    elapsed = current.time - previous.time
    if elapsed <= 0:
        return PodWindow(name=name, qps=None, duration=None)
    reset = _reset(previous, current)
    requests = current.requests_total if reset else current.requests_total - previous.requests_total
    duration = (
        None
        if current.request_duration is None
        else histogram_delta(previous.request_duration, current.request_duration, reset=reset)
    )
    return PodWindow(name=name, qps=requests / elapsed, duration=duration, reset=reset)


@dataclass(frozen=True)
class PodTarget:
    """A pod the operator wants measured: its name and whether it is Ready (only Ready pods are scraped)."""

    name: str
    ready: bool


def build_observation(
    *,
    now: float,
    current_replicas: int,
    pods: Sequence[PodTarget],
    previous: Mapping[str, Snapshot],
    current: Mapping[str, Snapshot | None],
    quantile: float = 0.99,
) -> tuple[Observation, tuple[PodWindow, ...]]:
    """Combine per-pod scrapes into the algorithm's `Observation` (and the per-pod windows, for logs).

    `previous` holds each pod's last good snapshot; `current` this round's (None: scrape failed). Ready
    pods without both become "missing"; p99 merges the histogram deltas of the pods that have both, and
    is unavailable (not "idle") when no pod has both.
    """
    windows = tuple(build_pod_window(p.name, previous.get(p.name), current.get(p.name)) for p in pods if p.ready)
    by_name = {w.name: w for w in windows}
    pod_observations = tuple(
        PodObservation(name=p.name, ready=p.ready, qps=by_name[p.name].qps if p.ready else None) for p in pods
    )
    merged = merge_histograms(w.duration for w in windows if w.duration is not None)
    p99 = None if merged is None else histogram_quantile(quantile, merged)
    observation = Observation(
        now=now,
        current_replicas=current_replicas,
        pods=pod_observations,
        p99_seconds=p99,
        latency_count=0.0 if merged is None else merged.count,
        # Without a single pod window there is no latency to speak of: missing, not idle.
        latency_available=merged is not None,
    )
    return observation, windows
