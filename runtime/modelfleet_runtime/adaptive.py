"""Batch parameters tuned online: the batch-size limit and queue delay that keep p99 within a target.

Pure (the caller passes the time): the batcher reports arrivals and each batch's measured compute time and
asks for the current choice before dispatching. Two estimates drive it:
- the cost of a batch of b items, `a + k*b`, a least-squares line over recent batches (older ones forgotten
  geometrically); until two sizes have been seen, cost is taken as proportional to b (no batching gain
  assumed, the cautious reading);
- the arrival rate, items per second, an exponentially decayed count.
The rules, in order:
1. **limit**: the largest batch whose compute fits half the p99 target, so a request's own batch leaves the
   other half for queueing. If at that size the instances would be busy more than `BUSY` of the time at
   the arrival rate, and would keep less than `SPARE_SHARE` of the spare time the max batch leaves them,
   the smallest larger batch that keeps that much; past capacity (the max batch leaves none) the max batch,
   which drains fastest: the SLO is then better served by bigger batches than by a queue that grows, and
   near capacity even a 1 % slower size lets the queue grow without bound. That holds even where no batching
   gain is measured (a = 0): a fit of 0 may be a small gain hidden by noise. Where batching gains little (a
   transformer on CPU) a larger batch frees little time while every request in it waits for all of it, so
   the limit stays near the target's batch until close to capacity (MiniLM-like 1.5 + 8b ms on 2 instances,
   simulated: p99 at 200/s 76 ms against 94 ms for growing at `BUSY` alone, 11 of 12 seeds within 100 ms
   against 6). A backlog alone does not raise the limit: the spare capacity drains a burst, while a
   limit raised for it makes batches that take longer, so more queue behind them and keep the limit up;
2. **delay**: none while single requests keep up (utilization of batch-1 dispatch under `COMFORTABLE`):
   any wait is then pure latency. Otherwise wait up to the time the arrivals need to fill the limit, but at
   most `WAIT_SHARE` of a single request's compute (and at most `max_delay_s`): requests that arrive
   together then share a batch, while no request waits longer than a tenth of what its own compute costs.
3. **sharing**: where a batch's fixed cost is under one item's (batching gains little, as for a transformer
   on CPU), a batch takes no more than its instance's share of what is queued, though never fewer items
   than the smallest batch that keeps up with the arrivals: the next free instance takes the rest, instead
   of one instance computing the whole queue while the other waits (MiniLM on 2 instances: p99 at 185/s
   58-77 ms against 66-104 ms for one batch taking all).
Under load the queue fills while the instances are busy whatever the delay, so the limit is what bounds
p99 there; the delay matters only when an instance is free, and there a long wait buys little: dispatching
at once lets batches grow with the backlog by themselves (bench/batchsim.py shows it), so the wait is kept
short, to gather requests that arrive together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FORGET = 0.97  # weight kept by the previous batches at each new one: a memory of ~30 batches
RATE_TAU_S = 1.0  # time constant of the arrival-rate estimate
MIN_WINDOW_S = 0.1  # the shortest time the rate is measured over, so the first arrival does not read as a flood
BATCH_SHARE = 0.5  # share of the p99 target a batch's own compute may take
WAIT_SHARE = 0.1  # share of a single request's compute the queue delay may add to it
COMFORTABLE = 0.5  # batch-1 utilization under which requests are dispatched at once
BUSY = 0.8  # utilization above which the limit grows past the batch that fits the target
SPARE_SHARE = 0.7  # share of the max batch's spare time a smaller limit must keep (rule 1)
KEEPS_UP = 0.9  # utilization a shared batch must keep the instances under (rule 3)
RECHOOSE_S = 0.02  # a choice is kept this long before it is computed again


@dataclass(frozen=True, slots=True)
class Choice:
    """What the batcher uses now, and why (for the log line and the metrics)."""

    limit: int
    delay_s: float
    reason: str
    split: int = 1  # instances a queue is shared among: a batch takes at most 1/split of what is queued,
    least: int = 1  # but never fewer items than this (the batch that keeps up with the arrivals)


class CostModel:
    """Batch compute seconds as `a + k*b`, fitted by least squares with geometric forgetting."""

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, items: int, seconds: float) -> None:
        f = FORGET
        self._w = self._w * f + 1.0
        self._x = self._x * f + items
        self._y = self._y * f + seconds
        self._xx = self._xx * f + items * items
        self._xy = self._xy * f + items * seconds

    @property
    def known(self) -> bool:
        return self._w > 0

    def line(self) -> tuple[float, float]:
        """(a, k): seconds per batch and per item. Proportional (a = 0) while the sizes seen do not vary."""
        if not self.known:
            return 0.0, 0.0
        spread = self._w * self._xx - self._x * self._x
        if spread > 0.25 * self._w * self._w:  # the sizes seen vary by about one item or more
            k = (self._w * self._xy - self._x * self._y) / spread
            a = (self._y - k * self._x) / self._w
            if a >= 0 and k > 0:
                return a, k
        return 0.0, self._xy / self._xx

    def cost(self, items: int) -> float:
        a, k = self.line()
        return a + k * items


class RateMeter:
    """Arrivals per second, an exponentially decayed count (time constant `RATE_TAU_S`), divided by the
    decayed length of time it covers: in the first seconds that is shorter than `RATE_TAU_S`, so a server that
    starts under load reads the load at once instead of ramping up to it (a backlog meanwhile). A pause longer
    than `RATE_TAU_S` starts the count afresh: load after idle is read at once too."""

    def __init__(self) -> None:
        self._count = 0.0
        self._at: float | None = None
        self._since = 0.0

    def add(self, items: int, now: float) -> None:
        if self._at is None or now - self._at > RATE_TAU_S:
            self._since, self._at, self._count = now, now, 0.0
        self._count = self._decayed(now) + items
        self._at = now

    def rate(self, now: float) -> float:
        covered = max(now - self._since, MIN_WINDOW_S)
        return self._decayed(now) / (RATE_TAU_S * -math.expm1(-covered / RATE_TAU_S))

    def _decayed(self, now: float) -> float:
        if self._at is None:
            return 0.0
        return self._count * math.exp(-max(0.0, now - self._at) / RATE_TAU_S)


class Tuner:
    """The online choice of batch limit and queue delay for one batcher. Use it from the loop only."""

    def __init__(self, *, max_batch_size: int, instances: int, target_s: float, max_delay_s: float) -> None:
        if max_batch_size < 1 or instances < 1 or target_s <= 0 or max_delay_s < 0:
            raise ValueError("max_batch_size and instances must be >= 1, target_s > 0, max_delay_s >= 0")
        self.max_batch_size = max_batch_size
        self.instances = instances
        self.target_s = target_s
        self.max_delay_s = max_delay_s
        self.costs = CostModel()
        self.arrivals = RateMeter()
        self._choice = Choice(max_batch_size, 0.0, "no batch measured yet: dispatch at once, up to the max batch")
        self._chosen_at = -math.inf

    def arrived(self, items: int, now: float) -> None:
        self.arrivals.add(items, now)

    def computed(self, items: int, seconds: float) -> None:
        self.costs.observe(items, seconds)

    def current(self, now: float) -> Choice:
        """The choice in force at `now` (recomputed at most every `RECHOOSE_S`)."""
        if self.costs.known and now - self._chosen_at >= RECHOOSE_S:
            self._chosen_at = now
            choice = choose(self.costs, self.arrivals.rate(now), self)
            if changed(self._choice, choice):
                self._choice = choice
        return self._choice


def changed(old: Choice, new: Choice) -> bool:
    """A different limit or split, or a delay that moved by more than a fifth (or to or from none)."""
    if old.limit != new.limit or old.split != new.split or (old.delay_s == 0) != (new.delay_s == 0):
        return True
    return abs(new.delay_s - old.delay_s) > 0.2 * old.delay_s


def utilization(costs: CostModel, rate: float, batch: int, instances: int) -> float:
    """The instances' busy share if every batch held `batch` items at `rate` items per second."""
    return rate * costs.cost(batch) / (batch * instances)


