"""The operator end to end on the local cluster: builds per architecture, safe rollouts, honest status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ROOT, Cluster, OperatorProcess, wait_for

ARCHS = ["sm75", "sm80", "sm89", "sm90"]
TIMEOUT = 180  # a hang guard, not a performance bound


def get(cluster: Cluster, namespace: str, *what: str) -> Any:
    return json.loads(cluster.kubectl("-n", namespace, "get", *what, "-o", "json").stdout)


def apply_model(cluster: Cluster, namespace: str, name: str = "clf", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "pvc://models/clf/model.onnx"}, **spec},
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(body))
    return body


def model_status(cluster: Cluster, namespace: str, name: str = "clf") -> dict[str, Any]:
    return get(cluster, namespace, "inferencemodel", name).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def jobs(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return get(cluster, namespace, "jobs", "-l", "modelfleet.io/model=clf")["items"]


def deployments(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    items = get(cluster, namespace, "deployments", "-l", "modelfleet.io/model=clf")["items"]
    return {d["metadata"]["labels"]["modelfleet.io/architecture"]: d for d in items}


def engine_keys(cluster: Cluster, namespace: str) -> dict[str, str]:
    return {
        a: d["metadata"]["annotations"]["modelfleet.io/engine-key"] for a, d in deployments(cluster, namespace).items()
    }


def wait_ready(cluster: Cluster, namespace: str, name: str = "clf") -> None:
    cluster.kubectl(
        "-n",
        namespace,
        "wait",
        "--for=condition=Ready",
        f"--timeout={TIMEOUT}s",
        f"inferencemodel/{name}",
        timeout=TIMEOUT + 30,
    )


def events(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return get(cluster, namespace, "events", "--field-selector", "involvedObject.kind=InferenceModel")["items"]


@pytest.fixture
def ready_model(cluster: Cluster, model_namespace: str, operator: OperatorProcess) -> Iterator[str]:
    apply_model(cluster, model_namespace, replicas=4)
    wait_ready(cluster, model_namespace)
    wait_for(
        "every Deployment to roll out",
        lambda: (
            len(deployments(cluster, model_namespace)) == 4
            and all(
                (d.get("status") or {}).get("availableReplicas") == d["spec"]["replicas"]
                for d in deployments(cluster, model_namespace).values()
            )
        ),
    )
    yield model_namespace


@pytest.fixture
def cordoned_gpus(cluster: Cluster) -> Iterator[list[str]]:
    """GPU nodes cordoned: build pods wait (Pending) while serving pods stay; uncordoned afterwards."""
    nodes = [
        n["metadata"]["name"]
        for n in json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        if "nvidia.com/gpu.compute.major" in n["metadata"]["labels"]
    ]
    for n in nodes:
        cluster.kubectl("cordon", n)
    try:
        yield nodes
    finally:
        for n in nodes:
            cluster.kubectl("uncordon", n, check=False)


def test_an_example_gets_one_build_per_architecture_then_serves_everywhere(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns = model_namespace
    example = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    example["metadata"]["name"] = "clf"
    example["spec"]["replicas"] = 4
    cluster.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(example))
    wait_ready(cluster, ns)

    built = jobs(cluster, ns)
    assert sorted(j["metadata"]["labels"]["modelfleet.io/architecture"] for j in built) == ARCHS
    for job in built:
        arch = job["metadata"]["labels"]["modelfleet.io/architecture"]
        pods = get(cluster, ns, "pods", "-l", f"job-name={job['metadata']['name']}")["items"]
        node = json.loads(cluster.kubectl("get", "node", pods[0]["spec"]["nodeName"], "-o", "json").stdout)
        labels = node["metadata"]["labels"]
        assert f"sm{labels['nvidia.com/gpu.compute.major']}{labels['nvidia.com/gpu.compute.minor']}" == arch

    deps = wait_for(
        "4 available Deployments",
        lambda: (
            (d := deployments(cluster, ns))
            and len(d) == 4
            and all((x.get("status") or {}).get("availableReplicas", 0) >= 1 for x in d.values())
            and d
        ),
    )
    assert sorted(deps) == ARCHS
    assert sum(d["spec"]["replicas"] for d in deps.values()) == 4
    svc = get(cluster, ns, "service", "clf")
    assert svc["spec"]["selector"] == {"modelfleet.io/model": "clf", "modelfleet.io/component": "serving"}

    status = model_status(cluster, ns)
    im = get(cluster, ns, "inferencemodel", "clf")
    assert status["observedGeneration"] == im["metadata"]["generation"]
    assert status["engineSummary"] == "4/4"
    assert {e["phase"] for e in status["engines"]} == {"Ready"}
    for c in status["conditions"]:
        assert c["observedGeneration"] == im["metadata"]["generation"]
    assert condition(status, "Ready")["status"] == "True"
    assert (condition(status, "Reconciling")["status"], condition(status, "Stalled")["status"]) == ("False", "False")
    assert condition(status, "Serving")["reason"] == "CurrentGeneration"
    table = cluster.kubectl("-n", ns, "get", "im", "clf").stdout
    assert "4/4" in table.splitlines()[1] and "True" in table.splitlines()[1]
    reasons = {e["reason"] for e in events(cluster, ns)}
    assert {"BuildStarted", "EngineReady", "DeploymentCreated", "Ready"} <= reasons


def test_a_precision_change_builds_first_and_rolls_only_when_engines_are_ready(
    cluster: Cluster, ready_model: str, cordoned_gpus: list[str]
) -> None:
    ns = ready_model
    before_jobs = {j["metadata"]["name"] for j in jobs(cluster, ns)}
    before_keys = engine_keys(cluster, ns)
    before_generations = {a: d["metadata"]["generation"] for a, d in deployments(cluster, ns).items()}
    cluster.kubectl(
        "-n",
        ns,
        "patch",
        "inferencemodel",
        "clf",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"engine": {"precision": "fp32"}}}),
    )

    new_jobs = wait_for(
        "4 new build Jobs",
        lambda: (n := {j["metadata"]["name"] for j in jobs(cluster, ns)} - before_jobs) and len(n) == 4 and n,
    )
    status = wait_for(
        "Reconciling=Unschedulable (the builds wait for cordoned nodes)",
        lambda: (
            (s := model_status(cluster, ns))
            and condition(s, "Reconciling").get("reason") == "Unschedulable"
            and s["observedGeneration"] == 2
            and s
        ),
    )
    assert condition(status, "Reconciling")["status"] == "True"
    assert "were unschedulable" in condition(status, "Reconciling")["message"]
    # The builds cannot finish (GPU nodes cordoned): the serving Deployments must be exactly as they were.
    assert engine_keys(cluster, ns) == before_keys
    assert {a: d["metadata"]["generation"] for a, d in deployments(cluster, ns).items()} == before_generations
    # Ready is about generation 2, which does not serve yet; the previous version does, and says so
    assert (condition(status, "Ready")["status"], condition(status, "Ready")["observedGeneration"]) == ("False", 2)
    assert (condition(status, "Serving")["status"], condition(status, "Serving")["reason"]) == (
        "True",
        "PreviousVersion",
    )
    assert condition(status, "EnginesReady")["status"] == "False"

    for node in cordoned_gpus:
        cluster.kubectl("uncordon", node)
    wait_for(
        "Deployments rolled to the new engines",
        lambda: (k := engine_keys(cluster, ns)) and all(k[a] != before_keys[a] for a in ARCHS),
    )
    wait_ready(cluster, ns)
    wait_for(
        "the previous version's Jobs removed",
        lambda: {j["metadata"]["name"] for j in jobs(cluster, ns)} == new_jobs,
    )
    assert {e["reason"] for e in events(cluster, ns)} >= {"RollingOut"}


def test_a_failed_build_keeps_the_previous_version_serving_and_says_why(cluster: Cluster, ready_model: str) -> None:
    ns = ready_model
    before_keys = engine_keys(cluster, ns)
    cluster.kubectl(
        "-n",
        ns,
        "patch",
        "inferencemodel",
        "clf",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"model": {"uri": "pvc://models/clf/broken-export.onnx"}}}),
    )
    status = wait_for(
        "every new build Failed and Stalled=True",
        lambda: (
            (s := model_status(cluster, ns))
            and condition(s, "Stalled").get("status") == "True"
            and {e["phase"] for e in s["engines"]} == {"Failed"}
            and s
        ),
    )
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "InvalidModel" and "previous version still serves" in stalled["message"]
    assert (condition(status, "Ready")["status"], condition(status, "Reconciling")["status"]) == ("False", "False")
    assert (condition(status, "Serving")["status"], condition(status, "Serving")["reason"]) == (
        "True",
        "PreviousVersion",
    )
    assert {e["phase"] for e in status["engines"]} == {"Failed"}
    assert engine_keys(cluster, ns) == before_keys
    warnings = [e for e in events(cluster, ns) if e["type"] == "Warning"]
    assert any(e["reason"] == "BuildFailed" and "InvalidModel" in e["message"] for e in warnings)
    assert any(e["reason"] == "Stalled" for e in warnings)


def test_a_new_architecture_joining_builds_and_serves_and_leaving_removes_it(
    cluster: Cluster, ready_model: str
) -> None:
    ns = ready_model
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "gpu-b200-e2e",
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": "gpu-b200-e2e",
                "type": "kwok",
                "nvidia.com/gpu.product": "NVIDIA-B200",
                "nvidia.com/gpu.compute.major": "10",
                "nvidia.com/gpu.compute.minor": "0",
                "nvidia.com/gpu.count": "8",
            },
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"},
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "8"},
        },
    }
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
        wait_for(
            "a build Job for sm100",
            lambda: any(j["metadata"]["labels"]["modelfleet.io/architecture"] == "sm100" for j in jobs(cluster, ns)),
        )
        wait_for("a Deployment for sm100", lambda: "sm100" in deployments(cluster, ns))
        assert wait_for(
            "sm100 engine Ready",
            lambda: any(
                e["architecture"] == "sm100" and e["phase"] == "Ready" for e in model_status(cluster, ns)["engines"]
            ),
        )
    finally:
        cluster.kubectl("delete", "node", "gpu-b200-e2e", "--wait=true")
    wait_for("the sm100 Deployment removed", lambda: "sm100" not in deployments(cluster, ns))
    assert sorted(deployments(cluster, ns)) == ARCHS
    assert "ArchitectureRemoved" in {e["reason"] for e in events(cluster, ns)}


def test_kubectl_scale_sets_replicas_split_across_architectures(cluster: Cluster, ready_model: str) -> None:
    ns = ready_model
    cluster.kubectl("-n", ns, "scale", "inferencemodel/clf", "--replicas=7")
    wait_for(
        "7 replicas in all",
        lambda: sum(d["spec"]["replicas"] for d in deployments(cluster, ns).values()) == 7,
    )
    wait_for("status.replicas == 7", lambda: model_status(cluster, ns).get("replicas") == 7)
    scale = json.loads(
        cluster.kubectl(
            "-n",
            ns,
            "get",
            "--raw",
            f"/apis/modelfleet.io/v1alpha1/namespaces/{ns}/inferencemodels/clf/scale",
        ).stdout
    )
    assert scale["spec"]["replicas"] == 7
    assert scale["status"]["selector"] == "modelfleet.io/model=clf,modelfleet.io/component=serving"


def test_an_operator_killed_mid_reconcile_restarts_without_duplicates(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns = model_namespace
    apply_model(cluster, ns, replicas=2)
    wait_for("the first build Job", lambda: jobs(cluster, ns))
    operator.kill()
    operator.start()
    wait_ready(cluster, ns)
    wait_for("all 4 engines", lambda: model_status(cluster, ns).get("engineSummary") == "4/4")
    wait_for("4 Deployments", lambda: len(deployments(cluster, ns)) == 4)
    built = jobs(cluster, ns)
    assert sorted(j["metadata"]["labels"]["modelfleet.io/architecture"] for j in built) == ARCHS
    assert len(deployments(cluster, ns)) == 4
    assert model_status(cluster, ns)["engineSummary"] == "4/4"


def test_deleting_the_model_garbage_collects_its_children(cluster: Cluster, ready_model: str) -> None:
    ns = ready_model
    cluster.kubectl("-n", ns, "delete", "inferencemodel", "clf", "--wait=true", timeout=TIMEOUT)
    wait_for(
        "children gone",
        lambda: (
            not jobs(cluster, ns)
            and not deployments(cluster, ns)
            and not get(cluster, ns, "services", "-l", "modelfleet.io/model=clf")["items"]
        ),
    )


def test_every_generated_pod_is_admitted_by_restricted_pod_security(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns = model_namespace
    cluster.kubectl(
        "label",
        "namespace",
        ns,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    apply_model(cluster, ns, replicas=4)
    wait_ready(cluster, ns)
    pods = get(cluster, ns, "pods", "-l", "modelfleet.io/model=clf")["items"]
    components = {p["metadata"]["labels"]["modelfleet.io/component"] for p in pods}
    assert components == {"build", "serving"}
    refused = [e for e in get(cluster, ns, "events")["items"] if e["reason"] in {"FailedCreate"}]
    assert refused == []


def test_a_pinned_architecture_without_nodes_is_reported(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns = model_namespace
    apply_model(cluster, ns, engine={"architectures": ["sm90", "sm100"]})
    # sm100 has no node: the spec cannot go live as written (Stalled, kstatus Failed), while sm90 serves
    status = wait_for(
        "sm90 serving and Stalled=True",
        lambda: (
            (s := model_status(cluster, ns))
            and condition(s, "Serving").get("status") == "True"
            and condition(s, "Stalled").get("status") == "True"
            and s
        ),
    )
    assert [e["architecture"] for e in status["engines"]] == ["sm90"]
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "NoEligibleNodes" and "sm100" in stalled["message"]
    assert condition(status, "Ready")["status"] == "False"


def test_autoscaling_takes_over_replicas_and_explains_itself(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    # KWOK pods run nothing and have loopback IPs: every scrape is refused, so metrics are unavailable.
    # The HPA then neither scales down nor guesses up; the model runs minReplicas and says why.
    ns = model_namespace
    apply_model(cluster, ns, replicas=1, autoscaling={"minReplicas": 5, "maxReplicas": 12, "targetQPSPerReplica": 50})
    wait_ready(cluster, ns)
    wait_for(
        "5 replicas (minReplicas)", lambda: sum(d["spec"]["replicas"] for d in deployments(cluster, ns).values()) == 5
    )
    status = wait_for("status.autoscaler", lambda: model_status(cluster, ns).get("autoscaler"), timeout=120)
    assert status["desiredReplicas"] == 5
    assert status["reason"]
    assert wait_for(
        "an autoscaler Event",
        lambda: [e for e in events(cluster, ns) if e["reason"] in {"MetricsUnavailable", "NoChange", "ScaledUp"}],
        timeout=120,
    )
