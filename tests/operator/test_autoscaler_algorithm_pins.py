"""The autoscaler's decision at its edges: scale events kept, the knee's gates, latency steps, the status figures."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet_operator.autoscaler.algorithm import (
    AutoscalerState,
    CapacityMemory,
    Decision,
    Timed,
    build_status,
    learned_capacity,
    update_capacity,
)
from tests.operator.test_autoscaler_algorithm import config, observe, run

NO_DOWN_WINDOW = {"scaleDown": {"stabilizationWindowSeconds": 0}}


def two_pods_a_minute() -> dict[str, Any]:
    """apply_rate_limits' keyword arguments at time 0 with no events: 2 pods per 60 s, up and down."""
    from modelfleet_operator.autoscaler.behavior import PolicyType, ScalingPolicy
    from tests.operator.test_autoscaler_pins import rules

    two = ScalingPolicy(type=PolicyType.PODS, value=2, period_seconds=60)
    return {"now": 0.0, "up_events": (), "down_events": (), "up": rules("up", two), "down": rules("down", two)}


def test_a_scale_up_records_its_size_and_time_and_prunes_events_older_than_the_longest_period() -> None:
    old = (Timed(50.0, 1), Timed(60.0, 1), Timed(61.0, 1))  # at 75 the 15 s period keeps only what is after 60
    state = AutoscalerState(scale_up_events=old, scale_down_events=old, last_scale_time=10.0)
    d = run(config(), observe(75.0, 4, [150.0] * 4), state)
    assert d.desired_replicas == 6
    assert d.state.scale_up_events == (Timed(61.0, 1), Timed(75.0, 2))
    assert d.state.scale_down_events == (Timed(61.0, 1),)
    assert (d.state.last_scale_time, d.state.last_scale_up_time) == (75.0, 75.0)


def test_a_scale_down_records_its_size_and_time() -> None:
    d = run(config(behavior=NO_DOWN_WINDOW), observe(100.0, 4, [50.0] * 4), AutoscalerState())
    assert (d.desired_replicas, d.reason) == (2, "ScaledDown")
    assert d.state.scale_down_events == (Timed(100.0, 2),)
    assert (d.state.last_scale_time, d.state.last_scale_down_time, d.state.last_scale_up_time) == (100.0, 100.0, None)


def test_a_capacity_memory_of_zero_seconds_is_allowed_and_a_negative_one_refused() -> None:
    assert config(capacityMemorySeconds=0.5).capacity_memory_seconds == 0.5
    with pytest.raises(ValidationError, match="capacityMemorySeconds"):
        config(capacityMemorySeconds=-1)


def test_the_status_rounds_figures_to_three_decimals() -> None:
    d = run(config(targetP99LatencyMilliseconds=100.0), observe(0.0, 2, [33.33333] * 2, p99_ms=12.345678))
    status = build_status(d, last_scale_time=None)
    assert (status["qps"], status["p99Milliseconds"]) == (66.667, 12.346)
    assert isinstance(d, Decision)


def test_a_healthy_load_as_high_as_the_breach_leaves_the_breach_as_the_only_bound() -> None:
    both = CapacityMemory(breach_qps=100.0, breach_time=0.0, healthy_qps=100.0, healthy_time=0.0)
    assert learned_capacity(both, now=1.0, forget_after=60.0) == pytest.approx(90.0)


def test_a_load_under_one_qps_per_replica_still_teaches_the_knee() -> None:
    m = update_capacity(
        CapacityMemory(), now=0.0, qps_per_replica=0.5, p99_ratio=1.5, up_tolerance=0.1, forget_after=60.0
    )
    assert m.breach_qps == 0.5
    same = update_capacity(
        CapacityMemory(), now=0.0, qps_per_replica=0.0, p99_ratio=1.5, up_tolerance=0.1, forget_after=60.0
    )
    assert same == CapacityMemory()  # no load: nothing learned


