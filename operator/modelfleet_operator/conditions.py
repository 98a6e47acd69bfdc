"""The conditions GitOps tools read, decided without I/O from what one reconcile pass found per architecture.

They follow the kstatus conventions (sigs.k8s.io/cli-utils/pkg/kstatus/status; Flux, kpt and Helm 4 read
them) and back the chart's Argo CD health check:

- `Ready` (normal-true): the *current generation* serves everywhere it should — every architecture's engine
  for this generation is built and every architecture that should have replicas answers from that engine
  with no pod of an older version left. A spec change turns it False until the new generation is live.
  A model scaled to zero replicas is Ready (reason ScaledToZero) once its engines are built: as desired.
- `Reconciling` (abnormal-true): the current generation is being built or rolled out (kstatus: InProgress).
- `Stalled` (abnormal-true): the current generation cannot go live without a change: a build failed
  (builds are deterministic and never retried for the same inputs), or no eligible node (kstatus: Failed).
  Stalled and Reconciling are never True together.
  A serving pod of a GPU architecture whose runtime computes on the CPU is Stalled too (ServingOnCPU): it
  answers, but not as asked, and only a change (the image, the node's driver) fixes it.
- `Serving` (normal-true, informational): some version answers requests; its reason says which
  (CurrentGeneration or PreviousVersion) and its message names the architectures and engine keys, so a
  failed update reads "the previous version serves" without hiding the failure.
- `EnginesReady` (normal-true, informational): every engine of the current generation is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet_operator.api import EngineStatus

READY, RECONCILING, STALLED, SERVING, ENGINES_READY = "Ready", "Reconciling", "Stalled", "Serving", "EnginesReady"
CONDITION_TYPES = (READY, RECONCILING, STALLED, SERVING, ENGINES_READY)
CAPACITY_REASONS = frozenset({"Unschedulable", "InsufficientCapacity"})  # waiting for GPUs to free


@dataclass(frozen=True)
class Verdict:
    """One condition's value before timestamps: reconcile turns it into a metav1.Condition."""

    type: str
    ok: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Architecture:
    """One architecture as a reconcile pass sees it."""

    name: str
    engine: EngineStatus | None  # the current generation's engine; None when the architecture is no target
    replicas: int  # what it should run
    deployment: Mapping[str, Any] | None  # its serving Deployment as observed
    key_annotation: str
    generation_annotation: str
    since_annotation: str = ""  # the Deployment generation its template last changed at


@dataclass(frozen=True)
class Capacity:
    """Replicas wanted in all, placed (what the free GPUs hold now), and what the fleet could ever hold."""

    desired: int
    placed: int
    ever: int
    resource: str
    full: Sequence[str]  # architectures with no room for another replica


@dataclass(frozen=True)
class Facts:
    """Everything the conditions depend on."""

    generation: int
    architectures: Sequence[Architecture]
    missing_pinned: Sequence[str]
    missing_claims: Sequence[str] = ()  # "PersistentVolumeClaim x (the engine store) not found in namespace y"
    unschedulable: Sequence[str] = ()  # "insufficient nvidia.com/gpu on sm90 (build pod ...)"
    capacity: Capacity | None = None  # None: GPUs do not limit this model
    was_ready: bool = False  # Ready was True for this same generation
    on_cpu: Sequence[str] = ()  # "clf-sm90-x (sm90) computes on CPUExecutionProvider, asked for ..."


def _annotation(dep: Mapping[str, Any], name: str) -> str:
    return str((dep["metadata"].get("annotations") or {}).get(name, ""))


def _count(dep: Mapping[str, Any], field: str) -> int:
    return int((dep.get("status") or {}).get(field, 0))


def available(a: Architecture) -> bool:
    return a.deployment is not None and _count(a.deployment, "availableReplicas") >= 1


def _template_generation(a: Architecture) -> int:
    """The Deployment generation its pod template last changed at: a status observed since then is about
    this template's pods, even while a newer generation (a replicas change only) is not observed yet."""
    dep = a.deployment or {"metadata": {}}
    since = _annotation(dep, a.since_annotation) if a.since_annotation else ""
    return int(since) if since.isdigit() else int(dep["metadata"].get("generation", 0))


