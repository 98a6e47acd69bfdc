"""Adaptive batching's pure tuner: the cost line, the arrival rate, and the limit and delay it chooses."""

from __future__ import annotations

import math

import pytest

from modelfleet_runtime.adaptive import (
    BUSY,
    FORGET,
    RATE_TAU_S,
    SPARE_SHARE,
    CostModel,
    RateMeter,
    Tuner,
    changed,
    choose,
    utilization,
)

MS = 1e-3


def costs(a: float, k: float, sizes: tuple[int, ...] = (1, 2, 4, 8, 16)) -> CostModel:
    model = CostModel()
    for _ in range(5):
        for b in sizes:
            model.observe(b, a + k * b)
    return model


def tuner(top: int = 32, instances: int = 2, target_ms: float = 100, max_delay_ms: float = 100) -> Tuner:
    return Tuner(max_batch_size=top, instances=instances, target_s=target_ms * MS, max_delay_s=max_delay_ms * MS)


def test_the_cost_line_is_recovered_from_batches_of_several_sizes() -> None:
    a, k = costs(3 * MS, 4 * MS).line()
    assert a == pytest.approx(3 * MS)
    assert k == pytest.approx(4 * MS)


def test_one_size_seen_means_no_batching_gain_is_assumed() -> None:
    model = costs(3 * MS, 4 * MS, sizes=(1,))
    a, k = model.line()
    assert a == 0.0
    assert k == pytest.approx(7 * MS)
    assert model.cost(10) == pytest.approx(70 * MS)


def test_a_line_with_a_negative_intercept_falls_back_to_proportional() -> None:
    model = CostModel()
    for b, seconds in ((1, 0.5 * MS), (8, 10 * MS), (16, 21 * MS)):
        model.observe(b, seconds)
    a, k = model.line()
    f = FORGET  # the first batch weighs f**2, the second f, the last 1
    assert a == 0.0
    assert k == pytest.approx((f * f * 0.5 + f * 80 + 336) / (f * f * 1 + f * 64 + 256) * MS)


def test_old_batches_are_forgotten() -> None:
    model = costs(3 * MS, 4 * MS)
    for _ in range(300):
        for b in (1, 8):
            model.observe(b, 1 * MS + 2 * MS * b)
    a, k = model.line()
    assert a == pytest.approx(1 * MS, rel=1e-3)
    assert k == pytest.approx(2 * MS, rel=1e-3)


def test_the_rate_meter_follows_steady_arrivals_and_decays_after_them() -> None:
    meter = RateMeter()
    for i in range(1000):
        meter.add(1, i / 100)  # 100 items/s for 10 s
    assert meter.rate(9.99) == pytest.approx(100, rel=0.02)
    assert meter.rate(9.99 + 0.5) == pytest.approx(100 * math.exp(-0.5 / RATE_TAU_S), rel=0.02)
    assert RateMeter().rate(5.0) == 0.0


def test_the_limit_is_the_largest_batch_within_half_the_target() -> None:
    choice = choose(costs(3 * MS, 4 * MS), 10.0, tuner(target_ms=100))
    assert choice.limit == 11  # 3 + 4 * 11 = 47 ms <= 50 ms; 12 would be 51 ms
    assert choice.delay_s == 0.0


def test_light_load_dispatches_at_once() -> None:
    choice = choose(costs(3 * MS, 4 * MS), 100.0, tuner())
    assert utilization(costs(3 * MS, 4 * MS), 100.0, 1, 2) < 0.5
    assert choice.delay_s == 0.0
    assert "no queue delay" in choice.reason


def test_heavier_load_waits_for_batches_to_fill_but_at_most_a_tenth_of_a_single_compute() -> None:
    model = costs(3 * MS, 4 * MS)
    # 16 instances at 2000/s: batch-1 utilization 2000 * 7 ms / 16 = 0.875, batches of 11 keep up (0.53);
    # filling one takes 5 ms, but a request's own compute is 7 ms: it waits a tenth of that.
    choice = choose(model, 2000.0, tuner(instances=16))
    assert choice.limit == 11
    assert choice.delay_s == pytest.approx(0.7 * MS)
    assert choose(model, 2000.0, tuner(instances=16, max_delay_ms=0.5)).delay_s == pytest.approx(0.5 * MS)
    # A costly batch overhead (30 ms + 4 ms per item): a batch of 5 fits half the target and, on 32
    # instances, keeps up with 2000/s; the 2 ms its four other requests take to arrive is under 3.4 ms.
    slow = choose(costs(30 * MS, 4 * MS), 2000.0, tuner(instances=32))
    assert slow.limit == 5
    assert slow.delay_s == pytest.approx(4 / 2000)