def test_a_bounded_latency_step_adds_half_the_ready_replicas_rounded_up() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(1000.0, 3, [10.0] * 3, p99_ms=500.0), AutoscalerState())
    p99 = next(p for p in d.proposals if p.name == "p99")
    assert (p99.replicas, p99.note) == (5, "breach; bounded step")  # 3 + ceil(1.5)


def test_no_knee_is_learned_while_pods_start_or_from_a_window_without_observations() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    starting = run(cfg, observe(1000.0, 4, [10.0] * 3, unready=1, p99_ms=500.0), AutoscalerState())
    assert starting.state.capacity == CapacityMemory()
    empty = run(cfg, observe(1000.0, 3, [10.0] * 3, p99_ms=500.0, count=0.0), AutoscalerState())
    assert empty.state.capacity == CapacityMemory()
    one = run(cfg, observe(1000.0, 3, [10.0] * 3, p99_ms=500.0, count=1.0), AutoscalerState())
    assert one.state.capacity.breach_qps == pytest.approx(10.0)


def test_a_breach_within_the_tolerance_of_the_qps_target_teaches_the_knee() -> None:
    cfg = config(targetQPSPerReplica=100.0, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(1000.0, 3, [105.0] * 3, p99_ms=500.0), AutoscalerState())
    assert d.state.capacity.breach_qps == pytest.approx(105.0)
    above = run(cfg, observe(1000.0, 3, [111.0] * 3, p99_ms=500.0), AutoscalerState())
    assert above.state.capacity.breach_qps is None  # explained by the load, not by the knee


def test_a_latency_probe_is_held_only_while_the_load_stays_within_the_tolerance() -> None:
    cfg = config(behavior=NO_DOWN_WINDOW)
    probe = AutoscalerState(latency_scale_up_time=90.0, latency_scale_up_qps=400.0, last_load_qps=380.0)
    held = run(cfg, observe(100.0, 8, [47.5] * 8), probe)  # 380/s: within 10 % of the probe's 400/s
    assert (held.desired_replicas, held.limit) == (8, "HeldAfterLatencyScaleUp")
    fallen = run(cfg, observe(100.0, 8, [40.0] * 8), probe)  # 320/s: the fleet is sized for less now
    assert fallen.desired_replicas == 4 and fallen.limit != "HeldAfterLatencyScaleUp"
    ended = run(cfg, observe(90.0 + 301.0, 8, [47.5] * 8), probe)  # the hold lasts 300 s, not longer
    assert ended.desired_replicas == 4 and ended.limit != "HeldAfterLatencyScaleUp"


def test_rules_without_policies_have_no_period_to_count_events_over() -> None:
    from modelfleet_operator.autoscaler.behavior import ScalingRules, resolve_rules

    none = resolve_rules(ScalingRules(policies=[]), direction="down", tolerance=0.1)
    assert none.longest_period_seconds == 0


def test_a_percent_scale_down_policy_removes_that_share_of_the_replicas() -> None:
    from modelfleet_operator.autoscaler.behavior import PolicyType, ScalingPolicy, scale_down_limit
    from tests.operator.test_autoscaler_pins import rules

    sixty = rules("down", ScalingPolicy(type=PolicyType.PERCENT, value=60, period_seconds=60))
    assert scale_down_limit(current=200, now=0.0, up_events=(), down_events=(), rules=sixty) == 80


def test_a_desired_count_at_the_current_or_at_the_limit_is_within_range() -> None:
    from modelfleet_operator.autoscaler.behavior import apply_rate_limits

    kw = two_pods_a_minute()
    assert apply_rate_limits(desired=10, current=10, min_replicas=1, max_replicas=8, **kw) == (10, "DesiredWithinRange")
    assert apply_rate_limits(desired=8, current=10, min_replicas=1, max_replicas=20, **kw) == (8, "DesiredWithinRange")


