"""The whole pipeline for real on the local cluster's real node: the project's own images, the operator installed
by Helm inside the cluster, real `modelfleet build` Jobs and `modelfleet serve` pods, queried through the
model's Service with NVIDIA's tritonclient. Run alone with `make e2e-real` (marker `realnode`)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from tests.digits import digits_model, train_digits, write_evaluation
from tests.e2e.conftest import OPERATOR_NAMESPACE, RELEASE, ROOT, Cluster, RealImages, install_chart, wait_for
from tests.modelzoo import FEATURES, classifier_model, classifier_reference

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(1800)]

READY_SECONDS = 600  # hang guards for a loaded 2-core machine, not performance assertions


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("-n", namespace, "get", kind, name, "-o", "json").stdout
    return json.loads(out)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


@pytest.fixture(scope="module")
def in_cluster_operator(cluster: Cluster, inferencemodel_crd: Path, real_images: RealImages) -> str:
    """The chart installed as a platform team would, its operator a real pod from the project's image."""
    operator_repo, operator_tag = real_images.operator.rsplit(":", 1)
    runtime_repo, runtime_tag = real_images.runtime.rsplit(":", 1)
    install_chart(
        cluster,
        "--values",
        str(ROOT / "hack" / "local-values.yaml"),
        "--set",
        f"image.repository={operator_repo},image.tag={operator_tag}",
        "--set",
        f"runtime.image.repository={runtime_repo},runtime.image.tag={runtime_tag}",
        # The tag stays `dev`: a new image must still roll the operator's pod.
        "--set",
        f"podAnnotations.modelfleet\\.io/operator-image={real_images.hashes['operator']}",
        "--set",
        "autoscaler.intervalSeconds=5",  # decisions every 5 s, so the autoscaler test sees both directions soon
        timeout="300s",
    )
    pods = json.loads(
        cluster.kubectl(
            "-n", OPERATOR_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=modelfleet", "-o", "json"
        ).stdout
    )["items"]
    running = [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and p["spec"].get("nodeName")
        and not p["metadata"].get("deletionTimestamp")
    ]
    # The chart's two replicas (one leads, one stands by) both land on the one real node (anti-affinity is
    # only preferred).
    nodes = [p["spec"]["nodeName"] for p in running]
    assert nodes == [real_images.node] * 2, f"both operator pods must run on the real node: {nodes}"
    wait_for("an operator pod to hold the Lease", lambda: leader_pod(cluster), timeout=READY_SECONDS)
    return RELEASE


def leader_pod(cluster: Cluster) -> str:
    """The operator pod that acts: the Lease's holder is `<pod name>_<suffix>`."""
    lease = cluster.kubectl("-n", OPERATOR_NAMESPACE, "get", "lease", f"{RELEASE}-operator", "-o", "json", check=False)
    holder = str(json.loads(lease.stdout)["spec"].get("holderIdentity") or "") if lease.returncode == 0 else ""
    return holder.rsplit("_", 1)[0]


@pytest.fixture(scope="module")
def restricted_namespace(cluster: Cluster) -> Iterator[str]:
    """One namespace for the module, enforcing the `restricted` Pod Security level: every pod modelfleet
    creates here must pass it, or it is never created."""
    name = f"real-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def served(
    cluster: Cluster, in_cluster_operator: str, restricted_namespace: str, real_images: RealImages, tmp_path_factory
) -> str:
    """The classifier applied and Ready: engine store and models from PVCs of the default StorageClass."""
    ns = restricted_namespace
    for claim in ("modelfleet-engines", "models"):
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": ns},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pvc))
    model = classifier_model(tmp_path_factory.mktemp("models") / "classifier.onnx")
    files = {"classifier.onnx": model.read_bytes(), "corrupt.onnx": b"this is not an ONNX model\n" * 8}
    real_images.copy_into_claim(cluster, ns, "models", files)
    apply(cluster, ns, inference_model("classifier", "pvc://models/classifier.onnx"))
    wait_ready(cluster, ns, "classifier")
    return ns


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("-n", namespace, "apply", "--server-side", "-f", "-", input=json.dumps(obj))


def wait_ready(cluster: Cluster, namespace: str, name: str) -> None:
    timeout = f"--timeout={READY_SECONDS}s"
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", timeout, f"im/{name}", timeout=READY_SECONDS + 30)


def inference_model(name: str, uri: str, **engine: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modelfleet.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": uri},
            "engine": {"precision": "fp32", **engine},
            "serving": {"resources": {"gpu": 0, "cpu": "200m", "memory": "768Mi"}},
        },
    }


