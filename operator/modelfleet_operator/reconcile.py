"""Decides, without I/O, what one InferenceModel's children and status should be, given what is observed.

The flow per architecture: a build id (see resources.build_identity) names the engine the spec asks for;
its Job runs once; when it succeeds the Deployment of that architecture rolls to the new engine; until then
the Deployment that serves the previous engine is left untouched, so a failed build never takes a serving
version down. Events are derived from the difference between the previous and the new status, so a
repeated reconcile emits nothing new and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelfleet_operator.api import Condition, EngineAccuracy, EngineStatus, EvaluationFigures, InferenceModel
from modelfleet_operator.autoscaler.algorithm import ArchitectureShare, split_across_architectures
from modelfleet_operator.capacity import GpuPod, OwnPod, Room, room, unschedulable_reasons
from modelfleet_operator.conditions import READY, SERVING, STALLED, Architecture, Capacity, Facts, decide
from modelfleet_operator.placement import NodeInfo, discover
from modelfleet_operator.providers import PodProvider
from modelfleet_operator.resources import (
    ANNOTATION_BUILD_ID,
    ANNOTATION_ENGINE_KEY,
    ANNOTATION_MODEL_GENERATION,
    ANNOTATION_TEMPLATE_HASH,
    ANNOTATION_TEMPLATE_SINCE,
    LABEL_ARCH,
    build_deployment,
    build_identity,
    build_job,
    build_service,
    deployment_name,
    job_name,
    needed_claims,
    resolved_backend,
    serving_selector,
)
from modelfleet_operator.resources import (
    SERVING as SERVING_COMPONENT,
)
from modelfleet_operator.settings import OperatorSettings


@dataclass(frozen=True)
class Observed:
    """What the cluster holds for one InferenceModel (its own Jobs and Deployments) and the fleet."""

    nodes: Sequence[NodeInfo]
    jobs: Sequence[Mapping[str, Any]] = ()
    deployments: Sequence[Mapping[str, Any]] = ()
    # Parsed termination messages of finished build Jobs, by Job name (see `jobs_awaiting_results`).
    build_results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The autoscaler's latest decision this process made: replicas in all, and status.autoscaler.
    autoscaled_replicas: int | None = None
    autoscaler_status: Mapping[str, Any] | None = None
    # Capacity: every pod holding or asking for GPUs (cluster-wide) and this model's own pods.
    gpu_pods: Sequence[GpuPod] = ()
    pods: Sequence[OwnPod] = ()
    # The claims of the model's namespace by name, with their phase; None: not known, nothing is judged.
    claims: Mapping[str, str] | None = None
    # What the Ready GPU serving pods compute on (modelfleet_operator.providers), as far as known.
    providers: Sequence[PodProvider] = ()


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str


@dataclass
class Plan:
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[ObjectRef] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[EventSpec] = field(default_factory=list)


def _job_state(job: Mapping[str, Any]) -> tuple[str, str, str]:
    """('Complete' | 'Failed' | 'Running', reason, message) from the Job's conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in {"Complete", "Failed"}:
            return cond["type"], cond.get("reason") or "", cond.get("message") or ""
    return "Running", "", ""


def parse_termination_message(message: str | None) -> dict[str, Any]:
    """The one-line JSON result `modelfleet build` writes; anything else becomes a plain message."""
    if not message:
        return {}
    try:
        value = json.loads(message.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"message": message.strip()[-1024:]}
    return value if isinstance(value, dict) else {"message": str(value)}


def _previous_engines(im: InferenceModel) -> dict[str, EngineStatus]:
    return {e.architecture: e for e in im.status.engines}


def target_architectures(im: InferenceModel, nodes: Sequence[NodeInfo]) -> tuple[dict[str, list[str]], list[str]]:
    """Architectures to build and serve with their eligible nodes, and pinned ones that have no node."""
    spec = im.spec
    found = discover(nodes, spec.serving.placement, gpus=spec.serving.resources.gpu)
    pinned = list(spec.engine.architectures)
    if not pinned:
        return found, []
    return {a: found[a] for a in pinned if a in found}, [a for a in pinned if a not in found]


