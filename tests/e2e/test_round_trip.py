"""What the operator builds survives a round trip through the API server as 'already applied': no hot loop."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from modelfleet_operator.api import parse_inference_model
from modelfleet_operator.k8s import contains
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.reconcile import Observed, plan
from modelfleet_operator.settings import OperatorSettings
from tests.e2e.conftest import Cluster


def built_objects(namespace: str, **spec: Any) -> list[dict[str, Any]]:
    im = parse_inference_model(
        {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {
                "name": "rt",
                "namespace": namespace,
                "uid": "00000000-0000-0000-0000-000000000001",
                "generation": 1,
            },
            "spec": {"model": {"uri": "pvc://models/rt/model.onnx"}, **spec},
        }
    )
    nodes = [
        NodeInfo(name="h", labels={"nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0"}, gpus=8),
        NodeInfo(name="c", labels={}),
    ]
    first = plan(im, Observed(nodes=nodes), settings=OperatorSettings(), now=datetime.now(UTC))
    job = next(o for o in first.apply if o["kind"] == "Job")
    finished = {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    body = im.model_dump(mode="json", by_alias=True)
    body["status"] = first.status
    second = plan(
        parse_inference_model(body),
        Observed(
            nodes=nodes, jobs=[finished], build_results={job["metadata"]["name"]: {"phase": "Ready", "key": "k" * 64}}
        ),
        settings=OperatorSettings(),
        now=datetime.now(UTC),
    )
    objects = first.apply + [o for o in second.apply if o["kind"] == "Deployment"]
    for obj in objects:
        obj["metadata"].pop("ownerReferences")  # no real owner here; everything else as the operator sends it
    return objects


def test_built_objects_read_back_from_the_api_server_need_no_new_apply(cluster: Cluster, namespace: str) -> None:
    for spec in ({}, {"serving": {"resources": {"gpu": 0}}}):
        objects = built_objects(namespace, **spec)
        assert {o["kind"] for o in objects} == {"Job", "Deployment", "Service"}
        for obj in objects:
            cluster.kubectl("apply", "--server-side", "--field-manager=modelfleet", "-f", "-", input=json.dumps(obj))
            stored = json.loads(
                cluster.kubectl("-n", namespace, "get", obj["kind"], obj["metadata"]["name"], "-o", "json").stdout
            )
            assert contains(stored, obj), f"{obj['kind']} {obj['metadata']['name']} would be re-applied forever"
            cluster.kubectl("-n", namespace, "delete", obj["kind"], obj["metadata"]["name"], "--wait=false")


def test_contains_still_sees_a_real_difference() -> None:
    assert not contains({"spec": {"replicas": 2}}, {"spec": {"replicas": 3}})
    assert not contains({"spec": {}}, {"spec": {"replicas": 3}})
    assert not contains({"a": True}, {"a": False})
    assert contains({"spec": {}}, {"spec": {"nodeSelector": {}, "tolerations": [], "readOnly": False}})
    assert not contains({"spec": {"tolerations": [{"key": "x"}]}}, {"spec": {"tolerations": []}})
