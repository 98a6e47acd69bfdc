"""The InferenceModel API (modelfleet.io/v1alpha1): the source of the CRD schema and the operator's parser.

`crdgen` renders these models into the CRD; the operator validates every object it reads with them
(defence in depth). Cross-field rules are declared twice on purpose, next to each other: as CEL
(`x-kubernetes-validations`, enforced by the API server) and as a pydantic validator with the very same
message (enforced here). The pydantic side must never be stricter than the CEL side, so anything the
API server accepted parses. Pydantic, the standard library and the build's own option defaults only: the
operator's API layer has no Kubernetes client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from modelfleet_runtime.build.options import DEFAULT_MAX_ACCURACY_DROP, describe_default

GROUP = "modelfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceModel"
PLURAL = "inferencemodels"
SINGULAR = "inferencemodel"
SHORT_NAMES = ("im", "ims")
# Not "all": `kubectl delete all --all` would then delete models and, with them, hours of engine builds.
CATEGORIES = ("modelfleet",)

# A model's name prefixes its build Jobs (`<name>-build-<arch>-<hash8>`, ≤ 63), Deployments and its
# Service, which must be a DNS-1035 label; 40 characters leave room for those suffixes.
MAX_NAME_LENGTH = 40
NAME_PATTERN = rf"^[a-z]([-a-z0-9]{{0,{MAX_NAME_LENGTH - 2}}}[a-z0-9])?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ARCHITECTURE_PATTERN = r"^sm[0-9]{2,3}$"
# resource.Quantity without a sign: requests are never negative.
_DECIMAL = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY_PATTERN = rf"^{_DECIMAL}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_DECIMAL}))?$"
# Shared verbatim by CEL (RE2) and Python's `re`: only constructs both read the same way.
PVC_URI_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[^/]"
HTTPS_URI_PATTERN = r"^https://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?/[^?#]*[^/?#](\?[^#]*)?$"
TRAVERSAL_PATTERN = r"(^|/)(\.|%2[eE]){2}(/|[?#]|$)"
FP8_MIN_ARCHITECTURE = 89


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry; the pydantic twin raises `ValueError(rule.message)`."""

    rule: str
    message: str
    field_path: str | None = None
    reason: Literal["FieldValueInvalid", "FieldValueRequired", "FieldValueForbidden"] | None = None

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def _cel(*rules: CelRule) -> dict[str, Any]:
    return {"x-kubernetes-validations": [r.to_schema() for r in rules]}


def _set(path: str) -> str:
    """CEL: the optional field at `path` holds a value. Nullable fields keep an explicit null, which has()
    counts as present and which compares with nothing, hence the type test."""
    return f"(has({path}) && type({path}) != null_type)"


def _unset(path: str) -> str:
    """CEL: the optional field at `path` is absent or null; pydantic reads both as None."""
    return f"(!has({path}) || type({path}) == null_type)"


def _fail(rule: CelRule) -> NoReturn:
    raise ValueError(rule.message)


def _nested(factory: type[BaseModel], description: str) -> Any:
    """A sub-object that is always present. `default: {}` marks it for crdgen, which writes the filled-in
    defaults there, so the API server stores every default and CEL rules can rely on the sub-object."""
    return Field(default_factory=factory, description=description, json_schema_extra={"default": {}})


class _Spec(BaseModel):
    """Spec objects: camelCase, strict types (the API server sends JSON types), unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
        allow_inf_nan=False,
    )


class _Status(BaseModel):
    """Status objects: written by the operator; unknown fields ignored so an older operator can still read."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# --- spec.model and spec.engine.calibration -------------------------------------------------------------

