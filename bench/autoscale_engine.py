"""The autoscaler simulator's engine: a fleet of pods that start after a delay, fed one second at a time.

Time advances in 1 s steps with per-second Poisson arrival counts (the issue allows this coarsening); the
events that matter to autoscaling (controller syncs, pods becoming ready, scale-downs) fall on these
ticks. Controllers see only what a real one could: per-pod QPS of pods that were ready for the whole
metrics window (pods that became ready since the last scrape are "missing"), not-ready pods, a p99 from a
bucketed request-duration histogram, and per-second request totals (for the KPA).
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bench.autoscale_model import DURATION_BUCKETS, ServiceModel, latency_cdf, latency_params
from modelfleet_operator.autoscaler.metrics import Histogram, histogram_quantile

BOUNDS = np.array(DURATION_BUCKETS[:-1])


class Controller(Protocol):
    name: str
    target: float
    interval: int

    def initial_replicas(self, rate: float) -> int: ...

    def decide(self, view: View) -> int: ...


@dataclass
class Fleet:
    """Pods by the time they become ready; kept sorted, so scale-down removes starting pods first and
    then the most recently ready, as a ReplicaSet does."""

    startup_s: float
    ready_times: list[float] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ready_times)

    def scale_to(self, n: int, now: float) -> None:
        if n > self.size:
            self.ready_times.extend([now + self.startup_s] * (n - self.size))
        else:
            del self.ready_times[n:]

    def ready(self, now: float) -> int:
        return bisect.bisect_right(self.ready_times, now)


@dataclass
class View:
    """What a controller may look at, at the start of second `t` (data up to `t - 1`)."""

    sim: Simulation
    t: int

    @property
    def spec_replicas(self) -> int:
        return self.sim.fleet.size

    @property
    def ready(self) -> int:
        return self.sim.fleet.ready(self.t)

    def pods(self, window: int) -> tuple[int, int, int]:
        """(ready for the whole window, ready but newer than the window, not ready)."""
        fleet = self.sim.fleet
        old = bisect.bisect_right(fleet.ready_times, self.t - window)
        ready = fleet.ready(self.t)
        return old, ready - old, fleet.size - ready

    def per_pod_qps(self, window: int) -> float:
        """Offered QPS of one pod that was ready for the whole window (even load balancing)."""
        lo = max(0, self.t - window)
        if self.t <= lo:
            return 0.0
        sl = slice(lo, self.t)
        a = self.sim.arrivals[sl]
        r = self.sim.ready_hist[sl]
        share = np.divide(a, r, out=np.zeros_like(a), where=r > 0)
        return float(share.sum() / (self.t - lo))

    def offered_qps(self, window: int) -> float:
        lo = max(0, self.t - window)
        return float(self.sim.arrivals[lo : self.t].sum() / max(1, self.t - lo))

    def rps_average(self, window: int) -> float:
        lo = max(0, self.t - window)
        if self.t <= lo:
            return 0.0
        return float(self.sim.arrivals[lo : self.t].mean())

    def p99(self, window: int) -> tuple[float | None, float]:
        """p99 (s) from a bucketed histogram of the window's served requests, and their count."""
        lo = max(0, self.t - window)
        sl = slice(lo, self.t)
        weights = self.sim.arrivals[sl] - self.sim.dropped[sl]
        total = float(weights.sum())
        if total <= 0:
            return None, 0.0
        params = latency_params(
            self.sim.model,
            arrivals=self.sim.arrivals[sl],
            ready=self.sim.ready_hist[sl],
            backlog=self.sim.backlog_hist[sl],
        )
        cdf = latency_cdf(params, BOUNDS)
        counts = (*(float(c) for c in (weights[:, None] * cdf).sum(axis=0)), total)
        return histogram_quantile(0.99, Histogram(bounds=DURATION_BUCKETS, counts=counts)), total


@dataclass
class RunResult:
    controller: str
    target: float
    slo_attainment: float
    minute_attainment: float
    dropped: int
    replica_seconds: float
    scaling_actions: int
    flaps: int
    replicas: np.ndarray
    ready: np.ndarray
    within: np.ndarray


@dataclass
class Simulation:
    model: ServiceModel
    arrivals: np.ndarray
    startup_s: float
    fleet: Fleet
    ready_hist: np.ndarray
    backlog_hist: np.ndarray
    dropped: np.ndarray


def simulate(
    arrivals: np.ndarray,
    controller: Controller,
    *,
    model: ServiceModel,
    startup_s: float,
    slo_s: float,
    flap_window_s: float = 300.0,
    phase: int = 0,
) -> RunResult:
    """Run one controller over one trace and score it; it syncs at `t % interval == phase % interval`."""
    n = arrivals.size
    sim = Simulation(
        model=model,
        arrivals=arrivals,
        startup_s=startup_s,
        fleet=Fleet(startup_s=startup_s),
        ready_hist=np.zeros(n),
        backlog_hist=np.zeros(n),
        dropped=np.zeros(n),
    )
    initial = controller.initial_replicas(float(arrivals[:60].mean()))
    sim.fleet.ready_times = [-1e9] * initial
    pods_hist = np.zeros(n)
    backlog = 0.0
    actions: list[tuple[int, int]] = []
    interval = controller.interval
    mu = model.capacity_qps
    for t in range(n):
        if t > 0 and t % interval == phase % interval:
            desired = controller.decide(View(sim, t))
            size = sim.fleet.size
            if desired != size:
                actions.append((t, 1 if desired > size else -1))
                sim.fleet.scale_to(desired, t)
        ready = sim.fleet.ready(t)
        a = arrivals[t]
        capacity = ready * mu
        work = backlog + a
        served = min(work, capacity)
        left = work - served
        drop = max(0.0, left - ready * model.queue_limit)
        left -= drop
        sim.ready_hist[t] = ready
        sim.backlog_hist[t] = 0.5 * (backlog + left)
        sim.dropped[t] = drop
        pods_hist[t] = sim.fleet.size
        backlog = left

    params = latency_params(model, arrivals=arrivals, ready=sim.ready_hist, backlog=sim.backlog_hist)
    in_slo = latency_cdf(params, np.array([slo_s]))[:, 0]
    within = (arrivals - sim.dropped) * in_slo
    total = float(arrivals.sum())
    minutes = n // 60
    per_min_within = within[: minutes * 60].reshape(minutes, 60).sum(axis=1)
    per_min_total = arrivals[: minutes * 60].reshape(minutes, 60).sum(axis=1)
    good_minutes = np.sum(per_min_within >= 0.99 * per_min_total)
    flaps = sum(1 for (t0, d0), (t1, d1) in itertools.pairwise(actions) if d0 != d1 and t1 - t0 < flap_window_s)
    return RunResult(
        controller=controller.name,
        target=controller.target,
        slo_attainment=100.0 * float(within.sum()) / total if total else 100.0,
        minute_attainment=100.0 * float(good_minutes) / max(1, minutes),
        dropped=round(float(sim.dropped.sum())),
        replica_seconds=float(pods_hist.sum()),
        scaling_actions=len(actions),
        flaps=flaps,
        replicas=pods_hist,
        ready=sim.ready_hist.copy(),
        within=within,
    )


def ceil_div(a: float, b: float) -> int:
    return max(1, math.ceil(a / b))
