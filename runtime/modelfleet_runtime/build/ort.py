"""The ONNX Runtime build path, which runs everywhere: offline graph optimization, and INT8 quantization.

Graph optimization level of the saved model (ONNX Runtime's "offline mode"):
- target `cpu`: EXTENDED. Its fusions (FusedGemm, Attention, SkipLayerNormalization, DynamicQuantizeMatMul
  ...) are com.microsoft contrib ops that the CPU provider runs, and the artifact is keyed by the `cpu`
  architecture, so only CPU pods load it. ALL is never saved: its NCHWc layout rewrites are specific to the
  CPU's vector width, and ONNX Runtime documents that offline-optimized models must run on the hardware and
  providers they were optimized for.
- target a GPU (smXY, served by the CUDA/TensorRT providers): BASIC. Its rewrites (constant folding, dead
  node removal, Conv+BN folding, ...) keep standard ONNX ops, so the saved model stays loadable by any
  provider; the serving session then applies the provider-specific fusions online.

INT8 (`onnxruntime.quantization`), chosen by `options.onnxruntime.quantization`; the exact settings of each
method are the `Int8Scheme` that `options.ORT_INT8_SCHEMES` names (they enter the engine key):
- dynamic (the default): weights quantized per channel, activation ranges computed per batch at run time.
  It needs no data and is what ONNX Runtime recommends for MatMul-heavy models (transformers) on CPU: MatMul
  becomes MatMulInteger, fused to DynamicQuantizeMatMul at the EXTENDED level;
- static: QDQ calibrated with MinMax on the --calibration data (required: ranges calibrated on synthetic
  inputs would be wrong for real traffic); the better choice for Conv-heavy models;
- qdq: the symmetric Q/DQ model build/precision.py makes for TensorRT, served as it is. Its int8 weights make
  it U8S8 here and not portable (below); `make bench-precision` measured it less accurate and slower than dynamic
  on this CPU, so it is not the default;
- the model already holds QuantizeLinear/DequantizeLinear: it is already quantized, and only optimized.
Weights are uint8 in dynamic and static (U8U8). ONNX Runtime's quantization guide: on x86-64 with AVX2 or AVX-512 but
without VNNI, U8S8 (int8 weights) runs through VPMADDUBSW, whose int16 pair sums saturate, and it advises
reduce_range or U8U8 when accuracy drops. U8U8 sums in int32 on every x86 kernel (and arm64's), so the
quantized artifact computes the same on every CPU and the gate's verdict holds wherever it is served:
measured by `make bench-int8`, per-channel U8S8 gave top-1 agreement 0.88 on an AVX2-only CPU where U8U8
gave 0.98+ (README, "INT8 on every CPU"). A model that brings its own int8 Q/DQ weights cannot be
re-typed: its manifest says it is not portable, and the runtime refuses to serve it on a CPU whose int8
kernel class differs from the one it was gated on (`cpu.py`).
Calibration data also feeds the accuracy gate, whatever the method.
FP16 and `qdq` come from build/precision.py, the step shared with TensorRT. An fp16 artifact is built for GPU
targets (the CUDA provider runs fp16); on CPUs the artifact stays FP32 (the CPU provider lacks fp16 kernels for
most ops and casts around them: MiniLM ran 7 % slower, `make bench-precision`) and the manifest says so
(`precision.effective`).
FP8 needs TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelfleet_runtime.build import BuildFailed, Unsupported, cpu
from modelfleet_runtime.build.accuracy import Feeds, Runner, onnxruntime_runner, split_batches
from modelfleet_runtime.build.options import ORT_INT8_SCHEMES, BuildOptions
from modelfleet_runtime.build.validate import ModelSpec

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model.onnx"


@dataclass(frozen=True)
class Built:
    """A built artifact in the staging directory, with what the manifest should say about it."""

    artifact: Path
    effective_precision: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Int8Scheme:
    """One way of quantizing with onnxruntime.quantization; `name` is what the key and the manifest say."""

    method: Literal["dynamic", "static"]
    weights: Literal["int8", "uint8"]
    per_channel: bool = True
    reduce_range: bool = False

    @property
    def name(self) -> str:
        pair = "u8s8" if self.weights == "int8" else "u8u8"
        parts = [self.method if self.method == "dynamic" else "static-qdq", pair]
        parts.append("per-channel" if self.per_channel else "per-tensor")
        return "-".join([*parts, "reduce-range"] if self.reduce_range else parts)


# Every combination `make bench-int8` measures; the build uses the two that ORT_INT8_SCHEMES names.
INT8_SCHEMES: dict[str, Int8Scheme] = {
    s.name: s
    for method in ("dynamic", "static")
    for s in (
        Int8Scheme(method, "int8"),
        Int8Scheme(method, "int8", reduce_range=True),
        Int8Scheme(method, "int8", per_channel=False),
        Int8Scheme(method, "uint8"),
        Int8Scheme(method, "uint8", per_channel=False),
    )
}


def backend_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def optimization_level_name(architecture: str) -> str:
    return "extended" if architecture == "cpu" else "basic"


def build_onnxruntime(
    *,
    model_path: Path,
    prepared: Path,
    spec: ModelSpec,
    options: BuildOptions,
    architecture: str,
    out_dir: Path,
    workdir: Path,
    calibration: Feeds | None,
) -> Built:
    """Optimize (and quantize when asked) into `out_dir/model.onnx`; `prepared` is build/precision.py's model."""
    details: dict[str, Any] = {"graphOptimizationLevel": optimization_level_name(architecture)}
    source = model_path
    effective = "fp32"
    if options.precision == "fp8":
        raise Unsupported("precision fp8 needs the tensorrt backend on an sm89+ GPU")
    if options.precision == "fp16":
        if architecture == "cpu":
            details["note"] = "fp16 is not served on CPUs (slower than fp32 there, make bench-precision): fp32 artifact"
        else:
            source, effective = prepared, "fp16"
    if options.precision == "int8":
        source, effective = _int8(details, model_path=model_path, prepared=prepared, spec=spec, options=options,
                                  workdir=workdir, calibration=calibration)  # fmt: skip
    artifact = out_dir / ARTIFACT_NAME
    optimize_offline(source, artifact, architecture=architecture)
    return Built(artifact=artifact, effective_precision=effective, details=details)