URI_SCHEME = CelRule(
    rule="self.startsWith('pvc://') || self.startsWith('file:///') || self.startsWith('https://')"
    " || self.startsWith('s3://')",
    message="uri must be pvc://<claim>/<path>, file:///<path> or https://<host>/<path>",
)
URI_S3 = CelRule(
    rule="!self.startsWith('s3://')",
    message="uri: s3:// is reserved but not supported yet; use pvc://<claim>/<path>, file:///<path> or https://",
)
URI_PVC = CelRule(
    rule=f"!self.startsWith('pvc://') || self.matches(r'{PVC_URI_PATTERN}')",
    message="uri: pvc:// needs a claim name (lower-case DNS name) and a path inside it: pvc://<claim>/<path>",
)
URI_FILE = CelRule(
    rule="!self.startsWith('file:///') || self.size() > 8",
    message="uri: file:/// needs an absolute path, e.g. file:///models/minilm/model.onnx",
)
URI_HTTPS = CelRule(
    rule=f"!self.startsWith('https://') || self.matches(r'{HTTPS_URI_PATTERN}')",
    message="uri: https:// needs a host and a file path (https://<host>[:port]/<path>[?query]);"
    " credentials and fragments are not allowed",
)
URI_TRAVERSAL = CelRule(
    rule=f"!self.matches(r'{TRAVERSAL_PATTERN}')",
    message="uri must not contain '..' path segments (path traversal)",
)
URI_SPACE = CelRule(
    rule="!self.matches('[[:space:][:cntrl:]]')",
    message="uri must not contain whitespace or control characters",
)
URI_RULES = (URI_SCHEME, URI_S3, URI_PVC, URI_FILE, URI_HTTPS, URI_TRAVERSAL, URI_SPACE)
HTTPS_NEEDS_SHA256 = CelRule(
    rule=f"!self.uri.startsWith('https://') || {_set('self.sha256')}",
    message="sha256 is required when uri is https:// (it pins the downloaded bytes)",
    field_path=".sha256",
    reason="FieldValueRequired",
)

_POSIX_SPACE = frozenset("\t\n\v\f\r ")


def uri_problem(uri: str) -> str | None:
    """The message of the first URI rule `uri` breaks, or None: the Python twin of `URI_RULES`."""
    checks = (
        (URI_SCHEME, uri.startswith(("pvc://", "file:///", "https://", "s3://"))),
        (URI_S3, not uri.startswith("s3://")),
        (URI_PVC, not uri.startswith("pvc://") or re.search(PVC_URI_PATTERN, uri) is not None),
        (URI_FILE, not uri.startswith("file:///") or len(uri) > 8),
        (URI_HTTPS, not uri.startswith("https://") or re.search(HTTPS_URI_PATTERN, uri) is not None),
        (URI_TRAVERSAL, re.search(TRAVERSAL_PATTERN, uri) is None),
        (URI_SPACE, not any(c in _POSIX_SPACE or ord(c) < 0x20 or ord(c) == 0x7F for c in uri)),
    )
    return next((rule.message for rule, ok in checks if not ok), None)


class ArtifactSource(_Spec):
    """Where a file comes from, and optionally its sha256."""

    model_config = ConfigDict(json_schema_extra=_cel(HTTPS_NEEDS_SHA256))

    uri: str = Field(
        min_length=1,
        max_length=2048,
        description="Location of the file: pvc://<claim>/<path> (a PersistentVolumeClaim in the model's"
        " namespace, mounted read-only into build Jobs), file:///<path> (a path already present in the"
        " runtime image or on the node), or https://<host>/<path> (downloaded by the build; needs sha256)."
        " s3:// is reserved for a later release.",
        json_schema_extra=_cel(*URI_RULES),
    )
    sha256: str | None = Field(
        None,
        max_length=64,
        pattern=SHA256_PATTERN,
        description="Lower-case hex sha256 of the file's bytes. The build refuses a file whose digest"
        " differs. Required for https://; optional otherwise (the build computes the digest).",
    )

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = uri_problem(uri)
        if problem is not None:
            raise ValueError(problem)
        return uri

    @model_validator(mode="after")
    def _check(self) -> ArtifactSource:
        if self.uri.startswith("https://") and self.sha256 is None:
            _fail(HTTPS_NEEDS_SHA256)
        return self


# --- spec.engine --------------------------------------------------------------------------------------

BATCH_ORDER = CelRule(
    rule="self.min <= self.opt && self.opt <= self.max",
    message="batch needs min <= opt <= max",
)


