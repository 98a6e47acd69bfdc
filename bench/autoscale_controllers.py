"""The three controllers the simulator compares: ours, an exact HPA, and Knative's KPA.

- `Ours` calls the real `modelfleet_operator.autoscaler.algorithm.decide` every 15 s with what the
  operator would scrape (per-pod QPS over the window, a bucketed p99).
- `Hpa` is an independent transcription of the Kubernetes HPA (v1.33 `replica_calculator.go`
  `calcPlainMetricReplicas` and `horizontal.go` `normalizeDesiredReplicasWithBehaviors`) for one Pods
  metric with an AverageValue target (QPS per pod), default behavior, 15 s sync, 10 % tolerance.
- `Oracle` is not a controller anyone can run: it reads the trace ahead and orders pods one start-up time
  before the load needs them, sized for the utilization at which p99 is 90 % of the SLO. It marks what
  perfect foresight would cost.
- `Kpa` transcribes Knative Serving's `pkg/autoscaler/scaling/autoscaler.go` `Scale`: stable window 60 s,
  panic window 6 s (10 %), panic threshold 200 %, target utilization 70 %, max scale-up rate 1000, max
  scale-down rate 2, scale-down delay 0, a 2 s tick, RPS as the metric (so targets share HPA's units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.autoscale_engine import View, ceil_div
from modelfleet_operator.autoscaler.algorithm import (
    AutoscalerConfig,
    AutoscalerState,
    LatencyStep,
    Observation,
    PodObservation,
    decide,
)

MIN_REPLICAS = 1
MAX_REPLICAS = 400


@dataclass
class Ours:
    """modelfleet's autoscaler, through the real algorithm module."""

    target: float
    target_p99_ms: float | None
    name: str = "ours"
    interval: int = 15
    latency_step: LatencyStep = LatencyStep.BOUNDED
    # Experiment only (no operator can see this): per-pod QPS is at least the offered rate of the last
    # `recent_seconds`, i.e. an exact instantaneous demand signal. It bounds from above what a queue-depth
    # gauge read at the scrape could add at the same sync period.
    recent_seconds: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    state: AutoscalerState = field(default_factory=AutoscalerState)

    def __post_init__(self) -> None:
        self.config = AutoscalerConfig.model_validate(
            {
                "minReplicas": MIN_REPLICAS,
                "maxReplicas": MAX_REPLICAS,
                "targetQPSPerReplica": self.target,
                "targetP99LatencyMilliseconds": self.target_p99_ms,
                "latencyStep": self.latency_step,
                **self.extra,
            }
        )

    def initial_replicas(self, rate: float) -> int:
        return ceil_div(rate, self.target)

    def decide(self, view: View) -> int:
        old, new, unready = view.pods(self.interval)
        qps = view.per_pod_qps(self.interval)
        if self.recent_seconds:
            qps = max(qps, view.per_pod_qps(self.recent_seconds))
        pods = (
            [PodObservation(f"r{i}", True, qps) for i in range(old)]
            + [PodObservation(f"n{i}", True, None) for i in range(new)]
            + [PodObservation(f"u{i}", False, None) for i in range(unready)]
        )
        p99, count = view.p99(self.interval)
        observation = Observation(
            now=float(view.t),
            current_replicas=view.spec_replicas,
            pods=tuple(pods),
            p99_seconds=p99,
            latency_count=count,
            latency_available=old > 0,
            # The operator can measure this (pod creation to Ready); the simulator knows it.
            startup_seconds=view.sim.startup_s,
        )
        decision = decide(self.config, observation, self.state)
        self.state = decision.state
        return decision.desired_replicas


