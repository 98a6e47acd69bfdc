"""`make bench-peers`: modelfleet against MLServer, KServe and PyTriton (Triton), same models, load and engine.

Every server runs ONNX Runtime with the same session options (1 intra-op and 1 inter-op thread, sequential,
ORT_ENABLE_ALL, no spinning: modelfleet's own, copied into bench/peers/ort_session.py) and batches up to 32
requests with a 5 ms window where it can, with two model instances or workers (modelfleet tunes both online
for the 100 ms p99, within those bounds: its adaptive batching). Each peer runs from its own
venv (bench/peer_envs.py); its adapter (bench/peers/<peer>_peer.py) does not import modelfleet. modelfleet
runs `modelfleet serve` from this venv with MODELFLEET_* settings (`--modelfleet-env KEY=VALUE` overrides).

Per model and server: CPU per inference (the server's whole process tree, utime+stime from /proc, workers
included), saturation throughput (closed loop), and the highest open-loop Poisson rate whose p99 <= 100 ms
(bisection); each as a ratio to the best peer; and modelfleet's saturation against raw ONNX Runtime's
ceiling (bench_runtime's in-process measurement). Outputs of a few requests are checked against a direct
ONNX Runtime run for every server. Results: bench/results/peers.md + peers.json (`-quick` with --quick).

    python -m bench.bench_peers [--quick] [--only tiny|minilm] [--servers modelfleet,mlserver,...]
                                [--modelfleet-env MODELFLEET_MAX_BATCH_SIZE=64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench import peer_envs
from bench.bench_runtime import (
    Case,
    Inputs,
    Server,
    binary_request,
    minilm_inputs,
    raw_backends,
    raw_point,
    tiny_inputs,
    tiny_model,
)
from bench.loadgen import HttpRequest, LoadResult, run_in_process

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PEERS_DIR = ROOT / "bench" / "peers"
P99_LIMIT_MS = 100.0
MAX_BATCH = 32
DELAY_US = 5000
WORKERS = 2
START_ATTEMPTS = 3
IDLE_S = 3.0
SERVERS = ("modelfleet", "mlserver", "kserve", "pytriton")
BINARY = frozenset({"modelfleet", "kserve", "pytriton"})  # speak the OIP binary tensor extension over REST
MODELFLEET_DEFAULTS = {
    "MODELFLEET_MAX_BATCH_SIZE": str(MAX_BATCH),
    "MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS": str(DELAY_US),
    "MODELFLEET_INSTANCES": str(WORKERS),
    "MODELFLEET_INTRA_OP_THREADS": "1",
    "MODELFLEET_INTER_OP_THREADS": "1",
    "MODELFLEET_MAX_QUEUE_SIZE": "0",
    # modelfleet's own scheduling under the SLO: batch limit and delay tuned online for the p99 the max-rate
    # column asks (32 and 5 ms stay their upper bounds).
    "MODELFLEET_BATCHING_ADAPTIVE": "true",
    "MODELFLEET_BATCHING_P99_TARGET_MICROSECONDS": str(int(P99_LIMIT_MS * 1000)),
}


@dataclass(frozen=True)
class Timing:
    """Seconds per run and how many rounds (medians are taken over rounds)."""

    rounds: int
    warmup_s: float
    saturation_s: float
    open_s: float
    bisect_steps: int
    raw_s: float


QUICK = Timing(rounds=1, warmup_s=1.0, saturation_s=3.0, open_s=3.0, bisect_steps=3, raw_s=1.0)
FULL = Timing(rounds=3, warmup_s=2.0, saturation_s=10.0, open_s=8.0, bisect_steps=5, raw_s=3.0)


@dataclass
class Model:
    name: str
    path: Path
    make_inputs: Callable[[int, int], Inputs]
    concurrency: int
    binary: bool  # binary tensors to the servers that support them (else JSON for all)
    session: Any = None  # ONNX Runtime run directly (modelfleet's backend, the benchmark's options)

    def expected(self, inputs: Inputs) -> dict[str, np.ndarray]:
        if self.session is None:
            case = modelfleet_case(self, MODELFLEET_DEFAULTS)
            self.session = raw_backends(case)[0]
        result: dict[str, np.ndarray] = self.session.infer(inputs)
        return result


# --- requests and output checks ---------------------------------------------------------------------------

_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
_NUMPY = {"FP32": np.float32, "INT64": np.int64}


def json_request(model: str, inputs: Inputs) -> HttpRequest:
    body = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": _DATATYPE[a.dtype], "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ]
    }
    return HttpRequest(
        "POST", f"/v2/models/{model}/infer", json.dumps(body).encode(), (("Content-Type", "application/json"),)
    )


def make_request(server: str, model: Model, inputs: Inputs) -> HttpRequest:
    binary = model.binary and server in BINARY
    return binary_request(model.name, inputs) if binary else json_request(model.name, inputs)


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Outputs of an OIP v2 REST response, JSON or with binary tensors (Inference-Header-Content-Length)."""
    size = int(header_length) if header_length else len(body)
    header, offset = json.loads(body[:size]), size
    outputs: dict[str, np.ndarray] = {}
    for out in header["outputs"]:
        dtype = _NUMPY[out["datatype"]]
        nbytes = (out.get("parameters") or {}).get("binary_data_size")
        if nbytes is not None:
            flat = np.frombuffer(body[offset : offset + nbytes], dtype=dtype)
            offset += nbytes
        else:
            flat = np.asarray(out["data"], dtype=dtype)
        outputs[out["name"]] = flat.reshape(out["shape"])
    return outputs


