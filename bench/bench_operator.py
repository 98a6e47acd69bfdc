"""`make bench-operator`: the operator at scale, 200 InferenceModels on ~50 fake GPU nodes, measured from outside.

On a cluster of its own (hack/cluster.sh with MODELFLEET_CLUSTER_NAME=mf-bench, so the shared test
cluster is never touched) the bench creates N models in a few namespaces, runs `modelfleet operator`
as a local process, and measures:
- time to Ready: from each model's creation until its Ready condition is True for its generation (one
  LIST of all models per second), against when the build Jobs completed (their completionTime);
- the operator's API requests, counted exactly by bench/operator_proxy.py: the operator's kubeconfig
  points at that proxy on 127.0.0.1, which forwards to the apiserver with the admin certificate, so
  every request of the operator and only the operator's is seen (verb x resource, as the apiserver's
  apiserver_request_total names them; the apiserver's own totals over all clients are reported too);
- peak RSS (VmHWM of the operator process) and its CPU time;
- writes while idle: after all are Ready, nothing changes for --idle-seconds; every write the operator
  makes then is listed (goal: none). The resync period is shortened (--resync-seconds, default 60 s)
  so the idle window covers full resyncs of every model.

    python -m bench.bench_operator [--models 200] [--namespaces 10] [--idle-seconds 180] [--quick]

Results: bench/results/operator.md + operator.json (operator-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench.operator_proxy import Request, summarize, timeline, unchanged_writes
from hack.volumes import bound_pvc_objects

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
GROUP, VERSION, PLURAL = "modelfleet.io", "v1alpha1", "inferencemodels"
LABEL_MODEL = "modelfleet.io/model"
LABEL_PROFILE = "bench.modelfleet.io/profile"
# Write verbs as apiserver_request_total labels them.
APISERVER_WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION"})


# --- what the bench creates (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One kind of InferenceModel in the mix; `spec` is merged over the model URI."""

    name: str
    spec: Mapping[str, Any]
    note: str


# A block of ten, repeated. Replicas are sized so the mix fits a MODELFLEET_FLEET_SCALE=12 fleet (48 T4,
# 96 A100, 96 L4, 96 H100 GPUs) with room left for build pods: one replica of an unmeasured model lands
# on the first architecture by name (sm75), so few models are left to land there.
PROFILES: tuple[Profile, ...] = (
    Profile("auto", {}, "architectures auto, 1 replica (lands on sm75)"),
    Profile("auto-r4", {"replicas": 4}, "architectures auto, 4 replicas (one per architecture)"),
    Profile(
        "ampere-hopper",
        {"engine": {"architectures": ["sm80", "sm90"]}, "replicas": 2},
        "pinned [sm80, sm90], 2 replicas",
    ),
    Profile(
        "ampere-hopper-fp32",
        {"engine": {"precision": "fp32", "architectures": ["sm80", "sm90"]}, "replicas": 2},
        "pinned [sm80, sm90], fp32, 2 replicas",
    ),
    Profile(
        "fp8",
        {"engine": {"backend": "tensorrt", "precision": "fp8", "architectures": ["sm89", "sm90"]}},
        "TensorRT fp8 on [sm89, sm90], 1 replica",
    ),
    Profile(
        "fp8-r2",
        {"engine": {"backend": "tensorrt", "precision": "fp8", "architectures": ["sm89", "sm90"]}, "replicas": 2},
        "TensorRT fp8 on [sm89, sm90], 2 replicas",
    ),
    Profile(
        "cpu",
        {"engine": {"backend": "onnxruntime"}, "serving": {"resources": {"gpu": 0, "cpu": "500m", "memory": "1Gi"}}},
        "ONNX Runtime on CPU nodes, 1 replica",
    ),
    Profile(
        "cpu-batching",
        {
            "engine": {"backend": "onnxruntime", "precision": "fp32"},
            "serving": {
                "resources": {"gpu": 0, "cpu": "500m", "memory": "1Gi"},
                "batching": {"maxBatchSize": 16, "maxQueueDelayMicroseconds": 500},
            },
        },
        "ONNX Runtime on CPU, batching knobs set, 1 replica",
    ),
    Profile(
        "autoscaled",
        {
            "engine": {"architectures": ["sm80", "sm89"]},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "targetQPSPerReplica": 200},
        },
        "pinned [sm80, sm89], autoscaling 1..8 on QPS",
    ),
    Profile(
        "cpu-r2",
        {
            "engine": {"backend": "onnxruntime"},
            "serving": {"resources": {"gpu": 0, "cpu": "250m", "memory": "1Gi"}},
            "replicas": 2,
        },
        "ONNX Runtime on CPU nodes, 2 replicas",
    ),
)


def namespace_name(index: int) -> str:
    return f"bench-{index:02d}"


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and key in out else value
    return out


