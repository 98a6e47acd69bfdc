"""Pure builders: an InferenceModel and explicit settings in, the Job/Deployment/Service dicts we own out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from modelfleet_operator.api import GROUP, ArtifactSource, InferenceModel, InferenceModelSpec, Placement
from modelfleet_operator.placement import CPU, GPU_RESOURCE, architecture_selector, tolerations_for
from modelfleet_operator.settings import OperatorSettings
from modelfleet_runtime.build import EXIT_CODES
from modelfleet_runtime.build.key import engine_key
from modelfleet_runtime.build.options import (
    AccuracyGate,
    BatchProfile,
    BuildOptions,
    Calibration,
    Evaluation,
    OnnxRuntimeOptions,
    ShapeRange,
    TensorRTOptions,
)

LABEL_MODEL = f"{GROUP}/model"
LABEL_ARCH = f"{GROUP}/architecture"
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_BUILD_ID = f"{GROUP}/build-id"
ANNOTATION_ENGINE_KEY = f"{GROUP}/engine-key"
ANNOTATION_BUILD_ID = f"{GROUP}/build-id"
# On a serving Deployment (not its pod template, so it rolls nothing): the InferenceModel generation that last
# wrote it. Ready needs it to equal metadata.generation, so a spec change reads not-Ready until applied.
ANNOTATION_MODEL_GENERATION = f"{GROUP}/model-generation"
# Of the pod template the operator last applied: equal means a change of generation rolls no pod.
ANNOTATION_TEMPLATE_HASH = f"{GROUP}/template-hash"
# The Deployment generation that template was first applied at: its status is about this template's pods
# once observedGeneration reaches it, even while a later replicas-only change is not observed yet.
ANNOTATION_TEMPLATE_SINCE = f"{GROUP}/template-since-generation"
ANNOTATION_MODEL_URI = f"{GROUP}/model-uri"
ANNOTATION_PRECISION = f"{GROUP}/precision"
ANNOTATION_REBUILD = f"{GROUP}/rebuild"
BUILD = "build"
SERVING = "serving"
SCRATCH_PATH = "/tmp"
NON_ROOT_UID = 65532
# A build that fails for one of these reasons fails the same way on every retry.
DETERMINISTIC_FAILURES = (
    "InvalidOptions",
    "DigestMismatch",
    "InvalidModel",
    "Unsupported",
    "AccuracyGateFailed",
)


def _short(text: str, length: int) -> str:
    """Trim a name to `length`, keeping it unique with a hash suffix when trimmed."""
    if len(text) <= length:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{text[: length - 7].rstrip('-.')}-{digest}"


def job_name(model: str, arch: str, build_id: str) -> str:
    # Job names feed the pod label job-name (63 characters at most).
    return f"{_short(model, 40)}-build-{arch}-{build_id[:10]}"


def deployment_name(model: str, arch: str) -> str:
    return f"{_short(model, 52)}-{arch}"


def service_name(model: str) -> str:
    return _short(model, 63)


def serving_selector(model: str) -> dict[str, str]:
    return {LABEL_MODEL: model, LABEL_COMPONENT: SERVING}


def serving_image(spec: InferenceModelSpec, settings: OperatorSettings) -> str:
    return spec.serving.image or settings.runtime_image


def resolved_backend(spec: InferenceModelSpec, arch: str) -> str:
    """`auto` is TensorRT on a GPU architecture and ONNX Runtime on CPU, as the build resolves it."""
    if spec.engine.backend != "auto":
        return spec.engine.backend
    return "onnxruntime" if arch == CPU else "tensorrt"


def _stand_in_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_path(uri: str, settings: OperatorSettings) -> str:
    """Where the build pod reads a model or calibration URI: pvc:// is mounted, others pass through."""
    parsed = urlparse(uri)
    if parsed.scheme == "pvc":
        return f"{settings.models_path}/{parsed.netloc}/{parsed.path.lstrip('/')}"
    if parsed.scheme == "file":
        return parsed.path
    return uri


