"""The autoscaler's pure algorithm: HPA arithmetic, its deliberate departures, and its invariants."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from modelfleet_operator.api import AutoscalingSpec
from modelfleet_operator.autoscaler.algorithm import (
    ArchitectureShare,
    AutoscalerConfig,
    AutoscalerState,
    CapacityMemory,
    Decision,
    Observation,
    PodObservation,
    Timed,
    build_status,
    decide,
    learned_capacity,
    split_across_architectures,
)
from modelfleet_operator.controller import Controller

# The algorithm reduced to the HPA: p99 by HPA ratio arithmetic, HPA rate limits, a fixed 300 s window.
HPA_LIKE: dict[str, Any] = {
    "latencyStep": "ratio",
    "overloadBypassesRateLimit": False,
    "scaleDownWindowStartupFactor": None,
    "adaptiveScaleDownWindow": False,
}


def config(**fields: Any) -> AutoscalerConfig:
    data: dict[str, Any] = {"minReplicas": 1, "maxReplicas": 100, "targetQPSPerReplica": 100.0}
    data.update(fields)
    return AutoscalerConfig.model_validate(data)


def hpa_config(**fields: Any) -> AutoscalerConfig:
    return config(**{**HPA_LIKE, **fields})


def observe(
    now: float,
    current: int,
    qps: list[float | None],
    *,
    unready: int = 0,
    p99_ms: float | None = None,
    count: float = 1000.0,
    startup: float | None = None,
    latency_available: bool = True,
) -> Observation:
    pods = [PodObservation(f"p{i}", True, q) for i, q in enumerate(qps)]
    pods += [PodObservation(f"u{i}", False, None) for i in range(unready)]
    return Observation(
        now=now,
        current_replicas=current,
        pods=tuple(pods),
        p99_seconds=None if p99_ms is None else p99_ms / 1000.0,
        latency_count=count if p99_ms is not None else 0.0,
        latency_available=latency_available,
        startup_seconds=startup,
    )


def run(cfg: AutoscalerConfig, obs: Observation, state: AutoscalerState | None = None) -> Decision:
    return decide(cfg, obs, state or AutoscalerState())


# ---------------------------------------------------------------------------------------------------------
# HPA arithmetic


def test_qps_signal_is_ceil_of_ready_times_ratio() -> None:
    d = run(hpa_config(), observe(0, 4, [150.0] * 4))
    assert d.desired_replicas == 6  # ceil(4 * 150/100)
    assert d.reason == "ScaledUp"
    assert d.qps == pytest.approx(600.0)


def test_inside_the_tolerance_nothing_changes() -> None:
    d = run(hpa_config(), observe(0, 4, [108.0] * 4))
    assert d.desired_replicas == 4
    assert "within tolerance" in d.message


def test_tolerance_is_configurable() -> None:
    d = run(hpa_config(tolerance=0.02), observe(0, 4, [108.0] * 4))
    assert d.desired_replicas == 5


def test_missing_pods_count_as_target_on_a_scale_down() -> None:
    # Ratio 0.5 on the 3 reporting pods; the missing one counts as 100 % -> (50*3 + 100)/400 = 0.625 -> 3.
    d = run(
        hpa_config(**{"behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}),
        observe(0, 4, [50.0] * 3 + [None]),
    )
    assert d.desired_replicas == 3


def test_missing_pods_count_as_zero_on_a_scale_up() -> None:
    # Ratio 2 on the 3 reporting pods; the missing one counts as 0 -> 600/400 = 1.5 -> 6.
    d = run(hpa_config(), observe(0, 4, [200.0] * 3 + [None]))
    assert d.desired_replicas == 6


def test_not_ready_pods_count_as_zero_on_a_scale_up() -> None:
    # 2 ready at 300/s, 1 starting: (600 + 0)/(3*100) = 2 -> 6.
    d = run(hpa_config(), observe(0, 3, [300.0, 300.0], unready=1))
    assert d.desired_replicas == 6


def test_filling_in_pods_that_flips_the_direction_keeps_the_current_count() -> None:
    # 2 ready at 120/s (ratio 1.2), 2 starting: filled ratio 0.6 < 1 -> the HPA keeps the current count.
    d = run(hpa_config(), observe(0, 4, [120.0, 120.0], unready=2))
    assert d.desired_replicas == 4


def test_not_ready_pods_are_left_out_of_a_scale_down() -> None:
    cfg = hpa_config(**{"behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}})
    d = run(cfg, observe(0, 4, [20.0, 20.0], unready=2))
    assert d.desired_replicas == 1  # ceil(2 * 0.2)


def test_p99_signal_uses_hpa_ratio_arithmetic_in_ratio_mode() -> None:
    cfg = hpa_config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(0, 4, [10.0] * 4, p99_ms=100.0))
    assert d.desired_replicas == 8  # ceil(4 * 100/50)
    assert [p.name for p in d.proposals] == ["p99"]


def test_the_largest_proposal_wins() -> None:
    cfg = hpa_config(targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(0, 4, [150.0] * 4, p99_ms=150.0))
    assert {p.name: p.replicas for p in d.proposals} == {"qps": 6, "p99": 12}
    assert d.recommendation == 12
    assert d.desired_replicas == 8  # then the HPA's rate limit: max(4 + 4 pods, 2 * 4) per 15 s


def test_scale_up_is_rate_limited_like_the_hpa() -> None:
    d = run(hpa_config(), observe(0, 2, [1000.0, 1000.0]))
    assert d.recommendation == 20
    assert d.desired_replicas == 6  # max(2 + 4 pods, 2 * 2) per 15 s
    assert "ScaleUpLimit" in d.limit
    d2 = run(hpa_config(), observe(15, 6, [1000.0 / 3] * 6), d.state)
    assert d2.desired_replicas == 12  # the previous event left the 15 s period: max(6 + 4, 12)
    d3 = run(hpa_config(), observe(10, 6, [1000.0 / 3] * 6), d.state)
    assert d3.desired_replicas == 6  # still inside the period that started at 2: max(2 + 4, 4) = 6


def test_select_policy_min_and_disabled() -> None:
    up_min = {"behavior": {"scaleUp": {"selectPolicy": "Min"}}}
    assert run(hpa_config(**up_min), observe(0, 2, [1000.0, 1000.0])).desired_replicas == 4
    disabled = {"behavior": {"scaleUp": {"selectPolicy": "Disabled"}}}
    d = run(hpa_config(**disabled), observe(0, 2, [1000.0, 1000.0]))
    assert d.desired_replicas == 2
    assert d.reason == "NoChange"


def test_scale_down_rate_policy_counts_what_was_removed_in_the_period() -> None:
    behavior = {
        "scaleDown": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        }
    }
    cfg = hpa_config(behavior=behavior)
    d1 = run(cfg, observe(0, 10, [10.0] * 10))
    assert d1.desired_replicas == 9
    assert d1.limit == "ScaleDownLimit"
    d2 = run(cfg, observe(15, 9, [10.0] * 9), d1.state)
    assert d2.desired_replicas == 9  # one pod already removed in this 60 s period
    d3 = run(cfg, observe(61, 9, [10.0] * 9), d2.state)
    assert d3.desired_replicas == 8


def test_scale_down_waits_for_the_stabilization_window() -> None:
    cfg = hpa_config()
    d = run(cfg, observe(0, 4, [200.0] * 4))
    assert d.desired_replicas == 8
    state, current = d.state, 8
    for t in range(15, 300, 15):
        d = run(cfg, observe(t, current, [10.0] * current), state)
        assert d.desired_replicas == 8, t
        assert "ScaleDownStabilized" in d.limit
        state = d.state
    d = run(cfg, observe(300, current, [10.0] * current), state)
    assert d.desired_replicas == 1  # the scale-up recommendation at t=0 has left the 300 s window


@pytest.mark.parametrize("direction", ["scaleUp", "scaleDown"])
def test_a_window_given_alone_keeps_the_default_rate_policies(direction: str) -> None:
    # Found by the real-pod suite: a spec naming only the window reached the algorithm with `policies: []`,
    # and no policy meant no change ever allowed in that direction.
    spec = AutoscalingSpec.model_validate(
        {
            "maxReplicas": 10,
            "targetQPSPerReplica": 100,
            "behavior": {direction: {"stabilizationWindowSeconds": 0}},
        }
    )
    cfg = Controller._autoscaler_config_from(spec)
    assert run(cfg, observe(0, 4, [10.0] * 4)).desired_replicas == (4 if direction == "scaleUp" else 1)
    assert run(cfg, observe(0, 4, [200.0] * 4)).desired_replicas == 8


def test_an_empty_policy_list_is_refused_as_the_hpa_refuses_it() -> None:
    with pytest.raises(ValidationError, match="policies"):
        AutoscalingSpec.model_validate(
            {"maxReplicas": 10, "targetQPSPerReplica": 100, "behavior": {"scaleDown": {"policies": []}}}
        )


def test_without_history_the_current_count_stands_for_a_window() -> None:
    # HPA recordInitialRecommendation: a new model (or a lost state) does not scale down on its first
    # reading, which may be a truncated window; it waits one scale-down window like any other.
    cfg = hpa_config()
    d = run(cfg, observe(0, 10, [50.0] * 10))
    assert d.desired_replicas == 10
    assert "ScaleDownStabilized" in d.limit
    d = run(cfg, observe(300, 10, [50.0] * 10), d.state)
    assert d.desired_replicas == 5
    # Scaling up needs no history.
    assert run(cfg, observe(0, 4, [200.0] * 4)).desired_replicas == 8


def test_bounds_apply_to_the_result_and_to_an_out_of_range_current_count() -> None:
    cfg = hpa_config(minReplicas=2, maxReplicas=5)
    d = run(cfg, observe(0, 4, [400.0] * 4))
    assert d.desired_replicas == 5
    assert "TooManyReplicas" in d.limit
    assert run(cfg, observe(0, 9, [1.0] * 9)).desired_replicas == 5
    low = run(cfg, observe(0, 1, [1.0]))
    assert low.desired_replicas == 2
    assert "below minReplicas" in low.message
    assert run(cfg, observe(0, 0, [])).desired_replicas == 2  # not created yet: go to the minimum


def test_no_metrics_at_all_keeps_the_current_count() -> None:
    d = run(config(targetP99LatencyMilliseconds=50.0), observe(0, 4, [None] * 4, latency_available=False))
    assert d.desired_replicas == 4
    assert d.reason == "MetricsUnavailable"


def test_a_missing_signal_blocks_scale_down_but_not_scale_up() -> None:
    cfg = hpa_config(targetP99LatencyMilliseconds=50.0)
    down = run(cfg, observe(0, 4, [10.0] * 4, latency_available=False))
    assert down.desired_replicas == 4
    assert down.limit == "PartialMetrics"
    up = run(cfg, observe(0, 4, [150.0] * 4, latency_available=False))
    assert up.desired_replicas == 6


def test_idle_model_scales_to_the_minimum() -> None:
    cfg = config(targetP99LatencyMilliseconds=50.0, behavior={"scaleDown": {"stabilizationWindowSeconds": 0}})
    d = run(cfg, observe(0, 4, [0.0] * 4, p99_ms=None))
    assert d.desired_replicas == 1
    assert any(p.name == "p99" and p.note == "no requests in the window" for p in d.proposals)


# ---------------------------------------------------------------------------------------------------------
# modelfleet's departures from the HPA (each one found necessary in bench/autoscale_sim.py)


def test_bounded_latency_step_caps_a_breach_at_half_the_ready_pods() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(0, 4, [10.0] * 4, p99_ms=500.0))
    assert next(p for p in d.proposals if p.name == "p99").replicas == 6  # not ceil(4 * 10) = 40


def test_latency_breach_waits_while_pods_are_starting() -> None:
    cfg = config(targetQPSPerReplica=None, targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(0, 6, [10.0] * 4, unready=2, p99_ms=500.0))
    p99 = next(p for p in d.proposals if p.name == "p99")
    assert p99.replicas == 6
    assert "starting" in p99.note


def test_latency_below_target_abstains_when_qps_sizes_the_fleet() -> None:
    d = run(config(targetP99LatencyMilliseconds=50.0), observe(0, 4, [100.0] * 4, p99_ms=10.0))
    assert next(p for p in d.proposals if p.name == "p99").replicas == 0
    assert d.desired_replicas == 4


def test_confirmed_overload_skips_the_scale_up_rate_limit() -> None:
    cfg = config(targetP99LatencyMilliseconds=50.0)
    d = run(cfg, observe(0, 2, [1000.0, 1000.0], p99_ms=400.0))
    assert d.desired_replicas == 20
    assert "ConfirmedOverload" in d.limit
    # Without the latency confirmation the HPA limit stands.
    assert run(cfg, observe(0, 2, [1000.0, 1000.0], p99_ms=20.0)).desired_replicas == 6


def test_a_breach_at_steady_load_below_the_qps_target_teaches_the_knee() -> None:
    cfg = config(targetQPSPerReplica=100.0, targetP99LatencyMilliseconds=50.0)
    unsteady = run(cfg, observe(0, 4, [90.0] * 4, p99_ms=80.0), AutoscalerState(last_load_qps=250.0))
    assert unsteady.state.capacity.breach_qps is None  # the load moved between windows: nothing learned
    steady = run(cfg, observe(0, 4, [90.0] * 4, p99_ms=80.0), AutoscalerState(last_load_qps=360.0))
    assert steady.state.capacity.breach_qps == pytest.approx(90.0)
    assert steady.desired_replicas == 6  # the bounded latency step: +50 % of 4 ready pods
    # Once the scale-up has settled, the QPS signal sizes for 90 % of the breach load, not for 100/s.
    later = run(cfg, observe(100, 6, [60.0] * 6, p99_ms=30.0), steady.state)
    qps = next(p for p in later.proposals if p.name == "qps")
    assert qps.target == pytest.approx(81.0)
    assert "knee" in qps.note
    assert qps.replicas == 5  # ceil(6 * 60/81); with the configured 100/s it would be 4


def test_learned_capacity_is_between_healthy_and_breach_and_forgotten() -> None:
    memory = CapacityMemory(breach_qps=100.0, breach_time=0.0, healthy_qps=95.0, healthy_time=0.0)
    assert learned_capacity(memory, now=10.0, forget_after=60.0) == pytest.approx(95.0)
    quiet = CapacityMemory(breach_qps=100.0, breach_time=0.0, healthy_qps=20.0, healthy_time=0.0)
    assert learned_capacity(quiet, now=10.0, forget_after=60.0) == pytest.approx(90.0)
    assert learned_capacity(memory, now=61.0, forget_after=60.0) is None


def test_the_knee_is_interpolated_on_log_p99_between_healthy_and_breach() -> None:
    memory = CapacityMemory(
        breach_qps=100.0, breach_time=0.0, breach_ratio=2.0, healthy_qps=50.0, healthy_time=0.0, healthy_ratio=0.5
    )
    # log p99 crosses 0.9 x target at (ln 0.9 - ln 0.5) / (ln 2 - ln 0.5) = 42.4 % of the way from 50 to 100.
    assert learned_capacity(memory, now=1.0, forget_after=60.0) == pytest.approx(71.2, abs=0.05)
    # A healthy point already past 0.9 x target is where the fleet stays.
    near = CapacityMemory(
        breach_qps=100.0, breach_time=0.0, breach_ratio=2.0, healthy_qps=80.0, healthy_time=0.0, healthy_ratio=0.95
    )
    assert learned_capacity(near, now=1.0, forget_after=60.0) == pytest.approx(80.0)


def steady_p99_ms(qps_per_replica: float) -> float:
    """A replica whose p99 is 20 ms up to 50/s and doubles every further 10/s (so 100 ms at ~73/s)."""
    return 20.0 * 2.0 ** (max(0.0, qps_per_replica - 50.0) / 10.0)


@pytest.mark.parametrize("target_qps", [90.0, 120.0, 200.0])
def test_steady_load_with_a_qps_target_past_the_knee_settles_without_a_flap(target_qps: float) -> None:
    # 600/s of steady load; the QPS target alone would run the replicas far past where p99 turns.
    cfg = config(targetQPSPerReplica=target_qps, targetP99LatencyMilliseconds=100.0)
    load, replicas, state = 600.0, math.ceil(600.0 / target_qps), AutoscalerState()
    moves: list[tuple[float, int]] = []
    for tick in range(1, 241):  # an hour of 15 s syncs
        now = 15.0 * tick
        per = load / replicas
        d = run(cfg, observe(now, replicas, [per] * replicas, p99_ms=steady_p99_ms(per), startup=30.0), state)
        if d.desired_replicas != replicas:
            moves.append((now, d.desired_replicas - replicas))
        replicas, state = d.desired_replicas, d.state
    reversals = [(a, b) for a, b in itertools.pairwise(moves) if (a[1] > 0) != (b[1] > 0) and b[0] - a[0] < 300]
    assert reversals == []
    assert steady_p99_ms(load / replicas) <= 100.0  # it found the knee...
    assert steady_p99_ms(load / (replicas - 1)) > 90.0  # ...and does not sit far below it


def test_with_p99_over_target_the_qps_signal_has_no_dead_band_upwards() -> None:
    cfg = config(targetP99LatencyMilliseconds=100.0)
    calm = run(cfg, observe(0, 10, [106.0] * 10, p99_ms=50.0))
    assert calm.desired_replicas == 10  # 6 % over target: inside the tolerance
    breach = run(cfg, observe(0, 10, [106.0] * 10, p99_ms=150.0))
    qps = next(p for p in breach.proposals if p.name == "qps")
    assert qps.replicas == 11  # ceil(10 x 1.06): latency says the 6 % is real
    assert breach.desired_replicas >= 11


def test_a_latency_probe_is_held_only_while_the_load_stays() -> None:
    cfg = config(targetQPSPerReplica=100.0, targetP99LatencyMilliseconds=100.0)
    probe = run(cfg, observe(0, 10, [95.0] * 10, p99_ms=150.0, startup=60.0))
    assert probe.desired_replicas > 10 and probe.limit != "HeldAfterLatencyScaleUp"
    n, state = probe.desired_replicas, probe.state
    assert state.latency_scale_up_time == 0.0
    # Past the scale-down window, at the same load (950/s), the probe's pods stay: undoing it is a flap.
    same = run(cfg, observe(200, n, [950.0 / n] * n, p99_ms=60.0, startup=60.0), state)
    assert same.desired_replicas == n and same.limit == "HeldAfterLatencyScaleUp"
    # At a fifth of that load the fleet is sized for something else: the hold is void.
    less = run(cfg, observe(200, n, [190.0 / n] * n, p99_ms=30.0, startup=60.0), state)
    assert less.desired_replicas < n


def test_a_step_up_during_a_probe_hold_extends_the_hold() -> None:
    cfg = config(targetQPSPerReplica=100.0, targetP99LatencyMilliseconds=100.0)
    probe = run(cfg, observe(0, 10, [95.0] * 10, p99_ms=150.0, startup=60.0))
    assert probe.desired_replicas == 15
    # 5 s later, with the probe's pods still starting, more load: the QPS signal (sized by the knee the
    # probe taught) leads a further step, while p99 waits for the starting pods.
    step = run(cfg, observe(5, 15, [150.0] * 10, unready=5, p99_ms=150.0, startup=60.0), probe.state)
    assert step.desired_replicas > 15
    m, state = step.desired_replicas, step.state
    assert state.latency_scale_up_time == 5.0
    # 302 s: 5 min after the probe but not after the step, at nearly the same load; undoing the step now
    # would be a flap.
    late = run(cfg, observe(302, m, [1360.0 / m] * m, p99_ms=60.0, startup=60.0), state)
    assert late.desired_replicas == m and late.limit == "HeldAfterLatencyScaleUp"


def test_scale_down_window_follows_the_pod_start_up_time() -> None:
    cfg = config()
    d = run(cfg, observe(0, 4, [200.0] * 4, startup=60.0))
    assert d.desired_replicas == 8
    state = d.state
    for t in (15, 30, 45):
        d = run(cfg, observe(t, 8, [10.0] * 8, startup=60.0), state)
        assert d.desired_replicas == 8
        state = d.state
    d = run(cfg, observe(60, 8, [10.0] * 8, startup=60.0), state)
    assert d.desired_replicas == 1  # a 60 s window (1 x start-up), not the HPA's 300 s


def test_a_reversal_soon_after_a_scale_down_lengthens_the_window() -> None:
    cfg = config()
    state = AutoscalerState(down_window=60.0, down_window_time=None, last_scale_down_time=0.0)
    d = run(cfg, observe(100, 2, [300.0, 300.0], startup=60.0), state)
    assert d.desired_replicas > 2
    # The first reversal goes straight to the HPA's 300 s (recurring load: doubling from one start-up
    # time would lose a burst per step), the next ones double.
    assert d.state.down_window == pytest.approx(300.0)
    again = replace(d.state, last_scale_down_time=200.0)
    n = d.desired_replicas
    d2 = run(cfg, observe(250, n, [300.0] * n, startup=60.0), again)
    assert d2.desired_replicas > n
    assert d2.state.down_window == pytest.approx(600.0)
    m = d2.desired_replicas
    later = run(cfg, observe(250 + 1800, m, [300.0] * m, startup=60.0), d2.state)
    assert later.state.down_window == pytest.approx(300.0)  # half-life of 30 minutes back to the base


def test_an_explicit_window_is_used_as_is() -> None:
    cfg = config(behavior={"scaleDown": {"stabilizationWindowSeconds": 30}})
    d = run(cfg, observe(0, 4, [200.0] * 4, startup=600.0))
    d2 = run(cfg, observe(31, 8, [10.0] * 8, startup=600.0), d.state)
    assert d2.desired_replicas == 1


# ---------------------------------------------------------------------------------------------------------
# Configuration, state and status


def test_config_accepts_the_crd_field_names() -> None:
    cfg = AutoscalerConfig.model_validate(
        {
            "minReplicas": 2,
            "maxReplicas": 20,
            "targetQPSPerReplica": 300,
            "targetP99LatencyMilliseconds": 50,
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}],
                },
                "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Min"},
            },
        }
    )
    assert cfg.behavior.scale_up is not None
    assert cfg.behavior.scale_up.policies is not None
    assert cfg.behavior.scale_up.policies[0].period_seconds == 15


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"minReplicas": 5, "maxReplicas": 2, "targetQPSPerReplica": 1}, "minReplicas"),
        ({"maxReplicas": 2}, "targetQPSPerReplica"),
        ({"maxReplicas": 2, "targetQPSPerReplica": -1}, "targetQPSPerReplica"),
        (
            {"maxReplicas": 2, "targetQPSPerReplica": 1, "behavior": {"scaleUp": {"selectPolicy": "Most"}}},
            "selectPolicy",
        ),
        (
            {
                "maxReplicas": 2,
                "targetQPSPerReplica": 1,
                "behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 15}]}},
            },
            "value",
        ),
    ],
)
def test_bad_config_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        AutoscalerConfig.model_validate(data)


def test_state_round_trips_through_a_dict() -> None:
    state = AutoscalerState(
        recommendations=(Timed(1.0, 3), Timed(16.0, 4)),
        scale_up_events=(Timed(16.0, 1),),
        last_scale_time=16.0,
        last_scale_up_time=16.0,
        last_load_qps=120.0,
        down_window=120.0,
        down_window_time=16.0,
        latency_scale_up_time=16.0,
        latency_scale_up_qps=400.0,
        capacity=CapacityMemory(
            breach_qps=100.0, breach_time=3.0, healthy_qps=80.0, healthy_time=2.0, breach_ratio=1.5, healthy_ratio=0.6
        ),
    )
    assert AutoscalerState.from_dict(state.to_dict()) == state


def test_status_and_message_carry_inputs_and_reason() -> None:
    d = run(hpa_config(targetP99LatencyMilliseconds=50.0), observe(0, 4, [150.0] * 4, p99_ms=20.0))
    status = build_status(d, last_scale_time="2025-01-01T00:00:00Z")
    assert status["desiredReplicas"] == d.desired_replicas == 6
    assert status["currentReplicas"] == 4
    assert status["qps"] == pytest.approx(600.0)
    assert status["p99Milliseconds"] == pytest.approx(20.0)
    assert status["lastScaleTime"] == "2025-01-01T00:00:00Z"
    assert "qps 150/s per replica vs target 100/s per replica -> 6" in status["reason"]
    assert "p99 20 ms vs target 50 ms" in status["reason"]


# ---------------------------------------------------------------------------------------------------------
# Architectures


def test_split_weights_by_throughput_with_one_each_first() -> None:
    split = split_across_architectures(
        10,
        [
            ArchitectureShare("sm90", nodes=2, throughput_per_replica=3000.0),
            ArchitectureShare("sm80", nodes=2, throughput_per_replica=1000.0),
        ],
    )
    assert split == {"sm90": 7, "sm80": 3}  # 1 each, then 8 split 6/2


def test_split_unknown_throughput_counts_as_the_mean_and_empty_arches_get_none() -> None:
    split = split_across_architectures(
        9,
        [
            ArchitectureShare("sm90", nodes=1, throughput_per_replica=2000.0),
            ArchitectureShare("sm89", nodes=3),
            ArchitectureShare("sm80", nodes=1, throughput_per_replica=2000.0),
            ArchitectureShare("sm75", nodes=0, throughput_per_replica=9000.0),
        ],
    )
    assert split == {"sm90": 3, "sm89": 3, "sm80": 3, "sm75": 0}


def test_split_below_the_number_of_arches_favours_the_fastest() -> None:
    arches = [
        ArchitectureShare("sm75", nodes=1, throughput_per_replica=500.0),
        ArchitectureShare("sm90", nodes=1, throughput_per_replica=3000.0),
        ArchitectureShare("sm80", nodes=1, throughput_per_replica=1000.0),
    ]
    assert split_across_architectures(2, arches) == {"sm75": 0, "sm90": 1, "sm80": 1}
    assert split_across_architectures(0, arches) == {"sm75": 0, "sm90": 0, "sm80": 0}


def test_split_respects_caps_and_moves_the_excess() -> None:
    split = split_across_architectures(
        10,
        [
            ArchitectureShare("sm90", nodes=1, throughput_per_replica=9000.0, max_replicas=3),
            ArchitectureShare("sm80", nodes=4, throughput_per_replica=1000.0),
        ],
    )
    assert split == {"sm90": 3, "sm80": 7}


def test_split_rounds_by_largest_remainder_not_by_weight() -> None:
    # 1 each, then 4 by weight 5:3:2 = 2.0 / 1.2 / 0.8: the spare replica goes to the largest remainder (sm75)
    split = split_across_architectures(
        7,
        [
            ArchitectureShare("sm90", nodes=1, throughput_per_replica=5.0),
            ArchitectureShare("sm80", nodes=1, throughput_per_replica=3.0),
            ArchitectureShare("sm75", nodes=1, throughput_per_replica=2.0),
        ],
    )
    assert split == {"sm90": 3, "sm80": 2, "sm75": 2}


def test_split_equal_remainders_go_to_the_heavier_then_the_newest() -> None:
    # 1 each, then 2 by weight 3:1 = 1.5 / 0.5: equal remainders, so the heavier (older) sm80 gets the spare
    heavier_older = [
        ArchitectureShare("sm80", nodes=1, throughput_per_replica=3.0),
        ArchitectureShare("sm90", nodes=1, throughput_per_replica=1.0),
    ]
    assert split_across_architectures(4, heavier_older) == {"sm80": 3, "sm90": 1}
    # fewer replicas than architectures: the fastest first, even when it is the oldest
    assert split_across_architectures(1, heavier_older) == {"sm80": 1, "sm90": 0}


def test_split_unknown_throughput_is_the_exact_mean_of_the_measured() -> None:
    # weights 2 / 1 / mean 1.5 over 9 spare replicas: 4 / 2 / 3 exactly (a mean rounded down to 1 gives 6/3/3)
    split = split_across_architectures(
        12,
        [
            ArchitectureShare("sm90", nodes=1, throughput_per_replica=2.0),
            ArchitectureShare("sm80", nodes=1, throughput_per_replica=1.0),
            ArchitectureShare("sm89", nodes=1),
        ],
    )
    assert split == {"sm90": 5, "sm80": 3, "sm89": 4}


def test_split_a_cap_reached_by_the_first_replica_sends_its_share_to_the_others() -> None:
    split = split_across_architectures(
        6,
        [
            ArchitectureShare("sm90", nodes=1, throughput_per_replica=10.0, max_replicas=1),
            ArchitectureShare("sm80", nodes=1, throughput_per_replica=1.0),
            ArchitectureShare("sm75", nodes=1, throughput_per_replica=1.0),
        ],
    )
    assert split == {"sm90": 1, "sm80": 3, "sm75": 2}


def test_split_excess_over_a_cap_moves_on_in_a_later_round() -> None:
    # round 1 places one replica on sm90 (its cap), round 2 gives the rest to sm80
    split = split_across_architectures(
        4,
        [
            ArchitectureShare("sm90", nodes=1, throughput_per_replica=10.0, max_replicas=2),
            ArchitectureShare("sm80", nodes=1, throughput_per_replica=1.0),
        ],
    )
    assert split == {"sm90": 2, "sm80": 2}


def test_split_a_cap_of_zero_gets_no_replica_and_a_negative_total_is_refused() -> None:
    arches = [ArchitectureShare("sm90", nodes=2, max_replicas=0), ArchitectureShare("sm80", nodes=1)]
    assert split_across_architectures(3, arches) == {"sm90": 0, "sm80": 3}
    with pytest.raises(ValueError, match="total replicas must be >= 0"):
        split_across_architectures(-1, arches)


@given(
    total=st.integers(0, 200),
    arches=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.one_of(st.none(), st.floats(1.0, 1e4)),
            st.one_of(st.none(), st.integers(1, 50)),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_split_never_exceeds_total_or_caps_and_fills_what_it_can(
    total: int, arches: list[tuple[int, float | None, int | None]]
) -> None:
    shares = [ArchitectureShare(f"a{i}", n, t, c) for i, (n, t, c) in enumerate(arches)]
    split = split_across_architectures(total, shares)
    usable = [a for a in shares if a.nodes > 0]
    capacity = sum(a.max_replicas if a.max_replicas is not None else total for a in usable)
    assert sum(split.values()) == min(total, capacity)
    for a in shares:
        assert split[a.name] == 0 or a.nodes > 0
        assert a.max_replicas is None or split[a.name] <= a.max_replicas
    if total >= len(usable):
        assert all(split[a.name] >= 1 for a in usable)


# ---------------------------------------------------------------------------------------------------------
# Properties


def observations(max_pods: int = 12) -> st.SearchStrategy[tuple[list[float | None], int, float | None, bool]]:
    qps = st.one_of(st.none(), st.floats(0.0, 2000.0))
    return st.tuples(
        st.lists(qps, min_size=0, max_size=max_pods),
        st.integers(0, 3),
        st.one_of(st.none(), st.floats(1.0, 2000.0)),
        st.booleans(),
    )


configs = st.builds(
    lambda lo, span, qps, p99, hpa, window: config(
        minReplicas=lo,
        maxReplicas=max(1, lo + span),
        targetQPSPerReplica=qps,
        targetP99LatencyMilliseconds=p99 if (p99 is not None or qps is not None) else 50.0,
        **(HPA_LIKE if hpa else {}),
        **({} if window is None else {"behavior": {"scaleDown": {"stabilizationWindowSeconds": window}}}),
    ),
    st.integers(0, 5),
    st.integers(0, 30),
    st.one_of(st.none(), st.floats(10.0, 1000.0)),
    st.one_of(st.none(), st.floats(5.0, 500.0)),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 600)),
)


def build(now: float, current: int, raw: tuple[list[float | None], int, float | None, bool]) -> Observation:
    qps, unready, p99_ms, available = raw
    return observe(now, current, qps, unready=unready, p99_ms=p99_ms, latency_available=available or not qps)


def window_of(cfg: AutoscalerConfig) -> float:
    rules = cfg.behavior.scale_down
    if rules is not None and rules.stabilization_window_seconds is not None:
        return float(rules.stabilization_window_seconds)
    return 300.0  # no start-up time given: the HPA's window (adaptation only ever widens it)


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(
    cfg=configs,
    start=st.integers(0, 40),
    steps=st.lists(st.tuples(st.integers(1, 90), observations()), max_size=25),
)
def test_result_never_leaves_min_max(cfg: AutoscalerConfig, start: int, steps: list[Any]) -> None:
    state, now = AutoscalerState(), 0.0
    current = min(max(start, cfg.min_replicas), cfg.max_replicas)
    for dt, raw in steps:
        now += dt
        d = decide(cfg, build(now, current, raw), state)
        assert cfg.min_replicas <= d.desired_replicas <= cfg.max_replicas
        state, current = d.state, d.desired_replicas


@PROPERTY_SETTINGS
@given(
    cfg=configs,
    start=st.integers(0, 40),
    steps=st.lists(st.tuples(st.integers(1, 90), observations()), max_size=25),
)
def test_no_scale_down_inside_the_window_after_a_scale_up_recommendation(
    cfg: AutoscalerConfig, start: int, steps: list[Any]
) -> None:
    window = window_of(cfg)
    state, now = AutoscalerState(), 0.0
    current = min(max(start, cfg.min_replicas), cfg.max_replicas)
    up_recommended_at: list[float] = []
    for dt, raw in steps:
        now += dt
        d = decide(cfg, build(now, current, raw), state)
        if d.desired_replicas < current:
            assert not [t for t in up_recommended_at if now - t < window], (now, up_recommended_at, d.message)
        if d.recommendation is not None and d.recommendation >= current:
            up_recommended_at.append(now)
        state, current = d.state, d.desired_replicas


@PROPERTY_SETTINGS
@given(
    cfg=configs,
    start=st.integers(0, 40),
    history=st.lists(st.tuples(st.integers(1, 90), observations()), max_size=10),
    last=observations(),
    qps_factor=st.floats(1.0, 10.0),
    p99_factor=st.floats(1.0, 10.0),
)
def test_more_load_never_means_fewer_replicas(
    *,
    cfg: AutoscalerConfig,
    start: int,
    history: list[Any],
    last: tuple[list[float | None], int, float | None, bool],
    qps_factor: float,
    p99_factor: float,
) -> None:
    state, now = AutoscalerState(), 0.0
    current = min(max(start, cfg.min_replicas), cfg.max_replicas)
    for dt, raw in history:
        now += dt
        d = decide(cfg, build(now, current, raw), state)
        state, current = d.state, d.desired_replicas
    qps, unready, p99_ms, available = last
    heavier = (
        [None if q is None else q * qps_factor for q in qps],
        unready,
        None if p99_ms is None else p99_ms * p99_factor,
        available,
    )
    light = decide(cfg, build(now + 15, current, last), state)
    heavy = decide(cfg, build(now + 15, current, heavier), state)
    assert heavy.desired_replicas >= light.desired_replicas, (light.message, heavy.message)


def test_split_ties_go_to_the_newest_architecture() -> None:
    arches = [ArchitectureShare(a, nodes=1) for a in ("sm75", "sm80", "sm89", "sm90", "sm100")]
    assert split_across_architectures(1, arches) == {"sm75": 0, "sm80": 0, "sm89": 0, "sm90": 0, "sm100": 1}
    assert split_across_architectures(7, arches) == {"sm75": 1, "sm80": 1, "sm89": 1, "sm90": 2, "sm100": 2}
