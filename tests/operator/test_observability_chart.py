"""The chart's metrics objects (real `helm template`/`helm lint`) and the dashboard's queries against real scrapes."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modelfleet_operator.autoscaler.controller import Autoscaler
from modelfleet_operator.autoscaler.sources import PodScrapeSource
from modelfleet_operator.metrics import OperatorMetrics, serve
from tests.modelzoo import classifier_model
from tests.runtime.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "modelfleet"
DASHBOARD = CHART / "dashboards" / "modelfleet.json"
# What PromQL spells that is not a metric name.
PROMQL_WORDS = {"and", "or", "unless", "on", "ignoring", "group_left", "group_right", "offset", "bool", "le"}


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "cluster.sh"), "bin-dir"], capture_output=True, text=True, check=False
    )
    path = Path(out.stdout.strip()) / "helm"
    assert out.returncode == 0 and path.exists(), "no helm binary: `make cluster-up` builds the local tool chain"
    return str(path)


def render(helm: str, *sets: str) -> list[dict[str, Any]]:
    args = [helm, "template", "mf", str(CHART), "--namespace", "modelfleet-system"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def test_lint_strict_passes_with_everything_on_and_off(helm: str) -> None:
    for sets in ([], ["metrics.serviceMonitor.enabled=true", "metrics.dashboard.enabled=true"]):
        flags = [x for s in sets for x in ("--set", s)]
        proc = subprocess.run(
            [helm, "lint", "--strict", str(CHART), *flags], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_service_monitor_and_dashboard_appear_only_when_enabled(helm: str) -> None:
    default = render(helm)
    assert "ServiceMonitor" not in kinds(default) and "ConfigMap" not in kinds(default)
    service = next(d for d in default if d["kind"] == "Service")
    assert service["spec"]["ports"][0] == {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    container = next(d for d in default if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 8080} in container["ports"]
    assert {"--metrics-port=8080", "--log-format=json"} <= set(container["args"])

    on = render(helm, "metrics.serviceMonitor.enabled=true", "metrics.dashboard.enabled=true", "logFormat=text")
    monitor = next(d for d in on if d["kind"] == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    dashboard = next(d for d in on if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["modelfleet.json"]) == json.loads(DASHBOARD.read_text())
    args = next(d for d in on if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--log-format=text" in args


def test_the_schema_refuses_the_liveness_port_and_an_unknown_log_format(helm: str) -> None:
    for bad in ("metrics.port=8081", "logFormat=xml"):
        args = [helm, "template", "mf", str(CHART), "--set", bad]
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, bad


def dashboard_metric_names() -> set[str]:
    """Every metric name a dashboard query reads (strings, label matchers, ranges, groupings, functions removed)."""
    names: set[str] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r'"[^"]*"', "", target["expr"])
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
            expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)
            expr = re.sub(r"\b[a-zA-Z_]\w*\s*\(", "(", expr)  # function calls
            names |= {w for w in re.findall(r"\b[a-zA-Z_:][\w:]*\b", expr) if w not in PROMQL_WORDS}
    return names


def exported_names(text: str) -> set[str]:
    """The sample names a scrape exposes, families without samples yet included (with their type's suffixes)."""
    out: set[str] = set()
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "summary": ["_sum", "_count", ""],
    }
    for family in text_string_to_metric_families(text):
        out |= {s.name for s in family.samples}
        out |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return out


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def operator_scrape() -> Iterator[str]:
    """The operator's /metrics as main() serves it: its own registry and the autoscaler's, on one port."""
    server = serve(0, OperatorMetrics().registry, Autoscaler(PodScrapeSource()).registry)
    try:
        yield scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def runtime_scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `modelfleet serve` of a small classifier, scraped at /metrics."""
    work = tmp_path_factory.mktemp("runtime")
    server = ServerProcess(classifier_model(work / "clf.onnx"), "clf", work / "serve.log")
    try:
        server.wait_ready()
        yield scrape(f"{server.url}/metrics")
    finally:
        server.proc.kill()
        server.proc.wait(timeout=60)


def test_every_dashboard_query_reads_a_metric_the_operator_or_the_runtime_exports(
    operator_scrape: str, runtime_scrape: str
) -> None:
    wanted = dashboard_metric_names()
    operator, runtime = exported_names(operator_scrape), exported_names(runtime_scrape)
    assert wanted - (operator | runtime) == set()
    # The dashboard covers both sides (so this test would notice it losing either).
    assert {"controller_runtime_reconcile_total", "workqueue_depth", "modelfleet_builds_total"} <= wanted & operator
    assert {"modelfleet_requests_total", "modelfleet_request_duration_seconds_bucket"} <= wanted & runtime


def test_the_operator_exports_controller_runtime_s_names_and_labels(operator_scrape: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(operator_scrape)}
    reconcile = families["controller_runtime_reconcile"]
    assert reconcile.type == "counter"
    assert {s.labels["result"] for s in reconcile.samples} == {"success", "error", "requeue", "requeue_after"}
    assert {s.labels["controller"] for s in reconcile.samples} == {"inferencemodel"}
    depth = families["workqueue_depth"].samples[0].labels
    assert depth == {"name": "inferencemodel", "controller": "inferencemodel", "priority": ""}
    for name in (
        "workqueue_queue_duration_seconds",
        "workqueue_work_duration_seconds",
        "controller_runtime_reconcile_time_seconds",
    ):
        assert families[name].type == "histogram", name
    assert not [n for n in exported_names(operator_scrape) if n.endswith("_created")]