class BatchProfile(_Spec):
    """The engine's optimization profile on the batch axis (axis 0 of every input)."""

    model_config = ConfigDict(json_schema_extra=_cel(BATCH_ORDER))

    min: int = Field(1, ge=1, le=4096, description="Smallest batch the engine accepts.")
    opt: int = Field(16, ge=1, le=4096, description="Batch size TensorRT tunes its kernels for.")
    max: int = Field(
        32, ge=1, le=4096, description="Largest batch the engine accepts; caps serving.batching.maxBatchSize."
    )

    @model_validator(mode="after")
    def _check(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            _fail(BATCH_ORDER)
        return self


MAX_SHAPE_DIMS = 8
SHAPE_RANK = CelRule(
    rule="self.min.size() == self.opt.size() && self.opt.size() == self.max.size()",
    message="shapes: min, opt and max must list the same number of dimensions",
)
# CEL has no index loop; a literal index list bounded by maxItems gives one at a constant cost.
SHAPE_ORDER = CelRule(
    rule="self.min.size() != self.opt.size() || self.opt.size() != self.max.size() || "
    f"{list(range(MAX_SHAPE_DIMS))}.all(i, i >= self.min.size() || "
    "(self.min[i] <= self.opt[i] && self.opt[i] <= self.max[i]))",
    message="shapes: every dimension needs min <= opt <= max",
)

_Dims = Annotated[
    list[Annotated[int, Field(ge=1, le=1_048_576)]],
    Field(min_length=1, max_length=MAX_SHAPE_DIMS),
]


class ShapeRange(_Spec):
    """Range of one input's non-batch dimensions (axis 1 onwards), e.g. a sequence length."""

    model_config = ConfigDict(json_schema_extra=_cel(SHAPE_RANK, SHAPE_ORDER))

    min: _Dims = Field(description="Smallest size of each non-batch dimension, e.g. [16].")
    opt: _Dims = Field(description="Size of each non-batch dimension TensorRT tunes for, e.g. [128].")
    max: _Dims = Field(description="Largest size of each non-batch dimension, e.g. [256].")

    @model_validator(mode="after")
    def _check(self) -> ShapeRange:
        if not len(self.min) == len(self.opt) == len(self.max):
            _fail(SHAPE_RANK)
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True)):
            _fail(SHAPE_ORDER)
        return self


class AccuracyGate(_Spec):
    """What the built engine must match against the FP32 reference (ONNX Runtime, CPU) to be published."""

    max_abs_error: float | None = Field(
        None, ge=0, description="Largest absolute error allowed on any output element. Absent: not checked."
    )
    max_rel_error: float | None = Field(
        None,
        ge=0,
        description="Largest error relative to the output's largest magnitude. Absent: the precision's"
        f" default ({describe_default('max_rel_error')}).",
    )
    min_top1_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fraction of samples whose argmax matches the reference, for classifier-shaped"
        f" outputs ([batch, classes]). Absent: the precision's default ({describe_default('min_top1_agreement')}).",
    )
    samples: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Samples compared: the calibration data when given, else seeded synthetic inputs. Absent:"
        f" the precision's default ({describe_default('samples')}).",
    )
    evaluation: ArtifactSource | None = Field(
        None,
        description="Labeled evaluation data: an .npz with one array per model input (rows = samples) and"
        " `labels`, one integer class id per sample. When given, the build scores the top-1 accuracy of the"
        " engine and of the FP32 reference on every sample, and refuses the engine when it drops by more"
        " than maxAccuracyDrop. Any precision.",
    )
    max_accuracy_drop: float = Field(
        DEFAULT_MAX_ACCURACY_DROP,
        ge=0,
        le=1,
        description="Largest top-1 accuracy drop on the evaluation data (reference minus engine) an engine may"
        f" have. Absolute; {DEFAULT_MAX_ACCURACY_DROP} = 0.5 points. Used only with evaluation.",
    )
    evaluation_output: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="The output the evaluation scores. Absent: the model's only classifier-shaped output"
        " ([batch, classes]).",
    )


class TensorRTOptions(_Spec):
    """Knobs of the TensorRT builder; ignored on the ONNX Runtime path."""

    builder_optimization_level: int = Field(
        3,
        ge=0,
        le=5,
        description="TensorRT builder optimization level: higher builds slower and may run faster.",
    )
    workspace_mib: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        alias="workspaceMiB",
        description="Memory pool limit for the builder's scratch space, in MiB. Absent: TensorRT's default"
        " (the GPU's memory).",
    )


class OnnxRuntimeOptions(_Spec):
    """Knobs of the ONNX Runtime path; ignored on the TensorRT path."""

    quantization: Literal["dynamic", "static", "qdq"] = Field(
        "dynamic",
        description="How precision int8 quantizes on the ONNX Runtime path: dynamic (int8 weights,"
        " activation ranges at run time; best for MatMul-heavy models on CPU, needs no data), static"
        " (QDQ u8u8, calibrated on the calibration data, which it then requires) or qdq (the symmetric Q/DQ"
        " model the TensorRT path compiles, served as it is; needs calibration data).",
    )