def check_outputs(port: int, requests: list[HttpRequest], expected: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Send each request once and compare its outputs with ONNX Runtime's own: the largest absolute error."""
    worst = 0.0
    for request, want in zip(requests, expected, strict=True):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{request.path}", data=request.body, headers=dict(request.headers)
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            got = decode_response(resp.read(), resp.headers.get("Inference-Header-Content-Length"))
        for name, value in want.items():
            if name not in got or got[name].shape != value.shape:
                return {"ok": False, "error": f"output {name}: missing or shape {got.get(name, np.empty(0)).shape}"}
            worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - value))))
    return {"ok": worst <= 1e-4, "max_abs_error": worst, "requests": len(requests)}


# --- servers ------------------------------------------------------------------------------------------------


class Running(Protocol):
    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def peer_command(server: str, model: Model, ports: tuple[int, int, int], workdir: Path) -> list[str]:
    http, grpc, metrics = ports
    peer = peer_envs.peers()[server]
    common = ["--model", str(model.path), "--name", model.name]
    if server != "pytriton":
        common += ["--workdir", str(workdir)]
    script = str(PEERS_DIR / f"{server}_peer.py")
    if server == "kserve":
        flags = ["--http_port", str(http), "--grpc_port", str(grpc), "--workers", str(WORKERS)]
        return [str(peer.python), script, *common, *flags, "--enable_latency_logging", "false"]
    flags = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    return [str(peer.python), script, *common, *flags]


