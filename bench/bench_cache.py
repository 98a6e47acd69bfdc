"""`python -m bench.bench_cache`: the response cache on a Zipf workload, against the same server without it.

Requests are batch-1 binary tensors drawn from a Zipf distribution (s=1.1) over 10,000 distinct inputs, the
same sequence for every server. Each model is served three ways in alternating rounds — no cache, a cache
large enough for every distinct response, and a small one (LRU evicting) — and driven closed-loop
(saturation) by bench/loadgen.py in its own process. Reported per run: the hit ratio the server counted
(modelfleet_response_cache_*), the ideal hit ratio of an unbounded cache on the prefix actually sent, the
throughput and its ratio to the no-cache server of the same round, p50/p99 and server CPU per request.
Two models: the tiny overhead-bound MLP of bench_runtime, and a wide MLP whose compute dominates.

    python -m bench.bench_cache [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.bench_runtime import RESULTS, Case, Server, binary_request, measure, tiny_model

DISTINCT = 10_000
ZIPF_S = 1.1
SEQUENCE = 200_000  # longer than any run sends, so the loop generator never wraps around
CONCURRENCY = 32
LARGE_BYTES = 64 * 1024 * 1024
SMALL_BYTES = 512 * 1024


def wide_model(path: Path, hidden: int = 2048) -> Path:
    """16 -> hidden -> hidden -> 10: compute (4M multiply-adds per row) dominates a request's cost."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.05, shape).astype(np.float32), name)
        for name, shape in (("w1", (16, hidden)), ("w2", (hidden, hidden)), ("w3", (hidden, 10)))
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def zipf_sequence(count: int, *, distinct: int = DISTINCT, s: float = ZIPF_S, seed: int = 0) -> np.ndarray:
    """`count` input indices with P(rank k) proportional to k^-s over `distinct` inputs."""
    weights = np.arange(1, distinct + 1, dtype=np.float64) ** -s
    return np.random.default_rng(seed).choice(distinct, size=count, p=weights / weights.sum())


def ideal_hit_ratio(sequence: np.ndarray, sent: int) -> float:
    """Hits an unbounded cache would give on the first `sent` requests: all but each input's first use."""
    prefix = sequence[:sent]
    return 1 - len(np.unique(prefix)) / max(len(prefix), 1)


