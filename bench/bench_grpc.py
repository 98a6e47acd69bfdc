"""Server CPU per inference, OIP gRPC against REST with binary tensors, on the tiny classifier, in one run.

One `modelfleet serve` process serves both protocols (the same DataPlane and batcher); tritonclient's asyncio
clients (tritonclient.grpc.aio and tritonclient.http.aio, binary tensors) send batch-1 requests from
`--concurrency` coroutines in this process, in alternating rounds of REST and gRPC so drift hits both. The
server's CPU (utime + stime from /proc) over a round divided by the inferences it answered is the figure;
ratios are gRPC / REST within this run. The client shares the machine's cores: throughput is the client's
as much as the server's, CPU per inference is the server's alone. Results: bench/results/grpc.md.

    python -m bench.bench_grpc [--requests 3000] [--rounds 3] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient

from bench.http_stacks import free_port
from tests.modelzoo import FEATURES, classifier_model
from tests.runtime.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
Call = Callable[[], Awaitable[object]]
Round = tuple[float, float, float]  # server CPU us / inference, inferences / s, mean batch size


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rest_call(url: str, x: np.ndarray) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = httpclient.InferenceServerClient(url=url)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    return (lambda: client.infer("classifier", [inp], outputs=out)), client.close


async def grpc_call(url: str, x: np.ndarray) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = grpcclient.InferenceServerClient(url=url)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return (lambda: client.infer("classifier", [inp])), client.close


def batches(server: ServerProcess) -> tuple[float, float]:
    """(items, batches) computed so far, from the server's modelfleet_batch_size histogram."""
    samples = server.metrics()
    model = frozenset({("model", server.name)})
    return samples[("modelfleet_batch_size_sum", model)], samples[("modelfleet_batch_size_count", model)]


async def run_round(call: Call, requests: int, concurrency: int, server: ServerProcess) -> Round:
    """Server CPU microseconds per inference, inferences per second, mean batch over `requests` calls."""
    pid = server.proc.pid
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    for _ in range(50):  # warm the connection(s) and the server's paths
        await call()
    items, count = batches(server)
    cpu, began = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, used = time.perf_counter() - began, cpu_seconds(pid) - cpu
    items_after, count_after = batches(server)
    return used / requests * 1e6, requests / wall, (items_after - items) / max(1.0, count_after - count)


async def measure(server: ServerProcess, grpc_url: str, args: argparse.Namespace) -> dict[str, list[Round]]:
    x = np.random.default_rng(0).standard_normal((1, FEATURES)).astype(np.float32)
    makers = {"REST+binary": rest_call(server.host, x), "gRPC": grpc_call(grpc_url, x)}
    calls = {name: await maker for name, maker in makers.items()}
    results: dict[str, list[Round]] = {name: [] for name in calls}
    for r in range(args.rounds):
        for name, (call, _) in calls.items():
            cpu_us, rate, batch = await run_round(call, args.requests, args.concurrency, server)
            results[name].append((cpu_us, rate, batch))
            print(f"round {r + 1} {name:12s} {cpu_us:5.0f} us CPU/inference {rate:6.0f} inf/s batch {batch:.1f}")
    for _, close in calls.values():
        await close()
    return results


def table(results: dict[str, list[Round]], args: argparse.Namespace) -> str:
    cpu = {n: statistics.median(c for c, _, _ in rs) for n, rs in results.items()}
    rate = {n: statistics.median(r for _, r, _ in rs) for n, rs in results.items()}
    batch = {n: statistics.median(b for _, _, b in rs) for n, rs in results.items()}
    base = "REST+binary"
    lines = [
        f"Tiny classifier ({FEATURES} -> 10), batch-1 requests, {args.concurrency} concurrent, {args.requests} per "
        f"round, median of {args.rounds} alternating rounds; server CPU per inference from /proc; {os.cpu_count()} "
        "cores shared with the client.",
        "",
        "| protocol | server CPU / inference (us) | vs REST | throughput (inf/s) | vs REST | mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in results:
        cpu_ratio, rate_ratio, mean = cpu[name] / cpu[base], rate[name] / rate[base], batch[name]
        lines.append(
            f"| {name} | {cpu[name]:.0f} | {cpu_ratio:.2f}x | {rate[name]:.0f} | {rate_ratio:.2f}x | {mean:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = classifier_model(Path(tmp) / "classifier.onnx")
        port = free_port()
        env = {"MODELFLEET_GRPC_PORT": str(port), "MODELFLEET_MAX_BATCH_SIZE": "16", "MODELFLEET_LOG_LEVEL": "info"}
        server = ServerProcess(model, "classifier", Path(tmp) / "server.log", env)
        try:
            server.wait_ready()
            results = asyncio.run(measure(server, f"127.0.0.1:{port}", args))
        finally:
            server.kill()
    report = table(results, args)
    print(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpc.md").write_text("# OIP gRPC vs REST+binary (`python -m bench.bench_grpc`)\n\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
