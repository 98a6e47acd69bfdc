"""`modelfleet serve`: thin OIP v2 REST endpoints over the DataPlane, as an ASGI app served by uvicorn.

The HTTP stack was chosen by measurement (bench/http_stacks.py, results in bench/results/http_stacks.md):
on the real infer endpoint (tiny model, binary tensors, 2 shared cores), this ASGI app on uvicorn (uvloop +
httptools) cost 10-19% less server CPU per request than the same `RestApi` on aiohttp's low-level server
in two full comparison runs (throughput: +12% in one, a tie within noise in the other). Granian, which
parses HTTP in Rust threads, matched uvicorn's CPU per request and was 16% faster in one run, even in the
other; it is not used because its embedded (in-process) mode is experimental, and our drain (listener kept
open, answering not-ready and 503 while accepted work finishes) needs control of the server's shutdown,
which subclassing uvicorn's `Server` gives.
`create_app()` builds the same app from the environment for uvicorn's or granian's command line.

Endpoints: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}], .../ready, .../config,
POST .../infer, GET /metrics. Every error body is {"error": "..."}, protocol-level ones included. Limits on
connections, headers and read times are connection.py's; admission and the body budget are applied here
and in the DataPlane before a body is read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import math
import os
import resource
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any
from urllib.parse import unquote

import orjson

from modelfleet_runtime.connection import WATCH_KEY, ConnectionLimits, ConnectionWatch, build_protocol
from modelfleet_runtime.dataplane import ClientGone, DataPlane, State, clip
from modelfleet_runtime.metrics import OUTCOMES, Metrics
from modelfleet_runtime.protocol import InferenceError, InvalidInput, PayloadTooLarge, error_body
from modelfleet_runtime.selfcheck import ConflictingDistributions, check_onnxruntime
from modelfleet_runtime.settings import ServeSettings

log = logging.getLogger("modelfleet.serve")

JSON = "application/json"
OCTET = "application/octet-stream"


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = JSON
    header_length: int | None = None
    close: bool = False
    retry_after: int | None = None


def _error(status: int, message: str, *, close: bool = False, retry_after: int | None = None) -> HttpResponse:
    return HttpResponse(status, error_body(message), close=close, retry_after=retry_after)


def _json(doc: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(doc))


_OK = HttpResponse(200, b"{}")
# An early refusal keeps the connection when the unread body is small enough to read past cheaply.
_KEEP_UNREAD_BYTES = 1024 * 1024


class BudgetFull(InferenceError):
    """Request bodies in flight already hold the memory budget; the client should retry (or go elsewhere)."""

    status = 503
    outcome = "rejected_memory"


class BodyBudget:
    """Bytes of request bodies being received or held, against a limit; all on the event loop thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> None:
        if self.used + size > self.limit:
            raise BudgetFull(
                f"the server is holding {self.used} bytes of request bodies (limit {self.limit}); retry shortly"
            )
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size


@dataclass(slots=True)
class Request:
    """What routing needs from an HTTP request; the body is read only once the request is admitted."""

    method: str
    segments: list[str]
    receive: Any = None
    declared: int | None = None
    chunked: bool = False
    header_length: str | None = None
    encoding: bytes = b""
    watch: ConnectionWatch | None = None
    held: int = 0  # bytes reserved in the budget for this request
    read: bool = False

    @property
    def path(self) -> str:
        return "/".join(self.segments) or "/"