MAX_ARCHITECTURES = 16
FP8_ARCHITECTURES = CelRule(
    rule="self.precision != 'fp8' || (has(self.architectures) && self.architectures.size() > 0 && "
    f"self.architectures.all(a, a.matches('{ARCHITECTURE_PATTERN}') && "
    f"int(a.substring(2)) >= {FP8_MIN_ARCHITECTURE}))",
    message=f"precision fp8 needs architectures pinned to sm{FP8_MIN_ARCHITECTURE} or newer, e.g. [sm89, sm90]",
    field_path=".architectures",
)
FP8_BACKEND = CelRule(
    rule="self.precision != 'fp8' || self.backend != 'onnxruntime'",
    message="precision fp8 needs backend tensorrt or auto; backend onnxruntime cannot build fp8",
    field_path=".precision",
)
STATIC_NEEDS_CALIBRATION = CelRule(
    rule=f"!(self.onnxruntime.quantization in ['static', 'qdq']) || {_set('self.calibration')}",
    message="onnxruntime.quantization static and qdq need calibration data (engine.calibration)",
    field_path=".calibration",
    reason="FieldValueRequired",
)
CALIBRATION_INT8 = CelRule(
    rule=f"{_unset('self.calibration')} || self.precision in ['int8', 'fp8']",
    message="calibration is used only with precision int8 or fp8",
    field_path=".calibration",
    reason="FieldValueForbidden",
)


_Architecture = Annotated[str, StringConstraints(pattern=ARCHITECTURE_PATTERN, max_length=5)]


def _architecture_number(name: str) -> int:
    return int(name[2:]) if re.search(ARCHITECTURE_PATTERN, name) else -1


class EngineSpec(_Spec):
    """How to build the engine: one per GPU architecture, cached by content."""

    model_config = ConfigDict(
        json_schema_extra=_cel(FP8_ARCHITECTURES, FP8_BACKEND, CALIBRATION_INT8, STATIC_NEEDS_CALIBRATION)
    )

    backend: Literal["auto", "tensorrt", "onnxruntime"] = Field(
        "auto",
        description="Engine backend: tensorrt, onnxruntime, or auto (TensorRT where the build finds a GPU"
        " and TensorRT, ONNX Runtime otherwise).",
    )
    precision: Literal["fp32", "fp16", "int8", "fp8"] = Field(
        "fp16",
        description="Numeric precision of the engine, put into the model once before any architecture's"
        " build (fp16 weights, or Q/DQ nodes) and compiled as a strongly typed TensorRT network. fp16"
        " (default) runs on the tensor cores of every supported GPU; int8 and fp8 use calibration data or a"
        " Q/DQ model; fp8 needs sm89 or newer. The accuracy gate checks the result; CPU artifacts stay fp32"
        " for fp16 and the effective precision is reported in status.",
    )
    batch: BatchProfile = _nested(BatchProfile, "Optimization profile on the batch axis: min <= opt <= max.")
    shapes: dict[str, ShapeRange] = Field(
        default_factory=dict,
        max_length=32,
        description="Ranges of the other dynamic axes, per input name, non-batch dimensions only, e.g."
        " {input_ids: {min: [16], opt: [128], max: [256]}}. Absent: every non-batch axis must be static.",
    )
    calibration: ArtifactSource | None = Field(
        None,
        description="Calibration data for the Q/DQ ranges: an .npz with one array per model input,"
        " [samples, ...]. Only with precision int8 or fp8; models with Q/DQ nodes need none.",
    )
    accuracy: AccuracyGate = _nested(
        AccuracyGate, "Accuracy gate: an engine that misses it fails its build and is never served."
    )
    architectures: list[_Architecture] = Field(
        default_factory=list,
        max_length=MAX_ARCHITECTURES,
        description="GPU architectures to build for and serve on, e.g. [sm80, sm90]. Empty or absent (auto):"
        " every architecture the eligible nodes have (GPU Feature Discovery labels).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    tensorrt: TensorRTOptions = _nested(TensorRTOptions, "TensorRT builder knobs.")
    onnxruntime: OnnxRuntimeOptions = _nested(OnnxRuntimeOptions, "ONNX Runtime build knobs.")

    @model_validator(mode="after")
    def _check(self) -> EngineSpec:
        if len(set(self.architectures)) != len(self.architectures):
            raise ValueError("architectures must not repeat an entry")
        if self.precision == "fp8" and (
            not self.architectures or any(_architecture_number(a) < FP8_MIN_ARCHITECTURE for a in self.architectures)
        ):
            _fail(FP8_ARCHITECTURES)
        if self.precision == "fp8" and self.backend == "onnxruntime":
            _fail(FP8_BACKEND)
        if self.calibration is not None and self.precision not in ("int8", "fp8"):
            _fail(CALIBRATION_INT8)
        if self.onnxruntime.quantization in ("static", "qdq") and self.calibration is None:
            _fail(STATIC_NEEDS_CALIBRATION)
        return self


# --- spec.serving ---------------------------------------------------------------------------------------

Quantity = Annotated[
    Annotated[int, Field(ge=0)] | Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


class ServingResources(_Spec):
    """Resources of each serving pod."""

    gpu: int = Field(1, ge=0, le=16, description="GPUs per pod (nvidia.com/gpu); 0 serves on CPU with ONNX Runtime.")
    cpu: Quantity = Field("2", description="CPU request per pod, a Kubernetes quantity such as 2 or 500m.")
    memory: Quantity = Field("8Gi", description="Memory request and limit per pod, a Kubernetes quantity such as 8Gi.")


PREFERRED_LE_MAX = CelRule(
    rule=f"{_unset('self.maxBatchSize')} || !has(self.preferredBatchSizes) || "
    "self.preferredBatchSizes.all(b, b <= self.maxBatchSize)",
    message="every preferredBatchSizes entry must be <= maxBatchSize",
    field_path=".preferredBatchSizes",
)
MAX_PREFERRED = 16


class Batching(_Spec):
    """Dynamic batching of each serving pod, with Triton's names and meaning."""

    model_config = ConfigDict(json_schema_extra=_cel(PREFERRED_LE_MAX))

    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Largest batch formed from queued requests. Absent: engine.batch.max.",
    )
    preferred_batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=list,
        max_length=MAX_PREFERRED,
        description="Batch sizes dispatched as soon as they form, without waiting for the queue delay.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    max_queue_delay_microseconds: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="Longest a request waits for others to join its batch, in microseconds. Absent: adaptive"
        " batching chooses the delay online; with adaptive: true, the most it may choose.",
    )
    adaptive: bool | None = Field(
        None,
        description="Choose the queue delay and a batch-size limit online, from measured batch compute times and"
        " the arrival rate, to keep p99 within the autoscaling p99 target (100 ms without one) while maximising"
        " throughput. Absent: adaptive when maxQueueDelayMicroseconds is absent.",
    )
    max_queue_size: int = Field(
        1024, ge=1, le=1_000_000, description="Requests queued at most; beyond it requests get 503 at once."
    )
    default_timeout_microseconds: int = Field(
        0,
        ge=0,
        le=3_600_000_000,
        description="Requests queued longer than this are rejected, never run late; 0 means no timeout.",
    )

    @property
    def is_adaptive(self) -> bool:
        return self.adaptive if self.adaptive is not None else self.max_queue_delay_microseconds is None

    @model_validator(mode="after")
    def _check(self) -> Batching:
        if len(set(self.preferred_batch_sizes)) != len(self.preferred_batch_sizes):
            raise ValueError("preferredBatchSizes must not repeat an entry")
        if self.max_batch_size is not None and any(b > self.max_batch_size for b in self.preferred_batch_sizes):
            _fail(PREFERRED_LE_MAX)
        return self