def cluster_ip(cluster: Cluster, namespace: str, name: str) -> str:
    return str(get(cluster, namespace, "service", name)["spec"]["clusterIP"])


def infer(url: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(url=url, network_timeout=30)
    inputs = [triton.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=True)]
    out: np.ndarray = client.infer("classifier", inputs, outputs=wanted).as_numpy("probabilities")
    return out


def post_once(base: str, x: np.ndarray, model: str = "classifier") -> int:
    """One OIP v2 JSON request on a new connection (so kube-proxy picks a pod for each); the HTTP status."""
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    request = urllib.request.Request(
        f"{base}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0  # refused or reset: a failed request as a client sees it


def successes_by_pod(cluster: Cluster, namespace: str) -> dict[str, float]:
    return successes_by_model_pod(cluster, namespace, "classifier")


def test_apply_builds_for_real_and_serves_correct_outputs_through_the_service(cluster: Cluster, served: str) -> None:
    im = get(cluster, served, "inferencemodel", "classifier")
    assert condition(im, "Ready")["status"] == "True", im["status"]
    assert condition(im, "EnginesReady")["status"] == "True", im["status"]
    (engine,) = im["status"]["engines"]
    assert (engine["architecture"], engine["phase"], engine["backend"]) == ("cpu", "Ready", "onnxruntime")
    assert len(engine["key"]) == 64  # the real build's key, from its termination message
    jobs = json.loads(
        cluster.kubectl("-n", served, "get", "jobs", "-l", "modelfleet.io/model=classifier", "-o", "json").stdout
    )["items"]
    assert [j["status"].get("succeeded") for j in jobs] == [1]
    x = np.random.default_rng(3).standard_normal((4, FEATURES)).astype(np.float32)
    got = infer(f"{cluster_ip(cluster, served, 'classifier')}:80", x)
    np.testing.assert_allclose(got, classifier_reference(x), atol=1e-5)


def test_kubectl_scale_gives_three_real_pods_and_the_service_reaches_each(cluster: Cluster, served: str) -> None:
    cluster.kubectl("-n", served, "scale", "inferencemodel/classifier", "--replicas=3")
    wait_for(
        "3 ready replicas",
        lambda: get(cluster, served, "inferencemodel", "classifier")["status"].get("readyReplicas") == 3,
        timeout=READY_SECONDS,
    )
    before = successes_by_pod(cluster, served)
    assert len(before) == 3, before
    base = f"http://{cluster_ip(cluster, served, 'classifier')}:80"
    x = np.ones((1, FEATURES), np.float32)
    statuses: list[int] = []

    def each_pod_served() -> bool:
        # A pod is Ready before kube-proxy has programmed it into the Service (the EndpointSlice and the iptables
        # sync lag behind on a busy node), so requests go in rounds until every pod has answered some.
        statuses.extend(post_once(base, x) for _ in range(30))
        after = successes_by_pod(cluster, served)
        return all(after[pod] > before[pod] for pod in before)

    wait_for("the Service to reach each of the 3 pods", each_pod_served, timeout=READY_SECONDS)
    assert statuses.count(200) == len(statuses), statuses


def test_a_new_engine_rolls_out_under_load_without_a_failed_request(cluster: Cluster, served: str) -> None:
    base = f"http://{cluster_ip(cluster, served, 'classifier')}:80"
    x = np.ones((1, FEATURES), np.float32)
    old_key = get(cluster, served, "inferencemodel", "classifier")["status"]["engines"][0]["key"]
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(post_once(base, x))
            time.sleep(0.02)

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        apply(cluster, served, inference_model("classifier", "pvc://models/classifier.onnx", batch={"max": 16}))

        def rolled() -> bool:
            im = get(cluster, served, "inferencemodel", "classifier")
            engine = im["status"]["engines"][0]
            return (
                engine["key"] != old_key
                and im["status"].get("observedGeneration") == im["metadata"]["generation"]
                and condition(im, "Ready").get("status") == "True"
                and condition(im, "Reconciling").get("status") == "False"
                and im["status"].get("readyReplicas") == 3
            )

        wait_for("the new engine to roll out", rolled, timeout=READY_SECONDS)
        time.sleep(5)  # and a little load on the new pods
    finally:
        stop.set()
        sender.join(timeout=30)
    failed = [s for s in statuses if s != 200]
    print(f"roll under load: {len(statuses)} requests through the Service, {len(failed)} failed")
    assert len(statuses) > 50, len(statuses)
    assert failed == [], f"{len(failed)} of {len(statuses)} requests failed during the roll: {sorted(set(failed))}"


def assert_stalled_with_the_previous_version_serving(im: dict[str, Any], reason: str) -> None:
    """Generation N cannot go live (Ready False, Stalled True: kstatus Failed) while the old version answers."""
    assert condition(im, "Ready")["status"] == "False", im["status"]
    assert condition(im, "Ready")["observedGeneration"] == im["metadata"]["generation"], im["status"]
    stalled = condition(im, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == reason, stalled
    assert "previous version still serves on cpu" in stalled["message"], stalled
    assert condition(im, "Reconciling")["status"] == "False", im["status"]
    serving = condition(im, "Serving")
    assert serving["status"] == "True" and serving["reason"] == "PreviousVersion", serving


def test_a_corrupt_model_fails_its_build_says_why_and_the_previous_version_keeps_serving(
    cluster: Cluster, served: str
) -> None:
    engine = apply_a_failing_version(cluster, served, "pvc://models/corrupt.onnx", "InvalidModel", seed=5)
    assert "corrupt.onnx" in engine["message"] or "ONNX" in engine["message"], engine["message"]


def apply_a_failing_version(cluster: Cluster, namespace: str, uri: str, reason: str, *, seed: int) -> dict[str, Any]:
    """Apply a version whose real build fails; check it fails for `reason` while the serving version keeps its
    Deployment and still answers correctly through the Service. Returns the failed engine's status."""
    before = get(cluster, namespace, "inferencemodel", "classifier")["status"]["engines"][0]
    apply(cluster, namespace, inference_model("classifier", uri))

    def failed() -> dict[str, Any] | None:
        im = get(cluster, namespace, "inferencemodel", "classifier")
        engine = (im["status"].get("engines") or [{}])[0]
        return im if engine.get("phase") == "Failed" and engine.get("buildId") != before["buildId"] else None

    im = wait_for("the build to fail", failed, timeout=READY_SECONDS)
    engine: dict[str, Any] = im["status"]["engines"][0]
    assert engine["reason"] == reason, engine
    assert_stalled_with_the_previous_version_serving(im, reason)
    deployment = get(cluster, namespace, "deployment", "classifier-cpu")
    assert deployment["metadata"]["annotations"]["modelfleet.io/engine-key"] == before["key"]
    x = np.random.default_rng(seed).standard_normal((2, FEATURES)).astype(np.float32)
    np.testing.assert_allclose(
        infer(f"{cluster_ip(cluster, namespace, 'classifier')}:80", x), classifier_reference(x), atol=1e-5
    )
    return engine


def test_the_operator_pod_killed_mid_rollout_converges_without_duplicates(cluster: Cluster, served: str) -> None:
    def build_id() -> str:
        return str(get(cluster, served, "inferencemodel", "classifier")["status"]["engines"][0].get("buildId"))

    before = build_id()
    apply(cluster, served, inference_model("classifier", "pvc://models/classifier.onnx", batch={"max": 24}))
    wait_for("the new build", lambda: build_id() != before, timeout=READY_SECONDS, every=0.2)
    # The leader dies (the standby waits its Lease out, then takes over); the ReplicaSet replaces the pod.
    leader = leader_pod(cluster)
    assert leader, "no operator pod holds the Lease"
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "delete", "pod", leader, "--force", "--grace-period=0")

    def converged() -> bool:
        im = get(cluster, served, "inferencemodel", "classifier")
        return (
            im["status"].get("observedGeneration") == im["metadata"]["generation"]
            and condition(im, "Ready").get("status") == "True"
            and condition(im, "Reconciling").get("status") == "False"
            and im["status"]["engines"][0]["phase"] == "Ready"
        )

    wait_for("convergence after the operator's pod was killed", converged, timeout=READY_SECONDS)
    engine = get(cluster, served, "inferencemodel", "classifier")["status"]["engines"][0]
    # The build that was running when the operator died ran once: one Job, one pod, succeeded.
    job = get(cluster, served, "job", engine["job"])
    assert job["status"].get("succeeded") == 1, job["status"]
    pods = json.loads(
        cluster.kubectl("-n", served, "get", "pods", "-l", f"job-name={engine['job']}", "-o", "json").stdout
    )
    assert len(pods["items"]) == 1, [p["metadata"]["name"] for p in pods["items"]]
    deployments = json.loads(
        cluster.kubectl("-n", served, "get", "deployments", "-l", "modelfleet.io/model=classifier", "-o", "json").stdout
    )["items"]
    assert [d["metadata"]["name"] for d in deployments] == ["classifier-cpu"]
    assert deployments[0]["metadata"]["annotations"]["modelfleet.io/engine-key"] == engine["key"]
    assert deployments[0]["status"].get("readyReplicas") == 3


def test_a_model_file_that_does_not_exist_fails_its_build_says_which_and_the_previous_version_keeps_serving(
    cluster: Cluster, served: str
) -> None:
    engine = apply_a_failing_version(cluster, served, "pvc://models/no-such-model.onnx", "FetchFailed", seed=6)
    assert "no-such-model.onnx" in engine["message"] and "no such file" in engine["message"], engine["message"]


AUTOSCALED = "autoscaled"
TARGET_QPS = 8.0  # per replica; the load below asks for 3 replicas, the ceiling
LOAD_QPS = 24.0
P99_TARGET_MS = 2000.0  # QPS drives the decision: nothing here depends on this machine's speed
SCALE_DOWN_WINDOW_S = 20


class PacedLoad:
    """Open-loop load through a Service at a fixed rate, a new connection per request (kube-proxy picks a pod
    for each); every request's status and latency recorded with the time it was sent."""

    def __init__(self, base: str, model: str, rate: float) -> None:
        self.base, self.model, self.rate = base, model, rate
        self.results: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=32)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, sent: float) -> None:
        status = post_once(self.base, np.ones((1, FEATURES), np.float32), self.model)
        self.results.append((sent, status, time.monotonic() - sent))

    def _run(self) -> None:
        began = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = began + n / self.rate
            self._stop.wait(max(0.0, due - time.monotonic()))
            self._pool.submit(self._one, time.monotonic())
            n += 1

    def __enter__(self) -> PacedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)

    def since(self, t: float) -> list[tuple[float, int, float]]:
        return [r for r in self.results if r[0] >= t]


