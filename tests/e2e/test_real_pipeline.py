"""The whole pipeline for real on the local cluster's real node: the project's own images, the operator installed
by Helm inside the cluster, real `modelfleet build` Jobs and `modelfleet serve` pods, queried through the
model's Service with NVIDIA's tritonclient. Run alone with `make e2e-real` (marker `realnode`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from tests.e2e.conftest import OPERATOR_NAMESPACE, RELEASE, ROOT, Cluster, RealImages
from tests.modelzoo import FEATURES, classifier_model, classifier_reference

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(1800)]

READY_SECONDS = 600  # hang guards for a loaded 2-core machine, not performance assertions


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("-n", namespace, "get", kind, name, "-o", "json").stdout
    return json.loads(out)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def wait_for(what: str, check: Any, timeout: float = READY_SECONDS, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last}")


@pytest.fixture(scope="module")
def in_cluster_operator(cluster: Cluster, inferencemodel_crd: Path, real_images: RealImages) -> str:
    """The chart installed as a platform team would, its operator a real pod from the project's image."""
    operator_repo, operator_tag = real_images.operator.rsplit(":", 1)
    runtime_repo, runtime_tag = real_images.runtime.rsplit(":", 1)
    cluster.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(ROOT / "helm" / "modelfleet"),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--values",
        str(ROOT / "hack" / "local-values.yaml"),
        "--set",
        f"image.repository={operator_repo},image.tag={operator_tag}",
        "--set",
        f"runtime.image.repository={runtime_repo},runtime.image.tag={runtime_tag}",
        "--wait",
        "--timeout",
        "300s",
    )
    pods = json.loads(
        cluster.kubectl(
            "-n", OPERATOR_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=modelfleet", "-o", "json"
        ).stdout
    )["items"]
    running = [
        p for p in pods if p["status"].get("phase") == "Running" and p["spec"].get("nodeName") == real_images.node
    ]
    assert running, (
        f"no operator pod runs on the real node {real_images.node}: {[p['spec'].get('nodeName') for p in pods]}"
    )
    return RELEASE


@pytest.fixture
def model_volumes(cluster: Cluster, namespace: str, real_images: RealImages, tmp_path: Path) -> Iterator[str]:
    """The engine store and a models volume from the cluster's default StorageClass, the test classifier in it."""
    for claim in ("modelfleet-engines", "models"):
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pvc))
    model = classifier_model(tmp_path / "classifier.onnx")
    real_images.copy_into_claim(cluster, namespace, "models", {"classifier.onnx": model.read_bytes()})
    yield namespace


def inference_model(name: str, uri: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": uri},
            "engine": {"precision": "fp32"},
            "serving": {"resources": {"gpu": 0, "cpu": "250m", "memory": "768Mi"}},
            **spec,
        },
    }


def cluster_ip(cluster: Cluster, namespace: str, name: str) -> str:
    return str(get(cluster, namespace, "service", name)["spec"]["clusterIP"])


def infer(url: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(url=url, network_timeout=30)
    inputs = [triton.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        "classifier", inputs, outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)]
    )
    out: np.ndarray = result.as_numpy("probabilities")
    return out


def test_apply_builds_for_real_and_serves_correct_outputs_through_the_service(
    cluster: Cluster, in_cluster_operator: str, model_volumes: str
) -> None:
    ns = model_volumes
    cluster.kubectl(
        "-n", ns, "apply", "-f", "-", input=json.dumps(inference_model("classifier", "pvc://models/classifier.onnx"))
    )
    cluster.kubectl(
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        f"--timeout={READY_SECONDS}s",
        "inferencemodel/classifier",
        timeout=READY_SECONDS + 30,
    )
    im = get(cluster, ns, "inferencemodel", "classifier")
    assert condition(im, "EnginesReady")["status"] == "True", im["status"]
    (engine,) = im["status"]["engines"]
    assert (engine["architecture"], engine["phase"], engine["backend"]) == ("cpu", "Ready", "onnxruntime")
    assert len(engine["key"]) == 64  # the real build's key, from its termination message
    # The build ran as a real pod on the real node and wrote its result where the kubelet reads it.
    jobs = json.loads(
        cluster.kubectl("-n", ns, "get", "jobs", "-l", "modelfleet.io/model=classifier", "-o", "json").stdout
    )
    assert [j["status"].get("succeeded") for j in jobs["items"]] == [1]
    x = np.random.default_rng(3).standard_normal((4, FEATURES)).astype(np.float32)
    got = infer(f"{cluster_ip(cluster, ns, 'classifier')}:80", x)
    np.testing.assert_allclose(got, classifier_reference(x), atol=1e-5)
