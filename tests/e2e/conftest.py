"""Session fixtures for end-to-end tests: a real kube-apiserver with KWOK nodes, reused or started on demand."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hack import sa_kubeconfig, volumes
from tests.commands import MODELFLEET

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "hack" / "cluster.sh"


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(
        self, tool: str, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / tool), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, input=input, check=check, timeout=timeout)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180, every: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy (returned); a hang guard, not a performance bound."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def stop_in_cluster_operator(cluster: Cluster) -> None:
    """An operator left running in the cluster (by `make demo` or the real-node suite) would act on every test's
    objects: a session starts without it, and runs its own (a process, or the chart's real pod)."""
    selector = "app.kubernetes.io/name=modelfleet"
    cluster.kubectl("-n", "modelfleet-system", "scale", "deployment", "-l", selector, "--replicas=0", check=False)
    cluster.kubectl(
        "-n", "modelfleet-system", "wait", "--for=delete", "pod", "-l", selector, "--timeout=120s", check=False
    )


def _cluster_sh(*args: str, timeout: float) -> str:
    proc = subprocess.run(
        ["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hack/cluster.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local cluster: reused when running, otherwise started (and stopped again at the end)."""
    was_running = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, check=False).returncode == 0
    # A cold machine builds the Kubernetes binaries first: allow for it.
    _cluster_sh("up", timeout=3600)
    c = Cluster(
        kubeconfig=Path(_cluster_sh("kubeconfig", timeout=30)),
        bin_dir=Path(_cluster_sh("bin-dir", timeout=30)),
    )
    stop_in_cluster_operator(c)
    yield c
    if not was_running and not os.environ.get("MODELFLEET_KEEP_CLUSTER"):
        _cluster_sh("down", timeout=300)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for finalization)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


CRD_FILE = ROOT / "crds" / "inferencemodel.yaml"


def apply_crd(cluster: Cluster) -> None:
    """`kubectl apply` of the generated CRD, as a user without Helm would; the chart's CRD template (the same
    file) later adopts it (`install_chart` passes --take-ownership and --force-conflicts)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))


@pytest.fixture(scope="session")
def inferencemodel_crd(cluster: Cluster) -> Path:
    """The generated InferenceModel CRD, applied and Established."""
    crd = CRD_FILE
    apply_crd(cluster)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/inferencemodels.modelfleet.io")
    # Established is not yet published in discovery/OpenAPI on a fresh apiserver: `kubectl explain` and
    # clients would not find the resource for a moment.
    deadline = time.monotonic() + 120  # hang guard
    while cluster.kubectl("explain", "inferencemodel.spec", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the InferenceModel CRD never appeared in the API server's OpenAPI")
        time.sleep(0.5)
    return crd


def bound_pvc(cluster: Cluster, namespace: str, claim: str, size: str = "10Gi") -> None:
    """A PersistentVolumeClaim bound to a pre-made PersistentVolume (no provisioner runs here)."""
    for obj in volumes.bound_pvc_objects(namespace, claim, size):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    cluster.kubectl("-n", namespace, "wait", "--for=jsonpath={.status.phase}=Bound", "--timeout=60s", f"pvc/{claim}")


@pytest.fixture
def model_namespace(cluster: Cluster, namespace: str) -> str:
    """A namespace ready for InferenceModels: the engine store and a models volume."""
    bound_pvc(cluster, namespace, "modelfleet-engines")
    bound_pvc(cluster, namespace, "models")
    return namespace


class OperatorProcess:
    """`modelfleet operator` as a local process, authenticated as the Helm chart's ServiceAccount."""

    def __init__(
        self,
        cluster: Cluster,
        kubeconfig: Path,
        log_path: Path,
        name: str = "e2e-operator",
        *,
        lease: tuple[str, str] = ("modelfleet-system", "modelfleet-operator"),  # the session release's
    ) -> None:
        self.cluster, self.kubeconfig, self.log_path, self.name = cluster, kubeconfig, log_path, name
        self.lease = lease
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0

    def start(self) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "MODELFLEET_OPERATOR_RUNTIME_IMAGE": "ghcr.io/modelfleet/modelfleet-runtime:e2e",
            "MODELFLEET_OPERATOR_RESYNC_SECONDS": "30",
            # The chart's PriorityClasses (release `modelfleet`), as its Deployment sets them.
            "MODELFLEET_OPERATOR_SERVING_PRIORITY_CLASS": "modelfleet-serving",
            "MODELFLEET_OPERATOR_BUILD_PRIORITY_CLASS": "modelfleet-build",
            # What the chart's downward API gives its pods: the Lease lives in the chart's namespace.
            "POD_NAME": self.name,
            "POD_NAMESPACE": self.lease[0],
            "MODELFLEET_OPERATOR_LEADER_ELECTION_LEASE_NAME": self.lease[1],
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*MODELFLEET, "operator", f"--liveness-port={self.port}", f"--metrics-port={self.metrics_port}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the operator exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the operator did not become healthy:\n{self.log_path.read_text()[-4000:]}")

    def health(self) -> dict[str, Any]:
        """/healthz: this candidate's identity and whether it holds the Lease ({} when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except OSError:
            return {}

    def leading(self) -> bool:
        return bool(self.health().get("leader"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> str:
        """The operator's /metrics, as Prometheus reads it."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a fresh token of `account`: the operator gets exactly its RBAC."""
    token = cluster.kubectl("-n", namespace, "create", "token", account, "--duration=4h").stdout.strip()
    return sa_kubeconfig.service_account_kubeconfig(cluster.kubeconfig, token, path, user=account)


