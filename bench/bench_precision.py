"""Precision through the model on this CPU: the prepared fp16 / Q/DQ graphs against ONNX Runtime's own int8.

For the project's classifiers (five seeds of the 16-32-10 MLP) and, with `--minilm`, all-MiniLM-L6-v2 (seq 32):
- the graphs build/precision.py makes once for every backend (fp16; int8 and fp8 Q/DQ for TensorRT), run as
  the gate runs them (`gated`: graph optimizations off, Q/DQ as dequantize + float ops) and as ONNX Runtime's CPU
  provider would serve them (`served`: all optimizations, its integer kernels);
- ONNX Runtime's own int8 schemes the CPU path uses (dynamic U8U8, the default, and static U8U8 QDQ).
Figures are the accuracy gate's against the FP32 reference on 256 (MiniLM: 64) seeded inputs, calibrated on as
many others, and CPU milliseconds per batch of 16 with a ratio to FP32 served in the same run. Writes
bench/results/precision.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelfleet_runtime.build import accuracy, cpu, ort, precision
from tests.modelzoo import classifier_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "precision.md"
ROWS = 256
SEEDS = 5
Case = tuple[str, Path, accuracy.Feeds, accuracy.Feeds, frozenset[str]]


def cases(workdir: Path, *, minilm: bool) -> list[Case]:
    found: list[Case] = []
    for seed in range(SEEDS):
        path = classifier_model(workdir / f"mlp-{seed}.onnx", seed=seed)
        feeds = [
            {"input": np.random.default_rng(base + seed).standard_normal((ROWS, 16)).astype(np.float32)}
            for base in (100, 200)
        ]
        found.append(("mlp-16-32-10", path, feeds[0], feeds[1], frozenset({"probabilities"})))
    if minilm:
        from bench.minilm import ensure_minilm_onnx, make_minilm_inputs

        evaluation, calibration = (make_minilm_inputs(64, seq_len=32, seed=s) for s in (1, 2))
        found.append(("minilm", ensure_minilm_onnx(), evaluation, calibration, frozenset()))
    return found


def cpu_ms(run: accuracy.Runner, feeds: accuracy.Feeds, rounds: int = 10) -> float:
    run(feeds)
    begun = time.process_time()
    for _ in range(rounds):
        run(feeds)
    return (time.process_time() - begun) / rounds * 1000


def variants(model: Path, calibration: accuracy.Feeds, tmp: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (artifact, served with optimizations)."""
    batches = accuracy.split_batches(calibration, batch_size=16, min_batch=1)
    made: dict[str, tuple[Path, bool]] = {"fp32": (model, True)}
    fp16 = tmp / "fp16.onnx"
    precision.convert_fp16(model, fp16)
    made["fp16 gated"], made["fp16 served"] = (fp16, False), (fp16, True)
    for name in ("int8", "fp8"):
        target = tmp / f"{name}.onnx"
        precision.quantize_qdq(model, target, precision=name, batches=batches, workdir=tmp)
        made[f"{name} Q/DQ gated"] = (target, False)
        if name == "int8":
            made["int8 Q/DQ served"] = (target, True)
    for scheme in ("dynamic-u8u8-per-channel", "static-qdq-u8u8-per-channel"):
        quantized, artifact = tmp / f"{scheme}.onnx", tmp / f"{scheme}-artifact.onnx"
        ort.quantize_with(ort.INT8_SCHEMES[scheme], ort.preprocess(model, tmp), quantized, batches)
        ort.optimize_offline(quantized, artifact, architecture="cpu")
        made[f"ORT {scheme}"] = (artifact, True)
    return made


def measure(case: Case, tmp: Path) -> dict[str, tuple[float, float | None, float]]:
    """name -> (max rel error, top-1 agreement, CPU ms per batch of 16)."""
    _, model, evaluation, calibration, classifiers = case
    batches = accuracy.split_batches(evaluation, batch_size=16, min_batch=1)
    reference = accuracy.onnxruntime_runner(model, optimize=False)
    refs = [reference(b) for b in batches]
    figures = {}
    for name, (artifact, served) in variants(model, calibration, tmp).items():
        run: Callable[[accuracy.Feeds], dict[str, accuracy.Array]] = accuracy.onnxruntime_runner(
            artifact, optimize=served
        )
        report = accuracy.compare_outputs(refs, [run(b) for b in batches], classifiers=classifiers)
        figures[name] = (report.max_rel_error, report.top1_agreement, cpu_ms(run, batches[0]))
    return figures


def table(results: dict[str, list[dict[str, tuple[float, float | None, float]]]]) -> list[str]:
    lines = [
        "| model | graph | max rel error (worst) | top-1 (min) | CPU ms / batch 16 | vs fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, runs in results.items():
        for name in runs[0]:
            rel = max(r[name][0] for r in runs)
            tops = [t for r in runs if (t := r[name][1]) is not None]
            ms = float(np.median([r[name][2] for r in runs]))
            base = float(np.median([r["fp32"][2] for r in runs]))
            top = f"{min(tops):.3f}" if tops else "-"
            lines.append(f"| {label} | {name} | {rel:.4f} | {top} | {ms:.3f} | {ms / base:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 (needs the bench extra)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results: dict[str, list[dict[str, tuple[float, float | None, float]]]] = {}
    with tempfile.TemporaryDirectory() as work:
        for index, case in enumerate(cases(Path(work), minilm=args.minilm)):
            tmp = Path(work) / f"case-{index}"
            tmp.mkdir()
            results.setdefault(case[0], []).append(measure(case, tmp))
    lines = [
        f"# Precision through the model on this CPU (int8 kernel class `{cpu.this_cpu()}`)",
        "",
        "`gated`: as the build's CPU gate runs the prepared graph (what every backend compiles); `served`: as ONNX"
        " Runtime's CPU provider would serve it. Classifiers: worst over 5 seeds; times are medians.",
        "",
        *table(results),
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
