"""The InferenceModel CRD on a real API server: it installs, takes the examples, refuses bad input, and
everything it accepts parses with the operator's models (defence in depth)."""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet_operator import api, crdgen
from tests.operator.test_api import BASE, EXAMPLES, INVALID_MANIFESTS, STATUS, Invalid, load_yaml

pytestmark = pytest.mark.e2e

GROUP_VERSION = "modelfleet.io/v1alpha1"


def parse_objects(text: str) -> list[dict[str, Any]]:
    """kubectl prints several objects as concatenated JSON documents."""
    decoder, objects, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        obj, end = decoder.raw_decode(text, pos)
        objects.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return objects


def get_json(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "-n", namespace, "inferencemodel", name, "-o", "json").stdout
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def table_namespace(cluster: Any, inferencemodel_crd: Path) -> Iterator[str]:
    """One namespace for the whole invalid-manifest table: nothing should ever be created in it."""
    name = f"t-api-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- the CRD ----------------------------------------------------------------------------------------------


def test_crd_installs_and_is_established(cluster: Any, inferencemodel_crd: Path) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", "inferencemodels.modelfleet.io", "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["shortNames"] == list(api.SHORT_NAMES)
    # The API server stored the schema as generated: nothing was pruned or rewritten.
    stored = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert stored == crdgen.build_schema()


def test_short_name_and_category_resolve(cluster: Any, inferencemodel_crd: Path) -> None:
    resources = cluster.kubectl("api-resources", "--api-group=modelfleet.io", "-o", "wide").stdout
    row = next(line for line in resources.splitlines() if line.startswith("inferencemodels"))
    assert " im,ims " in f" {row.split()[1]} "
    assert "modelfleet" in row.split()[-1]


def test_explain_prints_nested_descriptions(cluster: Any, inferencemodel_crd: Path) -> None:
    out = cluster.kubectl("explain", "inferencemodel.spec.engine.batch").stdout
    assert api.EngineSpec.model_fields["batch"].description in out
    assert api.BatchProfile.model_fields["opt"].description in out
    leaf = cluster.kubectl("explain", "inferencemodel.spec.serving.batching.maxQueueDelayMicroseconds").stdout
    assert "Longest a request waits for others to join its batch" in leaf


# --- the examples -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_server_dry_run_then_applies(
    cluster: Any, namespace: str, inferencemodel_crd: Path, path: Path
) -> None:
    name = load_yaml(path)["metadata"]["name"]
    dry = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path)
    )
    assert "serverside-applied (server dry run)" in dry.stdout
    assert cluster.kubectl("get", "-n", namespace, "inferencemodels", "-o", "name").stdout.strip() == ""

    cluster.kubectl("apply", "--server-side", "--validate=strict", "-n", namespace, "-f", str(path))
    stored = get_json(cluster, namespace, name)
    # What the API server stored, with its defaults, parses; and to the same spec the models derive
    # from the file, so CRD defaults and model defaults agree.
    assert api.parse_inference_model(stored).spec == api.parse_inference_model(load_yaml(path)).spec


def test_minimal_example_is_stored_with_every_default(cluster: Any, namespace: str, inferencemodel_crd: Path) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "minimal.yaml"
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))
    spec = get_json(cluster, namespace, "minilm")["spec"]
    assert spec["engine"]["batch"] == {"min": 1, "opt": 16, "max": 32}
    assert (spec["engine"]["backend"], spec["engine"]["precision"]) == ("auto", "fp16")
    assert spec["serving"]["resources"] == {"gpu": 1, "cpu": "2", "memory": "8Gi"}
    assert spec["serving"]["batching"]["maxQueueSize"] == 1024
    # No queue delay is stored: absent, the serving pods batch adaptively (a stored default would pin it).
    assert "maxQueueDelayMicroseconds" not in spec["serving"]["batching"]


def test_a_labeled_accuracy_gate_is_accepted_stored_and_explained(
    cluster: Any, namespace: str, inferencemodel_crd: Path
) -> None:
    obj = copy_base_spec_object("labeled")
    obj["spec"]["engine"]["accuracy"].update(
        {"evaluation": {"uri": "pvc://datasets/digits/eval.npz"}, "maxAccuracyDrop": 0.01, "evaluationOutput": "logits"}
    )
    cluster.kubectl("apply", "--server-side", "--validate=strict", "-n", namespace, "-f", "-", input=json.dumps(obj))
    stored = get_json(cluster, namespace, "labeled")
    assert stored["spec"]["engine"]["accuracy"]["evaluation"] == {"uri": "pvc://datasets/digits/eval.npz"}
    assert stored["spec"]["engine"]["accuracy"]["maxAccuracyDrop"] == 0.01
    assert api.parse_inference_model(stored).spec == api.parse_inference_model(obj).spec
    out = cluster.kubectl("explain", "inferencemodel.spec.engine.accuracy.maxAccuracyDrop").stdout
    assert "Absolute; 0.005 = 0.5 points" in " ".join(out.split())


