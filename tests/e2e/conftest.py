"""Session fixtures for end-to-end tests: a real kube-apiserver with KWOK nodes, reused or started on demand."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "hack" / "cluster.sh"


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    bin_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.bin_dir / tool), *args], input=input, capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, input: str | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, input=input, check=check, timeout=timeout)


def _cluster_sh(*args: str, timeout: float) -> str:
    proc = subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
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
    c = Cluster(kubeconfig=Path(_cluster_sh("kubeconfig", timeout=30)), bin_dir=Path(_cluster_sh("bin-dir", timeout=30)))
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


@pytest.fixture(scope="session")
def inferencemodel_crd(cluster: Cluster) -> Path:
    """The generated InferenceModel CRD, applied and Established."""
    crd = ROOT / "crds" / "inferencemodel.yaml"
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/inferencemodels.modelfleet.io")
    return crd
