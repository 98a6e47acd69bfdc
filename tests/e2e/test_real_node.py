"""The local cluster's real CPU node (hack/node.sh): containers run, volumes are provisioned, Services route,
and pods reach the apiserver but nothing outside the pod network.

Traffic in these tests goes only to loopback and to the node's own network namespace (pod IPs, ClusterIPs and
the link address the apiserver is advertised on)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import Cluster

REAL = "modelfleet.io/real-node=true"


def get_json(cluster: Cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> dict:
    nodes = get_json(cluster, "nodes", "-l", REAL)["items"]
    if not nodes:
        pytest.skip("the cluster has no real node (MODELFLEET_REAL_NODE=0)")
    assert len(nodes) == 1
    return nodes[0]


@pytest.fixture(scope="module")
def shell_image(cluster: Cluster, node: dict) -> str:
    """The local-path helper's busybox image: present on the node, and it has a shell."""
    helper = cluster.kubectl(
        "-n", "local-path-storage", "get", "configmap", "local-path-config", "-o", "jsonpath={.data.helperPod\\.yaml}"
    ).stdout
    return next(line.split("image:")[1].strip() for line in helper.splitlines() if "image:" in line)


def run_pod(cluster: Cluster, namespace: str, name: str, image: str, script: str, **spec: object) -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"modelfleet.io/real-node": "true"},
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
            "containers": [
                {
                    "name": "c",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/busybox", "sh", "-c", script],
                    **spec.pop("container", {}),  # type: ignore[dict-item]
                }
            ],
            **spec,
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", "--timeout=90s", f"pod/{name}")
    return get_json(cluster, "-n", namespace, "pod", name)


def pod_netns(pod: dict) -> str:
    """The network namespace of the pod's container, found through its cgroup (the id is in the path)."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and cid in (proc / "cgroup").read_text():
                return f"/proc/{proc.name}/ns/net"
        except OSError:
            continue
    raise AssertionError(f"no process of container {cid}")


def curl_from(netns: str | None, url: str, timeout: int = 5) -> subprocess.CompletedProcess[str]:
    cmd = ["curl", "-sk", "--max-time", str(timeout), url]
    if netns:
        cmd = ["nsenter", f"--net={netns}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10, check=False)


def accept_once(srv: socket.socket) -> None:
    conn, _ = srv.accept()
    conn.close()


def test_the_real_node_is_the_cpu_architecture_and_kubelet_runs_it(cluster: Cluster, node: dict) -> None:
    labels = node["metadata"]["labels"]
    assert not [k for k in labels if k.startswith("nvidia.com/")]
    assert labels["kubernetes.io/arch"] and labels["kubernetes.io/os"] == "linux"
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"].startswith("v1.") and info["containerRuntimeVersion"].startswith("containerd://")
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    fake_cpu = [
        n["metadata"]["name"]
        for n in get_json(cluster, "nodes", "-l", "type=kwok")["items"]
        if "nvidia.com/gpu" not in n["status"]["capacity"]
    ]
    assert fake_cpu == []


def test_a_claim_binds_on_first_consumer_and_uid_65532_writes_to_it(
    cluster: Cluster, namespace: str, shell_image: str
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(claim))
    assert get_json(cluster, "-n", namespace, "pvc", "data")["status"]["phase"] == "Pending"  # WaitForFirstConsumer
    run_pod(
        cluster,
        namespace,
        "writer",
        shell_image,
        "echo written-by-$(/bin/busybox id -u) > /data/f && exec /bin/busybox sleep 3600",
        container={"volumeMounts": [{"name": "d", "mountPath": "/data"}]},
        volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
    )
    pvc = get_json(cluster, "-n", namespace, "pvc", "data")
    assert pvc["status"]["phase"] == "Bound" and pvc["spec"]["storageClassName"] == "local-path"
    out = cluster.kubectl("-n", namespace, "exec", "writer", "--", "/bin/busybox", "cat", "/data/f").stdout
    assert out.strip() == "written-by-65532"


def test_a_cluster_ip_service_answers_from_the_host_and_from_a_pod(
    cluster: Cluster, namespace: str, shell_image: str
) -> None:
    web = run_pod(
        cluster,
        namespace,
        "web",
        shell_image,
        "echo web-ok > /www/index.html && exec /bin/busybox httpd -f -p 8080 -h /www",
        container={
            "volumeMounts": [{"name": "www", "mountPath": "/www"}],
            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
        },
        volumes=[{"name": "www", "emptyDir": {}}],
    )
    client = run_pod(cluster, namespace, "client", shell_image, "exec /bin/busybox sleep 3600")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(service))
    ip = get_json(cluster, "-n", namespace, "service", "web")["spec"]["clusterIP"]
    cluster.kubectl("-n", namespace, "wait", "--for=jsonpath={.subsets[0].addresses[0].ip}", "endpoints/web")
    for netns in (None, pod_netns(client), pod_netns(web)):  # the host, another pod, the pod itself (hairpin)
        got = None
        for _ in range(20):  # kube-proxy syncs the new Service within a second or two
            got = curl_from(netns, f"http://{ip}/")
            if got.stdout.strip() == "web-ok":
                break
        assert got is not None and got.stdout.strip() == "web-ok", (netns, got)
    assert curl_from(None, f"http://{web['status']['podIP']}:8080/").stdout.strip() == "web-ok"


def test_pods_reach_the_apiserver_and_nothing_else_on_the_host(
    cluster: Cluster, namespace: str, shell_image: str
) -> None:
    pod = run_pod(cluster, namespace, "probe", shell_image, "exec /bin/busybox sleep 3600")
    netns = pod_netns(pod)
    kubernetes = get_json(cluster, "-n", "default", "service", "kubernetes")["spec"]["clusterIP"]
    assert curl_from(netns, f"https://{kubernetes}/readyz").stdout == "ok"
    routes = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-4", "route"], capture_output=True, text=True, check=True
    ).stdout
    assert "default" not in routes
    # A listener on every host address: the host reaches it on the link address, the pod does not.
    advertised = get_json(cluster, "-n", "default", "endpoints", "kubernetes")["subsets"][0]["addresses"][0]["ip"]
    with socket.socket() as srv:
        srv.bind(("0.0.0.0", 0))
        srv.listen()
        port = srv.getsockname()[1]
        threading.Thread(target=accept_once, args=(srv,), daemon=True).start()
        assert curl_from(None, f"http://{advertised}:{port}/", timeout=3).returncode != 28  # answered (and closed)
        blocked = curl_from(netns, f"http://{advertised}:{port}/", timeout=3)
        assert blocked.returncode == 28, blocked  # dropped: timed out
