"""The cluster scripts fail clearly, repair themselves, and clean up after themselves."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import CLUSTER_SH, ROOT, Cluster

BUILD_SH = ROOT / "hack" / "build-binaries.sh"


def run(
    script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def listening_ports(pids: set[int]) -> set[int]:
    """Ports in LISTEN state owned by any of the pids (read from /proc, no extra tools)."""
    inodes: set[str] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.glob("*") if fd_dir.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in {"Z", "X"}
    except OSError:
        return False


def test_a_missing_go_toolchain_is_one_clear_line(tmp_path: Path) -> None:
    proc = run(BUILD_SH, env={"MODELFLEET_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "Go toolchain is missing" in errors[0]
    assert "install Go" in errors[0]


def test_an_unreachable_module_proxy_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proc = run(BUILD_SH, env={"MODELFLEET_CACHE": str(tmp_path), "GOPROXY": f"http://127.0.0.1:{dead}"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "module proxy" in errors[0] and "unreachable" in errors[0] and f"127.0.0.1:{dead}" in errors[0]


def test_a_port_in_use_is_detected_and_named(cluster: Cluster) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        proc = run(
            CLUSTER_SH,
            "up",
            env={"MODELFLEET_CLUSTER_NAME": "mf-port-test", "MODELFLEET_APISERVER_PORT": str(busy)},
        )
    assert proc.returncode != 0
    assert f"port {busy}" in proc.stderr and "already in use" in proc.stderr
    assert f"{os.getpid()}/" in proc.stderr  # names the process that holds it
    assert not (
        Path(
            run(CLUSTER_SH, "kubeconfig", env={"MODELFLEET_CLUSTER_NAME": "mf-port-test"}).stdout.strip()
        ).parent.exists()
    )


@pytest.mark.timeout(600)
def test_status_reports_a_dead_component_and_up_repairs_it_and_down_leaves_nothing(cluster: Cluster) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env = {"MODELFLEET_CLUSTER_NAME": "mf-lifecycle-test", "MODELFLEET_APISERVER_PORT": str(free)}
    try:
        assert run(CLUSTER_SH, "up", env=env).returncode == 0
        assert run(CLUSTER_SH, "up", env=env).returncode == 0  # twice is harmless
        assert "already running" in run(CLUSTER_SH, "up", env=env).stderr
        status = run(CLUSTER_SH, "status", env=env)
        assert status.returncode == 0, status.stdout
        kubeconfig = Path(run(CLUSTER_SH, "kubeconfig", env=env).stdout.strip())
        state = kubeconfig.parent
        pid_file = state / "pids" / "kube-scheduler.pid"
        os.kill(int(pid_file.read_text()), 9)

        status = run(CLUSTER_SH, "status", env=env)
        assert status.returncode != 0
        assert any("kube-scheduler" in line and "DEAD" in line for line in status.stdout.splitlines())

        assert run(CLUSTER_SH, "up", env=env).returncode == 0
        assert run(CLUSTER_SH, "status", env=env).returncode == 0

        # kube-controller-manager and kube-scheduler outlive an apiserver restart (longer than a lease's renew
        # deadline), and 'up' restarts only what is dead: the cluster's objects stay.
        kubectl = [
            str(Path(run(CLUSTER_SH, "bin-dir", env=env).stdout.strip()) / "kubectl"),
            "--kubeconfig",
            str(kubeconfig),
        ]
        subprocess.run([*kubectl, "create", "namespace", "survivor"], check=True, capture_output=True)
        survivors = {
            c: int((state / "pids" / f"{c}.pid").read_text()) for c in ("kube-controller-manager", "kube-scheduler")
        }
        os.kill(int((state / "pids" / "kube-apiserver.pid").read_text()), 9)
        if (state / "pids" / "kubelet.pid").exists():
            os.kill(int((state / "pids" / "kubelet.pid").read_text()), 9)
        time.sleep(15)
        assert all(_alive(p) for p in survivors.values())
        assert run(CLUSTER_SH, "up", env=env).returncode == 0
        assert run(CLUSTER_SH, "status", env=env).returncode == 0
        assert {c: int((state / "pids" / f"{c}.pid").read_text()) for c in survivors} == survivors
        subprocess.run([*kubectl, "get", "namespace", "survivor"], check=True, capture_output=True)
        pids = {int(p.read_text()) for p in (state / "pids").glob("*.pid")}
        ports = listening_ports(pids)
        assert free in ports
    finally:
        down = run(CLUSTER_SH, "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    assert not [p for p in pids if _alive(p)]
    assert not listening_ports({int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}) & ports
    # The real node's pieces (hack/node.sh) are gone too: its namespace, state, mounts and pod cgroups.
    name = env["MODELFLEET_CLUSTER_NAME"]
    assert not Path(f"/run/netns/modelfleet-{name}").exists()
    assert not Path(f"/var/lib/modelfleet/{name}").exists()
    assert f"/var/lib/modelfleet/{name}/" not in Path("/proc/self/mountinfo").read_text()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/modelfleet-{name}"))
