"""Measure candidate HTTP stacks for the runtime: hello-world and the real infer endpoint, same load.

Candidates: a framework-less ASGI app on uvicorn (uvloop + httptools), the same ASGI app on granian, granian's
native RSGI interface (hello-world only: our app is ASGI), and aiohttp's low-level server (for the real app
through `AiohttpBinding` below, the candidate not adopted). Each server runs in
its own process; the closed-loop load generator runs in another, so the numbers include the 2-core contention
a real benchmark has. Results go to bench/results/http_stacks.md (+ .json).

    python -m bench.http_stacks [--seconds 3] [--rounds 3] [--concurrency 128] [--only hello|infer]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.loadgen import HttpRequest, run_in_process

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HELLO = b'{"hello":"world"}'


# --- hello-world apps (imported by the server processes) --------------------------------------------------


async def asgi_hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": HELLO})


async def rsgi_hello(scope: Any, proto: Any) -> None:
    proto.response_bytes(200, [("content-type", "application/json")], HELLO)


def aiohttp_main(port: int) -> None:
    import asyncio

    import uvloop
    from aiohttp import web

    async def hello(_: web.Request) -> web.Response:
        return web.Response(body=HELLO, content_type="application/json")

    app = web.Application()
    app.router.add_get("/", hello)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class AiohttpBinding:
    """The runtime's RestApi on aiohttp's low-level server: the candidate `modelfleet serve` did not adopt."""

    def __init__(self, api: Any) -> None:
        self.api = api

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        response = self.api.too_large(request.content_length)
        if response is None:
            body = b""
            if request.body_exists:
                if request.headers.get("Expect", "").lower() == "100-continue":
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                chunks: list[bytes] = []
                total = 0
                while chunk := await request.content.readany():
                    total += len(chunk)
                    if total > self.api.max_request_bytes:
                        response = self.api.payload_too_large()
                        break
                    chunks.append(chunk)
                body = b"".join(chunks)
            if response is None:
                response = await self.api.handle(
                    request.method, request.raw_path, body, request.headers.get("Inference-Header-Content-Length")
                )
        headers = {"Content-Type": response.content_type}
        if response.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(response.header_length)
        out = web.Response(status=response.status, body=response.body, headers=headers)
        if response.close:
            out.force_close()
        return out


def aiohttp_infer_main(port: int) -> None:
    """Serve the real app (settings from MODELFLEET_* env) on aiohttp's low-level server, until killed."""
    import asyncio

    import uvloop
    from aiohttp import web

    from modelfleet_runtime.server import build_app
    from modelfleet_runtime.settings import ServeSettings

    async def run() -> None:
        app, dataplane, _ = build_app(ServeSettings())
        http = web.Server(AiohttpBinding(app.api).handle, handler_cancellation=False, access_log=None)
        await asyncio.get_running_loop().create_server(http, "127.0.0.1", port, backlog=2048)
        await dataplane.start()
        await asyncio.Event().wait()

    uvloop.run(run())


# --- harness -----------------------------------------------------------------------------------------------


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (threads included)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never answered 200")


def server_command(stack: str, port: int, app: str) -> list[str]:
    py = sys.executable
    granian = str(Path(py).with_name("granian"))
    common_granian = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--loop",
        "uvloop",
        "--http",
        "1",
        "--no-ws",
        "--log-level",
        "warning",
    ]
    if app == "hello":
        return {
            "uvicorn": [
                py,
                "-m",
                "uvicorn",
                "bench.http_stacks:asgi_hello",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--lifespan",
                "off",
            ],
            "granian-asgi": [granian, "--interface", "asgi", *common_granian, "bench.http_stacks:asgi_hello"],
            "granian-rsgi": [granian, "--interface", "rsgi", *common_granian, "bench.http_stacks:rsgi_hello"],
            "aiohttp": [py, "-c", f"from bench.http_stacks import aiohttp_main; aiohttp_main({port})"],
        }[stack]
    # The real runtime: `modelfleet serve` (the ASGI app on uvicorn), the same app under granian, and the
    # same RestApi on aiohttp's low-level server.
    return {
        "aiohttp": [py, "-c", f"from bench.http_stacks import aiohttp_infer_main; aiohttp_infer_main({port})"],
        "modelfleet-serve (uvicorn)": [
            py,
            "-m",
            "modelfleet_runtime.cli",
            "serve",
            "--http-port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        "uvicorn": [
            py,
            "-m",
            "uvicorn",
            "--factory",
            "modelfleet_runtime.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        "granian-asgi": [
            granian,
            "--interface",
            "asgi",
            "--factory",
            *common_granian,
            "modelfleet_runtime.server:create_app",
        ],
    }[stack]


