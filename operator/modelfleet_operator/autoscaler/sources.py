"""Fetch the autoscaler's inputs: scrape each Ready serving pod's /metrics, or ask Prometheus.

No Kubernetes client here: the operator passes the pods (name, readiness, IP:port) it already knows.
`PodScrapeSource` is the default: one concurrency-limited GET per Ready pod with a per-request timeout;
a pod that fails or times out is "missing" for this round (the HPA's rule for pods without metrics), and
the others still count. It keeps each pod's last good snapshot, so rates come from counter deltas.
`PrometheusSource` is the optional alternative, for clusters that already scrape the runtime.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from modelfleet_operator.autoscaler.algorithm import Observation, PodObservation
from modelfleet_operator.autoscaler.metrics import (
    MetricsParseError,
    PodTarget,
    PodWindow,
    Snapshot,
    build_observation,
    parse_snapshot,
)

MAX_METRICS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PodEndpoint:
    """A serving pod: name, readiness, and where its /metrics lives (`http://IP:PORT/metrics`)."""

    name: str
    ready: bool
    url: str

    @classmethod
    def from_address(cls, name: str, *, ready: bool, host: str, port: int) -> PodEndpoint:
        host_part = f"[{host}]" if ":" in host else host  # IPv6 pod IPs
        return cls(name=name, ready=ready, url=f"http://{host_part}:{port}/metrics")


@dataclass(frozen=True)
class ScrapeOutcome:
    """How one pod's scrape went: a snapshot, or the error that made the pod "missing"."""

    pod: str
    snapshot: Snapshot | None
    error: str | None = None


@dataclass(frozen=True)
class SourceReport:
    """The observation plus what the source saw, for logs, Events and the operator's own metrics."""

    observation: Observation
    outcomes: tuple[ScrapeOutcome, ...] = ()
    windows: tuple[PodWindow, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.snapshot is None)


async def scrape_pod(
    session: aiohttp.ClientSession,
    endpoint: PodEndpoint,
    *,
    model: str,
    timeout_seconds: float,
    max_bytes: int = MAX_METRICS_BYTES,
) -> ScrapeOutcome:
    """GET one pod's /metrics and parse it; every failure becomes an outcome, never an exception."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_seconds):
            async with session.get(endpoint.url) as response:
                if response.status != 200:
                    return ScrapeOutcome(endpoint.name, None, f"HTTP {response.status} from {endpoint.url}")
                body = await response.content.read(max_bytes + 1)
                if len(body) > max_bytes:
                    return ScrapeOutcome(endpoint.name, None, f"{endpoint.url} answered over {max_bytes} bytes")
        text = body.decode("utf-8", errors="replace")
        return ScrapeOutcome(endpoint.name, parse_snapshot(text, model=model, time=loop.time()))
    except TimeoutError:
        return ScrapeOutcome(endpoint.name, None, f"timed out after {timeout_seconds:g}s scraping {endpoint.url}")
    except (aiohttp.ClientError, OSError) as exc:
        return ScrapeOutcome(endpoint.name, None, f"cannot scrape {endpoint.url}: {exc!r}")
    except MetricsParseError as exc:
        return ScrapeOutcome(endpoint.name, None, f"bad metrics from {endpoint.url}: {exc}")


async def scrape_pods(
    session: aiohttp.ClientSession,
    endpoints: Sequence[PodEndpoint],
    *,
    model: str,
    timeout_seconds: float = 2.0,
    concurrency: int = 16,
) -> tuple[ScrapeOutcome, ...]:
    """Scrape the Ready pods, at most `concurrency` at a time; not-Ready pods are not contacted."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    semaphore = asyncio.Semaphore(concurrency)

    async def one(endpoint: PodEndpoint) -> ScrapeOutcome:
        async with semaphore:
            return await scrape_pod(session, endpoint, model=model, timeout_seconds=timeout_seconds)

    return tuple(await asyncio.gather(*(one(e) for e in endpoints if e.ready)))


@dataclass(kw_only=True)
class _HttpClient:
    """An aiohttp session given by the caller (kept open) or made on first use (closed by `close`)."""

    session: aiohttp.ClientSession | None = None
    _owns_session: bool = False

    async def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession()
            self._owns_session = True
        return self.session

    async def close(self) -> None:
        if self._owns_session and self.session is not None:
            await self.session.close()


