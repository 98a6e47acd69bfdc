"""The InferenceModel models: parsing, defaults, examples, and the invalid manifests they refuse.

INVALID_MANIFESTS is shared with tests/e2e/test_api_cluster.py, which sends each one to the API server:
every manifest here must be refused by both the CRD (CEL and schema) and the pydantic models.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from modelfleet_operator import api, crdgen
from modelfleet_runtime.build.options import DEFAULT_GATES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SHA = "6fd5d72fe4589f189f8ebc006442dbb529bb7ce38f8082112682524616046452"

# A valid manifest that uses most fields; each invalid case changes it in one place.
BASE: dict[str, Any] = {
    "apiVersion": "modelfleet.io/v1alpha1",
    "kind": "InferenceModel",
    "metadata": {"name": "base"},
    "spec": {
        "model": {"uri": "pvc://models/minilm/model.onnx"},
        "engine": {
            "backend": "tensorrt",
            "precision": "fp16",
            "batch": {"min": 1, "opt": 16, "max": 32},
            "shapes": {"input_ids": {"min": [8], "opt": [128], "max": [256]}},
            "accuracy": {"maxRelError": 0.01, "minTop1Agreement": 0.99, "samples": 64},
            "architectures": ["sm80", "sm90"],
            "tensorrt": {"builderOptimizationLevel": 3},
        },
        "serving": {
            "resources": {"gpu": 1, "cpu": "4", "memory": "16Gi"},
            "batching": {
                "maxBatchSize": 32,
                "preferredBatchSizes": [16, 32],
                "maxQueueDelayMicroseconds": 1000,
                "maxQueueSize": 256,
                "defaultTimeoutMicroseconds": 0,
            },
            "placement": {
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 8,
            "targetQPSPerReplica": 100.0,
            "targetP99LatencyMilliseconds": 50.0,
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}],
                },
                "scaleDown": {"stabilizationWindowSeconds": 300},
            },
        },
    },
}

DELETE = object()


@dataclass(frozen=True)
class Invalid:
    """One invalid manifest: BASE with `changes` (dotted path -> value, DELETE removes it)."""

    id: str
    changes: dict[str, Any]
    path: str  # the field the API server names, as it prints it
    server: str = ""  # a substring of the API server's message (the rule's message for CEL cases)
    rule: api.CelRule | None = None
    model: str = ""  # what the pydantic error must say, when neither the rule nor the path fits

    @property
    def server_message(self) -> str:
        return self.rule.message if self.rule is not None else self.server

    def manifest(self, name: str | None = None) -> dict[str, Any]:
        obj = copy.deepcopy(BASE)
        if name is not None:
            obj["metadata"]["name"] = name
        for dotted, value in self.changes.items():
            *parents, leaf = (int(p) if p.isdigit() else p for p in dotted.split("."))
            node: Any = obj
            for part in parents:
                node = node[part]
            if value is DELETE:
                del node[leaf]
            else:
                node[leaf] = value
        return obj


INT = "must be of type integer"
GE = "should be greater than or equal to"
LE = "should be less than or equal to"
HTTPS = "https://models.example.com/minilm/model.onnx"

INVALID_MANIFESTS: list[Invalid] = [
    # wrong types
    Invalid("replicas-not-integer", {"spec.replicas": "three"}, "spec.replicas", INT),
    Invalid("batch-max-not-integer", {"spec.engine.batch.max": "32"}, "spec.engine.batch.max", INT),
    Invalid("gpu-fractional", {"spec.serving.resources.gpu": 1.5}, "spec.serving.resources.gpu", INT),
    Invalid(
        "architectures-not-a-list",
        {"spec.engine.architectures": "sm80"},
        "spec.engine.architectures",
        "must be of type array",
    ),
    Invalid(
        "qps-target-not-a-number",
        {"spec.autoscaling.targetQPSPerReplica": "fast"},
        "spec.autoscaling.targetQPSPerReplica",
        "must be of type number",
    ),
    Invalid(
        "memory-not-a-quantity",
        {"spec.serving.resources.memory": "lots"},
        "spec.serving.resources.memory",
        "should match",
    ),
    # out-of-range numbers
    Invalid("replicas-negative", {"spec.replicas": -1}, "spec.replicas", f"{GE} 0"),
    Invalid("batch-min-zero", {"spec.engine.batch.min": 0}, "spec.engine.batch.min", f"{GE} 1"),
    Invalid(
        "optimization-level-above-5",
        {"spec.engine.tensorrt.builderOptimizationLevel": 9},
        "spec.engine.tensorrt.builderOptimizationLevel",
        f"{LE} 5",
    ),
    Invalid(
        "top1-agreement-above-1",
        {"spec.engine.accuracy.minTop1Agreement": 1.5},
        "spec.engine.accuracy.minTop1Agreement",
        f"{LE} 1",
    ),
    Invalid(
        "max-accuracy-drop-above-1",
        {"spec.engine.accuracy.maxAccuracyDrop": 2},
        "spec.engine.accuracy.maxAccuracyDrop",
        f"{LE} 1",
    ),
    Invalid(
        "evaluation-https-without-sha256",
        {"spec.engine.accuracy.evaluation": {"uri": "https://data.example.com/digits/eval.npz"}},
        "spec.engine.accuracy.evaluation.sha256",
        rule=api.HTTPS_NEEDS_SHA256,
    ),
    Invalid(
        "p99-target-zero",
        {"spec.autoscaling.targetP99LatencyMilliseconds": 0},
        "spec.autoscaling.targetP99LatencyMilliseconds",
        "should be greater than 0",
    ),
    Invalid("min-replicas-zero", {"spec.autoscaling.minReplicas": 0}, "spec.autoscaling.minReplicas", f"{GE} 1"),
    Invalid("gpu-above-16", {"spec.serving.resources.gpu": 17}, "spec.serving.resources.gpu", f"{LE} 16"),
    Invalid(
        "too-many-architectures",
        {"spec.engine.architectures": [f"sm{n}" for n in range(70, 87)]},
        "spec.engine.architectures",
        "must have at most 16 items",
    ),
    # unknown enum values
    Invalid(
        "precision-unknown",
        {"spec.engine.precision": "fp4"},
        "spec.engine.precision",
        'Unsupported value: "fp4"',
    ),
    Invalid(
        "backend-unknown",
        {"spec.engine.backend": "tensorflow"},
        "spec.engine.backend",
        'Unsupported value: "tensorflow"',
    ),
    Invalid(
        "policy-type-unknown",
        {"spec.autoscaling.behavior.scaleUp.policies.0.type": "Replicas"},
        "spec.autoscaling.behavior.scaleUp.policies[0].type",
        'Unsupported value: "Replicas"',
    ),
    Invalid(
        "select-policy-unknown",
        {"spec.autoscaling.behavior.scaleDown.selectPolicy": "Fastest"},
        "spec.autoscaling.behavior.scaleDown.selectPolicy",
        'Unsupported value: "Fastest"',
    ),
    Invalid(
        "toleration-effect-unknown",
        {"spec.serving.placement.tolerations.0.effect": "NoRun"},
        "spec.serving.placement.tolerations[0].effect",
        'Unsupported value: "NoRun"',
    ),
    Invalid(
        "architecture-malformed",
        {"spec.engine.architectures": ["a100"]},
        "spec.engine.architectures[0]",
        "should match",
    ),
    # broken cross-field rules (CEL)
    Invalid("batch-min-above-opt", {"spec.engine.batch.min": 20}, "spec.engine.batch", rule=api.BATCH_ORDER),
    Invalid(
        "shape-rank-mismatch",
        {"spec.engine.shapes.input_ids.opt": [128, 4]},
        "spec.engine.shapes[input_ids]",
        rule=api.SHAPE_RANK,
    ),
    Invalid(
        "shape-min-above-opt",
        {"spec.engine.shapes.input_ids.min": [512]},
        "spec.engine.shapes[input_ids]",
        rule=api.SHAPE_ORDER,
    ),
    Invalid(
        "autoscaling-min-above-max",
        {"spec.autoscaling.minReplicas": 9},
        "spec.autoscaling.minReplicas",
        rule=api.AUTOSCALING_BOUNDS,
    ),
    Invalid(
        "autoscaling-without-target",
        {
            "spec.autoscaling.targetQPSPerReplica": DELETE,
            "spec.autoscaling.targetP99LatencyMilliseconds": DELETE,
        },
        "spec.autoscaling",
        rule=api.AUTOSCALING_TARGET,
    ),
    Invalid(
        "fp8-without-architectures",
        {"spec.engine.precision": "fp8", "spec.engine.architectures": DELETE},
        "spec.engine.architectures",
        rule=api.FP8_ARCHITECTURES,
    ),
    Invalid(
        "fp8-on-sm80",
        {"spec.engine.precision": "fp8"},
        "spec.engine.architectures",
        rule=api.FP8_ARCHITECTURES,
    ),
    Invalid(
        "fp8-on-onnxruntime",
        {
            "spec.engine.precision": "fp8",
            "spec.engine.backend": "onnxruntime",
            "spec.engine.architectures": ["sm90"],
        },
        "spec.engine.precision",
        rule=api.FP8_BACKEND,
    ),
    Invalid("https-without-sha256", {"spec.model.uri": HTTPS}, "spec.model.sha256", rule=api.HTTPS_NEEDS_SHA256),
    Invalid(
        "https-with-null-sha256",
        {"spec.model.uri": HTTPS, "spec.model.sha256": None},
        "spec.model.sha256",
        rule=api.HTTPS_NEEDS_SHA256,
    ),
    Invalid(
        "calibration-without-int8",
        {"spec.engine.calibration": {"uri": "pvc://models/minilm/calib.npz"}},
        "spec.engine.calibration",
        rule=api.CALIBRATION_INT8,
    ),
    Invalid(
        "static-quantization-without-calibration",
        {"spec.engine.precision": "int8", "spec.engine.onnxruntime": {"quantization": "static"}},
        "spec.engine.calibration",
        rule=api.STATIC_NEEDS_CALIBRATION,
    ),
    Invalid(
        "quantization-unknown",
        {"spec.engine.onnxruntime": {"quantization": "qat"}},
        "spec.engine.onnxruntime.quantization",
        'Unsupported value: "qat"',
    ),
    Invalid(
        "preferred-above-max-batch",
        {"spec.serving.batching.maxBatchSize": 16},
        "spec.serving.batching.preferredBatchSizes",
        rule=api.PREFERRED_LE_MAX,
    ),
    Invalid(
        "max-batch-above-engine",
        {"spec.serving.batching.maxBatchSize": 64, "spec.serving.batching.preferredBatchSizes": [16]},
        "spec.serving.batching.maxBatchSize",
        rule=api.MAX_BATCH_LE_ENGINE,
    ),
    Invalid(
        "preferred-above-engine",
        {"spec.serving.batching.maxBatchSize": DELETE, "spec.serving.batching.preferredBatchSizes": [16, 64]},
        "spec.serving.batching.preferredBatchSizes",
        rule=api.PREFERRED_LE_ENGINE,
    ),
    Invalid(
        "tensorrt-without-gpu",
        {"spec.serving.resources.gpu": 0, "spec.engine.architectures": DELETE},
        "spec.serving.resources.gpu",
        rule=api.TENSORRT_NEEDS_GPU,
    ),
    Invalid(
        "architectures-without-gpu",
        {"spec.serving.resources.gpu": 0, "spec.engine.backend": "auto"},
        "spec.serving.resources.gpu",
        rule=api.ARCHITECTURES_NEED_GPU,
    ),
    Invalid(
        "toleration-exists-with-value",
        {"spec.serving.placement.tolerations.0.value": "present"},
        "spec.serving.placement.tolerations[0].value",
        rule=api.TOLERATION_EXISTS,
    ),
    Invalid(
        "toleration-empty-key-equal",
        {"spec.serving.placement.tolerations": [{"operator": "Equal", "value": "x"}]},
        "spec.serving.placement.tolerations[0].operator",
        rule=api.TOLERATION_KEY,
    ),
    Invalid(
        "toleration-seconds-without-noexecute",
        {"spec.serving.placement.tolerations.0.tolerationSeconds": 30},
        "spec.serving.placement.tolerations[0].tolerationSeconds",
        rule=api.TOLERATION_SECONDS,
    ),
    Invalid("name-starts-with-digit", {"metadata.name": "9-lives"}, "metadata.name", rule=api.NAME_RULE),
    Invalid("name-too-long", {"metadata.name": "a" * 41}, "metadata.name", rule=api.NAME_RULE),
    Invalid(
        "duplicate-architecture",
        {"spec.engine.architectures": ["sm80", "sm80"]},
        "spec.engine.architectures[1]",
        'Duplicate value: "sm80"',
        model="architectures must not repeat",
    ),
    # unknown fields (strict field validation)
    Invalid("unknown-engine-field", {"spec.engine.precison": "fp16"}, "spec.engine.precison", "unknown field"),
    Invalid("unknown-model-field", {"spec.model.checksum": SHA}, "spec.model.checksum", "unknown field"),
    Invalid("unknown-spec-field", {"spec.replica": 3}, "spec.replica", "unknown field"),
    # missing required fields
    Invalid("spec-missing", {"spec": DELETE}, "spec", "Required value"),
    Invalid("model-missing", {"spec.model": DELETE}, "spec.model", "Required value"),
    Invalid("uri-missing", {"spec.model.uri": DELETE}, "spec.model.uri", "Required value"),
    Invalid(
        "max-replicas-missing",
        {"spec.autoscaling.maxReplicas": DELETE},
        "spec.autoscaling.maxReplicas",
        "Required value",
    ),
    Invalid(
        "policy-value-missing",
        {"spec.autoscaling.behavior.scaleUp.policies.0.value": DELETE},
        "spec.autoscaling.behavior.scaleUp.policies[0].value",
        "Required value",
    ),
    # malformed URIs and digests
    Invalid(
        "uri-unknown-scheme",
        {"spec.model.uri": "ftp://models.example.com/minilm.onnx"},
        "spec.model.uri",
        rule=api.URI_SCHEME,
    ),
    Invalid(
        "uri-s3-reserved",
        {"spec.model.uri": "s3://models/minilm/model.onnx"},
        "spec.model.uri",
        rule=api.URI_S3,
    ),
    Invalid("uri-pvc-without-path", {"spec.model.uri": "pvc://models"}, "spec.model.uri", rule=api.URI_PVC),
    Invalid(
        "uri-pvc-bad-claim",
        {"spec.model.uri": "pvc://Models_A/model.onnx"},
        "spec.model.uri",
        rule=api.URI_PVC,
    ),
    Invalid("uri-file-without-path", {"spec.model.uri": "file:///"}, "spec.model.uri", rule=api.URI_FILE),
    Invalid(
        "uri-https-with-credentials",
        {"spec.model.uri": "https://user:secret@models.example.com/m.onnx", "spec.model.sha256": SHA},
        "spec.model.uri",
        rule=api.URI_HTTPS,
    ),
    Invalid(
        "uri-https-without-path",
        {"spec.model.uri": "https://models.example.com/", "spec.model.sha256": SHA},
        "spec.model.uri",
        rule=api.URI_HTTPS,
    ),
    Invalid(
        "uri-with-space",
        {"spec.model.uri": "pvc://models/my model.onnx"},
        "spec.model.uri",
        rule=api.URI_SPACE,
    ),
    Invalid("sha256-upper-case", {"spec.model.sha256": SHA.upper()}, "spec.model.sha256", "should match"),
    Invalid("sha256-too-short", {"spec.model.sha256": SHA[:40]}, "spec.model.sha256", "should match"),
    Invalid(
        "calibration-uri-s3",
        {"spec.engine.precision": "int8", "spec.engine.calibration": {"uri": "s3://models/calib.npz"}},
        "spec.engine.calibration.uri",
        rule=api.URI_S3,
    ),
    # path traversal
    Invalid(
        "uri-traversal",
        {"spec.model.uri": "pvc://models/minilm/../../secrets/token"},
        "spec.model.uri",
        rule=api.URI_TRAVERSAL,
    ),
    Invalid(
        "uri-traversal-encoded",
        {"spec.model.uri": "file:///models/%2E%2E/etc/passwd"},
        "spec.model.uri",
        rule=api.URI_TRAVERSAL,
    ),
    Invalid(
        "calibration-uri-traversal",
        {"spec.engine.precision": "int8", "spec.engine.calibration": {"uri": "pvc://models/calib/.."}},
        "spec.engine.calibration.uri",
        rule=api.URI_TRAVERSAL,
    ),
    # negative delays and periods
    Invalid(
        "queue-delay-negative",
        {"spec.serving.batching.maxQueueDelayMicroseconds": -1},
        "spec.serving.batching.maxQueueDelayMicroseconds",
        f"{GE} 0",
    ),
    Invalid(
        "timeout-negative",
        {"spec.serving.batching.defaultTimeoutMicroseconds": -1},
        "spec.serving.batching.defaultTimeoutMicroseconds",
        f"{GE} 0",
    ),
    Invalid(
        "stabilization-window-negative",
        {"spec.autoscaling.behavior.scaleDown.stabilizationWindowSeconds": -5},
        "spec.autoscaling.behavior.scaleDown.stabilizationWindowSeconds",
        f"{GE} 0",
    ),
    Invalid(
        "policy-period-zero",
        {"spec.autoscaling.behavior.scaleUp.policies.0.periodSeconds": 0},
        "spec.autoscaling.behavior.scaleUp.policies[0].periodSeconds",
        f"{GE} 1",
    ),
]


def load_yaml(path: Path) -> dict[str, Any]:
    obj = yaml.safe_load(path.read_text())
    assert isinstance(obj, dict)
    return obj


def model_path(server_path: str) -> str:
    """The API server's `a.b[0].c` / `a.b[key]` as pydantic's dotted location `a.b.0.c` / `a.b.key`."""
    return re.sub(r"\[([^\]]+)\]", r".\1", server_path)


# --- examples and defaults ------------------------------------------------------------------------------


def test_the_four_required_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "minimal.yaml",
        "tensorrt-fp16-autoscaling.yaml",
        "int8-calibrated.yaml",
        "pinned-architectures.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_parses_and_has_no_namespace(path: Path) -> None:
    obj = load_yaml(path)
    model = api.parse_inference_model(obj)
    assert model.kind == "InferenceModel"
    assert "namespace" not in obj["metadata"]  # tests apply them into a namespace of their own


def test_the_gate_descriptions_state_the_defaults_the_build_applies() -> None:
    schema = api.AccuracyGate.model_json_schema(by_alias=True)["properties"]
    for field, figure in (("maxRelError", "max_rel_error"), ("minTop1Agreement", "min_top1_agreement")):
        for precision, gate in DEFAULT_GATES.items():
            assert f"{precision} {getattr(gate, figure):g}" in schema[field]["description"], field
    assert "int8 0.98" in schema["minTop1Agreement"]["description"]
    assert "int8 256" in schema["samples"]["description"]


def test_minimal_example_holds_only_the_model_uri() -> None:
    obj = load_yaml(ROOT / "examples" / "minimal.yaml")
    assert obj["spec"] == {"model": {"uri": obj["spec"]["model"]["uri"]}}


def test_defaults_are_the_documented_ones() -> None:
    spec = api.parse_inference_model(load_yaml(ROOT / "examples" / "minimal.yaml")).spec
    engine, serving = spec.engine, spec.serving
    assert (engine.backend, engine.precision) == ("auto", "fp16")
    assert (engine.batch.min, engine.batch.opt, engine.batch.max) == (1, 16, 32)
    assert engine.architectures == []
    assert engine.shapes == {}
    assert engine.calibration is None
    # Every figure follows the precision's defaults, which the build resolves (one table: DEFAULT_GATES).
    assert engine.accuracy == api.AccuracyGate(
        max_abs_error=None, max_rel_error=None, min_top1_agreement=None, samples=None
    )
    assert engine.tensorrt == api.TensorRTOptions(builder_optimization_level=3, workspace_mib=None)
    assert engine.onnxruntime.quantization == "dynamic"
    assert (serving.resources.gpu, serving.resources.cpu, serving.resources.memory) == (1, "2", "8Gi")
    assert serving.batching == api.Batching(
        max_batch_size=None,
        preferred_batch_sizes=[],
        max_queue_delay_microseconds=None,
        adaptive=None,
        max_queue_size=1024,
        default_timeout_microseconds=0,
    )
    assert serving.batching.is_adaptive  # no delay given: the batcher tunes itself
    assert serving.image is None
    assert spec.replicas is None
    assert spec.autoscaling is None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_crd_defaulting_agrees_with_model_defaults(path: Path) -> None:
    """An object defaulted the way the API server defaults it with the CRD parses to the same model."""
    obj = load_yaml(path)
    schema = crdgen.build_schema()
    defaulted = crdgen.apply_defaults(schema, copy.deepcopy(obj))
    assert defaulted != obj  # the CRD filled something in
    assert api.parse_inference_model(defaulted) == api.parse_inference_model(obj)


def test_crd_defaulting_of_an_empty_engine_fills_every_default() -> None:
    schema = crdgen.build_schema()["properties"]["spec"]
    defaulted = crdgen.apply_defaults(schema, {"model": {"uri": "pvc://m/x.onnx"}, "engine": {}})
    assert defaulted["engine"]["batch"] == {"min": 1, "opt": 16, "max": 32}
    assert defaulted["engine"]["precision"] == "fp16"
    assert defaulted["serving"]["batching"]["maxQueueSize"] == 1024
    # No queue delay is defaulted: absent, the batcher tunes itself (a stored default would pin it).
    assert "maxQueueDelayMicroseconds" not in defaulted["serving"]["batching"]


@pytest.mark.parametrize("path", [*EXAMPLES, None], ids=[*(p.stem for p in EXAMPLES), "base"])
def test_dumped_spec_parses_back_to_the_same_spec(path: Path | None) -> None:
    obj = BASE if path is None else load_yaml(path)
    spec = api.parse_inference_model(obj).spec
    dumped = api.dump_spec(spec)
    assert api.InferenceModelSpec.model_validate(dumped) == spec
    assert "defaultTimeoutMicroseconds" in dumped["serving"]["batching"]  # camelCase on the way out


def test_explicit_nulls_read_as_absent() -> None:
    """The CRD keeps explicit nulls on nullable fields, and its CEL reads them as absent: so do the models."""
    obj = copy.deepcopy(BASE)
    obj["spec"]["model"]["sha256"] = None
    obj["spec"]["serving"]["batching"]["maxBatchSize"] = None
    obj["spec"]["engine"]["calibration"] = None
    obj["spec"]["replicas"] = None
    spec = api.parse_inference_model(obj).spec
    assert spec.model.sha256 is None
    assert spec.serving.batching.max_batch_size is None
    assert spec.engine.calibration is None
    assert spec.replicas is None


def test_snake_case_names_populate_too() -> None:
    batching = api.Batching(max_batch_size=8, preferred_batch_sizes=[4, 8])
    assert batching.model_dump(by_alias=True)["preferredBatchSizes"] == [4, 8]


def test_special_aliases_follow_the_api_spelling() -> None:
    autoscaling = api.AutoscalingSpec.model_validate({"maxReplicas": 3, "targetQPSPerReplica": 5})
    assert autoscaling.target_qps_per_replica == 5.0
    trt = api.TensorRTOptions.model_validate({"workspaceMiB": 1024})
    assert trt.workspace_mib == 1024


def test_spec_models_are_frozen() -> None:
    spec = api.parse_inference_model(BASE).spec
    with pytest.raises(ValueError, match="frozen"):
        spec.replicas = 3  # type: ignore[misc]


# --- status ---------------------------------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "observedGeneration": 3,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Serving",
            "message": "4/4 replicas ready",
            "lastTransitionTime": "2025-01-02T03:04:05Z",
            "observedGeneration": 3,
        },
        {
            "type": "EnginesReady",
            "status": "False",
            "reason": "Building",
            "message": "",
            "lastTransitionTime": "2025-01-02T03:00:00Z",
            "observedGeneration": 3,
        },
    ],
    "engines": [
        {
            "architecture": "sm90",
            "key": "ab" * 32,
            "phase": "Ready",
            "job": "minilm-build-sm90-1a2b3c4d",
            "backend": "tensorrt",
            "backendVersion": "10.7.0",
            "precision": "fp16",
            "accuracy": {"maxAbsError": 0.01, "maxRelError": 0.002, "top1Agreement": 0.999},
            "buildSeconds": 412.5,
        },
        {"architecture": "sm80", "phase": "Building", "job": "minilm-build-sm80-5e6f7a8b"},
    ],
    "engineSummary": "1/2",
    "architectures": [{"name": "sm90", "nodes": 2, "replicas": 4, "readyReplicas": 4, "deployment": "minilm-sm90"}],
    "replicas": 4,
    "readyReplicas": 4,
    "selector": "modelfleet.io/model=minilm",
    "autoscaler": {
        "qps": 812.5,
        "p99Milliseconds": 31.0,
        "desiredReplicas": 4,
        "currentReplicas": 4,
        "lastScaleTime": "2025-01-02T03:04:05Z",
        "reason": "qps 812.5 over 4 replicas",
    },
    "somethingNewer": {"written": "by a newer operator"},
}


def test_status_parses_with_conditions_engines_and_autoscaler() -> None:
    model = api.parse_inference_model({**BASE, "status": STATUS})
    status = model.status
    ready = status.condition("Ready")
    assert ready is not None
    assert ready.status == "True"
    assert ready.last_transition_time.year == 2025
    assert status.condition("Stalled") is None
    assert [e.phase for e in status.engines] == ["Ready", "Building"]
    assert status.engines[0].accuracy is not None
    assert status.engines[0].accuracy.top1_agreement == 0.999
    assert status.autoscaler is not None
    assert status.autoscaler.p99_milliseconds == 31.0
    assert (status.replicas, status.selector, status.engine_summary) == (
        4,
        "modelfleet.io/model=minilm",
        "1/2",
    )


def test_dumped_status_parses_back_in_camel_case() -> None:
    status = api.parse_inference_model({**BASE, "status": STATUS}).status
    dumped = api.dump_status(status)
    assert dumped["conditions"][0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert dumped["autoscaler"]["p99Milliseconds"] == 31.0
    assert "somethingNewer" not in dumped
    assert api.InferenceModelStatus.model_validate(dumped) == status


def test_status_rejects_an_unknown_condition_status() -> None:
    status = copy.deepcopy(STATUS)
    status["conditions"][0]["status"] = "Maybe"
    with pytest.raises(api.InvalidInferenceModelError, match=r"status\.conditions\.0\.status"):
        api.parse_inference_model({**BASE, "status": status})


def test_missing_status_reads_as_empty() -> None:
    status = api.parse_inference_model(BASE).status
    assert status.conditions == []
    assert status.replicas is None
    assert status.observed_generation == 0  # what the CRD's status default reads as: not reconciled yet


# --- what the models refuse --------------------------------------------------------------------------


def test_base_manifest_is_valid() -> None:
    # The base every invalid case mutates must itself parse, and parse to what it says.
    model = api.parse_inference_model(BASE)
    assert model.model_dump(by_alias=True, exclude_unset=True)["spec"]["model"] == BASE["spec"]["model"]


def test_the_invalid_table_is_large_and_its_ids_unique() -> None:
    ids = [case.id for case in INVALID_MANIFESTS]
    assert len(ids) >= 25
    assert len(set(ids)) == len(ids)


def test_every_cel_rule_has_an_invalid_manifest() -> None:
    declared = {name for name, value in vars(api).items() if isinstance(value, api.CelRule)}
    covered = {name for name, value in vars(api).items() if any(case.rule is value for case in INVALID_MANIFESTS)}
    assert declared - covered == set()


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=[case.id for case in INVALID_MANIFESTS])
def test_models_refuse_invalid_manifest(case: Invalid) -> None:
    obj = case.manifest()
    with pytest.raises(api.InvalidInferenceModelError) as info:
        api.parse_inference_model(obj)
    text = str(info.value)
    if case.rule is not None:
        assert case.rule.message in text
    elif case.model:
        assert case.model in text
    else:  # the error sits on the very field the API server names
        where = model_path(case.path)
        assert any(p.startswith((f"{where}:", f"{where}.")) for p in info.value.problems), info.value.problems


def test_errors_name_fields_in_camel_case() -> None:
    obj = copy.deepcopy(BASE)
    obj["spec"]["serving"]["batching"]["maxQueueDelayMicroseconds"] = -1
    with pytest.raises(api.InvalidInferenceModelError) as info:
        api.parse_inference_model(obj)
    assert info.value.problems == [
        "spec.serving.batching.maxQueueDelayMicroseconds: Input should be greater than or equal to 0"
    ]


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://models/minilm/model.onnx",
        "pvc://my-claim.v2/a/b/model.onnx",
        "file:///opt/models/model.onnx",
        "https://models.example.com/minilm/model.onnx",
        "https://10.0.0.5:8443/m/model.onnx?X-Amz-Signature=abc&expires=3",
        "pvc://models/v1..2/model.onnx",  # '..' inside a name is not a traversal
    ],
)
def test_uri_forms_accepted(uri: str) -> None:
    assert api.uri_problem(uri) is None


@pytest.mark.parametrize(
    ("uri", "rule"),
    [
        ("http://models.example.com/m.onnx", api.URI_SCHEME),
        ("models/minilm.onnx", api.URI_SCHEME),
        ("file://host/m.onnx", api.URI_SCHEME),
        ("s3://bucket/m.onnx", api.URI_S3),
        ("pvc:///m.onnx", api.URI_PVC),
        ("pvc://claim/", api.URI_PVC),
        ("https://models.example.com/m.onnx#frag", api.URI_HTTPS),
        ("https://models.example.com/dir/", api.URI_HTTPS),
        ("pvc://claim/..", api.URI_TRAVERSAL),
        ("https://models.example.com/a/%2e%2E/m.onnx", api.URI_TRAVERSAL),
        ("file:///models/m.onnx\n", api.URI_SPACE),
        ("file:///models/m\x00.onnx", api.URI_SPACE),
    ],
)
def test_uri_forms_refused(uri: str, rule: api.CelRule) -> None:
    assert api.uri_problem(uri) == rule.message


def test_api_imports_no_kubernetes_client() -> None:
    code = (
        "import sys, modelfleet_operator.api, modelfleet_operator.crdgen\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kopf', 'aiohttp'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_invalid_manifest_changes_only_a_copy() -> None:
    before = copy.deepcopy(BASE)
    for case in INVALID_MANIFESTS:
        case.manifest(name="x")
    assert before == BASE


def test_engine_fields_map_one_to_one_onto_build_options() -> None:
    """The operator turns spec.engine into `modelfleet build` flags: same fields, and nothing the CRD
    accepts is refused by the build's own options model."""
    options = pytest.importorskip("modelfleet_runtime.build.options")
    pairs: list[tuple[type[BaseModel], type[BaseModel], set[str]]] = [
        (api.EngineSpec, options.BuildOptions, {"architectures"}),  # architectures: one Job per entry
        (api.BatchProfile, options.BatchProfile, set()),
        (api.ShapeRange, options.ShapeRange, set()),
        (api.AccuracyGate, options.AccuracyGate, set()),
        (api.TensorRTOptions, options.TensorRTOptions, set()),
        (api.OnnxRuntimeOptions, options.OnnxRuntimeOptions, set()),
    ]
    for ours, theirs, only_ours in pairs:
        assert set(ours.model_fields) - only_ours == set(theirs.model_fields), ours.__name__
    labeled = copy.deepcopy(BASE)
    labeled["spec"]["engine"]["accuracy"].update(
        {"evaluation": {"uri": "pvc://data/eval.npz", "sha256": SHA}, "maxAccuracyDrop": 0.01}
    )
    for obj in [BASE, labeled, *(load_yaml(p) for p in EXAMPLES)]:
        engine = api.parse_inference_model(obj).spec.engine
        data = engine.model_dump(exclude={"architectures", "calibration"}, exclude_none=True)
        if engine.calibration is not None:  # the operator mounts the data and passes its local path
            data["calibration"] = {"path": "/mnt/calibration/data.npz", "sha256": engine.calibration.sha256}
        if engine.accuracy.evaluation is not None:
            digest = engine.accuracy.evaluation.sha256
            data["accuracy"]["evaluation"] = {"path": "/mnt/evaluation/data.npz", "sha256": digest}
        built = options.BuildOptions.model_validate(data)
        assert options.parse_options(built.to_args()) == built
        assert built.precision == engine.precision
        assert built.batch.max == engine.batch.max
