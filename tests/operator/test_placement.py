"""Architecture discovery from GPU Feature Discovery labels, taints and the user's placement."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelfleet_operator.api import Placement
from modelfleet_operator.placement import (
    NodeInfo,
    architecture_selector,
    discover,
    eligible,
    node_architecture,
    tolerations_for,
)

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def gpu_node(
    name: str,
    major: str | None,
    minor: str | None,
    product: str = "",
    gpus: int = 8,
    taints: tuple[dict[str, str], ...] = (GPU_TAINT,),
    **labels: str,
) -> NodeInfo:
    lbl = dict(labels)
    if major is not None:
        lbl["nvidia.com/gpu.compute.major"] = major
    if minor is not None:
        lbl["nvidia.com/gpu.compute.minor"] = minor
    if product:
        lbl["nvidia.com/gpu.product"] = product
    return NodeInfo(name=name, labels=lbl, taints=taints, gpus=gpus)


def test_architecture_comes_from_compute_capability_labels() -> None:
    assert node_architecture({"nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0"}) == "sm90"
    assert node_architecture({"nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "9"}) == "sm89"


def test_architecture_falls_back_to_the_product_name_longest_match_first() -> None:
    assert node_architecture({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}) == "sm80"
    assert node_architecture({"nvidia.com/gpu.product": "NVIDIA-A10"}) == "sm86"
    assert node_architecture({"nvidia.com/gpu.product": "NVIDIA-L40S"}) == "sm89"
    assert node_architecture({"nvidia.com/gpu.product": "Tesla-T4"}) == "sm75"
    assert node_architecture({"nvidia.com/gpu.product": "Mystery-GPU"}) is None
    assert node_architecture({}) is None


def test_discover_groups_eligible_gpu_nodes_by_architecture() -> None:
    nodes = [
        gpu_node("h1", "9", "0"),
        gpu_node("h2", "9", "0"),
        gpu_node("a1", None, None, product="NVIDIA-A100-PCIE-40GB"),
        NodeInfo(name="cpu", labels={}, gpus=0),
    ]
    assert discover(nodes, Placement(), gpus=1) == {"sm80": ["a1"], "sm90": ["h1", "h2"]}


def test_cpu_serving_has_one_architecture_and_avoids_tainted_gpu_nodes() -> None:
    nodes = [
        gpu_node("h1", "9", "0"),
        NodeInfo(name="cpu-0", labels={}, gpus=0),
        NodeInfo(name="cpu-1", labels={}),
    ]
    assert discover(nodes, Placement(), gpus=0) == {"cpu": ["cpu-0", "cpu-1"]}


def test_node_selector_affinity_and_taints_decide_eligibility() -> None:
    h100 = gpu_node("h1", "9", "0", pool="prod")
    tainted = gpu_node("h2", "9", "0", taints=(GPU_TAINT, {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}))
    assert eligible(h100, Placement.model_validate({"nodeSelector": {"pool": "prod"}}), gpus=1)
    assert not eligible(h100, Placement.model_validate({"nodeSelector": {"pool": "dev"}}), gpus=1)
    assert not eligible(tainted, Placement(), gpus=1)
    tolerate = Placement.model_validate(
        {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]}
    )
    assert eligible(tainted, tolerate, gpus=1)
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["prod"]}]}]
            }
        }
    }
    assert eligible(h100, Placement.model_validate({"affinity": affinity}), gpus=1)
    assert not eligible(gpu_node("h3", "9", "0"), Placement.model_validate({"affinity": affinity}), gpus=1)


DEDICATED = {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("toleration", "taint", "schedulable"),
    [
        ({"key": "dedicated", "value": "llm"}, DEDICATED, True),  # Equal by default, any effect
        ({"key": "dedicated", "value": "llm", "effect": "NoSchedule"}, DEDICATED, True),
        ({"key": "dedicated", "value": "llm", "effect": "NoExecute"}, DEDICATED, False),  # another effect
        ({"key": "dedicated", "value": "web"}, DEDICATED, False),  # another value
        ({"key": "dedicated"}, DEDICATED, False),  # Equal with no value matches only an empty value
        ({"key": "dedicated"}, {"key": "dedicated", "effect": "NoSchedule"}, True),
        ({"key": "other", "value": "llm"}, DEDICATED, False),  # another key
        ({"key": "dedicated", "operator": "Exists"}, DEDICATED, True),  # any value
        ({"key": "other", "operator": "Exists"}, DEDICATED, False),
        ({"operator": "Exists"}, DEDICATED, True),  # no key: every taint
        ({"operator": "Exists", "effect": "NoExecute"}, DEDICATED, False),
        ({"key": "dedicated", "value": "llm"}, {**DEDICATED, "effect": "NoExecute"}, True),
        ({"key": "other", "value": "x"}, {**DEDICATED, "effect": "PreferNoSchedule"}, True),  # only a preference
        ({"key": "other", "value": "x"}, {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}, True),
        ({"key": "dedicated", "value": "llm", "effect": "NoSchedule"}, {**DEDICATED, "effect": "NoExecute"}, False),
        ({"key": "aaa", "operator": "Exists"}, DEDICATED, False),  # keys and values compare equal, not ordered
        ({"key": "aaa", "value": "llm"}, DEDICATED, False),
        ({"key": "dedicated", "value": "abc"}, DEDICATED, False),
    ],
)
def test_a_taint_is_tolerated_as_the_scheduler_does(
    toleration: dict[str, str], taint: dict[str, str], schedulable: bool
) -> None:
    # From JSON, as the API server sends them: fresh strings, equal but not the same objects as the literals.
    # The first toleration's effect matches no NoSchedule taint, so the next one must still be looked at.
    node = gpu_node("n", "9", "0", taints=fresh((GPU_TAINT, taint)))
    first = {"key": "unrelated", "operator": "Exists", "effect": "NoExecute"}
    placement = Placement.model_validate(fresh({"tolerations": [first, toleration]}))
    assert eligible(node, placement, gpus=1) is schedulable


def fresh(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def test_a_condition_taint_is_skipped_and_the_next_taint_still_counts() -> None:
    taints = fresh(({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}, GPU_TAINT, DEDICATED))
    assert not eligible(gpu_node("n", "9", "0", taints=tuple(taints)), Placement(), gpus=1)


def test_a_node_selector_value_must_equal_the_label() -> None:
    dev = gpu_node("d", "9", "0", **fresh({"pool": "dev"}))
    assert not eligible(dev, Placement.model_validate(fresh({"nodeSelector": {"pool": "prod"}})), gpus=1)
    assert eligible(dev, Placement.model_validate(fresh({"nodeSelector": {"pool": "dev"}})), gpus=1)


def test_a_node_without_gpu_capacity_has_no_gpus_and_takes_no_gpu_pod() -> None:
    cpu = NodeInfo.from_node({"metadata": {"name": "c"}, "status": {"capacity": {"cpu": "4"}}})
    assert cpu.gpus == 0 and NodeInfo(name="x").gpus == 0
    assert not eligible(gpu_node("none", "9", "0", gpus=0), Placement(), gpus=1)
    assert eligible(NodeInfo(name="plain"), Placement(), gpus=0)


def test_affinity_read_from_json_matches_as_literals_do() -> None:
    node = gpu_node("n", "9", "0", **fresh({"pool": "prod", "gpu-memory": "80"}))
    for expr, matches in [
        ({"key": "pool", "operator": "In", "values": ["prod"]}, True),
        ({"key": "pool", "operator": "NotIn", "values": ["prod"]}, False),
        ({"key": "pool", "operator": "Exists"}, True),
        ({"key": "pool", "operator": "DoesNotExist"}, False),
        ({"key": "gpu-memory", "operator": "Gt", "values": ["40"]}, True),
        ({"key": "gpu-memory", "operator": "Gt", "values": ["100"]}, False),
        ({"key": "gpu-memory", "operator": "Lt", "values": ["100"]}, True),
        ({"key": "gpu-memory", "operator": "Lt", "values": ["40"]}, False),
    ]:
        assert eligible(node, affinity(fresh(expr)), gpus=1) is matches, expr


def test_a_computed_architecture_name_selects_like_a_literal_one() -> None:
    labels, products = architecture_selector("".join(["sm", "9", "0"]))
    assert labels == {"nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0"}
    assert "NVIDIA-H100-80GB-HBM3" in products


def test_gpu_pods_tolerate_the_gpu_taint_and_cpu_pods_do_not() -> None:
    placement = Placement.model_validate({"tolerations": [{"key": "dedicated", "value": "llm"}]})
    mine = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": ""}
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert tolerations_for(placement, gpus=1) == [mine, gpu]
    assert tolerations_for(placement, gpus=0) == [mine]  # no tolerationSeconds: null is left out
    assert not eligible(gpu_node("g", "9", "0"), Placement(), gpus=0)  # the GPU taint keeps CPU pods off
    assert eligible(gpu_node("g", "9", "0"), Placement(), gpus=1)


def test_a_node_without_enough_gpus_is_not_eligible() -> None:
    assert not eligible(gpu_node("small", "8", "9", gpus=1), Placement(), gpus=2)
    assert eligible(gpu_node("big", "8", "9", gpus=2), Placement(), gpus=2)


def test_a_cordoned_or_not_ready_node_stays_in_the_fleet() -> None:
    cordoned = gpu_node(
        "h1",
        "9",
        "0",
        taints=(
            GPU_TAINT,
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
        ),
    )
    assert discover([cordoned], Placement(), gpus=1) == {"sm90": ["h1"]}


def test_architecture_selectors_use_a_one_digit_minor() -> None:
    assert architecture_selector("sm90")[0] == {
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
    }
    assert architecture_selector("sm100")[0] == {
        "nvidia.com/gpu.compute.major": "10",
        "nvidia.com/gpu.compute.minor": "0",
    }
    assert architecture_selector("sm121")[0] == {
        "nvidia.com/gpu.compute.major": "12",
        "nvidia.com/gpu.compute.minor": "1",
    }
    for arch in ("sm75", "sm80", "sm89", "sm90", "sm100", "sm120"):
        assert node_architecture(architecture_selector(arch)[0]) == arch


def test_the_product_fallback_selects_the_label_values_gfd_writes() -> None:
    _, t4 = architecture_selector("sm75")
    assert "Tesla-T4" in t4
    _, h100 = architecture_selector("sm90")
    assert "NVIDIA-H100-80GB-HBM3" in h100
    for value in [*t4, *h100]:  # every value we select on maps back to its architecture
        assert node_architecture({"nvidia.com/gpu.product": value}) in {"sm75", "sm90"}


def affinity(*expressions: dict[str, object]) -> Placement:
    required = {"nodeSelectorTerms": [{"matchExpressions": list(expressions)}]}
    return Placement.model_validate(
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}}
    )


def memory_node(value: str) -> NodeInfo:
    return NodeInfo(name="n", labels={"nvidia.com/gpu.product": "NVIDIA-A100", "gpu-memory": value}, gpus=1)


def test_gt_and_lt_affinity_compare_label_values_as_integers() -> None:
    node = memory_node("80")
    assert eligible(node, affinity({"key": "gpu-memory", "operator": "Gt", "values": ["40"]}), gpus=1)
    assert not eligible(node, affinity({"key": "gpu-memory", "operator": "Gt", "values": ["80"]}), gpus=1)
    assert eligible(node, affinity({"key": "gpu-memory", "operator": "Lt", "values": ["100"]}), gpus=1)
    assert not eligible(node, affinity({"key": "gpu-memory", "operator": "Lt", "values": ["80"]}), gpus=1)
    # 9 < 10 as integers (as strings "9" > "10"); a non-integer or absent label never matches
    assert eligible(
        memory_node("9"),
        affinity({"key": "gpu-memory", "operator": "Lt", "values": ["10"]}),
        gpus=1,
    )
    assert not eligible(
        memory_node("big"),
        affinity({"key": "gpu-memory", "operator": "Gt", "values": ["1"]}),
        gpus=1,
    )
    assert not eligible(
        gpu_node("n", "8", "0"), affinity({"key": "gpu-memory", "operator": "Gt", "values": ["1"]}), gpus=1
    )
    assert not eligible(node, affinity({"key": "gpu-memory", "operator": "Gt", "values": []}), gpus=1)


def test_in_notin_exists_and_doesnotexist_affinity_operators() -> None:
    node = gpu_node("n", "8", "0", pool="a")
    for operator, values, expected in [
        ("In", ["a", "b"], True),
        ("In", ["b"], False),
        ("NotIn", ["b"], True),
        ("NotIn", ["a"], False),
        ("Exists", [], True),
        ("DoesNotExist", [], False),
        ("Unknown", ["a"], False),
    ]:
        assert eligible(node, affinity({"key": "pool", "operator": operator, "values": values}), gpus=1) is expected
    bare = gpu_node("n", "8", "0")
    assert eligible(bare, affinity({"key": "pool", "operator": "NotIn", "values": ["a"]}), gpus=1)
    assert eligible(bare, affinity({"key": "pool", "operator": "DoesNotExist"}), gpus=1)
    assert not eligible(bare, affinity({"key": "pool", "operator": "In", "values": ["a"]}), gpus=1)


def test_a_node_object_parses_into_labels_taints_and_gpu_counts() -> None:
    node = NodeInfo.from_node(
        {
            "metadata": {"name": "gpu-1", "labels": {"nvidia.com/gpu.compute.major": "9"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": None, "effect": "NoSchedule", "timeAdded": "t"}]},
            "status": {"capacity": {"nvidia.com/gpu": "8", "cpu": "64"}, "allocatable": {"nvidia.com/gpu": "7"}},
        }
    )
    assert node == NodeInfo(
        name="gpu-1",
        labels={"nvidia.com/gpu.compute.major": "9"},
        taints=({"key": "nvidia.com/gpu", "effect": "NoSchedule"},),
        gpus=8,
        allocatable=7,
    )
    assert node.allocatable_gpus == 7
    bare = NodeInfo.from_node({"metadata": {"name": "cpu-1"}, "status": {"capacity": {"nvidia.com/gpu": "lots"}}})
    assert (bare.gpus, bare.allocatable_gpus, bare.taints, dict(bare.labels)) == (0, 0, (), {})
    unlisted = NodeInfo.from_node({"metadata": {"name": "g"}, "status": {"capacity": {"nvidia.com/gpu": 4}}})
    assert (unlisted.gpus, unlisted.allocatable, unlisted.allocatable_gpus) == (4, 4, 4)
    assert NodeInfo(name="x", gpus=3).allocatable_gpus == 3


PRODUCTS = {
    "NVIDIA-GB200": "sm100",
    "NVIDIA-B200": "sm100",
    "NVIDIA-B100": "sm100",
    "NVIDIA-GH200-480GB": "sm90",
    "NVIDIA-H200": "sm90",
    "NVIDIA-H100-80GB-HBM3": "sm90",
    "NVIDIA-H800": "sm90",
    "NVIDIA-H20": "sm90",
    "NVIDIA-L40S": "sm89",
    "NVIDIA-L40": "sm89",
    "NVIDIA-L4": "sm89",
    "NVIDIA-GeForce-RTX-4090": "sm89",
    "NVIDIA-RTX-6000-Ada-Generation": "sm89",
    "NVIDIA-A100-SXM4-80GB": "sm80",
    "NVIDIA-A800": "sm80",
    "NVIDIA-A30": "sm80",
    "NVIDIA-A40": "sm86",
    "NVIDIA-A10G": "sm86",
    "NVIDIA-A10": "sm86",
    "NVIDIA-A16": "sm86",
    "NVIDIA-A2": "sm86",
    "NVIDIA-RTX-A6000": "sm86",
    "Tesla-T4": "sm75",
    "Tesla-V100-SXM2-16GB": "sm70",
    "Tesla-P100-PCIE-16GB": "sm60",
    "Tesla-P4": "sm61",
}


def test_every_listed_gpu_product_maps_to_its_architecture() -> None:
    for product, arch in PRODUCTS.items():
        assert node_architecture({"nvidia.com/gpu.product": product}) == arch, product
        assert node_architecture({"nvidia.com/gpu.product": product.lower()}) == arch, product
    assert node_architecture({"nvidia.com/gpu.product": "NVIDIA-Unknown"}) is None
    assert node_architecture({"nvidia.com/gpu.compute.major": "8", "nvidia.com/gpu.compute.minor": "x"}) is None


def test_every_architectures_product_label_values_select_its_boards() -> None:
    assert architecture_selector("sm75")[1] == ["Tesla-T4"]
    assert architecture_selector("sm89")[1] == [
        "NVIDIA-L40S",
        "NVIDIA-L40",
        "NVIDIA-L4",
        "NVIDIA-RTX-4090",
        "NVIDIA-RTX-6000-Ada",
    ]
    assert architecture_selector("sm90")[1][:3] == ["NVIDIA-GH200", "NVIDIA-H200", "NVIDIA-H100-80GB-HBM3"]
    assert architecture_selector("sm100") == (
        {"nvidia.com/gpu.compute.major": "10", "nvidia.com/gpu.compute.minor": "0"},
        ["NVIDIA-GB200", "NVIDIA-B200", "NVIDIA-B100"],
    )
    assert architecture_selector("cpu") == ({}, [])
