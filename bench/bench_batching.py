"""Adaptive batching against every fixed queue delay, across a load sweep and a bursty trace, in one run.

For each model the server's capacity is measured first (closed loop, default fixed delay); then each
configuration (fixed maxQueueDelayMicroseconds of 0, 500, 1000 (the old default), 2000, 5000 and 10000 us,
and adaptive batching with a p99 target) serves the same open-loop Poisson traces: 10 %..100 % of capacity
and a bursty trace (2 s at 30 %, 1 s at 130 %, repeated: 63 % on average). Every configuration has the same
maxBatchSize, instances and ONNX Runtime threads; batch-1 requests with binary tensors; the load generator
runs in its own process. For every trace the best fixed delay is chosen in hindsight (the lowest p99 among
those within 1 % of the highest throughput) and adaptive is compared with it and with the old default:
adaptive "matches" when its p99 is within 10 % of the best's (or within 1 ms, the event loop's timer
resolution) and its throughput within 5 %. Results: bench/results/batching.md, batching.json, and
batching_<model>.png.

    python -m bench.bench_batching [--quick] [--only tiny|minilm] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.bench_runtime import (
    Case,
    Server,
    binary_request,
    measure,
    minilm_inputs,
    tiny_inputs,
    tiny_model,
)
from bench.loadgen import HttpRequest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIXED_DELAYS_US = (0, 500, 1000, 2000, 5000, 10000)
DEFAULT_US = 1000
LOADS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
BURSTY = ((2.0, 0.3), (1.0, 1.3))  # (seconds, share of capacity), repeated
TARGET_MS = 100
MIN_REQUESTS = 1000  # per trace, so a light load's p99 rests on 10 tail samples, not 4


def requests_for(case: Case) -> list[HttpRequest]:
    return [binary_request(case.name, case.make_inputs(1, seed)) for seed in range(16)]


def configs() -> list[tuple[str, int, dict[str, str]]]:
    fixed: list[tuple[str, int, dict[str, str]]] = [(f"fixed {d} us", d, {}) for d in FIXED_DELAYS_US]
    adaptive = {
        "MODELFLEET_BATCHING_ADAPTIVE": "true",
        "MODELFLEET_BATCHING_P99_TARGET_MICROSECONDS": str(TARGET_MS * 1000),
    }
    return [*fixed, ("adaptive", 0, adaptive)]


def traces(capacity: float) -> list[tuple[str, float, list[tuple[float, float]]]]:
    """(name, mean rate, schedule) of every trace, from the measured capacity."""
    out = [(f"{load:.0%}", load * capacity, [(1.0, load * capacity)]) for load in LOADS]
    mean = sum(s * share for s, share in BURSTY) / sum(s for s, _ in BURSTY)
    out.append(("bursty", mean * capacity, [(s, share * capacity) for s, share in BURSTY]))
    return out


def start_servers(case: Case, tmp: Path) -> dict[str, Server]:
    """One server per configuration, all up at once, so every trace is measured on all of them back to back."""
    servers: dict[str, Server] = {}
    try:
        for label, delay_us, env in configs():
            configured = Case(**{**case.__dict__, "delay_us": delay_us, "env": {**case.env, **env}})
            log = tmp / f"{case.name}-{label.replace(' ', '-')}.log"
            servers[label] = Server(configured, max_batch=case.max_batch, log_path=log)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def capacity_of(server: Server, case: Case, seconds: float) -> float:
    requests = requests_for(case)
    measure(server, "closed", requests=requests, concurrency=case.concurrency, duration_s=2.0)  # warm
    result = measure(server, "closed", requests=requests, concurrency=case.concurrency, duration_s=seconds)
    return float(result["throughput_rps"])


def run_round(case: Case, servers: dict[str, Server], plan: list[Any], seconds: float, turn: int) -> dict[str, Any]:
    """Every trace on every configuration, the configurations' order rotated by `turn` so drift hits all alike."""
    requests = requests_for(case)
    labels = list(servers)
    labels = labels[turn % len(labels) :] + labels[: turn % len(labels)]
    out: dict[str, Any] = {label: {} for label in servers}
    for name, rate, schedule in plan:
        for label in labels:
            r = measure(
                servers[label],
                "open",
                requests=requests,
                rate=rate,
                duration_s=max(seconds, MIN_REQUESTS / rate),
                schedule=schedule,
                connections=256,
            )
            out[label][name] = r
            print(
                f"  {case.name} {name:>6} {label:>14}: {r['throughput_rps']:>9.1f}/s p99 {r['p99_ms']:>8.2f} ms"
                f" batch {r['mean_batch']:>5.2f} cpu {r['server_cpu_us_per_inf']:>7.1f} us/inf",
                flush=True,
            )
    return out


