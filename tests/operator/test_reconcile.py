"""The pure reconcile decisions: builds before rolls, failures never take serving down, nothing twice."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from modelfleet_operator.api import InferenceModel, parse_inference_model
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.reconcile import (
    Observed,
    Plan,
    jobs_awaiting_results,
    parse_termination_message,
    plan,
)
from modelfleet_operator.resources import (
    ANNOTATION_ENGINE_KEY,
    ANNOTATION_TEMPLATE_SINCE,
    build_deployment,
    build_identity,
    build_options,
    deployment_name,
    job_name,
)
from modelfleet_operator.settings import OperatorSettings
from modelfleet_runtime.build.options import parse_options
from modelfleet_runtime.settings import ServeSettings

NOW = datetime(2026, 11, 21, 9, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
FLEET = [
    NodeInfo(
        name=f"gpu-{arch}",
        labels={"nvidia.com/gpu.compute.major": arch[2], "nvidia.com/gpu.compute.minor": arch[3:]},
        taints=(GPU_TAINT,),
        gpus=8,
    )
    for arch in ("sm75", "sm80", "sm89", "sm90")
] + [NodeInfo(name="cpu-0", labels={}, gpus=0)]
ARCHS = ["sm75", "sm80", "sm89", "sm90"]


def model(**spec: Any) -> InferenceModel:
    body = {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "clf", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "pvc://models/clf/model.onnx"}, **spec},
    }
    return parse_inference_model(body)


def with_status(im: InferenceModel, status: dict[str, Any], generation: int | None = None) -> InferenceModel:
    body = im.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = status
    if generation is not None:
        body["metadata"]["generation"] = generation
    return parse_inference_model(body)


def finished_job(job: dict[str, Any], ok: bool = True) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["status"] = {
        "conditions": [
            {
                "type": "Complete" if ok else "Failed",
                "status": "True",
                "reason": "" if ok else "PodFailurePolicy",
                "message": "",
            }
        ]
    }
    return job


def ready_deployment(dep: dict[str, Any]) -> dict[str, Any]:
    dep = copy.deepcopy(dep)
    n = dep["spec"]["replicas"]
    # As the API server has it: at least the generation its template was applied at, all observed.
    generation = int((dep["metadata"].get("annotations") or {}).get(ANNOTATION_TEMPLATE_SINCE, 1))
    dep["metadata"]["generation"] = generation
    dep["status"] = {
        "observedGeneration": generation,
        "replicas": n,
        "updatedReplicas": n,
        "readyReplicas": n,
        "availableReplicas": n,
    }
    return dep


def kinds(p: Plan, kind: str) -> list[dict[str, Any]]:
    return [o for o in p.apply if o["kind"] == kind]


def cond(p: Plan, type_: str) -> dict[str, Any]:
    return next(c for c in p.status["conditions"] if c["type"] == type_)


def serve(
    im: InferenceModel, nodes: list[NodeInfo] = FLEET
) -> tuple[InferenceModel, list[dict[str, Any]], list[dict[str, Any]]]:
    """Drive a model to Ready: plan, finish every build, plan, roll every Deployment, plan."""
    first = plan(im, Observed(nodes=nodes), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(first, "Job")]
    results = {
        j["metadata"]["name"]: {
            "phase": "Ready",
            "key": "k-" + j["metadata"]["labels"]["modelfleet.io/architecture"] + "-" + im.spec.engine.precision,
            "backend": "tensorrt",
            "backendVersion": "10.3",
        }
        for j in jobs
    }
    im = with_status(im, first.status)
    second = plan(im, Observed(nodes=nodes, jobs=jobs, build_results=results), settings=SETTINGS, now=NOW)
    deployments = [ready_deployment(d) for d in kinds(second, "Deployment")]
    im = with_status(im, second.status)
    third = plan(im, Observed(nodes=nodes, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    return with_status(im, third.status), jobs, deployments


def test_a_new_model_gets_one_build_job_per_architecture_and_no_deployment_yet() -> None:
    p = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = kinds(p, "Job")
    assert sorted(j["metadata"]["labels"]["modelfleet.io/architecture"] for j in jobs) == ARCHS
    assert kinds(p, "Deployment") == []
    assert len(kinds(p, "Service")) == 1
    assert cond(p, "EnginesReady")["status"] == "False" and cond(p, "EnginesReady")["reason"] == "Building"
    assert cond(p, "Ready")["status"] == "False"
    assert (cond(p, "Reconciling")["status"], cond(p, "Reconciling")["reason"]) == ("True", "Building")
    assert cond(p, "Stalled")["status"] == "False"
    assert cond(p, "Serving")["status"] == "False"
    assert [e.reason for e in p.events] == ["BuildStarted"] * 4
    assert p.status["engineSummary"] == "0/4"
    assert p.status["observedGeneration"] == 1


def test_build_jobs_are_pinned_to_their_architecture_and_parse_back_to_the_same_options() -> None:
    im = model(engine={"precision": "int8", "batch": {"min": 1, "opt": 8, "max": 64}})
    job = next(
        j
        for j in kinds(plan(im, Observed(nodes=FLEET), settings=SETTINGS, now=NOW), "Job")
        if j["metadata"]["labels"]["modelfleet.io/architecture"] == "sm89"
    )
    pod = job["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["8"]} in terms[0]["matchExpressions"]
    assert {"key": "nvidia.com/gpu.compute.minor", "operator": "In", "values": ["9"]} in terms[0]["matchExpressions"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[:2] == ["build", "--model"] and "--architecture" in args
    option_args = args[args.index("--architecture") + 2 :]
    assert parse_options(option_args) == build_options(im.spec, SETTINGS)
    assert job["spec"]["backoffLimit"] == SETTINGS.build_backoff_limit
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_finished_builds_roll_out_deployments_that_serve_their_engine() -> None:
    im, _, deployments = serve(model(replicas=6))
    assert sorted(d["metadata"]["name"] for d in deployments) == sorted(deployment_name("clf", a) for a in ARCHS)
    for dep in deployments:
        arch = dep["metadata"]["labels"]["modelfleet.io/architecture"]
        assert dep["metadata"]["annotations"][ANNOTATION_ENGINE_KEY] == f"k-{arch}-fp16"
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1].endswith(f"/k-{arch}-fp16")
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert sum(d["spec"]["replicas"] for d in deployments) == 6
    assert im.status.engine_summary == "4/4"
    conds = {c.type: c.status for c in im.status.conditions}
    assert conds == {
        "Ready": "True",
        "EnginesReady": "True",
        "Reconciling": "False",
        "Stalled": "False",
        "Serving": "True",
    }
    assert next(c for c in im.status.conditions if c.type == "Serving").reason == "CurrentGeneration"


@pytest.mark.parametrize(("grace", "drain", "runtime"), [(60, 10, 55), (4, 0, 2), (1, 3, 1)])
def test_the_runtime_drains_within_what_the_pod_grace_period_leaves_after_pre_stop(
    grace: int, drain: int, runtime: int
) -> None:
    settings = OperatorSettings(termination_grace_seconds=grace, drain_seconds=drain)
    dep = build_deployment(model(), arch=ARCHS[0], engine_key_="k", replicas=1, settings=settings)
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] == grace + drain
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == drain
    assert env["MODELFLEET_DRAIN_GRACE_SECONDS"] == str(runtime)
    served = ServeSettings(model="m.onnx", name="m", drain_grace_seconds=env["MODELFLEET_DRAIN_GRACE_SECONDS"])
    assert served.drain_grace_seconds == runtime


def test_a_settled_model_is_a_fixed_point_no_writes_no_events() -> None:
    im, jobs, deployments = serve(model())
    p = plan(
        im,
        Observed(nodes=FLEET, jobs=jobs, deployments=deployments),
        settings=SETTINGS,
        now=NOW.replace(hour=10),
    )
    assert p.events == []
    assert p.status == im.model_dump(mode="json", by_alias=True, exclude_none=True)["status"]
    assert kinds(p, "Job") == []  # finished builds are not applied again
    assert p.delete == []


def test_a_precision_change_builds_new_engines_while_old_deployments_keep_serving() -> None:
    im, jobs, deployments = serve(model())
    changed = with_status(
        model(engine={"precision": "fp32"}), im.model_dump(mode="json", by_alias=True)["status"], generation=2
    )
    p = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    new_jobs = kinds(p, "Job")
    assert len(new_jobs) == 4
    assert not {j["metadata"]["name"] for j in new_jobs} & {j["metadata"]["name"] for j in jobs}
    assert kinds(p, "Deployment") == []  # untouched until the new engines are Ready
    assert p.delete == []  # the old version's Jobs stay until the roll
    # Ready is about generation 2: False until it serves; the old version serving says so on its own
    assert (cond(p, "Ready")["status"], cond(p, "Ready")["observedGeneration"]) == ("False", 2)
    assert (cond(p, "Reconciling")["status"], cond(p, "Reconciling")["reason"]) == ("True", "Building")
    serving = cond(p, "Serving")
    assert (serving["status"], serving["reason"]) == ("True", "PreviousVersion")
    assert "generation 1" in serving["message"] and "k-sm90-fp16" in serving["message"]
    assert p.status["observedGeneration"] == 2


def test_after_the_new_engines_are_ready_deployments_roll_and_old_jobs_go() -> None:
    im, old_jobs, deployments = serve(model())
    changed = with_status(model(engine={"precision": "fp32"}), im.model_dump(mode="json", by_alias=True)["status"])
    p1 = plan(changed, Observed(nodes=FLEET, jobs=old_jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    new_jobs = [finished_job(j) for j in kinds(p1, "Job")]
    results = {
        j["metadata"]["name"]: {
            "phase": "Ready",
            "key": "new-" + j["metadata"]["labels"]["modelfleet.io/architecture"],
        }
        for j in new_jobs
    }
    changed = with_status(changed, p1.status)
    p2 = plan(
        changed,
        Observed(nodes=FLEET, jobs=old_jobs + new_jobs, deployments=deployments, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    rolled = kinds(p2, "Deployment")
    assert {d["metadata"]["annotations"][ANNOTATION_ENGINE_KEY] for d in rolled} == {f"new-{a}" for a in ARCHS}
    assert {e.reason for e in p2.events} >= {"EngineReady", "RollingOut"}
    changed = with_status(changed, p2.status)
    p3 = plan(
        changed,
        Observed(nodes=FLEET, jobs=old_jobs + new_jobs, deployments=[ready_deployment(d) for d in rolled]),
        settings=SETTINGS,
        now=NOW,
    )
    assert sorted(r.name for r in p3.delete) == sorted(j["metadata"]["name"] for j in old_jobs)


def test_a_failed_build_leaves_the_previous_version_serving_and_says_why() -> None:
    im, jobs, deployments = serve(model())
    changed = with_status(
        model(model={"uri": "pvc://models/clf/broken.onnx"}),
        im.model_dump(mode="json", by_alias=True)["status"],
    )
    p1 = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    failed = [finished_job(j, ok=False) for j in kinds(p1, "Job")]
    results = {
        j["metadata"]["name"]: {"phase": "Failed", "reason": "InvalidModel", "message": "not an ONNX model"}
        for j in failed
    }
    changed = with_status(changed, p1.status)
    p2 = plan(
        changed,
        Observed(nodes=FLEET, jobs=jobs + failed, deployments=deployments, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    assert cond(p2, "Ready")["status"] == "False"
    stalled = cond(p2, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "InvalidModel"
    assert "not an ONNX model" in stalled["message"] and "previous version still serves" in stalled["message"]
    assert cond(p2, "Reconciling")["status"] == "False"  # never both True: kstatus reads the first
    assert (cond(p2, "Serving")["status"], cond(p2, "Serving")["reason"]) == ("True", "PreviousVersion")
    assert kinds(p2, "Deployment") == [] and p2.delete == []
    assert [e.reason for e in p2.events].count("BuildFailed") == 4
    assert [e.reason for e in p2.events].count("Stalled") == 1
    assert any(e.type == "Warning" for e in p2.events)
    # and the failure is sticky: the Job gone (TTL) does not start the build again
    changed = with_status(changed, p2.status)
    p3 = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert kinds(p3, "Job") == []


def test_a_job_that_succeeded_without_a_result_is_a_failure_not_a_guess() -> None:
    p1 = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(p1, "Job")]
    p2 = plan(with_status(model(), p1.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert {e["reason"] for e in p2.status["engines"]} == {"NoBuildResult"}
    assert kinds(p2, "Deployment") == []


def test_an_architecture_that_loses_its_nodes_loses_its_deployment() -> None:
    im, jobs, deployments = serve(model())
    without_h100 = [n for n in FLEET if n.name != "gpu-sm90"]
    p = plan(im, Observed(nodes=without_h100, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert [r.name for r in p.delete if r.kind == "Deployment"] == [deployment_name("clf", "sm90")]
    assert any(e.reason == "ArchitectureRemoved" for e in p.events)
    assert "sm90" not in {e["architecture"] for e in p.status["engines"]}


def test_a_new_architecture_joining_gets_its_build() -> None:
    im, jobs, deployments = serve(model())
    b200 = NodeInfo(
        name="gpu-b200",
        labels={"nvidia.com/gpu.compute.major": "10", "nvidia.com/gpu.compute.minor": "0"},
        taints=(GPU_TAINT,),
        gpus=8,
    )
    p = plan(im, Observed(nodes=[*FLEET, b200], jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert [j["metadata"]["labels"]["modelfleet.io/architecture"] for j in kinds(p, "Job")] == ["sm100"]


def test_pinned_architectures_build_only_those_and_flag_the_missing() -> None:
    p = plan(model(engine={"architectures": ["sm90", "sm100"]}), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    assert [j["metadata"]["labels"]["modelfleet.io/architecture"] for j in kinds(p, "Job")] == ["sm90"]
    # the spec cannot go live on this fleet without a change: Failed for kstatus at once, while sm90 builds
    stalled = cond(p, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "NoEligibleNodes") and "sm100" in stalled["message"]
    assert (cond(p, "Ready")["status"], cond(p, "Reconciling")["status"]) == ("False", "False")


def test_no_eligible_node_is_reported_not_crashed() -> None:
    p = plan(model(), Observed(nodes=[NodeInfo(name="cpu-0", labels={})]), settings=SETTINGS, now=NOW)
    assert p.apply == [kinds(p, "Service")[0]]
    assert cond(p, "EnginesReady")["reason"] == "NoEligibleNodes"
    assert (cond(p, "Stalled")["status"], cond(p, "Stalled")["reason"]) == ("True", "NoEligibleNodes")
    assert cond(p, "Reconciling")["status"] == "False"


def test_build_identity_changes_with_what_changes_the_engine_and_only_that() -> None:
    base = build_identity(model(), "sm90", SETTINGS)[0]
    assert build_identity(model(), "sm90", SETTINGS)[0] == base
    assert build_identity(model(replicas=7), "sm90", SETTINGS)[0] == base
    assert build_identity(model(engine={"precision": "fp32"}), "sm90", SETTINGS)[0] != base
    assert build_identity(model(), "sm80", SETTINGS)[0] != base
    assert build_identity(model(serving={"image": "other:1"}), "sm90", SETTINGS)[0] != base
    rebuilt = model()
    rebuilt.metadata["annotations"] = {"modelfleet.io/rebuild": "2026-11-21"}
    assert build_identity(rebuilt, "sm90", SETTINGS)[0] != base
    assert job_name("clf", "sm90", base) != job_name("clf", "sm90", build_identity(rebuilt, "sm90", SETTINGS)[0])


def test_with_pinned_digest_and_known_backend_version_the_build_id_is_the_engine_key() -> None:
    from modelfleet_runtime.build.key import engine_key

    sha = "a" * 64
    settings = OperatorSettings(runtime_backend_versions={"tensorrt": "10.3.0"})
    im = model(model={"uri": "pvc://models/clf/model.onnx", "sha256": sha})
    build_id, exact = build_identity(im, "sm90", settings)
    assert exact
    options = build_options(im.spec, settings).with_backend("tensorrt")
    assert build_id == engine_key(model_digest=sha, options=options, architecture="sm90", backend_version="10.3.0")
    assert not build_identity(model(), "sm90", settings)[1]


def test_long_names_stay_valid_kubernetes_names() -> None:
    name = "a-very-long-model-name-" + "x" * 60
    build_id = build_identity(model(), "sm90", SETTINGS)[0]
    assert len(job_name(name, "sm100", build_id)) <= 63
    assert len(deployment_name(name, "sm100")) <= 63
    assert job_name(name, "sm90", build_id) != job_name(name + "y", "sm90", build_id)


def test_jobs_awaiting_results_are_the_finished_ones_not_yet_recorded() -> None:
    p = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = kinds(p, "Job")
    finished = [finished_job(jobs[0])] + jobs[1:]
    assert jobs_awaiting_results(with_status(model(), p.status), finished) == [jobs[0]["metadata"]["name"]]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('{"phase":"Ready","key":"abc"}', {"phase": "Ready", "key": "abc"}),
        (
            'log line\n{"phase":"Failed","reason":"InvalidModel"}',
            {"phase": "Failed", "reason": "InvalidModel"},
        ),
        ("Traceback: boom", {"message": "Traceback: boom"}),
        ("", {}),
        (None, {}),
    ],
)
def test_termination_messages_parse_or_become_plain_messages(message: str | None, expected: dict[str, Any]) -> None:
    assert parse_termination_message(message) == expected


def test_status_serializes_to_json_the_api_server_stores_unchanged() -> None:
    im, _, _ = serve(model())
    status = im.model_dump(mode="json", by_alias=True, exclude_none=True)["status"]
    assert json.loads(json.dumps(status)) == status
    assert all(c["lastTransitionTime"].endswith("Z") for c in status["conditions"])


AUTOSCALING = {"minReplicas": 2, "maxReplicas": 10, "targetQPSPerReplica": 100}


def test_autoscaled_models_follow_the_autoscaler_within_bounds() -> None:
    from modelfleet_operator.reconcile import desired_total

    im = model(replicas=1, autoscaling=AUTOSCALING)
    assert desired_total(im, Observed(nodes=FLEET, autoscaled_replicas=7)) == 7
    assert desired_total(im, Observed(nodes=FLEET, autoscaled_replicas=50)) == 10
    assert desired_total(im, Observed(nodes=FLEET)) == 2  # nothing running, nothing decided: minReplicas
    assert desired_total(model(replicas=3), Observed(nodes=FLEET, autoscaled_replicas=7)) == 3  # off: spec rules


def test_a_restarted_operator_keeps_the_last_autoscaling_decision_not_spec_replicas() -> None:
    from modelfleet_operator.reconcile import desired_total

    im, _, deployments = serve(model(replicas=1, autoscaling=AUTOSCALING))
    status = im.model_dump(mode="json", by_alias=True)["status"]
    status["autoscaler"] = {"desiredReplicas": 6, "currentReplicas": 4, "reason": "ScaledUp"}
    im = with_status(im, status)
    assert desired_total(im, Observed(nodes=FLEET, deployments=deployments)) == 6
    status.pop("autoscaler")
    im = with_status(im, status)
    running = sum(d["spec"]["replicas"] for d in deployments)
    assert desired_total(im, Observed(nodes=FLEET, deployments=deployments)) == max(2, running)


def test_the_autoscalers_status_is_recorded_and_dropped_when_autoscaling_is_removed() -> None:
    im, jobs, deployments = serve(model(autoscaling=AUTOSCALING))
    decision = {"qps": 12.5, "desiredReplicas": 3, "currentReplicas": 2, "reason": "ScaledUp: QPS 12.5"}
    p = plan(
        im,
        Observed(nodes=FLEET, jobs=jobs, deployments=deployments, autoscaled_replicas=3, autoscaler_status=decision),
        settings=SETTINGS,
        now=NOW,
    )
    assert p.status["autoscaler"] == decision
    assert sum(d["spec"]["replicas"] for d in kinds(p, "Deployment")) == 3
    off = with_status(model(), p.status)
    assert (
        "autoscaler"
        not in plan(off, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW).status
    )


def test_scaling_up_keeps_ready_and_reports_progress() -> None:
    im, jobs, deployments = serve(model(replicas=4))
    scaled = with_status(model(replicas=8), im.model_dump(mode="json", by_alias=True)["status"], generation=2)
    p = plan(scaled, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    growing = []
    for desired in kinds(p, "Deployment"):
        dep = ready_deployment(desired)
        dep["metadata"]["generation"] = 2
        dep["status"].update({"observedGeneration": 2, "availableReplicas": 1, "readyReplicas": 1})
        growing.append(dep)
    during = plan(
        with_status(scaled, p.status), Observed(nodes=FLEET, jobs=jobs, deployments=growing), settings=SETTINGS, now=NOW
    )
    assert cond(during, "Ready")["status"] == "True"  # generation 2 serves everywhere; scaling is progress
    assert (cond(during, "Reconciling")["status"], cond(during, "Reconciling")["reason"]) == ("True", "RollingOut")
    assert not [e for e in during.events if e.type == "Warning"]


def test_zero_replicas_is_ready_as_desired_and_not_serving() -> None:
    im, jobs, deployments = serve(model(replicas=2))
    zero = with_status(model(replicas=0), im.model_dump(mode="json", by_alias=True)["status"])
    p = plan(zero, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert sum(d["spec"]["replicas"] for d in kinds(p, "Deployment")) == 0
    assert (cond(p, "Ready")["status"], cond(p, "Ready")["reason"]) == ("True", "ScaledToZero")
    assert cond(p, "Reconciling")["status"] == "True"  # until the pods are gone
    gone = [ready_deployment(d) | {"status": {"observedGeneration": 1}} for d in kinds(p, "Deployment")]
    p2 = plan(
        with_status(zero, p.status), Observed(nodes=FLEET, jobs=jobs, deployments=gone), settings=SETTINGS, now=NOW
    )
    assert [cond(p2, t)["status"] for t in ("Ready", "Reconciling", "Stalled", "Serving")] == [
        "True",
        "False",
        "False",
        "False",
    ]


def built(im: InferenceModel, result: dict[str, Any]) -> tuple[Plan, list[dict[str, Any]]]:
    """Plan once, finish every build Job with `result` (its key suffixed by the architecture), plan again."""
    first = plan(im, Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(first, "Job")]
    results = {
        j["metadata"]["name"]: {
            **result,
            "key": f"{result['key']}-{j['metadata']['labels']['modelfleet.io/architecture']}",
        }
        for j in jobs
    }
    second = plan(
        with_status(im, first.status),
        Observed(nodes=FLEET, jobs=jobs, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    return second, jobs


def test_the_engine_status_records_what_the_build_reported() -> None:
    accuracy = {
        "maxAbsError": 0.01,
        "maxRelError": 0.002,
        "top1Agreement": 0.995,
        "evaluation": {"samples": 100, "referenceAccuracy": 0.9, "accuracy": 0.89, "accuracyDrop": 0.01},
    }
    result = {
        "phase": "Ready",
        "key": "k",
        "backend": "tensorrt",
        "backendVersion": "10.3.0",
        "precision": "fp16",
        "buildSeconds": 42.5,
        "accuracy": accuracy,
        "cacheHit": True,
    }
    p, _ = built(model(), result)
    engine = next(e for e in p.status["engines"] if e["architecture"] == "sm80")
    assert engine["phase"] == "Ready" and engine["key"] == "k-sm80"
    assert engine["backendVersion"] == "10.3.0"
    assert engine["buildSeconds"] == 42.5
    assert engine["precision"] == "fp16" and engine["backend"] == "tensorrt"
    assert engine["accuracy"] == accuracy
    assert engine["message"] == "cache hit"
    assert next(e.message for e in p.events if e.reason == "EngineReady") == "sm75: engine k-sm75 ready (cache hit)"


def test_an_engine_built_without_figures_says_built_and_keeps_the_spec_backend() -> None:
    p, _ = built(model(), {"phase": "Ready", "key": "k"})
    engine = next(e for e in p.status["engines"] if e["architecture"] == "sm80")
    assert (engine["message"], engine["backend"], engine["precision"]) == ("built", "tensorrt", "fp16")
    assert "accuracy" not in engine and "buildSeconds" not in engine and "backendVersion" not in engine


def test_a_build_job_that_has_not_finished_is_building_or_waiting_for_a_node() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    im = with_status(model(), first.status)
    jobs = copy.deepcopy(kinds(first, "Job"))
    jobs[0]["status"] = {"active": 1}
    jobs[1]["status"] = {"active": 0, "conditions": [{"type": "Complete", "status": "False"}]}
    p = plan(im, Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    engines = {e["job"]: e for e in p.status["engines"]}
    assert (engines[jobs[0]["metadata"]["name"]]["phase"], engines[jobs[0]["metadata"]["name"]]["message"]) == (
        "Building",
        "building",
    )
    assert (engines[jobs[1]["metadata"]["name"]]["phase"], engines[jobs[1]["metadata"]["name"]]["message"]) == (
        "Pending",
        "waiting for a node",
    )
    assert len(kinds(p, "Job")) == 4  # applied again, unchanged: the Job goes on
    assert kinds(p, "Deployment") == []
    assert jobs_awaiting_results(im, jobs) == []
    assert cond(p, "Ready")["status"] == "False"


def test_a_model_waiting_for_its_replicas_is_not_ready_and_is_reconciling() -> None:
    p, jobs = built(model(replicas=4), {"phase": "Ready", "key": "k"})
    deployments = copy.deepcopy(kinds(p, "Deployment"))
    for dep in deployments:
        dep["metadata"]["generation"] = 1
        dep["status"] = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0}
    waiting = plan(
        with_status(model(replicas=4), p.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=deployments),
        settings=SETTINGS,
        now=NOW,
    )
    assert cond(waiting, "Ready")["status"] == "False"
    assert cond(waiting, "Reconciling")["status"] == "True"
    assert "Ready" not in [e.reason for e in waiting.events]


def test_becoming_ready_emits_one_ready_event() -> None:
    p, jobs = built(model(replicas=4), {"phase": "Ready", "key": "k"})
    im = with_status(model(replicas=4), p.status)
    deployments = [ready_deployment(d) for d in kinds(p, "Deployment")]
    ready = plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert cond(ready, "Ready")["status"] == "True"
    assert [(e.type, e.reason) for e in ready.events] == [("Normal", "Ready")]
    again = plan(
        with_status(im, ready.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=deployments),
        settings=SETTINGS,
        now=NOW,
    )
    assert again.events == []


def test_losing_service_emits_a_not_serving_warning() -> None:
    im, jobs, deployments = serve(model(replicas=4))
    down = copy.deepcopy(deployments)
    for dep in down:
        dep["status"].update({"readyReplicas": 0, "availableReplicas": 0})
    p = plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=down), settings=SETTINGS, now=NOW)
    assert cond(p, "Serving")["status"] == "False"
    assert [e.type for e in p.events if e.reason == "NotServing"] == ["Warning"]


def test_the_status_lists_each_architecture_with_its_nodes_replicas_and_deployment() -> None:
    im, _, _ = serve(model(replicas=4))
    architectures = im.model_dump(mode="json", by_alias=True, exclude_none=True)["status"]["architectures"]
    assert architectures == [
        {"name": a, "nodes": 1, "replicas": 1, "readyReplicas": 1, "deployment": deployment_name("clf", a)}
        for a in ARCHS
    ]
    assert (im.status.replicas, im.status.ready_replicas) == (4, 4)


def test_old_jobs_stay_while_the_deployment_status_is_stale() -> None:
    im, old_jobs, deployments = serve(model())
    changed = with_status(model(engine={"precision": "fp32"}), im.model_dump(mode="json", by_alias=True)["status"])
    p1 = plan(changed, Observed(nodes=FLEET, jobs=old_jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    new_jobs = [finished_job(j) for j in kinds(p1, "Job")]
    results = {j["metadata"]["name"]: {"phase": "Ready", "key": "new-" + j["metadata"]["name"]} for j in new_jobs}
    changed = with_status(changed, p1.status)
    observed = Observed(nodes=FLEET, jobs=old_jobs + new_jobs, deployments=deployments, build_results=results)
    p2 = plan(changed, observed, settings=SETTINGS, now=NOW)
    # The API server took the new template (generation +1) but the Deployment controller has not looked yet:
    # its status is the old, fully rolled one.
    stale = []
    for desired in kinds(p2, "Deployment"):
        dep = ready_deployment(desired)
        dep["status"]["observedGeneration"] = dep["metadata"]["generation"] - 1
        stale.append(dep)
    p3 = plan(
        with_status(changed, p2.status),
        Observed(nodes=FLEET, jobs=old_jobs + new_jobs, deployments=stale),
        settings=SETTINGS,
        now=NOW,
    )
    assert p3.delete == []
    assert cond(p3, "Ready")["status"] == "False"
