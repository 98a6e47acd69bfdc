"""Build options of `modelfleet build`, shared with the operator: one model, its flags, and their round-trip.

The operator builds `BuildOptions` from the InferenceModel spec and calls `to_args()` to write the build
Job's command line; the Job parses those flags back with `options_from_namespace`. The two must agree
exactly (a test pins it), because both sides feed the same options to `engine_key`.
Only pydantic and the standard library here: the operator image has no ONNX.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelfleet_runtime.build import InvalidOptions

Backend = Literal["auto", "onnxruntime", "tensorrt"]
ResolvedBackend = Literal["onnxruntime", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8", "fp8"]

BACKENDS: tuple[Backend, ...] = ("auto", "onnxruntime", "tensorrt")
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8", "fp8")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class GateDefaults(NamedTuple):
    """The gate a precision gets where the spec leaves a figure unset (None: that figure is not checked)."""

    max_abs_error: float | None
    max_rel_error: float | None
    min_top1_agreement: float | None
    samples: int


# One source for the code and the CRD's descriptions (api.py renders them with `describe_default`).
# Absolute error depends on the output's scale, so it is checked only when asked for; the relative error
# (accuracy.py: error over the output's largest magnitude) and top-1 agreement always are. Quantized builds
# may differ from FP32 by 20 % of the output's scale (sound INT8, `make bench-int8`: 4-9 % on the project's
# classifiers, 13 % on MiniLM's embeddings; saturated U8S8 errs by 50-67 %) and must keep the class of 98 %
# of inputs, compared on 256 samples so that a verdict rests on more than one or two rows.
DEFAULT_GATES: dict[str, GateDefaults] = {
    "fp32": GateDefaults(None, 1e-3, 0.99, 64),
    "fp16": GateDefaults(None, 2e-2, 0.99, 64),
    "int8": GateDefaults(None, 0.2, 0.98, 256),
    "fp8": GateDefaults(None, 0.2, 0.98, 256),
}


def describe_default(figure: str) -> str:
    """`fp32 0.001, fp16 0.02, int8 0.2, fp8 0.2` for a GateDefaults field; for the API's descriptions."""
    return ", ".join(f"{precision} {getattr(gate, figure):g}" for precision, gate in DEFAULT_GATES.items())


# How each precision is put into the model before any architecture's build (build/precision.py). The name enters
# the engine key of every backend that compiles the prepared model, so changed settings are a new engine.
PREPARE_SCHEMES: dict[str, str] = {
    "fp16": "ort-float16-fp32-io",
    "int8": "qdq-s8s8-symmetric-per-channel-entropy",
    "fp8": "qdq-e4m3-from-int8-entropy",
}


# The onnxruntime.quantization settings of each int8 method (see build/ort.py: uint8 weights compute the same
# on every CPU). The name enters the engine key, so a change of settings is a new engine, never a stale hit.
ORT_INT8_SCHEMES: dict[str, str] = {
    "dynamic": "dynamic-u8u8-per-channel",
    "static": "static-qdq-u8u8-per-channel",
    "qdq": PREPARE_SCHEMES["int8"],  # the Q/DQ model TensorRT compiles, served as it is
}


def normalize_sha256(value: str) -> str:
    """Lower-case hex digest; accepts an optional `sha256:` prefix. Raises ValueError otherwise."""
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(digest):
        raise ValueError(f"not a sha256 hex digest: {value!r}")
    return digest


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BatchProfile(_Frozen):
    """Optimization profile on the batch axis (axis 0 of every input)."""

    min: int = Field(1, ge=1, description="smallest batch the artifact must serve")
    opt: int = Field(16, ge=1, description="batch size TensorRT tunes for")
    max: int = Field(32, ge=1, description="largest batch the artifact must serve")

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch needs min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class ShapeRange(_Frozen):
    """Range of one input's non-batch dimensions (axis 1 onwards), for its dynamic axes."""

    min: tuple[int, ...] = Field(min_length=1)
    opt: tuple[int, ...] = Field(min_length=1)
    max: tuple[int, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError("shape min, opt and max need the same number of dimensions")
        for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max, strict=True), start=1):
            if lo < 1 or not lo <= mid <= hi:
                raise ValueError(f"axis {axis} needs 1 <= min <= opt <= max, got {lo}/{mid}/{hi}")
        return self


