"""`modelfleet serve`: thin OIP v2 REST endpoints over the DataPlane, served by aiohttp; plus an ASGI binding.

The HTTP stack was chosen by measurement (bench/http_stacks.py, results in bench/results/http_stacks.md):
aiohttp's low-level server answered markedly more requests per second than a framework-less ASGI app on
uvicorn (uvloop + httptools) or granian, for hello-world and for the real infer endpoint. The same
`RestApi` also runs as an ASGI app (`create_app`, for uvicorn or granian), so the comparison shares one
code path.

Endpoints: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{m}[/versions/{v}], .../ready, .../config,
POST .../infer, GET /metrics. Every error body is {"error": "..."}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from modelfleet_runtime.dataplane import DataPlane, State
from modelfleet_runtime.metrics import OUTCOMES, Metrics
from modelfleet_runtime.protocol import HEADER_LENGTH, InferenceError, PayloadTooLarge, error_body
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


def _error(status: int, message: str, *, close: bool = False) -> HttpResponse:
    return HttpResponse(status, error_body(message), close=close)


def _json(doc: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(doc))


_OK = HttpResponse(200, b"{}")


class RestApi:
    """Routes (method, path, body) to the DataPlane. Never raises: every failure becomes an error response."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, *, max_request_bytes: int) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    def too_large(self, declared: int | None) -> HttpResponse | None:
        if declared is not None and declared > self.max_request_bytes:
            return self.payload_too_large(declared)
        return None

    def payload_too_large(self, size: int | None = None) -> HttpResponse:
        self.metrics.request_done("invalid", None)
        what = f"{size} bytes" if size is not None else "the request body"
        return _error(413, f"{what} exceeds the limit of {self.max_request_bytes} bytes", close=True)

    async def handle(self, method: str, path: str, body: bytes, header_length: str | None) -> HttpResponse:
        try:
            return await self._route(method, path, body, header_length)
        except InferenceError as exc:
            return _error(exc.status, exc.message)
        except Exception as exc:
            log.exception("unhandled error on %s %s", method, path)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def _route(self, method: str, path: str, body: bytes, header_length: str | None) -> HttpResponse:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if "%" in path:
            path = unquote(path)
        dp = self.dataplane
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return _error(405, "method not allowed: use GET")
            return HttpResponse(200, self.metrics.render(), content_type=self.metrics.content_type)
        parts = path.split("/")
        if len(parts) < 2 or parts[1] != "v2":
            return _error(404, f"no route for {path}")
        rest = parts[2:]
        if rest and rest[0] == "models" and len(rest) >= 2:
            name, tail, version = rest[1], rest[2:], None
            if len(tail) >= 2 and tail[0] == "versions":
                version, tail = tail[1], tail[2:]
            action = tail[0] if len(tail) == 1 else ("" if not tail else None)
            if action == "infer":
                if method != "POST":
                    return _error(405, "method not allowed: use POST for infer")
                out, length = await dp.infer(name, version, body, header_length)
                if length is None:
                    return HttpResponse(200, out)
                return HttpResponse(200, out, content_type=OCTET, header_length=length)
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
            return _error(404, f"no route for {path}")
        if method not in ("GET", "HEAD"):
            return _error(405, "method not allowed: use GET")
        if not rest:
            return _json(dp.server_metadata())
        if rest == ["health", "live"]:
            return _OK if dp.live() else _error(503, "server is not live")
        if rest == ["health", "ready"]:
            return _OK if dp.ready() else _error(503, f"server is {dp.state.value}")
        return _error(404, f"no route for {path}")


# --- aiohttp binding (the production server) ----------------------------------------------------------------


class AiohttpBinding:
    def __init__(self, api: RestApi) -> None:
        self.api = api

    async def _read(self, request: Any) -> bytes:
        """Read the body, failing as soon as it passes the limit (never buffering more than the limit)."""
        limit = self.api.max_request_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge("body too large")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        response = self.api.too_large(request.content_length)
        if response is None:
            body = b""
            if request.body_exists:
                # The low-level server has no router to answer `Expect: 100-continue` (curl sends it for
                # bodies over 1 KiB); answer it here, after the size check has had its say.
                if request.headers.get("Expect", "").lower() == "100-continue":
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    body = await self._read(request)
                except PayloadTooLarge:
                    response = self.api.payload_too_large()
                except Exception as exc:  # the client went away or sent a broken body
                    response = _error(400, f"could not read the request body: {type(exc).__name__}: {exc}", close=True)
            if response is None:
                response = await self.api.handle(
                    request.method, request.raw_path, body, request.headers.get(HEADER_LENGTH)
                )
        headers = {"Content-Type": response.content_type}
        if response.header_length is not None:
            headers[HEADER_LENGTH] = str(response.header_length)
        out = web.Response(status=response.status, body=response.body, headers=headers)
        # While draining, every response closes its connection so clients reconnect to another replica
        # and the server can stop without cutting a keep-alive connection mid-request.
        if response.close or self.api.dataplane.state is State.DRAINING:
            out.force_close()
        return out


