"""How many replicas each architecture can hold, from nodes' allocatable GPUs and the pods bound to them (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelfleet_operator.placement import GPU_RESOURCE, NodeInfo

# The scheduler's FailedScheduling message names what is short: "0/6 nodes are available: 2 Insufficient
# nvidia.com/gpu, 4 node(s) didn't match Pod's node affinity/selector."
_INSUFFICIENT = re.compile(r"Insufficient ([A-Za-z0-9./_-]+)")


@dataclass(frozen=True)
class GpuPod:
    """A pod holding (or asking for) GPUs; `node` is empty until it is bound."""

    namespace: str
    name: str
    node: str
    gpus: int
    build: bool = False  # a modelfleet build pod: serving pods outrank it (PriorityClasses) and may preempt it


@dataclass(frozen=True)
class OwnPod:
    """One of a model's own pods (build or serving), as placement and the conditions need it."""

    name: str
    component: str
    architecture: str
    node: str
    unschedulable: str = ""  # the scheduler's message while it cannot place the pod


def _quantity(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs a pod asks for: extended resources have requests equal to limits, and either may be written."""
    spec = pod.get("spec") or {}
    total = 0
    for c in spec.get("containers") or []:
        resources = c.get("resources") or {}
        asked = (resources.get("requests") or {}).get(GPU_RESOURCE, (resources.get("limits") or {}).get(GPU_RESOURCE))
        total += _quantity(asked)
    init = [
        _quantity(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE))
        for c in spec.get("initContainers") or []
    ]
    return max([total, *init])


def finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in {"Succeeded", "Failed"}


def gpu_pod(pod: Mapping[str, Any], *, build: bool = False) -> GpuPod | None:
    """The pod as capacity sees it, or None when it holds no GPU (none asked, or it has finished)."""
    gpus = pod_gpus(pod)
    if gpus == 0 or finished(pod):
        return None
    meta = pod.get("metadata") or {}
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    return GpuPod(namespace=namespace, name=name, node=node, gpus=gpus, build=build)


def unschedulable_message(pod: Mapping[str, Any]) -> str:
    """The scheduler's reason for not placing the pod ('' when it is placed or was never tried)."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message") or "no node fits")
    return ""


def free_gpus(nodes: Iterable[NodeInfo], pods: Iterable[GpuPod], *, preempt_builds: bool = False) -> dict[str, int]:
    """Allocatable GPUs minus what the bound pods request, by node (never below 0).

    With `preempt_builds`, GPUs held by build pods count as free: a serving pod outranks them.
    """
    used: dict[str, int] = {}
    for p in pods:
        if p.node and not (preempt_builds and p.build):
            used[p.node] = used.get(p.node, 0) + p.gpus
    return {n.name: max(0, n.allocatable_gpus - used.get(n.name, 0)) for n in nodes}


@dataclass(frozen=True)
class Room:
    """Replicas of one model an architecture can hold: now (free GPUs plus its own pods there), and ever."""

    now: int
    ever: int


def room(
    targets: Mapping[str, Sequence[str]],
    nodes: Iterable[NodeInfo],
    pods: Iterable[GpuPod],
    *,
    gpus: int,
    own: Mapping[str, int],
    preempt_builds: bool = False,
) -> dict[str, Room | None]:
    """Per architecture, the replicas it can hold; None for a CPU model (GPUs are not what limits it).

    `own` counts this model's bound serving pods per architecture: the GPUs they hold are theirs to keep.
    """
    if gpus <= 0:
        return {arch: None for arch in targets}
    by_name = {n.name: n for n in nodes}
    free = free_gpus(by_name.values(), pods, preempt_builds=preempt_builds)
    out: dict[str, Room | None] = {}
    for arch, names in targets.items():
        known = [by_name[n] for n in names if n in by_name]
        now = sum(free[n.name] // gpus for n in known) + own.get(arch, 0)
        ever = sum(n.allocatable_gpus // gpus for n in known)
        out[arch] = Room(now=min(now, ever), ever=ever)
    return out


def insufficient(message: str) -> str:
    """The resource a FailedScheduling message says is short ('' when it names none)."""
    found = _INSUFFICIENT.findall(message)
    return found[0] if found else ""


def unschedulable_reasons(pods: Iterable[OwnPod]) -> list[str]:
    """One line per (architecture, what is short) among the model's pods the scheduler cannot place."""
    out: dict[tuple[str, str], str] = {}
    for p in sorted(pods, key=lambda p: (p.architecture, p.component, p.name)):
        if not p.unschedulable:
            continue
        short = insufficient(p.unschedulable)
        key = (p.architecture, short or p.unschedulable)
        if key not in out:
            what = f"insufficient {short} on {p.architecture}" if short else f"cannot place on {p.architecture}"
            out[key] = f"{what} ({p.component} pod {p.name}: {p.unschedulable})"
    return list(out.values())