class _DataFile(_Frozen):
    """An .npz the build reads: where it is, and optionally its digest."""

    path: str = Field(min_length=1, description="local path (the operator mounts volumes)")
    sha256: str | None = Field(None, description="content digest; computed by the build when absent")

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        return None if value is None else normalize_sha256(value)


class Calibration(_DataFile):
    """Calibration data: an .npz with one array per model input, [samples, ...]."""


class Evaluation(_DataFile):
    """Labeled evaluation data: an .npz with one array per model input plus `labels` (class ids, [samples])."""


# Absolute: 0.005 is half a point of top-1 accuracy ("no more than 0.5 % accuracy drop").
DEFAULT_MAX_ACCURACY_DROP = 0.005


class ResolvedGate(_Frozen):
    """Accuracy thresholds after precision defaults; None means that figure is not checked."""

    max_abs_error: float | None
    max_rel_error: float | None
    min_top1_agreement: float | None
    samples: int


class AccuracyGate(_Frozen):
    """What the artifact must match against the FP32 reference; unset figures follow DEFAULT_GATES."""

    max_abs_error: float | None = Field(None, ge=0)
    max_rel_error: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    samples: int | None = Field(None, ge=1, le=100_000)
    evaluation: Evaluation | None = Field(None, description="labeled data for the top-1 accuracy gate")
    max_accuracy_drop: float = Field(
        DEFAULT_MAX_ACCURACY_DROP, ge=0, le=1, description="largest top-1 accuracy drop, absolute (0.005 = 0.5 points)"
    )
    evaluation_output: str | None = Field(
        None, min_length=1, description="the classifier output to score; None: the one [batch, classes] output"
    )

    def resolved(self, precision: Precision) -> ResolvedGate:
        defaults = DEFAULT_GATES[precision]
        return ResolvedGate(
            max_abs_error=defaults.max_abs_error if self.max_abs_error is None else self.max_abs_error,
            max_rel_error=defaults.max_rel_error if self.max_rel_error is None else self.max_rel_error,
            min_top1_agreement=(
                defaults.min_top1_agreement if self.min_top1_agreement is None else self.min_top1_agreement
            ),
            samples=defaults.samples if self.samples is None else self.samples,
        )


class TensorRTOptions(_Frozen):
    """Knobs of the TensorRT builder; left out of the key on the ONNX Runtime path."""

    builder_optimization_level: int = Field(3, ge=0, le=5)
    workspace_mib: int | None = Field(None, ge=1, description="memory pool limit; None = TensorRT's default")


class OnnxRuntimeOptions(_Frozen):
    """Knobs of the ONNX Runtime path; left out of the key on the TensorRT path."""

    quantization: Literal["dynamic", "static", "qdq"] = Field(
        "dynamic",
        description="int8 method: dynamic (weights int8, activation ranges at run time; best for MatMul "
        "models on CPU, needs no data), static (QDQ u8u8, calibrated on --calibration data) or qdq (the "
        "symmetric Q/DQ model TensorRT compiles, calibrated on --calibration data)",
    )


