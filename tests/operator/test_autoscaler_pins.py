"""The autoscaler's rules pinned at their edges: windows, rate limits, tolerance, breach, knee, persisted state."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet_operator.autoscaler.algorithm import (
    AutoscalerState,
    CapacityMemory,
    Timed,
    base_scale_down_window,
    learned_capacity,
    update_capacity,
)
from modelfleet_operator.autoscaler.behavior import (
    PolicyType,
    ResolvedRules,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
    apply_rate_limits,
    resolve_rules,
    scale_down_limit,
    scale_up_limit,
    stabilize,
)
from tests.operator.test_autoscaler_algorithm import config, hpa_config, observe, run

UP = resolve_rules(None, direction="up", tolerance=0.1)
DOWN = resolve_rules(None, direction="down", tolerance=0.1)


def rules(
    direction: str, *policies: ScalingPolicy, select: SelectPolicy = SelectPolicy.MAX, window: int = 0
) -> ResolvedRules:
    spec = ScalingRules(stabilization_window_seconds=window, policies=policies, select_policy=select)
    return resolve_rules(spec, direction="up" if direction == "up" else "down", tolerance=0.1)


def test_the_hpa_defaults_fill_each_direction() -> None:
    assert (UP.stabilization_window_seconds, DOWN.stabilization_window_seconds) == (0, 300)
    assert UP.policies == (
        ScalingPolicy(type=PolicyType.PODS, value=4, period_seconds=15),
        ScalingPolicy(type=PolicyType.PERCENT, value=100, period_seconds=15),
    )
    assert DOWN.policies == (ScalingPolicy(type=PolicyType.PERCENT, value=100, period_seconds=15),)
    assert UP.select_policy is SelectPolicy.MAX and UP.tolerance == 0.1
    assert resolve_rules(ScalingRules(tolerance=0.3), direction="up", tolerance=0.1).tolerance == 0.3
    assert rules("down", ScalingPolicy(type=PolicyType.PODS, value=1, period_seconds=600)).longest_period_seconds == 600


def test_a_scale_up_window_holds_the_lowest_recommendation_inside_it() -> None:
    up = rules("up", ScalingPolicy(type=PolicyType.PODS, value=4, period_seconds=15), window=60)
    history = (Timed(50.0, 3), Timed(80.0, 5))
    assert stabilize(desired=10, current=3, now=100.0, recommendations=history, up=up, down=DOWN)[0] == 3
    # 50 s is not after 110 - 60: only the 5 of 80 s holds it back; at 141 nothing does.
    assert stabilize(desired=10, current=3, now=110.0, recommendations=history, up=up, down=DOWN)[0] == 5
    assert stabilize(desired=10, current=3, now=141.0, recommendations=history, up=up, down=DOWN)[0] == 10
    assert stabilize(desired=10, current=3, now=100.0, recommendations=history, up=UP, down=DOWN)[0] == 10


def test_a_scale_down_window_holds_the_highest_recommendation_inside_it() -> None:
    down = rules("down", ScalingPolicy(type=PolicyType.PERCENT, value=100, period_seconds=15), window=60)
    history = (Timed(50.0, 9), Timed(80.0, 6))
    assert stabilize(desired=2, current=9, now=100.0, recommendations=history, up=UP, down=down)[0] == 9
    assert stabilize(desired=2, current=9, now=111.0, recommendations=history, up=UP, down=down)[0] == 6
    result, kept = stabilize(desired=2, current=9, now=141.0, recommendations=history, up=UP, down=down)
    assert result == 2
    assert kept == (Timed(141.0, 2),)  # older than both windows: dropped from the history


def test_scale_down_policies_count_pods_or_percent_and_max_allows_the_larger_change() -> None:
    pods = ScalingPolicy(type=PolicyType.PODS, value=2, period_seconds=60)
    percent = ScalingPolicy(type=PolicyType.PERCENT, value=50, period_seconds=60)
    kw: dict[str, Any] = {"current": 10, "now": 100.0, "up_events": (), "down_events": ()}
    assert scale_down_limit(rules=rules("down", pods), **kw) == 8
    assert scale_down_limit(rules=rules("down", percent), **kw) == 5
    assert scale_down_limit(rules=rules("down", pods, percent), **kw) == 5
    assert scale_down_limit(rules=rules("down", pods, percent, select=SelectPolicy.MIN), **kw) == 8
    assert scale_down_limit(rules=rules("down", pods, select=SelectPolicy.DISABLED), **kw) == 10
    # what was removed inside the period counts against it; what was removed before does not
    removed: dict[str, Any] = {"current": 8, "now": 100.0, "up_events": (), "down_events": (Timed(50.0, 2),)}
    assert scale_down_limit(rules=rules("down", pods), **removed) == 8
    assert scale_down_limit(rules=rules("down", pods), **{**removed, "now": 111.0}) == 6


def test_scale_up_policies_count_pods_or_percent_and_min_allows_the_smaller_change() -> None:
    pods = ScalingPolicy(type=PolicyType.PODS, value=3, period_seconds=60)
    percent = ScalingPolicy(type=PolicyType.PERCENT, value=50, period_seconds=60)
    kw: dict[str, Any] = {"current": 10, "now": 100.0, "up_events": (), "down_events": ()}
    assert scale_up_limit(rules=rules("up", pods), **kw) == 13
    assert scale_up_limit(rules=rules("up", percent), **kw) == 15
    assert scale_up_limit(rules=rules("up", pods, percent), **kw) == 15
    assert scale_up_limit(rules=rules("up", pods, percent, select=SelectPolicy.MIN), **kw) == 13
    assert scale_up_limit(rules=rules("up", pods, select=SelectPolicy.DISABLED), **kw) == 10
    added: dict[str, Any] = {"current": 13, "now": 100.0, "up_events": (Timed(50.0, 3),), "down_events": ()}
    assert scale_up_limit(rules=rules("up", pods), **added) == 13
    assert scale_up_limit(rules=rules("up", percent), **{**added, "now": 111.0}) == 20


def test_rate_limits_name_the_bound_that_applied() -> None:
    down = rules("down", ScalingPolicy(type=PolicyType.PODS, value=2, period_seconds=60))
    up = rules("up", ScalingPolicy(type=PolicyType.PODS, value=2, period_seconds=60))
    kw: dict[str, Any] = {"now": 0.0, "up_events": (), "down_events": (), "up": up, "down": down}
    assert apply_rate_limits(desired=1, current=10, min_replicas=1, max_replicas=20, **kw) == (8, "ScaleDownLimit")
    assert apply_rate_limits(desired=1, current=10, min_replicas=9, max_replicas=20, **kw) == (9, "TooFewReplicas")
    assert apply_rate_limits(desired=9, current=10, min_replicas=1, max_replicas=20, **kw) == (9, "DesiredWithinRange")
    assert apply_rate_limits(desired=30, current=10, min_replicas=1, max_replicas=20, **kw) == (12, "ScaleUpLimit")
    assert apply_rate_limits(desired=30, current=10, min_replicas=1, max_replicas=11, **kw) == (11, "TooManyReplicas")


def test_the_tolerance_band_includes_its_edges() -> None:
    cfg = hpa_config(behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    assert run(cfg, observe(0, 1, [110.0])).desired_replicas == 1  # ratio 1.1: inside
    assert run(cfg, observe(0, 1, [110.5])).desired_replicas == 2
    assert run(cfg, observe(0, 10, [90.0] * 10)).desired_replicas == 10  # ratio 0.9: inside
    assert run(cfg, observe(0, 10, [89.0] * 10)).desired_replicas == 9


def test_a_p99_above_target_by_more_than_the_tolerance_removes_the_qps_dead_band() -> None:
    cfg = hpa_config(targetP99LatencyMilliseconds=100.0)
    qps = lambda d: next(p for p in d.proposals if p.name == "qps").replicas  # noqa: E731
    assert qps(run(cfg, observe(0, 10, [105.0] * 10, p99_ms=110.0))) == 10  # at the edge: no breach
    assert qps(run(cfg, observe(0, 10, [105.0] * 10, p99_ms=111.0))) == 11


def test_no_p99_step_while_the_last_scale_up_settles() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    state = AutoscalerState(last_scale_up_time=100.0)
    # settling lasts the start-up time plus three sync periods (45 s) after the last scale-up
    during = run(cfg, observe(100 + 20 + 44, 4, [10.0] * 4, p99_ms=500.0, startup=20.0), state)
    p99 = next(p for p in during.proposals if p.name == "p99")
    assert (p99.replicas, p99.note) == (4, "breach; waiting for the last scale-up to settle")
    after = run(cfg, observe(100 + 20 + 45, 4, [10.0] * 4, p99_ms=500.0, startup=20.0), state)
    assert next(p for p in after.proposals if p.name == "p99").replicas == 6


def test_the_scale_down_window_is_one_start_up_time_within_60_and_300_seconds() -> None:
    cfg = config()
    assert base_scale_down_window(cfg, 120.0) == 120.0
    assert base_scale_down_window(cfg, 10.0) == 60.0
    assert base_scale_down_window(cfg, 1000.0) == 300.0
    assert base_scale_down_window(cfg, None) == 300.0
    assert base_scale_down_window(cfg, 0.0) == 300.0
    assert base_scale_down_window(config(scaleDownWindowStartupFactor=2.0), 120.0) == 240.0
    assert base_scale_down_window(config(scaleDownWindowStartupFactor=None), 120.0) == 300.0


def test_a_120_second_start_up_holds_a_scale_down_for_120_seconds() -> None:
    cfg = config()
    state = run(cfg, observe(0, 4, [200.0] * 4, startup=120.0)).state
    for t in (15, 60, 119):
        d = run(cfg, observe(t, 8, [10.0] * 8, startup=120.0), state)
        assert d.desired_replicas == 8
        state = d.state
    assert run(cfg, observe(121, 8, [10.0] * 8, startup=120.0), state).desired_replicas == 1


def test_a_breach_is_a_p99_above_target_by_more_than_the_tolerance() -> None:
    fold = lambda m, ratio, now=0.0: update_capacity(  # noqa: E731
        m, now=now, qps_per_replica=50.0, p99_ratio=ratio, up_tolerance=0.1, forget_after=60.0
    )
    assert fold(CapacityMemory(), 1.1) == CapacityMemory()
    assert fold(CapacityMemory(), 1.2) == CapacityMemory(breach_qps=50.0, breach_time=0.0, breach_ratio=1.2)
    assert fold(CapacityMemory(), 1.0) == CapacityMemory(healthy_qps=50.0, healthy_time=0.0, healthy_ratio=1.0)
    # a breach learned longer ago than the memory lasts is forgotten before the new window folds in
    old = CapacityMemory(breach_qps=40.0, breach_time=0.0, breach_ratio=2.0)
    assert fold(old, 0.5, now=60.0) == CapacityMemory(healthy_qps=50.0, healthy_time=60.0, healthy_ratio=0.5)
    assert fold(old, 0.5, now=61.0) == CapacityMemory(healthy_qps=50.0, healthy_time=61.0, healthy_ratio=0.5)
    assert fold(old, 1.5, now=30.0).breach_qps == 40.0  # a higher breach does not raise the lowest one
    assert fold(old, 1.5, now=61.0).breach_qps == 50.0


def test_the_knee_is_forgotten_after_the_memory_time_and_not_before() -> None:
    memory = CapacityMemory(breach_qps=100.0, breach_time=0.0)
    assert learned_capacity(memory, now=60.0, forget_after=60.0) == pytest.approx(90.0)
    assert learned_capacity(memory, now=60.5, forget_after=60.0) is None
    stale_healthy = CapacityMemory(breach_qps=100.0, breach_time=50.0, healthy_qps=95.0, healthy_time=0.0)
    assert learned_capacity(stale_healthy, now=61.0, forget_after=60.0) == pytest.approx(90.0)
    assert learned_capacity(stale_healthy, now=59.0, forget_after=60.0) == pytest.approx(95.0)


def test_the_persisted_state_keeps_its_key_names() -> None:
    state = AutoscalerState(
        recommendations=(Timed(1.0, 3),),
        scale_up_events=(Timed(2.0, 1),),
        scale_down_events=(Timed(3.0, 2),),
        last_scale_time=4.0,
        last_scale_up_time=5.0,
        latency_scale_up_time=6.0,
        latency_scale_up_qps=7.0,
        last_load_qps=8.0,
        last_scale_down_time=9.0,
        down_window=10.0,
        down_window_time=11.0,
        capacity=CapacityMemory(12.0, 13.0, 14.0, 15.0, 16.0, 17.0),
    )
    stored = {
        "recommendations": [[1.0, 3]],
        "scaleUpEvents": [[2.0, 1]],
        "scaleDownEvents": [[3.0, 2]],
        "lastScaleTime": 4.0,
        "lastScaleUpTime": 5.0,
        "latencyScaleUpTime": 6.0,
        "latencyScaleUpQPS": 7.0,
        "lastLoadQPS": 8.0,
        "lastScaleDownTime": 9.0,
        "downWindow": 10.0,
        "downWindowTime": 11.0,
        "capacity": {
            "breachQPS": 12.0,
            "breachTime": 13.0,
            "healthyQPS": 14.0,
            "healthyTime": 15.0,
            "breachRatio": 16.0,
            "healthyRatio": 17.0,
        },
    }
    assert state.to_dict() == stored
    assert AutoscalerState.from_dict(stored) == state  # a restarted operator reads what an older one wrote
    assert AutoscalerState.from_dict({}) == AutoscalerState()