def median_runs(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration and trace, the median of each figure over the rounds."""
    first = rounds[0]
    return {
        label: {
            trace: {
                key: statistics.median(r[label][trace][key] for r in rounds)
                for key in ("throughput_rps", "p99_ms", "p50_ms", "mean_batch", "server_cpu_us_per_inf")
            }
            for trace in first[label]
        }
        for label in first
    }


def best_fixed(results: dict[str, Any], trace: str) -> str:
    fixed = [label for label in results if label.startswith("fixed")]
    top = max(results[label][trace]["throughput_rps"] for label in fixed)
    near = [label for label in fixed if results[label][trace]["throughput_rps"] >= 0.99 * top]
    return min(near, key=lambda label: results[label][trace]["p99_ms"])


def matches(ours: dict[str, float], theirs: dict[str, float]) -> bool:
    p99_ok = ours["p99_ms"] <= max(1.1 * theirs["p99_ms"], theirs["p99_ms"] + 1.0)
    return p99_ok and ours["throughput_rps"] >= 0.95 * theirs["throughput_rps"]


def table(model: str, results: dict[str, Any], plan: list[Any]) -> list[str]:
    lines = [
        f"| {model}: trace | offered (/s) | best fixed delay | its p99 (ms) / inf/s | default 1000 us p99 / inf/s |"
        " adaptive p99 / inf/s | adaptive vs best | adaptive vs default |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    default = f"fixed {DEFAULT_US} us"
    for name, rate, _ in plan:
        best = best_fixed(results, name)
        b, d, a = results[best][name], results[default][name], results["adaptive"][name]
        vs_best = "matches" if matches(a, b) else "misses"
        vs_default = (
            "beats"
            if a["p99_ms"] < d["p99_ms"] and a["throughput_rps"] >= 0.99 * d["throughput_rps"]
            else ("matches" if matches(a, d) else "misses")
        )
        lines.append(
            f"| {name} | {rate:,.0f} | {best.removeprefix('fixed ')} | {b['p99_ms']:.1f} / {b['throughput_rps']:,.0f} |"
            f" {d['p99_ms']:.1f} / {d['throughput_rps']:,.0f} | {a['p99_ms']:.1f} / {a['throughput_rps']:,.0f} |"
            f" {vs_best} (p99 {a['p99_ms'] / b['p99_ms']:.2f}x,"
            f" inf/s {a['throughput_rps'] / b['throughput_rps']:.2f}x) |"
            f" {vs_default} (p99 {a['p99_ms'] / d['p99_ms']:.2f}x) |"
        )
    return lines


def plot(model: str, results: dict[str, Any], plan: list[Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _, _ in plan]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, per_trace in results.items():
        style = {"linewidth": 2.5, "color": "black"} if label == "adaptive" else {"linewidth": 1, "alpha": 0.8}
        ax.plot(names, [per_trace[n]["p99_ms"] for n in names], marker="o", label=label, **style)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (share of capacity), and the bursty trace")
    ax.set_ylabel("p99 latency (ms, log scale)")
    ax.set_title(f"{model}: p99 by queue delay, fixed and adaptive (target {TARGET_MS} ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"batching_{model}.png", dpi=110)
    plt.close(fig)


def cases(tmp: Path) -> dict[str, Case]:
    from bench.minilm import ensure_minilm_onnx

    return {
        "tiny": Case("tiny", tiny_model(tmp / "tiny.onnx"), tiny_inputs, 128, DEFAULT_US, 128, 1, 1, []),
        "minilm": Case("minilm", ensure_minilm_onnx(), minilm_inputs, 32, DEFAULT_US, 96, 1, 2, []),
    }


def run_model(case: Case, *, rounds: int, seconds: float, tmp: Path) -> dict[str, Any]:
    servers = start_servers(case, tmp)
    try:
        capacity = capacity_of(servers[f"fixed {DEFAULT_US} us"], case, seconds)
        print(f"{case.name}: capacity {capacity:,.0f}/s", flush=True)
        plan = traces(capacity)
        for server in servers.values():  # warm every server (and let adaptive batching measure)
            measure(server, "open", requests=requests_for(case), rate=0.5 * capacity, duration_s=2.0)
        per_round = [run_round(case, servers, plan, seconds, turn) for turn in range(rounds)]
    finally:
        for server in servers.values():
            server.stop()
    return {"capacity": capacity, "plan": plan, "results": median_runs(per_round)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short traces, for development")
    parser.add_argument("--only", choices=["tiny", "minilm"], default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 12.0)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name, case in cases(tmp).items():
            if args.only in (None, name):
                out[name] = run_model(case, rounds=args.rounds, seconds=seconds, tmp=tmp)
    write(out, seconds=seconds, rounds=args.rounds)
    return 0


def write(out: dict[str, Any], *, seconds: float, rounds: int) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Adaptive batching against fixed queue delays",
        "",
        f"Generated by `make bench-batching` on {stamp}: 2 cores (load average {os.getloadavg()[2]:.1f} over the"
        f" last 15 minutes: other work shares them), open-loop Poisson traces of {seconds:.0f} s"
        f" (or {MIN_REQUESTS} requests if longer),"
        f" median of {rounds} round(s); {__doc__.split(chr(10), 2)[2].split('Results:')[0].strip()}",
        "",
    ]
    for model, data in out.items():
        lines += [f"## {model} (capacity {data['capacity']:,.0f} inf/s, p99 target {TARGET_MS} ms)", ""]
        lines += table(model, data["results"], data["plan"])
        lines += ["", f"![p99 by configuration](batching_{model}.png)", ""]
        plot(model, data["results"], data["plan"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "batching.json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