def _int8(
    details: dict[str, Any],
    *,
    model_path: Path,
    prepared: Path,
    spec: ModelSpec,
    options: BuildOptions,
    workdir: Path,
    calibration: Feeds | None,
) -> tuple[Path, str]:
    """The int8 source model: the model's own Q/DQ, the shared TensorRT Q/DQ model, or ONNX Runtime's own."""
    if spec.has_qdq:
        details["quantization"] = "qdq-in-model"
        details["int8Portable"] = not has_int8_weights(model_path)
        source = model_path
    elif options.onnxruntime.quantization == "qdq":
        details["quantization"] = ORT_INT8_SCHEMES["qdq"]
        details["int8Portable"] = False  # int8 weights: U8S8 kernels, whose sums saturate on some CPUs
        source = prepared
    else:
        source, details["quantization"] = quantize(
            model_path=model_path, options=options, workdir=workdir, calibration=calibration
        )
        details["int8Portable"] = True
    details["cpuInt8Kernel"] = cpu.this_cpu()
    return source, "int8"


def has_int8_weights(model_path: Path) -> bool:
    """Whether the model holds int8 initializers (its own signed Q/DQ weights: U8S8 on the CPU)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer)


def optimize_offline(source: Path, target: Path, *, architecture: str) -> None:
    """Let ONNX Runtime rewrite the graph once and save it (see the module docstring for the level)."""
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if architecture == "cpu"
        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    session_options.optimized_model_filepath = str(target)
    session_options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BuildFailed(f"onnxruntime could not load or optimize the model: {exc}") from exc
    if not target.is_file():
        raise BuildFailed(f"onnxruntime did not write the optimized model to {target}")


def quantize(*, model_path: Path, options: BuildOptions, workdir: Path, calibration: Feeds | None) -> tuple[Path, str]:
    """INT8 with the scheme the options name; returns the quantized model and the scheme's name."""
    scheme = INT8_SCHEMES[ORT_INT8_SCHEMES[options.onnxruntime.quantization]]
    batches = None
    if scheme.method == "static":
        if calibration is None:  # the options validator requires it; keep the error clear anyway
            raise BuildFailed("static quantization needs calibration data")
        batches = split_batches(calibration, batch_size=options.batch.opt, min_batch=options.batch.min)
    target = workdir / "quantized.onnx"
    quantize_with(scheme, preprocess(model_path, workdir), target, batches)
    return target, scheme.name


def quantize_with(scheme: Int8Scheme, source: Path, target: Path, batches: Sequence[Feeds] | None) -> None:
    """Run onnxruntime.quantization with `scheme`; static schemes calibrate (MinMax) on `batches`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    weight_type = QuantType.QInt8 if scheme.weights == "int8" else QuantType.QUInt8
    common: dict[str, Any] = {
        "weight_type": weight_type,
        "per_channel": scheme.per_channel,
        "reduce_range": scheme.reduce_range,
    }
    try:
        if scheme.method == "dynamic":
            quantize_dynamic(source, target, **common)
        else:
            reader = batch_reader(batches or [])
            quantize_static(
                source,
                target,
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                **common,
            )
    except Exception as exc:
        raise BuildFailed(f"onnxruntime quantization failed: {type(exc).__name__}: {exc}") from exc


def preprocess(model_path: Path, workdir: Path) -> Path:
    """ONNX Runtime's recommended pre-quantization pass (shape inference + basic optimization).

    Symbolic shape inference is skipped: it needs sympy, and ONNX shape inference is enough for the
    quantizer. A model the pass cannot handle is quantized as it is.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = workdir / "preprocessed.onnx"
    try:
        quant_pre_process(model_path, target, skip_symbolic_shape=True)
    except Exception as exc:
        log.warning("quantization pre-processing skipped: %s: %s", type(exc).__name__, exc)
        return model_path
    return target


def batch_reader(batches: Sequence[Feeds]) -> Any:
    """A CalibrationDataReader feeding the calibration batches, one per get_next()."""
    from onnxruntime.quantization import CalibrationDataReader

    class _BatchReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[Feeds] = iter(batches)

        def get_next(self) -> Feeds | None:
            return next(self._batches, None)

    return _BatchReader()


def candidate_runner(artifact: Path) -> Runner:
    """How the server will run the artifact: ONNX Runtime with its default (online) optimizations."""
    return onnxruntime_runner(artifact, optimize=True)