def jobs_awaiting_results(im: InferenceModel, jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Finished build Jobs whose outcome the status does not hold yet: their pods' messages are needed."""
    known = {(e.architecture, e.build_id) for e in im.status.engines if e.phase in {"Ready", "Failed"}}
    out = []
    for job in jobs:
        meta = job["metadata"]
        arch = (meta.get("labels") or {}).get(LABEL_ARCH, "")
        build_id = (meta.get("annotations") or {}).get(ANNOTATION_BUILD_ID, "")
        if _job_state(job)[0] != "Running" and (arch, build_id) not in known:
            out.append(meta["name"])
    return out


def _engine(im: InferenceModel, arch: str, build_id: str, exact: bool, observed: Observed) -> tuple[EngineStatus, bool]:
    """This architecture's engine for the current build id, and whether its Job must be applied."""
    name = job_name(im.metadata["name"], arch, build_id)
    previous = _previous_engines(im).get(arch)
    if previous is not None and previous.build_id == build_id and previous.phase in {"Ready", "Failed"}:
        # Sticky: a finished build is not repeated when its Job is garbage-collected (TTL).
        return previous, False
    job = next((j for j in observed.jobs if j["metadata"]["name"] == name), None)
    base = EngineStatus(
        architecture=arch,
        build_id=build_id,
        job=name,
        key=build_id if exact else "",
        backend=resolved_backend(im.spec, arch),
        precision=im.spec.engine.precision,
    )
    if job is None:
        return base.model_copy(update={"phase": "Pending", "message": "build Job created"}), True
    state, reason, message = _job_state(job)
    if state == "Running":
        active = (job.get("status") or {}).get("active", 0)
        phase = "Building" if active else "Pending"
        return base.model_copy(update={"phase": phase, "message": "building" if active else "waiting for a node"}), True
    result = observed.build_results.get(name, {})
    if state == "Complete" and result.get("phase") == "Ready" and result.get("key"):
        accuracy = result.get("accuracy") or {}
        return base.model_copy(
            update={
                "phase": "Ready",
                "key": str(result["key"]),
                "backend": result.get("backend") or base.backend,
                "backend_version": result.get("backendVersion"),
                "precision": result.get("precision") or base.precision,
                "build_seconds": result.get("buildSeconds"),
                "accuracy": _engine_accuracy(accuracy) if accuracy else None,
                "message": "cache hit" if result.get("cacheHit") else (result.get("message") or "built"),
            }
        ), True
    if state == "Complete" and result.get("phase") != "Failed":
        why = "the build Job succeeded but left no result in its termination message"
        return base.model_copy(update={"phase": "Failed", "reason": "NoBuildResult", "message": why}), True
    failure_reason = result.get("reason") or reason or "BuildFailed"
    failure_message = result.get("message") or message or "the build Job failed"
    return base.model_copy(update={"phase": "Failed", "reason": failure_reason, "message": failure_message}), True


def _engine_accuracy(figures: Mapping[str, Any]) -> EngineAccuracy:
    """The build result's accuracy figures (camelCase, as the status has them) for status.engines[]."""
    evaluation = figures.get("evaluation")
    return EngineAccuracy(
        max_abs_error=figures.get("maxAbsError"),
        max_rel_error=figures.get("maxRelError"),
        top1_agreement=figures.get("top1Agreement"),
        evaluation=EvaluationFigures.model_validate(evaluation) if isinstance(evaluation, Mapping) else None,
    )


def _deployment_for(observed: Observed, name: str) -> Mapping[str, Any] | None:
    return next((d for d in observed.deployments if d["metadata"]["name"] == name), None)


def _arch_of(deployment: Mapping[str, Any]) -> str:
    return str((deployment["metadata"].get("labels") or {}).get(LABEL_ARCH, ""))


def _engine_key_of(deployment: Mapping[str, Any]) -> str:
    return str((deployment["metadata"].get("annotations") or {}).get(ANNOTATION_ENGINE_KEY, ""))


def _with_template_since(desired: dict[str, Any], observed: Mapping[str, Any] | None) -> dict[str, Any]:
    """Record the Deployment generation the pod template last changed at (the apply bumps it by one)."""
    annotations = desired["metadata"]["annotations"]
    old = dict(((observed or {}).get("metadata") or {}).get("annotations") or {})
    generation = int(((observed or {}).get("metadata") or {}).get("generation", 0))
    if observed is not None and old.get(ANNOTATION_TEMPLATE_HASH) == annotations[ANNOTATION_TEMPLATE_HASH]:
        annotations[ANNOTATION_TEMPLATE_SINCE] = old.get(ANNOTATION_TEMPLATE_SINCE) or str(max(generation, 1))
    else:
        annotations[ANNOTATION_TEMPLATE_SINCE] = str(generation + 1)
    return desired


def _as_applied(observed: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The observed Deployment once this pass's apply lands, when that apply rolls no pod (same template):
    its replicas and generation annotation change, its pods and their status do not."""
    if observed is None or desired is None:
        return observed
    old, new = (dict(d["metadata"].get("annotations") or {}) for d in (observed, desired))
    if not old.get(ANNOTATION_TEMPLATE_HASH) or old.get(ANNOTATION_TEMPLATE_HASH) != new.get(ANNOTATION_TEMPLATE_HASH):
        return observed
    annotations = {
        **old,
        ANNOTATION_MODEL_GENERATION: new.get(ANNOTATION_MODEL_GENERATION, ""),
        ANNOTATION_TEMPLATE_SINCE: new.get(ANNOTATION_TEMPLATE_SINCE, ""),
    }
    return {**observed, "metadata": {**observed["metadata"], "annotations": annotations}}


def _rolled_out(deployment: Mapping[str, Any], *, replicas: int | None = None) -> bool:
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    want = int(spec.get("replicas", 1) if replicas is None else replicas)
    generation = int(deployment["metadata"].get("generation", 0))
    return bool(
        status.get("observedGeneration", 0) >= generation
        and status.get("updatedReplicas", 0) >= want
        and status.get("availableReplicas", 0) >= want
        and status.get("replicas", 0) == want
    )


def _condition(
    previous: Mapping[str, Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> Condition:
    value = "True" if status else "False"
    old = previous.get(type_)
    since = old.last_transition_time if old is not None and old.status == value else now
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=since,
    )


def desired_total(im: InferenceModel, observed: Observed) -> int:
    """Replicas over all architectures: the autoscaler's when it is on, else spec.replicas (default 1).

    Before this process's first autoscaling decision (say, right after a restart) the last recorded one
    holds, or what is running: a restarted operator must not scale a model down to spec.replicas.
    """
    auto = im.spec.autoscaling
    if auto is None:
        return 1 if im.spec.replicas is None else im.spec.replicas
    if observed.autoscaled_replicas is not None:
        total = observed.autoscaled_replicas
    elif im.status.autoscaler is not None and im.status.autoscaler.desired_replicas is not None:
        total = im.status.autoscaler.desired_replicas
    else:
        total = sum(int((d.get("spec") or {}).get("replicas", 0)) for d in observed.deployments) or auto.min_replicas
    return max(auto.min_replicas, min(auto.max_replicas, total))


def _missing_claims(im: InferenceModel, observed: Observed, settings: OperatorSettings) -> list[str]:
    """Claims the model's pods mount that do not exist (or lost their volume), in a condition's words."""
    if observed.claims is None:
        return []
    namespace, out = im.metadata["namespace"], []
    for claim, what in needed_claims(im, settings).items():
        phase = observed.claims.get(claim)
        if phase is None:
            out.append(f"PersistentVolumeClaim {claim} ({what}) not found in namespace {namespace}")
        elif phase == "Lost":
            out.append(f"PersistentVolumeClaim {claim} ({what}) lost its volume")
    return out


def _rooms(
    im: InferenceModel, observed: Observed, targets: Mapping[str, list[str]], settings: OperatorSettings
) -> dict[str, Room | None]:
    own: dict[str, int] = {}
    for p in observed.pods:
        if p.component == SERVING_COMPONENT and p.node:
            own[p.architecture] = own.get(p.architecture, 0) + 1
    gpus = im.spec.serving.resources.gpu
    preempt = bool(settings.serving_priority_class)
    return room(targets, observed.nodes, observed.gpu_pods, gpus=gpus, own=own, preempt_builds=preempt)


def _split(total: int, nodes: Mapping[str, int], rooms: Mapping[str, Room | None]) -> dict[str, int]:
    """Replicas per serving architecture, none beyond what it has room for; one pod even when all are full,
    so the scheduler places it as soon as a GPU frees (and says why it cannot until then)."""
    caps = {a: (r.now if r is not None else None) for a, r in rooms.items() if a in nodes}
    shares = split_across_architectures(
        total, [ArchitectureShare(name=a, nodes=n, max_replicas=caps[a]) for a, n in sorted(nodes.items())]
    )
    if total > 0 and not sum(shares.values()):
        shares = split_across_architectures(1, [ArchitectureShare(name=a, nodes=n) for a, n in sorted(nodes.items())])
    return shares


def _capacity(
    im: InferenceModel, total: int, shares: Mapping[str, int], rooms: Mapping[str, Room | None]
) -> Capacity | None:
    """Wanted, placed (on the architectures that serve) and what every target architecture could ever hold."""
    known = {a: r for a, r in rooms.items() if r is not None}
    serving = {a: r for a, r in known.items() if a in shares}
    if not serving:
        return None
    gpus = im.spec.serving.resources.gpu
    resource = f"{gpus} nvidia.com/gpu per replica" if gpus > 1 else "nvidia.com/gpu"
    full = sorted(a for a, r in serving.items() if shares[a] >= r.now)
    placed = min(total, sum(min(shares[a], r.now) for a, r in serving.items()))
    return Capacity(
        desired=total, placed=placed, ever=sum(r.ever for r in known.values()), resource=resource, full=full
    )


def plan(im: InferenceModel, observed: Observed, *, settings: OperatorSettings, now: datetime) -> Plan:
    """Everything to apply, delete, record and announce for one InferenceModel."""
    name, generation = im.metadata["name"], int(im.metadata.get("generation", 0))
    out = Plan()
    targets, missing_pinned = target_architectures(im, observed.nodes)

    missing_claims = _missing_claims(im, observed, settings)
    engines: dict[str, EngineStatus] = {}
    current_jobs: set[str] = set()
    for arch in targets:
        build_id, exact = build_identity(im, arch, settings)
        engine, needs_job = _engine(im, arch, build_id, exact, observed)
        jname = job_name(name, arch, build_id)
        current_jobs.add(jname)
        if needs_job and missing_claims and not any(j["metadata"]["name"] == jname for j in observed.jobs):
            # A build pod would wait for the claim until the Job's deadline: create it once the claim exists.
            engine, needs_job = engine.model_copy(update={"message": "waiting for its claims"}), False
        engines[arch] = engine
        if needs_job:
            out.apply.append(build_job(im, arch=arch, build_id=build_id, settings=settings))

    # Serving: a Ready engine rolls its architecture; otherwise the Deployment already there stays as is.
    serving: dict[str, str] = {}  # arch -> engine key it serves (or will serve)
    kept: set[str] = set()
    for arch in targets:
        engine, existing = engines[arch], _deployment_for(observed, deployment_name(name, arch))
        if engine.phase == "Ready":
            serving[arch] = engine.key
        elif existing is not None:
            serving[arch] = _engine_key_of(existing)
            kept.add(arch)
    total = desired_total(im, observed)
    rooms = _rooms(im, observed, targets, settings)
    shares = _split(total, {a: len(targets[a]) for a in serving}, rooms)
    for arch, key in sorted(serving.items()):
        if arch not in kept:
            desired = build_deployment(im, arch=arch, engine_key_=key, replicas=shares[arch], settings=settings)
            out.apply.append(_with_template_since(desired, _deployment_for(observed, deployment_name(name, arch))))
    out.apply.append(build_service(im, settings.serving_grpc_port))

    for dep in observed.deployments:
        arch = str((dep["metadata"].get("labels") or {}).get(LABEL_ARCH, ""))
        if arch not in targets:
            out.delete.append(ObjectRef("apps/v1", "Deployment", dep["metadata"]["name"]))
            out.events.append(
                EventSpec(
                    "Normal",
                    "ArchitectureRemoved",
                    f"{arch} has no eligible node any more: deleted Deployment {dep['metadata']['name']}",
                )
            )
    # The previous version's Jobs go once their architecture serves the current engine (or is gone).
    for job in observed.jobs:
        jname, arch = job["metadata"]["name"], str((job["metadata"].get("labels") or {}).get(LABEL_ARCH, ""))
        if jname in current_jobs:
            continue
        job_dep = _deployment_for(observed, deployment_name(name, arch))
        rolled = (
            job_dep is not None
            and arch in engines
            and engines[arch].phase == "Ready"
            and _engine_key_of(job_dep) == engines[arch].key
            and _rolled_out(job_dep)
        )
        if arch not in targets or rolled:
            out.delete.append(ObjectRef("batch/v1", "Job", jname))

    out.status = _status(
        im,
        observed,
        targets=targets,
        missing_pinned=missing_pinned,
        missing_claims=missing_claims,
        capacity=_capacity(im, total, shares, rooms),
        engines=engines,
        serving=serving,
        shares=shares,
        applying={_arch_of(o): o for o in out.apply if o["kind"] == "Deployment"},
        generation=generation,
        now=now,
    )
    out.events += _engine_events(im, engines) + _rollout_events(observed, name, serving, kept)
    out.events += _condition_events(im, out.status)
    return out


def _status(
    im: InferenceModel,
    observed: Observed,
    *,
    targets: Mapping[str, list[str]],
    missing_pinned: list[str],
    missing_claims: list[str],
    capacity: Capacity | None,
    engines: Mapping[str, EngineStatus],
    serving: Mapping[str, str],
    shares: Mapping[str, int],
    applying: Mapping[str, Mapping[str, Any]],
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    name = im.metadata["name"]
    previous = {c.type: c for c in im.status.conditions}
    ready_engines = [a for a, e in engines.items() if e.phase == "Ready"]
    deployments = {a: _deployment_for(observed, deployment_name(name, a)) for a in serving}
    present = {a: d for a, d in deployments.items() if d is not None}

    facts = Facts(
        generation=generation,
        architectures=[
            Architecture(
                name=arch,
                engine=engines.get(arch),
                replicas=int(shares.get(arch, 0)),
                deployment=_as_applied(_deployment_for(observed, deployment_name(name, arch)), applying.get(arch)),
                key_annotation=ANNOTATION_ENGINE_KEY,
                generation_annotation=ANNOTATION_MODEL_GENERATION,
                since_annotation=ANNOTATION_TEMPLATE_SINCE,
            )
            for arch in sorted(set(targets) | {_arch_of(d) for d in observed.deployments})
        ],
        missing_pinned=missing_pinned,
        missing_claims=missing_claims,
        unschedulable=unschedulable_reasons(observed.pods),
        capacity=capacity,
        was_ready=READY in previous and previous[READY].status == "True",
        on_cpu=[p.describe() for p in observed.providers if p.on_cpu],
    )
    conditions = [_condition(previous, v.type, v.ok, v.reason, v.message, generation, now) for v in decide(facts)]

    arch_status = []
    for arch in sorted(set(targets) | set(present)):
        dep = present.get(arch)
        dstatus = (dep or {}).get("status") or {}
        arch_status.append(
            {
                "name": arch,
                "nodes": len(targets.get(arch, [])),
                "replicas": int(shares.get(arch, 0)),
                "readyReplicas": int(dstatus.get("readyReplicas", 0)),
                "deployment": deployment_name(name, arch) if arch in serving else None,
            }
        )
    engine_list = [engines[a] for a in sorted(engines)]
    status = {
        "observedGeneration": generation,
        "conditions": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in conditions],
        "engines": [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in engine_list],
        "engineSummary": f"{len(ready_engines)}/{len(engines)}",
        "architectures": arch_status,
        "replicas": sum(int((d.get("status") or {}).get("replicas", 0)) for d in present.values()),
        "readyReplicas": sum(int((d.get("status") or {}).get("readyReplicas", 0)) for d in present.values()),
        "selector": ",".join(f"{k}={v}" for k, v in serving_selector(name).items()),
    }
    if im.spec.autoscaling is not None:
        if observed.autoscaler_status is not None:
            status["autoscaler"] = dict(observed.autoscaler_status)
        elif im.status.autoscaler is not None:
            status["autoscaler"] = im.status.autoscaler.model_dump(mode="json", by_alias=True, exclude_none=True)
    return status


def _engine_events(im: InferenceModel, engines: Mapping[str, EngineStatus]) -> list[EventSpec]:
    previous = _previous_engines(im)
    events = []
    for arch, e in sorted(engines.items()):
        old = previous.get(arch)
        if old is not None and old.build_id == e.build_id and old.phase == e.phase:
            continue
        if e.phase == "Pending" and (old is None or old.build_id != e.build_id):
            events.append(
                EventSpec(
                    "Normal",
                    "BuildStarted",
                    f"{arch}: build Job {e.job} for {e.precision} ({e.backend}) started",
                )
            )
        elif e.phase == "Ready":
            events.append(EventSpec("Normal", "EngineReady", f"{arch}: engine {e.key[:16]} ready ({e.message})"))
        elif e.phase == "Failed":
            events.append(EventSpec("Warning", "BuildFailed", f"{arch}: {e.reason}: {e.message}"))
    return events


def _rollout_events(observed: Observed, name: str, serving: Mapping[str, str], kept: set[str]) -> list[EventSpec]:
    events = []
    for arch, key in sorted(serving.items()):
        if arch in kept:
            continue
        dep = _deployment_for(observed, deployment_name(name, arch))
        if dep is None:
            events.append(EventSpec("Normal", "DeploymentCreated", f"{arch}: serving engine {key[:16]}"))
        elif _engine_key_of(dep) != key:
            events.append(
                EventSpec(
                    "Normal",
                    "RollingOut",
                    f"{arch}: rolling from engine {_engine_key_of(dep)[:16]} to {key[:16]}",
                )
            )
    return events


def _condition_events(im: InferenceModel, status: Mapping[str, Any]) -> list[EventSpec]:
    """Ready turning True, Stalled turning True, and Serving turning False: the transitions a user acts on."""
    previous = {c.type: c.status for c in im.status.conditions}
    events = []
    for c in status["conditions"]:
        became = c["status"] != previous.get(c["type"])
        if c["type"] == READY and became and c["status"] == "True":
            events.append(EventSpec("Normal", "Ready", c["message"]))
        elif c["type"] == STALLED and became and c["status"] == "True":
            events.append(EventSpec("Warning", "Stalled", f"{c['reason']}: {c['message']}"))
        elif c["type"] == SERVING and previous.get(SERVING) == "True" and c["status"] == "False":
            events.append(EventSpec("Warning", "NotServing", f"{c['reason']}: {c['message']}"))
    return events
