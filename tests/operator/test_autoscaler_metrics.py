"""Autoscaler metrics: PromQL-exact p99 from bucket deltas, QPS from counters, and scraping real servers."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from modelfleet_operator.autoscaler.metrics import (
    Histogram as Hist,
)
from modelfleet_operator.autoscaler.metrics import (
    MetricsParseError,
    PodTarget,
    Snapshot,
    build_observation,
    build_pod_window,
    histogram_delta,
    histogram_quantile,
    merge_histograms,
    parse_snapshot,
)
from modelfleet_operator.autoscaler.sources import (
    PodEndpoint,
    PodScrapeSource,
    PrometheusError,
    PrometheusSource,
    build_queries,
)

INF = math.inf
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------------------
# histogram_quantile, by hand


def h(*pairs: tuple[float, float]) -> Hist:
    return Hist(bounds=tuple(b for b, _ in pairs), counts=tuple(c for _, c in pairs))


HAND = h((0.01, 10), (0.05, 60), (0.1, 90), (INF, 100))


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.05, 0.005),  # rank 5 in the first bucket: 0 + 0.01 * 5/10
        (0.5, 0.042),  # rank 50 in (0.01, 0.05]: 0.01 + 0.04 * (50-10)/50
        (0.9, 0.1),  # rank 90 lands exactly on the bucket's top
        (0.99, 0.1),  # rank 99 is in +Inf: the highest finite bound
        (0.0, 0.0),
    ],
)
def test_quantile_interpolates_like_promql(q: float, expected: float) -> None:
    assert histogram_quantile(q, HAND) == pytest.approx(expected)


def test_quantile_edge_cases_follow_promql() -> None:
    assert histogram_quantile(0.99, h((0.1, 0), (INF, 0))) is None  # no observations: NaN
    assert histogram_quantile(0.99, h((0.1, 5), (1.0, 5))) is None  # no +Inf bucket: NaN
    assert histogram_quantile(0.99, h((INF, 5))) is None  # fewer than two buckets
    assert histogram_quantile(1.5, HAND) == INF
    assert histogram_quantile(-0.1, HAND) == -INF
    assert histogram_quantile(math.nan, HAND) is None
    # Non-monotonic counts (a scrape racing observations) are forced monotonic, as PromQL does.
    # (10, 8, 20) reads as (10, 10, 20): rank 10 is the top of the first bucket.
    assert histogram_quantile(0.5, h((0.01, 10), (0.05, 8), (INF, 20))) == pytest.approx(0.01)
    # A non-positive lowest bound is returned as is when the quantile falls in it.
    assert histogram_quantile(0.1, h((-1.0, 5), (0.0, 10), (INF, 10))) == -1.0


def test_deltas_merge_across_pods_before_the_quantile() -> None:
    before = h((0.01, 100), (0.1, 100), (INF, 100))
    after = h((0.01, 190), (0.1, 200), (INF, 200))  # this window: 90 fast, 10 slow (0.01..0.1]
    other = h((0.01, 0), (0.1, 0), (INF, 100))  # another pod: 100 beyond 0.1 s
    merged = merge_histograms([histogram_delta(before, after), other])
    assert merged is not None
    assert merged.counts == (90, 100, 200)
    assert histogram_quantile(0.5, merged) == pytest.approx(0.1)
    assert histogram_quantile(0.45, merged) == pytest.approx(0.01)  # rank 90: top of the first bucket


def test_a_reset_counts_the_whole_current_histogram() -> None:
    before = h((0.01, 100), (INF, 150))
    after = h((0.01, 3), (INF, 4))
    assert histogram_delta(before, after, reset=True) == after


# ---------------------------------------------------------------------------------------------------------
# Parsing real prometheus-client exposition


@dataclass
class FakeRuntimeMetrics:
    """The runtime's metric names and labels, in a registry of their own (what a serving pod exposes)."""

    model: str = "minilm"
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter("modelfleet_requests", "requests", ["model", "outcome"], registry=self.registry)
        self.duration = Histogram(
            "modelfleet_request_duration_seconds",
            "latency",
            ["model"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.depth = Gauge("modelfleet_queue_depth", "queue", ["model"], registry=self.registry)
        self.inflight = Gauge("modelfleet_inflight_requests", "inflight", ["model"], registry=self.registry)

    def serve(self, outcome: str, seconds: float | None, n: int = 1, model: str | None = None) -> None:
        for _ in range(n):
            self.requests.labels(model or self.model, outcome).inc()
            if seconds is not None:
                self.duration.labels(model or self.model).observe(seconds)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_parse_keeps_one_model_and_sums_every_outcome() -> None:
    m = FakeRuntimeMetrics()
    m.serve("success", 0.003, n=7)
    m.serve("rejected_queue_full", None, n=2)
    m.serve("timeout", 0.2)
    m.serve("success", 0.001, n=50, model="other-model")
    m.depth.labels("minilm").set(4)
    snap = parse_snapshot(m.text(), model="minilm", time=10.0)
    assert snap.requests == {"success": 7.0, "rejected_queue_full": 2.0, "timeout": 1.0}
    assert snap.requests_total == 10.0
    assert snap.request_duration is not None
    assert snap.request_duration.bounds == (*BUCKETS, INF)
    assert snap.request_duration.count == 8.0
    assert snap.request_duration.counts[0] == 7.0  # 0.003 s <= 0.005
    assert snap.queue_depth == 4.0
    assert snap.created is not None


def test_parse_rejects_garbage_with_a_clear_error() -> None:
    with pytest.raises(MetricsParseError, match="cannot parse"):
        parse_snapshot('modelfleet_requests_total{model="m" 1\n', model="m", time=0.0)


def test_runtime_metrics_module_speaks_what_the_autoscaler_reads() -> None:
    runtime_metrics = pytest.importorskip("modelfleet_runtime.metrics")
    metrics = runtime_metrics.Metrics("tiny")
    for _ in range(99):
        metrics.request_done("success", 0.004)
    metrics.request_done("rejected_queue_full", None)
    snap = parse_snapshot(metrics.render().decode(), model="tiny", time=0.0)
    assert snap.requests_total == 100.0
    assert snap.request_duration is not None
    assert snap.request_duration.count == 99.0
    p99 = histogram_quantile(0.99, snap.request_duration)
    assert p99 is not None
    assert 0.001 < p99 <= 0.01


def snapshot(time: float, total: float, hist: Hist | None, created: float = 1.0) -> Snapshot:
    return Snapshot(time=time, requests={"success": total}, request_duration=hist, created=created)


def test_pod_window_rates_resets_and_missing_samples() -> None:
    prev = snapshot(0.0, 1000, h((0.01, 900), (INF, 1000)))
    cur = snapshot(15.0, 1300, h((0.01, 1170), (INF, 1300)))
    w = build_pod_window("a", prev, cur)
    assert w.qps == pytest.approx(20.0)
    assert w.duration == h((0.01, 270), (INF, 300))
    restarted = snapshot(15.0, 30, h((0.01, 30), (INF, 30)), created=99.0)
    r = build_pod_window("a", prev, restarted)
    assert r.reset
    assert r.qps == pytest.approx(2.0)  # counted from zero
    assert build_pod_window("new", None, cur).qps is None
    assert build_pod_window("failed", prev, None).qps is None


def test_observation_marks_new_failed_and_unready_pods() -> None:
    prev = {
        "a": snapshot(0.0, 0, h((0.01, 0), (0.1, 0), (INF, 0))),
        "b": snapshot(0.0, 0, h((0.01, 0), (0.1, 0), (INF, 0))),
    }
    cur: dict[str, Snapshot | None] = {
        "a": snapshot(10.0, 1000, h((0.01, 980), (0.1, 1000), (INF, 1000))),
        "b": None,  # the scrape failed
        "c": snapshot(10.0, 50, h((0.01, 50), (0.1, 50), (INF, 50))),  # new pod, no previous sample
    }
    pods = [PodTarget("a", True), PodTarget("b", True), PodTarget("c", True), PodTarget("d", False)]
    obs, windows = build_observation(now=10.0, current_replicas=4, pods=pods, previous=prev, current=cur)
    assert [(p.name, p.ready, p.qps) for p in obs.pods] == [
        ("a", True, 100.0),
        ("b", True, None),
        ("c", True, None),
        ("d", False, None),
    ]
    assert obs.latency_count == 1000
    assert obs.p99_seconds == pytest.approx(0.01 + 0.09 * (990 - 980) / 20)
    assert len(windows) == 3


def test_first_round_has_no_latency_rather_than_an_idle_one() -> None:
    cur: dict[str, Snapshot | None] = {"a": snapshot(10.0, 5, h((0.1, 5), (INF, 5)))}
    obs, _ = build_observation(now=10.0, current_replicas=1, pods=[PodTarget("a", True)], previous={}, current=cur)
    assert not obs.latency_available


# ---------------------------------------------------------------------------------------------------------
# Scraping real HTTP servers on 127.0.0.1


@dataclass
class Pod:
    metrics: FakeRuntimeMetrics
    hits: int = 0


async def start_server(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    port: int = sock.getsockname()[1]
    return runner, port


def metrics_app(pod: Pod) -> web.Application:
    async def handler(_: web.Request) -> web.Response:
        pod.hits += 1
        return web.Response(body=pod.metrics.text().encode(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


def hanging_app(release: asyncio.Event) -> web.Application:
    async def handler(_: web.Request) -> web.Response:
        await release.wait()  # never set during the scrape: only the client's timeout ends it
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


def failing_app() -> web.Application:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


def test_scraper_tolerates_failures_and_computes_rates() -> None:
    async def scenario() -> None:
        runners: list[web.AppRunner] = []
        release = asyncio.Event()
        try:
            a, b, idle = Pod(FakeRuntimeMetrics()), Pod(FakeRuntimeMetrics()), Pod(FakeRuntimeMetrics())
            ports = {}
            for name, app in [
                ("a", metrics_app(a)),
                ("b", metrics_app(b)),
                ("idle", metrics_app(idle)),
                ("hang", hanging_app(release)),
                ("fail", failing_app()),
            ]:
                runner, port = await start_server(app)
                runners.append(runner)
                ports[name] = port
            # A closed port: take one and release it again.
            runner, closed = await start_server(web.Application())
            await runner.cleanup()

            def endpoints() -> list[PodEndpoint]:
                return [
                    PodEndpoint.from_address("a", ready=True, host="127.0.0.1", port=ports["a"]),
                    PodEndpoint.from_address("b", ready=True, host="127.0.0.1", port=ports["b"]),
                    PodEndpoint.from_address("idle", ready=False, host="127.0.0.1", port=ports["idle"]),
                    PodEndpoint.from_address("hang", ready=True, host="127.0.0.1", port=ports["hang"]),
                    PodEndpoint.from_address("fail", ready=True, host="127.0.0.1", port=ports["fail"]),
                    PodEndpoint.from_address("gone", ready=True, host="127.0.0.1", port=closed),
                ]

            async with aiohttp.ClientSession() as session:
                source = PodScrapeSource(timeout_seconds=3.0, concurrency=2, session=session)
                a.metrics.serve("success", 0.003, n=10)
                b.metrics.serve("success", 0.003, n=10)
                first = await source.observe(key="ns/m", model="minilm", pods=endpoints(), current_replicas=6)
                first_a = source.snapshots("ns/m")["a"].time
                assert first.failed == 3
                assert not first.observation.latency_available  # nobody has two samples yet
                errors = " | ".join(first.errors)
                assert "timed out" in errors
                assert "HTTP 500" in errors
                assert "cannot scrape" in errors

                a.metrics.serve("success", 0.003, n=95)
                a.metrics.serve("rejected_queue_full", None, n=5)
                b.metrics.serve("success", 0.2, n=20)
                second = await source.observe(key="ns/m", model="minilm", pods=endpoints(), current_replicas=6)

            assert idle.hits == 0  # not-ready pods are never contacted
            obs = second.observation
            by_name = {p.name: p for p in obs.pods}
            assert [by_name[n].qps for n in ("hang", "fail", "gone")] == [None, None, None]
            assert by_name["idle"].ready is False
            windows = {w.name: w for w in second.windows}
            assert windows["a"].qps is not None
            assert windows["b"].qps is not None
            # Requests per window, independent of how long the scrapes took: qps x elapsed.
            elapsed_a = source.snapshots("ns/m")["a"].time - first_a
            assert windows["a"].qps * elapsed_a == pytest.approx(100.0)
            # p99 over both pods' deltas: 95 fast (<= 5 ms) and 20 at 0.2 s -> rank 113.85 in (0.1, 0.25].
            assert obs.latency_count == 115
            assert obs.p99_seconds == pytest.approx(0.1 + 0.15 * (113.85 - 95) / 20)
        finally:
            release.set()
            for r in runners:
                await r.cleanup()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------------------
# The Prometheus source, against a local HTTP server speaking the /api/v1/query format


def test_prometheus_source_builds_promql_and_reads_vectors() -> None:
    queries = build_queries(model='m"x', namespace="ml")
    assert queries["qps"] == 'sum by (pod) (rate(modelfleet_requests_total{model="m\\"x",namespace="ml"}[1m]))'
    assert queries["p99"].startswith("histogram_quantile(0.99, sum by (le) (rate(modelfleet_request_duration")

    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        query = request.query["query"]
        seen.append(query)
        if query.startswith("sum by (pod)"):
            result = [
                {"metric": {"pod": "p0"}, "value": [1, "120.5"]},
                {"metric": {"pod": "p1"}, "value": [1, "NaN"]},
            ]
        elif query.startswith("histogram_quantile"):
            result = [{"metric": {}, "value": [1, "0.042"]}]
        else:
            result = [{"metric": {}, "value": [1, "7230"]}]
        payload = {"status": "success", "data": {"resultType": "vector", "result": result}}
        return web.Response(text=json.dumps(payload), content_type="application/json")

    async def broken(_: web.Request) -> web.Response:
        payload = {"status": "error", "errorType": "bad_data", "error": "parse error"}
        return web.Response(status=400, text=json.dumps(payload), content_type="application/json")

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/query", api)
        bad = web.Application()
        bad.router.add_get("/api/v1/query", broken)
        runner, port = await start_server(app)
        bad_runner, bad_port = await start_server(bad)
        try:
            async with aiohttp.ClientSession() as session:
                source = PrometheusSource(base_url=f"http://127.0.0.1:{port}", session=session)
                pods = [PodTarget("p0", True), PodTarget("p1", True), PodTarget("p2", False)]
                report = await source.observe(model="m", namespace="ml", pods=pods, current_replicas=3, now=5.0)
                obs = report.observation
                assert [(p.name, p.qps) for p in obs.pods] == [("p0", 120.5), ("p1", None), ("p2", None)]
                assert obs.p99_seconds == pytest.approx(0.042)
                assert obs.latency_count == 7230
                assert report.errors == ()
                failing = PrometheusSource(base_url=f"http://127.0.0.1:{bad_port}", session=session)
                with pytest.raises(PrometheusError, match="parse error"):
                    await failing.query("up")
                report = await failing.observe(model="m", namespace=None, pods=pods, current_replicas=3, now=5.0)
                assert not report.observation.latency_available
                assert all(p.qps is None for p in report.observation.pods)
                assert len(report.errors) == 2
        finally:
            await runner.cleanup()
            await bad_runner.cleanup()

    asyncio.run(scenario())
    assert len(seen) == 3
