"""Placement that knows free GPUs: replicas go where there is room, and what cannot be placed is said, not Pending."""

from __future__ import annotations

import copy
from typing import Any

from modelfleet_operator.capacity import GpuPod, OwnPod, free_gpus, gpu_pod, insufficient, room, unschedulable_reasons
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.reconcile import Observed, Plan, plan
from modelfleet_operator.resources import build_deployment, build_job
from modelfleet_operator.settings import OperatorSettings
from tests.operator.test_reconcile import (
    FLEET,
    NOW,
    SETTINGS,
    cond,
    finished_job,
    kinds,
    model,
    ready_deployment,
    serve,
    with_status,
)

CLAIMS = {"modelfleet-engines": "Bound", "models": "Bound"}
SCHEDULER = (
    "0/5 nodes are available: 1 Insufficient nvidia.com/gpu, 4 node(s) didn't match Pod's node affinity/selector."
)


def pod(gpus: int | None, *, node: str = "gpu-sm90", phase: str = "Running", where: str = "requests") -> dict[str, Any]:
    resources = {where: {"nvidia.com/gpu": str(gpus)}} if gpus is not None else {}
    return {
        "metadata": {"namespace": "other", "name": f"p-{node}-{gpus}"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": resources}]},
        "status": {"phase": phase},
    }


def filling(node: str, gpus: int, *, build: bool = False) -> list[GpuPod]:
    """Pods of another team holding `gpus` GPUs of `node`, one each."""
    return [GpuPod(namespace="other", name=f"{node}-{i}", node=node, gpus=1, build=build) for i in range(gpus)]


def built(im: Any, **observed: Any) -> tuple[Any, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The model after its first pass, its builds finished with engines: what the second pass needs."""
    first = plan(im, Observed(nodes=FLEET, claims=CLAIMS, **observed), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(first, "Job")]
    results = {
        j["metadata"]["name"]: {"phase": "Ready", "key": "k-" + j["metadata"]["labels"]["modelfleet.io/architecture"]}
        for j in jobs
    }
    return with_status(im, first.status), jobs, results


def replicas(p: Plan) -> dict[str, int]:
    return {
        d["metadata"]["labels"]["modelfleet.io/architecture"]: d["spec"]["replicas"] for d in kinds(p, "Deployment")
    }


def test_a_pods_gpus_are_read_from_requests_or_limits_and_finished_pods_hold_none() -> None:
    assert gpu_pod(pod(2)) == GpuPod(namespace="other", name="p-gpu-sm90-2", node="gpu-sm90", gpus=2)
    assert gpu_pod(pod(1, where="limits")) is not None and gpu_pod(pod(1, where="limits")).gpus == 1  # type: ignore[union-attr]
    assert gpu_pod(pod(None)) is None
    assert gpu_pod(pod(4, phase="Succeeded")) is None and gpu_pod(pod(4, phase="Failed")) is None
    nodes = [NodeInfo(name="a", gpus=8, allocatable=7), NodeInfo(name="b", gpus=4)]
    held = [GpuPod("x", "1", "a", 3), GpuPod("x", "2", "b", 6), GpuPod("x", "3", "", 2)]  # an unbound pod holds none
    assert free_gpus(nodes, held) == {"a": 4, "b": 0}


def test_room_counts_whole_replicas_the_models_own_pods_and_ever() -> None:
    nodes = [NodeInfo(name="a", gpus=8), NodeInfo(name="b", gpus=8)]
    rooms = room({"sm90": ["a", "b"]}, nodes, filling("a", 7) + filling("b", 2), gpus=2, own={"sm90": 1})
    assert rooms["sm90"] is not None
    assert (rooms["sm90"].now, rooms["sm90"].ever) == (0 + 3 + 1, 8)
    assert room({"cpu": ["c"]}, nodes, [], gpus=0, own={}) == {"cpu": None}  # GPUs do not limit a CPU model


def test_a_new_model_goes_to_the_architecture_with_room_not_the_newest_full_one() -> None:
    busy = filling("gpu-sm90", 8)
    im, jobs, results = built(model(), gpu_pods=busy)
    p = plan(
        im,
        Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=busy, claims=CLAIMS),
        settings=SETTINGS,
        now=NOW,
    )
    assert replicas(p) == {"sm75": 0, "sm80": 0, "sm89": 1, "sm90": 0}
    assert cond(p, "Stalled")["status"] == "False"
    assert cond(p, "Reconciling")["reason"] == "RollingOut"  # waiting for its pod, not for capacity


def test_replicas_beyond_what_the_fleet_can_ever_hold_are_stalled_and_none_is_left_pending() -> None:
    im, jobs, results = built(model(replicas=1000))
    p = plan(im, Observed(nodes=FLEET, jobs=jobs, build_results=results, claims=CLAIMS), settings=SETTINGS, now=NOW)
    assert sum(replicas(p).values()) == 32  # 4 nodes x 8 GPUs: not one Pending pod more
    stalled = cond(p, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InsufficientCapacity")
    assert "1000 replicas asked" in stalled["message"] and "ever hold 32" in stalled["message"]
    assert (cond(p, "Ready")["status"], cond(p, "Reconciling")["status"]) == ("False", "False")
    assert [e.reason for e in p.events if e.type == "Warning"] == ["Stalled"]


def test_replicas_that_wait_for_free_gpus_say_so_and_one_pod_waits_when_every_gpu_is_taken() -> None:
    busy = filling("gpu-sm90", 7) + filling("gpu-sm89", 8) + filling("gpu-sm80", 7) + filling("gpu-sm75", 8)
    im, jobs, results = built(model(replicas=5), gpu_pods=busy)
    p = plan(
        im,
        Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=busy, claims=CLAIMS),
        settings=SETTINGS,
        now=NOW,
    )
    assert replicas(p) == {"sm75": 0, "sm80": 1, "sm89": 0, "sm90": 1}
    waiting = cond(p, "Reconciling")
    assert (waiting["status"], waiting["reason"]) == ("True", "InsufficientCapacity")
    assert waiting["message"].startswith("2 of 5 replicas placed: no free nvidia.com/gpu for more on ")
    assert cond(p, "Stalled")["status"] == "False"  # the fleet could hold 5: this is waiting, not stuck

    full = busy + filling("gpu-sm90", 1) + filling("gpu-sm80", 1)
    p = plan(
        im,
        Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=full, claims=CLAIMS),
        settings=SETTINGS,
        now=NOW,
    )
    assert sum(replicas(p).values()) == 1 and replicas(p)["sm90"] == 1  # a pod the scheduler places when a GPU frees


def test_gpus_held_by_builds_are_room_for_serving_when_serving_outranks_them() -> None:
    builds = filling("gpu-sm90", 8, build=True)
    ranked = OperatorSettings(serving_priority_class="modelfleet-serving", build_priority_class="modelfleet-build")
    im, jobs, results = built(model())
    observed = Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=builds, claims=CLAIMS)
    assert replicas(plan(im, observed, settings=SETTINGS, now=NOW))["sm90"] == 0
    assert replicas(plan(im, observed, settings=ranked, now=NOW))["sm90"] == 1  # the scheduler preempts a build


def test_pods_get_the_priority_classes_builds_below_serving() -> None:
    ranked = OperatorSettings(serving_priority_class="modelfleet-serving", build_priority_class="modelfleet-build")
    im = model()
    job = build_job(im, arch="sm90", build_id="b", settings=ranked)
    dep = build_deployment(im, arch="sm90", engine_key_="k", replicas=1, settings=ranked)
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "modelfleet-build"
    assert dep["spec"]["template"]["spec"]["priorityClassName"] == "modelfleet-serving"
    assert (
        "priorityClassName"
        not in build_job(im, arch="sm90", build_id="b", settings=SETTINGS)["spec"]["template"]["spec"]
    )


def test_an_unschedulable_build_names_the_resource_and_architecture() -> None:
    im = model()
    first = plan(im, Observed(nodes=FLEET, claims=CLAIMS), settings=SETTINGS, now=NOW)
    jobs = kinds(first, "Job")
    pending = [
        OwnPod(name="clf-sm90-build-x", component="build", architecture="sm90", node="", unschedulable=SCHEDULER)
    ]
    p = plan(
        with_status(im, first.status),
        Observed(nodes=FLEET, jobs=jobs, pods=pending, claims=CLAIMS),
        settings=SETTINGS,
        now=NOW,
    )
    reconciling, ready = cond(p, "Reconciling"), cond(p, "Ready")
    assert (reconciling["status"], reconciling["reason"]) == ("True", "Unschedulable")
    assert reconciling["message"].startswith(
        "insufficient nvidia.com/gpu on sm90 (build pod clf-sm90-build-x: 0/5 nodes"
    )
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    assert insufficient("0/3 nodes are available: 3 node(s) had untolerated taint") == ""
    assert unschedulable_reasons(
        [OwnPod("p", "serving", "sm80", "", "0/3 nodes are available: 3 node(s) had untolerated taint")]
    ) == ["cannot place on sm80 (serving pod p: 0/3 nodes are available: 3 node(s) had untolerated taint)"]


def test_a_missing_claim_is_stalled_at_once_naming_it_and_no_build_waits_on_it() -> None:
    im = model()
    p = plan(im, Observed(nodes=FLEET, claims={"models": "Bound"}), settings=SETTINGS, now=NOW)
    stalled = cond(p, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "ClaimNotFound")
    assert stalled["message"] == "PersistentVolumeClaim modelfleet-engines (the engine store) not found in namespace ml"
    assert kinds(p, "Job") == []
    assert (cond(p, "Ready")["status"], cond(p, "Reconciling")["status"]) == ("False", "False")
    lost = plan(im, Observed(nodes=FLEET, claims={**CLAIMS, "models": "Lost"}), settings=SETTINGS, now=NOW)
    assert cond(lost, "Stalled")["message"] == "PersistentVolumeClaim models (the model) lost its volume"
    created = plan(with_status(im, p.status), Observed(nodes=FLEET, claims=CLAIMS), settings=SETTINGS, now=NOW)
    assert len(kinds(created, "Job")) == 4 and cond(created, "Stalled")["status"] == "False"


def _grow(p: Plan, available: int) -> list[dict[str, Any]]:
    """The Deployments of a plan as the cluster holds them once applied, with `available` pods each."""
    out = []
    for desired in kinds(p, "Deployment"):
        dep = ready_deployment(desired)
        n = dep["spec"]["replicas"]
        dep["status"].update({"availableReplicas": min(n, available), "readyReplicas": min(n, available)})
        out.append(dep)
    return out


def test_a_scale_up_onto_new_architectures_keeps_ready_true_and_reports_progress() -> None:
    im, jobs, deployments = serve(model(replicas=1))
    assert {d["metadata"]["labels"]["modelfleet.io/architecture"]: d["spec"]["replicas"] for d in deployments}[
        "sm90"
    ] == 1
    assert (
        cond(plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW), "Ready")[
            "status"
        ]
        == "True"
    )
    scaled = with_status(model(replicas=3), im.model_dump(mode="json", by_alias=True)["status"], generation=2)
    first = plan(scaled, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert sum(replicas(first).values()) == 3 and sum(1 for n in replicas(first).values() if n) == 3
    unobserved = _grow(first, available=1)
    for dep in unobserved:  # sm90 serves; the Deployment controller has not seen the others' new replicas yet
        if dep["metadata"]["labels"]["modelfleet.io/architecture"] != "sm90":
            dep["metadata"]["generation"] = 2
            dep["status"] = {"observedGeneration": 1, "replicas": 0, "updatedReplicas": 0, "availableReplicas": 0}
    racing = plan(
        with_status(scaled, first.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=unobserved),
        settings=SETTINGS,
        now=NOW,
    )
    assert (cond(racing, "Ready")["status"], cond(racing, "Reconciling")["status"]) == ("True", "True")
    growing = _grow(first, available=0)
    for dep in growing:  # the one that served keeps its pod
        if dep["spec"]["replicas"] and dep["metadata"]["labels"]["modelfleet.io/architecture"] == "sm90":
            dep["status"].update({"availableReplicas": 1, "readyReplicas": 1})
    during = plan(
        with_status(scaled, first.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=growing),
        settings=SETTINGS,
        now=NOW,
    )
    for p in (first, during):
        ready, reconciling = cond(p, "Ready"), cond(p, "Reconciling")
        assert (ready["status"], ready["reason"]) == ("True", "Serving"), ready
        assert "scaling onto" in ready["message"]
        assert (reconciling["status"], reconciling["reason"]) == ("True", "RollingOut")
        assert not [e for e in p.events if e.type == "Warning"]
    done = plan(
        with_status(scaled, during.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=_grow(first, 1)),
        settings=SETTINGS,
        now=NOW,
    )
    assert (cond(done, "Ready")["status"], cond(done, "Reconciling")["status"]) == ("True", "False")


def test_a_rollout_of_a_new_pod_template_is_not_mistaken_for_scaling() -> None:
    im, jobs, deployments = serve(model(replicas=1))
    changed = with_status(
        model(replicas=1, serving={"resources": {"memory": "3Gi"}}),
        im.model_dump(mode="json", by_alias=True)["status"],
        generation=2,
    )
    p = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert (cond(p, "Ready")["status"], cond(p, "Ready")["reason"]) == ("False", "RollingOut")
    assert copy.deepcopy(p.status)["observedGeneration"] == 2