def run(case: Case, cache_bytes: int, requests: list[Any], seconds: float, log: Path) -> dict[str, Any]:
    case.env = {"MODELFLEET_RESPONSE_CACHE_BYTES": str(cache_bytes)} if cache_bytes else {}
    server = Server(case, max_batch=case.max_batch, log_path=log)
    try:
        before = server.metrics()
        summary = measure(
            server, "closed", requests=requests, concurrency=CONCURRENCY, duration_s=seconds, max_requests=len(requests)
        )
        after = server.metrics()
    finally:
        server.stop()
    hits = after.get("modelfleet_response_cache_hits_total", 0) - before.get("modelfleet_response_cache_hits_total", 0)
    misses = after.get("modelfleet_response_cache_misses_total", 0) - before.get(
        "modelfleet_response_cache_misses_total", 0
    )
    summary["hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
    summary["cache_entries"] = after.get("modelfleet_response_cache_entries")
    summary["cache_evictions"] = after.get("modelfleet_response_cache_evictions_total")
    return summary


def bench_model(case: Case, sequence: np.ndarray, *, rounds: int, seconds: float, tmp: Path) -> dict[str, Any]:
    inputs = [binary_request(case.name, {"input": x}) for x in _distinct_inputs()]
    requests = [inputs[i] for i in sequence]
    configs = {"off": 0, "large": LARGE_BYTES, "small": SMALL_BYTES}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for r in range(rounds):
        for name, size in configs.items():
            summary = run(case, size, requests, seconds, tmp / f"{case.name}-{name}-{r}.log")
            summary["ideal_hit_ratio"] = round(ideal_hit_ratio(sequence, summary["requests"]), 4)
            runs[name].append(summary)
            print(
                f"{case.name} round {r} cache={name}: {summary['throughput_rps']:.0f}/s "
                f"hit ratio {summary['hit_ratio']} (ideal {summary['ideal_hit_ratio']}) "
                f"p50 {summary['p50_ms']} ms p99 {summary['p99_ms']} ms cpu/inf {summary['server_cpu_us_per_inf']} us",
                flush=True,
            )
    return {"runs": runs}


def same_round_ratios(res: dict[str, Any], name: str, field: str) -> list[float]:
    """`field` of each run of cache `name` over the no-cache run of the same round."""
    return [on[field] / off[field] for on, off in zip(res["runs"][name], res["runs"]["off"], strict=True)]


def _distinct_inputs() -> list[np.ndarray]:
    rows = np.random.default_rng(1).normal(size=(DISTINCT, 1, 16)).astype(np.float32)
    return list(rows)


def markdown(results: dict[str, Any], *, quick: bool, seconds: float, rounds: int) -> str:
    lines = [
        "# Response cache on a Zipf workload" + (" (quick run: not for figures)" if quick else ""),
        "",
        f"`python -m bench.bench_cache{' --quick' if quick else ''}`: batch-1 binary requests drawn Zipf(s={ZIPF_S}) "
        f"over {DISTINCT:,} distinct inputs, closed loop at concurrency {CONCURRENCY} for {seconds:g} s per run, "
        f"{rounds} alternating rounds of (no cache, a {LARGE_BYTES >> 20} MiB cache that holds every response, "
        f"a {SMALL_BYTES >> 10} KiB cache that evicts). The generator shares the machine's cores with the server. "
        "Gain and CPU/req ratio: over the no-cache server of the same round, median (then each round); on a "
        "busy machine server CPU per request is the steadier of the two. Hit ratio is the "
        "server's own count; ideal = an unbounded cache on the requests actually sent (each input's first use "
        "misses).",
        "",
        "| model | cache | throughput/s | gain (per round) | hit ratio | ideal | p50 ms | p99 ms "
        "| server CPU us/req | CPU/req ratio (per round) | entries |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        for name, runs in res["runs"].items():
            tput = statistics.median(r["throughput_rps"] for r in runs)
            gain, cpu_ratio = (
                ("1.00", "1.00")
                if name == "off"
                else tuple(
                    _ratios(same_round_ratios(res, name, field))
                    for field in ("throughput_rps", "server_cpu_us_per_inf")
                )
            )
            hit = "-" if name == "off" else f"{statistics.median(r['hit_ratio'] for r in runs):.3f}"
            ideal = statistics.median(r["ideal_hit_ratio"] for r in runs)
            p50 = statistics.median(r["p50_ms"] for r in runs)
            p99 = statistics.median(r["p99_ms"] for r in runs)
            cpu = statistics.median(r["server_cpu_us_per_inf"] for r in runs)
            entries = runs[-1]["cache_entries"]
            lines.append(
                f"| {model} | {name} | {tput:.0f} | {gain} | {hit} | {ideal:.3f} | {p50:.2f} | {p99:.2f} | "
                f"{cpu:.0f} | {cpu_ratio} | {'-' if entries is None else int(entries)} |"
            )
    lines.append("")
    return "\n".join(lines)


def _ratios(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test, not for figures)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the saved JSON")
    args = parser.parse_args(argv)
    seconds, rounds = (3.0, 1) if args.quick else (8.0, 3)
    suffix = "-quick" if args.quick else ""
    if args.report_only:
        saved = json.loads((RESULTS / f"cache{suffix}.json").read_text())
        report = markdown(saved, quick=args.quick, seconds=seconds, rounds=rounds)
        (RESULTS / f"cache{suffix}.md").write_text(report)
        print(report)
        return 0
    sequence = zipf_sequence(SEQUENCE)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name, path in (("tiny", tiny_model(tmp / "tiny.onnx")), ("wide", wide_model(tmp / "wide.onnx"))):
            case = Case(name, path, lambda b, s: {}, 64, 500, CONCURRENCY, 1, 1, [])
            results[name] = bench_model(case, sequence, rounds=rounds, seconds=seconds, tmp=tmp)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cache{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results, quick=args.quick, seconds=seconds, rounds=rounds)
    (RESULTS / f"cache{suffix}.md").write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
