"""Open-loop (Poisson) and closed-loop HTTP/1.1 load against loopback servers, honest about queueing.

Open loop: arrival times are drawn up front from a Poisson process at a fixed rate and each request's
latency is measured from its *scheduled* time, not from when it was actually written to a socket. If the
server (or this generator) falls behind, that delay shows up in the latency instead of silently lowering
the offered load: no coordinated omission.

The generator is callback-driven (one asyncio Protocol per keep-alive connection, no task per request) so
one Python process can offer well over 10,000 requests/s. Sends are released whenever the loop wakes (on
any response, or on a timer of at least 1 ms, the event loop's timer resolution); the release lag is
reported so a saturated generator is visible. Loads are bounded in count and in time and go to loopback
addresses only.

`run_open_loop` / `run_closed_loop` are importable coroutines; `run_in_process` runs either in a separate
(spawned) process, so the generator's CPU time is not charged to the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, cast

import httptools
import numpy as np

# Statuses recorded for requests that got no HTTP response.
STATUS_CONNECTION_ERROR = -1
STATUS_NOT_SENT = -2
MIN_SLEEP_S = 0.001


@dataclass(frozen=True)
class HttpRequest:
    """One request to send; `encode` gives the exact bytes written to the socket."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.body or self.method in {"POST", "PUT"}:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass
class LoadResult:
    """Per-request outcomes of one run; latency in seconds, NaN where no response came back."""

    mode: str
    target_rate: float | None
    window_s: float
    elapsed_s: float
    latencies_s: np.ndarray
    statuses: np.ndarray
    send_lag_s: np.ndarray
    connections: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return int((self.statuses != STATUS_NOT_SENT).sum())

    @property
    def ok(self) -> int:
        return int(((self.statuses >= 200) & (self.statuses < 300)).sum())

    def ok_latencies(self) -> np.ndarray:
        mask = (self.statuses >= 200) & (self.statuses < 300)
        return self.latencies_s[mask]

    def throughput(self) -> float:
        """Successful responses per second over the scheduling window (open loop) or run (closed loop)."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        lat = self.ok_latencies()
        return float(np.percentile(lat, q) * 1e3) if lat.size else math.nan

    def status_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.statuses, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def summary(self) -> dict[str, Any]:
        lag = self.send_lag_s[np.isfinite(self.send_lag_s)]
        return {
            "mode": self.mode,
            "target_rate": self.target_rate,
            "requests": len(self.statuses),
            "ok": self.ok,
            "statuses": self.status_counts(),
            "throughput_rps": round(self.throughput(), 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "max_ms": round(self.percentile_ms(100), 3),
            "send_lag_p99_ms": round(float(np.percentile(lag, 99) * 1e3), 3) if lag.size else None,
            "connections": self.connections,
            **self.extra,
        }


def check_loopback(host: str) -> None:
    """Refuse any target that is not on this machine: load tests only ever hit loopback."""
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"load generator only targets loopback addresses, not {host!r}")


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current = -1
        self.ready: asyncio.Future[None] = gen.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if not self.ready.done():
            self.ready.set_result(None)

    def send(self, index: int) -> None:
        assert self.transport is not None
        self.current = index
        self.gen.sent_at[index] = time.perf_counter()
        self.transport.write(self.gen.payloads[index % len(self.gen.payloads)])

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        index, self.current = self.current, -1
        self.gen.complete(self, index, self.parser.get_status_code())
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("connection closed"))
        self.gen.lost(self)


class _Generator:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, payloads: list[bytes], count: int, *, closed_loop: bool
    ) -> None:
        self.loop = loop
        self.payloads = payloads
        self.count = count
        self.closed_loop = closed_loop
        self.scheduled = np.full(count, np.nan)
        self.sent_at = np.full(count, np.nan)
        self.done_at = np.full(count, np.nan)
        self.statuses = np.full(count, STATUS_NOT_SENT, dtype=np.int32)
        self.idle: list[_Connection] = []
        self.live: set[_Connection] = set()
        self.pending: deque[int] = deque()
        self.next_index = 0
        self.outstanding = 0
        self.stopped = False
        self.all_done: asyncio.Future[None] = loop.create_future()

    def release(self, index: int) -> None:
        """Hand a due request to an idle connection, or queue it until one frees up."""
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(index)
        else:
            self.pending.append(index)

    def release_due(self) -> None:
        now = time.perf_counter()
        while self.next_index < self.count and self.scheduled[self.next_index] <= now and not self.stopped:
            self.release(self.next_index)
            self.next_index += 1

    def complete(self, conn: _Connection, index: int, status: int) -> None:
        if index >= 0:
            self.done_at[index] = time.perf_counter()
            self.statuses[index] = status
            self.outstanding -= 1
        if self.closed_loop and not self.stopped and self.next_index < self.count:
            i = self.next_index
            self.next_index += 1
            self.scheduled[i] = time.perf_counter()
            self.outstanding += 1
            conn.send(i)
        elif self.pending:
            conn.send(self.pending.popleft())
        else:
            self.idle.append(conn)
            if not self.closed_loop:
                self.release_due()
        self._check_done()

    def lost(self, conn: _Connection) -> None:
        self.live.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.current >= 0:
            self.statuses[conn.current] = STATUS_CONNECTION_ERROR
            self.done_at[conn.current] = time.perf_counter()
            self.outstanding -= 1
            conn.current = -1
        if not self.live:
            # Nothing left to carry pending requests: they fail rather than hang.
            while self.pending:
                i = self.pending.popleft()
                self.statuses[i] = STATUS_CONNECTION_ERROR
                self.outstanding -= 1
        self._check_done()

    def _check_done(self) -> None:
        finished_sending = self.stopped or self.next_index >= self.count
        if finished_sending and self.outstanding <= 0 and not self.all_done.done():
            self.all_done.set_result(None)

    def result(self, *, mode: str, rate: float | None, window_s: float, elapsed_s: float) -> LoadResult:
        latencies = self.done_at - self.scheduled
        latencies[self.statuses < 0] = np.nan
        return LoadResult(
            mode=mode,
            target_rate=rate,
            window_s=window_s,
            elapsed_s=elapsed_s,
            latencies_s=latencies,
            statuses=self.statuses.copy(),
            send_lag_s=self.sent_at - self.scheduled,
            connections=len(self.live),
        )


async def _open_connections(gen: _Generator, host: str, port: int, n: int) -> None:
    for _ in range(n):
        conn = _Connection(gen)
        await gen.loop.create_connection(lambda c=conn: c, host, port)  # type: ignore[misc]
        await conn.ready
        gen.live.add(conn)
        gen.idle.append(conn)


async def _finish(gen: _Generator, drain_timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(gen.all_done), timeout=drain_timeout_s)
    for conn in list(gen.live):
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0)


def _encode_all(requests: Sequence[HttpRequest], host: str) -> list[bytes]:
    if not requests:
        raise ValueError("at least one request is needed")
    return [r.encode(host) for r in requests]


def poisson_arrivals(
    rng: np.random.Generator, schedule: Sequence[tuple[float, float]], duration_s: float
) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Poisson process whose rate follows `schedule`, repeated."""
    parts: list[np.ndarray] = []
    begin = 0.0
    while begin < duration_s:
        for seconds, rate in schedule:
            end = min(begin + seconds, duration_s)
            expected = rate * (end - begin)
            # Enough gaps to cover the segment (mean + 6 sigma), then cut at its end.
            gaps = rng.exponential(1.0 / rate, size=int(expected + 6 * math.sqrt(expected) + 16))
            times = begin + np.cumsum(gaps)
            parts.append(times[times < end])
            begin = end
            if begin >= duration_s:
                break
    return np.concatenate(parts)