OPERATOR_NAMESPACE = "modelfleet-system"
RELEASE = "modelfleet"


# The chart renders the CRD (templates/crd.yaml): the one `inferencemodel_crd` applied with kubectl, or an older
# chart's from crds/, is taken over (Helm's ownership annotations, and server-side apply's field managers).
ADOPT = ("--take-ownership", "--force-conflicts")


def install_chart(cluster: Cluster, *values: str, timeout: str = "120s") -> str:
    """`helm upgrade --install` of the chart with the real helm binary; `values` are helm's own flags."""
    chart = str(ROOT / "helm" / "modelfleet")
    flags = ["--namespace", OPERATOR_NAMESPACE, "--create-namespace", *ADOPT, *values, "--wait", "--timeout", timeout]
    cluster.helm("upgrade", "--install", RELEASE, chart, *flags, timeout=600)
    return RELEASE


@pytest.fixture(scope="session")
def helm_release(cluster: Cluster, inferencemodel_crd: Path) -> str:
    """The chart, its operator pod pinned to a KWOK node where no container runs: these tests run the operator
    as a process (`operator`); test_real_pipeline.py runs it in-cluster."""
    return install_chart(
        cluster,
        "--set-json",
        'nodeSelector={"type":"kwok"}',
        "--set-json",
        'tolerations=[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]',
    )


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, helm_release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    work = tmp_path_factory.mktemp("operator")
    kubeconfig = service_account_kubeconfig(cluster, OPERATOR_NAMESPACE, helm_release, work / "kubeconfig")
    proc = OperatorProcess(cluster, kubeconfig, work / "operator.log")
    proc.start()
    # A Lease left by an earlier session's operator that died expires first (leaseDuration, 15 s).
    wait_for("the session operator to hold the Lease", proc.leading, timeout=120)
    yield proc
    proc.stop()


REAL_NODE_LABEL = "modelfleet.io/real-node"
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class RealImages:
    """The project's images, built by `hack/images.sh` and loaded into the real node's containerd."""

    node: str
    operator: str
    runtime: str
    hashes: dict[str, str]

    def copy_into_claim(self, cluster: Cluster, namespace: str, claim: str, files: dict[str, bytes]) -> None:
        """Put files into a PVC as a user would: a pod of the runtime image mounts it and `kubectl exec` writes."""
        pod = f"copy-{claim}"[:63]
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": namespace},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "fsGroup": 65532},
                "containers": [
                    {
                        "name": "copy",
                        "image": self.runtime,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", "import time; time.sleep(600)"],
                        "securityContext": RESTRICTED_CONTAINER,
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", "--timeout=180s", f"pod/{pod}", timeout=200)
        for name, data in files.items():
            write = f"import base64, sys; open('/data/{name}', 'wb').write(base64.b64decode(sys.stdin.read()))"
            cluster.kubectl("-n", namespace, "exec", "-i", pod, "--", "python", "-c", write, input=b64(data))
        cluster.kubectl("-n", namespace, "delete", "pod", pod, "--wait=true", "--grace-period=0", "--force")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def real_images(cluster: Cluster) -> RealImages:
    """`make images` (cached by its inputs) loaded into the real node, which must be Ready."""
    nodes = json.loads(cluster.kubectl("get", "nodes", "-l", f"{REAL_NODE_LABEL}=true", "-o", "json").stdout)["items"]
    ready = [
        n["metadata"]["name"]
        for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
    ]
    assert ready, "the local cluster has no Ready real node: see 'make cluster-status'"
    for args in (("images.sh", "build"), ("cluster.sh", "load-images")):
        proc = subprocess.run(
            ["bash", str(ROOT / "hack" / args[0]), args[1]], capture_output=True, text=True, timeout=3600, check=False
        )
        assert proc.returncode == 0, f"hack/{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    refs, hashes = (
        dict(
            line.split("=", 1)
            for line in subprocess.run(
                ["bash", str(ROOT / "hack" / "images.sh"), what], capture_output=True, text=True, check=True
            ).stdout.split()
        )
        for what in ("refs", "hashes")
    )
    return RealImages(node=ready[0], operator=refs["operator"], runtime=refs["runtime"], hashes=hashes)
