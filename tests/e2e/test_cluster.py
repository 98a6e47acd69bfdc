"""The local cluster is real Kubernetes: scheduling, Jobs, Deployments, CRDs and admission all behave."""

from __future__ import annotations

import json

import yaml

from tests.e2e.conftest import Cluster

ARCHITECTURES = {
    "sm75": "Tesla-T4",
    "sm80": "NVIDIA-A100-SXM4-80GB",
    "sm89": "NVIDIA-L4",
    "sm90": "NVIDIA-H100-80GB-HBM3",
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def get_json(cluster: Cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_every_gpu_architecture_is_listed_with_its_labels(cluster: Cluster) -> None:
    nodes = get_json(cluster, "nodes")["items"]
    by_arch: dict[str, list[dict]] = {}
    for node in nodes:
        labels = node["metadata"]["labels"]
        if "nvidia.com/gpu.compute.major" in labels:
            arch = f"sm{labels['nvidia.com/gpu.compute.major']}{labels['nvidia.com/gpu.compute.minor']}"
            by_arch.setdefault(arch, []).append(node)
    assert set(ARCHITECTURES) <= set(by_arch)
    for arch, product in ARCHITECTURES.items():
        node = by_arch[arch][0]
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == product
        assert int(labels["nvidia.com/gpu.count"]) >= 1
        assert node["status"]["capacity"]["nvidia.com/gpu"] == labels["nvidia.com/gpu.count"]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert ready["Ready"] == "True", f"{node['metadata']['name']} is not Ready"
    cpu_only = [n for n in nodes if "nvidia.com/gpu" not in n["status"]["capacity"]]
    assert len(cpu_only) >= 1  # the real node (hack/node.sh), or fake CPU nodes with MODELFLEET_REAL_NODE=0


def test_a_job_pinned_to_compute_major_9_lands_on_an_h100_and_completes(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "pinned"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"nvidia.com/gpu.compute.major": "9"},
                    "tolerations": [GPU_TOLERATION],
                    "containers": [
                        {
                            "name": "build",
                            "image": "busybox",
                            "command": ["true"],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                }
            },
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Complete", "--timeout=90s", "job/pinned")
    pods = get_json(cluster, "-n", namespace, "pods", "-l", "job-name=pinned")["items"]
    assert len(pods) == 1
    node = get_json(cluster, "node", pods[0]["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == ARCHITECTURES["sm90"]
    assert pods[0]["status"]["phase"] == "Succeeded"


def test_gpu_nodes_are_tainted_so_untolerating_pods_stay_off_them(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "no-toleration"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"nvidia.com/gpu.compute.major": "9"},
                    "containers": [{"name": "c", "image": "busybox"}],
                }
            }
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    cluster.kubectl(
        "-n",
        namespace,
        "wait",
        "--for=condition=PodScheduled=False",
        "--timeout=60s",
        "pod",
        "-l",
        "job-name=no-toleration",
    )
    pod = get_json(cluster, "-n", namespace, "pods", "-l", "job-name=no-toleration")["items"][0]
    assert "nodeName" not in pod["spec"]


def test_a_deployment_of_three_replicas_becomes_available(cluster: Cluster, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                # On the KWOK fleet (tainted GPU nodes), where no container runs: nginx is not on this machine.
                "spec": {
                    "containers": [{"name": "web", "image": "nginx"}],
                    "nodeSelector": {"type": "kwok"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(deployment))
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Available", "--timeout=90s", "deployment/web")
    status = get_json(cluster, "-n", namespace, "deployment", "web")["status"]
    assert status["availableReplicas"] == 3
    assert status["readyReplicas"] == 3


def test_a_crd_applied_with_kubectl_is_served_and_holds_objects(cluster: Cluster, namespace: str) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.e2e.modelfleet.io"},
        "spec": {
            "group": "e2e.modelfleet.io",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.e2e.modelfleet.io")
    widget = {
        "apiVersion": "e2e.modelfleet.io/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }
    cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(widget))
    got = yaml.safe_load(cluster.kubectl("-n", namespace, "get", "widget", "w1", "-o", "yaml").stdout)
    assert got["spec"] == {"size": 3}
    bad = {**widget, "metadata": {"name": "w2"}, "spec": {"size": 0}}
    rejected = cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(bad), check=False)
    assert rejected.returncode != 0
    assert "spec.size" in rejected.stderr


def test_pod_security_admission_rejects_a_privileged_pod_in_a_restricted_namespace(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    rejected = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod), check=False)
    assert rejected.returncode != 0
    assert "violates PodSecurity" in rejected.stderr
    assert "privileged" in rejected.stderr
    ok_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "restricted-ok"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "runAsUser": 1000,
                    },
                }
            ],
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(ok_pod))
