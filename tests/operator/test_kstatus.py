"""What GitOps tools read from the operator's own status: the real kstatus library and the chart's Argo CD check.

Every object below is what the operator's pure planning (`reconcile.plan`) writes for an observed state, put
on the InferenceModel the way the API server returns it. kstatus is `sigs.k8s.io/cli-utils/pkg/kstatus/status`
(Flux, kpt and Helm 4 use it), built from the Go module proxy by hack/kstatus/build.sh (cached by its sources).
The Argo CD health check (helm/modelfleet/argocd-health.lua) runs in Debian's lua5.4.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from modelfleet_operator import crdgen
from modelfleet_operator.api import InferenceModel
from modelfleet_operator.capacity import OwnPod
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.providers import PodProvider
from modelfleet_operator.reconcile import Observed, plan
from tests.operator.test_reconcile import (
    FLEET,
    NOW,
    SETTINGS,
    finished_job,
    kinds,
    model,
    ready_deployment,
    serve,
    with_status,
)

ROOT = Path(__file__).resolve().parents[2]
LUA_CHECK = ROOT / "helm" / "modelfleet" / "argocd-health.lua"


def body(im: InferenceModel, status: Mapping[str, Any] | None, **metadata: Any) -> dict[str, Any]:
    """The InferenceModel as the API server returns it, with `status` as the operator last wrote it."""
    obj = im.model_dump(mode="json", by_alias=True, exclude_none=True)
    obj.pop("status", None)
    obj["metadata"].update(metadata)
    if status is not None:
        obj["status"] = copy.deepcopy(dict(status))
    return obj


def as_served(obj: dict[str, Any]) -> dict[str, Any]:
    """Schema defaults applied, as the API server does whenever it reads an object from storage."""
    return crdgen.apply_defaults(crdgen.build_schema(), copy.deepcopy(obj))


def failed_results(jobs: list[dict[str, Any]], reason: str, message: str) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: {"phase": "Failed", "reason": reason, "message": message} for j in jobs}


def lifecycle() -> Iterator[tuple[str, dict[str, Any]]]:
    """create -> building -> Ready -> spec change -> failed update -> unfixable model -> no node -> delete."""
    fresh = model()
    yield "created, not reconciled (status default)", as_served(body(fresh, None))
    building = plan(fresh, Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    yield "building the first version", body(fresh, building.status)

    served, jobs, deployments = serve(model())
    yield "Ready", body(served, served.model_dump(mode="json", by_alias=True)["status"])
    old_status = served.model_dump(mode="json", by_alias=True)["status"]

    changed = with_status(model(model={"uri": "pvc://models/clf/v2.onnx"}), old_status, generation=2)
    yield "spec changed, not observed yet", body(changed, old_status)
    rebuilding = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    yield "spec changed, new build running, old serving", body(changed, rebuilding.status)

    new_jobs = [finished_job(j, ok=False) for j in kinds(rebuilding, "Job")]
    failed = plan(
        with_status(changed, rebuilding.status),
        Observed(
            nodes=FLEET,
            jobs=jobs + new_jobs,
            deployments=deployments,
            build_results=failed_results(new_jobs, "InvalidModel", "not an ONNX model"),
        ),
        settings=SETTINGS,
        now=NOW,
    )
    yield "new version's build failed, old serving", body(changed, failed.status)

    broken = model(model={"uri": "pvc://models/clf/corrupt.onnx"})
    first = plan(broken, Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    broken_jobs = [finished_job(j, ok=False) for j in kinds(first, "Job")]
    never = plan(
        with_status(broken, first.status),
        Observed(nodes=FLEET, jobs=broken_jobs, build_results=failed_results(broken_jobs, "FetchFailed", "no file")),
        settings=SETTINGS,
        now=NOW,
    )
    yield "unfixable model, never served", body(broken, never.status)

    nowhere = plan(fresh, Observed(nodes=[NodeInfo(name="cpu-0", labels={})]), settings=SETTINGS, now=NOW)
    yield "no eligible node", body(fresh, nowhere.status)

    waiting = [OwnPod("clf-sm90-build", "build", "sm90", "", "0/5 nodes are available: 1 Insufficient nvidia.com/gpu.")]
    no_gpu = plan(fresh, Observed(nodes=FLEET, jobs=kinds(building, "Job"), pods=waiting), settings=SETTINGS, now=NOW)
    yield "a build waits for a free GPU", body(fresh, no_gpu.status)
    huge, huge_jobs, _ = serve(model(replicas=1000))
    too_many = plan(huge, Observed(nodes=FLEET, jobs=huge_jobs), settings=SETTINGS, now=NOW)
    yield "more replicas than the fleet can hold", body(huge, too_many.status)
    no_claim = plan(fresh, Observed(nodes=FLEET, claims={"models": "Bound"}), settings=SETTINGS, now=NOW)
    yield "engine store claim missing", body(fresh, no_claim.status)

    on_cpu = [PodProvider("clf-sm90-7d9f-x", "sm90", "CPUExecutionProvider", "TensorrtExecutionProvider")]
    degraded = plan(served, Observed(nodes=FLEET, jobs=jobs, deployments=deployments, providers=on_cpu),
                    settings=SETTINGS, now=NOW)  # fmt: skip
    yield "a GPU serving pod computes on the CPU", body(served, degraded.status)

    yield "deleting", body(served, old_status, deletionTimestamp="2026-11-21T10:00:00Z")


# state -> (kstatus, Argo CD health): the table the README shows.
EXPECTED = {
    "created, not reconciled (status default)": ("InProgress", "Progressing"),
    "building the first version": ("InProgress", "Progressing"),
    "Ready": ("Current", "Healthy"),
    "spec changed, not observed yet": ("InProgress", "Progressing"),
    "spec changed, new build running, old serving": ("InProgress", "Progressing"),
    "new version's build failed, old serving": ("Failed", "Degraded"),
    "unfixable model, never served": ("Failed", "Degraded"),
    "no eligible node": ("Failed", "Degraded"),
    "a build waits for a free GPU": ("InProgress", "Progressing"),
    "more replicas than the fleet can hold": ("Failed", "Degraded"),
    "engine store claim missing": ("Failed", "Degraded"),
    "a GPU serving pod computes on the CPU": ("Failed", "Degraded"),
    "deleting": ("Terminating", "Progressing"),
}
STATES = dict(lifecycle())


@pytest.fixture(scope="session")
def kstatus() -> Path:
    if shutil.which("go") is None:
        pytest.skip("the Go toolchain is missing: hack/kstatus (the real kstatus library) cannot be built")
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "kstatus" / "build.sh")], check=True, capture_output=True, text=True, timeout=900
    )
    return Path(out.stdout.strip().splitlines()[-1])


def compute(binary: Path, objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    lines = "".join(json.dumps(o) + "\n" for o in objects)
    out = subprocess.run([str(binary)], input=lines, check=True, capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_kstatus_reads_every_step_of_a_models_life(kstatus: Path) -> None:
    results = compute(kstatus, list(STATES.values()))
    got = {state: r["status"] for state, r in zip(STATES, results, strict=True)}
    assert got == {state: want[0] for state, want in EXPECTED.items()}
    by_state = dict(zip(STATES, results, strict=True))
    assert "not an ONNX model" in by_state["new version's build failed, old serving"]["message"]
    assert "previous version still serves" in by_state["new version's build failed, old serving"]["message"]
    unobserved = by_state["spec changed, not observed yet"]["message"]
    assert "generation is 2, but latest observed generation is 1" in unobserved


def test_without_the_status_default_kstatus_calls_an_unreconciled_model_current(kstatus: Path) -> None:
    """Why the CRD defaults status to {observedGeneration: 0}: kstatus skips a missing observedGeneration."""
    raw = body(model(), None)
    assert [r["status"] for r in compute(kstatus, [raw, as_served(raw)])] == ["Current", "InProgress"]


def test_kstatus_reads_a_list_as_kubectl_prints_it(kstatus: Path) -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": [STATES["Ready"], STATES["deleting"]]}
    out = subprocess.run(
        [str(kstatus)], input=json.dumps(listed, indent=2), check=True, capture_output=True, text=True, timeout=60
    )
    assert [json.loads(line)["status"] for line in out.stdout.splitlines()] == ["Current", "Terminating"]


# --- kubectl wait --for=condition=Ready -------------------------------------------------------------------


def kubectl_wait_satisfied(obj: Mapping[str, Any], condition: str = "Ready") -> bool:
    """kubectl wait's rule: the condition is True and, when it carries observedGeneration, it is this generation."""
    generation = obj["metadata"].get("generation")
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == condition:
            fresh = "observedGeneration" not in c or c["observedGeneration"] == generation
            return bool(c["status"] == "True" and fresh)
    return False