def path_segments(scope: dict[str, Any]) -> list[str]:
    """The path split on '/' before percent-decoding, each segment decoded once: %2F stays inside a segment."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:  # another ASGI server: `path` is decoded already
        parts: list[str] = scope["path"].split("/")
    else:
        parts = [unquote(p) if "%" in p else p for p in raw.decode("latin-1").split("?", 1)[0].split("/")]
    while len(parts) > 2 and parts[-1] == "":
        parts.pop()
    return parts


def build_request(scope: dict[str, Any], receive: Any) -> Request:
    request = Request(scope["method"], path_segments(scope), receive)
    for key, value in scope["headers"]:
        if key == b"content-length":
            request.declared = int(value) if value.isdigit() else None
        elif key == b"transfer-encoding":
            request.chunked = True
        elif key == b"inference-header-content-length":
            request.header_length = value.decode("latin-1")
        elif key == b"content-encoding" and value.lower() != b"identity":
            request.encoding = value
    request.watch = scope.get("extensions", {}).get(WATCH_KEY)
    return request


class RestApi:
    """Routes requests to the DataPlane. Never raises: every failure becomes an error response."""

    def __init__(
        self,
        dataplane: DataPlane,
        metrics: Metrics,
        *,
        max_request_bytes: int,
        budget: BodyBudget,
        model: tuple[str, str] = ("", ""),
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.budget = budget
        name, version = model
        self._infer_targets = frozenset(
            t.encode("latin-1")
            for t in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{version}/infer")
            if name
        )

    def early_refusal(self, method: bytes, target: bytes) -> str | None:
        """For the connection, before a task is made for the request: the 503 message for an infer request
        to the served model arriving at a full queue, else None (the app then handles it as usual)."""
        if method != b"POST" or target not in self._infer_targets:
            return None
        dp = self.dataplane
        if dp.state is not State.READY:
            return None
        message = dp.queue_refusal()
        if message is not None:
            self.metrics.request_done("rejected_queue_full", None)
        return message

    def payload_too_large(self, size: int | None = None) -> HttpResponse:
        self.metrics.request_done("invalid", None)
        what = f"{size} bytes" if size is not None else "the request body"
        return _error(413, f"{what} exceeds the limit of {self.max_request_bytes} bytes", close=True)

    async def handle(self, request: Request) -> HttpResponse | None:
        """The response, or None when the client has gone and nothing is to be sent."""
        try:
            response = await self._route(request)
        except ClientGone:
            return None
        except InferenceError as exc:
            response = _error(exc.status, exc.message, retry_after=1 if isinstance(exc, BudgetFull) else None)
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, clip(request.path))
            response = _error(500, f"internal error: {type(exc).__name__}")
        finally:
            self.budget.release(request.held)
        if not request.read and (request.chunked or (request.declared or 0) > _KEEP_UNREAD_BYTES):
            response.close = True  # do not receive a large body only to discard it
        if request.watch is not None and request.watch.over_cap:
            response.close = True
        return response

    async def _route(self, request: Request) -> HttpResponse:
        method, parts = request.method, request.segments
        dp = self.dataplane
        if parts[1:] == ["metrics"]:
            if method not in ("GET", "HEAD"):
                return _error(405, "method not allowed: use GET")
            return HttpResponse(200, self.metrics.render(), content_type=self.metrics.content_type)
        if len(parts) < 2 or parts[0] != "" or parts[1] != "v2":
            return _error(404, f"no route for {clip(request.path)}")
        rest = parts[2:]
        if rest and rest[0] == "models" and len(rest) >= 2:
            name, tail, version = rest[1], rest[2:], None
            if len(tail) >= 2 and tail[0] == "versions":
                version, tail = tail[1], tail[2:]
            action = tail[0] if len(tail) == 1 else ("" if not tail else None)
            if action == "infer":
                if method != "POST":
                    return _error(405, "method not allowed: use POST for infer")
                return await self._infer(request, name, version)
            if method not in ("GET", "HEAD"):
                return _error(405, "method not allowed: use GET")
            if action == "":
                return _json(dp.model_metadata(name, version))
            if action == "ready":
                if dp.model_ready(name, version):
                    return _OK
                return _error(503, f"model '{name}' is {dp.state.value}")
            if action == "config":
                return _json(dp.model_config(name, version))
            return _error(404, f"no route for {clip(request.path)}")
        if method not in ("GET", "HEAD"):
            return _error(405, "method not allowed: use GET")
        if not rest:
            return _json(dp.server_metadata())
        if rest == ["health", "live"]:
            return _OK if dp.live() else _error(503, "server is not live")
        if rest == ["health", "ready"]:
            return _OK if dp.ready() else _error(503, f"server is {dp.state.value}")
        return _error(404, f"no route for {clip(request.path)}")

    async def _infer(self, request: Request, name: str, version: str | None) -> HttpResponse:
        if request.watch is not None and request.watch.over_cap:
            self.metrics.request_done("unavailable", None)
            return _error(503, "too many open connections: retry on a new connection shortly", retry_after=1)
        if request.declared is not None and request.declared > self.max_request_bytes:
            return self.payload_too_large(request.declared)

        async def read_body() -> bytes:
            return await self._read_body(request)

        out, length = await self.dataplane.infer(name, version, read_body, request.header_length, request.watch)
        if length is None:
            return HttpResponse(200, out)
        return HttpResponse(200, out, content_type=OCTET, header_length=length)

    async def _read_body(self, request: Request) -> bytes:
        """The admitted request's body, within the size limit and the memory budget, inflated if compressed."""
        self._hold(request, request.declared or 0)
        body = await self._receive_all(request)
        request.read = True
        if request.encoding:
            # Always in the decode thread: a small compressed body can inflate to the size limit.
            body = await self.dataplane.off_loop(decompress, body, request.encoding, self.max_request_bytes)
            self._hold(request, len(body))
        return body

    def _hold(self, request: Request, size: int) -> None:
        self.budget.reserve(size)
        request.held += size

    async def _receive_all(self, request: Request) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone("the client disconnected while sending its request")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_request_bytes:
                raise PayloadTooLarge(f"the request body exceeds the limit of {self.max_request_bytes} bytes")
            if total > request.held:  # chunked, or more than declared: hold what has arrived
                self._hold(request, total - request.held)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# --- the ASGI app ---------------------------------------------------------------------------------------------

