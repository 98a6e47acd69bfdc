"""Reconcile at its edges: Job outcomes without results, transition times, template generations, Events."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

from modelfleet_operator.reconcile import Observed, Plan, jobs_awaiting_results, parse_termination_message, plan
from modelfleet_operator.resources import ANNOTATION_ENGINE_KEY, ANNOTATION_TEMPLATE_SINCE, deployment_name
from tests.operator.test_reconcile import (
    ARCHS,
    FLEET,
    NOW,
    SETTINGS,
    built,
    cond,
    finished_job,
    kinds,
    model,
    ready_deployment,
    serve,
    with_status,
)

LATER = NOW + timedelta(minutes=5)
LONG_KEY = "0123456789abcdef" * 4  # an engine key as the builder writes it: a sha256 in hex


def failed_without_result(reason: str, message: str) -> dict[str, Any]:
    """The engine status of sm75 after its Job failed with this condition and left no termination message."""
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j, ok=False) for j in kinds(first, "Job")]
    for job in jobs:
        job["status"]["conditions"][0].update({"reason": reason, "message": message})
    p = plan(with_status(model(), first.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    return next(e for e in p.status["engines"] if e["architecture"] == "sm75")


def test_a_failed_job_without_a_result_reports_the_jobs_own_reason_and_message() -> None:
    engine = failed_without_result("DeadlineExceeded", "Job was active longer than specified deadline")
    assert (engine["phase"], engine["reason"], engine["message"]) == (
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    )
    bare = failed_without_result("", "")
    assert (bare["phase"], bare["reason"], bare["message"]) == ("Failed", "BuildFailed", "the build Job failed")


def test_a_long_plain_termination_message_keeps_its_last_1024_characters() -> None:
    message = "x" * 1000 + "y" * 1000 + "\n"
    assert parse_termination_message(message) == {"message": "x" * 24 + "y" * 1000}


def test_a_finished_job_whose_outcome_is_recorded_is_not_awaited_again() -> None:
    p, jobs = built(model(), {"phase": "Ready", "key": "k"})
    assert jobs_awaiting_results(with_status(model(), p.status), jobs) == []


def test_a_job_that_succeeded_without_a_result_stays_applied_until_that_is_recorded() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(first, "Job")]
    p = plan(with_status(model(), first.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert sorted(j["metadata"]["name"] for j in kinds(p, "Job")) == sorted(j["metadata"]["name"] for j in jobs)
    recorded = plan(with_status(model(), p.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert kinds(recorded, "Job") == []  # sticky: never applied again


def test_a_model_without_replicas_serves_one() -> None:
    p, _ = built(model(), {"phase": "Ready", "key": "k"})
    assert sum(d["spec"]["replicas"] for d in kinds(p, "Deployment")) == 1


def test_conditions_keep_their_transition_time_until_their_status_flips_either_way() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    im, jobs, deployments = serve(model())
    assert cond(first, "Ready")["status"] == "False"
    # Ready went False -> True inside serve(), all at NOW; later, a flip True -> False is stamped LATER
    down = copy.deepcopy(deployments)
    for dep in down:
        dep["status"].update({"readyReplicas": 0, "availableReplicas": 0})
    p = plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=down), settings=SETTINGS, now=LATER)
    stamp = LATER.isoformat().replace("+00:00", "Z")
    assert (cond(p, "Serving")["status"], cond(p, "Serving")["lastTransitionTime"]) == ("False", stamp)
    assert cond(p, "EnginesReady")["lastTransitionTime"] != stamp  # still True: its time stays
    # and back False -> True, stamped at the flip
    even_later = LATER + timedelta(minutes=5)
    up = plan(
        with_status(im, p.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=deployments),
        settings=SETTINGS,
        now=even_later,
    )
    assert (cond(up, "Serving")["status"], cond(up, "Serving")["lastTransitionTime"]) == (
        "True",
        even_later.isoformat().replace("+00:00", "Z"),
    )


def precision_roll(old_key: str, new_key: str) -> tuple[Plan, list[dict[str, Any]], list[dict[str, Any]]]:
    """A served model (engines `old_key`-<arch>) changes precision; its new builds finish as `new_key`-<arch>.
    Returns the plan that rolls the Deployments, the old Jobs, and the Deployments as observed before it."""
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(first, "Job")]
    arch_of = {j["metadata"]["name"]: j["metadata"]["labels"]["modelfleet.io/architecture"] for j in jobs}
    results = {n: {"phase": "Ready", "key": f"{old_key}-{a}"} for n, a in arch_of.items()}
    second = plan(
        with_status(model(), first.status),
        Observed(nodes=FLEET, jobs=jobs, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    deployments = [ready_deployment(d) for d in kinds(second, "Deployment")]
    im = with_status(model(), second.status)
    third = plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    changed = with_status(model(engine={"precision": "fp32"}), third.status, generation=2)
    p1 = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    new_jobs = [finished_job(j) for j in kinds(p1, "Job")]
    new_arch = {j["metadata"]["name"]: j["metadata"]["labels"]["modelfleet.io/architecture"] for j in new_jobs}
    new_results = {n: {"phase": "Ready", "key": f"{new_key}-{a}"} for n, a in new_arch.items()}
    observed = Observed(nodes=FLEET, jobs=jobs + new_jobs, deployments=deployments, build_results=new_results)
    return plan(with_status(changed, p1.status), observed, settings=SETTINGS, now=NOW), jobs, deployments


def test_old_jobs_stay_while_the_deployment_still_serves_the_old_engine_whatever_the_keys_order() -> None:
    for old, new in (("a-old", "b-new"), ("b-old", "a-new")):
        p, _, _ = precision_roll(old, new)
        assert {d["metadata"]["annotations"][ANNOTATION_ENGINE_KEY] for d in kinds(p, "Deployment")} == {
            f"{new}-{a}" for a in ARCHS
        }
        assert p.delete == []


def test_a_rolled_template_records_the_generation_it_changed_at() -> None:
    p, _, before = precision_roll("a", "b")
    observed_generation = {d["metadata"]["name"]: int(d["metadata"]["generation"]) for d in before}
    for dep in kinds(p, "Deployment"):
        # the apply bumps the Deployment's generation by one: the new template lands at that generation
        expected = str(observed_generation[dep["metadata"]["name"]] + 1)
        assert dep["metadata"]["annotations"][ANNOTATION_TEMPLATE_SINCE] == expected
    first_time = built(model(), {"phase": "Ready", "key": "k"})[0]
    assert {d["metadata"]["annotations"][ANNOTATION_TEMPLATE_SINCE] for d in kinds(first_time, "Deployment")} == {"1"}


def test_rollout_events_name_the_engines_by_their_first_16_characters() -> None:
    p, _ = built(model(), {"phase": "Ready", "key": LONG_KEY})
    ready = sorted(e.message for e in p.events if e.reason == "EngineReady")
    assert ready == sorted(f"{a}: engine {LONG_KEY[:16]} ready (built)" for a in ARCHS)
    created = [e.message for e in p.events if e.reason == "DeploymentCreated"]
    assert created == [f"{a}: serving engine {LONG_KEY[:16]}" for a in ARCHS]
    old, new = "1" * 64, "2" * 64
    rolled, _, _ = precision_roll(old, new)
    rolling = [e.message for e in rolled.events if e.reason == "RollingOut"]
    assert rolling and all(m.endswith(f": rolling from engine {'1' * 16} to {'2' * 16}") for m in rolling)


def test_each_engine_that_changes_gets_its_event_even_after_one_that_did_not() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = copy.deepcopy(kinds(first, "Job"))
    last = next(j for j in jobs if j["metadata"]["labels"]["modelfleet.io/architecture"] == "sm90")
    jobs = [finished_job(j) if j is last else j for j in jobs]
    results = {last["metadata"]["name"]: {"phase": "Ready", "key": "k"}}
    p = plan(
        with_status(model(), first.status),
        Observed(nodes=FLEET, jobs=jobs, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    assert [e.message for e in p.events if e.reason == "EngineReady"] == ["sm90: engine k ready (built)"]


def test_a_spec_change_while_builds_are_pending_starts_and_announces_the_new_builds() -> None:
    for before, after in (("fp16", "fp32"), ("fp32", "fp16")):
        first = plan(model(engine={"precision": before}), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
        changed = with_status(model(engine={"precision": after}), first.status, generation=2)
        p = plan(changed, Observed(nodes=FLEET, jobs=kinds(first, "Job")), settings=SETTINGS, now=NOW)
        started = [e.message for e in p.events if e.reason == "BuildStarted"]
        assert len(started) == 4 and all(f"for {after}" in m for m in started)


def test_a_removed_architecture_is_rolling_out_to_zero_replicas_until_its_deployment_goes() -> None:
    im, jobs, deployments = serve(model())
    without_h100 = [n for n in FLEET if n.name != "gpu-sm90"]
    p = plan(im, Observed(nodes=without_h100, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    reconciling = cond(p, "Reconciling")
    assert reconciling["status"] == "True" and "sm90 (1/0 available)" in reconciling["message"]


def test_a_recorded_autoscaler_status_is_kept_without_adding_empty_fields() -> None:
    auto = {"minReplicas": 2, "maxReplicas": 10, "targetQPSPerReplica": 100}
    im, jobs, deployments = serve(model(autoscaling=auto))
    status = im.model_dump(mode="json", by_alias=True, exclude_none=True)["status"]
    status["autoscaler"] = {"desiredReplicas": 3, "reason": "ScaledUp"}
    p = plan(
        with_status(im, status), Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW
    )
    assert p.status["autoscaler"] == {"desiredReplicas": 3, "reason": "ScaledUp"}


def test_a_template_change_that_keeps_the_engine_is_not_live_until_its_pods_roll() -> None:
    im, jobs, deployments = serve(model())
    changed = with_status(
        model(serving={"responseCache": {"enabled": True}}),
        im.model_dump(mode="json", by_alias=True)["status"],
        generation=2,
    )
    p = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    applied = {d["metadata"]["name"]: d for d in kinds(p, "Deployment")}
    assert applied[deployment_name("clf", "sm90")]["metadata"]["annotations"][ANNOTATION_ENGINE_KEY] == "k-sm90-fp16"
    assert (cond(p, "Ready")["status"], cond(p, "Ready")["reason"]) == ("False", "RollingOut")
    assert cond(p, "Reconciling")["status"] == "True"


def test_a_replicas_change_keeps_ready_for_the_new_generation_from_its_first_pass() -> None:
    im, jobs, deployments = serve(model(replicas=4))
    scaled = with_status(model(replicas=8), im.model_dump(mode="json", by_alias=True)["status"], generation=2)
    p = plan(scaled, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    # the same pod template: the apply moves no pod, so generation 2 serves where generation 1 did
    assert (cond(p, "Ready")["status"], cond(p, "Ready")["reason"]) == ("True", "Serving")
    assert (cond(p, "Serving")["status"], cond(p, "Serving")["reason"]) == ("True", "CurrentGeneration")
    assert (cond(p, "Reconciling")["status"], cond(p, "Reconciling")["reason"]) == ("True", "RollingOut")


def test_just_created_deployments_without_a_status_count_no_replicas() -> None:
    p, jobs = built(model(replicas=4), {"phase": "Ready", "key": "k"})
    fresh = copy.deepcopy(kinds(p, "Deployment"))  # as the API server returns them before the controller looks
    again = plan(
        with_status(model(replicas=4), p.status),
        Observed(nodes=FLEET, jobs=jobs, deployments=fresh),
        settings=SETTINGS,
        now=NOW,
    )
    assert (again.status["replicas"], again.status["readyReplicas"]) == (0, 0)
    assert [a["readyReplicas"] for a in again.status["architectures"]] == [0, 0, 0, 0]


def test_a_completed_job_whose_result_says_failed_is_failed_even_with_a_key() -> None:
    gate = {"phase": "Failed", "key": "k", "reason": "AccuracyGate", "message": "accuracy drop 0.9 % > 0.5 %"}
    p, _ = built(model(), gate)
    engine = next(e for e in p.status["engines"] if e["architecture"] == "sm80")
    assert (engine["phase"], engine["reason"], engine["message"]) == ("Failed", "AccuracyGate", gate["message"])
    assert kinds(p, "Deployment") == []


def test_a_build_that_starts_running_announces_nothing_new() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = copy.deepcopy(kinds(first, "Job"))
    for job in jobs:
        job["status"] = {"active": 1}
    p = plan(with_status(model(), first.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert {e["phase"] for e in p.status["engines"]} == {"Building"}
    assert p.events == []


def test_a_new_build_waits_for_missing_claims_even_with_the_previous_versions_jobs_around() -> None:
    im, jobs, deployments = serve(model())
    changed = with_status(model(engine={"precision": "fp32"}), im.model_dump(mode="json", by_alias=True)["status"])
    p = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments, claims={}), settings=SETTINGS, now=NOW)
    assert kinds(p, "Job") == []
    assert {e["message"] for e in p.status["engines"]} == {"waiting for its claims"}


def test_old_jobs_stay_until_the_new_pods_are_available_and_the_old_ones_gone() -> None:
    p, old_jobs, _ = precision_roll("a", "b")
    new_jobs = [j for j in p.apply if j["kind"] == "Job"]
    serving = next(
        d["metadata"]["labels"]["modelfleet.io/architecture"] for d in kinds(p, "Deployment") if d["spec"]["replicas"]
    )
    serving_job = next(
        j["metadata"]["name"] for j in old_jobs if j["metadata"]["labels"]["modelfleet.io/architecture"] == serving
    )
    # rolled; the new pod not available (a zero count the API server may leave out); the old pod still up
    changes: list[dict[str, Any]] = [{}, {"availableReplicas": 0}, {"availableReplicas": None}, {"replicas": 2}]
    changes.append({"updatedReplicas": None})  # the new pod not created yet
    for change in changes:
        rolling = []
        for desired in kinds(p, "Deployment"):
            dep = ready_deployment(desired)
            if dep["spec"]["replicas"]:
                dep["status"].update(change)
                dep["status"] = {k: v for k, v in dep["status"].items() if v is not None}
            rolling.append(dep)
        observed = Observed(nodes=FLEET, jobs=old_jobs + new_jobs, deployments=rolling)
        im = with_status(model(engine={"precision": "fp32"}), p.status, generation=2)
        deleted = {r.name for r in plan(im, observed, settings=SETTINGS, now=NOW).delete}
        assert (serving_job in deleted) == (change == {}), change
        assert len(deleted) >= 3  # the architectures at zero replicas have rolled already


def test_a_pending_engine_shows_its_key_only_when_the_build_id_is_the_engine_key() -> None:
    from modelfleet_operator.resources import build_identity
    from modelfleet_operator.settings import OperatorSettings

    settings = OperatorSettings(runtime_backend_versions={"tensorrt": "10.3.0"})
    pinned = model(model={"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64})
    p = plan(pinned, Observed(nodes=FLEET), settings=settings, now=NOW)
    keys = {e["architecture"]: e.get("key", "") for e in p.status["engines"]}
    assert keys == {a: build_identity(pinned, a, settings)[0] for a in ARCHS}
    unpinned = plan(model(), Observed(nodes=FLEET), settings=settings, now=NOW)
    assert {e.get("key", "") for e in unpinned.status["engines"]} == {""}


def test_architectures_still_building_are_listed_with_no_replicas_and_no_deployment() -> None:
    p = plan(model(replicas=4), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    assert p.status["architectures"] == [
        {"name": a, "nodes": 1, "replicas": 0, "readyReplicas": 0, "deployment": None} for a in ARCHS
    ]


def sm90_room_with(own_component: str) -> str:
    """Reconciling's message for 2 replicas pinned to sm90, whose 8 GPUs hold 7 pods of another team and 1 of
    this model's own (`own_component`: serving or build)."""
    from modelfleet_operator.capacity import GpuPod, OwnPod
    from tests.operator import test_capacity as capacity

    im = model(replicas=2, engine={"architectures": ["sm90"]})
    held = capacity.filling("gpu-sm90", 7) + [GpuPod("ml", "clf-own", "gpu-sm90", 1, build=own_component == "build")]
    own = [OwnPod(name="clf-own", component=own_component, architecture="sm90", node="gpu-sm90")]
    im, jobs, results = capacity.built(im, gpu_pods=held, pods=own)
    observed = Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=held, pods=own, claims=capacity.CLAIMS)
    p = plan(im, observed, settings=SETTINGS, now=NOW)
    assert cond(p, "Reconciling")["reason"] == "InsufficientCapacity"
    return str(cond(p, "Reconciling")["message"])


