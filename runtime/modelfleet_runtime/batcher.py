"""The dynamic batcher: a queue on the asyncio loop feeding batches to the model in executor threads.

Decisions come from the pure `batching.plan_batch` (Triton's semantics); this module only owns time and
concurrency, driven by events rather than a polling coroutine:
- `submit` rejects at once when `max_queue_size` requests are already waiting (QueueFull, 503);
- a request with a timeout gets a timer: if it is still queued at its deadline it fails with
  DeadlineExceeded and is removed, so expired work is never computed;
- `_pump` dispatches whatever `plan_batch` allows. It runs when a request arrives that could complete a
  batch (the first one, a preferred or full batch, or one of another shape that blocks the head batch),
  when the oldest request's queue delay runs out (a loop timer), and when a batch finishes. An arrival's
  pump runs at the end of the loop iteration, so requests read together share a batch even with no queue
  delay (a tiny model computed at each arrival cost 134 us of CPU per inference, against 82 when batched);
- up to `instances` batches compute concurrently in a thread pool, so the event loop keeps accepting;
  a finished batch's callback dispatches the next one directly, without a further loop round trip.
  A model whose largest batch computes faster than a thread handoff (`inline`, decided after warm-up
  from a measurement) runs on the loop instead: for it the handoff and its GIL round trip cost more
  than the work, and blocking the loop for a few microseconds costs less than either. With a `Placement`
  the choice is made per batch and revised from real batches' compute times (see placement.py);
- with a `Tuner` (adaptive batching) the batch-size limit and the queue delay are chosen online from
  measured batch compute times and the arrival rate, to keep p99 within a target (see adaptive.py);
- a batch that fails on a request's values (`InvalidInput` from the backend: an out-of-range token id,
  say) is computed again one request at a time, in the same worker, so the bad request fails alone with
  its 400 and the others get their answers; any other failure fails only the batch's own requests, each
  with an error naming the batch.

Times for decisions are `loop.time()` (monotonic). Under uvloop timers resolve to 1 ms, so a queue delay
below 1 ms acts like 1 ms when the server is idle; under load batches form while the model is busy anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from modelfleet_runtime.adaptive import Choice, Tuner
from modelfleet_runtime.batching import BatchMismatch, merge, plan_batch, split
from modelfleet_runtime.placement import Placement
from modelfleet_runtime.protocol import BackendError, DeadlineExceeded, InvalidInput, QueueFull

log = logging.getLogger(__name__)

InferFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int
    preferred_batch_sizes: frozenset[int]
    max_queue_delay_s: float
    max_queue_size: int
    instances: int
    batched: bool
    inline: bool = False


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def queued(self, seconds: float) -> None:
        """A request left the queue for compute after `seconds`."""

    def computed(self, batch_size: int, seconds: float) -> None:
        """A batch of `batch_size` items computed in `seconds` (failed batches are not observed)."""

    def placed(self, inline: bool) -> None:
        """A batch was dispatched inline on the loop (True) or to an executor thread (False)."""

    def tuned(self, choice: Choice) -> None:
        """Adaptive batching changed its batch limit or queue delay."""


@dataclass(slots=True)
class _Computed:
    """What a batch's compute gave: one result per request, and the model runs it took to get them."""

    results: list[Outputs | Exception]
    runs: list[tuple[int, float]] = field(default_factory=list)  # (items, seconds) of each successful run
    cpu_s: float = 0.0  # the computing thread's CPU seconds over those runs (placement tells preemption apart)
    retried: InvalidInput | None = None  # the value error that made the batch go one request at a time


class _Pending:
    __slots__ = ("deadline", "enqueued", "future", "inputs", "key", "size", "started", "timer")

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        size: int,
        key: Hashable,
        future: asyncio.Future[Outputs],
        now: float,
    ) -> None:
        self.inputs = inputs
        self.size = size
        self.key = key
        self.future = future
        self.enqueued = now
        # loop.time() drives decisions; perf_counter() gives the queue-duration metric sub-ms resolution.
        self.started = time.perf_counter()
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None


def _deadline_error(timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"request timed out after {timeout_s * 1e6:.0f} us in the queue; it was not computed")