# zlib window bits: gzip framing, and zlib framing (what HTTP calls deflate and tritonclient sends).
_DECODINGS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


class UnsupportedEncoding(InferenceError):
    status = 415
    outcome = "invalid"


def decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Inflate a gzip/deflate request body, refusing (413) one that would inflate past `limit` bytes."""
    name = clip(encoding.decode("latin-1"), 40)
    wbits = _DECODINGS.get(encoding.lower())
    if wbits is None:
        raise UnsupportedEncoding(f"unsupported Content-Encoding {name!r} (use gzip or deflate)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {name} request body is corrupt: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed request body exceeds the limit of {limit} bytes")
    return out


class AsgiApp:
    """The REST API as an ASGI 3 app. Under `modelfleet serve` the lifecycle is `serve()`'s; under another
    ASGI server (`create_app`), lifespan startup loads the model and lifespan shutdown drains it."""

    def __init__(self, api: RestApi, settings: ServeSettings) -> None:
        self.api = api
        self.settings = settings
        self._start: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            response = await self.api.handle(build_request(scope, receive))
            if response is not None:
                await self._send(send, response)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _send(self, send: Any, response: HttpResponse) -> None:
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", b"%d" % len(response.body)),  # not chunked: one frame, one write fewer
        ]
        if response.header_length is not None:
            headers.append((b"inference-header-content-length", str(response.header_length).encode()))
        if response.retry_after is not None:
            headers.append((b"retry-after", str(response.retry_after).encode()))
        # While draining every response closes its connection, so clients reconnect to another replica and
        # the server can stop without cutting a keep-alive connection in the middle of a request.
        if response.close or self.api.dataplane.state is State.DRAINING:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        dp = self.api.dataplane
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Load in the background: the server answers live (and not ready) while the model loads.
                self._start = asyncio.get_running_loop().create_task(dp.start())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                dp.begin_drain()
                await dp.wait_drained(self.settings.drain_grace_seconds)
                if self._start is not None and not self._start.done():
                    self._start.cancel()
                await dp.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_app(settings: ServeSettings) -> tuple[AsgiApp, DataPlane, Metrics]:
    metrics = Metrics(settings.name)
    dataplane = DataPlane(settings=settings, metrics=metrics)
    return (
        AsgiApp(
            RestApi(
                dataplane,
                metrics,
                max_request_bytes=settings.max_request_bytes,
                budget=BodyBudget(settings.max_inflight_body_bytes),
                model=(settings.name, settings.model_version),
            ),
            settings,
        ),
        dataplane,
        metrics,
    )


def create_app() -> AsgiApp:
    """ASGI factory for `uvicorn --factory` / `granian --factory`: settings from MODELFLEET_* env only."""
    settings = ServeSettings()  # model and name come from the environment
    configure_logging(settings.log_level)
    check_onnxruntime()
    return build_app(settings)[0]


# --- main -----------------------------------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def build_listener(host: str, port: int, backlog: int) -> socket.socket:
    """Bind before serving, so the real port (when 0 was asked for) is known and logged."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


