"""A counting reverse proxy in front of the kube-apiserver: every request one client makes, seen from outside.

The operator talks plain HTTP to 127.0.0.1:<port>; the proxy forwards each request over TLS with the
client certificate of a kubeconfig (so the operator needs no credentials of its own) and streams the
response back unbuffered, so watches work as they do against the apiserver. Each request is recorded
(monotonic start time, method, path, query, status, content type, and the first bytes of a write's
body) and served as JSON at GET /_proxy/log?since=N. CLOCK_MONOTONIC is system-wide, so the times
compare with time.monotonic() in the process that reads the log. `classify`, `Request` and `summarize`
turn the log into counts per verb and resource, named as the apiserver's apiserver_request_total names them.

Run: python -m bench.operator_proxy --kubeconfig <admin kubeconfig> [--port 0]
It prints one JSON line {"port": N} once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import json
import signal
import socket
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WRITE_VERBS = frozenset({"CREATE", "UPDATE", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"})
# Hop-by-hop headers (RFC 9110 §7.6.1) and those aiohttp sets itself for the forwarded message.
_SKIP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"host", "content-length"}
)
BODY_EXCERPT = 1500


# --- reading the log (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestKind:
    """A request in the apiserver's own terms (the labels of apiserver_request_total)."""

    verb: str  # GET LIST WATCH CREATE UPDATE PATCH APPLY DELETE DELETECOLLECTION, or OTHER
    resource: str  # e.g. "jobs", "inferencemodels"; the path itself for discovery (/api, /apis/batch/v1, /version)
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def write(self) -> bool:
        return self.verb in WRITE_VERBS

    @property
    def discovery(self) -> bool:
        """A non-resource request (discovery, /version, /openapi): apiserver_request_total does not count it."""
        return self.resource.startswith("/")

    @property
    def what(self) -> str:
        """`resource` or `resource/subresource`."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def classify(method: str, path: str, query: str = "", content_type: str = "") -> RequestKind:
    """Name a Kubernetes API request the way the apiserver's request metrics do."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        rest = parts[3:]
    else:
        rest = []
    if not rest:
        return RequestKind(verb=method.upper() if method.upper() == "GET" else "OTHER", resource="/" + "/".join(parts))
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 else ""
    if rest[0] == "namespaces" and len(rest) == 2:  # the namespace object itself: /api/v1/namespaces/<name>
        namespace = name
    m = method.upper()
    watch = parse_qs(query).get("watch", [""])[0].lower() in {"true", "1"}
    if m == "GET":
        verb = "WATCH" if watch else ("GET" if name else "LIST")
    elif m == "POST":
        verb = "CREATE"
    elif m == "PUT":
        verb = "UPDATE"
    elif m == "PATCH":
        media_type = content_type.partition(";")[0].strip()
        verb = "APPLY" if media_type == "application/apply-patch+yaml" else "PATCH"
    elif m == "DELETE":
        verb = "DELETE" if name else "DELETECOLLECTION"
    else:
        verb = "OTHER"
    return RequestKind(verb=verb, resource=resource, subresource=subresource, namespace=namespace, name=name)


@dataclass
class Request:
    """One entry of the proxy's log, classified."""

    t: float
    kind: RequestKind
    status: int
    path: str
    body: str = ""
    resource_version: str | None = None

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Request:
        kind = classify(entry["method"], entry["path"], entry.get("query", ""), entry.get("contentType", ""))
        return cls(
            t=entry["t"],
            kind=kind,
            status=int(entry["status"]),
            path=entry["path"],
            body=entry.get("body", ""),
            resource_version=entry.get("resourceVersion"),
        )


@dataclass
class PhaseSummary:
    """Requests of one phase, by verb and resource."""

    seconds: float
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    failed: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    @property
    def writes(self) -> int:
        return sum(n for (verb, _), n in self.by_kind.items() if verb in WRITE_VERBS)

    @property
    def discovery(self) -> int:
        return sum(n for (_, what), n in self.by_kind.items() if what.startswith("/"))

    @property
    def watches(self) -> int:
        return sum(n for (verb, _), n in self.by_kind.items() if verb == "WATCH")

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "total": self.total,
            "writes": self.writes,
            "reads": self.total - self.writes,
            "watches": self.watches,
            "discovery": self.discovery,
            "byKind": [{"verb": v, "resource": r, "count": n} for (v, r), n in sorted(self.by_kind.items())],
            "failed": [
                {"verb": v, "resource": r, "status": s, "count": n} for (v, r, s), n in sorted(self.failed.items())
            ],
        }


def summarize(requests: Iterable[Request], start: float, end: float) -> PhaseSummary:
    """Requests that started in [start, end)."""
    summary = PhaseSummary(seconds=end - start)
    for r in requests:
        if start <= r.t < end:
            summary.by_kind[(r.kind.verb, r.kind.what)] += 1
            if r.status >= 400:
                summary.failed[(r.kind.verb, r.kind.what, r.status)] += 1
    return summary


