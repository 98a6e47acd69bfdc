"""The Kubernetes objects the operator writes for a model: what a GPU, a CPU and a build pod ask for and run with."""

from __future__ import annotations

from typing import Any

from modelfleet_operator.api import InferenceModel, parse_inference_model
from modelfleet_operator.resources import (
    build_deployment,
    build_identity,
    build_job,
    build_service,
    deployment_name,
    job_name,
    model_path,
    needed_claims,
    resolved_backend,
    service_name,
)
from modelfleet_operator.settings import OperatorSettings

SETTINGS = OperatorSettings()


def model(**spec: Any) -> InferenceModel:
    return parse_inference_model(
        {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": "clf", "namespace": "ml", "uid": "u-1", "generation": 3},
            "spec": {"model": {"uri": "pvc://models/clf/model.onnx"}, **spec},
        }
    )


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]


def env(obj: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(obj)["env"]}


def deployment(im: InferenceModel, arch: str = "sm80", **settings: Any) -> dict[str, Any]:
    return build_deployment(
        im, arch=arch, engine_key_="k1", replicas=2, settings=OperatorSettings(**settings) if settings else SETTINGS
    )


def test_a_gpu_deployment_asks_for_the_gpus_of_the_spec_and_a_cpu_one_for_none() -> None:
    im = model(serving={"resources": {"gpu": 2, "cpu": "3", "memory": "4Gi"}})
    gpu = container(deployment(im))["resources"]
    assert gpu == {"requests": {"cpu": "3", "memory": "4Gi"}, "limits": {"memory": "4Gi", "nvidia.com/gpu": "2"}}
    cpu = container(deployment(im, arch="cpu"))["resources"]
    assert cpu == {"requests": {"cpu": "3", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    gpu_pod = deployment(im)["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert deployment(im, arch="cpu")["spec"]["template"]["spec"]["tolerations"] == []


def test_a_gpu_build_job_asks_for_one_gpu_and_a_cpu_build_for_none() -> None:
    im = model(serving={"resources": {"gpu": 4}})
    gpu = container(build_job(im, arch="sm80", build_id="b" * 64, settings=SETTINGS))["resources"]["limits"]
    assert gpu == {"memory": SETTINGS.build_memory, "nvidia.com/gpu": "1"}
    cpu = container(build_job(im, arch="cpu", build_id="b" * 64, settings=SETTINGS))["resources"]["limits"]
    assert cpu == {"memory": SETTINGS.build_memory}


def test_a_gpu_deployment_is_pinned_to_its_architecture_by_labels_or_product() -> None:
    terms = deployment(model())["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["8"]},
        {"key": "nvidia.com/gpu.compute.minor", "operator": "In", "values": ["0"]},
    ]
    assert terms[1]["matchExpressions"][0] == {"key": "nvidia.com/gpu.compute.major", "operator": "DoesNotExist"}
    assert "NVIDIA-A100-SXM4-80GB" in terms[1]["matchExpressions"][1]["values"]
    assert deployment(model(), arch="cpu")["spec"]["template"]["spec"]["affinity"] == {}


def test_user_affinity_terms_are_anded_with_the_architecture() -> None:
    user = {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}
    placement = {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [user]}}}
    }
    spec = deployment(model(serving={"placement": placement}))["spec"]["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 2
    assert all(t["matchExpressions"][0] == user["matchExpressions"][0] for t in terms)
    cpu = deployment(model(serving={"placement": placement}), arch="cpu")["spec"]["template"]["spec"]
    cpu_terms = cpu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert cpu_terms == [user]


def test_the_serving_container_has_startup_readiness_and_liveness_probes() -> None:
    c = container(deployment(model()))
    assert c["startupProbe"] == {
        "httpGet": {"path": "/v2/health/ready", "port": "http"},
        "periodSeconds": 5,
        "failureThreshold": 120,
    }
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["readinessProbe"]["failureThreshold"] == 2
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["livenessProbe"]["failureThreshold"] == 6


def test_the_runtime_gets_its_batching_settings_as_modelfleet_env() -> None:
    batching = {
        "maxBatchSize": 16,
        "preferredBatchSizes": [4, 8],
        "maxQueueDelayMicroseconds": 250,
        "maxQueueSize": 77,
        "defaultTimeoutMicroseconds": 9000,
    }
    e = env(deployment(model(serving={"batching": batching, "responseCache": {"enabled": True, "maxBytes": 1 << 20}})))
    assert e["MODELFLEET_ARCHITECTURE"] == "sm80"
    assert e["MODELFLEET_MAX_BATCH_SIZE"] == "16"
    assert e["MODELFLEET_PREFERRED_BATCH_SIZES"] == "[4, 8]"
    assert e["MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS"] == "250"
    assert e["MODELFLEET_MAX_QUEUE_SIZE"] == "77"
    assert e["MODELFLEET_DEFAULT_TIMEOUT_MICROSECONDS"] == "9000"
    assert e["MODELFLEET_RESPONSE_CACHE_BYTES"] == str(1 << 20)
    assert e["HOME"] == e["TMPDIR"] == "/tmp"


def test_without_a_batching_max_the_runtime_batches_up_to_the_engines_max() -> None:
    e = env(deployment(model(engine={"batch": {"max": 48}})))
    assert e["MODELFLEET_MAX_BATCH_SIZE"] == "48"
    assert "MODELFLEET_PREFERRED_BATCH_SIZES" not in e
    assert "MODELFLEET_RESPONSE_CACHE_BYTES" not in e


def test_the_runtime_serves_the_engine_from_the_store_on_the_configured_ports() -> None:
    dep = deployment(model(), serving_port=9000, serving_grpc_port=9001)
    c = container(dep)
    assert c["args"] == [
        "serve",
        "--model",
        f"{SETTINGS.engine_store_path}/k1",
        "--name",
        "clf",
        "--http-port",
        "9000",
        "--grpc-port",
        "9001",
    ]
    assert c["ports"] == [
        {"name": "http", "containerPort": 9000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 9001, "protocol": "TCP"},
    ]
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["annotations"]["modelfleet.io/model-generation"] == "3"
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9000"


def test_a_different_engine_is_a_different_pod_template() -> None:
    one = build_deployment(model(), arch="sm80", engine_key_="k1", replicas=1, settings=SETTINGS)
    other = build_deployment(model(), arch="sm80", engine_key_="k2", replicas=5, settings=SETTINGS)
    hash_ = "modelfleet.io/template-hash"
    assert one["metadata"]["annotations"][hash_] != other["metadata"]["annotations"][hash_]
    rescaled = build_deployment(model(), arch="sm80", engine_key_="k1", replicas=5, settings=SETTINGS)
    assert one["metadata"]["annotations"][hash_] == rescaled["metadata"]["annotations"][hash_]


def test_the_service_selects_every_architectures_serving_pods() -> None:
    plain = build_service(model())
    assert plain["spec"]["selector"] == {"modelfleet.io/model": "clf", "modelfleet.io/component": "serving"}
    assert [p["name"] for p in plain["spec"]["ports"]] == ["http"]
    grpc = build_service(model(), grpc_port=8001)["spec"]["ports"][1]
    assert grpc == {"name": "grpc", "port": 8001, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}


def test_long_names_are_trimmed_with_a_hash_and_short_ones_kept() -> None:
    exact = "m" * 52
    assert deployment_name(exact, "sm80") == f"{exact}-sm80"
    longer = "m" * 53
    trimmed = deployment_name(longer, "sm80")
    assert len(trimmed) == 52 + len("-sm80") and trimmed.startswith("m" * 45 + "-")
    assert deployment_name("m" * 54, "sm80") != trimmed  # the hash keeps trimmed names apart
    assert service_name("s" * 63) == "s" * 63
    assert len(service_name("s" * 64)) == 63
    assert job_name("j" * 40, "sm80", "0123456789abcdef") == "j" * 40 + "-build-sm80-0123456789"
    assert len(job_name("j" * 41, "sm80", "0123456789abcdef")) == 40 + len("-build-sm80-0123456789")
    assert deployment_name("a-" * 30, "sm80").count("--") == 0  # a trimmed '-' is not doubled before the hash


def test_model_uris_become_paths_in_the_build_pod() -> None:
    assert model_path("pvc://models/clf/model.onnx", SETTINGS) == f"{SETTINGS.models_path}/models/clf/model.onnx"
    assert model_path("file:///data/model.onnx", SETTINGS) == "/data/model.onnx"
    assert model_path("/plain/model.onnx", SETTINGS) == "/plain/model.onnx"
    assert model_path("https://example.invalid/m.onnx", SETTINGS) == "https://example.invalid/m.onnx"


def test_the_build_mounts_its_model_claims_read_only_and_the_store_writable() -> None:
    im = model(engine={"precision": "int8", "calibration": {"uri": "pvc://calib/set.npz"}})
    pod = build_job(im, arch="sm80", build_id="b" * 64, settings=SETTINGS)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["engines"]["persistentVolumeClaim"] == {"claimName": SETTINGS.engine_store_claim, "readOnly": False}
    assert volumes["models-0"]["persistentVolumeClaim"] == {"claimName": "calib", "readOnly": True}
    assert volumes["models-1"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["models-1"] == {"name": "models-1", "mountPath": f"{SETTINGS.models_path}/models", "readOnly": True}
    assert mounts["engines"]["readOnly"] is False
    assert pod["automountServiceAccountToken"] is False
    serving = deployment(im)["spec"]["template"]["spec"]
    assert {v["name"] for v in serving["volumes"]} == {"engines", "scratch"}
    assert next(m for m in serving["containers"][0]["volumeMounts"] if m["name"] == "engines")["readOnly"] is True
    assert (serving["automountServiceAccountToken"], serving["enableServiceLinks"]) == (False, False)
    assert needed_claims(im, SETTINGS) == {
        SETTINGS.engine_store_claim: "the engine store",
        "calib": "the model",
        "models": "the model",
    }


def test_owned_objects_name_their_inferencemodel_as_controller() -> None:
    ref = deployment(model())["metadata"]["ownerReferences"][0]
    assert ref == {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "name": "clf",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_deployments_roll_one_pod_at_a_time_and_keep_three_revisions() -> None:
    spec = deployment(model())["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert spec["revisionHistoryLimit"] == 3
    labels = deployment(model())["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "clf" and labels["app.kubernetes.io/managed-by"] == "modelfleet"


def test_auto_is_tensorrt_on_a_gpu_and_onnxruntime_on_cpu() -> None:
    assert resolved_backend(model().spec, "sm80") == "tensorrt"
    assert resolved_backend(model().spec, "cpu") == "onnxruntime"
    assert resolved_backend(model(engine={"backend": "onnxruntime"}).spec, "sm80") == "onnxruntime"


def test_the_build_id_is_the_engine_key_only_when_every_digest_and_version_is_known() -> None:
    versions = OperatorSettings(runtime_backend_versions={"tensorrt": "10.3"})
    pinned = model(model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64})
    assert build_identity(pinned, "sm80", versions)[1] is True
    assert build_identity(model(), "sm80", versions)[1] is False  # no model digest
    assert build_identity(pinned, "sm80", SETTINGS)[1] is False  # no backend version
    calibrated = model(
        model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64},
        engine={"precision": "int8", "calibration": {"uri": "pvc://calib/set.npz"}},
    )
    assert build_identity(calibrated, "sm80", versions)[1] is False  # no calibration digest
    other_calibration = model(
        model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64},
        engine={"precision": "int8", "calibration": {"uri": "pvc://calib/other.npz"}},
    )
    assert build_identity(calibrated, "sm80", versions)[0] != build_identity(other_calibration, "sm80", versions)[0]
    evaluated = model(
        model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64},
        engine={"accuracy": {"evaluation": {"uri": "pvc://eval/a.npz"}}},
    )
    assert build_identity(evaluated, "sm80", versions)[1] is False
    other_evaluation = model(
        model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64},
        engine={"accuracy": {"evaluation": {"uri": "pvc://eval/b.npz"}}},
    )
    assert build_identity(evaluated, "sm80", versions)[0] != build_identity(other_evaluation, "sm80", versions)[0]
    custom_image = model(model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64}, serving={"image": "x:1"})
    assert build_identity(custom_image, "sm80", versions)[1] is False


def test_the_users_match_fields_and_other_affinities_are_kept() -> None:
    fields = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-1"]}]}
    pod_affinity: dict[str, Any] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    required = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [fields]}}
    placement = {"affinity": {"nodeAffinity": required, **pod_affinity}}
    affinity = deployment(model(serving={"placement": placement}))["spec"]["template"]["spec"]["affinity"]
    assert affinity["podAntiAffinity"] == pod_affinity["podAntiAffinity"]
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert all(t["matchFields"] == fields["matchFields"] for t in terms)
    cpu = deployment(model(serving={"placement": placement}), arch="cpu")["spec"]["template"]["spec"]["affinity"]
    assert cpu["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {**fields, "matchExpressions": []}
    ]


def test_only_pvc_uris_are_mounted_as_claims() -> None:
    im = model(engine={"precision": "int8", "calibration": {"uri": "file:///data/calib.npz"}})
    assert needed_claims(im, SETTINGS) == {SETTINGS.engine_store_claim: "the engine store", "models": "the model"}
