"""Scrape arithmetic at its edges: restarts seen through `_created`, scrapes at one instant, q = 1, bucket edges."""

from __future__ import annotations

import math

import pytest

from modelfleet_operator.autoscaler.metrics import (
    Histogram,
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

BOUNDS = (0.1, 0.5, math.inf)


def snap(time: float, total: float, *, created: float | None = None, counts: tuple[float, ...] = (0, 0, 0)) -> Snapshot:
    return Snapshot(
        time=time,
        requests={"success": total},
        request_duration=Histogram(BOUNDS, counts, sum(counts)),
        created=created,
    )


def test_a_changed_created_time_is_a_restart_even_when_the_counter_grew() -> None:
    window = build_pod_window("p", snap(0, 100, created=1.0), snap(10, 150, created=5.0))
    assert window.reset
    assert window.qps == pytest.approx(15.0)  # all 150 since the restart, not 50
    same = build_pod_window("p", snap(0, 100, created=1.0), snap(10, 150, created=1.0))
    assert not same.reset
    assert same.qps == pytest.approx(5.0)
    unknown = build_pod_window("p", snap(0, 100), snap(10, 150, created=5.0))
    assert not unknown.reset
    assert unknown.qps == pytest.approx(5.0)


def test_counters_or_buckets_going_down_are_a_restart() -> None:
    assert build_pod_window("p", snap(0, 100), snap(10, 40)).qps == pytest.approx(4.0)
    went_down = build_pod_window("p", snap(0, 10, counts=(5, 8, 10)), snap(10, 12, counts=(2, 9, 12)))
    assert went_down.reset
    assert went_down.duration == Histogram(BOUNDS, (2, 9, 12), 23)
    grew = build_pod_window("p", snap(0, 10, counts=(5, 8, 10)), snap(10, 12, counts=(5, 9, 12)))
    assert not grew.reset
    assert grew.duration == Histogram(BOUNDS, (0, 1, 2), 3)


def test_two_scrapes_at_the_same_time_give_no_rate_not_a_division_by_zero() -> None:
    window = build_pod_window("p", snap(10, 100), snap(10, 150))
    assert (window.qps, window.duration) == (None, None)
    assert build_pod_window("p", snap(11, 100), snap(10, 150)).qps is None
    assert build_pod_window("p", None, snap(10, 150)).qps is None
    assert build_pod_window("p", snap(10, 150), None).qps is None


def test_q_of_one_is_the_top_finite_bound_the_observations_reach() -> None:
    h = Histogram(BOUNDS, (5, 10, 10))
    assert histogram_quantile(1.0, h) == pytest.approx(0.5)
    assert histogram_quantile(1.0, Histogram(BOUNDS, (5, 10, 12))) == pytest.approx(0.5)  # in +Inf: highest finite
    assert histogram_quantile(0.5, h) == pytest.approx(0.1)  # rank 5 reaches the first bucket's top exactly
    assert histogram_quantile(0.75, h) == pytest.approx(0.3)
    assert histogram_quantile(0.25, h) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile(0.0, h) == pytest.approx(0.0)
    assert histogram_quantile(1.5, h) == math.inf
    assert histogram_quantile(-0.5, h) == -math.inf
    assert histogram_quantile(math.nan, h) is None
    assert histogram_quantile(0.5, Histogram(BOUNDS, (0, 0, 0))) is None
    assert histogram_quantile(0.5, Histogram((0.1, 0.5), (1, 2))) is None  # no +Inf bucket
    assert histogram_quantile(0.5, Histogram((math.inf,), (3,))) is None
    assert histogram_quantile(0.5, Histogram((-1.0, 1.0, math.inf), (4, 4, 4))) == -1.0
    with pytest.raises(ValueError, match="differ in length"):
        histogram_quantile(0.5, Histogram(BOUNDS, (1, 2)))


def test_non_monotonic_and_repeated_buckets_are_coalesced_like_promql() -> None:
    # counts going down along the bounds (a non-atomic scrape) are raised to the previous one
    assert histogram_quantile(0.5, Histogram(BOUNDS, (10, 4, 10))) == pytest.approx(0.05)
    repeated = Histogram((0.1, 0.1, 0.5, math.inf), (2, 3, 10, 10))
    assert histogram_quantile(0.5, repeated) == pytest.approx(0.1)


def test_deltas_and_merges_work_bucket_by_bound() -> None:
    prev, cur = Histogram(BOUNDS, (1, 2, 3), 1.0), Histogram(BOUNDS, (2, 4, 6), 3.0)
    assert histogram_delta(prev, cur) == Histogram(BOUNDS, (1, 2, 3), 2.0)
    assert histogram_delta(prev, cur, reset=True) == cur
    assert histogram_delta(None, cur) == cur
    other = Histogram((0.2, math.inf), (1, 1), 0.5)
    assert histogram_delta(other, cur) == cur  # another layout: everything is new
    assert merge_histograms([prev, other]) == Histogram((0.1, 0.2, 0.5, math.inf), (1, 1, 2, 4), 1.5)
    assert merge_histograms([]) is None


EXPOSITION = """\
# TYPE modelfleet_requests_total counter
modelfleet_requests_total{model="m",outcome="success"} 10
modelfleet_requests_total{model="m",outcome="rejected_queue_full"} 2
modelfleet_requests_total{model="other",outcome="success"} 99
# TYPE modelfleet_requests_created gauge
modelfleet_requests_created{model="m",outcome="success"} 1700000000
modelfleet_requests_created{model="m",outcome="rejected_queue_full"} 1600000000
# TYPE modelfleet_request_duration_seconds histogram
modelfleet_request_duration_seconds_bucket{model="m",le="0.1"} 4
modelfleet_request_duration_seconds_bucket{model="m",le="+Inf"} 10
modelfleet_request_duration_seconds_sum{model="m"} 1.5
modelfleet_request_duration_seconds_count{model="m"} 10
# TYPE modelfleet_queue_depth gauge
modelfleet_queue_depth{model="m"} 3
# TYPE modelfleet_inflight_requests gauge
modelfleet_inflight_requests{model="m"} 1
"""


def test_a_scrape_keeps_the_models_series_and_the_oldest_created_time() -> None:
    s = parse_snapshot(EXPOSITION, model="m", time=5.0)
    assert s.requests == {"success": 10.0, "rejected_queue_full": 2.0}
    assert s.requests_total == 12.0
    assert s.created == 1600000000.0
    assert s.request_duration == Histogram((0.1, math.inf), (4.0, 10.0), 1.5)
    assert (s.queue_depth, s.inflight, s.time) == (3.0, 1.0, 5.0)
    assert s.request_duration.count == 10.0
    assert Histogram((), ()).count == 0.0


def test_a_histogram_without_inf_or_le_is_refused() -> None:
    no_inf = (
        "# TYPE modelfleet_request_duration_seconds histogram\n"
        'modelfleet_request_duration_seconds_bucket{model="m",le="0.1"} 4\n'
    )
    with pytest.raises(MetricsParseError, match=r"no \+Inf bucket"):
        parse_snapshot(no_inf, model="m", time=0.0)
    with pytest.raises(MetricsParseError, match="cannot parse"):
        parse_snapshot("modelfleet_requests_total{model=} x y z\n", model="m", time=0.0)


def test_the_observation_merges_ready_pods_and_marks_the_rest_missing() -> None:
    pods = [PodTarget("a", True), PodTarget("b", True), PodTarget("c", False)]
    previous = {"a": snap(0, 0, counts=(0, 0, 0)), "b": snap(0, 0)}
    current = {"a": snap(10, 100, counts=(50, 100, 100)), "b": None}
    obs, windows = build_observation(
        now=10.0, current_replicas=3, pods=pods, previous=previous, current=current, quantile=1.0
    )
    assert [(p.name, p.ready, p.qps) for p in obs.pods] == [("a", True, 10.0), ("b", True, None), ("c", False, None)]
    assert [w.name for w in windows] == ["a", "b"]
    assert obs.p99_seconds == pytest.approx(0.5)
    assert (obs.latency_count, obs.latency_available, obs.current_replicas) == (100, True, 3)
    none, _ = build_observation(now=10.0, current_replicas=1, pods=pods[1:2], previous={}, current={"b": None})
    assert (none.p99_seconds, none.latency_count, none.latency_available) == (None, 0.0, False)


def test_a_dip_anywhere_along_the_buckets_is_raised_to_the_bucket_before_it() -> None:
    # (5, 3, 8, 10) reads as (5, 5, 8, 10): rank 6 is the 1st of 3 observations in (0.2, 0.3]
    assert histogram_quantile(0.6, Histogram((0.1, 0.2, 0.3, math.inf), (5, 3, 8, 10))) == pytest.approx(0.2 + 0.1 / 3)
    # (1, 5, 3, 8, 10) reads as (1, 5, 5, 8, 10): the dip is raised to its neighbour, not to the first bucket,
    # and the interpolation starts at the bound below the bucket the rank falls in
    five = Histogram((0.1, 0.2, 0.3, 0.4, math.inf), (1, 5, 3, 8, 10))
    assert histogram_quantile(0.6, five) == pytest.approx(0.3 + 0.1 / 3)


def test_a_new_bucket_layout_is_not_a_restart_and_the_counter_still_gives_the_rate() -> None:
    before = Snapshot(time=0, requests={"success": 100}, request_duration=Histogram(BOUNDS, (50, 90, 100), 9.0))
    after = Snapshot(
        time=10, requests={"success": 130}, request_duration=Histogram((0.2, 0.5, math.inf), (1, 2, 3), 0.3)
    )
    window = build_pod_window("p", before, after)
    assert not window.reset
    assert window.qps == pytest.approx(3.0)  # (130 - 100) / 10, not 130 / 10
    assert window.duration == after.request_duration  # another layout: its observations are all new
    finer = Snapshot(time=10, requests={"success": 130}, request_duration=Histogram((0.05, 0.5, math.inf), (1, 2, 3)))
    assert build_pod_window("p", before, finer).qps == pytest.approx(3.0)  # the layout sorting either way


def test_a_pod_without_two_scrapes_is_missing_not_restarted() -> None:
    assert not build_pod_window("p", None, snap(10, 150)).reset
    assert not build_pod_window("p", snap(10, 150), snap(10, 160)).reset


def test_samples_count_by_name_with_or_without_type_lines() -> None:
    untyped = "\n".join(line for line in EXPOSITION.splitlines() if not line.startswith("#")) + "\n"
    assert parse_snapshot(untyped, model="m", time=0.0) == parse_snapshot(EXPOSITION, model="m", time=0.0)
    counts_only = 'modelfleet_request_duration_seconds_count{model="m"} 10\n'
    assert parse_snapshot(counts_only, model="m", time=0.0).request_duration is None


def test_series_of_other_models_are_left_out_whichever_way_their_names_sort() -> None:
    others = EXPOSITION.replace('model="other"', 'model="a"') + 'modelfleet_queue_depth{model="a"} 7\n'
    assert parse_snapshot(others, model="m", time=0.0) == parse_snapshot(EXPOSITION, model="m", time=0.0)


def test_other_series_of_the_model_and_other_models_first_in_a_family_leave_the_figures_alone() -> None:
    noisy = (
        "# TYPE modelfleet_requests_total counter\n"
        'modelfleet_requests_total{model="a",outcome="success"} 99\n'
        'modelfleet_requests_total{model="m",outcome="success"} 10\n'
        "# TYPE modelfleet_response_cache_hits_total counter\n"
        'modelfleet_response_cache_hits_total{model="m"} 5\n'
        "# TYPE modelfleet_response_cache_bytes gauge\n"
        'modelfleet_response_cache_bytes{model="m"} 4096\n'
        "# TYPE modelfleet_batches_total counter\n"
        'modelfleet_batches_total{model="m"} 3\n'
        "# TYPE modelfleet_request_duration_seconds histogram\n"
        'modelfleet_request_duration_seconds_bucket{model="m",le="+Inf"} 10\n'
        'modelfleet_request_duration_seconds_sum{model="m"} 1.5\n'
    )
    s = parse_snapshot(noisy, model="m", time=0.0)
    assert s.requests == {"success": 10.0}
    assert s.request_duration == Histogram((math.inf,), (10.0,), 1.5)
    assert (s.created, s.queue_depth, s.inflight) == (None, None, None)


def test_a_repeated_bound_after_the_first_is_coalesced_too() -> None:
    h = Histogram((0.1, 0.5, 0.5, math.inf), (2, 3, 4, 10))  # reads as (0.1: 2, 0.5: 7, +Inf: 10)
    assert histogram_quantile(0.5, h) == pytest.approx(0.1 + 0.4 * 3 / 5)


def test_one_finite_bucket_and_inf_is_enough_for_a_quantile() -> None:
    assert histogram_quantile(0.3, Histogram((0.1, math.inf), (4, 10))) == pytest.approx(0.075)


def test_scrapes_less_than_a_second_apart_give_a_rate() -> None:
    assert build_pod_window("p", snap(10.0, 100), snap(10.5, 150)).qps == pytest.approx(100.0)


def test_more_counts_than_bounds_is_refused_too() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        histogram_quantile(0.5, Histogram((0.1, math.inf), (1, 2, 3)))


def test_a_quantile_past_a_non_positive_first_bucket_is_interpolated() -> None:
    # rank 2 of 4 falls in (-1, 1], which holds 3: interpolated from -1, not the first bound returned
    assert histogram_quantile(0.5, Histogram((-1.0, 1.0, math.inf), (1, 4, 4))) == pytest.approx(-1 + 2 / 3)


def test_a_created_time_that_went_back_is_a_restart_too() -> None:
    window = build_pod_window("p", snap(0, 100, created=5.0), snap(10, 150, created=1.0))
    assert window.reset and window.qps == pytest.approx(15.0)


def test_a_malformed_histogram_is_refused_when_merged() -> None:
    with pytest.raises(ValueError, match="shorter"):
        merge_histograms([Histogram(BOUNDS, (1, 2))])


def test_rates_keep_their_fractions() -> None:
    assert build_pod_window("p", snap(0, 100), snap(10, 115)).qps == pytest.approx(1.5)