def build_models(count: int, namespaces: int) -> list[dict[str, Any]]:
    """`count` InferenceModels, profiles in turn, spread over `namespaces` namespaces."""
    models = []
    for i in range(count):
        profile = PROFILES[i % len(PROFILES)]
        name = f"m{i:03d}-{profile.name}"
        spec = _merge({"model": {"uri": f"pvc://models/{name}/model.onnx"}}, profile.spec)
        models.append(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "InferenceModel",
                "metadata": {
                    "name": name,
                    "namespace": namespace_name(i % namespaces),
                    "labels": {LABEL_PROFILE: profile.name},
                },
                "spec": spec,
            }
        )
    return models


def build_namespace_objects(
    namespace: str, claims: Sequence[str] = ("modelfleet-engines", "models")
) -> list[dict[str, Any]]:
    """The namespace, and PVCs bound to pre-made PVs (no provisioner runs here), as tests/e2e does it."""
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    return objects + [obj for claim in claims for obj in bound_pvc_objects(namespace, claim)]


def build_proxy_kubeconfig(port: int) -> dict[str, Any]:
    """A kubeconfig with no credentials at all: the proxy authenticates upstream."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "operator", "user": {}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "operator"}}],
        "current-context": "proxy",
    }


# --- analysis (pure) -----------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """p50, p90 and max of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {"p50": round(statistics.median(ordered), 2), "p90": round(p90, 2), "max": round(ordered[-1], 2)}


def per_model_first_writes(
    requests: Iterable[Request], resource: str, owners: Mapping[tuple[str, str], str]
) -> dict[tuple[str, str], list[float]]:
    """When the operator first wrote each object of `resource`, grouped by model: (namespace, model) -> times.

    `owners` maps (namespace, object name) to its model (the modelfleet.io/model label)."""
    first: dict[tuple[str, str], float] = {}
    for r in requests:
        if r.kind.resource == resource and r.kind.write and not r.kind.subresource:
            key = (r.kind.namespace, r.kind.name)
            first[key] = min(first.get(key, r.t), r.t)
    by_model: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (namespace, name), t in first.items():
        if (namespace, name) in owners:
            by_model[(namespace, owners[(namespace, name)])].append(t)
    return dict(by_model)


def model_of_write(r: Request, model_names: Iterable[str]) -> str:
    """Which model a write concerns: the object's own name, an Event's involved object, or a child's prefix."""
    names = sorted(model_names, key=len, reverse=True)
    if r.kind.resource == "inferencemodels":
        return r.kind.name
    if r.kind.resource == "events" and r.body:
        try:
            return str(json.loads(r.body)["involvedObject"]["name"])
        except (ValueError, KeyError, TypeError):
            pass  # a truncated body: fall back to the name prefix
    if r.kind.name:
        return next((n for n in names if r.kind.name == n or r.kind.name.startswith(n + "-")), "?")
    return next((n for n in names if f'"{n}"' in r.body), "?")


def describe_idle_writes(
    writes: Sequence[tuple[Request, bool]], start: float, model_names: Sequence[str], *, samples: int = 3
) -> dict[str, Any]:
    """Idle writes (with whether each changed nothing) grouped by kind: when, which models, sample bodies."""
    groups: dict[tuple[str, str], list[Request]] = defaultdict(list)
    unchanged: Counter[tuple[str, str]] = Counter()
    for r, no_op in writes:
        groups[(r.kind.verb, r.kind.what)].append(r)
        unchanged[(r.kind.verb, r.kind.what)] += no_op
    out = []
    for (verb, what), rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        models = Counter(model_of_write(r, model_names) for r in rs)
        out.append(
            {
                "verb": verb,
                "resource": what,
                "count": len(rs),
                "unchanged": unchanged[(verb, what)],
                "firstSeconds": round(rs[0].t - start, 1),
                "lastSeconds": round(rs[-1].t - start, 1),
                "models": len(models),
                "topModels": models.most_common(5),
                "statuses": dict(Counter(r.status for r in rs)),
                "samples": [
                    {"path": r.path, "atSeconds": round(r.t - start, 1), "body": r.body[:800]} for r in rs[:samples]
                ],
            }
        )
    return {"groups": out}


def apiserver_totals(metrics: str) -> dict[str, int]:
    """All clients' requests from the apiserver's apiserver_request_total: total and writes."""
    total = writes = 0
    for line in metrics.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        n = int(float(value))
        total += n
        verb = labels.split('verb="', 1)[1].split('"', 1)[0] if 'verb="' in labels else ""
        if verb in APISERVER_WRITE_VERBS:
            writes += n
    return {"total": total, "writes": writes}


def parse_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def ready_for_generation(model: Mapping[str, Any]) -> bool:
    meta, status = model.get("metadata") or {}, model.get("status") or {}
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" and c.get("observedGeneration") == meta.get("generation")
        for c in status.get("conditions") or []
    )