EPS = 1e-9  # slack for float rounding at the edges of the closed forms below


def clamp(value: float, top: int) -> int:
    return max(1, min(top, int(value)))


def largest_within(costs: CostModel, budget_s: float, top: int) -> int:
    """The largest batch whose cost `a + k*b` is within `budget_s` (at least 1)."""
    a, k = costs.line()
    return clamp((budget_s - a) / k + EPS, top) if k > 0 else top


def smallest_keeping_up(
    costs: CostModel, rate: float, instances: int, above: int, top: int, busy: float = BUSY
) -> int | None:
    """The smallest batch over `above` at which `rate` keeps the instances at most `busy` busy, if any:
    rate * (a/b + k) / n <= busy, so b >= a / (busy * n / rate - k)."""
    a, k = costs.line()
    room = busy * instances / rate - k if rate > 0 else math.inf
    if room <= 0:
        return None
    b = max(above + 1, math.ceil(a / room - EPS))
    return b if b <= top else None


def choose(costs: CostModel, rate: float, tuner: Tuner) -> Choice:
    """Rules 1 and 2 of the module docstring, from the current estimates (closed forms: no scan of sizes)."""
    top, n, target = tuner.max_batch_size, tuner.instances, tuner.target_s
    limit = largest_within(costs, BATCH_SHARE * target, top)
    why = f"a batch of {limit} computes in {costs.cost(limit) * 1e3:.1f} ms, within {BATCH_SHARE:.0%} of the target"
    spare = 1 - utilization(costs, rate, top, n)  # the time the max batch would leave the instances
    busy = max(BUSY, 1 - SPARE_SHARE * spare)
    if limit < top and utilization(costs, rate, limit, n) > busy:
        # Past capacity (spare <= 0) `busy` is under the max batch's own utilization: none keeps up, so top.
        enough = smallest_keeping_up(costs, rate, n, limit, top, busy=busy)
        limit = enough if enough is not None else top
        why = f"at {rate:.0f}/s batches within the target would keep the instances over {busy:.0%} busy: {limit}"
    split, least = sharing(costs, rate, n, top)
    if split > 1:
        why += f"; the queue is shared among {n} instances, in batches of at least {least}"
    if limit == 1 or utilization(costs, rate, 1, n) < COMFORTABLE:
        return Choice(limit, 0.0, f"{why}; single requests keep up at {rate:.0f}/s, so no queue delay", split, least)
    fill_s = (limit - 1) / rate
    delay = min(fill_s, WAIT_SHARE * costs.cost(1), tuner.max_delay_s)
    why += f"; at {rate:.0f}/s, wait up to {delay * 1e6:.0f} us for a batch to fill"
    return Choice(limit, delay, why, split, least)


def sharing(costs: CostModel, rate: float, instances: int, top: int) -> tuple[int, int]:
    """Rule 3: (instances a queue is shared among, the fewest items a shared batch takes). Where a batch's
    fixed cost `a` is under one item's `k`, splitting what is queued between the instances costs them less
    than an item's compute and cuts the latency of the batch's later requests, so a batch takes
    1/instances of the queue; but never fewer items than the smallest batch that keeps up with the
    arrivals, so near capacity the split batches' fixed costs do not let the queue grow (and with none
    keeping up, nothing is split). Where batching gains more (a >= k) one batch takes all it may."""
    a, k = costs.line()
    least = smallest_keeping_up(costs, rate, instances, 0, top, busy=KEEPS_UP)
    if instances == 1 or a >= k or least is None:
        return 1, 1
    return instances, least