def test_policy_periods_and_the_latency_step_are_bounded_where_the_api_says() -> None:
    from modelfleet_operator.autoscaler.behavior import PolicyType, ScalingPolicy

    assert ScalingPolicy(type=PolicyType.PODS, value=1, period_seconds=1800).period_seconds == 1800
    for bad in (0, 1801):
        with pytest.raises(ValidationError, match="period"):
            ScalingPolicy(type=PolicyType.PODS, value=1, period_seconds=bad)
    with pytest.raises(ValidationError, match="latencyMaxStepPercent"):
        config(latencyMaxStepPercent=0)


def test_stabilization_history_drops_recommendations_exactly_one_window_old() -> None:
    from modelfleet_operator.autoscaler.behavior import stabilize
    from tests.operator.test_autoscaler_pins import rules

    recs = (Timed(40.0, 9), Timed(41.0, 7))
    _, history = stabilize(
        desired=3, current=5, now=100.0, recommendations=recs, up=rules("up"), down=rules("down", window=60)
    )
    assert history == (Timed(41.0, 7), Timed(100.0, 3))


def test_a_desired_count_exactly_at_the_scale_up_limit_is_within_range() -> None:
    from modelfleet_operator.autoscaler.behavior import apply_rate_limits

    kw = two_pods_a_minute()
    assert apply_rate_limits(desired=12, current=10, min_replicas=1, max_replicas=20, **kw) == (
        12,
        "DesiredWithinRange",
    )


def test_a_ready_pod_without_a_rate_counts_as_idle_when_scaling_up() -> None:
    d = run(config(), observe(0.0, 4, [200.5, 200.5, 200.0, None]))
    assert d.desired_replicas == 7  # ceil((200.5 + 200.5 + 200 + 0) / 100)


def test_a_healthy_window_of_zero_latency_falls_back_without_interpolating() -> None:
    memory = CapacityMemory(
        breach_qps=100.0, breach_time=0.0, breach_ratio=2.0, healthy_qps=50.0, healthy_time=0.0, healthy_ratio=0.0
    )
    assert learned_capacity(memory, now=1.0, forget_after=60.0) == pytest.approx(90.0)


def fold(memory: CapacityMemory, qps: float, ratio: float, now: float) -> CapacityMemory:
    return update_capacity(memory, now=now, qps_per_replica=qps, p99_ratio=ratio, up_tolerance=0.1, forget_after=600.0)


def test_the_knee_keeps_its_tightest_evidence_and_refreshes_it() -> None:
    breach = fold(CapacityMemory(), 80.0, 2.0, now=0.0)
    again = fold(breach, 80.0, 1.5, now=30.0)  # the same load breaching again: evidence refreshed
    assert (again.breach_qps, again.breach_time, again.breach_ratio) == (80.0, 30.0, 1.5)
    healthy = fold(CapacityMemory(), 50.0, 0.5, now=400.0)
    above = fold(healthy, 80.0, 2.0, now=500.0)  # a breach above the healthy load leaves it healthy
    assert (above.healthy_qps, above.breach_qps) == (50.0, 80.0)
    lower = fold(fold(CapacityMemory(), 70.0, 0.6, now=0.0), 50.0, 0.5, now=10.0)
    assert (lower.healthy_qps, lower.healthy_time) == (70.0, 0.0)  # the highest healthy load is kept


def test_without_a_start_up_time_the_last_scale_up_settles_for_three_sync_periods() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    state = AutoscalerState(last_scale_up_time=100.0)

    def note(t: float) -> str:
        decision = run(cfg, observe(t, 4, [10.0] * 4, p99_ms=500.0), state)
        return next(p.note for p in decision.proposals if p.name == "p99")

    assert note(144.9) == "breach; waiting for the last scale-up to settle"
    assert note(145.5) == "breach; bounded step"


def test_the_p99_proposal_reports_its_target_in_milliseconds() -> None:
    d = run(config(targetP99LatencyMilliseconds=50.0), observe(0.0, 4, [10.0] * 4, p99_ms=20.0))
    assert next(p for p in d.proposals if p.name == "p99").target == 50.0


