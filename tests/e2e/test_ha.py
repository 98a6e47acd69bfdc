"""Two operator replicas on one Lease against the real API server: one acts, and a standby takes over when it dies."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import OPERATOR_NAMESPACE, Cluster, OperatorProcess, wait_for
from tests.e2e.test_operator import apply_model, deployments, get, jobs, model_status, wait_ready

LEASE = "modelfleet-operator"  # the chart's Lease for release `modelfleet` (and the operator's default)
TIMEOUT = 180  # hang guards, not performance bounds


def lease(cluster: Cluster) -> dict[str, Any]:
    spec: dict[str, Any] = get(cluster, OPERATOR_NAMESPACE, "lease", LEASE)["spec"]
    return spec


@pytest.fixture
def standby(cluster: Cluster, operator: OperatorProcess, tmp_path: Path) -> Iterator[OperatorProcess]:
    """A second replica (same ServiceAccount, same Lease) beside the session's operator, which leads; afterwards
    the session operator runs and leads again for the tests that follow."""
    assert operator.leading(), operator.health()
    second = OperatorProcess(cluster, operator.kubeconfig, tmp_path / "standby.log", name="e2e-standby")
    second.start()
    yield second
    second.stop()
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    wait_for("the session operator to lead again", operator.leading, timeout=TIMEOUT)


def build_started_per_job(cluster: Cluster, namespace: str) -> Counter[str]:
    items = get(cluster, namespace, "events", "--field-selector", "reason=BuildStarted")["items"]
    return Counter(re.search(r"build Job (\S+) ", e["message"]).group(1) for e in items)  # type: ignore[union-attr]


def change_replicas(cluster: Cluster, namespace: str, replicas: int) -> int:
    """A spec change (new generation) only a reconcile can make visible: status and Deployments follow it."""
    apply_model(cluster, namespace, replicas=replicas)
    return int(get(cluster, namespace, "inferencemodel", "clf")["metadata"]["generation"])


def reconciled(cluster: Cluster, namespace: str, generation: int, replicas: int) -> bool:
    return model_status(cluster, namespace).get("observedGeneration") == generation and (
        sum(d["spec"]["replicas"] for d in deployments(cluster, namespace).values()) == replicas
    )


def failover(cluster: Cluster, namespace: str, heir: OperatorProcess, replicas: int, t0: float) -> tuple[float, float]:
    """After the leader went away at t0: seconds until `heir` held the Lease and until its first reconcile
    (of a spec change made right away) was visible."""
    generation = change_replicas(cluster, namespace, replicas)
    acquired = wait_for("the standby to take the Lease", lambda: heir.leading() and time.monotonic(), every=0.1)
    seen = wait_for(
        "the new leader's reconcile",
        lambda: reconciled(cluster, namespace, generation, replicas) and time.monotonic(),
        timeout=TIMEOUT,
        every=0.2,
    )
    assert lease(cluster)["holderIdentity"] == heir.health()["identity"]
    return acquired - t0, seen - t0


def test_two_replicas_one_acts_and_a_killed_leader_is_replaced(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess, standby: OperatorProcess
) -> None:
    ns = model_namespace
    assert operator.leading() and not standby.leading()
    apply_model(cluster, ns, replicas=2)
    wait_ready(cluster, ns)
    wait_for("all 4 engines", lambda: model_status(cluster, ns).get("engineSummary") == "4/4")
    built = sorted(j["metadata"]["name"] for j in jobs(cluster, ns))
    assert len(built) == 4
    # Two operators each acting would create every Job once (server-side apply) but announce it twice.
    assert build_started_per_job(cluster, ns) == Counter(dict.fromkeys(built, 1))

    transitions = int(lease(cluster).get("leaseTransitions") or 0)
    t0 = time.monotonic()
    operator.kill()  # SIGKILL: no release; the standby waits the Lease out
    acquired, seen = failover(cluster, ns, standby, replicas=3, t0=t0)
    print(f"\nkill -9 of the leader: new leader after {acquired:.1f} s, its first reconcile visible after {seen:.1f} s")
    assert int(lease(cluster)["leaseTransitions"]) == transitions + 1
    operator.start()  # back as a standby: it must not act while the other leads
    wait_for("the restarted operator to stand by", lambda: operator.health().get("leader") is False)
    assert standby.leading()
    assert build_started_per_job(cluster, ns) == Counter(dict.fromkeys(built, 1))


def test_a_leader_stopped_gracefully_releases_and_a_standby_takes_over_at_once(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess, standby: OperatorProcess
) -> None:
    ns = model_namespace
    apply_model(cluster, ns, replicas=1)
    wait_ready(cluster, ns)
    # The session operator hands over to the standby, comes back, and the standby hands back.
    for replicas, (leader, heir) in enumerate(((operator, standby), (standby, operator)), start=2):
        assert leader.leading() and not heir.leading()
        releases = leader.log().count("released lease")
        t0 = time.monotonic()
        leader.stop()  # SIGTERM: kopf stops, then the Lease is released
        assert leader.proc is not None and leader.proc.returncode == 0, leader.log()[-3000:]
        exited = time.monotonic() - t0
        assert lease(cluster)["holderIdentity"] in ("", heir.health()["identity"])
        acquired, seen = failover(cluster, ns, heir, replicas=replicas, t0=t0)
        print(
            f"\nSIGTERM of the leader: it exited after {exited:.1f} s, new leader after {acquired:.1f} s, "
            f"its first reconcile visible after {seen:.1f} s"
        )
        assert leader.log().count("released lease") == releases + 1
        if leader is operator:
            operator.start()
            wait_for("the restarted operator to stand by", lambda: operator.health().get("leader") is False)
    assert lease(cluster)["holderIdentity"] == operator.health()["identity"]


def test_a_leader_whose_lease_is_taken_stops_at_once_and_a_standby_waits_it_out(
    cluster: Cluster, operator: OperatorProcess, standby: OperatorProcess
) -> None:
    # Another holder appears (as after a partition, when a standby took over): the leader must exit non-zero
    # on its next renew and never act again; the kubelet would restart it as a standby.
    spec = {**lease(cluster), "holderIdentity": "someone-else", "leaseDurationSeconds": 15}
    t0 = time.monotonic()
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "patch", "lease", LEASE, "--type=merge", "-p", json.dumps({"spec": spec}))
    assert operator.proc is not None
    wait_for("the robbed leader to exit", lambda: operator.proc is not None and operator.proc.poll() is not None)
    exited = time.monotonic() - t0
    assert operator.proc.returncode == 1
    assert "lost lease modelfleet-system/modelfleet-operator: the lease is held by someone-else" in operator.log()
    # The standby respects the new holder's Lease until it expires by the standby's own clock.
    wait_for("the standby to take the unrenewed Lease", standby.leading, every=0.2)
    acquired = time.monotonic() - t0
    print(f"\nLease taken from the leader: it exited after {exited:.1f} s; the standby led after {acquired:.1f} s")
    assert acquired >= 15  # never before the observed leaseDuration has passed