TOLERATION_EXISTS = CelRule(
    rule="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
    message="toleration value must be empty when operator is Exists",
    field_path=".value",
)
TOLERATION_KEY = CelRule(
    rule="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
    message="toleration with an empty key needs operator Exists",
    field_path=".operator",
)
TOLERATION_SECONDS = CelRule(
    rule=f"{_unset('self.tolerationSeconds')} || (has(self.effect) && self.effect == 'NoExecute')",
    message="toleration tolerationSeconds is allowed only with effect NoExecute",
    field_path=".tolerationSeconds",
)


class Toleration(_Spec):
    """A Kubernetes toleration (core/v1 Toleration)."""

    model_config = ConfigDict(json_schema_extra=_cel(TOLERATION_EXISTS, TOLERATION_KEY, TOLERATION_SECONDS))

    key: str = Field(
        "",
        max_length=317,
        description="Taint key to tolerate; empty with operator Exists matches every taint.",
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists (any value) or Equal (value must match).")
    value: str = Field("", max_length=63, description="Taint value to match with operator Equal.")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "", description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, description="With effect NoExecute: how long the pod stays bound after the taint appears."
    )

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            _fail(TOLERATION_EXISTS)
        if not self.key and self.operator != "Exists":
            _fail(TOLERATION_KEY)
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            _fail(TOLERATION_SECONDS)
        return self


class Placement(_Spec):
    """Where serving and build pods may run, besides the per-architecture node selector the operator adds."""

    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, max_length=64, description="Extra node labels every pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations for tainted (e.g. GPU) nodes."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A core/v1 Affinity, passed to pods as given (node, pod and anti-affinity).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class ResponseCache(_Spec):
    """Each serving pod's response cache, with Triton's semantics: a request identical to an earlier successful
    one (same engine, input tensors and requested outputs) is answered from memory without being computed."""

    enabled: bool = Field(False, description="Cache responses in each serving pod (off by default).")
    max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        le=1 << 40,
        description="Bytes of responses each pod keeps (least recently used evicted first); counts against the"
        " pod's memory limit. A response above an eighth of this is never stored.",
    )


