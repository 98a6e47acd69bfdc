"""Precision through the model, not builder flags: the fp16 or Q/DQ ONNX every backend compiles, made once.

TensorRT 11 has no precision flags (`BuilderFlag.FP16/INT8/FP8` and the calibrators are gone; networks are
always strongly typed) and 10.x deprecates them: an engine's precision comes from the model's own types and
Q/DQ nodes. So precision is a step of its own, before any architecture-specific build:
- fp16: ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`) with its default block list of
  ops kept in fp32 and the graph's inputs and outputs kept fp32 (clients send what they sent before);
- int8 and fp8: Q/DQ nodes placed by ONNX Runtime's static quantizer with the settings NVIDIA's Model
  Optimizer (modelopt.onnx.quantization.ort_utils.configure_ort) passes it for TensorRT: symmetric int8
  activations and weights, per-channel weights, no bias or output quantization, Q/DQ pairs on weights;
  entropy calibration (modelopt's default) on the calibration data. fp8 is int8's Q/DQ re-scaled to E4M3, as
  modelopt's fp8 mode does. Model Optimizer itself is not used: its ONNX path imports torch
  (qdq_utils.py) and its `onnx` extra pins onnxruntime-gpu ~=1.24 beside our onnxruntime (see README);
- a model that already holds Q/DQ nodes is used as it is.

The step is architecture-independent, so its result is cached in the engine store under its own content key
(`<store>/prepared/<key>/model.onnx`): the per-architecture Jobs of one model race for a file lock, one
prepares, the others find the entry. It is accuracy-gated on the CPU with ONNX Runtime before it is cached (and
on labeled data when given, so a quantization that loses accuracy is refused before any GPU build time):
Q/DQ models run with graph optimizations off, i.e. as dequantize + float ops, which is what the quantized
graph means on any hardware (no CPU integer kernel whose rounding differs by CPU feature enters the verdict).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet_runtime.build import AccuracyGateFailed, BuildFailed, InvalidOptions, Unsupported
from modelfleet_runtime.build import store as store_mod
from modelfleet_runtime.build.accuracy import Feeds, gate_batches, onnxruntime_runner, run_gate, split_batches
from modelfleet_runtime.build.fetch import file_sha256
from modelfleet_runtime.build.labeled import check as labeled_check
from modelfleet_runtime.build.options import PREPARE_SCHEMES, BuildOptions, Precision
from modelfleet_runtime.build.validate import ModelSpec

if TYPE_CHECKING:
    from modelfleet_runtime.build.labeled import LabeledSet
    from modelfleet_runtime.build.validate import TensorSpec

    Evaluation = tuple[LabeledSet, TensorSpec]

log = logging.getLogger(__name__)

PREPARED_DIR = "prepared"
ARTIFACT_NAME = "model.onnx"
# Bump when what a prepared entry means changes; the scheme names in options.PREPARE_SCHEMES enter too.
PREPARE_SCHEMA = 1
# The ops whose inputs get Q/DQ: the compute-bound ones TensorRT runs in int8/fp8 (modelopt's fp8 list less Add).
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FP8_OPSET = 19


@dataclass(frozen=True)
class Prepared:
    """The model the per-architecture build compiles: the original (fp32, or Q/DQ already) or a prepared one."""

    path: Path
    key: str | None = None
    cache_hit: bool = False
    details: dict[str, Any] | None = None

    def as_details(self) -> dict[str, Any]:
        """What the engine's manifest and result say about the step."""
        if self.key is None:
            return {}
        return {"prepared": {"key": self.key, "cacheHit": self.cache_hit, **(self.details or {})}}


def method(options: BuildOptions, spec: ModelSpec) -> str | None:
    """The preparation a build needs (a PREPARE_SCHEMES key), or None when the model is compiled as it is."""
    precision = options.precision
    if precision == "fp32" or (precision in ("int8", "fp8") and spec.has_qdq):
        return None
    return precision


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": str(onnx.__version__), "onnxruntime": str(onnxruntime.__version__)}