def runs_current(a: Architecture, generation: int) -> bool:
    """The Deployment is this generation's, observed by its controller, with no older pod left."""
    dep = a.deployment
    if dep is None or a.engine is None or a.engine.phase != "Ready":
        return False
    return (
        _annotation(dep, a.key_annotation) == a.engine.key
        and _annotation(dep, a.generation_annotation) == str(generation)
        and _count(dep, "observedGeneration") >= _template_generation(a)
        and _count(dep, "updatedReplicas") == _count(dep, "replicas")
    )


def live(a: Architecture, generation: int) -> bool:
    return runs_current(a, generation) and available(a)


def rolled_out(a: Architecture, generation: int) -> bool:
    """Live with every replica it should run available (a Deployment's own kstatus Current)."""
    if a.replicas == 0:
        return a.deployment is None or _count(a.deployment, "replicas") == 0
    return live(a, generation) and all(
        _count(a.deployment or {}, f) >= a.replicas for f in ("updatedReplicas", "availableReplicas")
    )


def _targets(facts: Facts) -> list[Architecture]:
    return [a for a in facts.architectures if a.engine is not None]


def _failed(facts: Facts) -> list[Architecture]:
    return [a for a in _targets(facts) if a.engine is not None and a.engine.phase == "Failed"]


def _building(facts: Facts) -> list[str]:
    return [a.name for a in _targets(facts) if a.engine is not None and a.engine.phase in {"Pending", "Building"}]


def _serving_summary(archs: Sequence[Architecture], key_of: Mapping[str, str]) -> str:
    return ", ".join(f"{a.name} (engine {key_of[a.name][:16]})" for a in archs)


def stalled(facts: Facts) -> Verdict:
    if facts.missing_claims:
        return Verdict(STALLED, True, "ClaimNotFound", "; ".join(facts.missing_claims))
    if not _targets(facts):
        where = ", ".join(facts.missing_pinned) or "any architecture"
        return Verdict(STALLED, True, "NoEligibleNodes", f"no eligible node for {where}")
    failed = _failed(facts)
    if failed:
        reasons = {a.engine.reason for a in failed if a.engine is not None}
        reason = reasons.pop() if len(reasons) == 1 else "BuildFailed"
        problems = "; ".join(f"{a.name}: {a.engine.reason}: {a.engine.message}" for a in failed if a.engine)
        old = [a.name for a in facts.architectures if available(a)]
        suffix = f" (the previous version still serves on {', '.join(old)})" if old else ""
        why = f"generation {facts.generation} cannot go live without a change: {problems}{suffix}"
        return Verdict(STALLED, True, reason or "BuildFailed", why)
    if facts.missing_pinned:
        return Verdict(STALLED, True, "NoEligibleNodes", f"no eligible node for {', '.join(facts.missing_pinned)}")
    cap = facts.capacity
    if cap is not None and cap.desired > cap.ever:
        why = (
            f"{cap.desired} replicas asked, but the eligible nodes can ever hold {cap.ever}"
            f" ({cap.resource}); {cap.placed} placed"
        )
        return Verdict(STALLED, True, "InsufficientCapacity", why)
    if facts.on_cpu:
        why = (
            f"GPU serving pods compute on the CPU: {'; '.join(facts.on_cpu)}. The image's ONNX Runtime is not the "
            "GPU build (onnxruntime-gpu), or its CUDA libraries did not load: the pod's log says which"
        )
        return Verdict(STALLED, True, "ServingOnCPU", why)
    return Verdict(STALLED, False, "NotStalled", "nothing blocks the current generation")


def reconciling(facts: Facts, blocked: Verdict) -> Verdict:
    if blocked.ok:
        return Verdict(RECONCILING, False, "Stalled", "not progressing: see Stalled")
    if facts.unschedulable:
        return Verdict(RECONCILING, True, "Unschedulable", "; ".join(facts.unschedulable))
    cap = facts.capacity
    if cap is not None and cap.placed < cap.desired:
        why = f"{cap.placed} of {cap.desired} replicas placed: no free {cap.resource} for more on {', '.join(cap.full)}"
        return Verdict(RECONCILING, True, "InsufficientCapacity", why)
    building = _building(facts)
    if building:
        return Verdict(RECONCILING, True, "Building", f"building engines for {', '.join(sorted(building))}")
    rolling = [a for a in facts.architectures if not rolled_out(a, facts.generation)]
    if rolling:
        detail = ", ".join(
            f"{a.name} ({_count(a.deployment or {}, 'availableReplicas')}/{a.replicas} available)" for a in rolling
        )
        return Verdict(RECONCILING, True, "RollingOut", f"rolling out generation {facts.generation}: {detail}")
    return Verdict(RECONCILING, False, "Complete", f"generation {facts.generation} is rolled out")