class ServingSpec(_Spec):
    """How the engines are served: one Deployment per architecture, one Service over all."""

    image: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Runtime image for serving and build pods. Absent: the operator's default runtime"
        " image. Engines are built by the image that serves them, so a new image means new builds.",
    )
    resources: ServingResources = _nested(ServingResources, "Resources of each serving pod.")
    batching: Batching = _nested(Batching, "Dynamic batching in each serving pod (Triton's knobs).")
    response_cache: ResponseCache = _nested(ResponseCache, "The response cache of each serving pod (opt-in).")
    placement: Placement = _nested(Placement, "Node selector, tolerations and affinity of serving and build pods.")


# --- spec.autoscaling -----------------------------------------------------------------------------------


class ScalingPolicy(_Spec):
    """One rate limit on scaling, as in the HPA: at most `value` pods or percent per `periodSeconds`."""

    type: Literal["Pods", "Percent"] = Field(description="Pods (an absolute count) or Percent (of current replicas).")
    value: int = Field(ge=1, le=10_000, description="Pods or percent allowed to change within one period.")
    period_seconds: int = Field(15, ge=1, le=1800, description="Length of the period the limit applies to.")


class ScalingRules(_Spec):
    """Scaling rules for one direction, as in the HPA (autoscaling/v2 HPAScalingRules)."""

    stabilization_window_seconds: int | None = Field(
        None,
        ge=0,
        le=3600,
        description="Recommendations within this window are weighed; the safest wins. Absent: 0 up, 300 down.",
    )
    policies: list[ScalingPolicy] | None = Field(
        None,
        min_length=1,
        max_length=10,
        description="Rate limits. Absent: up max(+100%, +4 pods) per 15 s; down -100% per 15 s.",
    )
    select_policy: Literal["Max", "Min", "Disabled"] | None = Field(
        None, description="Which policy wins: Max (default), Min, or Disabled (no scaling in this direction)."
    )


class ScalingBehavior(_Spec):
    """How fast replicas change, as in the HPA's behavior field."""

    scale_up: ScalingRules | None = Field(None, description="Rules for scaling up.")
    scale_down: ScalingRules | None = Field(None, description="Rules for scaling down.")


AUTOSCALING_BOUNDS = CelRule(
    rule="self.minReplicas <= self.maxReplicas",
    message="autoscaling needs minReplicas <= maxReplicas",
    field_path=".minReplicas",
)
AUTOSCALING_TARGET = CelRule(
    rule=f"{_set('self.targetQPSPerReplica')} || {_set('self.targetP99LatencyMilliseconds')}",
    message="autoscaling needs targetQPSPerReplica or targetP99LatencyMilliseconds (or both)",
    reason="FieldValueRequired",
)