async def run_open_loop(
    *,
    host: str,
    port: int,
    requests: Sequence[HttpRequest],
    rate: float,
    duration_s: float,
    max_requests: int | None = None,
    connections: int = 64,
    seed: int = 0,
    drain_timeout_s: float = 30.0,
    schedule: Sequence[tuple[float, float]] = (),
) -> LoadResult:
    """Offer Poisson arrivals at `rate`/s for `duration_s` (and at most `max_requests`), cycling `requests`.

    `schedule`, when given, makes the rate piecewise constant: (seconds, rate) segments repeated over the
    window (a bursty trace); `rate` is then only reported.

    Requests are released at their scheduled times onto `connections` keep-alive connections; when all are
    busy a request waits for one, and that wait counts in its latency. After the window, outstanding
    requests get `drain_timeout_s` to finish; any still open then are recorded as connection errors.
    """
    check_loopback(host)
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rng, schedule or [(duration_s, rate)], duration_s)
    if max_requests is not None:
        arrivals = arrivals[:max_requests]
    loop = asyncio.get_running_loop()
    gen = _Generator(loop, _encode_all(requests, host), len(arrivals), closed_loop=False)
    await _open_connections(gen, host, port, connections)
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.01
    gen.scheduled[:] = start + arrivals
    while gen.next_index < gen.count and gen.live:
        gen.release_due()
        if gen.next_index < gen.count:
            await asyncio.sleep(max(gen.scheduled[gen.next_index] - time.perf_counter(), MIN_SLEEP_S))
    gen.stopped = True
    if gen.next_index < gen.count:
        gen.statuses[gen.next_index :] = STATUS_CONNECTION_ERROR
    gen._check_done()
    await _finish(gen, drain_timeout_s)
    result = gen.result(mode="open", rate=rate, window_s=duration_s, elapsed_s=duration_s)
    result.connections = connections
    result.extra["cpu_s"] = time.process_time() - cpu0
    # When the schedule began, on perf_counter's clock (CLOCK_MONOTONIC on Linux, so another process on the
    # machine can place the window on its own time.monotonic()).
    result.extra["start"] = start
    return result


async def run_closed_loop(
    *,
    host: str,
    port: int,
    requests: Sequence[HttpRequest],
    concurrency: int,
    duration_s: float,
    max_requests: int = 10_000_000,
    drain_timeout_s: float = 30.0,
) -> LoadResult:
    """Keep `concurrency` requests outstanding for `duration_s`: the saturation throughput of a server."""
    check_loopback(host)
    loop = asyncio.get_running_loop()
    gen = _Generator(loop, _encode_all(requests, host), max_requests, closed_loop=True)
    await _open_connections(gen, host, port, concurrency)
    cpu0 = time.process_time()
    start = time.perf_counter()
    for conn in list(gen.idle):
        gen.idle.remove(conn)
        gen.complete(conn, -1, 0)
    await asyncio.sleep(duration_s)
    gen.stopped = True
    elapsed = time.perf_counter() - start
    gen._check_done()
    await _finish(gen, drain_timeout_s)
    used = gen.next_index
    result = gen.result(mode="closed", rate=None, window_s=duration_s, elapsed_s=elapsed)
    result.latencies_s = result.latencies_s[:used]
    result.statuses = result.statuses[:used]
    result.send_lag_s = result.send_lag_s[:used]
    result.connections = concurrency
    result.extra["cpu_s"] = time.process_time() - cpu0
    return result


def _run_sync(kind: str, kwargs: dict[str, Any]) -> LoadResult:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    coro = run_open_loop(**kwargs) if kind == "open" else run_closed_loop(**kwargs)
    result: LoadResult = runner(coro)
    return result


def run_in_process(kind: str, **kwargs: Any) -> LoadResult:
    """Run `run_open_loop` (kind="open") or `run_closed_loop` (kind="closed") in a fresh spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run_sync, kind, kwargs).result()
