"""A discrete-event model of the batcher, to weigh batching rules (the real `Tuner`) without machine noise.

The server is reduced to what decides latency: Poisson arrivals of batch-1 requests, a FIFO queue, `instances`
that each compute one batch at a time for `a + k*b` seconds (times a seeded log-normal jitter), and the
batcher's dispatch rule: while an instance is free, send up to `limit` items once the queue holds `limit` or
its oldest item has waited `delay` (and, with a `Tuner` that shares the queue, no more than its share). The
rule's limit and delay come from a fixed pair or from a `Tuner` fed, as in the server, every arrival and
every batch's compute time. Arrival times come from the load generator's own `bench.loadgen.poisson_arrivals`.
Same seed, same result, on any machine.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from modelfleet_runtime.adaptive import Tuner


@dataclass(frozen=True, slots=True)
class Costs:
    """A model's batch compute time `a + k*b` seconds on one instance, with multiplicative jitter."""

    a: float
    k: float
    jitter: float = 0.1

    def capacity(self, batch: int, instances: int = 1) -> float:
        """Items per second with every batch full at `batch`."""
        return instances * batch / (self.a + self.k * batch)


@dataclass(frozen=True, slots=True)
class Outcome:
    p99_s: float
    throughput: float


def simulate(
    times: np.ndarray,
    costs: Costs,
    *,
    max_batch_size: int,
    instances: int = 1,
    delay_s: float = 0.0,
    tuner: Tuner | None = None,
) -> Outcome:
    """Serve the arrivals at `times` (sorted seconds) with a fixed delay, or with `tuner`'s choices."""
    rng = np.random.default_rng(1)  # the jitter: the same for every rule served the same arrivals
    queue: deque[float] = deque()
    finishes: list[tuple[float, int]] = []  # (time, batch id): a heap of batches in flight
    in_flight: dict[int, list[float]] = {}
    latencies: list[float] = []
    batch_id = 0
    timer = float("inf")
    i, now = 0, 0.0
    while i < len(times) or queue or finishes:
        now = min(times[i] if i < len(times) else float("inf"), finishes[0][0] if finishes else float("inf"), timer)
        if finishes and finishes[0][0] == now:
            _, done = heapq.heappop(finishes)
            latencies.extend(now - t for t in in_flight.pop(done))
        elif i < len(times) and times[i] == now:
            queue.append(now)
            if tuner is not None:
                tuner.arrived(1, now)
            i += 1
        else:
            timer = float("inf")
        while len(finishes) < instances and queue:
            limit, delay, split, least = (max_batch_size, delay_s, 1, 1) if tuner is None else _tuned(tuner, now)
            limit = min(limit, max_batch_size)
            if len(queue) < limit and now < queue[0] + delay:
                timer = queue[0] + delay
                break
            take = min(limit, len(queue), max(least, -(-len(queue) // split)))
            items = [queue.popleft() for _ in range(take)]
            seconds = (costs.a + costs.k * len(items)) * float(rng.lognormal(0.0, costs.jitter))
            if tuner is not None:
                tuner.computed(len(items), seconds)
            batch_id += 1
            in_flight[batch_id] = items
            heapq.heappush(finishes, (now + seconds, batch_id))
    return Outcome(p99_s=float(np.percentile(latencies, 99)), throughput=len(latencies) / max(now, 1e-9))


def _tuned(tuner: Tuner, now: float) -> tuple[int, float, int, int]:
    choice = tuner.current(now)
    return choice.limit, choice.delay_s, choice.split, choice.least