def copy_base_spec_object(name: str) -> dict[str, Any]:
    return json.loads(json.dumps({**BASE, "metadata": {"name": name}}))


# --- printer columns, status, kubectl wait and scale --------------------------------------------------------


def create_with_status(cluster: Any, namespace: str, name: str) -> None:
    obj = {**BASE, "metadata": {"name": name}}
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(obj))
    status = {"status": {**STATUS, "selector": f"modelfleet.io/model={name}"}}
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "inferencemodel",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def test_get_shows_the_printer_columns(cluster: Any, namespace: str, inferencemodel_crd: Path) -> None:
    create_with_status(cluster, namespace, "minilm")
    lines = cluster.kubectl("get", "-n", namespace, "im").stdout.splitlines()
    assert lines[0].split() == ["NAME", "READY", "ENGINES", "REPLICAS", "QPS", "P99", "AGE"]
    assert lines[1].split()[:6] == ["minilm", "True", "1/2", "4", "812.5", "31"]
    wide = cluster.kubectl("get", "-n", namespace, "im", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-2:] == ["BACKEND", "PRECISION"]
    assert wide[1].split()[-2:] == ["tensorrt", "fp16"]


def test_status_round_trips_and_kubectl_wait_sees_ready(cluster: Any, namespace: str, inferencemodel_crd: Path) -> None:
    create_with_status(cluster, namespace, "minilm")
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=60s", "im/minilm")
    stored = get_json(cluster, namespace, "minilm")
    assert "somethingNewer" not in stored["status"]  # pruned: the schema knows status fields only
    status = api.parse_inference_model(stored).status
    assert status.engine_summary == "1/2"
    assert [e.architecture for e in status.engines] == ["sm90", "sm80"]
    assert status.autoscaler is not None
    assert status.autoscaler.qps == 812.5


def test_kubectl_scale_writes_spec_replicas(cluster: Any, namespace: str, inferencemodel_crd: Path) -> None:
    create_with_status(cluster, namespace, "minilm")
    cluster.kubectl("scale", "-n", namespace, "im/minilm", "--replicas=3")
    stored = get_json(cluster, namespace, "minilm")
    assert stored["spec"]["replicas"] == 3
    assert api.parse_inference_model(stored).spec.replicas == 3
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/{GROUP_VERSION}/namespaces/{namespace}/inferencemodels/minilm/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3
    assert scale["status"] == {"replicas": 4, "selector": "modelfleet.io/model=minilm"}


# --- what the API server refuses ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=[case.id for case in INVALID_MANIFESTS])
def test_api_server_refuses_invalid_manifest(cluster: Any, table_namespace: str, case: Invalid) -> None:
    obj = case.manifest(name=f"bad-{INVALID_MANIFESTS.index(case)}")
    proc = cluster.kubectl(
        "create", "--validate=strict", "-n", table_namespace, "-f", "-", input=json.dumps(obj), check=False
    )
    assert proc.returncode != 0, f"the API server accepted {case.id}"
    assert case.path in proc.stderr, proc.stderr
    assert case.server_message in proc.stderr, proc.stderr
    assert cluster.kubectl("get", "-n", table_namespace, "im", "-o", "name").stdout.strip() == ""


# --- the API server and the models agree ------------------------------------------------------------------


def random_uri(rng: random.Random) -> str:
    """A URI from valid and broken parts; valid parts are drawn more often, so both outcomes occur."""
    scheme = rng.choice(
        ["pvc://", "pvc://", "file:///", "https://", "https://", "http://", "s3://", "", "file://", "PVC://"]
    )
    host = rng.choice(
        [
            "models",
            "my-claim.v2",
            "h.example",
            "10.0.0.1:8443",
            "models",
            "Models",
            "-bad",
            "a_b",
            "",
            "user:pw@h.example",
        ]
    )
    good = ["model.onnx", "dir", "x.onnx?sig=1", "v1..2", "..."]
    bad = ["..", ".", "%2e%2e", "%2E.", "a b", "", "m.onnx#f", "tab\there"]
    parts = [rng.choice(good) if rng.random() < 0.85 else rng.choice(bad) for _ in range(rng.randint(1, 3))]
    return f"{scheme}{host}/{'/'.join(parts)}" if rng.random() < 0.95 else f"{scheme}{host}"