@dataclass
class PodScrapeSource(_HttpClient):
    """The default source. Keep one per operator; `observe` once per InferenceModel per sync period.

    `key` names the InferenceModel (e.g. "namespace/name") so snapshots of different models never mix.
    Pods that disappear are forgotten; a pod whose scrape fails keeps its older snapshot, so its next
    successful scrape yields a rate over the longer interval.
    """

    timeout_seconds: float = 2.0
    concurrency: int = 16
    _previous: dict[str, dict[str, Snapshot]] = field(default_factory=dict)

    async def observe(
        self, *, key: str, model: str, pods: Sequence[PodEndpoint], current_replicas: int
    ) -> SourceReport:
        session = await self._session()
        outcomes = await scrape_pods(
            session, pods, model=model, timeout_seconds=self.timeout_seconds, concurrency=self.concurrency
        )
        now = asyncio.get_running_loop().time()
        previous = self._previous.get(key, {})
        current = {o.pod: o.snapshot for o in outcomes}
        observation, windows = build_observation(
            now=now,
            current_replicas=current_replicas,
            pods=[PodTarget(p.name, p.ready) for p in pods],
            previous=previous,
            current=current,
        )
        listed = {p.name for p in pods}
        kept = {name: snap for name, snap in previous.items() if name in listed}
        kept.update({name: snap for name, snap in current.items() if snap is not None})
        self._previous[key] = kept
        return SourceReport(
            observation=observation,
            outcomes=outcomes,
            windows=windows,
            errors=tuple(o.error for o in outcomes if o.error),
        )

    def snapshots(self, key: str) -> Mapping[str, Snapshot]:
        """The last good snapshot of each pod of one InferenceModel (read-only view, for diagnostics)."""
        return dict(self._previous.get(key, {}))

    def forget(self, key: str) -> None:
        """Drop a deleted InferenceModel's snapshots."""
        self._previous.pop(key, None)


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API failed or answered something unexpected."""


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def build_queries(
    *, model: str, namespace: str | None, window: str = "1m", pod_label: str = "pod", quantile: float = 0.99
) -> dict[str, str]:
    """The PromQL the Prometheus source runs: per-pod offered QPS, merged p99, and the request count."""
    matchers = [f'model="{_label_value(model)}"']
    if namespace is not None:
        matchers.append(f'namespace="{_label_value(namespace)}"')
    selector = "{" + ",".join(matchers) + "}"
    return {
        "qps": f"sum by ({pod_label}) (rate(modelfleet_requests_total{selector}[{window}]))",
        "p99": (
            f"histogram_quantile({quantile}, sum by (le) "
            f"(rate(modelfleet_request_duration_seconds_bucket{selector}[{window}])))"
        ),
        "count": f"sum(increase(modelfleet_request_duration_seconds_count{selector}[{window}]))",
    }


@dataclass
class PrometheusSource(_HttpClient):
    """Optional source: the Prometheus HTTP API (`/api/v1/query`), for clusters that scrape the runtime.

    Pods absent from the per-pod QPS result are "missing", as with direct scraping.
    """

    base_url: str
    timeout_seconds: float = 5.0
    window: str = "1m"
    pod_label: str = "pod"

    async def query(self, promql: str) -> list[tuple[Mapping[str, str], float]]:
        """Run an instant query; returns (labels, value) per series. NaN values are kept as NaN."""
        session = await self._session()
        url = self.base_url.rstrip("/") + "/api/v1/query"
        try:
            async with asyncio.timeout(self.timeout_seconds):
                async with session.get(url, params={"query": promql}) as response:
                    payload = await response.json(content_type=None)
        except TimeoutError as exc:
            raise PrometheusError(f"Prometheus query timed out after {self.timeout_seconds:g}s: {promql}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise PrometheusError(f"Prometheus query failed ({exc!r}): {promql}") from exc
        if not isinstance(payload, dict) or payload.get("status") != "success":
            error = payload.get("error") if isinstance(payload, dict) else payload
            raise PrometheusError(f"Prometheus answered an error ({error}): {promql}")
        data = payload.get("data") or {}
        if data.get("resultType") not in ("vector", "scalar"):
            raise PrometheusError(f"expected an instant vector, got {data.get('resultType')!r}: {promql}")
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        try:
            return [(dict(item.get("metric", {})), float(item["value"][1])) for item in data.get("result", [])]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PrometheusError(f"malformed Prometheus result ({exc!r}): {promql}") from exc

    async def observe(
        self,
        *,
        model: str,
        namespace: str | None,
        pods: Sequence[PodTarget],
        current_replicas: int,
        now: float,
    ) -> SourceReport:
        queries = build_queries(model=model, namespace=namespace, window=self.window, pod_label=self.pod_label)
        errors: list[str] = []
        per_pod: dict[str, float] = {}
        p99: float | None = None
        count = 0.0
        latency_available = True
        try:
            for labels, value in await self.query(queries["qps"]):
                pod = labels.get(self.pod_label)
                if pod is not None and not math.isnan(value):
                    per_pod[pod] = value
        except PrometheusError as exc:
            errors.append(str(exc))
        try:
            counts = await self.query(queries["count"])
            count = sum(v for _, v in counts if not math.isnan(v))
            result = await self.query(queries["p99"])
            values = [v for _, v in result if not math.isnan(v)]
            p99 = values[0] if values else None
        except PrometheusError as exc:
            errors.append(str(exc))
            latency_available = False
        observation = Observation(
            now=now,
            current_replicas=current_replicas,
            pods=tuple(
                PodObservation(name=p.name, ready=p.ready, qps=per_pod.get(p.name) if p.ready else None) for p in pods
            ),
            p99_seconds=p99,
            latency_count=count,
            latency_available=latency_available,
        )
        return SourceReport(observation=observation, errors=tuple(errors))
