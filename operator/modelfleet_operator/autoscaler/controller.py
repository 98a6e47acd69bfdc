"""One autoscaling step per InferenceModel: scrape its serving pods, decide, and explain the decision.

Kubernetes-free, so the closed-loop test drives exactly this against real runtimes; the operator supplies
the pods from its cache and writes the outcome (Deployment replicas, status.autoscaler, an Event).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from modelfleet_operator.autoscaler.algorithm import AutoscalerConfig, AutoscalerState, build_status, decide
from modelfleet_operator.autoscaler.sources import PodEndpoint, SourceReport


class MetricsSource(Protocol):
    async def observe(
        self, *, key: str, model: str, pods: Sequence[PodEndpoint], current_replicas: int
    ) -> SourceReport: ...

    async def close(self) -> None: ...

    def forget(self, key: str) -> None: ...


# status.autoscaler's figures change on every sync under load; unless the decision itself changes, they are
# refreshed at most this often, so a short sync period does not turn into a status write per model per tick.
STATUS_REFRESH_SECONDS = 15.0


@dataclass(frozen=True)
class ServingPod:
    """A serving pod as the operator's cache sees it."""

    name: str
    ready: bool
    host: str | None
    port: int
    startup_seconds: float | None = None  # creation to Ready, when it became Ready


@dataclass(frozen=True)
class Step:
    desired_replicas: int
    status: dict[str, Any]
    event: tuple[str, str, str] | None  # (type, reason, message) when the decision is news
    scrape_errors: tuple[str, ...] = ()


class Autoscaler:
    """Keeps each model's algorithm state in memory (a restart starts it afresh, as the HPA's does)."""

    def __init__(
        self,
        source: MetricsSource,
        *,
        registry: CollectorRegistry | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source, self.wall_clock, self.monotonic = source, wall_clock, monotonic
        self._shown: dict[str, tuple[float, dict[str, Any]]] = {}
        self._states: dict[str, tuple[AutoscalerConfig, AutoscalerState]] = {}
        self._last: dict[str, tuple[str, int]] = {}
        self._last_scale_time: dict[str, str] = {}
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.decisions = Counter(
            "modelfleet_autoscaler_decisions",
            "Autoscaler decisions by outcome.",
            ["namespace", "model", "reason"],
            registry=registry,
        )
        self.desired = Gauge(
            "modelfleet_autoscaler_desired_replicas",
            "Replicas the autoscaler asks for.",
            ["namespace", "model"],
            registry=registry,
        )
        self.scrape_failures = Counter(
            "modelfleet_autoscaler_scrape_failures",
            "Serving pods whose metrics could not be read.",
            ["namespace", "model"],
            registry=registry,
        )

    async def close(self) -> None:
        await self.source.close()

    def forget(self, key: str) -> None:
        self._states.pop(key, None)
        self._last.pop(key, None)
        self._last_scale_time.pop(key, None)
        self._shown.pop(key, None)
        self.source.forget(key)

    async def step(
        self, *, key: str, model: str, config: AutoscalerConfig, pods: Sequence[ServingPod], current_replicas: int
    ) -> Step:
        previous = self._states.get(key)
        # A changed spec.autoscaling starts from a clean slate: old windows were about other targets.
        state = previous[1] if previous is not None and previous[0] == config else AutoscalerState()
        endpoints = [
            PodEndpoint.from_address(
                p.name, ready=p.ready and p.host is not None, host=p.host or "0.0.0.0", port=p.port
            )
            for p in pods
        ]
        report = await self.source.observe(key=key, model=model, pods=endpoints, current_replicas=current_replicas)
        startups = [p.startup_seconds for p in pods if p.startup_seconds is not None]
        observation = dataclasses.replace(
            report.observation, startup_seconds=statistics.median(startups) if startups else None
        )
        decision = decide(config, observation, state)
        self._states[key] = (config, decision.state)

        namespace, _, name = key.partition("/")
        self.decisions.labels(namespace, name, decision.reason).inc()
        self.desired.labels(namespace, name).set(decision.desired_replicas)
        if report.failed:
            self.scrape_failures.labels(namespace, name).inc(report.failed)
        if decision.desired_replicas != current_replicas:
            self._last_scale_time[key] = self.wall_clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        # Unknown figures are left out rather than null: the API server stores no nulls, so a null would
        # differ from the stored status on every tick and cost a write each time.
        status = {
            k: v
            for k, v in build_status(decision, last_scale_time=self._last_scale_time.get(key)).items()
            if v is not None
        }
        news = (decision.reason, decision.desired_replicas)
        event = None
        if decision.desired_replicas != current_replicas or self._last.get(key, (None, None))[0] != decision.reason:
            kind = "Warning" if decision.reason == "MetricsUnavailable" else "Normal"
            event = (kind, decision.reason, decision.message)
        self._last[key] = news
        now, shown = self.monotonic(), self._shown.get(key)
        if (
            event is None
            and shown is not None
            and now - shown[0] < STATUS_REFRESH_SECONDS
            and all(shown[1].get(k) == status.get(k) for k in ("desiredReplicas", "currentReplicas"))
        ):
            status = shown[1]
        else:
            self._shown[key] = (now, status)
        return Step(desired_replicas=decision.desired_replicas, status=status, event=event, scrape_errors=report.errors)