def test_the_gpu_a_models_own_serving_pod_holds_is_room_for_it_and_a_build_pods_is_not() -> None:
    assert sm90_room_with("serving").startswith("1 of 2 replicas placed: no free nvidia.com/gpu for more on sm90")
    assert sm90_room_with("build").startswith("0 of 2 replicas placed")


def test_a_just_created_job_without_a_status_is_waiting_for_a_node() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [{**j, "status": {}} for j in kinds(first, "Job")]
    p = plan(with_status(model(), first.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert {(e["phase"], e["message"]) for e in p.status["engines"]} == {("Pending", "waiting for a node")}


def test_a_replicas_change_keeps_the_generation_the_template_changed_at() -> None:
    im, jobs, deployments = serve(model(replicas=4))
    scaled_before = copy.deepcopy(deployments)
    for dep in scaled_before:  # scaled twice since its template landed at generation 1
        dep["metadata"]["generation"] = 3
        dep["status"]["observedGeneration"] = 3
    scaled = with_status(model(replicas=8), im.model_dump(mode="json", by_alias=True)["status"], generation=2)
    p = plan(scaled, Observed(nodes=FLEET, jobs=jobs, deployments=scaled_before), settings=SETTINGS, now=NOW)
    assert {d["metadata"]["annotations"][ANNOTATION_TEMPLATE_SINCE] for d in kinds(p, "Deployment")} == {"1"}
    for dep in scaled_before:  # made before the annotation existed: the observed generation stands in
        del dep["metadata"]["annotations"][ANNOTATION_TEMPLATE_SINCE]
    p = plan(scaled, Observed(nodes=FLEET, jobs=jobs, deployments=scaled_before), settings=SETTINGS, now=NOW)
    assert {d["metadata"]["annotations"][ANNOTATION_TEMPLATE_SINCE] for d in kinds(p, "Deployment")} == {"3"}


def test_old_jobs_go_from_architectures_at_zero_replicas_whose_status_omits_the_zero_counts() -> None:
    p, old_jobs, _ = precision_roll("a", "b")
    new_jobs = [j for j in p.apply if j["kind"] == "Job"]
    rolled = []
    for desired in kinds(p, "Deployment"):
        dep = ready_deployment(desired)
        if not dep["spec"]["replicas"]:  # as the API server returns it: zero counts are left out
            dep["status"] = {"observedGeneration": dep["metadata"]["generation"]}
        rolled.append(dep)
    im = with_status(model(engine={"precision": "fp32"}), p.status, generation=2)
    for jobs in (old_jobs + new_jobs, new_jobs + old_jobs):  # whichever order the API server lists them in
        observed = Observed(nodes=FLEET, jobs=jobs, deployments=rolled)
        deleted = {r.name for r in plan(im, observed, settings=SETTINGS, now=NOW).delete}
        assert deleted == {j["metadata"]["name"] for j in old_jobs}


def test_builds_that_finished_before_their_start_was_recorded_announce_their_outcome() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    ok = [finished_job(j) for j in kinds(first, "Job")]
    results = {j["metadata"]["name"]: {"phase": "Ready", "key": "k"} for j in ok}
    p = plan(model(), Observed(nodes=FLEET, jobs=ok, build_results=results), settings=SETTINGS, now=NOW)
    assert [e.reason for e in p.events if e.reason.startswith(("Build", "Engine"))] == ["EngineReady"] * 4
    failed = [finished_job(j, ok=False) for j in kinds(first, "Job")]
    p = plan(model(), Observed(nodes=FLEET, jobs=failed), settings=SETTINGS, now=NOW)
    assert [e.reason for e in p.events if e.reason.startswith(("Build", "Engine"))] == ["BuildFailed"] * 4


def test_a_claim_waiting_for_its_first_consumer_is_neither_missing_nor_lost() -> None:
    from tests.operator import test_capacity as capacity

    claims = {**capacity.CLAIMS, "models": "Pending"}  # WaitForFirstConsumer: Pending until a pod mounts it
    p = plan(model(), Observed(nodes=FLEET, claims=claims), settings=SETTINGS, now=NOW)
    assert len(kinds(p, "Job")) == 4
    assert cond(p, "Stalled")["status"] == "False"


def test_one_replica_waits_for_a_gpu_when_every_gpu_is_taken() -> None:
    from tests.operator import test_capacity as capacity

    full = [pod for node in FLEET if node.gpus for pod in capacity.filling(node.name, node.gpus)]
    im, jobs, results = capacity.built(model(), gpu_pods=full)
    observed = Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=full, claims=capacity.CLAIMS)
    p = plan(im, observed, settings=SETTINGS, now=NOW)
    assert sum(d["spec"]["replicas"] for d in kinds(p, "Deployment")) == 1


def test_capacity_messages_count_gpus_per_replica_when_a_replica_needs_more_than_one() -> None:
    from tests.operator import test_capacity as capacity

    busy = [pod for node in FLEET if node.gpus for pod in capacity.filling(node.name, node.gpus - 2)]
    im, jobs, results = capacity.built(model(replicas=5, serving={"resources": {"gpu": 2}}), gpu_pods=busy)
    observed = Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=busy, claims=capacity.CLAIMS)
    message = cond(plan(im, observed, settings=SETTINGS, now=NOW), "Reconciling")["message"]
    assert message.startswith("4 of 5 replicas placed: no free 2 nvidia.com/gpu per replica for more on ")