class Batcher:
    """Create inside the running loop; `submit()` requests, `flush()` when draining, `close()` at the end."""

    def __init__(
        self,
        *,
        infer: InferFn,
        input_names: tuple[str, ...],
        config: BatcherConfig,
        observer: BatchObserver | None = None,
        placement: Placement | None = None,
        tuner: Tuner | None = None,
    ) -> None:
        """`placement` decides inline or executor per batch; without it `config.inline` holds throughout.
        `tuner` chooses the batch limit and queue delay online; without it they are the config's."""
        if config.batched and any(p > config.max_batch_size for p in config.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must not exceed max_batch_size")
        if config.max_batch_size < 1 or config.instances < 1:
            raise ValueError("max_batch_size and instances must be >= 1")
        self._infer = infer
        self._names = input_names
        self._config = config
        self._max = config.max_batch_size if config.batched else 1
        self._observer = observer or BatchObserver()
        self._placement = placement
        self._tuner = tuner
        self._choice: Choice | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0
        self._busy = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._flush = False
        self._closed = False
        self._pumping = False
        self._pump_soon = False  # a pump is scheduled for the end of this loop iteration
        self._item_s: float | None = None  # recent compute seconds per item (an exponential average)
        self._executor = ThreadPoolExecutor(max_workers=config.instances, thread_name_prefix="modelfleet-infer")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (cancelled ones linger until a batch passes them)."""
        return len(self._queue)

    def queued_seconds(self) -> float:
        """About how long the requests now queued will take to compute, from recent batches' cost per item
        (0 until a batch has run). A request arriving now waits about this long, plus the batch running."""
        return self._queued_items * (self._item_s or 0.0) / self._config.instances

    @property
    def full_batches_queued(self) -> float:
        """Queued items as a number of maxBatchSize batches."""
        return self._queued_items / self._max

    @property
    def busy(self) -> int:
        """Batches computing right now."""
        return self._busy

    def submit(
        self, inputs: Mapping[str, np.ndarray], size: int, key: Hashable, timeout_s: float | None
    ) -> asyncio.Future[Outputs]:
        """Queue one validated request; the future resolves to its own rows of every output."""
        if self._closed:
            raise BackendError("the server is stopping")
        limit = self._config.max_queue_size
        if limit and len(self._queue) >= limit:
            raise QueueFull(f"queue full: {len(self._queue)} requests are already waiting (maxQueueSize {limit})")
        now = self._loop.time()
        future: asyncio.Future[Outputs] = self._loop.create_future()
        item = _Pending(inputs, size, key, future, now)
        if timeout_s is not None:
            item.deadline = now + timeout_s
            item.timer = self._loop.call_at(item.deadline, self._expire, item, timeout_s)
        first = not self._queue
        self._queue.append(item)
        self._queued_items += size
        if self._tuner is not None:
            self._tuner.arrived(size, now)
        # Only events that can change plan_batch's answer are worth a pump: otherwise the delay timer or
        # the end of the running batch will look at the queue anyway.
        if self._busy < self._config.instances and (
            first
            or self._queued_items >= self._limits(now)[0]
            or self._queued_items in self._config.preferred_batch_sizes
            or key != self._queue[0].key
        ):
            self._schedule_pump()
        return future

    def _schedule_pump(self) -> None:
        """Pump once the loop has run what is ready now: requests read in the same loop iteration (their
        handlers run one after another) then share a batch instead of each computing alone."""
        if not self._pump_soon:
            self._pump_soon = True
            self._loop.call_soon(self._soon)

    def _soon(self) -> None:
        self._pump_soon = False
        self._pump()

    def flush(self) -> None:
        """Dispatch everything queued without waiting for the queue delay (used when draining)."""
        self._flush = True
        self._pump()

    async def close(self) -> None:
        """Stop: anything still queued fails with an error rather than hanging; running batches finish."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        while self._queue:
            item = self._queue.popleft()
            if item.timer is not None:
                item.timer.cancel()
            if not item.future.done():
                item.future.set_exception(BackendError("the server stopped before this request was computed"))
        await self._loop.run_in_executor(None, self._executor.shutdown)

    # --- internals -----------------------------------------------------------------------------------------

    def _expire(self, item: _Pending, timeout_s: float) -> None:
        if item.future.done():
            return
        try:
            self._queue.remove(item)
        except ValueError:
            return  # already dispatched: it started on time, so it runs
        self._queued_items -= item.size
        item.future.set_exception(_deadline_error(timeout_s))

    def _live(self) -> Iterator[tuple[int, Hashable]]:
        for item in self._queue:
            if not item.future.done():
                yield item.size, item.key

    def _limits(self, now: float) -> tuple[int, float]:
        """The batch limit and queue delay in force: the tuner's current choice, else the config's."""
        if self._tuner is None:
            return self._max, self._config.max_queue_delay_s
        choice = self._tuner.current(now)
        if choice is not self._choice:
            if self._choice is None or choice.limit != self._choice.limit:
                log.info(
                    "adaptive batching: batch limit %d, queue delay %.0f us: %s",
                    choice.limit,
                    choice.delay_s * 1e6,
                    choice.reason,
                )
            self._choice = choice
            self._observer.tuned(choice)
        return min(choice.limit, self._max), choice.delay_s

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        """Dispatch batches while an instance is free and plan_batch says go; else arm the delay timer.

        Not re-entrant: a batch finishing inside a pump (inline compute) leaves the dispatching to the pump
        already running, so a long backlog never turns into deep recursion.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        while self._busy < self._config.instances and not self._closed:
            while self._queue and self._queue[0].future.done():
                self._queued_items -= self._queue.popleft().size
            if not self._queue:
                self._flush = False
                return
            now = self._loop.time()
            limit, delay_s = self._limits(now)
            ready_at = self._queue[0].enqueued + delay_s
            count = plan_batch(
                self._live(),
                max_batch_size=limit,
                preferred=self._config.preferred_batch_sizes,
                delay_expired=self._flush or now >= ready_at,
            )
            if count == 0:
                if self._timer is None or self._timer_at != ready_at:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = self._loop.call_at(ready_at, self._on_timer)
                    self._timer_at = ready_at
                return
            batch = self._take(self._shared(count), now)
            if batch and self._dispatch(batch) and self._queue:
                # One inline batch per loop iteration: let the answers go out and new requests in
                # before computing the next one.
                self._loop.call_soon(self._pump)
                return

    def _shared(self, count: int) -> int:
        """At most `count` requests from the head, and no more than the tuner's share of the queued items
        (but its `least`, and one request): adaptive batching's rule 3, so the next free instance takes the
        rest. Not while batches compute inline: there every batch runs on the one loop thread in turn."""
        choice = self._choice  # the one `_limits` just put in force
        inline = self._config.inline if self._placement is None else self._placement.inline
        if choice is None or choice.split <= 1 or inline:
            return count
        share = max(choice.least, -(-self._queued_items // choice.split))
        taken = total = 0
        for size, _ in self._live():
            if taken == count or (taken and total >= share):
                break
            taken += 1
            total += size
        return taken

    def _take(self, count: int, now: float) -> list[_Pending]:
        """Pop the `count` live requests plan_batch chose; any already past its deadline fails instead."""
        batch: list[_Pending] = []
        taken = 0
        while taken < count:
            item = self._queue.popleft()
            self._queued_items -= item.size
            if item.future.done():
                continue
            taken += 1
            if item.timer is not None:
                item.timer.cancel()
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(_deadline_error(item.deadline - item.enqueued))
                continue
            batch.append(item)
        return batch

    def _timed_infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[Outputs, float, float]:
        """Outputs, wall seconds and this thread's CPU seconds. Timed where it runs, so the metric is the
        model's time, not the event loop's latency."""
        began, cpu = time.perf_counter(), time.thread_time()
        outputs = self._infer(inputs)
        return outputs, time.perf_counter() - began, time.thread_time() - cpu

    def _compute(self, requests: list[Mapping[str, np.ndarray]], sizes: list[int]) -> _Computed:
        """Run one batch where it computes (a worker thread, or inline); a value error goes one by one."""
        merged = merge(requests, self._names) if self._config.batched else dict(requests[0])
        try:
            outputs, seconds, cpu_s = self._timed_infer(merged)
        except InvalidInput as exc:
            if len(requests) == 1:
                return _Computed([exc])
            computed = self._one_by_one(requests, sizes)
            computed.retried = exc
            return computed
        return _Computed(self._split(outputs, sizes), [(sum(sizes), seconds)], cpu_s=cpu_s)

    def _one_by_one(self, requests: list[Mapping[str, np.ndarray]], sizes: list[int]) -> _Computed:
        computed = _Computed([])
        for inputs, size in zip(requests, sizes, strict=True):
            try:
                outputs, seconds, cpu_s = self._timed_infer(inputs)
            except InvalidInput as exc:
                computed.results.append(exc)
                continue
            except Exception as exc:
                log.warning("a request of %d items, computed alone, failed: %s: %s", size, type(exc).__name__, exc)
                computed.results.append(_batch_error(f"request of {size} items", exc))
                continue
            computed.results.extend(self._split(outputs, [size]))
            computed.runs.append((size, seconds))
            computed.cpu_s += cpu_s
        return computed

    def _split(self, outputs: Outputs, sizes: list[int]) -> list[Outputs | Exception]:
        if not self._config.batched:
            return [outputs]
        try:
            return list(split(outputs, sizes))
        except BatchMismatch as exc:
            what = f"batch of {len(sizes)} requests ({sum(sizes)} items)"
            error = BackendError(f"{what} returned outputs that do not match it: {exc}")
            return [error] * len(sizes)

    def _runs_inline(self, inputs: list[Mapping[str, np.ndarray]]) -> tuple[bool, int]:
        """Where this batch computes, and its input elements (what the placement's evidence is kept in)."""
        if self._placement is None:
            return self._config.inline, 0
        elements = sum(int(array.size) for request in inputs for array in request.values())
        return self._placement.runs_inline(elements), elements

    def _dispatch(self, batch: list[_Pending]) -> bool:
        """Start computing `batch`; True if it computed inline (it is then already answered)."""
        now = time.perf_counter()
        for item in batch:
            self._observer.queued(now - item.started)
        sizes = [item.size for item in batch]
        inputs = [item.inputs for item in batch]
        inline, elements = self._runs_inline(inputs)
        self._observer.placed(inline)
        self._busy += 1
        if inline:
            # The model is faster than a thread handoff: compute here, on the loop, and answer at once.
            try:
                result: _Computed | BaseException = self._compute(inputs, sizes)
            except Exception as exc:
                result = exc
            self._finished(result, batch, sizes, elements)
            return True
        future = self._loop.run_in_executor(self._executor, self._compute, inputs, sizes)
        future.add_done_callback(lambda f: self._finished(_result_of(f), batch, sizes, elements))
        return False

    def _revise(self, result: _Computed | BaseException, elements: int) -> None:
        """Feed the batch's measured compute time to the placement; log a change of placement once."""
        if self._placement is None or not isinstance(result, _Computed) or not result.runs:
            return
        change = self._placement.observe(elements, sum(seconds for _, seconds in result.runs), result.cpu_s)
        if change is not None:
            where = "inline on the event loop" if change.inline else "in executor threads"
            log.info("batches now run %s: %s", where, change.reason)

    def _finished(
        self, result: _Computed | BaseException, batch: list[_Pending], sizes: list[int], elements: int
    ) -> None:
        self._busy -= 1
        self._revise(result, elements)
        results = self._outcome(result, sizes)
        for item, outcome in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        self._pump()

    def _outcome(self, result: _Computed | BaseException, sizes: list[int]) -> list[Outputs | Exception]:
        what = f"batch of {len(sizes)} requests ({sum(sizes)} items)"
        if isinstance(result, asyncio.CancelledError):
            return [BackendError(f"{what} was cancelled: the server is stopping")] * len(sizes)
        if isinstance(result, BaseException):
            log.warning("%s failed: %s: %s", what, type(result).__name__, result)
            return [_batch_error(what, result)] * len(sizes)
        for items, seconds in result.runs:
            self._observer.computed(items, seconds)
            if self._tuner is not None:
                self._tuner.computed(items, seconds)
            per_item = seconds / items
            self._item_s = per_item if self._item_s is None else 0.8 * self._item_s + 0.2 * per_item
        if result.retried is not None:
            failed = sum(isinstance(r, Exception) for r in result.results)
            log.info("%s failed on a request's values (%s); one by one, %d failed", what, result.retried, failed)
        return result.results


def _batch_error(what: str, exc: BaseException) -> BackendError:
    return BackendError(f"{what} failed: {type(exc).__name__}: {exc}")


def _result_of(future: asyncio.Future[_Computed]) -> _Computed | BaseException:
    if future.cancelled():
        return asyncio.CancelledError()
    error = future.exception()
    return error if error is not None else future.result()