def measure(
    stack: str,
    app: str,
    *,
    seconds: float,
    concurrency: int,
    env: dict[str, str],
    requests: list[HttpRequest],
    probe: str,
) -> dict[str, Any]:
    port = free_port()
    # A session of its own, so every process and thread of the server (granian has a supervisor and a
    # worker) is found by its process group when adding up CPU time.
    proc = subprocess.Popen(server_command(stack, port, app), cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}{probe}")
        # A short warm-up, then the measured run.
        run_in_process(
            "closed", host="127.0.0.1", port=port, requests=requests, concurrency=concurrency, duration_s=1.0
        )
        cpu0 = group_cpu_seconds(proc.pid)
        result = run_in_process(
            "closed",
            host="127.0.0.1",
            port=port,
            requests=requests,
            concurrency=concurrency,
            duration_s=seconds,
        )
        cpu = group_cpu_seconds(proc.pid) - cpu0
        summary = result.summary()
        # CPU per request is far less sensitive than throughput to what else runs on a shared machine.
        summary["server_cpu_us_per_request"] = round(cpu / max(result.ok, 1) * 1e6, 1)
        summary["server_cpu_pct"] = round(100 * cpu / result.elapsed_s, 1)
        summary["stack"] = stack
        summary["app"] = app
        return summary
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def infer_setup(tmp: Path) -> tuple[dict[str, str], list[HttpRequest]]:
    sys.path.insert(0, str(ROOT))
    from bench.bench_runtime import tiny_model, tiny_requests

    model = tiny_model(tmp / "tiny.onnx")
    env = dict(os.environ)
    env.update(
        {
            "MODELFLEET_MODEL": str(model),
            "MODELFLEET_NAME": "tiny",
            "MODELFLEET_MAX_BATCH_SIZE": "128",
            "MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS": "500",
            "MODELFLEET_INTRA_OP_THREADS": "1",
            "MODELFLEET_LOG_LEVEL": "warning",
        }
    )
    return env, tiny_requests("tiny", binary=True)


HELLO_STACKS = ("uvicorn", "granian-asgi", "granian-rsgi", "aiohttp")
INFER_STACKS = ("aiohttp", "modelfleet-serve (uvicorn)", "granian-asgi")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="stacks alternate; the median round is reported")
    parser.add_argument("--only", choices=["hello", "infer"], default=None)
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        plans: list[tuple[str, tuple[str, ...], dict[str, str], list[HttpRequest], str]] = []
        if args.only in (None, "hello"):
            plans.append(("hello", HELLO_STACKS, dict(os.environ), [HttpRequest("GET", "/")], "/"))
        if args.only in (None, "infer"):
            env, reqs = infer_setup(Path(tmpdir))
            plans.append(("infer", INFER_STACKS, env, reqs, "/v2/health/ready"))
        # Rounds alternate the stacks, so a noisy neighbour on this shared machine hits them all alike.
        for round_ in range(args.rounds):
            for app, stacks, env, reqs, probe in plans:
                for stack in stacks:
                    run = measure(
                        stack,
                        app,
                        seconds=args.seconds,
                        concurrency=args.concurrency,
                        env=env,
                        requests=reqs,
                        probe=probe,
                    )
                    run["round"] = round_
                    runs.append(run)
                    print(json.dumps(run), flush=True)
    rows = []
    for app, stacks, *_ in plans:
        for stack in stacks:
            mine = [r for r in runs if r["app"] == app and r["stack"] == stack]
            rows.append(
                {
                    "app": app,
                    "stack": stack,
                    "median_rps": statistics.median(r["throughput_rps"] for r in mine),
                    "all_rps": [r["throughput_rps"] for r in mine],
                    "median_p99_ms": statistics.median(r["p99_ms"] for r in mine),
                    "median_cpu_us": statistics.median(r["server_cpu_us_per_request"] for r in mine),
                    "median_cpu_pct": statistics.median(r["server_cpu_pct"] for r in mine),
                }
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_stacks.json").write_text(json.dumps({"summary": rows, "runs": runs}, indent=2) + "\n")
    lines = [
        "# HTTP stack comparison",
        "",
        f"Closed loop, {args.concurrency} keep-alive connections, {args.seconds:g} s per run, {args.rounds} rounds "
        "alternating the stacks (median shown, every round listed); load generator in its own process on the "
        "same 2 cores. `hello` = a minimal JSON response; `infer` = the real runtime serving the tiny model "
        "with binary tensors: `modelfleet serve` (its ASGI app on uvicorn), the same app under granian, and the "
        "same RestApi on aiohttp's low-level server.",
        "",
        "| app | stack | requests/s (median) | rounds | p99 ms (median) | server CPU per request (median) "
        "| server CPU (median) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        rounds = ", ".join(f"{x:,.0f}" for x in r["all_rps"])
        lines.append(
            f"| {r['app']} | {r['stack']} | {r['median_rps']:,.0f} | {rounds} | {r['median_p99_ms']:.1f} "
            f"| {r['median_cpu_us']:.0f} us | {r['median_cpu_pct']:.0f}% |"
        )
    (RESULTS / "http_stacks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
