"""Which GPU architectures a model may run on: node eligibility and SM architecture discovery (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelfleet_operator.api import Placement, Toleration

CPU = "cpu"
GPU_RESOURCE = "nvidia.com/gpu"
MAJOR_LABEL = "nvidia.com/gpu.compute.major"
MINOR_LABEL = "nvidia.com/gpu.compute.minor"
PRODUCT_LABEL = "nvidia.com/gpu.product"
# GPU pools carry this taint on the big clouds; a pod asking for GPUs tolerates it, as
# the ExtendedResourceToleration admission plugin would add.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

# Fallback when a node has a product label but no compute capability labels (older GFD).
# Longer names first: "A100" must win over "A10", "L40" over "L4".
PRODUCT_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("GB200", "sm100"),
    ("B200", "sm100"),
    ("B100", "sm100"),
    ("GH200", "sm90"),
    ("H200", "sm90"),
    ("H100", "sm90"),
    ("H800", "sm90"),
    ("H20", "sm90"),
    ("L40S", "sm89"),
    ("L40", "sm89"),
    ("L4", "sm89"),
    ("RTX-4090", "sm89"),
    ("RTX-6000-Ada", "sm89"),
    ("A100", "sm80"),
    ("A800", "sm80"),
    ("A30", "sm80"),
    ("A40", "sm86"),
    ("A10G", "sm86"),
    ("A10", "sm86"),
    ("A16", "sm86"),
    ("A2", "sm86"),
    ("RTX-A6000", "sm86"),
    ("T4", "sm75"),
    ("V100", "sm70"),
    ("P100", "sm60"),
    ("P4", "sm61"),
)
# CUDA compute capability is major.minor with a one-digit minor: sm90 = 9.0, sm100 = 10.0, sm121 = 12.1.
_ARCH = re.compile(r"^sm(\d{1,2})(\d)$")
# Taints the node lifecycle controller sets from conditions (cordon, NotReady, pressure) come and go:
# they keep new pods off a node for a while but do not take its architecture out of the fleet.
CONDITION_TAINT_PREFIX = "node.kubernetes.io/"


@dataclass(frozen=True)
class NodeInfo:
    """What placement needs of a Node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()
    gpus: int = 0
    allocatable: int | None = None  # GPUs pods may request (capacity minus what the kubelet keeps); None: all

    @property
    def allocatable_gpus(self) -> int:
        return self.gpus if self.allocatable is None else self.allocatable

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> NodeInfo:
        meta, spec, status = node.get("metadata", {}), node.get("spec") or {}, node.get("status") or {}
        capacity = status.get("capacity") or {}
        gpus = _count(capacity.get(GPU_RESOURCE, 0))
        allocatable = _count((status.get("allocatable") or {}).get(GPU_RESOURCE, gpus))
        taints = tuple(
            {k: str(v) for k, v in t.items() if k in {"key", "value", "effect"} and v is not None}
            for t in spec.get("taints") or ()
        )
        labels = dict(meta.get("labels") or {})
        return cls(name=meta["name"], labels=labels, taints=taints, gpus=gpus, allocatable=allocatable)


def _count(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def node_architecture(labels: Mapping[str, str]) -> str | None:
    """smXY from GPU Feature Discovery's compute capability labels, else from the product name."""
    major, minor = labels.get(MAJOR_LABEL), labels.get(MINOR_LABEL)
    if major and minor and major.isdigit() and minor.isdigit():
        return f"sm{int(major)}{int(minor)}"
    product = labels.get(PRODUCT_LABEL, "").upper()
    for name, arch in PRODUCT_ARCHITECTURES:
        if name.upper() in product:
            return arch
    return None


# The exact `nvidia.com/gpu.product` values GFD writes for the common boards, for node affinity (which
# cannot match substrings); products not listed here are selected as "NVIDIA-<name>".
PRODUCT_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "T4": ("Tesla-T4",),
    "A100": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"),
    "L4": ("NVIDIA-L4",),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
}


def architecture_selector(arch: str) -> tuple[dict[str, str], list[str]]:
    """Compute-capability labels selecting `arch`, and the product label values that also mean it."""
    m = _ARCH.match(arch)
    if not m:
        return {}, []
    products = [name for name, a in PRODUCT_ARCHITECTURES if a == arch]
    values = [v for name in products for v in PRODUCT_LABEL_VALUES.get(name, (f"NVIDIA-{name}",))]
    return {MAJOR_LABEL: m.group(1), MINOR_LABEL: m.group(2)}, values


def tolerations_for(placement: Placement, *, gpus: int) -> list[dict[str, Any]]:
    tolerations = [
        t.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False) for t in placement.tolerations
    ]
    return tolerations + [dict(GPU_TOLERATION)] if gpus > 0 else tolerations


def _tolerates(tolerations: Iterable[Toleration | Mapping[str, Any]], taint: Mapping[str, str]) -> bool:
    for t in tolerations:
        tol = t.model_dump(by_alias=True) if isinstance(t, Toleration) else dict(t)
        effect = tol.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        key = tol.get("key") or ""
        if tol.get("operator", "Equal") == "Exists":
            if not key or key == taint.get("key"):
                return True
        elif key == taint.get("key") and (tol.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _matches_expression(labels: Mapping[str, str], expr: Mapping[str, Any]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", ""), list(expr.get("values") or [])
    value = labels.get(key)
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in {"Gt", "Lt"} and value is not None and values:
        try:
            lhs, rhs = int(value), int(values[0])
        except ValueError:
            return False
        return lhs > rhs if op == "Gt" else lhs < rhs
    return False


def _matches_affinity(labels: Mapping[str, str], affinity: Mapping[str, Any]) -> bool:
    required = (affinity.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    return any(all(_matches_expression(labels, e) for e in term.get("matchExpressions") or []) for term in terms)


def eligible(node: NodeInfo, placement: Placement, *, gpus: int) -> bool:
    """Could a pod with this placement and GPU count be scheduled on the node (ignoring free capacity)?

    Cordoned and NotReady nodes still count: they are part of the fleet, and dropping an
    architecture during a node drain would tear down its serving Deployment.
    """
    if any(node.labels.get(k) != v for k, v in placement.node_selector.items()):
        return False
    if not _matches_affinity(node.labels, placement.affinity):
        return False
    tolerations: list[Toleration | Mapping[str, Any]] = [*placement.tolerations]
    if gpus > 0:
        tolerations.append(GPU_TOLERATION)
    for taint in node.taints:
        if taint.get("key", "").startswith(CONDITION_TAINT_PREFIX):
            continue
        if taint.get("effect") in {"NoSchedule", "NoExecute"} and not _tolerates(tolerations, taint):
            return False
    return node.gpus >= gpus if gpus > 0 else True


def discover(nodes: Iterable[NodeInfo], placement: Placement, *, gpus: int) -> dict[str, list[str]]:
    """Eligible node names by architecture; a model served without GPUs has the one architecture 'cpu'."""
    found: dict[str, list[str]] = {}
    for node in nodes:
        if not eligible(node, placement, gpus=gpus):
            continue
        arch = node_architecture(node.labels) if gpus > 0 else CPU
        if arch is not None:
            found.setdefault(arch, []).append(node.name)
    return {arch: sorted(names) for arch, names in sorted(found.items())}