def p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99)) if latencies else float("nan")


def test_the_autoscaler_follows_load_through_the_service_with_real_pods(cluster: Cluster, served: str) -> None:
    im = inference_model(AUTOSCALED, "pvc://models/classifier.onnx")
    im["spec"]["autoscaling"] = {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetQPSPerReplica": TARGET_QPS,
        "targetP99LatencyMilliseconds": P99_TARGET_MS,
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}},
    }
    apply(cluster, served, im)
    wait_ready(cluster, served, AUTOSCALED)

    def status() -> dict[str, Any]:
        return get(cluster, served, "inferencemodel", AUTOSCALED)["status"]

    wait_for("the first decision at rest", lambda: (status().get("autoscaler") or {}).get("desiredReplicas") == 1)
    base = f"http://{cluster_ip(cluster, served, AUTOSCALED)}:80"
    with PacedLoad(base, AUTOSCALED, LOAD_QPS) as load:
        began = time.monotonic()
        wait_for("3 ready replicas under load", lambda: status().get("readyReplicas") == 3, timeout=READY_SECONDS)
        scaled = time.monotonic()
        up = status()["autoscaler"]
        time.sleep(15)  # the load, now over three real pods
    assert (up["desiredReplicas"], up["qps"] > 2 * TARGET_QPS) == (3, True), up
    assert "qps" in up["reason"], up  # the decision explains itself
    sent = load.since(began)
    failed = [s for _, s, _ in sent if s != 200]
    before = [lat for t, s, lat in sent if t < scaled and s == 200]
    after = [lat for t, s, lat in load.since(scaled + 2) if s == 200]
    print(
        f"autoscaler: 1 -> 3 replicas in {scaled - began:.0f}s at {LOAD_QPS:.0f} req/s; {len(sent)} requests, "
        f"{len(failed)} failed; client p99 {p99(before) * 1e3:.0f} ms while scaling, {p99(after) * 1e3:.0f} ms after"
    )
    assert failed == [], f"{len(failed)} of {len(sent)} requests failed while scaling up: {sorted(set(failed))}"
    assert after and p99(after) * 1e3 < P99_TARGET_MS, p99(after)
    counts = successes_by_model_pod(cluster, served, AUTOSCALED)
    assert len(counts) == 3 and all(c > 0 for c in counts.values()), counts  # every new pod served load

    seen: list[dict[str, Any]] = []

    def scaled_down() -> bool:
        seen.append(status())
        return (seen[-1].get("autoscaler") or {}).get("desiredReplicas") == 1 and seen[-1].get("replicas") == 1

    try:
        wait_for("the scale-down after the window", scaled_down, timeout=READY_SECONDS)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen[-1]}") from None
    down = seen[-1]["autoscaler"]
    assert down["currentReplicas"] in (1, 2, 3) and down["desiredReplicas"] == 1, down
    reasons = [e["reason"] for e in events_for(cluster, served, AUTOSCALED)]
    assert "ScaledUp" in reasons and "ScaledDown" in reasons, reasons
    assert get(cluster, served, "deployment", f"{AUTOSCALED}-cpu")["spec"]["replicas"] == 1
    cluster.kubectl("-n", served, "delete", "inferencemodel", AUTOSCALED, "--wait=false")


