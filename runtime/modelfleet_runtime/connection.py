"""One HTTP connection: uvicorn's httptools protocol with the limits a hostile client needs, and JSON errors.

uvicorn's `HttpToolsProtocol` has no header size limit (httptools grows a header by concatenation, so a
64 MiB header costs ~10 s of CPU), no header or body read timeout, no timeout for a connection that never
sends a byte, plain-text 400s, and a 400 for any request carrying `Upgrade: h2c` (httptools hands the
body to the "upgraded" protocol). This subclass adds, per connection:
- a header size limit and a header count limit: the request line and headers as the parser delivers them
  (so a head that arrives in one read is measured too), and the bytes received while a head is incomplete
  (so one header that never ends is stopped after a read); past either, 431 and close;
- a header timeout from the connection's first byte (or its opening) to the end of a request's headers,
  and a body timeout from the end of the headers to the end of the body: 408 and close;
- a minimum body rate (Kestrel's MinRequestBodyDataRate): after a grace period, a body arriving slower on
  average than the minimum gets 408 and close, so a trickle does not hold a connection and its share of
  the body budget for the whole body timeout; time when the server itself is not reading does not count;
- an idle timeout between keep-alive requests (uvicorn's `timeout_keep_alive`), also armed at connect;
- a connection cap: connections past it are marked, and the app answers them 503 (health and metrics
  excepted, so probes never fail because of clients) and closes them;
- upgrades ignored: the request is replayed without its Upgrade headers and served as HTTP/1.1;
- a graceful shutdown that loses no request already written: busy connections finish their response and
  close; an idle connection is closed at once only if nothing is waiting to be read on it; one that has
  not sent its first request yet keeps its idle timer (Go's http.Server gives such connections 5 s), and
  whatever request it sends is answered (503 while draining) with `Connection: close`;
- a `ConnectionWatch` in each request's scope, told when the client goes, so queued work is cancelled.
Malformed HTTP gets a JSON 400 and the connection closes.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("modelfleet.http")

WATCH_KEY = "modelfleet.connection"
# Hop-by-hop headers that only concern the upgrade; the replayed request goes without them.
_UPGRADE_HEADERS = frozenset({b"upgrade", b"http2-settings"})


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    max_connections: int
    max_header_count: int = 100
    min_body_rate: float = 0.0  # bytes/s; 0 = no minimum
    body_rate_grace_s: float = 5.0


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request head past a limit."""