class BuildOptions(_Frozen):
    """Everything that shapes an engine besides the model bytes, the architecture and the backend version."""

    backend: Backend = "auto"
    precision: Precision = "fp32"
    batch: BatchProfile = BatchProfile()
    shapes: dict[str, ShapeRange] = Field(default_factory=dict)
    calibration: Calibration | None = None
    accuracy: AccuracyGate = AccuracyGate()
    tensorrt: TensorRTOptions = TensorRTOptions()
    onnxruntime: OnnxRuntimeOptions = OnnxRuntimeOptions()

    @model_validator(mode="after")
    def _static_needs_data(self) -> BuildOptions:
        if self.onnxruntime.quantization in ("static", "qdq") and self.calibration is None:
            method = self.onnxruntime.quantization
            raise ValueError(f"onnxruntime {method} quantization needs calibration data (--calibration)")
        return self

    def with_backend(self, backend: ResolvedBackend) -> BuildOptions:
        return self.model_copy(update={"backend": backend})

    def with_calibration_digest(self, sha256: str) -> BuildOptions:
        if self.calibration is None:
            raise ValueError("no calibration data to attach a digest to")
        calibration = self.calibration.model_copy(update={"sha256": normalize_sha256(sha256)})
        return self.model_copy(update={"calibration": calibration})

    def with_evaluation_digest(self, sha256: str) -> BuildOptions:
        evaluation = self.accuracy.evaluation
        if evaluation is None:
            raise ValueError("no evaluation data to attach a digest to")
        evaluation = evaluation.model_copy(update={"sha256": normalize_sha256(sha256)})
        return self.model_copy(update={"accuracy": self.accuracy.model_copy(update={"evaluation": evaluation})})

    def normalized(self) -> dict[str, Any]:
        """The options as they enter the cache key: resolved, and only what changes or gates the artifact.

        The calibration path is left out (the same data at another path is the same build), its digest
        is in; the gate enters with its precision defaults filled in; TensorRT knobs only for TensorRT.
        The labeled gate enters only when there is evaluation data (its digest, the drop, the output),
        so the keys of specs without it are the keys they always had.
        """
        if self.backend == "auto":
            raise ValueError("resolve backend 'auto' before computing the key")
        if self.calibration is not None and self.calibration.sha256 is None:
            raise ValueError("the calibration data's sha256 must be known before computing the key")
        evaluation = self.accuracy.evaluation
        if evaluation is not None and evaluation.sha256 is None:
            raise ValueError("the evaluation data's sha256 must be known before computing the key")
        labeled = {} if evaluation is None else {"evaluation": self.evaluation_key(evaluation)}
        return {
            **labeled,
            "backend": self.backend,
            "precision": self.precision,
            "batch": self.batch.model_dump(),
            "shapes": {name: self.shapes[name].model_dump(mode="json") for name in sorted(self.shapes)},
            "calibration_sha256": None if self.calibration is None else self.calibration.sha256,
            "accuracy": self.accuracy.resolved(self.precision).model_dump(),
            "tensorrt": self.tensorrt.model_dump() if self.backend == "tensorrt" else None,
            "onnxruntime": self._onnxruntime_key(),
            "prepare": self._prepare_key(),
        }

    def evaluation_key(self, evaluation: Evaluation) -> dict[str, Any]:
        return {
            "sha256": evaluation.sha256,
            "max_accuracy_drop": self.accuracy.max_accuracy_drop,
            "output": self.accuracy.evaluation_output,
        }

    def _prepare_key(self) -> str | None:
        """The precision step's scheme, where the backend compiles the prepared model (build/precision.py)."""
        if self.precision == "fp32":
            return None
        if self.backend == "tensorrt" or self.precision == "fp16":
            return PREPARE_SCHEMES[self.precision]
        return None

    def _onnxruntime_key(self) -> dict[str, Any] | None:
        """ONNX Runtime's int8 settings, only where ONNX Runtime quantizes."""
        if self.backend != "onnxruntime" or self.precision != "int8":
            return None
        method = self.onnxruntime.quantization
        return {"quantization": method, "scheme": ORT_INT8_SCHEMES[method]}

    def to_args(self) -> list[str]:
        """The `modelfleet build` flags that parse back to exactly these options."""
        args = ["--backend", self.backend, "--precision", self.precision]
        args += ["--batch-min", str(self.batch.min), "--batch-opt", str(self.batch.opt)]
        args += ["--batch-max", str(self.batch.max)]
        for name in sorted(self.shapes):
            # `--flag=value`: a value starting with '-' would otherwise read as a flag.
            args.append(f"--shape={format_shape(name, self.shapes[name])}")
        if self.calibration is not None:
            args.append(f"--calibration={self.calibration.path}")
            if self.calibration.sha256 is not None:
                args += ["--calibration-sha256", self.calibration.sha256]
        gate = self.accuracy
        for flag, value in (
            ("--max-abs-error", gate.max_abs_error),
            ("--max-rel-error", gate.max_rel_error),
            ("--min-top1-agreement", gate.min_top1_agreement),
        ):
            if value is not None:
                args += [flag, repr(float(value))]  # repr round-trips a float exactly
        if gate.samples is not None:
            args += ["--accuracy-samples", str(gate.samples)]
        args += _evaluation_args(gate)
        args += ["--trt-optimization-level", str(self.tensorrt.builder_optimization_level)]
        if self.tensorrt.workspace_mib is not None:
            args += ["--trt-workspace-mib", str(self.tensorrt.workspace_mib)]
        args += ["--ort-quantization", self.onnxruntime.quantization]
        return args


