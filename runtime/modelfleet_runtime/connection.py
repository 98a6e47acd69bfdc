"""One HTTP connection: uvicorn's httptools protocol with the limits a hostile client needs, and JSON errors.

uvicorn's `HttpToolsProtocol` has no header size limit (httptools grows a header by concatenation, so a
64 MiB header costs ~10 s of CPU), no header or body read timeout, no timeout for a connection that never
sends a byte, plain-text 400s, and a 400 for any request carrying `Upgrade: h2c` (httptools hands the
body to the "upgraded" protocol). This subclass adds, per connection:
- a header size limit: bytes received while a request's headers are incomplete; past it, 431 and close;
- a header timeout from the connection's first byte (or its opening) to the end of a request's headers,
  and a body timeout from the end of the headers to the end of the body: 408 and close;
- an idle timeout between keep-alive requests (uvicorn's `timeout_keep_alive`), also armed at connect;
- a connection cap: connections past it are marked, and the app answers them 503 (health and metrics
  excepted, so probes never fail because of clients) and closes them;
- upgrades ignored: the request is replayed without its Upgrade headers and served as HTTP/1.1;
- a `ConnectionWatch` in each request's scope, told when the client goes, so queued work is cancelled.
Malformed HTTP gets a JSON 400 and the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

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


def build_error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body that closes the connection."""
    body = orjson.dumps({"error": message})
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return STATUS_LINE[status] + head + body


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]  # a float works
        self._awaiting_headers = True
        self._header_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._replay: bytes | None = None
        self._closed = False
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
        super().connection_lost(exc)
        self.watch.connection_lost()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._awaiting_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._replay_upgrade(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            log.debug("invalid HTTP request from %s: %s", self.client, exc)
            self.reject(400, f"invalid HTTP request: {str(exc)[:100]}")
            return
        if not self._closed:
            self._after_feed()

    def _after_feed(self) -> None:
        """Limits checked after feeding: a chunk that ends the headers and carries body is not counted
        against them, and what one chunk adds to an unfinished header is bounded by one read."""
        if self._awaiting_headers:
            if self._header_bytes > self.limits.max_header_bytes:
                self.reject(431, f"request headers exceed the limit of {self.limits.max_header_bytes} bytes")
            elif self._header_bytes and self._deadline is None:
                self._arm(self.limits.header_timeout_s, "headers")
        elif self._deadline is None and self._replay is None:
            self._arm(self.limits.body_timeout_s, "body")

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
        self.transport.close()

    # --- timers ------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, phase: str) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline = None
        log.debug("closing %s: request %s not received within %.0fs", self.client, phase, seconds)
        self.reject(408, f"request {phase} not received within {seconds:g} s")

    # --- parser callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {WATCH_KEY: self.watch}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel_deadline()
        if self.parser.should_upgrade():
            self._replay = self._upgrade_head()
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        self._cancel_deadline()
        if self._replay is not None:
            return  # the upgrade request's head, answered when it is replayed
        super().on_message_complete()

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


def build_protocol(limits: ConnectionLimits) -> type[HardenedProtocol]:
    """The protocol class uvicorn instantiates per connection (`Config(http=...)`), bound to `limits`."""
    return type("ModelfleetHttpProtocol", (HardenedProtocol,), {"limits": limits})