# A classic BPF socket filter that drops TCP segments with SYN set and ACK clear (a new connection's first
# packet) and passes every other one: `ldb [13]` is the TCP flags byte (a TCP socket filter sees the segment
# from its TCP header on).
_DROP_SYN = (
    (0x30, 0, 0, 13),  # A = flags
    (0x54, 0, 0, 0x12),  # A &= SYN | ACK
    (0x15, 0, 1, 0x02),  # A == SYN ?
    (0x06, 0, 0, 0),  # drop
    (0x06, 0, 0, 0xFFFFFFFF),  # pass
)
_SO_ATTACH_FILTER = 26
_HANDSHAKE_SETTLE_S = 0.05  # for handshakes already under way to complete (a round trip in a cluster)


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Stop new connections reaching the listener's queue, without resetting those already in it.

    Closing a listener resets every connection in its accept queue, and every handshake under way, though
    each of those clients saw its connect() succeed and may have written a request. With new SYNs dropped,
    the handshakes under way complete, the server accepts them, and only then is the listener closed;
    a client whose SYN was dropped retries it and is refused (or reaches another replica). Linux only;
    False where the filter cannot be attached.
    """
    code = (ctypes.c_ubyte * (8 * len(_DROP_SYN)))()
    for i, (op, jt, jf, k) in enumerate(_DROP_SYN):
        struct.pack_into("HBBI", code, 8 * i, op, jt, jf, k)
    program = struct.pack("@HP", len(_DROP_SYN), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True


def accept_queue_length(sock: socket.socket) -> int:
    """Connections in a listener's accept queue (Linux reports it as tcpi_unacked of a listening socket)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return 0
    return int(struct.unpack_from("I", info, 24)[0])


async def empty_listener(sock: socket.socket, limit_s: float = 2.0) -> None:
    """Refuse new handshakes, then let the loop accept what is queued, before the listener is closed."""
    if not refuse_new_handshakes(sock):
        return
    loop = asyncio.get_running_loop()
    await asyncio.sleep(_HANDSHAKE_SETTLE_S)
    deadline = loop.time() + limit_s
    while accept_queue_length(sock) and loop.time() < deadline:  # noqa: ASYNC110 (a kernel queue: no event)
        await asyncio.sleep(0.001)


