"""What the kubelet and the runtime read from the objects the operator writes, pinned value by value."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from modelfleet_operator.resources import (
    ANNOTATION_MODEL_GENERATION,
    ANNOTATION_TEMPLATE_HASH,
    LABEL_BUILD_ID,
    build_drain_grace,
    build_job,
    build_service,
)
from modelfleet_operator.settings import OperatorSettings
from tests.operator.test_resources import SETTINGS, container, deployment, env, model

BUILD_ID = "ab" * 32  # a build id that is an engine key: a sha256 in hex


def job(**settings: Any) -> dict[str, Any]:
    s = OperatorSettings(**settings) if settings else SETTINGS
    return build_job(model(), arch="sm80", build_id=BUILD_ID, settings=s)


def test_serving_and_build_containers_never_escalate_and_never_run_as_root() -> None:
    for obj in (deployment(model()), job()):
        security = container(obj)["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}


def test_the_runtime_image_is_the_specs_when_set_else_the_operators() -> None:
    assert container(deployment(model(serving={"image": "other:1"})))["image"] == "other:1"
    assert container(deployment(model()))["image"] == SETTINGS.runtime_image


def test_priority_classes_are_set_only_when_configured() -> None:
    ranked = OperatorSettings(serving_priority_class="serving-high", build_priority_class="build-low")
    assert deployment(model())["spec"]["template"]["spec"].get("priorityClassName") is None
    assert job()["spec"]["template"]["spec"].get("priorityClassName") is None
    assert (
        deployment(model(), serving_priority_class="serving-high")["spec"]["template"]["spec"]["priorityClassName"]
        == "serving-high"
    )
    built = build_job(model(), arch="sm80", build_id=BUILD_ID, settings=ranked)
    assert built["spec"]["template"]["spec"]["priorityClassName"] == "build-low"


def test_adaptive_batching_gets_the_autoscaling_p99_target_in_microseconds() -> None:
    auto = {"minReplicas": 1, "maxReplicas": 4, "targetP99LatencyMilliseconds": 37.5}
    adaptive = env(deployment(model(autoscaling=auto)))
    assert adaptive["MODELFLEET_BATCHING_ADAPTIVE"] == "true"
    assert adaptive["MODELFLEET_BATCHING_P99_TARGET_MICROSECONDS"] == "37500"
    fixed = env(deployment(model(serving={"batching": {"maxQueueDelayMicroseconds": 500}})))
    assert "MODELFLEET_BATCHING_ADAPTIVE" not in fixed
    assert fixed["MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS"] == "500"
    assert env(deployment(model()))["MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS"] == "0"


def test_the_drain_grace_leaves_a_margin_and_never_reaches_zero() -> None:
    assert build_drain_grace(OperatorSettings(termination_grace_seconds=30)) == 25
    assert build_drain_grace(OperatorSettings(termination_grace_seconds=4)) == 2
    assert build_drain_grace(OperatorSettings(termination_grace_seconds=1)) == 1


def test_a_build_job_carries_its_build_id_as_a_label_cut_to_63_characters() -> None:
    assert job()["metadata"]["labels"][LABEL_BUILD_ID] == BUILD_ID[:63]


def test_the_instance_label_is_the_model_name_cut_to_63_characters() -> None:
    long = model()
    long.metadata["name"] = "m" * 80
    label = deployment(long)["metadata"]["labels"]["app.kubernetes.io/instance"]
    assert len(label) == 63
    assert deployment(model())["metadata"]["labels"]["app.kubernetes.io/instance"] == "clf"


def test_the_template_hash_is_16_hex_characters_of_the_sorted_template() -> None:
    dep = deployment(model())
    expected = hashlib.sha256(json.dumps(dep["spec"]["template"], sort_keys=True).encode()).hexdigest()[:16]
    assert dep["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH] == expected
    assert dep["metadata"]["annotations"][ANNOTATION_MODEL_GENERATION] == "3"


def test_the_service_serves_rest_on_port_80() -> None:
    ports = build_service(model(), SETTINGS.serving_grpc_port)["spec"]["ports"]
    assert {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"} in ports


def test_pods_run_as_the_images_non_root_user_with_the_runtime_default_seccomp_profile() -> None:
    for obj in (deployment(model()), job()):
        pod = obj["spec"]["template"]["spec"]["securityContext"]
        assert pod == {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