def test_overload_takes_the_fastest_draining_batch() -> None:
    # Batches of 11 compute 2 x 11 / 47 ms = 468/s at most: 600/s cannot be kept up with within the target.
    choice = choose(costs(3 * MS, 4 * MS), 600.0, tuner(top=32))
    # 32 drains fastest (32 / 131 ms = 244/s per instance); 23 would drain 1 % slower (23 / 95 ms)
    assert choice.limit == 32
    assert "busy" in choice.reason


def test_the_limit_grows_only_as_far_as_the_load_needs() -> None:
    # 30 ms per batch, 4 ms per item: a larger batch frees much time. Batches of 5 fit the target (50 ms); at
    # 150/s they keep 2 instances 75 % busy, at 170/s 85 %: 170 x (30/b + 4) ms / 2 <= 80 % needs b >= 5.5.
    gain = costs(30 * MS, 4 * MS)
    assert choose(gain, 150.0, tuner()).limit == 5
    assert choose(gain, 170.0, tuner()).limit == 6


def test_where_batching_gains_little_the_limit_grows_only_for_time_it_frees() -> None:
    # 3 ms per batch, 4 ms per item. At 390/s batches of 11 (47 ms) keep 2 instances 83 % busy, the max batch
    # 80 %: over BUSY, yet 11 keeps 83 % of the max batch's spare time (at least SPARE_SHARE), so it stays.
    model = costs(3 * MS, 4 * MS)
    assert utilization(model, 390.0, 11, 2) > BUSY
    assert choose(model, 390.0, tuner(top=32)).limit == 11
    # At 440/s: 94 % against 90 %. Keeping 70 % of the spare time means at most 93.04 % busy: b >= 13.1.
    spare = 1 - utilization(model, 440.0, 32, 2)
    assert utilization(model, 440.0, 13, 2) > 1 - SPARE_SHARE * spare >= utilization(model, 440.0, 14, 2)
    assert choose(model, 440.0, tuner(top=32)).limit == 14


def test_a_batch_too_slow_for_the_target_is_limited_to_one_request() -> None:
    assert choose(costs(80 * MS, 10 * MS), 1.0, tuner(target_ms=100)).limit == 1


def test_a_cheap_model_batches_up_to_the_max_without_delay() -> None:
    choice = choose(costs(0.005 * MS, 0.0001 * MS), 20_000.0, tuner(top=128, instances=1))
    assert (choice.limit, choice.delay_s) == (128, 0.0)


def test_before_any_batch_the_tuner_dispatches_at_once_up_to_the_max() -> None:
    t = tuner(top=32)
    t.arrived(1, 0.0)
    assert (t.current(0.0).limit, t.current(0.0).delay_s) == (32, 0.0)


def test_the_tuner_rechooses_from_what_it_measured() -> None:
    t = tuner(top=32)
    for i in range(600):
        t.arrived(1, i / 300)  # 300/s for 2 s: batches of 11 keep the 2 instances 64 % busy
        t.computed(1 + i % 8, 3 * MS + 4 * MS * (1 + i % 8))
    choice = t.current(2.0)
    assert choice.limit == 11
    assert choice.delay_s > 0


def test_small_moves_of_the_delay_are_not_changes() -> None:
    from modelfleet_runtime.adaptive import Choice

    base = Choice(8, 0.010, "")
    assert not changed(base, Choice(8, 0.011, ""))
    assert changed(base, Choice(8, 0.013, ""))
    assert changed(base, Choice(9, 0.010, ""))
    assert changed(Choice(8, 0.0, ""), Choice(8, 0.001, ""))


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="target_s"):
        Tuner(max_batch_size=8, instances=1, target_s=0, max_delay_s=0)


