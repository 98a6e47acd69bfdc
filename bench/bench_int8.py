"""INT8 settings of the ONNX Runtime path measured on this CPU: top-1 agreement and error of each scheme.

Every `Int8Scheme` of build/ort.py quantizes the project's classifiers (the test suite's 16-32-10 MLP and a
wider 24-48-12 one, five seeds each) and, with `--minilm`, all-MiniLM-L6-v2; each artifact is optimized and
run as the build runs it and compared with the FP32 reference by the gate's own figures on 256 seeded
inputs (static schemes calibrate on 256 others). Prints and writes bench/results/int8.md, headed by the
CPU's int8 kernel class: figures for U8S8 schemes depend on it, U8U8 ones must not.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from modelfleet_runtime.build import accuracy, cpu, ort
from modelfleet_runtime.build.options import ORT_INT8_SCHEMES
from tests.modelzoo import classifier_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "int8.md"
ROWS = 256
SIZES = {"mlp-16-32-10": (16, 32, 10), "mlp-24-48-12": (24, 48, 12)}


def classifier_cases(workdir: Path) -> list[tuple[str, Path, accuracy.Feeds, accuracy.Feeds]]:
    cases = []
    for label, sizes in SIZES.items():
        for seed in range(5):
            path = classifier_model(workdir / f"{label}-{seed}.onnx", seed=seed, sizes=sizes)
            feeds = [
                {"input": np.random.default_rng(base + seed).standard_normal((ROWS, sizes[0])).astype(np.float32)}
                for base in (100, 200)
            ]
            cases.append((label, path, feeds[0], feeds[1]))
    return cases


def minilm_case() -> tuple[str, Path, accuracy.Feeds, accuracy.Feeds]:
    from bench.minilm import ensure_minilm_onnx, make_minilm_inputs

    path = ensure_minilm_onnx()
    evaluation = make_minilm_inputs(64, seq_len=32, seed=1)
    calibration = make_minilm_inputs(64, seq_len=32, seed=2)
    return "minilm", path, evaluation, calibration


def measure(scheme: ort.Int8Scheme, model: Path, evaluation: accuracy.Feeds, calibration: accuracy.Feeds, tmp: Path):
    quantized, artifact = tmp / "q.onnx", tmp / "artifact.onnx"
    batches = accuracy.split_batches(calibration, batch_size=16, min_batch=1)
    ort.quantize_with(scheme, ort.preprocess(model, tmp), quantized, batches)
    ort.optimize_offline(quantized, artifact, architecture="cpu")
    reference, candidate = accuracy.onnxruntime_runner(model, optimize=False), ort.candidate_runner(artifact)
    eval_batches = accuracy.split_batches(evaluation, batch_size=16, min_batch=1)
    refs = [reference(b) for b in eval_batches]
    classifiers = frozenset({"probabilities"} & set(refs[0]))  # MiniLM's embedding is not a classifier
    return accuracy.compare_outputs(refs, [candidate(b) for b in eval_batches], classifiers=classifiers)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 (needs the bench extra)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    kernel = cpu.this_cpu()
    lines = [
        f"# INT8 schemes on this CPU: int8 kernel class `{kernel}` (U8S8 saturates: {cpu.u8s8_saturates(kernel)})",
        "",
        f"{platform.processor() or platform.machine()}; {ROWS} evaluation inputs per classifier, figures of the "
        "accuracy gate against FP32. Classifiers: min and mean top-1 agreement over 5 seeds, worst max relative "
        "error. Chosen by the build: " + ", ".join(f"`{name}`" for name in ORT_INT8_SCHEMES.values()) + ".",
        "",
        "| scheme | model | top-1 min | top-1 mean | max rel error |",
        "|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cases = classifier_cases(tmp)
        if args.minilm:
            cases.append(minilm_case())
        for scheme in ort.INT8_SCHEMES.values():
            by_model: dict[str, list[accuracy.AccuracyReport]] = {}
            for label, model, evaluation, calibration in cases:
                by_model.setdefault(label, []).append(measure(scheme, model, evaluation, calibration, tmp))
            for label, reports in by_model.items():
                top1 = [r.top1_agreement for r in reports if r.top1_agreement is not None]
                low, mean = (f"{min(top1):.3f}", f"{np.mean(top1):.3f}") if top1 else ("—", "—")
                chosen = " (chosen)" if scheme.name in ORT_INT8_SCHEMES.values() else ""
                worst = max(r.max_rel_error for r in reports)
                lines.append(f"| `{scheme.name}`{chosen} | {label} | {low} | {mean} | {worst:.3f} |")
                print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
