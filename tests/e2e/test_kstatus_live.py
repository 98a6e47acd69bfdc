"""GitOps health of live objects: the real kstatus library and the chart's Argo CD check over what the API serves."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cluster, OperatorProcess, bound_pvc, wait_for
from tests.e2e.test_operator import apply_model, condition, wait_ready
from tests.operator.test_kstatus import ROOT, argocd_health, compute

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kstatus() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "kstatus" / "build.sh")], check=True, capture_output=True, text=True, timeout=900
    )
    return Path(out.stdout.strip().splitlines()[-1])


def live(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("-n", namespace, "get", "inferencemodel", name, "-o", "json").stdout)


def health(kstatus: Path, obj: dict[str, Any]) -> tuple[str, str, str]:
    """(kstatus, its message, Argo CD health) of one live object."""
    result = compute(kstatus, [obj])[0]
    return result["status"], result["message"], argocd_health([obj])[0][0]


def set_model_uri(cluster: Cluster, namespace: str, uri: str) -> None:
    patch = {"spec": {"model": {"uri": uri}}}
    cluster.kubectl("-n", namespace, "patch", "inferencemodel", "clf", "--type=merge", "-p", json.dumps(patch))


def until(
    kstatus: Path, cluster: Cluster, namespace: str, name: str, want: str, timeout: float = 180
) -> dict[str, Any]:
    """The live object once kstatus reads `want` (the watch GitOps tools run, as a poll)."""
    return wait_for(
        f"kstatus {want} for {name}",
        lambda: (obj := live(cluster, namespace, name)) and compute(kstatus, [obj])[0]["status"] == want and obj,
        timeout=timeout,
    )


def test_kstatus_and_argocd_follow_a_live_model_from_create_to_delete(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess, kstatus: Path
) -> None:
    ns, seen = model_namespace, []
    apply_model(cluster, ns)
    created = live(cluster, ns, "clf")
    if not (created.get("status") or {}).get("conditions"):  # read before the operator's first status write
        assert health(kstatus, created)[0] == "InProgress"
        seen.append(("created, not reconciled", "InProgress"))

    wait_ready(cluster, ns)
    ready = live(cluster, ns, "clf")
    assert health(kstatus, ready)[0::2] == ("Current", "Healthy")
    seen.append(("Ready", "Current"))

    # A spec change whose builds fail: in progress while they run, then Failed with the old version serving.
    set_model_uri(cluster, ns, "pvc://models/clf/broken-v2.onnx")
    changed = live(cluster, ns, "clf")
    assert health(kstatus, changed)[0] == "InProgress"  # generation 2 not observed yet, or its builds running
    seen.append(("spec changed", "InProgress"))
    failed = until(kstatus, cluster, ns, "clf", "Failed")
    status, message, argo = health(kstatus, failed)
    assert argo == "Degraded" and "InvalidModel" in message and "previous version still serves" in message
    assert condition(failed["status"], "Serving")["reason"] == "PreviousVersion"
    seen.append(("new version's build failed, old serving", status))

    # Fixing the spec: Current again, once generation 3 is live.
    set_model_uri(cluster, ns, "pvc://models/clf/model-v3.onnx")
    fixed = until(kstatus, cluster, ns, "clf", "Current")
    assert fixed["status"]["observedGeneration"] == fixed["metadata"]["generation"] == 3
    seen.append(("fixed", "Current"))

    apply_model(cluster, ns, name="never", model={"uri": "pvc://models/clf/broken.onnx"})
    never = until(kstatus, cluster, ns, "never", "Failed")
    assert health(kstatus, never)[2] == "Degraded"
    seen.append(("unfixable model, never served", "Failed"))

    cluster.kubectl("-n", ns, "delete", "inferencemodel", "clf", "never", "--wait=true")
    assert cluster.kubectl("-n", ns, "get", "inferencemodel", "-o", "name").stdout.strip() == ""
    seen.append(("deleted", "NotFound"))
    print("live kstatus walk: " + "; ".join(f"{s} -> {k}" for s, k in seen))


def test_a_model_whose_claim_is_missing_is_failed_for_kstatus(
    cluster: Cluster, namespace: str, operator: OperatorProcess, kstatus: Path
) -> None:
    bound_pvc(cluster, namespace, "models")
    apply_model(cluster, namespace)
    stalled = until(kstatus, cluster, namespace, "clf", "Failed", timeout=60)
    _, message, argo = health(kstatus, stalled)
    assert argo == "Degraded" and "modelfleet-engines" in message
