"""Renders the fake GPU fleet of the local cluster: KWOK nodes carrying GPU Feature Discovery labels.

Usage: fleet.py [SCALE] [--no-cpu-nodes]. With the real node (hack/node.sh), which is the cluster's cpu
architecture, hack/cluster.sh passes --no-cpu-nodes: only the GPU architectures stay fake.
"""

from __future__ import annotations

import json
import sys

# (name prefix, product label, compute major, minor, GPUs per node, count)
GPU_KINDS = [
    ("t4", "Tesla-T4", 7, 5, 4, 1),
    ("a100", "NVIDIA-A100-SXM4-80GB", 8, 0, 8, 1),
    ("l4", "NVIDIA-L4", 8, 9, 8, 1),
    ("h100", "NVIDIA-H100-80GB-HBM3", 9, 0, 8, 1),
]
CPU_NODES = 2


def node(
    name: str, *, labels: dict[str, str], gpus: int, taints: list[dict[str, str]], index: int
) -> dict[str, object]:
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            # kwok-controller manages only nodes with this annotation (hack/cluster.sh), so never the real one.
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "type": "kwok",
                **labels,
            },
        },
        # Loopback pod addresses (see hack/kwok/config.yaml): nothing here may reach a private range.
        "spec": {"podCIDR": f"127.{101 + index // 256}.{index % 256}.0/24", **({"taints": taints} if taints else {})},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "phase": "Running",
        },
    }


def gpu_node(
    prefix: str, index: int, *, product: str, major: int, minor: int, gpus: int, serial: int
) -> dict[str, object]:
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.compute.major": str(major),
        "nvidia.com/gpu.compute.minor": str(minor),
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.family": {7: "turing", 8: "ampere" if minor == 0 else "ada-lovelace", 9: "hopper"}[major],
    }
    # GPU pools are tainted on the big clouds, so workloads must tolerate it to land there.
    taints = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return node(f"gpu-{prefix}-{index}", labels=labels, gpus=gpus, taints=taints, index=serial)


def fleet(scale: int = 1, *, cpu_nodes: int = CPU_NODES) -> list[dict[str, object]]:
    kinds = [(k, i) for k in GPU_KINDS for i in range(k[5] * scale)]
    nodes = [
        gpu_node(prefix, i, product=product, major=major, minor=minor, gpus=gpus, serial=serial)
        for serial, ((prefix, product, major, minor, gpus, _), i) in enumerate(kinds)
    ]
    nodes += [node(f"cpu-{i}", labels={}, gpus=0, taints=[], index=len(kinds) + i) for i in range(cpu_nodes)]
    return nodes


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--no-cpu-nodes"]
    scale = int(args[0]) if args else 1
    cpu_nodes = 0 if "--no-cpu-nodes" in argv else CPU_NODES
    print(json.dumps({"apiVersion": "v1", "kind": "List", "items": fleet(scale, cpu_nodes=cpu_nodes)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