def prepare_key(*, model_digest: str, options: BuildOptions, versions: dict[str, str]) -> str:
    """sha256 over what shapes the prepared model and its verdict: model, precision and scheme, calibration
    data, the gate, and the versions of the converting tools. No architecture and no backend: shared by all."""
    precision = options.precision
    material = {
        "schema": PREPARE_SCHEMA,
        "model_sha256": model_digest,
        "precision": precision,
        "scheme": PREPARE_SCHEMES[precision],
        "calibration_sha256": None if options.calibration is None else options.calibration.sha256,
        "gate": options.accuracy.resolved(precision).model_dump(),
        "tools": versions,
    }
    if options.accuracy.evaluation is not None:  # absent otherwise, so keys without labeled data stay as they were
        material["evaluation"] = options.evaluation_key(options.accuracy.evaluation)
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def prepare(
    *,
    model_path: Path,
    model_digest: str,
    spec: ModelSpec,
    options: BuildOptions,
    store: Path,
    workdir: Path,
    calibration: Feeds | None,
    evaluation: Evaluation | None = None,
) -> Prepared:
    """The model to compile: the store's prepared entry for this model and precision, made and gated if absent.
    With labeled data (`evaluation`: the set and the output it scores) the labeled gate is checked here too, so a
    quantization that loses accuracy is refused once, before any architecture's build."""
    how = method(options, spec)
    if how is None:
        return Prepared(path=model_path)
    if how in ("int8", "fp8") and calibration is None:
        raise Unsupported(f"{how} needs calibration data (Q/DQ ranges) or a model that already holds Q/DQ nodes")
    versions = tool_versions()
    key = prepare_key(model_digest=model_digest, options=options, versions=versions)
    root = store / PREPARED_DIR
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        entry = store_mod.read_entry(root, key)
        if entry.manifest is not None:
            return Prepared(path=root / key / ARTIFACT_NAME, key=key, cache_hit=True, details=_summary(entry.manifest))
        if entry.problem is not None:
            log.warning("replacing a broken prepared entry: %s", entry.problem)
        manifest = _make(how, model_path=model_path, spec=spec, options=options, calibration=calibration,
                         evaluation=evaluation, workdir=workdir, key=key, versions=versions, root=root)  # fmt: skip
    return Prepared(path=root / key / ARTIFACT_NAME, key=key, details=_summary(manifest))