def events_for(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=InferenceModel,involvedObject.name={name}"
    out = cluster.kubectl("-n", namespace, "get", "events", "--field-selector", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def successes_by_model_pod(cluster: Cluster, namespace: str, model: str) -> dict[str, float]:
    """Successful requests per Running serving pod of one model, from each pod's own /metrics."""
    pods = json.loads(
        cluster.kubectl(
            "-n",
            namespace,
            "get",
            "pods",
            "-l",
            f"modelfleet.io/component=serving,modelfleet.io/model={model}",
            "-o",
            "json",
        ).stdout
    )["items"]
    counts = {}
    prefix = f'modelfleet_requests_total{{model="{model}",outcome="success"}}'
    for pod in pods:
        if pod["status"].get("phase") != "Running" or not pod["status"].get("podIP"):
            continue
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10) as response:
            text = response.read().decode()
        counts[pod["metadata"]["name"]] = float(next(x for x in text.splitlines() if x.startswith(prefix)).split()[-1])
    return counts


def test_the_labeled_gate_scores_real_digits_in_a_build_job_and_refuses_a_lossy_engine(
    cluster: Cluster, served: str, real_images: RealImages, tmp_path: Path
) -> None:
    """Evaluation data from a second claim: the figures reach status.engines, and a miscalibrated int8 engine
    (which the drift gate, comparing on its calibration data, would let through) is refused for its drop."""
    ns, digits = served, train_digits()
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "datasets", "namespace": ns},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pvc))
    tmp = tmp_path / "digits"
    model, evaluation = digits_model(tmp / "digits.onnx", digits.weights), write_evaluation(tmp / "eval.npz", digits)
    faint = tmp / "faint.npz"
    np.savez(faint, pixels=(digits.test_x[:128] * 0.05).astype(np.float32))
    real_images.copy_into_claim(cluster, ns, "models", {"digits.onnx": model.read_bytes()})
    files = {"eval.npz": evaluation.read_bytes(), "faint.npz": faint.read_bytes()}
    real_images.copy_into_claim(cluster, ns, "datasets", files)
    gate = {"evaluation": {"uri": "pvc://datasets/eval.npz"}, "maxAccuracyDrop": 0.05}
    apply(cluster, ns, inference_model("digits", "pvc://models/digits.onnx", precision="int8", accuracy=gate))
    lossy = inference_model(
        "digits-faint",
        "pvc://models/digits.onnx",
        precision="int8",
        calibration={"uri": "pvc://datasets/faint.npz"},
        onnxruntime={"quantization": "static"},
        accuracy={**gate, "maxRelError": 1e6, "minTop1Agreement": 0},
    )
    apply(cluster, ns, lossy)
    wait_ready(cluster, ns, "digits")
    (engine,) = get(cluster, ns, "inferencemodel", "digits")["status"]["engines"]
    figures = engine["accuracy"]["evaluation"]
    print("int8 on the real node:", figures)
    assert figures["samples"] == 540 and figures["output"] == "logits" and figures["maxAccuracyDrop"] == 0.05
    assert figures["referenceAccuracy"] == pytest.approx(digits.sklearn_accuracy)
    assert figures["accuracyDrop"] == pytest.approx(figures["referenceAccuracy"] - figures["accuracy"])
    assert figures["accuracyDrop"] <= 0.05

    def finished() -> dict[str, Any] | None:
        engines = get(cluster, ns, "inferencemodel", "digits-faint")["status"].get("engines") or [{}]
        return engines[0] if engines[0].get("phase") in ("Failed", "Ready") else None

    refused = wait_for("the lossy build to finish", finished, timeout=READY_SECONDS)
    print("refused on the real node:", refused["message"])
    assert refused["reason"] == "AccuracyGateFailed", refused
    assert "labeled samples" in refused["message"] and "> 5.00; nothing was published" in refused["message"]