def _evaluation_args(gate: AccuracyGate) -> list[str]:
    """The labeled gate's flags; the drop only where it is not the default."""
    args: list[str] = []
    if gate.evaluation is not None:
        args.append(f"--evaluation={gate.evaluation.path}")
        if gate.evaluation.sha256 is not None:
            args += ["--evaluation-sha256", gate.evaluation.sha256]
    if gate.evaluation_output is not None:
        args.append(f"--evaluation-output={gate.evaluation_output}")
    if gate.max_accuracy_drop != DEFAULT_MAX_ACCURACY_DROP:
        args += ["--max-accuracy-drop", repr(float(gate.max_accuracy_drop))]
    return args


def format_shape(name: str, shape: ShapeRange) -> str:
    """`name=MIN:OPT:MAX`, each a comma-separated list of the non-batch dims, e.g. `input_ids=16:128:256`."""
    dims = (",".join(str(d) for d in part) for part in (shape.min, shape.opt, shape.max))
    return f"{name}={':'.join(dims)}"


def parse_shape(text: str) -> tuple[str, ShapeRange]:
    """Inverse of `format_shape`. The name may hold ':' (TensorFlow exports do), so split at the last '='."""
    name, sep, spec = text.rpartition("=")
    parts = spec.split(":")
    if not sep or not name or len(parts) != 3:
        raise InvalidOptions(f"--shape {text!r}: expected NAME=MIN:OPT:MAX, e.g. input_ids=16:128:256")
    try:
        lo, mid, hi = ([int(d) for d in part.split(",")] for part in parts)
        return name, ShapeRange(min=tuple(lo), opt=tuple(mid), max=tuple(hi))
    except ValueError as exc:  # ValidationError is a ValueError too
        raise InvalidOptions(f"--shape {text!r}: {_first_error(exc)}") from exc


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `BuildOptions`; defaults stay None so the model's defaults are the only ones."""
    group = parser.add_argument_group("build options")
    group.add_argument("--backend", choices=BACKENDS, help="auto: TensorRT when importable and a GPU is present")
    group.add_argument("--precision", choices=PRECISIONS)
    group.add_argument("--batch-min", type=int, help="batch profile: smallest batch (default 1)")
    group.add_argument("--batch-opt", type=int, help="batch profile: batch to tune for (default 16)")
    group.add_argument("--batch-max", type=int, help="batch profile: largest batch (default 32)")
    group.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="NAME=MIN:OPT:MAX",
        help="range of an input's non-batch dims, comma-separated, e.g. input_ids=16:128:256 (repeatable)",
    )
    group.add_argument("--calibration", metavar="PATH", help=".npz with one array per input, [samples, ...]")
    group.add_argument("--calibration-sha256", metavar="HEX", help="expected sha256 of the calibration file")
    group.add_argument("--max-abs-error", type=float, help="gate: largest absolute error allowed")
    group.add_argument("--max-rel-error", type=float, help="gate: largest error relative to the output's scale")
    group.add_argument("--min-top1-agreement", type=float, help="gate: fraction of rows with the same argmax")
    group.add_argument(
        "--accuracy-samples",
        type=int,
        help="gate: number of samples compared (default: " + describe_default("samples") + ")",
    )
    group.add_argument(
        "--evaluation",
        metavar="PATH",
        help="labeled .npz (one array per input and `labels`, class ids): gate on the top-1 accuracy drop",
    )
    group.add_argument("--evaluation-sha256", metavar="HEX", help="expected sha256 of the evaluation file")
    group.add_argument(
        "--evaluation-output", metavar="NAME", help="classifier output to score (default: the one [batch, classes])"
    )
    group.add_argument(
        "--max-accuracy-drop",
        type=float,
        help=f"gate: largest top-1 accuracy drop on --evaluation, absolute (default {DEFAULT_MAX_ACCURACY_DROP})",
    )
    group.add_argument("--trt-optimization-level", type=int, help="TensorRT builder optimization level 0-5")
    group.add_argument("--trt-workspace-mib", type=int, help="TensorRT workspace memory pool limit, MiB")
    group.add_argument(
        "--ort-quantization",
        choices=("dynamic", "static", "qdq"),
        help="ONNX Runtime int8 method: dynamic (default, no data), static QDQ u8u8 or qdq, TensorRT's symmetric "
        "Q/DQ model (both need --calibration)",
    )