class AutoscalingSpec(_Spec):
    """Replicas follow load: the larger of the QPS and p99 proposals wins, with HPA arithmetic."""

    model_config = ConfigDict(json_schema_extra=_cel(AUTOSCALING_BOUNDS, AUTOSCALING_TARGET))

    min_replicas: int = Field(
        1,
        ge=1,
        le=1000,
        description="Fewest replicas over all architectures. At least 1: QPS and latency are measured on"
        " running pods, and a GPU engine takes long to load.",
    )
    max_replicas: int = Field(
        ge=1,
        le=1000,
        description="Most replicas over all architectures: the cost ceiling, so it has no default.",
    )
    target_qps_per_replica: float | None = Field(
        None,
        gt=0,
        le=1_000_000,
        alias="targetQPSPerReplica",
        description="Requests per second each replica should serve.",
    )
    target_p99_latency_milliseconds: float | None = Field(
        None, gt=0, le=600_000, description="p99 request latency to stay under, in milliseconds."
    )
    behavior: ScalingBehavior = _nested(ScalingBehavior, "Stabilization windows and rate limits, as in the HPA.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            _fail(AUTOSCALING_BOUNDS)
        if self.target_qps_per_replica is None and self.target_p99_latency_milliseconds is None:
            _fail(AUTOSCALING_TARGET)
        return self


# --- spec -----------------------------------------------------------------------------------------------

MAX_BATCH_LE_ENGINE = CelRule(
    rule=f"{_unset('self.serving.batching.maxBatchSize')} || "
    "self.serving.batching.maxBatchSize <= self.engine.batch.max",
    message="serving.batching.maxBatchSize must be <= engine.batch.max (the engine runs no larger batch)",
    field_path=".serving.batching.maxBatchSize",
)
PREFERRED_LE_ENGINE = CelRule(
    rule="!has(self.serving.batching.preferredBatchSizes) || "
    "self.serving.batching.preferredBatchSizes.all(b, b <= self.engine.batch.max)",
    message="every serving.batching.preferredBatchSizes entry must be <= engine.batch.max",
    field_path=".serving.batching.preferredBatchSizes",
)
TENSORRT_NEEDS_GPU = CelRule(
    rule="self.engine.backend != 'tensorrt' || self.serving.resources.gpu >= 1",
    message="engine.backend tensorrt needs serving.resources.gpu >= 1",
    field_path=".serving.resources.gpu",
)
ARCHITECTURES_NEED_GPU = CelRule(
    rule="!has(self.engine.architectures) || self.engine.architectures.size() == 0 || self.serving.resources.gpu >= 1",
    message="engine.architectures pins GPU architectures, so serving.resources.gpu must be >= 1",
    field_path=".serving.resources.gpu",
)


class InferenceModelSpec(_Spec):
    """The desired state of an InferenceModel: a model, how to build its engines, and how to serve them."""

    model_config = ConfigDict(
        json_schema_extra=_cel(MAX_BATCH_LE_ENGINE, PREFERRED_LE_ENGINE, TENSORRT_NEEDS_GPU, ARCHITECTURES_NEED_GPU)
    )

    model: ArtifactSource = Field(description="The ONNX model to build engines from.")
    engine: EngineSpec = _nested(EngineSpec, "How engines are built: backend, precision, profiles, gate.")
    serving: ServingSpec = _nested(ServingSpec, "How engines are served: image, resources, batching, placement.")
    replicas: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="Serving replicas over all architectures when autoscaling is absent (absent: 1);"
        " `kubectl scale` writes it. Ignored while autoscaling is set, so Git and the autoscaler never"
        " fight.",
    )
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale replicas on QPS and p99 latency. Absent: spec.replicas rules."
    )

    @model_validator(mode="after")
    def _check(self) -> InferenceModelSpec:
        batching, engine_max = self.serving.batching, self.engine.batch.max
        if batching.max_batch_size is not None and batching.max_batch_size > engine_max:
            _fail(MAX_BATCH_LE_ENGINE)
        if any(b > engine_max for b in batching.preferred_batch_sizes):
            _fail(PREFERRED_LE_ENGINE)
        if self.engine.backend == "tensorrt" and self.serving.resources.gpu < 1:
            _fail(TENSORRT_NEEDS_GPU)
        if self.engine.architectures and self.serving.resources.gpu < 1:
            _fail(ARCHITECTURES_NEED_GPU)
        return self


# --- status ---------------------------------------------------------------------------------------------


class Condition(_Status):
    """A metav1.Condition: Ready, Reconciling, Stalled, Serving, EnginesReady (see modelfleet_operator.conditions)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this condition reflects.")
    last_transition_time: datetime = Field(description="When status last changed.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details.")


class EvaluationFigures(_Status):
    """Top-1 accuracy on the labeled evaluation data (spec.engine.accuracy.evaluation)."""

    samples: int | None = Field(None, description="Labeled samples scored.")
    reference_accuracy: float | None = Field(None, description="Top-1 accuracy of the FP32 reference.")
    accuracy: float | None = Field(None, description="Top-1 accuracy of the engine.")
    accuracy_drop: float | None = Field(None, description="referenceAccuracy - accuracy (absolute; 0.01 = 1 point).")
    max_accuracy_drop: float | None = Field(None, description="The limit the build applied.")
    output: str | None = Field(None, description="The classifier output scored.")


class EngineAccuracy(_Status):
    """Accuracy figures a build measured against the FP32 reference."""

    max_abs_error: float | None = Field(None, description="Largest absolute error over the samples.")
    max_rel_error: float | None = Field(None, description="Largest error relative to the output's scale.")
    top1_agreement: float | None = Field(None, description="Fraction of samples with the reference's argmax.")
    evaluation: EvaluationFigures | None = Field(None, description="Top-1 accuracy on the labeled evaluation data.")


class EngineStatus(_Status):
    """The engine of one architecture."""

    architecture: str = Field(description="GPU architecture, e.g. sm90, or cpu.")
    key: str = Field("", description="Content-addressed cache key of the engine in the engine store.")
    build_id: str = Field("", description="Identifies the build inputs (model, options, image) the build Job ran for.")
    phase: Literal["Pending", "Building", "Ready", "Failed"] = Field("Pending", description="Build phase.")
    job: str | None = Field(None, description="Name of the build Job.")
    backend: str | None = Field(None, description="Backend that built the engine: tensorrt or onnxruntime.")
    backend_version: str | None = Field(None, description="Version of TensorRT or ONNX Runtime that built it.")
    precision: str | None = Field(None, description="Effective precision of the engine.")
    accuracy: EngineAccuracy | None = Field(None, description="Measured accuracy against the FP32 reference.")
    build_seconds: float | None = Field(None, description="Build duration in seconds.")
    reason: str = Field("", description="CamelCase reason of the phase, e.g. AccuracyGateFailed.")
    message: str = Field("", description="Details, e.g. why the build failed.")


class ArchitectureStatus(_Status):
    """Serving on one architecture."""

    name: str = Field(description="GPU architecture, e.g. sm90, or cpu.")
    nodes: int = Field(0, description="Eligible nodes with this architecture.")
    replicas: int = Field(0, description="Desired replicas on this architecture.")
    ready_replicas: int = Field(0, description="Ready replicas on this architecture.")
    deployment: str | None = Field(None, description="Name of the serving Deployment.")


class AutoscalerStatus(_Status):
    """The autoscaler's last decision and its inputs."""

    qps: float | None = Field(None, description="Measured requests per second over all replicas.")
    p99_milliseconds: float | None = Field(None, description="Measured p99 request latency in milliseconds.")
    desired_replicas: int | None = Field(None, description="Replicas the autoscaler asked for.")
    current_replicas: int | None = Field(None, description="Replicas when it decided.")
    last_scale_time: datetime | None = Field(None, description="When replicas last changed.")
    reason: str = Field("", description="Why it decided so: the signals, proposals and the limit that applied.")