def test_a_p99_breach_alone_does_not_bypass_the_rate_limit() -> None:
    cfg = config(latencyStep="ratio", targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(0.0, 2, [50.0] * 2, p99_ms=500.0))
    assert (d.desired_replicas, d.limit) == (6, "ScaleUpLimit")  # QPS is below target: no confirmed overload


def test_a_scale_down_held_by_the_window_alone_says_only_that() -> None:
    d = run(config(targetP99LatencyMilliseconds=50.0), observe(0.0, 4, [10.0] * 4, p99_ms=20.0))
    assert (d.desired_replicas, d.limit) == (4, "ScaleDownStabilized")


def test_every_p99_proposal_reports_its_target_in_milliseconds_even_without_a_reading() -> None:
    cfg = config(targetP99LatencyMilliseconds=50.0)
    missing = run(cfg, observe(0.0, 4, [10.0] * 4, latency_available=False))
    idle = run(cfg, observe(0.0, 4, [10.0] * 4))  # no p99: no requests in the window
    for d, note, replicas in ((missing, "no pod could be read", None), (idle, "no requests in the window", 0)):
        p99 = next(p for p in d.proposals if p.name == "p99")
        assert (p99.target, p99.note, p99.replicas) == (50.0, note, replicas)


def test_a_decision_says_whether_it_changes_the_count() -> None:
    assert run(config(), observe(0.0, 4, [150.0] * 4)).changed
    assert run(config(behavior=NO_DOWN_WINDOW), observe(0.0, 4, [50.0] * 4)).changed
    assert not run(config(), observe(0.0, 4, [100.0] * 4)).changed


def test_the_documented_defaults_hold() -> None:
    cfg = config()
    assert (cfg.max_scale_down_window_seconds, cfg.capacity_memory_seconds, cfg.latency_max_step_percent) == (
        900,
        7200.0,
        50.0,
    )


def test_recent_scale_ups_lower_where_a_scale_down_may_start_from() -> None:
    from modelfleet_operator.autoscaler.behavior import PolicyType, ScalingPolicy, scale_down_limit
    from tests.operator.test_autoscaler_pins import rules

    two = rules("down", ScalingPolicy(type=PolicyType.PODS, value=2, period_seconds=60))
    recent = (Timed(-10.0, 4),)  # 4 of the 10 were added 10 s ago
    assert scale_down_limit(current=10, now=0.0, up_events=recent, down_events=(), rules=two) == 4


def test_window_tolerance_and_scale_down_window_bounds_are_where_the_api_says() -> None:
    from modelfleet_operator.autoscaler.behavior import ScalingRules

    assert ScalingRules(stabilization_window_seconds=3600, tolerance=1.0).tolerance == 1.0
    with pytest.raises(ValidationError, match="stabilization_window_seconds"):
        ScalingRules(stabilization_window_seconds=3601)
    with pytest.raises(ValidationError, match="tolerance"):
        ScalingRules(tolerance=1.5)
    assert config(maxScaleDownWindowSeconds=0).max_scale_down_window_seconds == 0
    assert config(maxScaleDownWindowSeconds=3600).max_scale_down_window_seconds == 3600
    for bad in (-1, 3601):
        with pytest.raises(ValidationError, match="maxScaleDownWindowSeconds"):
            config(maxScaleDownWindowSeconds=bad)


def test_a_desired_count_at_the_current_below_the_minimum_is_within_range() -> None:
    from modelfleet_operator.autoscaler.behavior import apply_rate_limits

    kw = two_pods_a_minute()
    assert apply_rate_limits(desired=2, current=2, min_replicas=5, max_replicas=20, **kw) == (2, "DesiredWithinRange")


def test_unready_pods_count_as_idle_on_a_scale_up_and_can_cancel_it() -> None:
    d = run(config(), observe(0.0, 4, [150.0, 150.0], unready=2))
    qps = next(p for p in d.proposals if p.name == "qps")
    assert (qps.replicas, qps.note) == (4, "0 missing, 2 not ready; within tolerance after filling in")