def options_from_namespace(ns: argparse.Namespace) -> BuildOptions:
    """Build `BuildOptions` from parsed flags; InvalidOptions names the offending field."""
    data: dict[str, Any] = {}
    if ns.backend is not None:
        data["backend"] = ns.backend
    if ns.precision is not None:
        data["precision"] = ns.precision
    batch = {k: v for k, v in (("min", ns.batch_min), ("opt", ns.batch_opt), ("max", ns.batch_max)) if v is not None}
    if batch:
        data["batch"] = batch
    if ns.shape:
        shapes: dict[str, ShapeRange] = {}
        for text in ns.shape:
            name, shape = parse_shape(text)
            if name in shapes:
                raise InvalidOptions(f"--shape given twice for input {name!r}")
            shapes[name] = shape
        data["shapes"] = shapes
    if ns.calibration is not None:
        data["calibration"] = {"path": ns.calibration, "sha256": ns.calibration_sha256}
    elif ns.calibration_sha256 is not None:
        raise InvalidOptions("--calibration-sha256 needs --calibration")
    gate = {
        key: value
        for key, value in (
            ("max_abs_error", ns.max_abs_error),
            ("max_rel_error", ns.max_rel_error),
            ("min_top1_agreement", ns.min_top1_agreement),
            ("samples", ns.accuracy_samples),
            ("max_accuracy_drop", ns.max_accuracy_drop),
            ("evaluation_output", ns.evaluation_output),
        )
        if value is not None
    }
    if ns.evaluation is not None:
        gate["evaluation"] = {"path": ns.evaluation, "sha256": ns.evaluation_sha256}
    elif ns.evaluation_sha256 is not None:
        raise InvalidOptions("--evaluation-sha256 needs --evaluation")
    if gate:
        data["accuracy"] = gate
    trt = {
        key: value
        for key, value in (
            ("builder_optimization_level", ns.trt_optimization_level),
            ("workspace_mib", ns.trt_workspace_mib),
        )
        if value is not None
    }
    if trt:
        data["tensorrt"] = trt
    if ns.ort_quantization is not None:
        data["onnxruntime"] = {"quantization": ns.ort_quantization}
    try:
        return BuildOptions.model_validate(data)
    except ValidationError as exc:
        raise InvalidOptions(f"invalid build options: {_first_error(exc)}") from exc


def parse_options(argv: Sequence[str]) -> BuildOptions:
    """Parse only the option flags (the inverse of `BuildOptions.to_args`)."""
    parser = argparse.ArgumentParser(prog="modelfleet build", add_help=False)
    add_option_arguments(parser)
    return options_from_namespace(parser.parse_args(list(argv)))


def _first_error(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in errors)
    return str(exc)
