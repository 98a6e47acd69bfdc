"""The chart's CRD with real helm: upgrade applies the new one, uninstall leaves models serving, reinstall adopts."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet_operator import crdgen
from tests.e2e.conftest import (
    ADOPT,
    ROOT,
    Cluster,
    OperatorProcess,
    apply_crd,
    service_account_kubeconfig,
    wait_for,
)

CHART = ROOT / "helm" / "modelfleet"
CRD_NAME = "inferencemodels.modelfleet.io"
RELEASE = "mf-lifecycle"  # not the session's `modelfleet` release, whose operator the other tests use
SERVICE_ACCOUNT = f"{RELEASE}-modelfleet"
# The field and the printer column the "older" chart's CRD lacks.
NEW_FIELD, NEW_COLUMN = "image", "Precision"
KWOK_PINNED = (
    "--set-json",
    'nodeSelector={"type":"kwok"}',
    "--set-json",
    'tolerations=[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]',
)
TIMEOUT = 180  # a hang guard, not a performance bound


def get(cluster: Cluster, *what: str) -> Any:
    return json.loads(cluster.kubectl("get", *what, "-o", "json").stdout)


# --- what the chart renders, with no cluster (helm template / install --dry-run=client) --------------------


def rendered(cluster: Cluster, *flags: str) -> list[dict[str, Any]]:
    out = cluster.helm("template", RELEASE, str(CHART), "--namespace", "mf-system", *flags).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def notes(cluster: Cluster, *flags: str) -> str:
    """NOTES.txt as `helm install` prints it (only install output shows it)."""
    out = cluster.helm("install", RELEASE, str(CHART), "-n", "mf-system", "--dry-run=client", *flags).stdout
    return out.split("\nNOTES:\n", 1)[1]


def test_the_chart_renders_the_generated_crd_kept_on_uninstall(cluster: Cluster) -> None:
    crds = [d for d in rendered(cluster) if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 1
    generated = crdgen.build_crd()
    assert crds[0]["spec"] == generated["spec"]
    assert crds[0]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert generated["metadata"]["labels"].items() <= crds[0]["metadata"]["labels"].items()
    assert crds[0]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"

    unkept = [d for d in rendered(cluster, "--set", "crds.keep=false") if d["kind"] == "CustomResourceDefinition"]
    assert "annotations" not in unkept[0]["metadata"]
    kinds = {d["kind"] for d in rendered(cluster, "--set", "crds.install=false")}
    assert "CustomResourceDefinition" not in kinds
    assert "Deployment" in kinds


def pvc_claims_of_examples() -> set[str]:
    claims = set()
    for path in (ROOT / "examples").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())["spec"]
        uris = [spec["model"]["uri"], (spec.get("engine", {}).get("calibration") or {}).get("uri", "")]
        claims |= {u.removeprefix("pvc://").split("/", 1)[0] for u in uris if u.startswith("pvc://")}
    return claims


def test_notes_name_every_claim_the_examples_need_and_the_way_out(cluster: Cluster) -> None:
    text = notes(cluster, "--set", "engineStore.claimName=engine-store")
    print(text)
    assert pvc_claims_of_examples() == {"models"}
    assert "  engine-store\n" in text  # the configured engine store claim, on its own line
    assert "ReadWriteMany" in text
    assert "pvc://<claim>/<path>" in text
    assert "`models`" in text
    assert "read-only" in text
    assert "--take-ownership" in text  # the one-time upgrade from a chart that had crds/
    for step in (
        "kubectl delete inferencemodels --all -A",
        f"helm uninstall {RELEASE} -n mf-system",
        f"kubectl delete crd {CRD_NAME}",
    ):
        assert step in text

    assert "deletes the CRD" in notes(cluster, "--set", "crds.keep=false")
    assert "not part of this release" in notes(cluster, "--set", "crds.install=false")


# --- install an older CRD, upgrade, uninstall, reinstall: on the cluster --------------------------------------


def older_chart(tmp: Path) -> Path:
    """A copy of the chart whose CRD lacks one spec field and one printer column: the 'previous version'."""
    chart = tmp / "modelfleet"
    shutil.copytree(CHART, chart)
    path = chart / "files" / "inferencemodel.crd.yaml"
    crd = yaml.safe_load(path.read_text())
    version = crd["spec"]["versions"][0]
    version["additionalPrinterColumns"] = [c for c in version["additionalPrinterColumns"] if c["name"] != NEW_COLUMN]
    serving = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["serving"]
    del serving["properties"][NEW_FIELD]
    path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart


def served_crd(cluster: Cluster) -> tuple[set[str], set[str]]:
    """The printer columns and spec.serving fields of the CRD on the server."""
    version = get(cluster, "crd", CRD_NAME)["spec"]["versions"][0]
    serving = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["serving"]
    return {c["name"] for c in version["additionalPrinterColumns"]}, set(serving["properties"])


def is_current(cluster: Cluster) -> bool:
    """The CRD on the server is the generated one (the server adds only defaults such as `conversion`)."""
    served, generated = get(cluster, "crd", CRD_NAME)["spec"]["versions"], crdgen.build_crd()["spec"]["versions"]
    return [(v["schema"], v["additionalPrinterColumns"]) for v in served] == [
        (v["schema"], v["additionalPrinterColumns"]) for v in generated
    ]


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "pvc://models/clf/model.onnx"}, "engine": {"architectures": ["sm80"]}, **spec},
    }


def server_accepts(cluster: Cluster, namespace: str, body: dict[str, Any]) -> tuple[bool, str]:
    proc = cluster.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False)
    return proc.returncode == 0, proc.stderr


@dataclass
class Release:
    """The test's own release of the chart, and its operator run as a local process with the release's
    ServiceAccount (the chart's pod is pinned to a KWOK node, where no container runs)."""

    cluster: Cluster
    namespace: str
    watch: str
    work: Path
    operator: OperatorProcess | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def helm(self, verb: str, *flags: str) -> str:
        start = time.monotonic()
        if verb == "uninstall":
            args = ["uninstall", RELEASE, "-n", self.namespace, "--wait", "--timeout", "120s", *flags]
        else:
            args = [verb, RELEASE, *flags, "-n", self.namespace, *KWOK_PINNED]
            args += ["--set-json", f"watchNamespaces={json.dumps([self.watch])}", "--wait", "--timeout", "120s"]
        out = self.cluster.helm(*args, timeout=300).stdout
        self.timings[f"helm {verb} #{sum(k.startswith(f'helm {verb}') for k in self.timings) + 1}"] = (
            time.monotonic() - start
        )
        return out

    def start_operator(self) -> None:
        kubeconfig = service_account_kubeconfig(
            self.cluster, self.namespace, SERVICE_ACCOUNT, self.work / f"kubeconfig-{uuid.uuid4().hex[:6]}"
        )
        lease = (self.namespace, f"{SERVICE_ACCOUNT}-operator")  # the Lease this release's RBAC allows
        self.operator = OperatorProcess(self.cluster, kubeconfig, self.work / "operator.log", lease=lease)
        with pytest.MonkeyPatch.context() as env:  # only this process watches only the test's namespace
            env.setenv("MODELFLEET_OPERATOR_NAMESPACES", json.dumps([self.watch]))
            self.operator.start()

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None


def ownership(cluster: Cluster) -> dict[str, dict[str, str]]:
    meta = get(cluster, "crd", CRD_NAME)["metadata"]
    return {"labels": meta.get("labels") or {}, "annotations": meta.get("annotations") or {}}


def restore_crd(cluster: Cluster, before: dict[str, dict[str, str]]) -> None:
    """The current CRD, owned by whoever owned it before the test (the session's release, usually)."""
    apply_crd(cluster)
    now = ownership(cluster)
    patch = {
        "metadata": {part: {**{k: None for k in now[part] if k not in before[part]}, **before[part]} for part in before}
    }
    cluster.kubectl("patch", "crd", CRD_NAME, "--type=merge", "-p", json.dumps(patch))


@pytest.fixture
def release(cluster: Cluster, model_namespace: str, operator: OperatorProcess, tmp_path: Path) -> Iterator[Release]:
    """The session's operator is stopped for the test (it would manage the models while 'uninstalled') and
    started again afterwards; the CRD ends as it began: current, with the same owner."""
    before = ownership(cluster)
    operator.stop()
    rel = Release(cluster, f"mfl-{uuid.uuid4().hex[:8]}", model_namespace, tmp_path)
    try:
        yield rel
    finally:
        rel.stop_operator()
        cluster.helm("uninstall", RELEASE, "-n", rel.namespace, "--wait", check=False)
        cluster.kubectl("delete", "namespace", rel.namespace, "--wait=false", check=False)
        restore_crd(cluster, before)
        operator.start()
        for what, seconds in rel.timings.items():
            print(f"{what}: {seconds:.1f}s")


def deployment(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return get(cluster, "-n", namespace, "deployment", "clf-sm80")


def observed(cluster: Cluster, namespace: str) -> tuple[int, int, str]:
    """(generation, status.observedGeneration, the Ready condition's status)."""
    im = get(cluster, "-n", namespace, "inferencemodel", "clf")
    status = im.get("status") or {}
    ready = next((c["status"] for c in status.get("conditions") or [] if c["type"] == "Ready"), "")
    return im["metadata"]["generation"], status.get("observedGeneration", 0), ready


def test_upgrade_applies_the_new_crd_uninstall_leaves_models_reinstall_adopts_them(
    cluster: Cluster, release: Release
) -> None:
    ns = release.watch
    with_new_field = model("uses-image", serving={"image": "registry.example/runtime:1"})

    # An older chart, taking the CRD over from the session (Helm's ownership, server-side apply's managers).
    release.helm("install", str(older_chart(release.work)), "--create-namespace", *ADOPT)
    columns, fields = served_crd(cluster)
    assert NEW_COLUMN not in columns
    assert NEW_FIELD not in fields
    accepted, error = server_accepts(cluster, ns, with_new_field)
    assert not accepted
    assert "spec.serving.image" in error

    release.start_operator()
    cluster.kubectl("-n", ns, "apply", "-f", "-", input=json.dumps(model("clf", replicas=2)))
    wait_for("the model Ready under the older chart", lambda: observed(cluster, ns) == (1, 1, "True"), TIMEOUT)

    # helm upgrade to this chart: the CRD on the server is the new one.
    release.helm("upgrade", str(CHART))
    columns, fields = served_crd(cluster)
    assert NEW_COLUMN in columns
    assert NEW_FIELD in fields
    assert server_accepts(cluster, ns, with_new_field) == (True, "")
    assert is_current(cluster)
    assert "PRECISION" in cluster.kubectl("-n", ns, "get", "inferencemodels", "-o", "wide").stdout

    # helm uninstall: the operator goes, the CRD and the model and its children stay, still serving.
    deployment_uid = deployment(cluster, ns)["metadata"]["uid"]
    jobs_before = {j["metadata"]["uid"] for j in get(cluster, "-n", ns, "jobs")["items"]}
    release.stop_operator()  # the operator pod ends with the release
    out = release.helm("uninstall")
    assert "kept due to the resource policy" in out
    assert CRD_NAME in out
    assert is_current(cluster)
    accounts = get(cluster, "-n", release.namespace, "serviceaccounts")["items"]
    assert SERVICE_ACCOUNT not in {a["metadata"]["name"] for a in accounts}
    left = deployment(cluster, ns)
    assert left["metadata"]["uid"] == deployment_uid
    assert (left["spec"]["replicas"], left["status"].get("readyReplicas")) == (2, 2)
    assert get(cluster, "-n", ns, "service", "clf")["metadata"]["name"] == "clf"
    assert {j["metadata"]["uid"] for j in get(cluster, "-n", ns, "jobs")["items"]} == jobs_before

    # Unmanaged: a spec change waits for an operator (nothing can act on it; the pause only shows it).
    cluster.kubectl("-n", ns, "scale", "inferencemodel/clf", "--replicas=3")
    time.sleep(5)
    assert observed(cluster, ns)[:2] == (2, 1)
    assert deployment(cluster, ns)["spec"]["replicas"] == 2

    # Reinstall, with no flag: the kept CRD names this release, so Helm adopts it; the operator adopts the model.
    release.helm("install", str(CHART))
    release.start_operator()
    started = time.monotonic()
    wait_for(
        "the reinstalled operator to observe generation 2", lambda: observed(cluster, ns) == (2, 2, "True"), TIMEOUT
    )
    print(f"reinstalled operator observed the spec change after {time.monotonic() - started:.1f}s")
    wait_for("3 serving replicas", lambda: deployment(cluster, ns)["spec"]["replicas"] == 3, TIMEOUT)
    assert deployment(cluster, ns)["metadata"]["uid"] == deployment_uid  # adopted, not recreated
    assert ownership(cluster)["annotations"]["meta.helm.sh/release-namespace"] == release.namespace