class ConnectionWatch:
    """What the app may know about its connection: whether it is past the cap, and when the client goes."""

    __slots__ = ("_callbacks", "lost", "over_cap")

    def __init__(self, *, over_cap: bool) -> None:
        self.over_cap = over_cap
        self.lost = False
        self._callbacks: list[Callable[[], object]] = []

    def on_lost(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)

    def discard(self, callback: Callable[[], object]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def connection_lost(self) -> None:
        self.lost = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def build_error_response(status: int, message: str, *, close: bool = True) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body (that closes the connection, by default)."""
    body = orjson.dumps({"error": message})
    head = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
    return STATUS_LINE[status] + head + (b"connection: close\r\n\r\n" if close else b"\r\n") + body


# Asked for every request, with its method and raw target, once its head is parsed: an error message if the
# request is to be refused with 503 without going to the app (an infer request at a full queue), else None.
Refuser = Callable[[bytes, bytes], str | None]
# Largest unread body after an early refusal for which the connection is kept (and the body read past).
_KEEP_UNREAD_BYTES = 1024 * 1024


def build_replay(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request's head again, without its upgrade headers, so a fresh parser reads it as plain HTTP/1.1."""
    lines = [method + b" " + url + b" HTTP/1.1"]
    for name, value in headers:
        kept = value
        if name == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            kept = b", ".join(t for t in tokens if t.lower() not in _UPGRADE_HEADERS)
        if name not in _UPGRADE_HEADERS and kept:
            lines.append(name + b": " + kept)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class HardenedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits; `limits` is set on the subclass `build_protocol` makes."""

    limits: ConnectionLimits
    refuse: Refuser | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]  # a float works
        self._awaiting_headers = True
        self._header_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._replay: bytes | None = None
        self._closed = False
        self._head_size = 0  # request line and headers of the current request, as parsed
        self._header_count = 0
        self._head_error: str | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        self._rate_from = 0.0
        self._rate_bytes = 0
        self._received_any = False
        self._in_message = False  # the parser is inside a request (from its first byte to its end)
        self._shutting_down = False
        self.watch = ConnectionWatch(over_cap=False)

    # --- connection --------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch.over_cap = len(self.connections) > self.limits.max_connections
        # A connection that never sends a byte is closed like an idle keep-alive one.
        self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout_s, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_deadline()
        self._cancel_rate()
        super().connection_lost(exc)
        self.watch.connection_lost()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._received_any = True
        if self._awaiting_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._replay_upgrade(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            if self._head_error is not None:  # a limit, raised from a header callback
                self.reject(431, self._head_error)
                return
            log.debug("invalid HTTP request from %s: %s", self.client, exc)
            self.reject(400, f"invalid HTTP request: {str(exc)[:100]}")
            return
        if not self._closed:
            self._after_feed()

    def _after_feed(self) -> None:
        """Limits checked after feeding. The bytes of an unfinished head bound a header that never ends (to
        one read past the limit); a head that ends within the chunk was measured by the header callbacks."""
        if self._awaiting_headers:
            if self._header_bytes > self.limits.max_header_bytes:
                self.reject(431, f"request headers exceed the limit of {self.limits.max_header_bytes} bytes")
            elif self._header_bytes and self._deadline is None:
                self._arm(self.limits.header_timeout_s, "headers")
        elif self._deadline is None and self._replay is None:
            self._arm(self.limits.body_timeout_s, "body")
            if self.limits.min_body_rate > 0:
                self._rate_from, self._rate_bytes = self.loop.time(), 0
                self._rate_timer = self.loop.call_later(self.limits.body_rate_grace_s, self._check_rate)

    def send_400_response(self, msg: str) -> None:
        self.reject(400, msg)

    def reject(self, status: int, message: str) -> None:
        """Answer with an error and close. A request the app is handling gets a disconnect instead of its
        response; the error is written only where it cannot interleave with another response."""
        if self._closed:
            return
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if busy:
            cycle.disconnected = True
            cycle.message_event.set()
            writable = not (cycle.response_started or self.pipeline or self._awaiting_headers)
        else:
            writable = self._awaiting_headers  # else a body being discarded after its response
        if writable:
            self.transport.write(build_error_response(status, message))
        self._close()

    def _close(self) -> None:
        self._closed = True
        self._cancel_deadline()
        self._cancel_rate()
        self.transport.close()

    # --- timers ------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, phase: str) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cancel_rate(self) -> None:
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None

    def _check_rate(self) -> None:
        """Every second after the grace period: the body's average rate since its start (or since the server
        last resumed reading it) must be at least the minimum."""
        self._rate_timer = None
        now = self.loop.time()
        grace, minimum = self.limits.body_rate_grace_s, self.limits.min_body_rate
        if self.flow.read_paused:  # the server is not reading, so the client cannot send: not its rate
            self._rate_from, self._rate_bytes = now, 0
        elif now - self._rate_from >= grace and self._rate_bytes < minimum * (now - self._rate_from):
            rate = self._rate_bytes / (now - self._rate_from)
            log.debug("closing %s: request body at %.0f bytes/s", self.client, rate)
            self.reject(408, f"request body arriving at {rate:.0f} bytes/s, below the minimum of {minimum:g} bytes/s")
            return
        self._rate_timer = self.loop.call_at(max(self._rate_from + grace, now + 1.0), self._check_rate)

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline = None
        log.debug("closing %s: request %s not received within %.0fs", self.client, phase, seconds)
        self.reject(408, f"request {phase} not received within {seconds:g} s")

    # --- parser callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {WATCH_KEY: self.watch}  # type: ignore[dict-item]
        self._head_size = self._header_count = 0
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)
        self._check_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        self._check_head()

    def _check_head(self) -> None:
        limits = self.limits
        if self._head_size > limits.max_header_bytes:
            self._head_error = f"request headers exceed the limit of {limits.max_header_bytes} bytes"
        elif self._header_count > limits.max_header_count:
            self._head_error = f"more than {limits.max_header_count} request headers"
        else:
            return
        raise _HeadTooLarge(self._head_error)

    def on_body(self, body: bytes) -> None:
        self._rate_bytes += len(body)
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel_deadline()
        if self.parser.should_upgrade():
            self._replay = self._upgrade_head()
            return
        if self._refused_early():
            return
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False

    def _refused_early(self) -> bool:
        """Answer an infer request at a full queue with a 503 here, without an ASGI task: under overload
        most requests are refused, and what each refusal costs is CPU the model and the admitted requests
        do not get. Only between responses (never out of order), on a connection under the cap."""
        refuse = self.refuse
        if refuse is None or self.pipeline or self.watch.over_cap or self._shutting_down:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        message = refuse(self.parser.get_method(), self.url)
        if message is None:
            return False
        keep = self.parser.should_keep_alive() and not self.expect_100_continue and self._small_body()
        cycle = RequestResponseCycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=False,
            default_headers=[],
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=keep,
            on_response=self.on_response_complete,
        )
        cycle.response_started = cycle.response_complete = True  # its body, if any, is read past
        self.cycle = cycle
        self.transport.write(build_error_response(503, message, close=not keep))
        if keep:
            self.on_response_complete()
        else:
            self._close()
        return True

    def _small_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (
                name == b"content-length" and not (value.isdigit() and int(value) <= _KEEP_UNREAD_BYTES)
            ):
                return False
        return True

    def on_message_complete(self) -> None:
        self._in_message = False
        self._awaiting_headers = True
        self._header_bytes = 0
        self._cancel_deadline()
        self._cancel_rate()
        if self._replay is not None:
            return  # the upgrade request's head, answered when it is replayed
        super().on_message_complete()

    # --- shutdown ------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, for each open connection once the listener is closed.

        uvicorn closes every connection without a response in progress, including one whose next request
        is already in the socket buffer, half parsed, or about to come on a connection just accepted: those
        clients get a reset for a request they wrote. Here only a connection with nothing to read and a
        request behind it is closed at once; the others answer what arrives and close after it.
        """
        self._shutting_down = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # answering: closes after its response
        elif not self._received_any or self._in_message or self.pipeline or self._unread_bytes():
            pass  # a request is coming (or may: a new connection): answered with Connection: close
        else:
            self._close()

    def _unread_bytes(self) -> int:
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return 0
        count = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
        except OSError:
            return 0
        return count[0]

    # --- upgrades ----------------------------------------------------------------------------------------

    def _upgrade_head(self) -> bytes | None:
        method = self.parser.get_method()
        if method == b"CONNECT":
            self.reject(405, "CONNECT is not supported")
            return None
        return build_replay(method, self.url, self.headers)

    def _replay_upgrade(self, rest: bytes) -> None:
        """Serve an upgrade request as HTTP/1.1: a fresh parser reads its head again, then its body."""
        head, self._replay = self._replay, None
        if head is None or self._closed:
            return
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.data_received(head + rest)


def build_protocol(limits: ConnectionLimits, refuse: Refuser | None = None) -> type[HardenedProtocol]:
    """The protocol class uvicorn instantiates per connection (`Config(http=...)`), bound to `limits` and
    to the app's early refusal."""
    return type(
        "ModelfleetHttpProtocol",
        (HardenedProtocol,),
        {"limits": limits, "refuse": staticmethod(refuse) if refuse else None},
    )