def test_deployments_are_matched_by_name_in_whatever_order_they_are_listed() -> None:
    im, jobs, deployments = serve(model(replicas=4))
    ordered = plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    backwards = Observed(nodes=FLEET, jobs=jobs, deployments=deployments[::-1])
    assert plan(im, backwards, settings=SETTINGS, now=NOW).status == ordered.status
    assert cond(ordered, "Ready")["status"] == "True"


def test_a_restarted_operator_without_a_recorded_decision_keeps_what_runs() -> None:
    from modelfleet_operator.reconcile import desired_total

    im = model(autoscaling={"minReplicas": 2, "maxReplicas": 10, "targetQPSPerReplica": 100})
    running = [{"metadata": {"name": f"d{i}"}, "spec": {"replicas": n}} for i, n in enumerate((3, 2))]
    assert desired_total(im, Observed(nodes=FLEET, deployments=running)) == 5
    assert desired_total(im, Observed(nodes=FLEET)) == 2  # nothing runs: minReplicas


def test_a_job_condition_of_unknown_status_is_no_outcome() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = copy.deepcopy(kinds(first, "Job"))
    for job in jobs:
        job["status"] = {"active": 1, "conditions": [{"type": "Failed", "status": "Unknown"}]}
    p = plan(with_status(model(), first.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert {e["phase"] for e in p.status["engines"]} == {"Building"}


def test_the_pass_that_records_a_builds_outcome_applies_its_job_once_more() -> None:
    p, _ = built(model(), {"phase": "Ready", "key": "k"})
    assert len(kinds(p, "Job")) == 4
    failed, _ = built(model(), {"phase": "Failed", "key": "k", "reason": "InvalidModel", "message": "bad"})
    assert len(kinds(failed, "Job")) == 4


def test_when_every_gpu_is_taken_every_architecture_is_named_full() -> None:
    from tests.operator import test_capacity as capacity

    full = [pod for node in FLEET if node.gpus for pod in capacity.filling(node.name, node.gpus)]
    im, jobs, results = capacity.built(model(replicas=2), gpu_pods=full)
    observed = Observed(nodes=FLEET, jobs=jobs, build_results=results, gpu_pods=full, claims=capacity.CLAIMS)
    message = cond(plan(im, observed, settings=SETTINGS, now=NOW), "Reconciling")["message"]
    assert message == "0 of 2 replicas placed: no free nvidia.com/gpu for more on sm75, sm80, sm89, sm90"


def test_a_build_pod_evicted_back_to_waiting_announces_nothing() -> None:
    first = plan(model(), Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = copy.deepcopy(kinds(first, "Job"))
    for job in jobs:
        job["status"] = {"active": 1}
    building = plan(with_status(model(), first.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    for job in jobs:
        job["status"] = {"active": 0}
    p = plan(with_status(model(), building.status), Observed(nodes=FLEET, jobs=jobs), settings=SETTINGS, now=NOW)
    assert {e["phase"] for e in p.status["engines"]} == {"Pending"}
    assert p.events == []


def test_a_model_never_ready_is_not_ready_while_its_first_pods_start_even_where_one_is_up() -> None:
    p, jobs = built(model(replicas=4), {"phase": "Ready", "key": "k"})
    deployments = copy.deepcopy(kinds(p, "Deployment"))
    deployments[0] = ready_deployment(deployments[0])  # sm75 up; the others just created, no pod yet
    for dep in deployments[1:]:
        dep["metadata"]["generation"] = 1
    im = with_status(model(replicas=4), p.status)
    later = plan(im, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert (cond(later, "Ready")["status"], cond(later, "Ready")["reason"]) == ("False", "RollingOut")


def test_rollouts_are_announced_on_every_architecture_that_rolls_after_one_kept() -> None:
    im, jobs, deployments = serve(model(replicas=4))
    changed = with_status(model(engine={"precision": "fp32"}), im.model_dump(mode="json", by_alias=True)["status"])
    p1 = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    new_jobs = [
        finished_job(j, ok=j["metadata"]["labels"]["modelfleet.io/architecture"] != "sm75") for j in kinds(p1, "Job")
    ]
    results = {
        j["metadata"]["name"]: {"phase": "Ready", "key": "new-" + j["metadata"]["labels"]["modelfleet.io/architecture"]}
        for j in new_jobs
        if j["metadata"]["labels"]["modelfleet.io/architecture"] != "sm75"
    }
    observed = Observed(nodes=FLEET, jobs=jobs + new_jobs, deployments=deployments, build_results=results)
    p2 = plan(with_status(changed, p1.status), observed, settings=SETTINGS, now=NOW)
    rolling = sorted(e.message.split(":")[0] for e in p2.events if e.reason == "RollingOut")
    assert rolling == ["sm80", "sm89", "sm90"]  # sm75's build failed: it keeps serving, unannounced


def test_a_rollout_to_a_key_that_sorts_before_the_old_one_is_announced_too() -> None:
    rolled, _, _ = precision_roll("2" * 64, "1" * 64)
    rolling = [e.message for e in rolled.events if e.reason == "RollingOut"]
    assert rolling and all(m.endswith(f": rolling from engine {'2' * 16} to {'1' * 16}") for m in rolling)


def test_engines_becoming_ready_before_the_model_is_no_ready_event() -> None:
    p, _ = built(model(), {"phase": "Ready", "key": "k"})
    assert cond(p, "EnginesReady")["status"] == "True" and cond(p, "Ready")["status"] == "False"
    assert "Ready" not in [e.reason for e in p.events]