class InferenceModelStatus(_Status):
    """The observed state, written by the operator only."""

    observed_generation: int = Field(
        0, ge=0, description="metadata.generation the status reflects; 0 until the operator has reconciled it."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="kstatus conventions, each with observedGeneration: Ready (the current generation serves"
        " everywhere it should), Reconciling (building or rolling it out), Stalled (it cannot go live without a"
        " change), Serving (some version answers; the reason says whether it is the previous one), EnginesReady.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    engines: list[EngineStatus] = Field(
        default_factory=list,
        description="One engine per architecture.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["architecture"]},
    )
    engine_summary: str | None = Field(None, description="Ready engines over all engines, e.g. 2/3.")
    architectures: list[ArchitectureStatus] = Field(
        default_factory=list,
        description="Serving per architecture.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    replicas: int | None = Field(None, description="Serving replicas over all architectures (the scale subresource).")
    ready_replicas: int | None = Field(None, description="Ready serving replicas over all architectures.")
    selector: str | None = Field(None, description="Label selector of the serving pods (the scale subresource).")
    autoscaler: AutoscalerStatus | None = Field(None, description="The autoscaler's last decision.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


# --- the object ---------------------------------------------------------------------------------------

NAME_RULE = CelRule(
    rule=f"!has(self.metadata.name) || self.metadata.name.matches('{NAME_PATTERN}')",
    message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters of a-z, 0-9 and '-', start with a"
    " letter and end with a letter or digit (it names Jobs, Deployments and a Service)",
)


class InferenceModel(BaseModel):
    """A model served on GPUs: engines are built per architecture, served, and scaled on QPS and latency."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", json_schema_extra=_cel(NAME_RULE)
    )

    api_version: Literal["modelfleet.io/v1alpha1"] = Field("modelfleet.io/v1alpha1", description="API version.")
    kind: Literal["InferenceModel"] = Field("InferenceModel", description="Kind.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: InferenceModelSpec = Field(description="Desired state.")
    status: InferenceModelStatus = Field(default_factory=InferenceModelStatus, description="Observed state.")

    @model_validator(mode="after")
    def _check(self) -> InferenceModel:
        name = self.metadata.get("name")
        if isinstance(name, str) and not re.search(NAME_PATTERN, name):
            _fail(NAME_RULE)
        return self


class InvalidInferenceModelError(ValueError):
    """An object that does not match the API; `problems` name each offending field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One `field.path: message` line per error, with the API's camelCase field names."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"]) or "object"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return lines


def parse_inference_model(obj: Mapping[str, Any]) -> InferenceModel:
    """Validate an InferenceModel as read from the API server (or a manifest) with these models.

    Raises InvalidInferenceModelError naming each offending field.
    """
    try:
        return InferenceModel.model_validate(dict(obj))
    except ValidationError as exc:
        raise InvalidInferenceModelError(describe_validation_error(exc)) from exc


def dump_spec(spec: InferenceModelSpec) -> dict[str, Any]:
    """The spec as camelCase JSON, leaving out unset optional fields (the inverse of parsing)."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def dump_status(status: InferenceModelStatus) -> dict[str, Any]:
    """The status as camelCase JSON for a status patch, leaving out what is unknown (None)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
