"""MiniLM through `modelfleet build` on the ONNX Runtime path: build time, and the artifact's speed as ratios.

Builds all-MiniLM-L6-v2 (from bench/minilm.py) with the real command in a subprocess, as a build Job
would run it, at fp32 and int8 (dynamic quantization), then times ONNX Runtime CPU sessions on the same
tokenized inputs at batch 1 and 32:
- `unoptimized`: the original model with graph optimizations disabled (ORT_DISABLE_ALL);
- `raw, online-optimized`: the original model as a server would load it without a build (ORT_ENABLE_ALL);
- the fp32 and int8 artifacts, loaded like the server loads them (ORT_ENABLE_ALL).
Variants run round-robin and each figure is a median, so a busy machine slows them alike; only ratios
from one run are compared. Writes bench/results/build.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.minilm import ensure_minilm_onnx, make_minilm_inputs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "build.md"


def run_build(model: Path, store: Path, *extra: str) -> tuple[dict[str, Any], float, str]:
    """`modelfleet build` in a subprocess; returns its result line, wall seconds and progress lines."""
    command = [sys.executable, "-m", "modelfleet_runtime.build.cli", "--model", str(model)]
    command += ["--store", str(store)]
    started = time.monotonic()
    done = subprocess.run([*command, *extra], capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"build failed ({done.returncode}):\n{done.stderr}\n{done.stdout}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall, done.stderr


def session(path: Path, *, optimize: bool, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_load(path: Path, *, optimize: bool, threads: int) -> tuple[ort.InferenceSession, float]:
    started = time.monotonic()
    loaded = session(path, optimize=optimize, threads=threads)
    return loaded, time.monotonic() - started


def measure(
    sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], *, rounds: int
) -> dict[str, float]:
    """Median seconds per call, variants interleaved round by round."""
    for s in sessions.values():  # warm-up
        s.run(None, feeds)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            started = time.monotonic()
            s.run(None, feeds)
            samples[name].append(time.monotonic() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds-b1", type=int, default=40)
    parser.add_argument("--rounds-b32", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads; 1 by default: on a shared machine, threads that wait for each "
        "other make multi-threaded medians swing with unrelated load",
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, for development")
    parser.add_argument("--no-write", action="store_true", help="print only, leave bench/results alone")
    args = parser.parse_args(argv)
    rounds = {1: 5 if args.quick else args.rounds_b1, 32: 2 if args.quick else args.rounds_b32}

    model = ensure_minilm_onnx()
    calibration_inputs = make_minilm_inputs(64, seq_len=args.seq_len, seed=1)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        tmpdir = Path(tmp)
        calibration = tmpdir / "minilm-calibration.npz"
        np.savez(
            calibration,
            input_ids=calibration_inputs["input_ids"],
            attention_mask=calibration_inputs["attention_mask"],
            token_type_ids=calibration_inputs["token_type_ids"],
        )
        store = tmpdir / "store"
        gate = ["--calibration", str(calibration), "--batch-opt", "16", "--batch-max", "32"]
        fp32, fp32_wall, fp32_log = run_build(model, store, *gate)
        cached, cached_wall, _ = run_build(model, store, *gate)
        assert cached["cacheHit"], cached
        # An L2-normalised embedding has no classes: its argmax is not a label, so top-1 is not gated.
        no_top1 = ["--min-top1-agreement", "0"]
        int8, int8_wall, _ = run_build(model, store, *gate, "--precision", "int8", *no_top1)
        fp32_artifact = store / fp32["key"] / fp32["artifact"]
        int8_artifact = store / int8["key"] / int8["artifact"]

        loads: dict[str, float] = {}
        sessions: dict[str, ort.InferenceSession] = {}
        for name, path, optimize in (
            ("unoptimized", model, False),
            ("raw, online-optimized", model, True),
            ("built fp32", fp32_artifact, True),
            ("built int8", int8_artifact, True),
        ):
            sessions[name], loads[name] = timed_load(path, optimize=optimize, threads=args.threads)
        timings = {}
        for batch in (1, 32):
            feeds = make_minilm_inputs(batch, seq_len=args.seq_len, seed=2)
            timings[batch] = measure(sessions, feeds, rounds=rounds[batch])
        sizes = {p.name: p.stat().st_size for p in (model,)}
        sizes["fp32 artifact"] = fp32_artifact.stat().st_size
        sizes["int8 artifact"] = int8_artifact.stat().st_size

    lines += [
        "# `modelfleet build`: MiniLM on the ONNX Runtime path",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work), Python "
        f"{platform.python_version()}, onnxruntime {ort.__version__}. Model: all-MiniLM-L6-v2 "
        f"(bench/minilm.py), inputs INT64 [batch, {args.seq_len}], output [batch, 384]. "
        f"ONNX Runtime sessions use {args.threads} intra-op thread(s). "
        "Generated by `python -m bench.bench_build`.",
        "",
        "## Build time",
        "",
        "| build | command wall time | build step | accuracy on 64 tokenized sentences |",
        "|---|---|---|---|",
        f"| fp32 (graph optimization, EXTENDED) | {fp32_wall:.1f} s | {fp32['buildSeconds']:.2f} s | "
        f"max abs {fp32['accuracy']['maxAbsError']:.2e}, rel {fp32['accuracy']['maxRelError']:.2e} |",
        f"| int8 (dynamic quantization + optimization) | {int8_wall:.1f} s | {int8['buildSeconds']:.2f} s | "
        f"max abs {int8['accuracy']['maxAbsError']:.3f}, rel {int8['accuracy']['maxRelError']:.3f} |",
        f"| fp32 again (cache hit) | {cached_wall:.1f} s | - | - |",
        "",
        "The command wall time includes Python start-up, hashing the 90 MB model, the reference run of the",
        "accuracy gate and the atomic publish. Progress lines of the fp32 build:",
        "",
        "```",
        *[line for line in fp32_log.splitlines() if "] " in line],
        "```",
        "",
        "## Speed of the built artifact (ONNX Runtime CPU, median per call)",
        "",
        "| variant | load | batch 1 | batch 32 | speed-up vs unoptimized (b1 / b32) | vs raw online-opt. |",
        "|---|---|---|---|---|---|",
    ]
    base, online = "unoptimized", "raw, online-optimized"
    for name in sessions:
        b1, b32 = timings[1][name], timings[32][name]
        lines.append(
            f"| {name} | {loads[name] * 1000:.0f} ms | {b1 * 1000:.1f} ms | {b32 * 1000:.0f} ms | "
            f"{timings[1][base] / b1:.2f}x / {timings[32][base] / b32:.2f}x | "
            f"{timings[1][online] / b1:.2f}x / {timings[32][online] / b32:.2f}x |"
        )
    lines += [
        "",
        "Sizes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()) + ".",
        "",
        "Reading the rows: `unoptimized` is the ratio's baseline. ONNX Runtime also optimizes a raw model",
        "online when it loads it with default settings (`raw, online-optimized`), which is what serving the",
        "model without a build would give; the fp32 artifact holds those rewrites (EXTENDED level) already,",
        "so the graph that passed the accuracy gate is the graph that is served. int8 is dynamic",
        "quantization, gated on relative error (top-1 is not gated: the output is an embedding).",
        f"Rounds: {rounds[1]} at batch 1, {rounds[32]} at batch 32.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