class PeerServer:
    """One peer's server, started in its own session (so stopping it ends its whole process tree)."""

    def __init__(self, server: str, model: Model, log_path: Path) -> None:
        self.port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"{server}-", dir=log_path.parent))
        command = peer_command(server, model, (self.port, free_port(), free_port()), workdir)
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
        self._log = log_path.open("wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            command, cwd=PEERS_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready(model.name)
        except BaseException:
            self.stop()  # a failed start can leave children (tritonserver, workers) in its process group
            raise

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + 600
        url = f"http://127.0.0.1:{self.port}/v2/models/{name}/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"not ready after 600 s; log: {self.log_path}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def modelfleet_case(model: Model, env: dict[str, str]) -> Case:
    return Case(
        model.name,
        model.path,
        model.make_inputs,
        max_batch=int(env.get("MODELFLEET_MAX_BATCH_SIZE", MAX_BATCH)),
        delay_us=int(env.get("MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS", DELAY_US)),
        concurrency=model.concurrency,
        threads=int(env.get("MODELFLEET_INTRA_OP_THREADS", 1)),
        instances=int(env.get("MODELFLEET_INSTANCES", WORKERS)),
        batch_sizes=[1, MAX_BATCH],
        env=env,
    )


def start(server: str, model: Model, env: dict[str, str], tmp: Path) -> Running:
    log = tmp / f"{server}-{model.name}.log"
    if server == "modelfleet":
        case = modelfleet_case(model, env)
        return Server(case, max_batch=case.max_batch, log_path=log)
    # PyTriton's model load can fail on a loaded machine: its Python stub connects to the handshake socket as
    # soon as the file exists, which can be between the server's bind and listen (connection refused).
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return PeerServer(server, model, log)
        except RuntimeError as exc:
            if attempt == START_ATTEMPTS:
                raise
            print(f"  {server}: start attempt {attempt} failed ({one_line(str(exc))[-160:]}); again", flush=True)
    raise AssertionError("unreachable")


def one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")


# --- measurements ---------------------------------------------------------------------------------------------


def tree_cpu_seconds(root: int) -> float:
    """utime+stime (and reaped children's) of `root` and every live descendant, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(f) for f in fields[11:15])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(pid, 0.0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def load(running: Running, kind: str, requests: list[HttpRequest], **kwargs: Any) -> tuple[LoadResult, float]:
    """One load run and the server tree's CPU seconds over it."""
    cpu0 = tree_cpu_seconds(running.proc.pid)
    result = run_in_process(kind, host="127.0.0.1", port=running.port, requests=requests, **kwargs)
    return result, tree_cpu_seconds(running.proc.pid) - cpu0


def idle_cpu_pct(running: Running, seconds: float) -> float:
    cpu0 = tree_cpu_seconds(running.proc.pid)
    time.sleep(seconds)
    return round(100 * (tree_cpu_seconds(running.proc.pid) - cpu0) / seconds, 1)


def passes(result: LoadResult) -> bool:
    return result.ok == len(result.statuses) and result.percentile_ms(99) <= P99_LIMIT_MS


def max_rate(running: Running, requests: list[HttpRequest], saturation: float, timing: Timing) -> dict[str, Any]:
    """Bisection over open-loop Poisson rates in (0, 1.2 x saturation]: the highest with p99 <= 100 ms.
    Up to 3 more halvings when no rate has passed yet, so one bad moment does not leave 0."""
    low, high = 0.0, 1.2 * saturation
    probes: list[dict[str, Any]] = []
    rate = 0.8 * saturation
    while len(probes) < timing.bisect_steps or (low == 0.0 and len(probes) < timing.bisect_steps + 3):
        seed = len(probes)
        result, _ = load(running, "open", requests, rate=rate, duration_s=timing.open_s, connections=256, seed=seed)
        ok = passes(result)
        probes.append({"rate": round(rate, 1), "p99_ms": round(result.percentile_ms(99), 2), "pass": ok})
        low, high = (rate, high) if ok else (low, rate)
        rate = (low + high) / 2
    return {"rate": round(low, 1), "probes": probes}


def measure_round(running: Running, requests: list[HttpRequest], model: Model, timing: Timing) -> dict[str, Any]:
    run_in_process(
        "closed", host="127.0.0.1", port=running.port, requests=requests, concurrency=model.concurrency,
        duration_s=timing.warmup_s,
    )  # fmt: skip
    sat, cpu = load(running, "closed", requests, concurrency=model.concurrency, duration_s=timing.saturation_s)
    saturation = sat.throughput()
    return {
        "saturation_qps": round(saturation, 1),
        "cpu_us_per_inf": round(cpu / max(sat.ok, 1) * 1e6, 1),
        "saturation_errors": len(sat.statuses) - sat.ok,
        "max_rate_p99_100ms": max_rate(running, requests, saturation, timing),
    }


@dataclass
class ServerRun:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    idle_cpu_pct: float | None = None


def median_of(rounds: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "saturation_qps": statistics.median(r["saturation_qps"] for r in rounds),
        "cpu_us_per_inf": statistics.median(r["cpu_us_per_inf"] for r in rounds),
        "max_rate_qps": statistics.median(r["max_rate_p99_100ms"]["rate"] for r in rounds),
    }


# --- one model ----------------------------------------------------------------------------------------------


def start_checked(name: str, model: Model, env: dict[str, str], tmp: Path, run: ServerRun) -> Running | None:
    """Start one server and check its outputs on 4 requests; None (and `run.error`) when it does not start."""
    began = time.monotonic()
    try:
        running = start(name, model, env, tmp)
    except (RuntimeError, TimeoutError) as exc:
        run.error = f"did not start: {one_line(str(exc))[-300:]}"
        print(f"  {name}: {run.error}", flush=True)
        return None
    variants = [model.make_inputs(1, seed) for seed in range(4)]
    requests = [make_request(name, model, v) for v in variants]
    run.check = check_outputs(running.port, requests, [model.expected(v) for v in variants])
    print(f"  {name}: ready in {time.monotonic() - began:.1f} s, check {run.check}", flush=True)
    return running


def run_rounds(
    model: Model, started: dict[str, Running], runs: dict[str, ServerRun], case: Case, timing: Timing
) -> list[float]:
    """Each round: raw ONNX Runtime's ceiling, then every server in turn; returns the ceilings."""
    backends = raw_backends(case)
    variants = [model.make_inputs(1, seed) for seed in range(16)]
    raw: list[float] = []
    for round_ in range(timing.rounds):
        raw.append(raw_point(case, backends, MAX_BATCH, timing.raw_s, tries=2)["ceiling"])
        print(f"  round {round_ + 1}: raw ORT batch {MAX_BATCH}: {raw[-1]:,.0f} inf/s", flush=True)
        for name, running in started.items():
            result = measure_round(running, [make_request(name, model, v) for v in variants], model, timing)
            runs[name].rounds.append(result)
            print(
                f"  round {round_ + 1}: {name}: saturation {result['saturation_qps']:,.0f} inf/s, "
                f"{result['cpu_us_per_inf']:,.0f} us CPU/inf, p99<=100ms up to "
                f"{result['max_rate_p99_100ms']['rate']:,.0f}/s",
                flush=True,
            )
    return raw


def run_model(model: Model, servers: list[str], env: dict[str, str], timing: Timing, tmp: Path) -> dict[str, Any]:
    """All servers up at once; rounds interleave them (and raw ONNX Runtime) so background load hits each alike."""
    print(f"\n== {model.name}: {model.path.name}", flush=True)
    runs = {name: ServerRun() for name in servers}
    started: dict[str, Running] = {}
    try:
        for name in servers:
            if (running := start_checked(name, model, env, tmp, runs[name])) is not None:
                started[name] = running
        for name, running in started.items():
            # All servers stay up through the rounds: what each burns when idle is load on the others.
            runs[name].idle_cpu_pct = idle_cpu_pct(running, IDLE_S)
            print(f"  {name}: {runs[name].idle_cpu_pct}% CPU when idle", flush=True)
        raw = run_rounds(model, started, runs, modelfleet_case(model, env), timing)
    finally:
        for running in started.values():
            running.stop()
    return summarize(model, runs, raw)


def summarize(model: Model, runs: dict[str, ServerRun], raw: list[float]) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for name, run in runs.items():
        entry: dict[str, Any] = {"check": run.check, "rounds": run.rounds, "error": run.error}
        entry["idle_cpu_pct"] = run.idle_cpu_pct
        entry["request_encoding"] = "binary" if model.binary and name in BINARY else "JSON"
        if run.rounds and run.check.get("ok"):
            entry["median"] = median_of(run.rounds)
        elif run.rounds:
            entry["error"] = f"outputs differ from ONNX Runtime's: {run.check}"
        servers[name] = entry
    measured = {n: s["median"] for n, s in servers.items() if "median" in s}
    if measured:
        best_cpu = min(m["cpu_us_per_inf"] for m in measured.values())
        best_sat = max(m["saturation_qps"] for m in measured.values())
        best_rate = max(m["max_rate_qps"] for m in measured.values())
        for name, m in measured.items():
            servers[name]["vs_best"] = {
                "cpu_per_inf": round(m["cpu_us_per_inf"] / best_cpu, 2),
                "saturation": round(m["saturation_qps"] / best_sat, 2),
                "max_rate": round(m["max_rate_qps"] / best_rate, 2) if best_rate else None,
            }
    result: dict[str, Any] = {"model": model.name, "raw_ort_ceiling_qps": [round(r, 1) for r in raw]}
    if "modelfleet" in measured and raw:
        ratios = [r["saturation_qps"] / c for r, c in zip(runs["modelfleet"].rounds, raw, strict=True)]
        result["modelfleet_vs_raw_ort"] = float(f"{statistics.median(ratios):.3g}")
    result["servers"] = servers
    return result


# --- report ---------------------------------------------------------------------------------------------------


def server_label(name: str) -> str:
    known = peer_envs.peers()
    return f"{name} {known[name].version}" if name in known else name


def _ratio(value: float) -> str:
    # The tiny model's is ~1e-3: its throughput is set by the server's per-request cost, not by the model.
    return f"{value:.2f}x" if value >= 0.01 else f"{value:.1e}x (overhead-bound)"


def _cell(value: float, ratio: float | None, fmt: str) -> str:
    return f"{value:{fmt}} ({ratio:.2f}x)" if ratio is not None else f"{value:{fmt}}"


def model_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### {result['model']}",
        "",
        "| server | requests | CPU us/inference (vs best) | saturation inf/s (vs best) "
        "| max rate at p99 <= 100 ms, inf/s (vs best) | idle CPU | outputs vs ONNX Runtime |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, s in result["servers"].items():
        check = s["check"]
        checked = f"max abs error {check['max_abs_error']:.1e}" if "max_abs_error" in check else "-"
        if "median" not in s:
            lines.append(f"| {server_label(name)} | {s['request_encoding']} | - | - | - | - | FAILED: {s['error']} |")
            continue
        m, v = s["median"], s["vs_best"]
        idle = f"{s['idle_cpu_pct']}%" if s.get("idle_cpu_pct") is not None else "-"
        lines.append(
            f"| {server_label(name)} | {s['request_encoding']} "
            f"| {_cell(m['cpu_us_per_inf'], v['cpu_per_inf'], ',.0f')} "
            f"| {_cell(m['saturation_qps'], v['saturation'], ',.0f')} "
            f"| {_cell(m['max_rate_qps'], v['max_rate'], ',.0f')} | {idle} | {checked} |"
        )
    if "modelfleet_vs_raw_ort" in result:
        ceiling = statistics.median(result["raw_ort_ceiling_qps"])
        ratio = _ratio(result["modelfleet_vs_raw_ort"])
        lines += [
            "",
            f"modelfleet's saturation / raw ONNX Runtime's ceiling (in-process, batch {MAX_BATCH}, "
            f"{WORKERS} streams x 1 thread, median {ceiling:,.0f} inf/s): **{ratio}** "
            "(median of the per-round ratios).",
        ]
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# Peer benchmark",
        "",
        f"Generated by `make bench-peers{' BENCH_ARGS=--quick' if results['quick'] else ''}` on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} cores) at {results['measured_at']}; "
        f"{results['rounds']} round(s), medians. Every server runs ONNX Runtime {results['onnxruntime']} "
        "with 1 intra-op + 1 inter-op thread, sequential execution, ORT_ENABLE_ALL, no spinning; batches of "
        f"up to {MAX_BATCH} with a 5 ms window and {WORKERS} instances/workers (KServe: {WORKERS} uvicorn "
        "workers, no batching). Batch-1 requests over HTTP/1.1 keep-alive on loopback, from bench/loadgen.py "
        "in its own process on the same cores. CPU per inference counts the server's whole process tree "
        "(workers, Triton's stub processes) from /proc, not the load generator. `vs best` is the ratio to "
        "the best server of the row's column (CPU: >1 costs more). Max rate: bisection over open-loop Poisson "
        "rates up to 1.2x saturation, every request answered and p99 <= 100 ms from the scheduled send time.",
        "",
        f"modelfleet settings: {', '.join(f'{k}={v}' for k, v in sorted(settings['modelfleet_env'].items()))}.",
        "",
    ]
    for result in results["models"].values():
        lines += model_table(result)
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------------


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = dict(MODELFLEET_DEFAULTS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("MODELFLEET_"):
            raise SystemExit(f"--modelfleet-env wants MODELFLEET_NAME=VALUE, not {pair!r}")
        env[key] = value
    return env


def models(only: str | None, tmp: Path) -> list[Model]:
    chosen = []
    if only in (None, "tiny"):
        chosen.append(Model("tiny", tiny_model(tmp / "tiny.onnx"), tiny_inputs, concurrency=64, binary=True))
    if only in (None, "minilm"):
        from bench.minilm import ensure_minilm_onnx

        chosen.append(Model("minilm", ensure_minilm_onnx(), minilm_inputs, concurrency=64, binary=False))
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 short round (development, not figures)")
    parser.add_argument("--only", choices=["tiny", "minilm"], default=None)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {SERVERS}")
    parser.add_argument(
        "--modelfleet-env", action="append", default=[], metavar="MODELFLEET_X=V", help="override a setting"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    if unknown := set(servers) - set(SERVERS):
        raise SystemExit(f"unknown servers: {sorted(unknown)}")
    env = parse_env(args.modelfleet_env)
    for name in servers:
        if name != "modelfleet":
            peer = peer_envs.peers()[name]
            print(f"{name}: env {peer.env} (made in {peer_envs.ensure(peer):.0f} s)", flush=True)
    timing = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        results = {m.name: run_model(m, servers, env, timing, tmp) for m in models(args.only, tmp)}
    report = {
        "quick": args.quick,
        "rounds": timing.rounds,
        "measured_at": time.strftime("%Y-%m-%d %H:%M %Z"),
        "onnxruntime": peer_envs.locked_version("onnxruntime"),
        "settings": {"modelfleet_env": env, "servers": servers},
        "models": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"peers{'-quick' if args.quick else ''}.json"
    if args.only and target.exists():  # one model re-measured: keep the other's figures
        report["models"] = {**json.loads(target.read_text()).get("models", {}), **results}
    target.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    target.with_suffix(".md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