# --- ASGI binding (uvicorn, granian) ------------------------------------------------------------------------


class AsgiApp:
    """The same API as an ASGI 3 app; lifespan startup loads the model, shutdown drains it."""

    def __init__(self, api: RestApi, settings: ServeSettings) -> None:
        self.api = api
        self.settings = settings
        self._start: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        header_length = None
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = int(value) if value.isdigit() else None
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
            elif key == b"content-encoding" and value not in (b"identity", b""):
                return await self._send(send, _error(415, "compressed request bodies need the aiohttp server"))
        response = self.api.too_large(declared)
        if response is None:
            chunks: list[bytes] = []
            total = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > self.api.max_request_bytes:
                    response = self.api.payload_too_large()
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
            if response is None:
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                response = await self.api.handle(scope["method"], scope["path"], body, header_length)
        await self._send(send, response)

    @staticmethod
    async def _send(send: Any, response: HttpResponse) -> None:
        headers = [(b"content-type", response.content_type.encode())]
        if response.header_length is not None:
            headers.append((b"inference-header-content-length", str(response.header_length).encode()))
        if response.close:
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


def create_app() -> AsgiApp:
    """ASGI factory for `uvicorn --factory` / `granian --factory`: settings from MODELFLEET_* env only."""
    settings = ServeSettings()  # model and name come from the environment
    configure_logging(settings.log_level)
    metrics = Metrics(settings.name)
    dataplane = DataPlane(settings=settings, metrics=metrics)
    return AsgiApp(RestApi(dataplane, metrics, max_request_bytes=settings.max_request_bytes), settings)


# --- main ---------------------------------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


async def serve(settings: ServeSettings) -> int:
    """Listen, load the model, serve until SIGTERM/SIGINT, drain, exit. Returns the process exit code."""
    from aiohttp import web

    loop = asyncio.get_running_loop()
    metrics = Metrics(settings.name)
    dataplane = DataPlane(settings=settings, metrics=metrics)
    api = RestApi(dataplane, metrics, max_request_bytes=settings.max_request_bytes)
    # handler_cancellation=False: a client that disconnects does not cancel a request already accepted.
    http = web.Server(AiohttpBinding(api).handle, handler_cancellation=False, access_log=None)
    listener = await loop.create_server(
        http, settings.host, settings.http_port, backlog=settings.backlog, reuse_address=True
    )
    port = listener.sockets[0].getsockname()[1]
    log.info(
        "listening on http://%s:%d (model %s loading from %s)",
        settings.host,
        port,
        settings.name,
        settings.model,
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(dataplane.start(), name="model-load")
    stopping = loop.create_task(stop.wait(), name="signal")
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is not None:
        log.error("model %s failed to load: %s", settings.name, dataplane.failure)
        code = 1
    elif not starting.done():
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
            "drain grace of %.1fs passed with %d requests in flight",
            settings.drain_grace_seconds,
            dataplane.inflight,
        )
        code = code or 1
    linger = settings.drain_delay_seconds - (time.monotonic() - began)
    if linger > 0:
        await asyncio.sleep(linger)
    listener.close()
    # Close idle keep-alive connections now (busy ones after their response), then wait for the rest.
    http.pre_shutdown()
    await asyncio.sleep(0)
    # Accepted inference work is already done (inflight 0); what can remain is a health probe or a 503,
    # or a keep-alive connection aiohttp only closes at this timeout.
    await http.shutdown(timeout=1.0)
    await dataplane.close()
    counts = " ".join(f"{o}={metrics.counts[o]}" for o in OUTCOMES)
    log.info("stopped after draining %.2fs: inflight=%d %s", time.monotonic() - began, dataplane.inflight, counts)
    if dataplane.state is State.FAILED and code == 0:
        code = 1
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
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency on Linux
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
