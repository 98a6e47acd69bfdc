"""The autoscaler in a closed loop with real runtimes: real /metrics, real load, the operator's own Autoscaler."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.loadgen import HttpRequest, run_open_loop
from modelfleet_operator.autoscaler.algorithm import AutoscalerConfig
from modelfleet_operator.autoscaler.controller import STATUS_REFRESH_SECONDS, Autoscaler, ServingPod, Step
from modelfleet_operator.autoscaler.sources import PodScrapeSource
from tests.modelzoo import FEATURES, classifier_model
from tests.runtime.conftest import ServerFactory, ServerProcess

WINDOW_S = 4  # a short scale-down window so the test sees the fall; the algorithm, not the test, enforces it
CONFIG = AutoscalerConfig.model_validate(
    {
        "minReplicas": 2,
        "maxReplicas": 10,
        "targetQPSPerReplica": 10,
        "targetP99LatencyMilliseconds": 5000,  # only QPS drives this test: no dependence on this machine's speed
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": WINDOW_S}},
    }
)
INFER = HttpRequest(
    method="POST",
    path="/v2/models/clf/infer",
    body=json.dumps(
        {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.1] * FEATURES}]}
    ).encode(),
    headers=(("Content-Type", "application/json"),),
)


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    factory = ServerFactory(tmp_path)
    model = classifier_model(tmp_path / "clf.onnx")
    try:
        yield [factory(model, "clf") for _ in range(2)]
    finally:
        factory.cleanup()


def pods(servers: list[ServerProcess], replicas: int) -> list[ServingPod]:
    """The real runtimes, plus (when the autoscaler has asked for more) replicas still starting: not Ready."""
    running = [
        ServingPod(name=f"clf-{i}", ready=True, host="127.0.0.1", port=s.port, startup_seconds=2.0)
        for i, s in enumerate(servers)
    ]
    starting = [ServingPod(name=f"clf-new-{i}", ready=False, host=None, port=0) for i in range(replicas - len(servers))]
    return running + starting


async def step(autoscaler: Autoscaler, servers: list[ServerProcess], replicas: int = 2) -> Step:
    return await autoscaler.step(
        key="ml/clf", model="clf", config=CONFIG, pods=pods(servers, replicas), current_replicas=replicas
    )


async def load(servers: list[ServerProcess], rate: float, seconds: float) -> int:
    results = await asyncio.gather(
        *(
            run_open_loop(
                host="127.0.0.1", port=s.port, requests=[INFER], rate=rate / 2, duration_s=seconds, connections=8
            )
            for s in servers
        )
    )
    return sum(r.ok for r in results)


def test_overload_raises_the_recommendation_and_it_falls_after_the_window(runtimes: list[ServerProcess]) -> None:
    async def scenario() -> None:
        autoscaler = Autoscaler(PodScrapeSource(timeout_seconds=5))
        loop = asyncio.get_running_loop()
        try:
            first = await step(autoscaler, runtimes)  # no earlier snapshot: no rate yet
            assert first.desired_replicas == 2
            served = await load(runtimes, rate=120, seconds=3)  # ~6x the 10/s-per-replica target
            assert served > 0
            up = await step(autoscaler, runtimes)
            assert up.desired_replicas > 2, up.status
            assert up.event is not None and up.event[1] == "ScaledUp"
            assert up.status["qps"] > 2 * CONFIG.target_qps_per_replica  # type: ignore[operator]
            assert "QPS" in up.status["reason"] or "qps" in up.status["reason"]
            peak_at = loop.time()
            # The Deployment follows the decision (its new pods still starting). Idle now: the
            # recommendation must come down, and only once the scale-down window has passed.
            deadline = peak_at + 60  # hang guard
            while loop.time() < deadline:
                await asyncio.sleep(1)
                idle = await step(autoscaler, runtimes, replicas=up.desired_replicas)
                if idle.desired_replicas < up.desired_replicas:
                    assert loop.time() - peak_at >= WINDOW_S
                    assert CONFIG.min_replicas <= idle.desired_replicas
                    assert idle.event is not None and idle.event[1] == "ScaledDown"
                    return
                assert idle.desired_replicas == up.desired_replicas
            raise AssertionError("the recommendation never came down")
        finally:
            await autoscaler.close()

    asyncio.run(scenario())


def test_losing_one_pods_scrape_is_tolerated(runtimes: list[ServerProcess]) -> None:
    async def scenario() -> None:
        autoscaler = Autoscaler(PodScrapeSource(timeout_seconds=2))
        try:
            await step(autoscaler, runtimes)
            await load(runtimes, rate=120, seconds=2)
            runtimes[1].kill()  # its scrape now fails: connection refused
            after = await step(autoscaler, runtimes)
            assert after.scrape_errors, "the failed scrape is reported"
            assert CONFIG.min_replicas <= after.desired_replicas <= CONFIG.max_replicas
            # The surviving pod's load alone is over target: scaling up still happens (missing pods count as
            # idle on the way up, as in the HPA), and scaling down never does on missing data.
            assert after.desired_replicas >= 2
            assert after.status["currentReplicas"] == 2
        finally:
            await autoscaler.close()

    asyncio.run(scenario())


def test_unchanged_decisions_refresh_the_status_only_every_so_often(runtimes: list[ServerProcess]) -> None:
    async def scenario() -> None:
        clock = [0.0]
        autoscaler = Autoscaler(PodScrapeSource(timeout_seconds=5), monotonic=lambda: clock[0])
        try:
            await step(autoscaler, runtimes)
            await load(runtimes, rate=18, seconds=2)  # ~9/s per replica against 10: within tolerance
            shown = await step(autoscaler, runtimes)
            assert shown.desired_replicas == 2 and shown.status["qps"] > 0
            clock[0] += STATUS_REFRESH_SECONDS / 2
            idle = await step(autoscaler, runtimes)  # no load since: new figures, same decision
            assert idle.desired_replicas == 2
            assert idle.status == shown.status  # nothing new for the API server to store
            clock[0] += STATUS_REFRESH_SECONDS
            refreshed = await step(autoscaler, runtimes)
            assert refreshed.status != shown.status
            assert refreshed.status.get("qps", 0.0) < shown.status["qps"]
        finally:
            await autoscaler.close()

    asyncio.run(scenario())