def test_without_a_measured_batching_gain_overload_still_takes_the_max_batch() -> None:
    # Every batch so far held 4 items, so the fit reads no gain; keeping 5 would never measure one, and with
    # a cost that grows at most in proportion no larger batch drains slower.
    choice = choose(costs(0.0, 9.9 * MS, sizes=(4,)), 1000.0, tuner(top=32))
    assert choice.limit == 32


def test_a_meter_started_under_load_reads_the_load_at_once() -> None:
    meter = RateMeter()
    for i in range(30):
        meter.add(1, 5.0 + i / 150)  # 150 items/s from t = 5 s, the first arrivals it ever saw
    assert meter.rate(5.0 + 30 / 150) == pytest.approx(150, rel=0.05)
    for i in range(30):
        meter.add(1, 60.0 + i / 300)  # after a minute of idle, 300 items/s
    assert meter.rate(60.0 + 30 / 300) == pytest.approx(300, rel=0.05)
    first = RateMeter()
    first.add(1, 5.0)
    assert first.rate(5.0) == pytest.approx(1 / (RATE_TAU_S * -math.expm1(-0.1 / RATE_TAU_S)))  # not a flood


@pytest.mark.parametrize("seed", range(20))
def test_the_closed_forms_agree_with_a_scan_of_every_size(seed: int) -> None:
    import numpy as np

    from modelfleet_runtime.adaptive import largest_within, smallest_keeping_up

    rng = np.random.default_rng(seed)
    a, k, rate = rng.uniform(0, 20) * MS, rng.uniform(0.01, 10) * MS, rng.uniform(1, 2000)
    top, n, budget = int(rng.integers(1, 300)), int(rng.integers(1, 4)), rng.uniform(1, 200) * MS
    model = costs(a, k)
    sizes = range(1, top + 1)
    assert largest_within(model, budget, top) == max([b for b in sizes if model.cost(b) <= budget] or [1])
    fits = largest_within(model, budget, top)
    keeping = [b for b in sizes if b > fits and utilization(model, rate, b, n) <= BUSY]
    assert smallest_keeping_up(model, rate, n, fits, top) == (keeping[0] if keeping else None)
    # Rule 1's threshold: short of capacity the max batch always keeps it, past capacity no batch does.
    spare = 1 - utilization(model, rate, top, n)
    busy = max(BUSY, 1 - SPARE_SHARE * spare)
    assert (smallest_keeping_up(model, rate, n, 0, top, busy=busy) is None) == (spare <= 0)


def test_where_batching_gains_little_the_queue_is_shared_among_the_instances() -> None:
    from modelfleet_runtime.adaptive import KEEPS_UP

    # 2 ms per batch, 8 ms per item: splitting 8 queued requests in two costs 2 ms and saves 32 ms of the
    # later half's wait. A shared batch keeps at least the size that keeps up: at 190/s,
    # 190 x (2/b + 8) ms / 2 <= 90 % needs b >= 1.7.
    model = costs(2 * MS, 8 * MS)
    shared = choose(model, 190.0, tuner(instances=2))
    assert (shared.split, shared.least, shared.limit) == (2, 2, 6)
    assert utilization(model, 190.0, shared.least, 2) <= KEEPS_UP < utilization(model, 190.0, 1, 2)
    assert "shared among 2 instances" in shared.reason
    assert choose(model, 20.0, tuner(instances=2)).least == 1


def test_the_queue_is_not_shared_where_batches_gain_one_instance_or_nothing_keeps_up() -> None:
    assert choose(costs(30 * MS, 4 * MS), 100.0, tuner(instances=2)).split == 1  # a >= k: one batch takes all
    assert choose(costs(2 * MS, 8 * MS), 100.0, tuner(instances=1)).split == 1
    # 2 x 32 / (2 + 256) ms = 248/s at most: at 260/s no batch keeps up, and every split batch's 2 ms is lost
    overloaded = choose(costs(2 * MS, 8 * MS), 260.0, tuner(instances=2))
    assert (overloaded.split, overloaded.least, overloaded.limit) == (1, 1, 32)
