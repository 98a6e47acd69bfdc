"""Adaptive batching's rules (the real `Tuner`) against every fixed queue delay, in the batcher's simulation.

The benchmark (`make bench-batching`) measures the real server, where a 2-core machine's noise is as large as
the differences; the simulation replays the same seeded traces through the same dispatch rule, so the claim
"adaptive matches the best fixed delay chosen in hindsight" is checked here on several cost shapes, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.batchsim import Costs, Outcome, simulate
from bench.bench_batching import BURSTY, FIXED_DELAYS_US, LOADS, TARGET_MS
from bench.loadgen import poisson_arrivals
from modelfleet_runtime.adaptive import Tuner

TARGET_S = TARGET_MS / 1000
ARRIVALS = 3000  # per trace: enough for a p99 of 30 tail samples

# (name, costs, max batch size, instances): a CPU transformer like MiniLM (9 ms alone, 2 ms more per item),
# a GPU-like model (a large fixed cost per batch), and a light model on two instances.
SHAPES = [
    ("minilm-like", Costs(7e-3, 2e-3), 32, 1),
    ("gpu-like", Costs(5e-3, 0.2e-3), 64, 1),
    ("light, 2 instances", Costs(2e-3, 0.5e-3), 32, 2),
]


def trace(capacity: float, schedule: tuple[tuple[float, float], ...], seed: int) -> np.ndarray:
    mean = sum(s * share for s, share in schedule) / sum(s for s, _ in schedule)
    rates = [(seconds, share * capacity) for seconds, share in schedule]
    return poisson_arrivals(np.random.default_rng(seed), rates, ARRIVALS / (mean * capacity))


def outcomes(times: np.ndarray, costs: Costs, top: int, n: int) -> tuple[Outcome, Outcome]:
    """(best fixed delay's outcome in hindsight, adaptive's outcome) on one trace."""
    fixed = [simulate(times, costs, max_batch_size=top, instances=n, delay_s=us / 1e6) for us in FIXED_DELAYS_US]
    most = max(o.throughput for o in fixed)
    best = min((o for o in fixed if o.throughput >= 0.99 * most), key=lambda o: o.p99_s)
    tuner = Tuner(max_batch_size=top, instances=n, target_s=TARGET_S, max_delay_s=TARGET_S)
    return best, simulate(times, costs, max_batch_size=top, instances=n, tuner=tuner)


@pytest.mark.parametrize(("name", "costs", "top", "n"), SHAPES, ids=[s[0] for s in SHAPES])
def test_adaptive_matches_the_best_fixed_delay_at_every_load(name: str, costs: Costs, top: int, n: int) -> None:
    schedules = {f"{load:.0%}": ((1.0, load),) for load in LOADS} | {"bursty": BURSTY}
    misses = {}
    for label, schedule in schedules.items():
        best, ours = outcomes(trace(costs.capacity(top, n), schedule, seed=7), costs, top, n)
        if ours.p99_s > 1.1 * best.p99_s or ours.throughput < 0.95 * best.throughput:
            misses[label] = (
                round(float(ours.p99_s / best.p99_s), 2),
                round(float(ours.throughput / best.throughput), 2),
            )
    assert not misses, f"{name}: (p99, throughput) ratios to the best fixed delay where adaptive misses: {misses}"


def test_a_long_fixed_delay_is_what_adaptive_batching_avoids() -> None:
    """The check above can fail: at light load on a cheap model a 10 ms wait is pure latency."""
    costs, top = Costs(2e-3, 0.5e-3), 32
    times = trace(costs.capacity(top, 2), ((1.0, 0.1),), seed=7)
    best, ours = outcomes(times, costs, top, 2)
    waiting = simulate(times, costs, max_batch_size=top, instances=2, delay_s=0.01)
    assert waiting.p99_s > 2 * best.p99_s
    assert ours.p99_s < 1.1 * best.p99_s