def test_a_breach_while_pods_start_names_how_many_start() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(1000.0, 2, [10.0], unready=1, p99_ms=500.0))
    assert next(p.note for p in d.proposals if p.name == "p99") == "breach; waiting for 1 starting pods"


def test_no_rate_means_nothing_learned() -> None:
    m = update_capacity(
        CapacityMemory(), now=0.0, qps_per_replica=None, p99_ratio=1.5, up_tolerance=0.1, forget_after=60.0
    )
    assert m == CapacityMemory()


def test_a_small_load_that_moved_by_more_than_the_tolerance_is_not_steady() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    moved = run(cfg, observe(1000.0, 1, [0.58], p99_ms=500.0), AutoscalerState(last_load_qps=0.5))
    assert moved.state.capacity == CapacityMemory()  # 16 % up: a burst, not a knee
    steady = run(cfg, observe(1000.0, 1, [0.52], p99_ms=500.0), AutoscalerState(last_load_qps=0.5))
    assert steady.state.capacity.breach_qps == pytest.approx(0.52)


def test_max_and_min_replicas_name_themselves_when_they_bind_exactly_at_the_rate_limit() -> None:
    from modelfleet_operator.autoscaler.behavior import apply_rate_limits

    kw = two_pods_a_minute()
    assert apply_rate_limits(desired=30, current=10, min_replicas=1, max_replicas=12, **kw) == (12, "TooManyReplicas")
    assert apply_rate_limits(desired=1, current=10, min_replicas=8, max_replicas=20, **kw) == (8, "TooFewReplicas")


def test_a_percent_scale_up_policy_adds_that_share_rounded_up() -> None:
    from modelfleet_operator.autoscaler.behavior import PolicyType, ScalingPolicy, scale_up_limit
    from tests.operator.test_autoscaler_pins import rules

    half = rules("up", ScalingPolicy(type=PolicyType.PERCENT, value=50, period_seconds=60))
    assert scale_up_limit(current=300, now=0.0, up_events=(), down_events=(), rules=half) == 450


def test_a_confirmed_overload_stops_at_max_replicas_and_says_so() -> None:
    d = run(config(maxReplicas=5, targetP99LatencyMilliseconds=50.0), observe(1000.0, 2, [300.0] * 2, p99_ms=500.0))
    assert (d.desired_replicas, d.limit) == (5, "TooManyReplicas")


def test_a_scale_up_the_qps_signal_asks_as_much_as_latency_is_not_a_latency_probe() -> None:
    d = run(config(targetP99LatencyMilliseconds=50.0), observe(1000.0, 4, [150.0] * 4, p99_ms=500.0))
    assert [(p.name, p.replicas) for p in d.proposals] == [("qps", 6), ("p99", 6)]
    assert (d.desired_replicas, d.state.latency_scale_up_time) == (6, None)


def test_a_healthy_load_is_remembered_up_to_the_memory_time_and_without_a_ratio_bounds_the_knee() -> None:
    stale = CapacityMemory(breach_qps=100.0, breach_time=50.0, healthy_qps=95.0, healthy_time=0.0)
    assert learned_capacity(stale, now=60.0, forget_after=60.0) == pytest.approx(95.0)  # exactly 60 s: kept
    no_ratio = CapacityMemory(
        breach_qps=100.0, breach_time=0.0, breach_ratio=2.0, healthy_qps=50.0, healthy_time=0.0, healthy_ratio=None
    )
    assert learned_capacity(no_ratio, now=1.0, forget_after=60.0) == pytest.approx(90.0)


def test_a_ready_pod_without_a_rate_counts_as_starting() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(1000.0, 3, [10.0, 10.0, None], p99_ms=500.0))
    assert next(p.note for p in d.proposals if p.name == "p99") == "breach; waiting for 1 starting pods"


def test_tolerance_and_the_start_up_factor_must_be_positive() -> None:
    for field, bad in (("tolerance", -0.5), ("scaleDownWindowStartupFactor", 0.0)):
        with pytest.raises(ValidationError, match=field):
            config(**{field: bad})