def ready(facts: Facts, blocked: Verdict, progress: Verdict) -> Verdict:
    targets = _targets(facts)
    wanted = [a for a in targets if a.replicas > 0]
    not_live = [a.name for a in wanted if not live(a, facts.generation)]
    engines_built = all(a.engine is not None and a.engine.phase == "Ready" for a in targets)
    if blocked.ok:
        return Verdict(READY, False, blocked.reason, blocked.message)
    if not engines_built:
        return Verdict(READY, False, progress.reason, progress.message)
    if not wanted:
        return Verdict(READY, True, "ScaledToZero", f"generation {facts.generation}: engines built, replicas is 0")
    keys = {a.name: a.engine.key for a in wanted if a.engine is not None}
    serves = f"generation {facts.generation} serves on"
    if not_live and _only_scaling(facts, wanted):
        # A scale-up that adds an architecture is not a rollout: the generation went live and still is.
        on = [a for a in wanted if live(a, facts.generation)]
        return Verdict(
            READY, True, "Serving", f"{serves} {_serving_summary(on, keys)}; scaling onto {', '.join(not_live)}"
        )
    if not_live:
        return Verdict(
            READY, False, "RollingOut", f"generation {facts.generation} is not live yet on {', '.join(not_live)}"
        )
    return Verdict(READY, True, "Serving", f"{serves} {_serving_summary(wanted, keys)}")


def _only_scaling(facts: Facts, wanted: Sequence[Architecture]) -> bool:
    """Was this generation live already, and is every architecture not live yet free of older versions?"""
    if not facts.was_ready or not any(live(a, facts.generation) for a in wanted):
        return False
    return all(live(a, facts.generation) or _no_older_pod(a, facts.generation) for a in wanted)


def _no_older_pod(a: Architecture, generation: int) -> bool:
    """Nothing of an older version runs there: no Deployment, no pod yet, or only this generation's pods."""
    dep = a.deployment
    if dep is None or runs_current(a, generation):
        return True
    current = a.engine is not None and _annotation(dep, a.key_annotation) == a.engine.key
    # Scaled up from zero: its controller may not have seen the new spec yet, but it has no pod to be old.
    return current and _annotation(dep, a.generation_annotation) == str(generation) and _count(dep, "replicas") == 0


def serving(facts: Facts) -> Verdict:
    answering = [a for a in facts.architectures if available(a)]
    if not answering:
        return Verdict(SERVING, False, "NotServing", "no replica of any version is available")
    old = [a for a in answering if not runs_current(a, facts.generation)]
    keys = {a.name: _annotation(a.deployment or {}, a.key_annotation) for a in answering}
    if not old:
        where = _serving_summary(answering, keys)
        return Verdict(SERVING, True, "CurrentGeneration", f"generation {facts.generation} serves on {where}")
    generations = {_annotation(a.deployment or {}, a.generation_annotation) or "?" for a in old}
    message = (
        f"the previous version (generation {', '.join(sorted(generations))}) serves on {_serving_summary(old, keys)};"
        f" generation {facts.generation} is not live there"
    )
    return Verdict(SERVING, True, "PreviousVersion", message)


def engines_ready(facts: Facts) -> Verdict:
    targets = _targets(facts)
    if not targets:
        return Verdict(ENGINES_READY, False, "NoEligibleNodes", "no architecture to build for")
    failed = _failed(facts)
    if failed:
        detail = "; ".join(f"{a.name}: {a.engine.reason}: {a.engine.message}" for a in failed if a.engine)
        return Verdict(ENGINES_READY, False, "BuildFailed", detail)
    building = _building(facts)
    if building:
        return Verdict(ENGINES_READY, False, "Building", f"building engines for {', '.join(sorted(building))}")
    return Verdict(ENGINES_READY, True, "AllEnginesReady", f"{len(targets)}/{len(targets)} engines ready")


def decide(facts: Facts) -> list[Verdict]:
    """Every condition, in the order written to status (kstatus reads the first abnormal-true one)."""
    blocked = stalled(facts)
    progress = reconciling(facts, blocked)
    return [ready(facts, blocked, progress), blocked, progress, serving(facts), engines_ready(facts)]