@dataclass
class Hpa:
    """The Kubernetes HPA, default behavior, one Pods metric (QPS per pod, AverageValue target)."""

    target: float
    name: str = "hpa"
    interval: int = 15
    tolerance: float = 0.1
    up_window: int = 0
    down_window: int = 300
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    def initial_replicas(self, rate: float) -> int:
        return ceil_div(rate, self.target)

    def _replicas_for_metric(self, current: int, values: list[float], missing: int, unready: int) -> int | None:
        # calcPlainMetricReplicas (replica_calculator.go)
        if not values:
            return None
        target = self.target
        ratio = sum(values) / (target * len(values))
        scale_up_with_unready = unready > 0 and ratio > 1.0
        if not scale_up_with_unready and missing == 0:
            if abs(1.0 - ratio) <= self.tolerance:
                return current
            return math.ceil(ratio * len(values))
        metrics = list(values)
        if missing:
            metrics += [target if ratio < 1.0 else 0.0] * missing
        if scale_up_with_unready:
            metrics += [0.0] * unready
        new_ratio = sum(metrics) / (target * len(metrics))
        if abs(1.0 - new_ratio) <= self.tolerance or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
            return current
        new_replicas = math.ceil(new_ratio * len(metrics))
        if (new_ratio < 1.0 and new_replicas > current) or (new_ratio > 1.0 and new_replicas < current):
            return current
        return new_replicas

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        up_cut, down_cut = now - self.up_window, now - self.down_window
        up_rec = down_rec = desired
        for ts, rec in self.recommendations:
            if ts > up_cut:
                up_rec = min(rec, up_rec)
            if ts > down_cut:
                down_rec = max(rec, down_rec)
        result = max(current, up_rec)
        result = min(result, down_rec)
        keep = now - max(self.up_window, self.down_window)
        self.recommendations = [r for r in self.recommendations if r[0] > keep] + [(now, desired)]
        return result

    def _changes(self, events: list[tuple[float, int]], now: float, period: int) -> int:
        return sum(v for ts, v in events if ts > now - period)

    def _rate(self, now: float, current: int, desired: int) -> int:
        # convertDesiredReplicasWithBehaviorRate with the default policies
        if desired > current:
            start = current - self._changes(self.up_events, now, 15) + self._changes(self.down_events, now, 15)
            limit = max(start + 4, math.ceil(start * 2.0))
            limit = max(limit, current)
            return min(desired, MAX_REPLICAS, limit)
        if desired < current:
            start = current - self._changes(self.up_events, now, 15) + self._changes(self.down_events, now, 15)
            limit = min(int(start * 0.0), current)
            return max(desired, MIN_REPLICAS, limit)
        return desired

    def decide(self, view: View) -> int:
        now = float(view.t)
        current = view.spec_replicas
        if not self.recommendations:  # recordInitialRecommendation (horizontal.go)
            self.recommendations = [(now, current)]
        if current > MAX_REPLICAS:
            desired = MAX_REPLICAS
        elif current < MIN_REPLICAS:
            desired = MIN_REPLICAS
        else:
            old, new, unready = view.pods(self.interval)
            qps = view.per_pod_qps(self.interval)
            proposal = self._replicas_for_metric(current, [qps] * old, new, unready)
            if proposal is None:
                return current  # the only metric is invalid: no scaling
            desired = self._rate(now, current, self._stabilize(now, current, proposal))
        if desired > current:
            self.up_events = [e for e in self.up_events if e[0] > now - 15] + [(now, desired - current)]
        elif desired < current:
            self.down_events = [e for e in self.down_events if e[0] > now - 15] + [(now, current - desired)]
        return desired


@dataclass
class Kpa:
    """Knative's KPA in RPS mode; `target` is the per-pod RPS target before the 70 % utilization."""

    target: float
    name: str = "kpa"
    interval: int = 2
    utilization: float = 0.7
    stable_window: int = 60
    panic_window: int = 6
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    panic_time: float | None = None
    max_panic_pods: int = 0

    def initial_replicas(self, rate: float) -> int:
        return ceil_div(rate, self.target * self.utilization)

    def decide(self, view: View) -> int:
        now = float(view.t)
        target_value = self.target * self.utilization
        ready_pods = max(1.0, float(view.ready))
        stable = view.rps_average(self.stable_window)
        panic = view.rps_average(self.panic_window)
        max_scale_up = math.ceil(self.max_scale_up_rate * ready_pods)
        max_scale_down = math.floor(ready_pods / self.max_scale_down_rate)
        dspc = math.ceil(stable / target_value)
        dppc = math.ceil(panic / target_value)
        desired_stable = int(min(max(dspc, max_scale_down), max_scale_up))
        desired_panic = int(min(max(dppc, max_scale_down), max_scale_up))
        over_threshold = dppc / ready_pods >= self.panic_threshold
        if (self.panic_time is None and over_threshold) or over_threshold:
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + self.stable_window < now:
            self.panic_time = None
            self.max_panic_pods = 0
        desired = desired_stable
        if self.panic_time is not None:
            desired = max(desired, desired_panic)
            self.max_panic_pods = max(self.max_panic_pods, desired)
            desired = self.max_panic_pods
        return min(max(desired, MIN_REPLICAS), MAX_REPLICAS)


@dataclass
class Oracle:
    """Clairvoyant: every second, enough pods for the peak load of the next start-up time, at the knee."""

    target: float  # the per-pod load it sizes for (req/s)
    name: str = "oracle"
    interval: int = 1

    def initial_replicas(self, rate: float) -> int:
        return ceil_div(rate, self.target)

    def decide(self, view: View) -> int:
        # Pods ordered now serve from t + start-up; until then the ones already there must cover the load.
        horizon = view.sim.arrivals[view.t : view.t + int(view.sim.startup_s) + 1]
        return min(max(ceil_div(float(horizon.max()), self.target), MIN_REPLICAS), MAX_REPLICAS)