def _make(
    how: str,
    *,
    model_path: Path,
    spec: ModelSpec,
    options: BuildOptions,
    calibration: Feeds | None,
    evaluation: Evaluation | None,
    workdir: Path,
    key: str,
    versions: dict[str, str],
    root: Path,
) -> dict[str, Any]:
    """Convert or quantize, gate on the CPU, publish; an entry that fails the gate is never stored."""
    staging = store_mod.make_staging(root, key)
    try:
        target = staging / ARTIFACT_NAME
        if how == "fp16":
            convert_fp16(model_path, target)
        else:
            assert calibration is not None
            batches = split_batches(calibration, batch_size=options.batch.opt, min_batch=1)
            quantize_qdq(model_path, target, precision=how, batches=batches, workdir=workdir)
        reference = onnxruntime_runner(model_path, optimize=False)
        candidate = onnxruntime_runner(target, optimize=False)
        outcome = run_gate(
            reference=reference,
            candidate=candidate,
            batches=gate_batches(spec, options=options, calibration=calibration),
            gate=options.accuracy.resolved(options.precision),
            classifiers=frozenset(t.name for t in spec.outputs if t.classifier_shaped),
        )
        labeled = None if evaluation is None else labeled_check(evaluation, reference, candidate, options)
        failures = [outcome.message] if not outcome.passed else []
        failures += [labeled.message] if labeled is not None and not labeled.passed else []
        if failures:
            raise AccuracyGateFailed(
                f"the {how} model (prepared once for every architecture, checked on the CPU): " + "; ".join(failures)
            )
        digest, size = file_sha256(target)
        manifest = {
            "schema": PREPARE_SCHEMA,
            "key": key,
            "artifact": ARTIFACT_NAME,
            "artifact_sha256": digest,
            "artifact_bytes": size,
            "precision": options.precision,
            "scheme": PREPARE_SCHEMES[options.precision],
            "accuracy": {
                **outcome.report.as_dict(camel=False),
                **({} if labeled is None else {"evaluation": labeled.as_dict(camel=False)}),
            },
            "tools": versions,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        store_mod.write_manifest(staging, manifest)
        return store_mod.publish(store=root, key=key, staging=staging).manifest
    finally:
        store_mod.discard(staging)


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    figures = manifest.get("accuracy") or {}
    labeled = figures.get("evaluation") or {}
    return {
        "scheme": manifest.get("scheme"),
        "sha256": manifest.get("artifact_sha256"),
        "maxRelError": figures.get("max_rel_error"),
        "top1Agreement": figures.get("top1_agreement"),
        **({"accuracy": labeled.get("accuracy"), "accuracyDrop": labeled.get("accuracy_drop")} if labeled else {}),
    }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock: one Job prepares, the others of the same key wait and then read its entry."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- the conversions


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs, the converter's fp32 block list kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(target))
    except Exception as exc:
        raise BuildFailed(f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc


def quantize_qdq(
    source: Path, target: Path, *, precision: Precision | str, batches: Sequence[Feeds], workdir: Path
) -> None:
    """Q/DQ for TensorRT (see the module docstring), calibrated with entropy on `batches`; fp8 from int8."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from modelfleet_runtime.build.ort import batch_reader, preprocess

    if not batches:
        raise InvalidOptions("calibration data has no rows")
    source = preprocess(source, workdir)
    if precision == "fp8":
        source = _opset_at_least(source, FP8_OPSET, workdir)
    try:
        quantize_static(
            source,
            target,
            batch_reader(batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Entropy,
            extra_options=tensorrt_options(source),
        )
        if precision == "fp8":
            onnx.save(int8_to_fp8(onnx.load(str(target))), str(target))
    except Exception as exc:
        raise BuildFailed(f"{precision} Q/DQ quantization failed: {type(exc).__name__}: {exc}") from exc


def int8_to_fp8(model: Any) -> Any:
    """Int8 Q/DQ -> FP8 E4M3 Q/DQ, as Model Optimizer does (fp8.int8_to_fp8): scales x 448/127 (E4M3's largest
    finite value over int8's), zero points re-typed; valid for max-style symmetric calibration."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        scale_name, zero_name = node.input[1], node.input[2]
        if scale_name not in done and scale_name in initializers:
            scale = numpy_helper.to_array(initializers[scale_name])
            rescaled = (scale * 448.0 / 127.0).astype(scale.dtype)
            initializers[scale_name].CopyFrom(numpy_helper.from_array(rescaled, scale_name))
            done.add(scale_name)
        if zero_name not in done and zero_name in initializers:
            zero = initializers[zero_name]
            fp8 = onnx.helper.make_tensor(zero_name, onnx.TensorProto.FLOAT8E4M3FN, zero.dims,
                                          bytes(np.zeros(int(np.prod(zero.dims)), np.uint8)), raw=True)  # fmt: skip
            zero.CopyFrom(fp8)
            done.add(zero_name)
    return model


def _opset_at_least(source: Path, opset: int, workdir: Path) -> Path:
    """FP8 Q/DQ needs opset 19; older models are converted with ONNX's version converter."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return source
    target = workdir / f"opset{opset}.onnx"
    onnx.save(version_converter.convert_version(model, opset), str(target))
    return target


def tensorrt_options(source: Path) -> dict[str, Any]:
    """The quantizer's extra options that Model Optimizer uses for TensorRT-friendly Q/DQ placement."""
    import onnx

    ops = sorted({node.op_type for node in onnx.load(str(source), load_external_data=False).graph.node})
    return {
        "QuantizeBias": False,
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": ops,
        "AddQDQPairToWeight": True,
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
        "DedicatedQDQPair": False,
        "ForceQuantizeNoInputCheck": True,
        "QDQDisableWeightAdjustForInt32Bias": True,
    }