def unchanged_writes(requests: Iterable[Request]) -> set[int]:
    """Positions (in `requests`, time order) of writes that left their object's resourceVersion as the previous
    write to that object left it: the apiserver found nothing to change. A lower bound: when another client
    changed the object in between, a no-op write is not caught."""
    last: dict[tuple[str, str, str], str] = {}
    unchanged: set[int] = set()
    for i, r in enumerate(requests):
        if not (r.kind.write and r.kind.name and r.resource_version and r.status < 300):
            continue
        key = (r.kind.namespace, r.kind.resource, r.kind.name)
        if last.get(key) == r.resource_version:
            unchanged.add(i)
        last[key] = r.resource_version
    return unchanged


def timeline(times: Iterable[float], start: float, end: float, bucket: float) -> list[int]:
    """Counts per `bucket` seconds over [start, end)."""
    counts = [0] * max(1, int((end - start) // bucket + (1 if (end - start) % bucket else 0)))
    for t in times:
        if start <= t < end:
            counts[min(len(counts) - 1, int((t - start) // bucket))] += 1
    return counts


# --- the proxy ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """Where to forward to and how to authenticate there, read from a kubeconfig."""

    server: str
    ssl: ssl.SSLContext | bool


def _material(user_or_cluster: dict[str, Any], key: str, scratch: Path) -> str | None:
    """A file path for `key` (e.g. client-certificate), writing `<key>-data` out when it is inline."""
    if user_or_cluster.get(key):
        return str(user_or_cluster[key])
    data = user_or_cluster.get(f"{key}-data")
    if not data:
        return None
    path = scratch / key
    path.write_bytes(base64.b64decode(data))
    return str(path)


def upstream_from_kubeconfig(path: Path, scratch: Path) -> Upstream:
    """The current context's server, with its CA and client certificate (the only auth the bench needs)."""
    config = yaml.safe_load(path.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
    cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]
    user = next(u for u in config["users"] if u["name"] == context["user"])["user"]
    server = str(cluster["server"]).rstrip("/")
    if not server.startswith("https://"):
        return Upstream(server=server, ssl=False)
    ctx = ssl.create_default_context(cafile=_material(cluster, "certificate-authority", scratch))
    cert, key = _material(user, "client-certificate", scratch), _material(user, "client-key", scratch)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return Upstream(server=server, ssl=ctx)


class CountingProxy:
    """Forwards every request and keeps a log entry per request."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.entries: list[dict[str, Any]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No connection limit: every watch holds one connection for minutes.
        connector = aiohttp.TCPConnector(limit=0, ssl=self.upstream.ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass through as the apiserver encoded them
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/_proxy/healthz", self._healthz)
        app.router.add_get("/_proxy/log", self._log)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "entries": len(self.entries)})

    async def _log(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        return web.json_response({"next": len(self.entries), "entries": self.entries[since:]})

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        started = time.monotonic()
        body = await request.read()
        raw = request.raw_path  # path and query exactly as the client encoded them
        path, _, query = raw.partition("?")
        content_type = request.headers.get("Content-Type", "")
        entry: dict[str, Any] = {
            "t": started,
            "method": request.method,
            "path": path,
            "query": query,
            "contentType": content_type,
        }
        if request.method in WRITE_METHODS and body:
            entry["body"] = body[:BODY_EXCERPT].decode("utf-8", errors="replace")
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS
        )
        try:
            upstream = await self._session.request(
                request.method,
                URL(self.upstream.server + raw, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                # Exactly the client's headers: no compression or agent the client did not ask for.
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except (aiohttp.ClientError, OSError) as exc:
            entry.update(status=502, seconds=time.monotonic() - started)
            self.entries.append(entry)
            return web.json_response({"error": f"upstream: {exc}"}, status=502)
        async with upstream:
            entry.update(status=upstream.status, seconds=time.monotonic() - started)
            self.entries.append(entry)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _SKIP_HEADERS:
                    response.headers.add(key, value)
            await response.prepare(request)
            kept: list[bytes] | None = [] if request.method in WRITE_METHODS else None
            # Chunk by chunk as it arrives: a watch event reaches the client when the apiserver sends it.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                if kept is not None:
                    kept.append(chunk)
            await response.write_eof()
        if kept is not None:
            entry["resourceVersion"] = resource_version(b"".join(kept), upstream.headers.get("Content-Encoding", ""))
        return response


def resource_version(body: bytes, encoding: str = "") -> str | None:
    """metadata.resourceVersion of an object in a write's response: unchanged means the write changed nothing."""
    try:
        data = gzip.decompress(body) if encoding == "gzip" else body
        value = json.loads(data).get("metadata", {}).get("resourceVersion")
    except (ValueError, OSError, AttributeError):
        return None
    return str(value) if value else None


async def serve(kubeconfig: Path, port: int, host: str = "127.0.0.1") -> None:
    """Run the proxy until SIGTERM or SIGINT; prints {"port": N} when listening."""
    with tempfile.TemporaryDirectory(prefix="operator-proxy-") as scratch:
        proxy = CountingProxy(upstream_from_kubeconfig(kubeconfig, Path(scratch)))
        await proxy.start()
        # A client that goes away cancels its handler, which closes the upstream watch with it.
        runner = web.AppRunner(proxy.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # bound here so port 0 can be reported as the port it became
        site = web.SockSite(runner, sock)
        await site.start()
        print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", type=Path, required=True, help="admin kubeconfig of the cluster")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.kubeconfig, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
