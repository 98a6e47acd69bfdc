"""The HPA's `behavior`: its configuration models and the pure stabilization and rate-limit arithmetic.

Transcribed from Kubernetes `pkg/controller/podautoscaler/horizontal.go`
(`stabilizeRecommendationWithBehaviors`, `convertDesiredReplicasWithBehaviorRate`,
`calculateScaleUpLimitWithScalingRules`, `calculateScaleDownLimitWithBehaviors`) and the API defaulting
of `autoscaling/v2`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# The HPA's defaults (k8s.io/kubernetes/pkg/apis/autoscaling/v2/defaults.go and the controller flags).
DEFAULT_TOLERANCE = 0.1
DEFAULT_SCALE_UP_WINDOW_SECONDS = 0
DEFAULT_SCALE_DOWN_WINDOW_SECONDS = 300


class CamelModel(BaseModel):
    """Frozen, strict, camelCase in YAML/JSON, snake_case in Python (like the CRD models)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")


class PolicyType(StrEnum):
    """How a scaling policy counts: absolute pods or a percentage of the replicas at period start."""

    PODS = "Pods"
    PERCENT = "Percent"


class SelectPolicy(StrEnum):
    """Which policy wins when several apply (`Max` allows the largest change)."""

    MAX = "Max"
    MIN = "Min"
    DISABLED = "Disabled"


class ScalingPolicy(CamelModel):
    """One rate limit: at most `value` pods (or percent) of change per `periodSeconds`."""

    type: PolicyType
    value: int = Field(gt=0)
    period_seconds: int = Field(gt=0, le=1800)


class ScalingRules(CamelModel):
    """One direction of `behavior`, with the HPA's field names; unset fields take the HPA's defaults."""

    stabilization_window_seconds: int | None = Field(default=None, ge=0, le=3600)
    policies: tuple[ScalingPolicy, ...] | None = None
    select_policy: SelectPolicy | None = None
    tolerance: float | None = Field(default=None, ge=0.0, le=1.0)


class Behavior(CamelModel):
    """`spec.autoscaling.behavior`, mirroring the HPA's `behavior`."""

    scale_up: ScalingRules | None = None
    scale_down: ScalingRules | None = None


@dataclass(frozen=True)
class Timed:
    """A value with the time it was recorded (a recommendation or a scale event's size)."""

    time: float
    value: int


@dataclass(frozen=True)
class ResolvedRules:
    """A `ScalingRules` with every default filled in."""

    stabilization_window_seconds: float
    policies: tuple[ScalingPolicy, ...]
    select_policy: SelectPolicy
    tolerance: float

    @property
    def longest_period_seconds(self) -> int:
        return max((p.period_seconds for p in self.policies), default=0)


def resolve_rules(rules: ScalingRules | None, *, direction: Literal["up", "down"], tolerance: float) -> ResolvedRules:
    """Fill unset fields field by field, as the API server's HPA defaulting does."""
    rules = rules or ScalingRules()
    if direction == "up":
        window = DEFAULT_SCALE_UP_WINDOW_SECONDS
        policies: tuple[ScalingPolicy, ...] = (
            ScalingPolicy(type=PolicyType.PODS, value=4, period_seconds=15),
            ScalingPolicy(type=PolicyType.PERCENT, value=100, period_seconds=15),
        )
    else:
        window = DEFAULT_SCALE_DOWN_WINDOW_SECONDS
        policies = (ScalingPolicy(type=PolicyType.PERCENT, value=100, period_seconds=15),)
    return ResolvedRules(
        stabilization_window_seconds=(
            window if rules.stabilization_window_seconds is None else rules.stabilization_window_seconds
        ),
        policies=policies if rules.policies is None else rules.policies,
        select_policy=rules.select_policy or SelectPolicy.MAX,
        tolerance=tolerance if rules.tolerance is None else rules.tolerance,
    )