def ready_reason(model: Mapping[str, Any]) -> str:
    for c in (model.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return f"{c.get('reason')}: {str(c.get('message'))[:160]}"
    return "no Ready condition yet"


# --- the run (side effects) ----------------------------------------------------------------------------------


@dataclass
class ClusterHandle:
    env: dict[str, str]
    kubeconfig: Path
    bin_dir: Path

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout


def cluster_sh(command: str, env: Mapping[str, str], timeout: float) -> str:
    proc = subprocess.run(
        ["bash", str(CLUSTER_SH), command],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hack/cluster.sh {command} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def take_down(env: Mapping[str, str]) -> None:
    """`cluster.sh down`, once more after a pause if a port is still held (a socket that is just closing)."""
    for attempt in range(2):
        try:
            cluster_sh("down", env, timeout=300)
            return
        except RuntimeError as exc:
            if attempt == 1:
                log(f"the cluster did not come down cleanly (results are kept): {exc}")
            time.sleep(3)


def log(message: str) -> None:
    print(f"[bench-operator] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Probe:
    """Memory and CPU of a process at one moment."""

    rss_kib: int
    hwm_kib: int
    cpu_seconds: float


def probe(pid: int) -> Probe:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_comm = stat.rsplit(")", 1)[1].split()
    ticks = int(after_comm[11]) + int(after_comm[12])  # utime, stime (fields 14 and 15)
    return Probe(
        rss_kib=int(fields["VmRSS"].split()[0]),
        hwm_kib=int(fields["VmHWM"].split()[0]),
        cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, timeout: float = 60) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def start_proxy(cluster: ClusterHandle, work: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.operator_proxy", "--kubeconfig", str(cluster.kubeconfig)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=(work / "proxy.log").open("w"),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # {"port": N} once it listens; EOF if it died
    if not line:
        proc.wait(timeout=10)
        raise RuntimeError(f"the proxy exited {proc.returncode}: {(work / 'proxy.log').read_text()[-2000:]}")
    return proc, int(json.loads(line)["port"])


def start_operator(kubeconfig: Path, work: Path, *, resync_seconds: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_OPERATOR_")},
        "KUBECONFIG": str(kubeconfig),
        "MODELFLEET_OPERATOR_RUNTIME_IMAGE": "ghcr.io/modelfleet/modelfleet-runtime:bench",
        "MODELFLEET_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
    }
    log_file = (work / "operator.log").open("wb")
    proc = subprocess.Popen(
        # One process, no Lease: its renewals would count among the idle writes this bench measures.
        [sys.executable, "-m", "modelfleet_runtime.cli", "operator", f"--liveness-port={port}", "--no-leader-election"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited {proc.returncode}:\n{(work / 'operator.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the operator did not become healthy:\n{(work / 'operator.log').read_text()[-4000:]}")


def operator_log_summary(text: str, top: int = 8) -> dict[str, Any]:
    """Counts of WARNING/ERROR lines and the most frequent messages (timestamps stripped)."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for line in text.splitlines():
        try:  # the operator logs JSON lines (modelfleet_operator.logs) when its stderr is not a terminal
            fields = json.loads(line)
        except ValueError:
            continue
        level = str(fields.get("level", "")).upper() if isinstance(fields, dict) else ""
        if level in {"WARNING", "ERROR", "CRITICAL"}:
            levels[level] += 1
            messages[f"{level} {fields.get('logger', '')}: {str(fields.get('msg'))[:200]}"] += 1
    return {"levels": dict(levels), "top": messages.most_common(top)}


def list_models(custom: Any) -> list[dict[str, Any]]:
    """Every InferenceModel, in one LIST (raw JSON: the client's own deserialization is slow)."""
    raw: Any = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _preload_content=False)
    items: list[dict[str, Any]] = json.loads(raw.data)["items"]
    return items


def wait_for_storage(custom: Any, timeout: float = 60) -> None:
    """Until InferenceModels can be listed: an Established CRD's storage may still be initializing (429)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            list_models(custom)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_ready(
    api: Any,
    models: Sequence[Mapping[str, Any]],
    created: Mapping[tuple[str, str], float],
    *,
    timeout: float,
    interval: float = 1.0,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], str]]:
    """Poll every model once per `interval` until all are Ready: when each became Ready, and the laggards' reasons."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    ready: dict[tuple[str, str], float] = {}
    pending: dict[tuple[str, str], str] = {}
    want = {(m["metadata"]["namespace"], m["metadata"]["name"]) for m in models}
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while True:
        now = time.monotonic()
        items = list_models(custom)
        pending = {}
        for item in items:
            key = (item["metadata"]["namespace"], item["metadata"]["name"])
            if key not in want:
                continue
            if ready_for_generation(item):
                ready.setdefault(key, now)
            else:
                ready.pop(key, None)  # Ready went away again: count from when it comes back
                pending[key] = ready_reason(item)
        if len(ready) == len(want):
            return ready, {}
        if now - last_report > 15:
            log(f"{len(ready)}/{len(want)} Ready after {now - min(created.values()):.0f}s")
            last_report = now
        if now > deadline:
            return ready, pending
        time.sleep(max(0.0, interval - (time.monotonic() - now)))


def apiserver_metrics(cluster: ClusterHandle) -> dict[str, int]:
    return apiserver_totals(cluster.kubectl("get", "--raw", "/metrics", timeout=60))


@dataclass
class Options:
    models: int
    namespaces: int
    idle_seconds: float
    fleet_scale: int
    resync_seconds: float
    ready_timeout: float
    keep_cluster: bool
    quick: bool


@dataclass
class Measured:
    """What one run observed, before any arithmetic; times are time.monotonic()."""

    models: list[dict[str, Any]]
    nodes: int
    gpu_nodes: int
    jobs: list[dict[str, Any]]
    deployments: list[dict[str, Any]]
    entries: list[dict[str, Any]]  # the proxy's log
    created: dict[tuple[str, str], float]
    ready: dict[tuple[str, str], float]
    pending: dict[tuple[str, str], str]  # not Ready at the deadline: why
    flips: int
    t_start: float
    t_healthy: float
    t_apply: float
    t_created: float
    t_ready: float
    t_idle_end: float
    wall_offset: float  # time.time() - time.monotonic(), to place server timestamps
    at_apply_probe: Probe
    ready_probe: Probe
    idle_probe: Probe
    apiserver: list[dict[str, int]]  # totals before the operator, at creation, at all Ready, after idle
    proxy_cpu: float
    operator_log: str


def measure(opts: Options) -> Measured:
    """Everything the bench does on the cluster; the figures come from `analyse`."""
    env = {
        "MODELFLEET_CLUSTER_NAME": os.environ.get("MODELFLEET_BENCH_CLUSTER_NAME", "mf-bench"),
        "MODELFLEET_APISERVER_PORT": os.environ.get("MODELFLEET_BENCH_APISERVER_PORT", "36450"),
        "MODELFLEET_FLEET_SCALE": str(opts.fleet_scale),
    }
    work = Path(os.environ.get("MODELFLEET_BENCH_WORK", "/tmp/modelfleet-bench-operator"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"fresh cluster {env['MODELFLEET_CLUSTER_NAME']} (fleet scale {opts.fleet_scale})")
    cluster_sh("down", env, timeout=300)  # a fresh cluster: nothing left from an earlier run is counted
    cluster_sh("up", env, timeout=3600)
    cluster = ClusterHandle(
        env=env, kubeconfig=Path(cluster_sh("kubeconfig", env, 30)), bin_dir=Path(cluster_sh("bin-dir", env, 30))
    )
    proxy: subprocess.Popen[str] | None = None
    operator: subprocess.Popen[bytes] | None = None
    try:
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
        gpu_nodes = [n for n in nodes if "nvidia.com/gpu.compute.major" in n["metadata"]["labels"]]
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / "inferencemodel.yaml"))
        for attempt in range(20):  # kubectl wait errors out while a new CRD has no conditions at all
            try:
                cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")
                break
            except RuntimeError:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        namespaces = [namespace_name(i) for i in range(opts.namespaces)]
        volumes = [o for ns in namespaces for o in build_namespace_objects(ns)]
        cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": volumes}))
        cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", "--timeout=120s", "pvc", "--all", "-A")

        proxy, proxy_port = start_proxy(cluster, work)
        operator_kubeconfig = work / "operator-kubeconfig.yaml"
        operator_kubeconfig.write_text(yaml.safe_dump(build_proxy_kubeconfig(proxy_port)))

        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom = client.CustomObjectsApi(api)
        wait_for_storage(custom)
        before_operator = apiserver_metrics(cluster)

        t_start = time.monotonic()
        operator, _ = start_operator(operator_kubeconfig, work, resync_seconds=opts.resync_seconds)
        t_healthy = time.monotonic()
        time.sleep(5)  # let the initial LISTs and WATCHes settle so the startup phase is counted on its own
        at_apply_probe = probe(operator.pid)
        at_apply = apiserver_metrics(cluster)

        models = build_models(opts.models, opts.namespaces)
        log(f"creating {len(models)} InferenceModels in {opts.namespaces} namespaces")
        created: dict[tuple[str, str], float] = {}
        t_apply = time.monotonic()
        wall_offset = time.time() - time.monotonic()  # maps server timestamps (wall clock) onto our monotonic clock
        for m in models:
            meta = m["metadata"]
            custom.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, m)
            created[(meta["namespace"], meta["name"])] = time.monotonic()
        t_created = time.monotonic()

        ready, pending = wait_ready(api, models, created, timeout=opts.ready_timeout)
        t_ready = time.monotonic()
        all_ready = not pending
        log(
            f"all {len(models)} Ready after {t_ready - t_apply:.1f}s"
            if all_ready
            else f"only {len(ready)}/{len(models)} Ready after {t_ready - t_apply:.1f}s; idle phase runs anyway"
        )
        ready_probe = probe(operator.pid)
        at_ready = apiserver_metrics(cluster)

        log(f"idle for {opts.idle_seconds:.0f}s")
        flips = 0
        idle_end = t_ready + opts.idle_seconds
        while time.monotonic() < idle_end:
            time.sleep(min(10.0, max(0.0, idle_end - time.monotonic())))
            flips += sum(1 for item in list_models(custom) if not ready_for_generation(item))
        t_idle_end = time.monotonic()
        idle_probe = probe(operator.pid)
        at_idle_end = apiserver_metrics(cluster)

        jobs = json.loads(cluster.kubectl("get", "jobs", "-A", "-l", LABEL_MODEL, "-o", "json"))["items"]
        deployments = json.loads(cluster.kubectl("get", "deployments", "-A", "-l", LABEL_MODEL, "-o", "json"))["items"]
        entries = http_json(f"http://127.0.0.1:{proxy_port}/_proxy/log")["entries"]
        proxy_cpu = probe(proxy.pid).cpu_seconds
    finally:
        stop_process(operator)
        stop_process(proxy, grace=10)
        if not opts.keep_cluster:
            log("taking the cluster down")
            take_down(env)

    return Measured(
        models=models,
        nodes=len(nodes),
        gpu_nodes=len(gpu_nodes),
        jobs=jobs,
        deployments=deployments,
        entries=entries,
        created=created,
        ready=ready,
        pending=pending,
        flips=flips,
        t_start=t_start,
        t_healthy=t_healthy,
        t_apply=t_apply,
        t_created=t_created,
        t_ready=t_ready,
        t_idle_end=t_idle_end,
        wall_offset=wall_offset,
        at_apply_probe=at_apply_probe,
        ready_probe=ready_probe,
        idle_probe=idle_probe,
        apiserver=[before_operator, at_apply, at_ready, at_idle_end],
        proxy_cpu=proxy_cpu,
        operator_log=(work / "operator.log").read_text(errors="replace"),
    )


def analyse(meas: Measured, opts: Options) -> dict[str, Any]:
    """The figures of one run (pure)."""
    models, jobs, deployments, created, ready, pending = (
        meas.models,
        meas.jobs,
        meas.deployments,
        meas.created,
        meas.ready,
        meas.pending,
    )
    t_start, t_apply, t_ready, t_idle_end = meas.t_start, meas.t_apply, meas.t_ready, meas.t_idle_end
    before_operator, at_apply, at_ready, at_idle_end = meas.apiserver
    at_apply_probe, ready_probe, idle_probe = meas.at_apply_probe, meas.ready_probe, meas.idle_probe
    requests = sorted((Request.from_entry(e) for e in meas.entries), key=lambda r: r.t)
    startup = summarize(requests, t_start, t_apply)
    cold = summarize(requests, t_apply, t_ready)
    idle = summarize(requests, t_ready, t_idle_end)
    unchanged = unchanged_writes(requests)
    idle_writes = [(r, i in unchanged) for i, r in enumerate(requests) if t_ready <= r.t < t_idle_end and r.kind.write]
    cold_unchanged = sum(1 for i in unchanged if t_apply <= requests[i].t < t_ready)
    applies = Counter(r.kind.resource for r in requests if t_apply <= r.t < t_ready and r.kind.verb == "APPLY")
    objects = {"jobs": len(jobs), "deployments": len(deployments), "services": len(models)}
    model_names = [m["metadata"]["name"] for m in models]

    def owners(objects: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
        return {
            (o["metadata"]["namespace"], o["metadata"]["name"]): o["metadata"]["labels"][LABEL_MODEL] for o in objects
        }

    job_writes = per_model_first_writes(requests, "jobs", owners(jobs))
    deployment_writes = per_model_first_writes(requests, "deployments", owners(deployments))
    completions: dict[tuple[str, str], float] = {}
    for j in jobs:
        done = (j.get("status") or {}).get("completionTime")
        if done:
            key = (j["metadata"]["namespace"], j["metadata"]["labels"][LABEL_MODEL])
            completions[key] = max(completions.get(key, 0.0), parse_time(done) - meas.wall_offset)
    last_completion = max(completions.values()) if completions else None

    per_model_ready = [ready[k] - created[k] for k in ready]
    per_model_first_job = [min(ts) - created[k] for k, ts in job_writes.items() if k in created]
    # The operator's own reaction: from a model's last build Job completing to all its Deployments written.
    reaction = [max(ts) - completions[k] for k, ts in deployment_writes.items() if k in completions]
    after_builds = [ready[k] - completions[k] for k in ready if k in completions]
    profile_of = {m["metadata"]["name"]: m["metadata"]["labels"][LABEL_PROFILE] for m in models}
    ready_by_profile: dict[str, list[float]] = defaultdict(list)
    for key, t in ready.items():
        ready_by_profile[profile_of[key[1]]].append(t - created[key])

    n = len(models)
    result: dict[str, Any] = {
        "quick": opts.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "arch": platform.machine()},
        "setup": {
            "models": n,
            "namespaces": opts.namespaces,
            "nodes": meas.nodes,
            "gpuNodes": meas.gpu_nodes,
            "fleetScale": opts.fleet_scale,
            "resyncSeconds": opts.resync_seconds,
            "idleSeconds": opts.idle_seconds,
            "profiles": [
                {
                    "name": p.name,
                    "count": sum(1 for m in models if m["metadata"]["labels"][LABEL_PROFILE] == p.name),
                    "note": p.note,
                }
                for p in PROFILES
            ],
            "buildJobs": len(jobs),
            "deployments": len(deployments),
        },
        "readiness": {
            "allReady": not pending,
            "ready": len(ready),
            "notReady": [{"model": f"{ns}/{name}", "reason": why} for (ns, name), why in sorted(pending.items())][:20],
            "createSeconds": round(meas.t_created - t_apply, 2),
            "applyToAllReadySeconds": round(t_ready - t_apply, 1),
            "applyToLastJobCompleteSeconds": round(last_completion - t_apply, 1) if last_completion else None,
            "lastJobCompleteToAllReadySeconds": round(t_ready - last_completion, 1) if last_completion else None,
            "perModelReadySeconds": spread(per_model_ready),
            "perModelFirstJobSeconds": spread(per_model_first_job),
            "perModelOwnJobsCompleteToDeploymentsWrittenSeconds": spread(reaction),
            "perModelOwnJobsCompleteToReadySeconds": spread(after_builds),
            "perProfileReadySeconds": {p: spread(v) for p, v in sorted(ready_by_profile.items())},
            "readyFlipsDuringIdle": meas.flips,
            "pollSeconds": 1.0,
        },
        "requests": {
            "startup": startup.as_json(),
            "cold": cold.as_json(),
            "idle": idle.as_json(),
            "coldPerModel": round(cold.total / n, 2),
            "coldWritesPerModel": round(cold.writes / n, 2),
            "coldReadsPerModel": round((cold.total - cold.writes) / n, 2),
            "coldUnchangedWrites": cold_unchanged,
            "coldAppliesPerObject": {k: round(applies[k] / v, 2) for k, v in objects.items() if v},
            "idleWrites": len(idle_writes),
            "idleUnchangedWrites": sum(1 for _, no_op in idle_writes if no_op),
            "idleWritesPer10s": timeline((r.t for r, _ in idle_writes), t_ready, t_idle_end, 10.0),
            "idleWriteDetail": describe_idle_writes(idle_writes, t_ready, model_names),
        },
        "apiserver": {
            "startup": _delta(at_apply, before_operator),
            "cold": _delta(at_ready, at_apply),
            "idle": _delta(at_idle_end, at_ready),
        },
        "memory": {
            "peakRssMiB": round(idle_probe.hwm_kib / 1024, 1),
            "rssAfterStartupMiB": round(at_apply_probe.rss_kib / 1024, 1),
            "peakRssByAllReadyMiB": round(ready_probe.hwm_kib / 1024, 1),
            "rssAtAllReadyMiB": round(ready_probe.rss_kib / 1024, 1),
            "rssAfterIdleMiB": round(idle_probe.rss_kib / 1024, 1),
        },
        "cpu": {
            "startupSeconds": round(at_apply_probe.cpu_seconds, 1),
            "coldSeconds": round(ready_probe.cpu_seconds - at_apply_probe.cpu_seconds, 1),
            "idleSeconds": round(idle_probe.cpu_seconds - ready_probe.cpu_seconds, 1),
            "proxySeconds": round(meas.proxy_cpu, 1),
        },
        "operatorLog": operator_log_summary(meas.operator_log),
        "healthySeconds": round(meas.t_healthy - t_start, 1),
    }
    return result


def _delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# --- the report (pure) ---------------------------------------------------------------------------------------


def _kind_table(phase: Mapping[str, Any], models: int, *, per_model: bool) -> list[str]:
    failed: Counter[tuple[str, str]] = Counter()
    for f in phase["failed"]:
        failed[(f["verb"], f["resource"])] += f["count"]
    head = "| verb | resource | requests |" + (" per model |" if per_model else "") + " failed (4xx/5xx) |"
    lines = [head, "|---|---|---:|" + ("---:|" if per_model else "") + "---:|"]
    for row in sorted(phase["byKind"], key=lambda r: -r["count"]):
        cells = [row["verb"], f"`{row['resource']}`", str(row["count"])]
        if per_model:
            cells.append(f"{row['count'] / models:.2f}")
        cells.append(str(failed[(row["verb"], row["resource"])] or ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(r: Mapping[str, Any]) -> str:
    s, rd, rq, mem, cpu, api = r["setup"], r["readiness"], r["requests"], r["memory"], r["cpu"], r["apiserver"]
    n, cold, idle, startup = s["models"], rq["cold"], rq["idle"], rq["startup"]
    idle_s = f"{s['idleSeconds']:g} s"
    counted = cold["total"] - cold["discovery"]  # as apiserver_request_total counts: without discovery
    share = f"{counted / api['cold']['total']:.0%}" if api["cold"]["total"] else "-"
    headline = [
        ("models Ready", f"{rd['ready']}/{n}" + ("" if rd["allReady"] else " (TIMED OUT)")),
        (
            "creation of all models → all Ready",
            f"**{rd['applyToAllReadySeconds']:.1f} s** (creating them took {rd['createSeconds']:.1f} s)",
        ),
        (
            "creation → last build Job complete",
            f"{_opt(rd['applyToLastJobCompleteSeconds'])} ({s['buildJobs']} build Jobs; "
            f"{s['deployments']} Deployments in the end)",
        ),
        ("last build Job complete → all Ready", _opt(rd["lastJobCompleteToAllReadySeconds"])),
        ("per model: creation → first build Job written", _spread(rd["perModelFirstJobSeconds"])),
        (
            "per model: its own Jobs complete → all its Deployments written (the operator's reaction)",
            _spread(rd["perModelOwnJobsCompleteToDeploymentsWrittenSeconds"]),
        ),
        ("per model: its own Jobs complete → Ready", _spread(rd["perModelOwnJobsCompleteToReadySeconds"])),
        ("per model: creation → Ready", _spread(rd["perModelReadySeconds"])),
        (
            "operator API requests, creation → all Ready",
            f"{cold['total']} = **{rq['coldPerModel']:.1f} per model** ({rq['coldWritesPerModel']:.1f} writes"
            f" + {rq['coldReadsPerModel']:.1f} reads)",
        ),
        (
            "applies per object, creation → all Ready (1.0 = each written once)",
            ", ".join(f"{k} {v:.1f}" for k, v in rq["coldAppliesPerObject"].items()),
        ),
        (
            "writes that changed nothing (same resourceVersion as the previous write), creation → all Ready",
            f"at least {rq['coldUnchangedWrites']} of {cold['writes']}",
        ),
        (
            "its share of all apiserver requests then",
            f"{share} of {api['cold']['total']}, discovery left out (the rest: controller-manager, scheduler,"
            " KWOK, this bench)",
        ),
        (
            "operator start-up, before any model",
            f"{startup['total']} requests ({startup['watches']} watches); healthy after {r['healthySeconds']:.1f} s",
        ),
        (
            "operator peak RSS (VmHWM)",
            f"**{mem['peakRssMiB']:.0f} MiB** (RSS after start-up {mem['rssAfterStartupMiB']:.0f} MiB, at all"
            f" Ready {mem['rssAtAllReadyMiB']:.0f} MiB, after idle {mem['rssAfterIdleMiB']:.0f} MiB)",
        ),
        (
            "operator CPU time",
            f"start-up {cpu['startupSeconds']:.1f} s, cold {cpu['coldSeconds']:.1f} s, idle {cpu['idleSeconds']:.1f} s"
            f" (the counting proxy used {cpu['proxySeconds']:.1f} s in all)",
        ),
        (
            f"**operator writes in {idle_s} idle**",
            f"**{rq['idleWrites']}** (goal 0: {'met' if rq['idleWrites'] == 0 else 'NOT met'}; at least"
            f" {rq['idleUnchangedWrites']} of them changed nothing); reads {idle['total'] - idle['writes']}"
            f" ({idle['watches']} watch restarts)",
        ),
        ("models seen not Ready while idle (a poll every 10 s)", str(rd["readyFlipsDuringIdle"])),
    ]
    quick = " (quick run)" if r["quick"] else ""
    out = [
        f"# Operator at scale: {n} InferenceModels on {s['nodes']} fake nodes{quick}",
        "",
        f"Machine: {r['machine']['arch']}, {r['machine']['cpus']} CPUs shared with other work, Python"
        f" {r['machine']['python']}. Cluster: real kube-apiserver, controller-manager and scheduler (Kubernetes"
        f" v1.33) with KWOK nodes and pods (`hack/cluster.sh`, own cluster `mf-bench`, fleet scale"
        f" {s['fleetScale']}: {s['gpuNodes']} GPU nodes of 4 architectures + {s['nodes'] - s['gpuNodes']} CPU"
        f" nodes). {n} models in {s['namespaces']} namespaces; KWOK completes each build pod 1 s after it runs"
        " and makes serving pods Ready. The operator runs as a local process (`modelfleet operator`, resync every"
        f" {s['resyncSeconds']:g} s). Generated by `python -m bench.bench_operator`.",
        "",
        "**How it is measured.** API requests: the operator's kubeconfig points at a counting reverse proxy on"
        " 127.0.0.1 (`bench/operator_proxy.py`) that forwards to the apiserver with the admin certificate and"
        " streams responses unbuffered, so every request of the operator, and only the operator's, is counted"
        " exactly (verb and resource as `apiserver_request_total` names them; a watch counts once, when it"
        " starts). Time to Ready: one LIST of all models per second (±1 s), each model counted from its own"
        " creation; Job completion times are the Jobs' `completionTime` (1 s resolution). Peak RSS: `VmHWM` of"
        " the operator process. Spreads are p50 / p90 / max.",
        "",
        "## Headline",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in headline),
        "",
    ]
    if rd["notReady"]:
        out += ["Models not Ready at the deadline (first 20):", ""]
        out += [f"- `{x['model']}`: {x['reason']}" for x in rd["notReady"]] + [""]
    out += ["## Idle: the operator's writes after all were Ready", ""]
    if rq["idleWrites"] == 0:
        out += [f"None in {idle_s}: no hot loop. Its idle reads:", ""]
        out += _kind_table(idle, n, per_model=False) if idle["byKind"] else ["(none)"]
    else:
        out += [_idle_detail(rq, idle_s), ""] + _kind_table(idle, n, per_model=False)
    out += [
        "",
        f"## Cold phase: the operator's requests from creation until all {n} were Ready",
        "",
        *_kind_table(cold, n, per_model=True),
        "",
        "## Start-up, before any model existed",
        "",
        *_kind_table(startup, n, per_model=False),
        "",
        "## Time to Ready per profile (creation → Ready)",
        "",
        "| profile | models | what | Ready |",
        "|---|---:|---|---|",
        *(
            f"| `{p['name']}` | {p['count']} | {p['note']} | {_spread(rd['perProfileReadySeconds'].get(p['name']))} |"
            for p in s["profiles"]
        ),
        "",
        "## All clients, from the apiserver's own metrics",
        "",
        "| phase | all requests | all writes |",
        "|---|---:|---:|",
        *(f"| {ph} | {api[ph]['total']} | {api[ph]['writes']} |" for ph in ("startup", "cold", "idle")),
        "",
        "## Operator log",
        "",
        f"Lines by level: {r['operatorLog']['levels'] or 'no warnings or errors'}.",
        *(f"- {c} x `{msg}`" for msg, c in r["operatorLog"]["top"]),
        "",
        "## Reading it",
        "",
        "- The cold phase is bounded by the cluster as much as by the operator: the controller-manager creates"
        " every build pod, ReplicaSet and serving pod under its default client rate limit (20 QPS, burst 30),"
        ' and KWOK, the scheduler, the apiserver and this bench share the same 2 cores. "Own Jobs complete →'
        " Ready\" is what follows a model's builds: the operator reads the termination messages and writes the"
        " Deployments, then the controller-manager, scheduler and KWOK bring their pods up.",
        "- Writes per model include the operator's Events (BuildStarted and EngineReady per architecture,"
        " DeploymentCreated, Ready).",
        "",
    ]
    return "\n".join(out)


def _idle_detail(rq: Mapping[str, Any], idle_s: str) -> str:
    lines = [
        f"{rq['idleWrites']} writes in {idle_s}; per 10 s: {rq['idleWritesPer10s']}.",
        "",
        "| verb | resource | count | changed nothing | first / last (s after all Ready) | models | statuses |"
        " most touched |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for g in rq["idleWriteDetail"]["groups"]:
        top = ", ".join(f"{m} x{c}" for m, c in g["topModels"][:3])
        lines.append(
            f"| {g['verb']} | `{g['resource']}` | {g['count']} | {g['unchanged']} | {g['firstSeconds']} /"
            f" {g['lastSeconds']} |"
            f" {g['models']} | {g['statuses']} | {top} |"
        )
    lines += ["", "Samples (path, seconds after all Ready, first bytes of the body):", ""]
    for g in rq["idleWriteDetail"]["groups"][:4]:
        for smp in g["samples"][:2]:
            lines += [
                f"- `{g['verb']} {smp['path']}` at {smp['atSeconds']} s:",
                "",
                "  ```",
                f"  {smp['body']}",
                "  ```",
            ]
    lines += ["", "All idle requests:"]
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _spread(s: Mapping[str, float] | None) -> str:
    return "-" if not s else f"{s['p50']:.1f} / {s['p90']:.1f} / {s['max']:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", type=int, default=None, help="InferenceModels to create (default 200; quick 20)")
    parser.add_argument(
        "--namespaces", type=int, default=None, help="namespaces to spread them over (default 10; quick 2)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=None, help="idle window after all Ready (default 180; quick 20)"
    )
    parser.add_argument(
        "--fleet-scale", type=int, default=None, help="nodes per GPU kind (default 12 = 50 nodes; quick 3)"
    )
    parser.add_argument("--resync-seconds", type=float, default=60, help="operator resync period (default 60)")
    parser.add_argument("--ready-timeout", type=float, default=600, help="give up waiting for Ready after this")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the mf-bench cluster running")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 models, 20 s idle, 14 nodes")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    opts = Options(
        models=args.models or (20 if quick else 200),
        namespaces=args.namespaces or (2 if quick else 10),
        idle_seconds=args.idle_seconds if args.idle_seconds is not None else (20 if quick else 180),
        fleet_scale=args.fleet_scale or (3 if quick else 12),
        resync_seconds=args.resync_seconds,
        ready_timeout=args.ready_timeout,
        keep_cluster=args.keep_cluster,
        quick=quick,
    )
    if opts.models < 1 or opts.namespaces < 1 or opts.namespaces > opts.models:
        parser.error("need 1 <= --namespaces <= --models")
    result = analyse(measure(opts), opts)
    stem = "operator-quick" if quick else "operator"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    markdown = render_markdown(result)
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0 if result["readiness"]["allReady"] else 1


if __name__ == "__main__":
    sys.exit(main())
