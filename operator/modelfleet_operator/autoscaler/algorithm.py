"""Decide how many serving replicas an InferenceModel needs, from QPS and p99, the way the HPA would.

Everything here is pure: the caller passes the observation, the time and the previous state, and gets back
a `Decision` holding the new state and an explanation for `status.autoscaler` and the Event. The arithmetic
follows the Kubernetes HPA (pkg/controller/podautoscaler: `replica_calculator.go` and `horizontal.go`):

1. per signal, `desired = ceil(ready * observed / target)`, skipped inside the tolerance (±10 %);
   signals: QPS per replica against `targetQPSPerReplica` (a per-pod metric, with the HPA's handling of
   missing and not-ready pods) and p99 against `targetP99LatencyMilliseconds` (an aggregate metric, like
   an HPA Object metric);
2. the largest proposal wins; when a signal is unavailable the controller may scale up on the others but
   never down (HPA `computeReplicasForMetrics`);
3. stabilization windows (`stabilizeRecommendationWithBehaviors`): the result never goes below the highest
   recommendation of the scale-down window nor above the lowest of the scale-up window;
4. rate policies (`calculateScaleUpLimitWithScalingRules` / `...ScaleDownLimit...`) and min/max bounds.

Deliberate differences from the HPA, each found necessary in `bench/autoscale_sim.py` (whose `ours-spec`
controller runs this module with all of them switched off) and each explained where it is done:
- the p99 signal is a one-sided alarm (`LatencyStep.BOUNDED`, `latency_proposal`): latency is flat until
  saturation and then explodes, so `ceil(ready * p99/target)` overshoots tenfold on a breach and, below
  target, proposes absurd scale-downs. A breach adds at most +50 % of the ready pods, and nothing while the
  last scale-up settles (its pods starting, or the overload's backlog still in the window); below target
  the signal abstains when a QPS signal exists;
- the knee (`CapacityMemory`): a breach at a steady load at or below `targetQPSPerReplica` means the QPS
  target is past the point where p99 turns, so the QPS signal sizes for the knee instead: interpolated on
  log p99 between the highest healthy load and the lowest breach, or 90 % of the breach before a healthy
  load is known (for `capacityMemorySeconds`, 2 h by default). A configuration with only a p99 target gets
  a proportional QPS signal this way after its first breach;
- a scale-up whose size the p99 signal chose (above the QPS signal's) is a probe of the knee, and is not
  undone for `FLAP_SECONDS` (counted from the last scale-up while it is held) while the load stays where
  it was: on steady traffic with a QPS target past the
  knee, the HPA arithmetic would otherwise step up on the breach and straight back down to the knee (a
  flap, in the benchmark's terms);
- a confirmed overload (QPS over target *and* p99 over target) skips the scale-up rate policies: those
  guard against metric glitches, and every 15 s of doubling is 15 s more of failed requests;
- the scale-down window, when not set explicitly, is one pod start-up time (60..300 s; 300 s when the
  start-up time is unknown); a reversal within 5 minutes of a scale-down lengthens it to at least the HPA's
  300 s, and each further one doubles it (up to 900 s), halving back every 30 minutes without one: short
  after a one-off spike, long on recurring bursts;
- with p99 over its target, the QPS signal has no dead band upwards (the tolerance guards against noise,
  and latency says the excess is real), so a fleet never sits past the knee inside the tolerance;
- a per-signal direction guard (a proposal on the "down" side of its target never exceeds the current
  count, and vice versa; exactly on target means no change), which the HPA applies only when pods are
  missing; it keeps the result monotonic in load while pods are being created;
- `currentReplicas` of 0 with `minReplicas` >= 1 scales to `minReplicas` (the HPA would treat 0 as
  "autoscaling disabled"; here autoscaling is configured explicitly, so 0 only means "not created yet").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from modelfleet_operator.autoscaler.behavior import (
    DEFAULT_SCALE_DOWN_WINDOW_SECONDS,
    DEFAULT_SCALE_UP_WINDOW_SECONDS,
    DEFAULT_TOLERANCE,
    Behavior,
    CamelModel,
    PolicyType,
    ResolvedRules,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
    Timed,
    apply_rate_limits,
    resolve_rules,
    scale_down_limit,
    scale_up_limit,
    stabilize,
)
from modelfleet_operator.autoscaler.split import ArchitectureShare, split_across_architectures

__all__ = [
    "DEFAULT_SCALE_DOWN_WINDOW_SECONDS",
    "DEFAULT_SCALE_UP_WINDOW_SECONDS",
    "DEFAULT_SYNC_PERIOD_SECONDS",
    "DEFAULT_TOLERANCE",
    "ArchitectureShare",
    "AutoscalerConfig",
    "AutoscalerState",
    "Behavior",
    "CapacityMemory",
    "Decision",
    "LatencyStep",
    "Observation",
    "PodObservation",
    "PolicyType",
    "ResolvedRules",
    "ScalingPolicy",
    "ScalingRules",
    "SelectPolicy",
    "SignalProposal",
    "Timed",
    "apply_rate_limits",
    "build_status",
    "decide",
    "latency_proposal",
    "learned_capacity",
    "qps_proposal",
    "resolve_rules",
    "scale_down_limit",
    "scale_down_window",
    "scale_up_limit",
    "split_across_architectures",
    "stabilize",
    "update_capacity",
]

DEFAULT_SYNC_PERIOD_SECONDS = 15.0

# A reversal of direction sooner than this after a scale-down counts as a flap (the benchmark's measure).
FLAP_SECONDS = 300.0
WINDOW_DECAY_SECONDS = 1800.0


class LatencyStep(StrEnum):
    """How the p99 signal proposes a size when p99 is above target.

    `ratio` is the HPA's arithmetic, `ceil(ready * p99 / target)`. `bounded` (the default) caps that step at
    `+latencyMaxStepPercent` of the ready pods per decision and, once a breach has been seen, sizes the fleet
    from the learned knee (`CapacityMemory`) instead: latency past saturation says "more", not "how many".
    """

    RATIO = "ratio"
    BOUNDED = "bounded"


class AutoscalerConfig(CamelModel):
    """`spec.autoscaling` as the algorithm needs it (the operator maps the CRD model onto this).

    The first six fields are the CRD's. The rest tune modelfleet's departures from the HPA (see the module
    docstring) and need not be exposed: `tolerance` (the HPA's ±10 %), `latencyStep` ("ratio" is the plain
    HPA arithmetic), `latencyMaxStepPercent`, `overloadBypassesRateLimit`, `scaleDownWindowStartupFactor`
    (None: the HPA's 300 s), `adaptiveScaleDownWindow`, `maxScaleDownWindowSeconds`,
    `capacityMemorySeconds` (how long a learned knee is trusted).
    """

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(ge=1)
    target_qps_per_replica: float | None = Field(default=None, gt=0, alias="targetQPSPerReplica")
    target_p99_latency_milliseconds: float | None = Field(default=None, gt=0)
    behavior: Behavior = Behavior()
    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0.0, le=1.0)
    latency_step: LatencyStep = LatencyStep.BOUNDED
    latency_max_step_percent: float = Field(default=50.0, gt=0.0)
    overload_bypasses_rate_limit: bool = True
    scale_down_window_startup_factor: float | None = Field(default=1.0, gt=0.0)
    adaptive_scale_down_window: bool = True
    max_scale_down_window_seconds: int = Field(default=900, ge=0, le=3600)
    capacity_memory_seconds: float = Field(default=7200.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalerConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        if self.target_qps_per_replica is None and self.target_p99_latency_milliseconds is None:
            raise ValueError("set at least one of targetQPSPerReplica and targetP99LatencyMilliseconds")
        return self


def base_scale_down_window(config: AutoscalerConfig, startup_seconds: float | None) -> float:
    """The scale-down stabilization window before adaptation, when the user did not set one.

    Holding a spare replica pays only while a returning load would otherwise wait for a new pod to start;
    past about one start-up time, keeping it costs more than starting it again (the ski-rental
    break-even). So it is `factor x start-up` (factor 1 by default), within [60, 300] s; with the start-up
    time unknown (or the factor unset) it is the HPA's 300 s.
    """
    factor = config.scale_down_window_startup_factor
    if factor is None or startup_seconds is None or startup_seconds <= 0:
        return float(DEFAULT_SCALE_DOWN_WINDOW_SECONDS)
    return min(float(DEFAULT_SCALE_DOWN_WINDOW_SECONDS), max(60.0, factor * startup_seconds))


def scale_down_window(
    config: AutoscalerConfig, *, startup_seconds: float | None, state: AutoscalerState, now: float
) -> tuple[float, float | None, float | None]:
    """The window to use now, and the adaptive (window, time it last changed) to remember.

    An explicit `behavior.scaleDown.stabilizationWindowSeconds` is used as is. Otherwise the window starts
    at `base_scale_down_window` and learns from reversals: a scale-up less than `FLAP_SECONDS` after a
    scale-down means capacity was released too early (the load came back, bursty traffic), so the window
    grows: at once to the HPA's 300 s (growing by doublings from one start-up time would lose a burst per
    doubling), then doubling, up to `maxScaleDownWindowSeconds`; each `WINDOW_DECAY_SECONDS` without such a reversal
    halves it back towards the base.
    """
    rules = config.behavior.scale_down
    if rules is not None and rules.stabilization_window_seconds is not None:
        return float(rules.stabilization_window_seconds), None, None
    base = base_scale_down_window(config, startup_seconds)
    if not config.adaptive_scale_down_window:
        return base, None, None
    ceiling = max(base, float(config.max_scale_down_window_seconds))
    window = min(ceiling, max(base, state.down_window or base))
    changed = state.down_window_time
    if changed is not None and window > base and now - changed >= WINDOW_DECAY_SECONDS:
        window, changed = max(base, window / 2.0), now
    return window, window, changed


# ---------------------------------------------------------------------------------------------------------
# Inputs and state


@dataclass(frozen=True)
class PodObservation:
    """One serving pod. `qps` is None when its metrics are missing (scrape failed, or first sample)."""

    name: str
    ready: bool
    qps: float | None = None


@dataclass(frozen=True)
class Observation:
    """What the caller saw over the last metrics window.

    `now` is in seconds on whichever clock the caller keeps for this state (monotonic in memory, or wall
    clock if the state is persisted across restarts). `p99_seconds` is the p99 of the merged request
    duration histogram of the pods that reported; `latency_count` is how many requests it covers (0 means
    the model was idle, which is an answer, not a missing metric). `latency_available` is False when no pod
    could be read at all.
    """

    now: float
    current_replicas: int
    pods: tuple[PodObservation, ...]
    p99_seconds: float | None = None
    latency_count: float = 0.0
    latency_available: bool = True
    startup_seconds: float | None = None

    @property
    def ready_pods(self) -> int:
        return sum(1 for p in self.pods if p.ready)

    @property
    def total_qps(self) -> float | None:
        """Offered QPS summed over the ready pods that reported (None if none did)."""
        values = [p.qps for p in self.pods if p.ready and p.qps is not None]
        return sum(values) if values else None


@dataclass(frozen=True)
class CapacityMemory:
    """What p99 has taught us about one replica's capacity (QPS per replica), with when it was learned.

    `breach_qps`: the lowest per-replica load at which p99 exceeded its target (the knee is below it);
    `healthy_qps`: the highest per-replica load seen with p99 within target; each with its p99 as a
    ratio to the target, so that the knee can be interpolated between them. Both are forgotten after
    `capacityMemorySeconds`, so a faster engine or a new model is re-learned.
    """

    breach_qps: float | None = None
    breach_time: float | None = None
    healthy_qps: float | None = None
    healthy_time: float | None = None
    breach_ratio: float | None = None
    healthy_ratio: float | None = None


@dataclass(frozen=True)
class AutoscalerState:
    """What the algorithm must remember between calls (HPA: `recommendations`, `scale{Up,Down}Events`)."""

    recommendations: tuple[Timed, ...] = ()
    scale_up_events: tuple[Timed, ...] = ()
    scale_down_events: tuple[Timed, ...] = ()
    last_scale_time: float | None = None
    last_scale_up_time: float | None = None
    latency_scale_up_time: float | None = None
    latency_scale_up_qps: float | None = None
    last_load_qps: float | None = None
    last_scale_down_time: float | None = None
    down_window: float | None = None
    down_window_time: float | None = None
    capacity: CapacityMemory = field(default_factory=CapacityMemory)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for callers that persist the state (e.g. in an annotation)."""
        return {
            "recommendations": [[t.time, t.value] for t in self.recommendations],
            "scaleUpEvents": [[t.time, t.value] for t in self.scale_up_events],
            "scaleDownEvents": [[t.time, t.value] for t in self.scale_down_events],
            "lastScaleTime": self.last_scale_time,
            "lastScaleUpTime": self.last_scale_up_time,
            "latencyScaleUpTime": self.latency_scale_up_time,
            "latencyScaleUpQPS": self.latency_scale_up_qps,
            "lastLoadQPS": self.last_load_qps,
            "lastScaleDownTime": self.last_scale_down_time,
            "downWindow": self.down_window,
            "downWindowTime": self.down_window_time,
            "capacity": {
                "breachQPS": self.capacity.breach_qps,
                "breachTime": self.capacity.breach_time,
                "healthyQPS": self.capacity.healthy_qps,
                "healthyTime": self.capacity.healthy_time,
                "breachRatio": self.capacity.breach_ratio,
                "healthyRatio": self.capacity.healthy_ratio,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoscalerState:
        def timed(key: str) -> tuple[Timed, ...]:
            return tuple(Timed(float(t), int(v)) for t, v in data.get(key, ()))

        cap = data.get("capacity") or {}
        return cls(
            recommendations=timed("recommendations"),
            scale_up_events=timed("scaleUpEvents"),
            scale_down_events=timed("scaleDownEvents"),
            last_scale_time=data.get("lastScaleTime"),
            last_scale_up_time=data.get("lastScaleUpTime"),
            latency_scale_up_time=data.get("latencyScaleUpTime"),
            latency_scale_up_qps=data.get("latencyScaleUpQPS"),
            last_load_qps=data.get("lastLoadQPS"),
            last_scale_down_time=data.get("lastScaleDownTime"),
            down_window=data.get("downWindow"),
            down_window_time=data.get("downWindowTime"),
            capacity=CapacityMemory(
                breach_qps=cap.get("breachQPS"),
                breach_time=cap.get("breachTime"),
                healthy_qps=cap.get("healthyQPS"),
                healthy_time=cap.get("healthyTime"),
                breach_ratio=cap.get("breachRatio"),
                healthy_ratio=cap.get("healthyRatio"),
            ),
        )


# ---------------------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class SignalProposal:
    """One signal's opinion: `replicas` is None when the signal could not be computed (`valid` False)."""

    name: Literal["qps", "p99"]
    observed: float | None
    target: float
    replicas: int | None
    valid: bool
    note: str


@dataclass(frozen=True)
class Decision:
    """The result of one autoscaler pass, with everything `status.autoscaler` and the Event need."""

    desired_replicas: int
    current_replicas: int
    ready_replicas: int
    qps: float | None
    p99_milliseconds: float | None
    proposals: tuple[SignalProposal, ...]
    recommendation: int | None
    stabilized: int | None
    limit: str
    reason: str
    message: str
    state: AutoscalerState

    @property
    def changed(self) -> bool:
        return self.desired_replicas != self.current_replicas


def build_status(decision: Decision, *, last_scale_time: str | None) -> dict[str, Any]:
    """`status.autoscaler` for the CRD; `last_scale_time` is RFC 3339, chosen by the caller's clock."""
    status: dict[str, Any] = {
        "qps": None if decision.qps is None else round(decision.qps, 3),
        "p99Milliseconds": None if decision.p99_milliseconds is None else round(decision.p99_milliseconds, 3),
        "desiredReplicas": decision.desired_replicas,
        "currentReplicas": decision.current_replicas,
        "reason": decision.message,
    }
    if last_scale_time is not None:
        status["lastScaleTime"] = last_scale_time
    return status


# ---------------------------------------------------------------------------------------------------------
# Signals


def _within_tolerance(ratio: float, rules_up: ResolvedRules, rules_down: ResolvedRules) -> bool:
    return (1.0 - rules_down.tolerance) <= ratio <= (1.0 + rules_up.tolerance)


# Proposals are clipped here before `ceil`: a knee learned at a vanishing load makes the ratio infinite,
# and the result is bounded by maxReplicas later anyway.
_MAX_PROPOSAL = 1_000_000_000


def _ceil(x: float) -> int:
    return _MAX_PROPOSAL if not x < _MAX_PROPOSAL else math.ceil(x)


def _guard(proposal: int, ratio: float, current: int) -> int:
    # A signal that says "less load than target" must not raise the count, and vice versa; the HPA applies
    # this only with missing pods, applying it always keeps the result monotonic while pods are created.
    if ratio < 1.0:
        return min(proposal, current)
    if ratio > 1.0:
        return max(proposal, current)
    return current


def qps_proposal(
    *,
    pods: Sequence[PodObservation],
    current_replicas: int,
    target: float,
    up: ResolvedRules,
    down: ResolvedRules,
) -> tuple[int | None, float | None, str]:
    """HPA `calcPlainMetricReplicas` for a per-pod average target; returns (replicas, ratio, note).

    Ready pods without a sample are "missing": counted at 100 % of target when scaling down and 0 when
    scaling up; not-ready pods are left out, and counted at 0 on a scale-up; if filling them in flips the
    direction, the current count stands.
    """
    values = [p.qps for p in pods if p.ready and p.qps is not None]
    missing = sum(1 for p in pods if p.ready and p.qps is None)
    unready = sum(1 for p in pods if not p.ready)
    if not values:
        return None, None, "no ready pod reported QPS"
    ratio = sum(values) / (target * len(values))
    if ratio == 1.0:
        # Exactly on target: nothing to do. (The HPA would count missing pods as 0 here and could
        # shrink, which breaks monotonicity in load at this one point.)
        return current_replicas, ratio, "on target"
    scale_up_with_unready = unready > 0 and ratio > 1.0
    if not scale_up_with_unready and missing == 0:
        if _within_tolerance(ratio, up, down):
            return current_replicas, ratio, "within tolerance"
        return _guard(_ceil(ratio * len(values)), ratio, current_replicas), ratio, ""
    filled = list(values)
    if missing:
        filled += [target if ratio < 1.0 else 0.0] * missing
    if scale_up_with_unready:
        filled += [0.0] * unready
    new_ratio = sum(filled) / (target * len(filled))
    note = f"{missing} missing, {unready} not ready"
    if _within_tolerance(new_ratio, up, down) or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current_replicas, ratio, note + "; within tolerance after filling in"
    return _guard(_ceil(new_ratio * len(filled)), new_ratio, current_replicas), ratio, note


# The p99 (as a ratio to its target) that the learned knee aims for: a margin for noise between windows.
KNEE_P99_RATIO = 0.9


def learned_capacity(memory: CapacityMemory, *, now: float, forget_after: float) -> float | None:
    """The per-replica QPS to size for, once a breach has bounded the knee (None before that).

    The knee lies between the highest healthy load and the lowest breach. With both known, with their
    p99s, it is interpolated where log p99 crosses `KNEE_P99_RATIO` of the target (a secant on the
    latency curve, which past the batching sweet spot rises about exponentially with load), never past
    95 % of the way to the breach. With only the breach known it is 90 % of the breach; with a healthy
    load but no p99s to interpolate, the larger of the two.
    """
    breach = memory.breach_qps
    if breach is None or memory.breach_time is None or now - memory.breach_time > forget_after:
        return None
    fallback = 0.9 * breach
    healthy = memory.healthy_qps
    if healthy is None or memory.healthy_time is None or now - memory.healthy_time > forget_after or healthy >= breach:
        return fallback
    r_h, r_b = memory.healthy_ratio, memory.breach_ratio
    if r_h is None or r_b is None or not 0.0 < r_h < r_b:
        return max(healthy, fallback)
    fraction = (math.log(KNEE_P99_RATIO) - math.log(r_h)) / (math.log(r_b) - math.log(r_h))
    return healthy + (breach - healthy) * min(max(fraction, 0.0), 0.95)


def update_capacity(
    memory: CapacityMemory,
    *,
    now: float,
    qps_per_replica: float | None,
    p99_ratio: float | None,
    up_tolerance: float,
    forget_after: float,
) -> CapacityMemory:
    """Fold one window's (load, latency) pair into the knee estimate."""
    if qps_per_replica is None or p99_ratio is None or qps_per_replica <= 0.0:
        return memory
    m = memory
    if m.breach_time is not None and now - m.breach_time > forget_after:
        m = replace(m, breach_qps=None, breach_time=None, breach_ratio=None)
    if m.healthy_time is not None and now - m.healthy_time > forget_after:
        m = replace(m, healthy_qps=None, healthy_time=None, healthy_ratio=None)
    if p99_ratio > 1.0 + up_tolerance:
        if m.breach_qps is None or qps_per_replica <= m.breach_qps:
            m = replace(m, breach_qps=qps_per_replica, breach_time=now, breach_ratio=p99_ratio)
        if m.healthy_qps is not None and m.healthy_qps >= qps_per_replica:
            # The latest breach happened at a load once thought healthy: the knee moved down.
            m = replace(m, healthy_qps=None, healthy_time=None, healthy_ratio=None)
    elif p99_ratio <= 1.0:
        if m.healthy_qps is None or qps_per_replica >= m.healthy_qps:
            m = replace(m, healthy_qps=qps_per_replica, healthy_time=now, healthy_ratio=p99_ratio)
        if m.breach_qps is not None and qps_per_replica >= m.breach_qps:
            m = replace(m, breach_qps=None, breach_time=None, breach_ratio=None)
    return m


def latency_proposal(
    *,
    p99_seconds: float,
    target_seconds: float,
    ready_replicas: int,
    current_replicas: int,
    settling: bool,
    starting_replicas: int,
    has_qps_signal: bool,
    up: ResolvedRules,
    down: ResolvedRules,
    step: LatencyStep,
    max_step_percent: float,
) -> tuple[int, float, str]:
    """The p99 signal; returns (replicas, ratio, note).

    `LatencyStep.RATIO` is an HPA Object metric (`getUsageRatioReplicaCount`): `ceil(ready * p99/target)`
    both ways. `LatencyStep.BOUNDED` treats latency as a one-sided alarm, because it is flat until
    saturation and then explodes, so its ratio says neither how many pods are missing nor how many are
    spare:
    - above target, it adds at most `max_step_percent` % of the ready pods (at least one), and nothing
      while the last scale-up settles (`settling`: pods starting or unscraped, or too soon after it for
      the backlog of the overload to have left the window); asking again would count one breach twice;
    - below target, it abstains when a QPS signal exists (which sizes the fleet), and otherwise falls back
      to the HPA arithmetic, so a latency-only configuration still scales down (probing for the knee).
    """
    ratio = p99_seconds / target_seconds
    if current_replicas == 0:
        return math.ceil(ratio), ratio, ""
    if _within_tolerance(ratio, up, down):
        return current_replicas, ratio, "within tolerance"
    base = max(ready_replicas, 1)
    proposal = math.ceil(ratio * base)
    if step is LatencyStep.RATIO:
        return _guard(proposal, ratio, current_replicas), ratio, ""
    if ratio > 1.0:
        if starting_replicas > 0:
            return current_replicas, ratio, f"breach; waiting for {starting_replicas} starting pods"
        if settling:
            return current_replicas, ratio, "breach; waiting for the last scale-up to settle"
        bounded = min(proposal, base + max(1, math.ceil(base * max_step_percent / 100.0)))
        return _guard(bounded, ratio, current_replicas), ratio, "breach; bounded step"
    if has_qps_signal:
        return 0, ratio, "below target: QPS sizes the fleet"
    return _guard(proposal, ratio, current_replicas), ratio, ""


def _record_scale_event(
    state: AutoscalerState, *, now: float, previous: int, new: int, up: ResolvedRules, down: ResolvedRules
) -> AutoscalerState:
    up_events = tuple(e for e in state.scale_up_events if e.time > now - up.longest_period_seconds)
    down_events = tuple(e for e in state.scale_down_events if e.time > now - down.longest_period_seconds)
    down_window, down_window_time = state.down_window, state.down_window_time
    if new > previous:
        up_events += (Timed(now, new - previous),)
        if (
            down_window is not None
            and state.last_scale_down_time is not None
            and now - state.last_scale_down_time < FLAP_SECONDS
        ):
            down_window, down_window_time = max(2.0 * down_window, float(DEFAULT_SCALE_DOWN_WINDOW_SECONDS)), now
    elif new < previous:
        down_events += (Timed(now, previous - new),)
    return replace(
        state,
        down_window=down_window,
        down_window_time=down_window_time,
        last_scale_down_time=now if new < previous else state.last_scale_down_time,
        scale_up_events=up_events,
        scale_down_events=down_events,
        last_scale_time=now if new != previous else state.last_scale_time,
        last_scale_up_time=now if new > previous else state.last_scale_up_time,
    )


# ---------------------------------------------------------------------------------------------------------
# The decision


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.4g}{unit}"


def decide(config: AutoscalerConfig, observation: Observation, state: AutoscalerState) -> Decision:
    """One autoscaler pass: signals → max → stabilization → rate limits and bounds.

    The caller is expected to apply `desired_replicas` and pass `decision.state` next time; the state
    records a scale event whenever the result differs from `current_replicas`.
    """
    up = resolve_rules(config.behavior.scale_up, direction="up", tolerance=config.tolerance)
    down = resolve_rules(config.behavior.scale_down, direction="down", tolerance=config.tolerance)
    now = observation.now
    window, adaptive_window, window_time = scale_down_window(
        config, startup_seconds=observation.startup_seconds, state=state, now=now
    )
    down = replace(down, stabilization_window_seconds=window)
    state = replace(state, down_window=adaptive_window, down_window_time=window_time)
    current = observation.current_replicas
    ready = observation.ready_pods
    total_qps = observation.total_qps
    p99_ms = None if observation.p99_seconds is None else observation.p99_seconds * 1000.0

    def finish(
        desired: int,
        *,
        proposals: tuple[SignalProposal, ...],
        recommendation: int | None,
        stabilized: int | None,
        limit: str,
        reason: str,
        message: str,
        new_state: AutoscalerState,
    ) -> Decision:
        if desired != current:
            new_state = _record_scale_event(new_state, now=now, previous=current, new=desired, up=up, down=down)
        return Decision(
            desired_replicas=desired,
            current_replicas=current,
            ready_replicas=ready,
            qps=total_qps,
            p99_milliseconds=p99_ms,
            proposals=proposals,
            recommendation=recommendation,
            stabilized=stabilized,
            limit=limit,
            reason=reason,
            message=message,
            state=new_state,
        )

    if current < config.min_replicas:
        return finish(
            config.min_replicas,
            proposals=(),
            recommendation=None,
            stabilized=None,
            limit="TooFewReplicas",
            reason="ScaledUp",
            message=f"{current} replicas is below minReplicas {config.min_replicas}; scaling to the minimum",
            new_state=state,
        )
    if current > config.max_replicas:
        return finish(
            config.max_replicas,
            proposals=(),
            recommendation=None,
            stabilized=None,
            limit="TooManyReplicas",
            reason="ScaledDown",
            message=f"{current} replicas is above maxReplicas {config.max_replicas}; scaling to the maximum",
            new_state=state,
        )

    forget = config.capacity_memory_seconds
    qps_per_ready = (
        total_qps / sum(1 for p in observation.pods if p.ready and p.qps is not None) if total_qps is not None else None
    )
    target_s = (
        None if config.target_p99_latency_milliseconds is None else config.target_p99_latency_milliseconds / 1000.0
    )
    breach = (
        target_s is not None
        and observation.p99_seconds is not None
        and observation.p99_seconds > target_s * (1.0 + up.tolerance)
    )
    starting = sum(1 for p in observation.pods if not p.ready or p.qps is None)
    # After a scale-up, latency keeps showing the backlog of the under-provisioned spell until the new
    # pods have started and a few windows have passed; until then a p99 breach is old news.
    settle = (observation.startup_seconds or 0.0) + 3 * DEFAULT_SYNC_PERIOD_SECONDS
    settling = starting > 0 or (state.last_scale_up_time is not None and now - state.last_scale_up_time < settle)
    # This decision sizes with the knee learned so far; what this window teaches is kept for the next
    # one (so the result stays monotonic in the load just observed).
    knee = (
        learned_capacity(state.capacity, now=now, forget_after=forget)
        if config.latency_step is LatencyStep.BOUNDED
        else None
    )
    memory = state.capacity
    load = None if qps_per_ready is None else qps_per_ready * ready
    # A load that changed between windows (a burst starting or ending inside one) says nothing about
    # capacity: latency is judged at a steady load only.
    steady_load = load is not None and (
        state.last_load_qps is None  # first window: nothing says it moved
        or abs(load - state.last_load_qps) <= up.tolerance * max(state.last_load_qps, 1e-9)
    )
    configured = config.target_qps_per_replica
    if (
        config.latency_step is LatencyStep.BOUNDED
        and target_s is not None
        and observation.latency_count > 0
        and steady_load
        and not settling
        # A breach above the configured QPS target is explained by the load; only a breach at or below
        # it says the target itself is past the knee. (A breach right after a scale-down is exactly the
        # evidence wanted, so only scale-ups make the fleet "settling".)
        and (configured is None or (qps_per_ready or 0.0) <= configured * (1.0 + up.tolerance))
    ):
        memory = update_capacity(
            memory,
            now=now,
            qps_per_replica=qps_per_ready,
            p99_ratio=None if observation.p99_seconds is None else observation.p99_seconds / target_s,
            up_tolerance=up.tolerance,
            forget_after=forget,
        )

    proposals: list[SignalProposal] = []
    qps_target = config.target_qps_per_replica
    if knee is not None and (qps_target is None or knee < qps_target):
        qps_target, qps_note = knee, f"knee learned from p99: {knee:.4g}/s per replica"
    else:
        qps_note = ""
    if qps_target is not None:
        # The tolerance is a dead band against noise; with p99 over its target the load above the QPS target
        # is not noise, and left inside the band it would sit past the knee until latency forced a step.
        replicas, _, note = qps_proposal(
            pods=observation.pods,
            current_replicas=current,
            target=qps_target,
            up=replace(up, tolerance=0.0) if breach else up,
            down=down,
        )
        note = "; ".join(n for n in (qps_note, note) if n)
        proposals.append(
            SignalProposal(
                name="qps",
                observed=qps_per_ready,
                target=qps_target,
                replicas=replicas,
                valid=replicas is not None,
                note=note,
            )
        )
    if target_s is not None:
        if not observation.latency_available:
            proposals.append(
                SignalProposal(
                    name="p99",
                    observed=None,
                    target=target_s * 1000.0,
                    replicas=None,
                    valid=False,
                    note="no pod could be read",
                )
            )
        elif observation.latency_count <= 0 or observation.p99_seconds is None:
            # Idle: no latency to defend. Propose nothing above the minimum.
            proposals.append(
                SignalProposal(
                    name="p99",
                    observed=None,
                    target=target_s * 1000.0,
                    replicas=0,
                    valid=True,
                    note="no requests in the window",
                )
            )
        else:
            replicas_p99, _, note_p99 = latency_proposal(
                p99_seconds=observation.p99_seconds,
                target_seconds=target_s,
                ready_replicas=ready,
                current_replicas=current,
                settling=settling,
                starting_replicas=starting,
                has_qps_signal=qps_target is not None,
                up=up,
                down=down,
                step=config.latency_step,
                max_step_percent=config.latency_max_step_percent,
            )
            proposals.append(
                SignalProposal(
                    name="p99",
                    observed=observation.p99_seconds * 1000.0,
                    target=target_s * 1000.0,
                    replicas=replicas_p99,
                    valid=True,
                    note=note_p99,
                )
            )
    new_state = replace(state, capacity=memory, last_load_qps=load)
    described = "; ".join(_describe(p) for p in proposals)
    valid = [p.replicas for p in proposals if p.valid and p.replicas is not None]
    if not valid:
        return finish(
            current,
            proposals=tuple(proposals),
            recommendation=None,
            stabilized=None,
            limit="NoMetrics",
            reason="MetricsUnavailable",
            message=f"keeping {current}: no metrics ({described})",
            new_state=new_state,
        )
    recommendation = max(valid)
    if len(valid) < len(proposals) and recommendation < current:
        return finish(
            current,
            proposals=tuple(proposals),
            recommendation=recommendation,
            stabilized=None,
            limit="PartialMetrics",
            reason="MetricsUnavailable",
            message=f"keeping {current}: a signal is unavailable, so no scale-down ({described})",
            new_state=new_state,
        )

    stabilized, history = stabilize(
        desired=recommendation,
        current=current,
        now=now,
        # HPA `recordInitialRecommendation`: with no history (a new model, or a state lost), the current
        # count stands as a recommendation, so a first reading cannot scale down before a window has passed.
        recommendations=state.recommendations or (Timed(now, current),),
        up=up,
        down=down,
    )
    new_state = replace(new_state, recommendations=history)
    desired, limit = apply_rate_limits(
        desired=stabilized,
        current=current,
        now=now,
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        up_events=state.scale_up_events,
        down_events=state.scale_down_events,
        up=up,
        down=down,
    )
    qps_up = any(p.name == "qps" and p.replicas is not None and p.replicas > current for p in proposals)
    confirmed = config.overload_bypasses_rate_limit and qps_up and breach
    if confirmed and limit == "ScaleUpLimit":
        # Both signals say overload: the load is real, not a metrics glitch the rate limit guards
        # against, and every 15 s of doubling is 15 s more of a start-up delay spent failing requests.
        desired, limit = min(stabilized, config.max_replicas), "ConfirmedOverload"
    held, held_load = state.latency_scale_up_time, state.latency_scale_up_qps
    probing = held is not None and now - held < FLAP_SECONDS
    if (
        desired < current
        and probing
        # Only while the load is what the probe was made at: once it has fallen, the fleet is sized for
        # a different load, and keeping the probe's pods would only keep the last surge's bill running.
        and (held_load is None or load is None or load >= held_load * (1.0 - down.tolerance))
    ):
        # A scale-up sized by latency rather than by the QPS signal is a probe of the knee; undoing it
        # within minutes would be a flap, and the knee learned since sizes the fleet once the hold ends.
        desired, limit = current, "HeldAfterLatencyScaleUp"
    if stabilized != recommendation:
        limit = ("ScaleUpStabilized" if recommendation >= current else "ScaleDownStabilized") + (
            "" if limit == "DesiredWithinRange" else f", {limit}"
        )
    # Only a breach makes the p99 proposal exceed the current count (`_guard`); when it also exceeds the QPS
    # signal's, latency chose the size: a probe of the knee, whatever small step the QPS signal asked for.
    # A scale-up while a probe is held (the knee the probe taught, sizing the next step) belongs to the
    # same probe: the hold runs from the last of them, or its end would undo that step within minutes.
    by_name = {p.name: p.replicas for p in proposals if p.replicas is not None}
    p99_led = by_name.get("p99", 0) > max(current, by_name.get("qps", 0))
    if desired > current and (p99_led or probing):
        new_state = replace(new_state, latency_scale_up_time=now, latency_scale_up_qps=load)
    if desired > current:
        reason = "ScaledUp"
    elif desired < current:
        reason = "ScaledDown"
    else:
        reason = "NoChange"
    message = (
        f"{current} -> {desired} replicas ({ready} ready): qps {_fmt(total_qps, '/s')}, "
        f"p99 {_fmt(p99_ms, ' ms')}; {described}; recommended {recommendation}, limit {limit}"
    )
    return finish(
        desired,
        proposals=tuple(proposals),
        recommendation=recommendation,
        stabilized=stabilized,
        limit=limit,
        reason=reason,
        message=message,
        new_state=new_state,
    )


def _describe(p: SignalProposal) -> str:
    unit = "/s per replica" if p.name == "qps" else " ms"
    head = f"{p.name} {_fmt(p.observed, unit)} vs target {p.target:.4g}{unit}"
    tail = "unavailable" if p.replicas is None else f"-> {p.replicas}"
    return f"{head} {tail}" + (f" ({p.note})" if p.note else "")