def _uvicorn_server(config: Any, on_signal: Callable[[], object]) -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that the first SIGTERM/SIGINT starts our drain instead of stopping at once.

        `serve()` sets `should_exit` once accepted work is done; a second signal stops at once, as uvicorn
        does. Signals are not re-raised after shutdown (uvicorn's default), so a drained server exits 0.
        """

        signalled = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.signalled:
                self.should_exit = self.force_exit = True
                return
            self.signalled = True
            on_signal()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Accept every connection whose client already saw connect() succeed before uvicorn closes the
            # listener; each connection's shutdown() (connection.py) then loses no request written to it.
            for sock in sockets or []:
                await empty_listener(sock)
            await super().shutdown(sockets)

    return DrainingServer(config)


# File descriptors kept free of client connections: the listener, logs, the model's files, ORT's threads.
_RESERVED_FDS = 64


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the default soft 1024 is far below what a server
    needs, and running out makes accept() fail silently); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build_limits(settings: ServeSettings, open_files: int) -> ConnectionLimits:
    return ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_seconds,
        body_timeout_s=settings.body_timeout_seconds,
        idle_timeout_s=settings.idle_timeout_seconds,
        max_connections=max(1, min(settings.max_connections, open_files - _RESERVED_FDS)),
        max_header_count=settings.max_header_count,
        min_body_rate=settings.min_body_bytes_per_second,
        body_rate_grace_s=settings.body_rate_grace_seconds,
    )


def build_config(app: AsgiApp, settings: ServeSettings, limits: ConnectionLimits) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        loop="none",
        http=build_protocol(limits, app.api.early_refusal),
        ws="none",  # no upgrades: a request asking for one (h2c, websocket) is served as HTTP/1.1
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level=settings.log_level,
        server_header=False,
        # Set again once draining is over, to what is left of the grace period.
        timeout_graceful_shutdown=math.ceil(settings.drain_grace_seconds),
    )


async def serve(settings: ServeSettings) -> int:
    """Listen, load the model, serve until SIGTERM/SIGINT, drain, exit. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    app, dataplane, metrics = build_app(settings)
    try:
        sock = build_listener(settings.host, settings.http_port, settings.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.http_port, exc.strerror or exc)
        return 1
    port = sock.getsockname()[1]
    limits = build_limits(settings, raise_open_files_limit())
    log.info(
        "listening on http://%s:%d (model %s loading from %s); connection cap %d (open-file limit %d)",
        settings.host,
        port,
        settings.name,
        settings.model,
        limits.max_connections,
        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )
    grpc_server = None
    if settings.grpc_port:
        from modelfleet_runtime.grpc_server import start_grpc

        try:
            grpc_server = await start_grpc(dataplane, settings, app.api.budget, limits.max_connections)
        except OSError as exc:
            log.error("%s", exc)
            sock.close()
            return 1
    config = build_config(app, settings, limits)
    stop = asyncio.Event()
    server = _uvicorn_server(config, lambda: loop.call_soon_threadsafe(stop.set))
    serving = loop.create_task(server.serve(sockets=[sock]), name="http")
    starting = loop.create_task(dataplane.start(), name="model-load")
    stopping = loop.create_task(stop.wait(), name="signal")
    await asyncio.wait({starting, stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if serving.done():
        log.error("the HTTP server stopped unexpectedly: %s", serving.exception())
        code = 1
    elif starting.done() and starting.exception() is not None:
        log.error("model %s failed to load: %s", settings.name, dataplane.failure)
        code = 1
    elif not starting.done():
        dataplane.begin_drain()  # stops warm-up between runs
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
    if code == 0:
        await stopping

    began = time.monotonic()
    dataplane.begin_drain()
    log.info("draining: readiness false, new requests get 503; %d in flight", dataplane.inflight)
    drained = await dataplane.wait_drained(settings.drain_grace_seconds)
    if not drained:
        log.error(
            "drain grace of %.1fs passed with %d requests in flight", settings.drain_grace_seconds, dataplane.inflight
        )
        code = code or 1
    linger = settings.drain_delay_seconds - (time.monotonic() - began)
    if linger > 0:
        await asyncio.sleep(linger)
    # uvicorn now closes the listener and idle connections, lets busy ones finish their response, and returns.
    config.timeout_graceful_shutdown = max(1.0, settings.drain_grace_seconds - (time.monotonic() - began))
    server.should_exit = True
    if grpc_server is not None:  # in-flight RPCs are done (drained); idle channels are closed now
        await grpc_server.stop(grace=1.0)
    with contextlib.suppress(Exception):
        await serving
    stopping.cancel()
    await dataplane.close()
    counts = " ".join(f"{o}={metrics.counts[o]}" for o in OUTCOMES)
    log.info("stopped after draining %.2fs: inflight=%d %s", time.monotonic() - began, dataplane.inflight, counts)
    if dataplane.loading_now:
        # A model load or warm-up run cannot be interrupted; interpreter exit would wait for its thread.
        log.warning("exiting without waiting for the model load or warm-up run still in progress")
        logging.shutdown()
        os._exit(code)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfleet serve",
        description="Serve one model over the Open Inference Protocol v2 (REST) with dynamic batching. "
        "Settings not given here come from MODELFLEET_* environment variables.",
    )
    parser.add_argument("--model", help="an .onnx file, or an engine-store directory written by modelfleet build")
    parser.add_argument("--name", help="the model name clients use in /v2/models/{name}")
    parser.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 8081; 0 = no gRPC)")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {
        key: value
        for key, value in {
            "model": args.model,
            "name": args.name,
            "http_port": args.http_port,
            "grpc_port": args.grpc_port,
            "host": args.host,
        }.items()
        if value is not None
    }
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as exc:
        print(f"modelfleet serve: invalid settings\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        check_onnxruntime()
    except ConflictingDistributions as exc:
        log.error("refusing to serve: %s", exc)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency on Linux
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