def build_options(spec: InferenceModelSpec, settings: OperatorSettings) -> BuildOptions:
    """The engine spec as the build command's options (backend still possibly `auto`)."""
    engine = spec.engine
    calibration = None
    if engine.calibration is not None:
        calibration = Calibration(path=model_path(engine.calibration.uri, settings), sha256=engine.calibration.sha256)
    return BuildOptions(
        backend=engine.backend,
        precision=engine.precision,
        batch=BatchProfile(min=engine.batch.min, opt=engine.batch.opt, max=engine.batch.max),
        shapes={
            name: ShapeRange(min=tuple(r.min), opt=tuple(r.opt), max=tuple(r.max)) for name, r in engine.shapes.items()
        },
        calibration=calibration,
        accuracy=AccuracyGate(
            max_abs_error=engine.accuracy.max_abs_error,
            max_rel_error=engine.accuracy.max_rel_error,
            min_top1_agreement=engine.accuracy.min_top1_agreement,
            samples=engine.accuracy.samples,
            evaluation=_evaluation(engine.accuracy.evaluation, settings),
            max_accuracy_drop=engine.accuracy.max_accuracy_drop,
            evaluation_output=engine.accuracy.evaluation_output,
        ),
        tensorrt=TensorRTOptions(
            builder_optimization_level=engine.tensorrt.builder_optimization_level,
            workspace_mib=engine.tensorrt.workspace_mib,
        ),
        onnxruntime=OnnxRuntimeOptions(quantization=engine.onnxruntime.quantization),
    )


def _evaluation(source: ArtifactSource | None, settings: OperatorSettings) -> Evaluation | None:
    return None if source is None else Evaluation(path=model_path(source.uri, settings), sha256=source.sha256)


def build_identity(im: InferenceModel, arch: str, settings: OperatorSettings) -> tuple[str, bool]:
    """The id of the build for one architecture, and whether it is the engine's real cache key.

    It is the build's own `engine_key` function over what the operator knows. When the model's
    sha256 is pinned, the calibration's too, and the image's backend version is configured, that is
    exactly the key the build will publish under; otherwise stand-ins (the URI, the image) take the
    place of the unknown digests, so the id still changes whenever the engine could.
    The rebuild annotation joins the image stand-in, so changing it starts new builds.
    """
    spec = im.spec
    backend = resolved_backend(spec, arch)
    image = serving_image(spec, settings)
    options = build_options(spec, settings).with_backend(backend)  # type: ignore[arg-type]
    exact = spec.model.sha256 is not None
    if options.calibration is not None and options.calibration.sha256 is None:
        exact = False
        calibration_uri = spec.engine.calibration.uri if spec.engine.calibration else ""
        options = options.with_calibration_digest(_stand_in_digest(f"uri:{calibration_uri}"))
    evaluation = spec.engine.accuracy.evaluation
    if evaluation is not None and evaluation.sha256 is None:
        exact = False
        options = options.with_evaluation_digest(_stand_in_digest(f"uri:{evaluation.uri}"))
    version = settings.runtime_backend_versions.get(backend) if spec.serving.image is None else None
    rebuild = (im.metadata.get("annotations") or {}).get(ANNOTATION_REBUILD, "")
    if version is None or rebuild:
        exact = False
        version = f"image:{image}" + (f";rebuild:{rebuild}" if rebuild else "")
    digest = spec.model.sha256 or _stand_in_digest(f"uri:{spec.model.uri}")
    return engine_key(model_digest=digest, options=options, architecture=arch, backend_version=version), exact


def owner_reference(im: InferenceModel) -> dict[str, Any]:
    meta = im.metadata
    return {
        "apiVersion": im.api_version,
        "kind": im.kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(model: str, arch: str | None, component: str) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "modelfleet-runtime",
        "app.kubernetes.io/instance": _short(model, 63),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "modelfleet",
        LABEL_MODEL: model,
        LABEL_COMPONENT: component,
    }
    if arch is not None:
        labels[LABEL_ARCH] = arch
    return labels


