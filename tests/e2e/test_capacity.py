"""Capacity on the local cluster: replicas go where GPUs are free, and what cannot run is said in conditions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Cluster, OperatorProcess, bound_pvc, wait_for
from tests.e2e.test_operator import apply_model, condition, deployments, get, model_status, wait_ready

pytestmark = pytest.mark.e2e
FILLER = "filler"
FLEET_GPUS = 28  # hack/fleet.py's KWOK fleet: 8 on each of sm90, sm89, sm80 and 4 on sm75


def fill(cluster: Cluster, namespace: str, node: str, gpus: int) -> None:
    """Another team's pods holding `gpus` GPUs of `node` (one each), Running."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": FILLER, "namespace": namespace},
        "spec": {
            "replicas": gpus,
            "selector": {"matchLabels": {"app": FILLER}},
            "template": {
                "metadata": {"labels": {"app": FILLER}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{"name": "c", "image": "filler", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(deployment))
    wait_for(
        f"{gpus} filler pods running on {node}",
        lambda: (get(cluster, namespace, "deployment", FILLER).get("status") or {}).get("availableReplicas", 0) == gpus,
    )


@pytest.fixture
def other_team(cluster: Cluster) -> Iterator[str]:
    name = "other-team"
    cluster.kubectl("create", "namespace", name, check=False)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=true", timeout=300)


def model_pods(cluster: Cluster, namespace: str, component: str) -> list[dict[str, Any]]:
    return get(cluster, namespace, "pods", "-l", f"modelfleet.io/component={component}")["items"]


def timed(what: str, check: Any, timeout: float = 120) -> tuple[Any, float]:
    start = time.monotonic()
    value = wait_for(what, check, timeout=timeout)
    return value, time.monotonic() - start


def test_a_build_with_no_free_gpu_is_unschedulable_by_name_and_runs_when_one_frees(
    cluster: Cluster, model_namespace: str, other_team: str, operator: OperatorProcess
) -> None:
    fill(cluster, other_team, "gpu-h100-0", 8)
    apply_model(cluster, model_namespace)
    status, seconds = timed(
        "Reconciling=Unschedulable naming sm90",
        lambda: (
            (s := model_status(cluster, model_namespace))
            and condition(s, "Reconciling").get("reason") == "Unschedulable"
            and s
        ),
    )
    print(f"unschedulable build reported {seconds:.1f} s after apply")
    reconciling = condition(status, "Reconciling")
    assert reconciling["status"] == "True"
    assert reconciling["message"].startswith("insufficient nvidia.com/gpu on sm90 (build pod ")
    assert (condition(status, "Ready")["status"], condition(status, "Ready")["reason"]) == ("False", "Unschedulable")
    assert condition(status, "Stalled")["status"] == "False"  # waiting for a GPU is not stuck
    job = next(
        j
        for j in get(cluster, model_namespace, "jobs")["items"]
        if j["metadata"]["labels"]["modelfleet.io/architecture"] == "sm90"
    )
    cluster.kubectl("-n", model_namespace, "delete", "job", job["metadata"]["name"], "--wait=true")
    _, seconds = timed(
        "the deleted build Job recreated",
        lambda: (
            (j := get_or_none(cluster, model_namespace, "job", job["metadata"]["name"]))
            and j["metadata"]["uid"] != job["metadata"]["uid"]
        ),
    )
    print(f"a deleted build Job was recreated after {seconds:.1f} s")

    cluster.kubectl("-n", other_team, "scale", "deployment", FILLER, "--replicas=7")
    wait_ready(cluster, model_namespace)
    build_priority = {p["spec"].get("priority") for p in model_pods(cluster, model_namespace, "build")}
    serving_priority = {p["spec"].get("priority") for p in model_pods(cluster, model_namespace, "serving")}
    assert build_priority <= {1000} and serving_priority == {100000}  # the chart's classes, builds below serving


def test_ten_one_replica_models_all_get_ready_on_the_architectures_with_room(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    names = [f"m{i}" for i in range(10)]
    for name in names:
        apply_model(cluster, model_namespace, name=name)
    for name in names:
        wait_ready(cluster, model_namespace, name)
    pending = [
        p["metadata"]["name"] for p in model_pods(cluster, model_namespace, "serving") if not p["spec"].get("nodeName")
    ]
    assert pending == []
    per_arch: dict[str, int] = {}
    for name in names:
        for arch, dep in deployments_of(cluster, model_namespace, name).items():
            per_arch[arch] = per_arch.get(arch, 0) + dep["spec"]["replicas"]
    print(f"replicas of 10 one-replica models by architecture: {per_arch}")
    assert (
        sum(per_arch.values()) == 10 and per_arch.get("sm90", 0) <= 8 and len([n for n in per_arch.values() if n]) >= 2
    )


def deployments_of(cluster: Cluster, namespace: str, model: str) -> dict[str, dict[str, Any]]:
    items = get(cluster, namespace, "deployments", "-l", f"modelfleet.io/model={model}")["items"]
    return {d["metadata"]["labels"]["modelfleet.io/architecture"]: d for d in items}


def test_replicas_beyond_the_fleet_are_stalled_not_a_thousand_pending_pods(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    apply_model(cluster, model_namespace, replicas=1000)
    status, seconds = timed(
        "Stalled=InsufficientCapacity",
        lambda: (
            (s := model_status(cluster, model_namespace))
            and condition(s, "Stalled").get("reason") == "InsufficientCapacity"
            and s
        ),
        timeout=240,
    )
    print(f"replicas 1000 reported Stalled {seconds:.1f} s after apply")
    stalled = condition(status, "Stalled")
    assert stalled["status"] == "True" and "1000 replicas asked" in stalled["message"]
    assert f"ever hold {FLEET_GPUS}" in stalled["message"]
    assert condition(status, "Ready")["status"] == "False"
    total = sum(d["spec"]["replicas"] for d in deployments(cluster, model_namespace).values())
    assert 0 < total <= FLEET_GPUS


def test_a_missing_claim_is_stalled_within_seconds_naming_it_and_creating_it_unblocks(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    bound_pvc(cluster, namespace, "models")  # the engine store claim is missing
    apply_model(cluster, namespace)
    status, seconds = timed(
        "Stalled=ClaimNotFound",
        lambda: (s := model_status(cluster, namespace)) and condition(s, "Stalled").get("status") == "True" and s,
    )
    print(f"missing claim reported {seconds:.1f} s after apply")
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "ClaimNotFound"
    assert (
        stalled["message"]
        == f"PersistentVolumeClaim modelfleet-engines (the engine store) not found in namespace {namespace}"
    )
    assert get(cluster, namespace, "jobs")["items"] == []  # no build waits out its deadline on a missing claim
    bound_pvc(cluster, namespace, "modelfleet-engines")
    wait_ready(cluster, namespace)
    assert condition(model_status(cluster, namespace), "Stalled")["status"] == "False"


def test_every_kind_of_child_deleted_or_edited_is_repaired_within_seconds(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns = model_namespace
    apply_model(cluster, ns, replicas=2)
    wait_ready(cluster, ns)
    service = get(cluster, ns, "service", "clf")
    timings: dict[str, float] = {}

    cluster.kubectl("-n", ns, "delete", "service", "clf", "--wait=true")
    _, timings["Service deleted"] = timed(
        "the Service recreated",
        lambda: (
            (s := get_or_none(cluster, ns, "service", "clf")) and s["metadata"]["uid"] != service["metadata"]["uid"]
        ),
    )
    patch = {"spec": {"selector": {"modelfleet.io/model": "someone-else"}}}
    cluster.kubectl("-n", ns, "patch", "service", "clf", "--type=merge", "-p", json.dumps(patch))
    _, timings["Service selector edited"] = timed(
        "the Service selector restored",
        lambda: get(cluster, ns, "service", "clf")["spec"]["selector"] == service["spec"]["selector"],
    )
    arch, dep = next((a, d) for a, d in deployments(cluster, ns).items() if d["spec"]["replicas"] > 0)
    name = dep["metadata"]["name"]
    cluster.kubectl("-n", ns, "scale", "deployment", name, "--replicas=5")
    _, timings["Deployment scaled"] = timed(
        "the Deployment's replicas restored",
        lambda: get(cluster, ns, "deployment", name)["spec"]["replicas"] == dep["spec"]["replicas"],
    )
    cluster.kubectl("-n", ns, "delete", "deployment", name, "--wait=true")
    _, timings["Deployment deleted"] = timed(
        "the Deployment recreated",
        lambda: (d := get_or_none(cluster, ns, "deployment", name)) and d["metadata"]["uid"] != dep["metadata"]["uid"],
    )
    print("repaired after: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    wait_ready(cluster, ns)
    assert deployments(cluster, ns)[arch]["spec"]["replicas"] == dep["spec"]["replicas"]


def get_or_none(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_a_scale_up_onto_new_architectures_never_turns_ready_false(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns = model_namespace
    apply_model(cluster, ns, replicas=1)
    wait_ready(cluster, ns)
    serving = {a for a, d in deployments(cluster, ns).items() if d["spec"]["replicas"]}
    before = condition(model_status(cluster, ns), "Ready")
    earlier = {e["metadata"]["name"] for e in model_events(cluster, ns)}
    cluster.kubectl("-n", ns, "scale", "inferencemodel", "clf", "--replicas=3")
    wait_for(
        "3 architectures serving generation 2, rolled out",
        lambda: (
            (s := model_status(cluster, ns))
            and s["observedGeneration"] == 2
            and condition(s, "Reconciling").get("status") == "False"
            and sum(1 for d in deployments(cluster, ns).values() if (d.get("status") or {}).get("availableReplicas"))
            == 3
        ),
    )
    after = condition(model_status(cluster, ns), "Ready")
    added = {a for a, d in deployments(cluster, ns).items() if d["spec"]["replicas"]} - serving
    assert len(added) == 2, "the scale-up added two architectures"
    # A Ready that had turned False and back would carry a new lastTransitionTime.
    assert (after["status"], after["observedGeneration"]) == ("True", 2)
    assert after["lastTransitionTime"] == before["lastTransitionTime"]
    since = [e for e in model_events(cluster, ns) if e["metadata"]["name"] not in earlier]
    assert [e["reason"] for e in since if e["type"] == "Warning"] == []


def model_events(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return get(cluster, namespace, "events", "--field-selector", "involvedObject.kind=InferenceModel")["items"]