def stabilize(
    *,
    desired: int,
    current: int,
    now: float,
    recommendations: Sequence[Timed],
    up: ResolvedRules,
    down: ResolvedRules,
) -> tuple[int, tuple[Timed, ...]]:
    """HPA `stabilizeRecommendationWithBehaviors`: returns the stabilized count and the new history.

    The result stays within [lowest recommendation of the up window, highest of the down window], both
    windows including `desired` itself; it moves from `current` only as far as those bounds force it.
    """
    up_cutoff = now - up.stabilization_window_seconds
    down_cutoff = now - down.stabilization_window_seconds
    up_rec = desired
    down_rec = desired
    for rec in recommendations:
        if rec.time > up_cutoff:
            up_rec = min(rec.value, up_rec)
        if rec.time > down_cutoff:
            down_rec = max(rec.value, down_rec)
    result = current
    result = max(result, up_rec)
    result = min(result, down_rec)
    keep_after = now - max(up.stabilization_window_seconds, down.stabilization_window_seconds)
    history = (*(r for r in recommendations if r.time > keep_after), Timed(now, desired))
    return result, history


def _change_in_period(period_seconds: int, events: Iterable[Timed], now: float) -> int:
    cutoff = now - period_seconds
    return sum(e.value for e in events if e.time > cutoff)


def scale_up_limit(
    *,
    current: int,
    now: float,
    up_events: Sequence[Timed],
    down_events: Sequence[Timed],
    rules: ResolvedRules,
) -> int:
    """HPA `calculateScaleUpLimitWithScalingRules`: the most replicas the up policies allow now."""
    if rules.select_policy is SelectPolicy.DISABLED:
        return current
    proposals = []
    for policy in rules.policies:
        added = _change_in_period(policy.period_seconds, up_events, now)
        deleted = _change_in_period(policy.period_seconds, down_events, now)
        start = current - added + deleted
        if policy.type is PolicyType.PODS:
            proposals.append(start + policy.value)
        else:
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    if not proposals:
        return current
    return min(proposals) if rules.select_policy is SelectPolicy.MIN else max(proposals)


def scale_down_limit(
    *,
    current: int,
    now: float,
    up_events: Sequence[Timed],
    down_events: Sequence[Timed],
    rules: ResolvedRules,
) -> int:
    """HPA `calculateScaleDownLimitWithBehaviors`: the fewest replicas the down policies allow now."""
    if rules.select_policy is SelectPolicy.DISABLED:
        return current
    proposals = []
    for policy in rules.policies:
        added = _change_in_period(policy.period_seconds, up_events, now)
        deleted = _change_in_period(policy.period_seconds, down_events, now)
        start = current - added + deleted
        if policy.type is PolicyType.PODS:
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    if not proposals:
        return current
    return max(proposals) if rules.select_policy is SelectPolicy.MIN else min(proposals)


def apply_rate_limits(
    *,
    desired: int,
    current: int,
    now: float,
    min_replicas: int,
    max_replicas: int,
    up_events: Sequence[Timed],
    down_events: Sequence[Timed],
    up: ResolvedRules,
    down: ResolvedRules,
) -> tuple[int, str]:
    """HPA `convertDesiredReplicasWithBehaviorRate`: returns (replicas, the limit that applied)."""
    if desired > current:
        limit = scale_up_limit(
            current=current,
            now=now,
            up_events=up_events,
            down_events=down_events,
            rules=up,
        )
        limit = max(limit, current)
        if max_replicas > limit:
            allowed, reason = limit, "ScaleUpLimit"
        else:
            allowed, reason = max_replicas, "TooManyReplicas"
        if desired > allowed:
            return allowed, reason
    elif desired < current:
        limit = scale_down_limit(
            current=current,
            now=now,
            up_events=up_events,
            down_events=down_events,
            rules=down,
        )
        limit = min(limit, current)
        if min_replicas < limit:
            allowed, reason = limit, "ScaleDownLimit"
        else:
            allowed, reason = min_replicas, "TooFewReplicas"
        if desired < allowed:
            return allowed, reason
    return desired, "DesiredWithinRange"