def random_spec(rng: random.Random) -> dict[str, Any]:
    """BASE with one or two areas redrawn at random, so about half the manifests stay valid."""
    spec = copy_base_spec()
    engine, serving, autoscaling = spec["engine"], spec["serving"], spec["autoscaling"]

    def precision() -> None:
        engine["backend"] = rng.choice(["auto", "tensorrt", "onnxruntime"])
        engine["precision"] = rng.choice(["fp32", "fp16", "int8", "fp8"])
        engine["architectures"] = rng.sample(["sm75", "sm80", "sm89", "sm90", "sm100"], rng.randint(0, 2))
        if rng.random() < 0.3:
            engine["calibration"] = {"uri": "pvc://models/calib.npz"}
        engine["onnxruntime"] = {"quantization": rng.choice(["dynamic", "static"])}

    def batch() -> None:
        lo = rng.randint(1, 8)
        engine["batch"] = {"min": lo, "opt": lo + rng.randint(-2, 8), "max": lo + rng.randint(4, 40)}
        serving["batching"]["maxBatchSize"] = rng.choice([None, rng.randint(1, 48)])
        serving["batching"]["preferredBatchSizes"] = rng.sample(range(1, 48), rng.randint(0, 2))

    def shapes() -> None:
        dims = rng.randint(1, 3)
        lows = [rng.randint(1, 64) for _ in range(dims)]
        engine["shapes"] = {
            "ids": {
                "min": lows,
                "opt": [d + rng.randint(-4, 64) for d in lows],
                "max": [d + rng.randint(64, 256) for d in lows][: rng.choice([dims, dims, dims - 1])] or [512],
            }
        }

    def gpu() -> None:
        serving["resources"]["gpu"] = rng.choice([0, 1, 2])
        engine["backend"] = rng.choice(["auto", "tensorrt", "onnxruntime"])
        if rng.random() < 0.5:
            del engine["architectures"]

    def scaling() -> None:
        autoscaling["minReplicas"], autoscaling["maxReplicas"] = rng.randint(1, 6), rng.randint(4, 10)
        for target in ("targetQPSPerReplica", "targetP99LatencyMilliseconds"):
            if rng.random() < 0.3:
                del autoscaling[target]

    def toleration() -> None:
        serving["placement"]["tolerations"] = [
            rng.choice(
                [
                    {"key": "k", "operator": "Equal", "value": "v"},
                    {"key": "k", "operator": "Exists", "value": "v"},
                    {"operator": "Exists"},
                    {"operator": "Equal", "value": "v"},
                    {"key": "k", "effect": "NoExecute", "tolerationSeconds": 10},
                    {"key": "k", "effect": "NoSchedule", "tolerationSeconds": 10},
                ]
            )
        ]

    for redraw in rng.sample([precision, batch, shapes, gpu, scaling, toleration], rng.randint(1, 2)):
        redraw()
    return spec


def copy_base_spec() -> dict[str, Any]:
    spec = json.loads(json.dumps(BASE["spec"]))
    assert isinstance(spec, dict)
    return spec


def models_accept(obj: dict[str, Any]) -> bool:
    try:
        api.parse_inference_model(obj)
    except api.InvalidInferenceModelError:
        return False
    return True


@pytest.mark.parametrize("kind", ["uri", "spec"])
def test_api_server_and_models_agree_on_random_manifests(
    cluster: Any, namespace: str, inferencemodel_crd: Path, kind: str
) -> None:
    """Seeded random manifests: the API server accepts exactly those the models accept, and what it
    returns (defaulted) parses."""
    rng = random.Random(20250101 if kind == "uri" else 20250102)
    objects: list[dict[str, Any]] = []
    for i in range(150):
        obj: dict[str, Any] = {
            "apiVersion": GROUP_VERSION,
            "kind": "InferenceModel",
            "metadata": {"name": f"r-{i}"},
        }
        if kind == "uri":
            model = {"uri": random_uri(rng)}
            if rng.random() < 0.7:
                model["sha256"] = "0" * 64
            obj["spec"] = {"model": model}
        else:
            obj["spec"] = random_spec(rng)
        objects.append(obj)
    stream = "\n".join(f"---\n{yaml.safe_dump(obj)}" for obj in objects)
    proc = cluster.kubectl(
        "create",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-o",
        "json",
        "-f",
        "-",
        input=stream,
        check=False,
        timeout=600,
    )
    returned = {o["metadata"]["name"]: o for o in parse_objects(proc.stdout)}
    refused = set(re.findall(r'"(r-\d+)" is invalid', proc.stderr))
    assert len(returned) + len(refused) == len(objects), proc.stderr  # every object got a verdict
    assert 20 <= len(returned) <= 130, "the generator should produce a mix of valid and invalid manifests"
    disagreements = [
        (obj["metadata"]["name"], obj["spec"], obj["metadata"]["name"] in returned)
        for obj in objects
        if (obj["metadata"]["name"] in returned) != models_accept(obj)
    ]
    assert disagreements == []
    for name, stored in returned.items():
        assert api.parse_inference_model(stored).metadata["name"] == name