def test_kubectl_wait_for_ready_returns_only_once_the_new_generation_serves() -> None:
    assert kubectl_wait_satisfied(STATES["Ready"])
    for state in (
        "spec changed, not observed yet",
        "spec changed, new build running, old serving",
        "new version's build failed, old serving",
    ):
        assert not kubectl_wait_satisfied(STATES[state]), state
    # and once generation 2's engines are built and rolled out, it returns
    served, jobs, deployments = serve(model())
    changed = with_status(
        model(model={"uri": "pvc://models/clf/v2.onnx"}),
        served.model_dump(mode="json", by_alias=True)["status"],
        generation=2,
    )
    p1 = plan(changed, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    new_jobs = [finished_job(j) for j in kinds(p1, "Job")]
    results = {j["metadata"]["name"]: {"phase": "Ready", "key": "v2-" + j["metadata"]["name"][-8:]} for j in new_jobs}
    changed = with_status(changed, p1.status, generation=2)
    p2 = plan(
        changed,
        Observed(nodes=FLEET, jobs=jobs + new_jobs, deployments=deployments, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    assert not kubectl_wait_satisfied(body(changed, p2.status))  # rolling: old pods still answer
    rolled = [ready_deployment(d) for d in kinds(p2, "Deployment")]
    changed = with_status(changed, p2.status, generation=2)
    p3 = plan(changed, Observed(nodes=FLEET, jobs=jobs + new_jobs, deployments=rolled), settings=SETTINGS, now=NOW)
    assert kubectl_wait_satisfied(body(changed, p3.status))


# --- Argo CD ------------------------------------------------------------------------------------------------


def lua_literal(value: Any) -> str:
    """A Lua table constructor for a JSON value (plain Lua has no JSON decoder)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid Lua string for the characters used here
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items() if v is not None) + "}"


def argocd_health(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    lua = shutil.which("lua5.4")
    if lua is None:
        pytest.skip("lua5.4 is missing (Debian: apt-get install lua5.4): the Argo CD health check cannot run")
    script = "\n".join(
        f"obj = {lua_literal(o)}\nlocal hs = dofile({json.dumps(str(LUA_CHECK))})\n"
        'print(hs.status .. "\\t" .. (hs.message or ""))'
        for o in objects
    )
    out = subprocess.run([lua, "-"], input=script, check=True, capture_output=True, text=True, timeout=60)
    return [tuple(line.split("\t", 1)) for line in out.stdout.splitlines()]  # type: ignore[misc]


def test_the_argocd_health_check_agrees_with_kstatus_at_every_step() -> None:
    health = argocd_health(list(STATES.values()))
    got = {state: h[0] for state, h in zip(STATES, health, strict=True)}
    assert got == {state: want[1] for state, want in EXPECTED.items()}
    messages = dict(zip(STATES, (h[1] for h in health), strict=True))
    assert messages["new version's build failed, old serving"].startswith("InvalidModel: ")
    assert messages["unfixable model, never served"].startswith("FetchFailed: ")


def test_lua_literals_round_trip_what_the_check_reads() -> None:
    assert lua_literal({"a": [1, 'x"y'], "b": None, "c": True}) == '{["a"] = {1, "x\\"y"}, ["c"] = true}'