def _node_affinity(arch: str, placement: Placement, *, gpus: int) -> dict[str, Any]:
    """Required node affinity: the user's terms AND this architecture (by compute labels OR product)."""
    user_terms = (
        (placement.affinity.get("nodeAffinity") or {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms")
    ) or [{}]
    if gpus > 0 and arch != CPU:
        compute, products = architecture_selector(arch)
        arch_terms: list[list[dict[str, Any]]] = [
            [{"key": k, "operator": "In", "values": [v]} for k, v in compute.items()],
        ]
        if products:
            arch_terms.append(
                [
                    {"key": "nvidia.com/gpu.compute.major", "operator": "DoesNotExist"},
                    {"key": "nvidia.com/gpu.product", "operator": "In", "values": products},
                ]
            )
    else:
        arch_terms = [[]]
    terms = [
        {
            **{k: v for k, v in user.items() if k != "matchExpressions"},
            "matchExpressions": [*(user.get("matchExpressions") or []), *extra],
        }
        for user in user_terms
        for extra in arch_terms
    ]
    terms = [t for t in terms if t.get("matchExpressions") or t.get("matchFields")]
    affinity = {k: v for k, v in placement.affinity.items() if k != "nodeAffinity"}
    node_affinity = dict(placement.affinity.get("nodeAffinity") or {})
    if terms:
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    if node_affinity:
        affinity["nodeAffinity"] = node_affinity
    return affinity


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


CONTAINER_SECURITY: Mapping[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def model_claims(im: InferenceModel) -> list[str]:
    """The PersistentVolumeClaims a build reads the model (its calibration and evaluation data) from: pvc:// URIs."""
    engine = im.spec.engine
    uris = [im.spec.model.uri] + [s.uri for s in (engine.calibration, engine.accuracy.evaluation) if s is not None]
    return sorted({urlparse(u).netloc for u in uris if urlparse(u).scheme == "pvc"})


def needed_claims(im: InferenceModel, settings: OperatorSettings) -> dict[str, str]:
    """Every claim a build or serving pod mounts, with what it is for (the words a condition uses)."""
    return {settings.engine_store_claim: "the engine store", **{c: "the model" for c in model_claims(im)}}


def _priority(class_name: str) -> dict[str, str]:
    return {"priorityClassName": class_name} if class_name else {}


def _volumes(
    im: InferenceModel, settings: OperatorSettings, *, read_only_store: bool, with_models: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {
            "name": "engines",
            "persistentVolumeClaim": {"claimName": settings.engine_store_claim, "readOnly": read_only_store},
        },
        {"name": "scratch", "emptyDir": {"sizeLimit": "20Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "engines", "mountPath": settings.engine_store_path, "readOnly": read_only_store},
        {"name": "scratch", "mountPath": SCRATCH_PATH},
    ]
    if with_models:
        for i, claim in enumerate(model_claims(im)):
            volumes.append({"name": f"models-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            mounts.append({"name": f"models-{i}", "mountPath": f"{settings.models_path}/{claim}", "readOnly": True})
    return volumes, mounts


def build_job(im: InferenceModel, *, arch: str, build_id: str, settings: OperatorSettings) -> dict[str, Any]:
    """The build Job of one architecture; its name is a function of the build id, so it is never doubled."""
    spec, name = im.spec, im.metadata["name"]
    gpus = 0 if arch == CPU else 1
    options = build_options(spec, settings)
    args = [
        "build",
        "--model",
        model_path(spec.model.uri, settings),
        "--store",
        settings.engine_store_path,
        "--architecture",
        arch,
        *options.to_args(),
    ]
    if spec.model.sha256:
        args += ["--model-sha256", spec.model.sha256]
    volumes, mounts = _volumes(im, settings, read_only_store=False, with_models=True)
    labels = {**_labels(name, arch, BUILD), LABEL_BUILD_ID: build_id[:63]}
    resources: dict[str, Any] = {
        "requests": {"cpu": settings.build_cpu, "memory": settings.build_memory},
        "limits": {"memory": settings.build_memory},
    }
    if gpus:
        resources["limits"][GPU_RESOURCE] = str(gpus)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **_priority(settings.build_priority_class),
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "tolerations": tolerations_for(spec.serving.placement, gpus=gpus),
        "affinity": _node_affinity(arch, spec.serving.placement, gpus=gpus),
        "nodeSelector": dict(spec.serving.placement.node_selector),
        "containers": [
            {
                "name": "build",
                "image": serving_image(spec, settings),
                "imagePullPolicy": settings.image_pull_policy,
                "args": args,
                "env": [{"name": "HOME", "value": SCRATCH_PATH}, {"name": "TMPDIR", "value": SCRATCH_PATH}],
                "resources": resources,
                "securityContext": dict(CONTAINER_SECURITY),
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, arch, build_id),
            "namespace": im.metadata["namespace"],
            "labels": labels,
            "annotations": {ANNOTATION_BUILD_ID: build_id},
            "ownerReferences": [owner_reference(im)],
        },
        "spec": {
            "backoffLimit": settings.build_backoff_limit,
            "activeDeadlineSeconds": settings.build_active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.build_ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "build",
                            "operator": "In",
                            "values": sorted(EXIT_CODES[r] for r in DETERMINISTIC_FAILURES),
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        ANNOTATION_BUILD_ID: build_id,
                        ANNOTATION_MODEL_URI: spec.model.uri,
                        ANNOTATION_PRECISION: spec.engine.precision,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


# Of the grace period left after the preStop sleep, what the runtime keeps for closing connections and exiting.
EXIT_MARGIN_SECONDS = 5


def build_drain_grace(settings: OperatorSettings) -> int:
    """The runtime's drain grace (MODELFLEET_DRAIN_GRACE_SECONDS): the time SIGTERM leaves before SIGKILL, which
    is the pod's terminationGracePeriodSeconds less the preStop sleep, less a margin to exit in."""
    grace = settings.termination_grace_seconds
    return max(1, grace - min(EXIT_MARGIN_SECONDS, grace // 2))


def adaptive_env(spec: InferenceModelSpec) -> dict[str, object]:
    """Adaptive batching's switch and p99 target (the autoscaling one when set); nothing when it is off."""
    if not spec.serving.batching.is_adaptive:
        return {}
    env: dict[str, object] = {"MODELFLEET_BATCHING_ADAPTIVE": "true"}
    target_ms = spec.autoscaling.target_p99_latency_milliseconds if spec.autoscaling else None
    if target_ms is not None:
        env["MODELFLEET_BATCHING_P99_TARGET_MICROSECONDS"] = max(1000, round(target_ms * 1000))
    return env


def runtime_env(spec: InferenceModelSpec, settings: OperatorSettings, arch: str | None = None) -> list[dict[str, str]]:
    """Serving settings for `modelfleet serve`, as its MODELFLEET_ environment; MODELFLEET_ARCHITECTURE tells the
    runtime whether it should compute on a GPU (smXY), so it reports a CPU fallback."""
    b = spec.serving.batching
    env = {
        **({"MODELFLEET_ARCHITECTURE": arch} if arch else {}),
        "MODELFLEET_DRAIN_GRACE_SECONDS": build_drain_grace(settings),
        "MODELFLEET_MAX_BATCH_SIZE": b.max_batch_size if b.max_batch_size is not None else spec.engine.batch.max,
        "MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS": b.max_queue_delay_microseconds or 0,
        "MODELFLEET_MAX_QUEUE_SIZE": b.max_queue_size,
        "MODELFLEET_DEFAULT_TIMEOUT_MICROSECONDS": b.default_timeout_microseconds,
        **adaptive_env(spec),
    }
    out = [{"name": k, "value": str(v)} for k, v in env.items()]
    if b.preferred_batch_sizes:
        out.append({"name": "MODELFLEET_PREFERRED_BATCH_SIZES", "value": json.dumps(b.preferred_batch_sizes)})
    cache = spec.serving.response_cache
    if cache.enabled:  # absent otherwise, so models without a cache keep their pod template
        out.append({"name": "MODELFLEET_RESPONSE_CACHE_BYTES", "value": str(cache.max_bytes)})
    return out + [{"name": "HOME", "value": SCRATCH_PATH}, {"name": "TMPDIR", "value": SCRATCH_PATH}]


def build_deployment(
    im: InferenceModel, *, arch: str, engine_key_: str, replicas: int, settings: OperatorSettings
) -> dict[str, Any]:
    """The serving Deployment of one architecture, running the engine `engine_key_` from the store."""
    spec, name = im.spec, im.metadata["name"]
    gpus = spec.serving.resources.gpu if arch != CPU else 0
    labels = _labels(name, arch, SERVING)
    selector = {LABEL_MODEL: name, LABEL_COMPONENT: SERVING, LABEL_ARCH: arch}
    volumes, mounts = _volumes(im, settings, read_only_store=True, with_models=False)
    resources: dict[str, Any] = {
        "requests": {"cpu": spec.serving.resources.cpu, "memory": spec.serving.resources.memory},
        "limits": {"memory": spec.serving.resources.memory},
    }
    if gpus:
        resources["limits"][GPU_RESOURCE] = str(gpus)
    port = settings.serving_port
    ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    if settings.serving_grpc_port:
        ports.append({"name": "grpc", "containerPort": settings.serving_grpc_port, "protocol": "TCP"})

    def probe(path: str, **extra: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": 5, **extra}

    container = {
        "name": "runtime",
        "image": serving_image(spec, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "args": [
            "serve",
            "--model",
            f"{settings.engine_store_path}/{engine_key_}",
            "--name",
            name,
            "--http-port",
            str(port),
            "--grpc-port",
            str(settings.serving_grpc_port),
        ],
        "env": runtime_env(spec, settings, arch),
        "ports": ports,
        "resources": resources,
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": mounts,
        # Warm-up of every batch size can take minutes on a big engine: the startup probe allows it.
        "startupProbe": probe("/v2/health/ready", failureThreshold=120),
        "readinessProbe": probe("/v2/health/ready", failureThreshold=2),
        "livenessProbe": probe("/v2/health/live", failureThreshold=6),
        # Endpoints drop the pod while it sleeps; then SIGTERM makes the runtime drain what it accepted.
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.drain_seconds}}},
    }
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name, arch),
            "namespace": im.metadata["namespace"],
            "labels": labels,
            "annotations": {
                ANNOTATION_ENGINE_KEY: engine_key_,
                ANNOTATION_MODEL_GENERATION: str(im.metadata.get("generation", 0)),
            },
            "ownerReferences": [owner_reference(im)],
        },
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        ANNOTATION_ENGINE_KEY: engine_key_,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    **_priority(settings.serving_priority_class),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    "terminationGracePeriodSeconds": settings.termination_grace_seconds + settings.drain_seconds,
                    "tolerations": tolerations_for(spec.serving.placement, gpus=gpus),
                    "affinity": _node_affinity(arch, spec.serving.placement, gpus=gpus),
                    "nodeSelector": dict(spec.serving.placement.node_selector),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    annotations = deployment["metadata"]["annotations"]
    annotations[ANNOTATION_TEMPLATE_HASH] = hashlib.sha256(
        json.dumps(deployment["spec"]["template"], sort_keys=True).encode()
    ).hexdigest()[:16]
    return deployment


def build_service(im: InferenceModel, grpc_port: int = 0) -> dict[str, Any]:
    """One Service over the serving pods of every architecture: REST on 80, OIP gRPC on `grpc_port` if set."""
    name = im.metadata["name"]
    grpc = {"name": "grpc", "port": grpc_port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": im.metadata["namespace"],
            "labels": _labels(name, None, SERVING),
            "ownerReferences": [owner_reference(im)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": serving_selector(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
            + ([grpc] if grpc_port else []),
        },
    }
